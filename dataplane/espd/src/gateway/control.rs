//! Runtime changes: the control socket and how a change reaches the
//! running workers (docs/control.md).
//!
//! A batch is checked line by line against the running SAD and SPD
//! ([`espd_config::db`]: what the batch's own lines did is kept beside
//! them), all or nothing, and becomes a
//! list of changes ([`Op`]) with every new SA's keys expanded once. They
//! are applied to a copy of the running [`Tables`] — O(log n) each — which
//! is published to the workers (RCU through an `ArcSwap`): each worker
//! picks the new tables up between two bursts, keeping the runtime state of
//! every SA that did not change ([`Engine::set_tables`]). The answer is sent
//! once every worker runs on them (or sleeps and will wake on them). The
//! old tables, and the keys only they held, are freed when the last worker
//! lets go of them.

use super::mirror::{Delta, Maps, SeqOp};
use super::worker::Snapshot;
use super::Stats;
use arc_swap::ArcSwap;
use espd_config::db::Op;
use espd_config::Config;
use espd_core::engine::Engine;
use espd_core::state::{SaCore, Tables};
use espd_io::steer::Steering;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How engines are built for this gateway.
pub struct EngineParams {
    pub inside_addrs: Vec<IpAddr>,
    pub mtu: usize,
    pub bench_no_crypto: bool,
    pub workers: u32,
    /// Host mode: the inside is this host's own stack (no hop to count).
    pub host: bool,
    /// The clock of SA lifetimes (engines and tables count from it).
    pub start: Instant,
}

impl EngineParams {
    /// One engine per worker over the shared tables.
    pub fn build(&self, tables: &Arc<Tables>) -> Vec<Engine> {
        (0..self.workers)
            .map(|q| {
                let mut e = Engine::with_tables(Arc::clone(tables));
                // A gateway is a router (TTL / hop limit); a host sends its own.
                e.set_router(!self.host);
                e.set_worker(q);
                // One owner per SA, and one sequence counter (see docs/architecture.md).
                e.set_shared(self.workers > 1);
                e.set_icmp_sources(&self.inside_addrs);
                e.set_mtu(Some(self.mtu));
                e
            })
            .collect()
    }

    /// Seconds on the lifetime clock.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    /// An SA as this gateway installs it.
    fn prepare(&self, core: &mut SaCore) {
        if self.bench_no_crypto {
            core.transform = espd_core::crypto::Transform::BenchNoCrypto;
        }
    }

    /// Applies `ops` to `t` (a copy of the running tables): the SAs'
    /// sequence numbers continued from the store first (RFC 4303 §3.3.3).
    pub fn apply_ops(
        &self,
        t: &mut Tables,
        ops: Vec<Op>,
        seqs: &super::seqstore::SeqStore,
    ) -> Result<Delta, String> {
        let mut d = Delta::default();
        t.set_clock(self.now());
        for op in ops {
            self.apply_op(t, op, seqs, &mut d)?;
        }
        Ok(d)
    }

    /// Applies one change to `t`, with what it did added to `d` (see
    /// [`EngineParams::apply_ops`]; the caller sets `t`'s clock first).
    pub fn apply_op(
        &self,
        t: &mut Tables,
        op: Op,
        seqs: &super::seqstore::SeqStore,
        d: &mut Delta,
    ) -> Result<(), String> {
        // Outbound: from one of ours to an address whose ESP is not ours.
        let outbound = |t: &Tables, c: &espd_core::state::SaConfig| {
            t.is_local(c.src) && t.esp_local().binary_search(&c.dst).is_err()
        };
        match op {
            Op::AddSa(mut core) => {
                if outbound(t, &core.cfg) {
                    let (rec, continued) = seqs.admit(&mut core.cfg);
                    core.share = espd_core::state::SaShare::new(core.cfg.replay_oseq);
                    d.seqs.push(SeqOp::Record(rec, continued));
                }
                self.prepare(&mut core);
                super::mirror::apply_op(t, Op::AddSa(core), d)?;
            }
            Op::UpdateSa(mut core) => {
                self.prepare(&mut core);
                if let Some(id) = super::mirror::apply_op(t, Op::UpdateSa(core), d)? {
                    let c = &t.sad().get(id).cfg;
                    if outbound(t, c) {
                        d.seqs
                            .push(SeqOp::Updated(super::seqstore::NewRecord::of(c)));
                    }
                }
            }
            Op::DelSa(dst, spi) => {
                super::mirror::apply_op(t, op, d)?;
                d.seqs.push(SeqOp::Forget(dst, spi));
            }
            op => {
                super::mirror::apply_op(t, op, d)?;
            }
        }
        Ok(())
    }
}

/// Phase times of one change, printed with `ESPD_TRACE_APPLY=1`
/// (docs/performance.md).
struct Trace {
    on: bool,
    start: Instant,
    last: Instant,
    phases: Vec<(&'static str, Duration)>,
}

impl Trace {
    fn new() -> Trace {
        let now = Instant::now();
        Trace {
            on: std::env::var_os("ESPD_TRACE_APPLY").is_some(),
            start: now,
            last: now,
            phases: Vec::new(),
        }
    }
    fn mark(&mut self, what: &'static str) {
        if self.on {
            let now = Instant::now();
            self.phases.push((what, now - self.last));
            self.last = now;
        }
    }
    fn report(&self, name: &str) {
        if self.on {
            let p: Vec<String> = self
                .phases
                .iter()
                .map(|(w, d)| format!("{w} {:.3} ms", d.as_secs_f64() * 1e3))
                .collect();
            eprintln!(
                "espd run: apply {name}: {:.3} ms ({})",
                self.start.elapsed().as_secs_f64() * 1e3,
                p.join(", ")
            );
        }
    }
}

/// How a worker tells the control thread which tables it runs on.
#[derive(Default)]
pub struct WorkerSync {
    /// The version of the tables the worker runs on.
    pub seen: AtomicU64,
    /// Set while the worker sleeps in poll(2): it takes the newest tables
    /// before it handles another packet.
    pub parked: AtomicBool,
}

/// Everything the control socket acts on.
pub struct Control {
    /// The running tables (the control side's copy; changed, then published).
    pub tables: Mutex<Tables>,
    /// What the workers run on.
    pub shared: Arc<ArcSwap<Tables>>,
    /// The running configuration's SAD and SPD (O(1) copies of the tables').
    pub cfg: Mutex<Config>,
    /// What the XDP maps hold, changed with each batch.
    pub maps: Mutex<Maps>,
    pub steer: Arc<Mutex<Steering>>,
    pub workers: Vec<Arc<WorkerSync>>,
    pub snaps: Vec<Arc<Mutex<Snapshot>>>,
    pub cores: Vec<(usize, usize)>,
    pub params: EngineParams,
    /// The kernel's fail-closed copy of the SPD (see [`super::guard`]).
    pub guard: Mutex<super::guard::Guard>,
    /// Host mode: the host table's routes (they follow the outbound policies).
    pub host: Mutex<Option<super::host::Routes>>,
    /// The next-hop table (host mode warms it with new local destinations).
    pub nexthop: Arc<super::nexthop::Table>,
    /// Outbound sequence numbers kept across restarts (see [`super::seqstore`]).
    pub seqs: Mutex<super::seqstore::SeqStore>,
    /// One change at a time.
    pub apply_lock: Mutex<()>,
    /// Connections that receive events (`espctl monitor`, v2 `subscribe`).
    pub monitors: Mutex<Vec<Arc<Mutex<UnixStream>>>>,
    /// Control connections being served now.
    pub clients: AtomicUsize,
}

impl Control {
    /// Applies a batch to the running gateway; the changes made, or why not.
    pub fn apply(&self, name: &str, text: &str) -> Result<Value, String> {
        let _one = self
            .apply_lock
            .lock()
            .map_err(|_| "control state poisoned")?;
        let mut trace = Trace::new();
        // The running tables, read to check the batch's lines, and a copy
        // (O(1)) that each line's change goes into as soon as it is checked.
        let base = self.tables.lock().map_err(|_| "poisoned")?.clone();
        let mut t = base.clone();
        t.set_clock(self.params.now());
        let mut events = Vec::new();
        let mut delta = Delta::default();
        let ch = {
            let seqs = self.seqs.lock().map_err(|_| "poisoned")?;
            espd_config::db::apply_each(name, text, base.sad(), base.spd(), |op| {
                match &op {
                    Op::AddSa(c) => events.push(("sa-added", c.cfg.dst, c.cfg.spi)),
                    Op::DelSa(d, s) => events.push(("sa-removed", *d, *s)),
                    _ => {}
                }
                self.params.apply_op(&mut t, op, &seqs, &mut delta)
            })
            .map_err(|e| e.to_string())?
        };
        drop(base);
        let delta = delta;
        trace.mark("lines checked, keys expanded, tables");
        // Everything below costs what the batch changed (the maps and the
        // guard's contributions are persistent: their copies are O(1)).
        let mut maps = self.maps.lock().map_err(|_| "poisoned")?.clone();
        let plan = maps.apply(&delta, &t);
        maps.check_limits()?;
        trace.mark("XDP plan");
        let mut guard = self.guard.lock().map_err(|_| "guard poisoned")?;
        let mut contrib = guard.contrib.clone();
        let keys = contrib.stage(delta.policy_steps());
        // The guard first: what the change protects or blocks is dropped by
        // the kernel before espd's workers handle it (make-before-break).
        guard
            .tighten_keys(&contrib, &keys)
            .map_err(|e| format!("kernel XFRM guard: {e}"))?;
        // Host mode: new protected destinations prohibited (the pair route
        // follows once the workers run on the policy).
        // Staged on a copy, kept only if the change goes through.
        let mut host = self.host.lock().map_err(|_| "host routes poisoned")?;
        let mut staged = match host.clone() {
            Some(mut r) => {
                let st = r.stage(delta.policies().map(|(a, p)| (a, &**p)));
                r.tighten(&st).map_err(|e| format!("{e:#}"))?;
                // The addresses new inbound policies deliver to (a virtual
                // address espd-ike just put on the host) are resolved now:
                // the first decapsulated packet for one finds it known.
                for (added, p) in delta.policies() {
                    let full = if p.sel.dst.is_ipv4() { 32 } else { 128 };
                    if added && p.dir == espd_core::state::Direction::In && p.sel.dst.len == full {
                        self.nexthop.lookup(p.sel.dst.addr);
                    }
                }
                Some((r, st))
            }
            None => None,
        };
        trace.mark("guard tightened");
        {
            let mut st = self.steer.lock().map_err(|_| "steering poisoned")?;
            plan.add(&mut st).map_err(|e| format!("XDP maps: {e}"))?;
        }
        trace.mark("XDP added");
        // Publish, and wait until every worker runs on the new tables.
        let version = t.version();
        self.shared.store(Arc::new(t.clone()));
        self.wait_for_workers(version)?;
        trace.mark("workers live");
        {
            let mut st = self.steer.lock().map_err(|_| "steering poisoned")?;
            plan.remove(&mut st).map_err(|e| format!("XDP maps: {e}"))?;
        }
        // Loosened only now that every worker runs on the new policies. A
        // failure leaves stricter entries behind (fail closed): logged.
        if let Err(e) = guard.loosen_keys(contrib, &keys) {
            eprintln!("espd run: guard: removing entries the change no longer needs: {e}");
        }
        drop(guard);
        if let Some((r, st)) = staged.as_mut() {
            if let Err(e) = r.loosen(st) {
                eprintln!("espd run: host routes: {e:#}");
            }
        }
        if let Some((r, _)) = staged {
            *host = Some(r);
        }
        drop(host);
        // The sequence store follows (written by the periodic saver).
        self.seqs.lock().map_err(|_| "poisoned")?.apply(&delta.seqs);
        *self.maps.lock().map_err(|_| "poisoned")? = maps;
        *self.cfg.lock().map_err(|_| "poisoned")? = Config {
            sad: t.sad().clone(),
            spd: t.spd().clone(),
        };
        *self.tables.lock().map_err(|_| "poisoned")? = t;
        // Made only for someone listening (a batch of 100 000 SAs is as many events).
        if self.monitors.lock().is_ok_and(|m| !m.is_empty()) {
            for (ev, dst, spi) in events {
                self.broadcast(json!({"event": ev, "dst": dst.to_string(), "spi": format!("0x{spi:08x}"), "by": name}));
            }
        }
        trace.mark("loosened, committed");
        trace.report(name);
        Ok(json!({
            "states_added": ch.states_added, "states_updated": ch.states_updated,
            "states_deleted": ch.states_deleted, "policies_added": ch.policies_added,
            "policies_updated": ch.policies_updated, "policies_deleted": ch.policies_deleted,
        }))
    }

    /// Until every worker runs on tables of `version` or newer (a parked
    /// worker takes the newest before its next packet).
    fn wait_for_workers(&self, version: u64) -> Result<(), String> {
        let start = Instant::now();
        let mut spins = 0u32;
        while self
            .workers
            .iter()
            .any(|w| w.seen.load(Ordering::SeqCst) < version && !w.parked.load(Ordering::SeqCst))
        {
            if start.elapsed() > Duration::from_secs(10) {
                return Err("a worker did not take the new configuration within 10 s".into());
            }
            spins += 1;
            if spins < 2000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        Ok(())
    }

    /// One event line to every `espctl monitor`; gone ones are forgotten.
    pub fn broadcast(&self, ev: Value) {
        let mut line = ev.to_string();
        line.push('\n');
        if let Ok(mut m) = self.monitors.lock() {
            m.retain(|s| {
                s.lock()
                    .is_ok_and(|mut s| s.write_all(line.as_bytes()).is_ok())
            });
        }
    }

    /// The counters of every worker, SA and XDP action, now.
    pub fn counters(&self) -> Stats {
        // The locks only for what is read under them (the configuration's
        // copy is O(1)): the walk over every SA below must not hold up a
        // change (at 100 000 SAs it takes about 0.1 s).
        let xdp = self.steer.lock().expect("steering lock").counters().ok();
        let cfg = self.cfg.lock().expect("config lock").clone();
        Stats::gather_final(&self.snaps, xdp, &cfg, &self.cores)
    }

    /// The workers' latest outbound sequence numbers to the store; `clean`
    /// once they have all stopped.
    pub fn save_sequences(&self, clean: bool) -> anyhow::Result<()> {
        // Every [`super::seqstore::PERIOD`]: it costs what the SAs that carry
        // traffic cost (not every SA), and no lock a change needs is held
        // while the file is written (at 100 000 SAs several MiB and an fsync).
        let cfg = self
            .cfg
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone();
        let snaps: Vec<Snapshot> = self
            .snaps
            .iter()
            .map(|s| s.lock().map(|s| s.clone()).unwrap_or_default())
            .collect();
        // The SAs that sent through a worker (an outbound SA's number is
        // its highest on any worker).
        let seen: Vec<(std::net::IpAddr, u32, u64)> = snaps
            .iter()
            .flat_map(|s| s.sa.iter())
            .filter(|(_, st)| st.oseq > 0)
            .filter_map(|(id, st)| {
                let c = &cfg.sad.core(*id)?.cfg;
                Some((c.dst, c.spi, st.oseq))
            })
            .collect();
        let pending = {
            let mut seqs = self.seqs.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            seqs.update(seen);
            seqs.render(clean)
        };
        let Some(w) = pending else {
            return Ok(());
        };
        w.write().inspect_err(|_| {
            if let Ok(mut s) = self.seqs.lock() {
                s.unwritten();
            }
        })
    }

    fn handle(&self, mut req: Value) -> Answer {
        if let Err(e) = espd_proto::check_version(&req) {
            return Answer::Value(e);
        }
        let v = espd_proto::version_of(&req);
        let id = req.get("id").cloned();
        match req.get("op").and_then(Value::as_str) {
            Some("stats") => return Answer::Text(self.counters().answer(id.as_ref(), v)),
            Some("states") => {
                // The listing may hold keys: written once, at its size, into
                // memory wiped after (a JSON value of it, and the text the
                // value serializes to, would be copies freed unwiped).
                let keys = req.get("keys").and_then(Value::as_bool).unwrap_or(false);
                let text = self.state_text(keys);
                let mut head = espd_proto::ok(json!({}));
                head["v"] = json!(v);
                if let Some(id) = id {
                    head["id"] = id;
                }
                return Answer::Line(espd_proto::request_line(&head, Some(&text)));
            }
            _ => {}
        }
        let mut answer = self.answer(&mut req);
        answer["v"] = json!(v);
        if let Some(id) = id {
            answer["id"] = id;
        }
        Answer::Value(answer)
    }

    /// Every SA as a `state add` line, keys written if `keys`; wiped on drop.
    fn state_text(&self, keys: bool) -> zeroize::Zeroizing<String> {
        // An O(1) copy: a listing does not hold up a change.
        let cfg = self.running();
        let lines = espd_config::db::state_lines(&cfg.sad, keys);
        let mut text = zeroize::Zeroizing::new(String::with_capacity(
            lines.iter().map(|l| l.len() + 1).sum(),
        ));
        for l in &lines {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(l);
        }
        text
    }

    /// The running SAD and SPD (O(1) copies).
    fn running(&self) -> Config {
        self.cfg.lock().expect("cfg lock").clone()
    }

    fn answer(&self, req: &mut Value) -> Value {
        match req.get("op").and_then(Value::as_str) {
            Some("apply") => {
                let name = req
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("espctl")
                    .to_string();
                // The batch holds keys: take it out of the request and wipe it after.
                let text = zeroize::Zeroizing::new(match req["text"].take() {
                    Value::String(t) => t,
                    _ => String::new(),
                });
                match self.apply(&name, &text) {
                    Ok(ch) => espd_proto::ok(json!({ "changes": ch })),
                    Err(e) => espd_proto::error(e),
                }
            }
            Some("policies") => {
                let cfg = self.running();
                espd_proto::ok(
                    json!({ "text": espd_config::db::policy_lines(&cfg.spd).join("\n") }),
                )
            }
            other => espd_proto::error(format!(
                "unknown op {other:?}: expected apply, states, policies or stats"
            )),
        }
    }
}

/// Binds the control socket: its directory created 0700 if missing, the
/// socket 0600; a stale socket file is replaced, a live one refused.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let l = espd_proto::bind_socket(path, "espd (use --control PATH for another instance)")?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Control connections served at once; one more is refused with an error.
pub const MAX_CLIENTS: usize = 64;
/// A request must arrive whole within this time of its first octet (and a
/// one-shot connection's request within this time of connecting).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request line (a batch of many thousand states).
pub const MAX_REQUEST: usize = 16 << 20;

/// Serves connections until `stop`, each on its own thread, so a client
/// that sends nothing, half a line, or never reads its answer holds up no
/// other (changes stay serialised by [`Control::apply`]); removes the
/// socket file at the end.
pub fn serve(l: UnixListener, path: PathBuf, c: Arc<Control>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                if c.clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                    c.clients.fetch_sub(1, Ordering::AcqRel);
                    let _ = reply(
                        &mut &s,
                        &espd_proto::error(format!(
                            "too many control connections at once (the limit is {MAX_CLIENTS})"
                        )),
                    );
                    continue;
                }
                let (c2, st) = (Arc::clone(&c), Arc::clone(&stop));
                let spawned = std::thread::Builder::new()
                    .name("espd-ctl-conn".into())
                    .spawn(move || {
                        let _ = connection(&c2, s, &st);
                        c2.clients.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    c.clients.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let _ = std::fs::remove_file(&path);
    // The connections see `stop` within a read timeout (or give up a write
    // after theirs): wait for them, so nothing holds the control state on.
    let t = Instant::now();
    while c.clients.load(Ordering::Acquire) > 0 && t.elapsed() < REQUEST_TIMEOUT * 2 {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn reply(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    reply_text(w, v.to_string())
}

fn reply_text(w: &mut impl Write, mut out: String) -> std::io::Result<()> {
    out.push('\n');
    w.write_all(out.as_bytes())
}

/// An answer to a request: a JSON value, or one serialized already — the
/// stats, whose per-SA rows are written as they are read (at 100 000 SAs a
/// JSON value of them held over 100 MiB while it lived), and the SA
/// listing, which may hold keys (one line with its newline, wiped on drop).
enum Answer {
    Value(Value),
    Text(String),
    Line(zeroize::Zeroizing<String>),
}

/// Why a request line could not be read.
enum LineErr {
    /// The peer closed (or the server is stopping): nothing to answer.
    Closed,
    /// Answered with this error, then the connection is closed.
    Refused(String),
}

/// Parses a request line. A batch's `text` may hold keys: it is taken from
/// the line as written (a borrowed `RawValue`) and unescaped here into a
/// string of its final size, which `handle` wipes after use. serde_json
/// would unescape it into a scratch buffer that it frees without wiping.
fn parse_request(line: &[u8]) -> serde_json::Result<Value> {
    use serde_json::value::RawValue;
    let Ok(raw) = serde_json::from_slice::<BTreeMap<String, &RawValue>>(line) else {
        // Not an object: whatever it is, the error says so as before.
        return serde_json::from_slice(line);
    };
    let mut m = serde_json::Map::new();
    for (k, v) in raw {
        let text = if k == "text" {
            espd_proto::unescape(v.get())
        } else {
            None
        };
        let v = match text {
            Some(s) => Value::String(s),
            None => serde_json::from_str(v.get())?,
        };
        m.insert(k, v);
    }
    Ok(Value::Object(m))
}

/// Appends `data` to `buf`; when `buf` must grow, its old allocation is
/// wiped before it is freed (a request may hold keys, and `Vec`'s own
/// growth would leave the copy it moved away from behind).
fn extend_wiping(buf: &mut Vec<u8>, data: &[u8]) {
    if buf.capacity() - buf.len() < data.len() {
        let mut bigger = Vec::with_capacity((buf.len() + data.len()).max(2 * buf.capacity()));
        bigger.extend_from_slice(buf);
        zeroize::Zeroize::zeroize(buf);
        *buf = bigger;
    }
    buf.extend_from_slice(data);
}

/// Reads one request line (without the newline) into `line`; `idle_ok`:
/// the connection may wait for its next request without a limit (a kept
/// v2 connection), otherwise the request must come within the timeout.
fn read_line(
    s: &mut UnixStream,
    buf: &mut Vec<u8>,
    line: &mut zeroize::Zeroizing<Vec<u8>>,
    idle_ok: bool,
    stop: &AtomicBool,
    idle: &mut super::heap::Idle,
) -> Result<(), LineErr> {
    let mut started: Option<Instant> = (!idle_ok).then(Instant::now);
    let mut chunk = [0u8; 64 * 1024];
    // What has been searched for the newline already: each octet once, not
    // the whole buffer again after every read (a 16 MiB batch arrives in
    // 256 reads).
    let mut searched = 0;
    loop {
        if let Some(nl) = buf[searched..].iter().position(|b| *b == b'\n') {
            let nl = searched + nl;
            // The request may hold keys: no copy of it is left behind in
            // freed memory — the previous line is wiped before the buffer
            // is reused, the new one is allocated at its size, and what
            // is left of the read buffer moves to a new one.
            zeroize::Zeroize::zeroize(&mut **line);
            **line = Vec::with_capacity(nl);
            line.extend_from_slice(&buf[..nl]);
            let rest = buf.split_off(nl + 1);
            zeroize::Zeroize::zeroize(buf);
            *buf = rest;
            return Ok(());
        }
        searched = buf.len();
        if buf.len() > MAX_REQUEST {
            zeroize::Zeroize::zeroize(buf);
            return Err(LineErr::Refused(format!(
                "request larger than {} MiB (the limit of one request): split the batch",
                MAX_REQUEST >> 20
            )));
        }
        if !buf.is_empty() && started.is_none() {
            started = Some(Instant::now());
        }
        if started.is_some_and(|t| t.elapsed() > REQUEST_TIMEOUT) {
            return Err(LineErr::Refused(format!(
                "{} within {} s: a request is one JSON line ending in a newline",
                if buf.is_empty() {
                    "no request"
                } else {
                    "request incomplete"
                },
                REQUEST_TIMEOUT.as_secs()
            )));
        }
        if stop.load(Ordering::Relaxed) {
            return Err(LineErr::Closed);
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err(LineErr::Closed),
            Ok(n) => {
                extend_wiping(buf, &chunk[..n]);
                zeroize::Zeroize::zeroize(&mut chunk[..n]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // Waiting for the next request: what the last one freed
                // goes back to the system (see `heap`).
                if buf.is_empty() {
                    idle.tick();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(LineErr::Closed),
        }
    }
}

/// One control connection: v1 is one request and one answer; a v2
/// request keeps the connection for further requests, answered in order
/// with their `id`s (pipelined), and `subscribe` adds events to it.
fn connection(c: &Control, mut s: UnixStream, stop: &AtomicBool) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_millis(250)))?;
    // A reader that does not read its answers is dropped, not waited for.
    s.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    // Root only (SO_PEERCRED), whatever the file mode says.
    let uid = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.uid())
        .ok();
    if uid != Some(0) {
        return reply(
            &mut s,
            &espd_proto::error(format!(
                "permission denied: espd's control socket serves root only (peer uid {})",
                uid.map_or("unknown".into(), |u| u.to_string())
            )),
        );
    }
    let writer = Arc::new(Mutex::new(s.try_clone()?));
    let send = |v: &Value| -> std::io::Result<()> {
        let mut w = writer
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        reply(&mut *w, v)
    };
    // Both wiped when the connection goes (a request cut off may hold keys).
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    let mut line = zeroize::Zeroizing::new(Vec::new());
    let mut kept = false;
    let mut idle = super::heap::Idle::default();
    loop {
        match read_line(&mut s, &mut buf, &mut line, kept, stop, &mut idle) {
            Ok(()) => {}
            Err(LineErr::Closed) => return Ok(()),
            Err(LineErr::Refused(e)) => return send(&espd_proto::error(e)),
        }
        let req = match parse_request(&line) {
            Ok(r) => r,
            Err(e) => {
                send(&espd_proto::error(format!("request is not JSON: {e}")))?;
                if kept {
                    continue;
                }
                return Ok(());
            }
        };
        let v2 = espd_proto::version_of(&req) >= 2;
        match req.get("op").and_then(Value::as_str) {
            Some("monitor") | Some("subscribe") => {
                if let Err(e) = espd_proto::check_version(&req) {
                    return send(&e);
                }
                let mut ok = espd_proto::ok(json!({}));
                if let Some(id) = req.get("id") {
                    ok["id"] = id.clone();
                }
                ok["v"] = json!(espd_proto::version_of(&req));
                send(&ok)?;
                // Events follow, one per line; a monitor that stops reading is dropped.
                if let Ok(w) = writer.lock() {
                    let _ = w.set_write_timeout(Some(Duration::from_millis(200)));
                }
                if let Ok(mut m) = c.monitors.lock() {
                    m.push(Arc::clone(&writer));
                }
                if !v2 {
                    return Ok(());
                }
            }
            _ => {
                match c.handle(req) {
                    Answer::Value(v) => send(&v)?,
                    Answer::Text(t) => {
                        let mut w = writer
                            .lock()
                            .map_err(|_| std::io::Error::other("poisoned"))?;
                        reply_text(&mut *w, t)?;
                    }
                    Answer::Line(l) => {
                        let mut w = writer
                            .lock()
                            .map_err(|_| std::io::Error::other("poisoned"))?;
                        w.write_all(l.as_bytes())?;
                    }
                }
                idle.worked();
            }
        }
        if !v2 {
            return Ok(());
        }
        kept = true;
    }
}

/// The workers' SA events: to the monitors, and a hard expiry deletes the
/// SA (RFC 4301 §4.4.2.1) through the same path as `espctl state delete`.
/// Time lifetimes are watched here too, once a second over the running
/// tables (on this thread, never a worker's), so an idle SA expires on time.
pub fn events(
    c: Arc<Control>,
    rx: std::sync::mpsc::Receiver<(u32, espd_core::engine::SaEvent)>,
    retired: std::sync::mpsc::Receiver<super::worker::Retired>,
    stop: Arc<AtomicBool>,
) {
    use espd_core::engine::SaEventKind;
    let mut last_check = Instant::now();
    let mut unknown_seen = None;
    // Soft expiries already reported (by a worker or here), and the last
    // acquire per policy (workers rate-limit each their own).
    let mut soft: BTreeSet<(IpAddr, u32)> = BTreeSet::new();
    let mut acquired: BTreeMap<String, Instant> = BTreeMap::new();
    let mut idle = super::heap::Idle::default();
    while !stop.load(Ordering::Relaxed) {
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
            // ESP with an SPI we do not know never reaches the workers (the XDP
            // program passes it to the kernel): report its count once a second.
            let n = c
                .steer
                .lock()
                .ok()
                .and_then(|s| s.counters().ok())
                .map(|k| k[espd_io::Counter::UnknownSpi as usize]);
            if let (Some(n), Some(before)) = (n, unknown_seen) {
                if n > before {
                    c.broadcast(
                        json!({"event": "unknown-spi", "count": n - before, "seen_by": "xdp"}),
                    );
                }
            }
            unknown_seen = n.or(unknown_seen);
            let now = c.params.now();
            let (mut soft_now, mut hard_now) = (Vec::new(), Vec::new());
            if let Ok(t) = c.tables.lock() {
                for sa in t.sad().iter() {
                    let lt = sa.cfg.lifetime;
                    let age = now.saturating_sub(sa.added);
                    let key = (sa.cfg.dst, sa.cfg.spi);
                    if lt.time_hard != 0 && age >= lt.time_hard {
                        hard_now.push(key);
                    } else if lt.time_soft != 0 && age >= lt.time_soft && !soft.contains(&key) {
                        soft_now.push(key);
                    }
                }
            }
            for (dst, spi) in soft_now {
                soft.insert((dst, spi));
                let spi = format!("0x{spi:08x}");
                eprintln!("espd run: SA dst {dst} spi {spi}: soft-expire (time)");
                c.broadcast(json!({"event": "soft-expire", "dst": dst.to_string(), "spi": spi, "why": "time"}));
            }
            for (dst, spi) in hard_now {
                soft.remove(&(dst, spi));
                let spi = format!("0x{spi:08x}");
                eprintln!("espd run: SA dst {dst} spi {spi}: hard-expire (time)");
                c.broadcast(json!({"event": "hard-expire", "dst": dst.to_string(), "spi": spi, "why": "time"}));
                let _ = c.apply(
                    "hard lifetime",
                    &format!("state delete dst {dst} spi {spi}"),
                );
                idle.worked();
            }
            acquired.retain(|_, t| t.elapsed() < Duration::from_secs(1));
        }
        // What the workers let go of is freed here, off their time, and
        // given back to the system once this thread is idle (see `heap`).
        while let Ok(r) = retired.try_recv() {
            drop(r);
            idle.worked();
        }
        idle.tick();
        let Ok((w, e)) = rx.recv_timeout(Duration::from_millis(20)) else {
            continue;
        };
        let kind = match e.kind {
            SaEventKind::SoftExpire => "soft-expire",
            SaEventKind::HardExpire => "hard-expire",
            SaEventKind::UnknownSpi => "unknown-spi",
            SaEventKind::Acquire => "acquire",
        };
        if let (SaEventKind::Acquire, Some(a)) = (e.kind, e.acquire) {
            // RFC 4301 §5.1 step 3a: an SA is wanted. Once a second per policy.
            let key = format!("{:?}", a.policy);
            if acquired.contains_key(&key) {
                continue;
            }
            acquired.insert(key, Instant::now());
            let ports = |p: Option<espd_core::wire::l4::Ports>| p.map(|p| (p.sport, p.dport));
            c.broadcast(json!({
                "event": "acquire",
                "policy": {"src": a.policy.src.to_string(), "dst": a.policy.dst.to_string(),
                           "proto": a.policy.proto, "dir": "out", "priority": a.priority},
                "tmpl": {"src": a.tmpl.src.map(|x| x.to_string()), "dst": a.tmpl.dst.map(|x| x.to_string()),
                         "reqid": a.tmpl.reqid, "mode": a.tmpl.mode.as_str()},
                "packet": {"src": a.flow.src.to_string(), "dst": a.flow.dst.to_string(),
                           "proto": a.flow.proto, "ports": ports(a.flow.ports)},
                "worker": w,
            }));
            continue;
        }
        let spi = format!("0x{:08x}", e.spi);
        if e.kind == SaEventKind::SoftExpire && !soft.insert((e.dst, e.spi)) {
            continue;
        }
        if e.kind != SaEventKind::UnknownSpi {
            eprintln!("espd run: SA dst {} spi {spi}: {kind} ({})", e.dst, e.why);
        }
        c.broadcast(
            json!({"event": kind, "dst": e.dst.to_string(), "spi": spi, "why": e.why, "worker": w}),
        );
        if e.kind == SaEventKind::HardExpire {
            soft.remove(&(e.dst, e.spi));
            // Several workers may report one SA: the first delete wins.
            let _ = c.apply(
                "hard lifetime",
                &format!("state delete dst {} spi {spi}", e.dst),
            );
            idle.worked();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines split across reads, several in one read, one larger than a
    /// read: each comes out whole and in order, and the buffers grow
    /// through `extend_wiping` without losing an octet.
    #[test]
    fn request_lines_come_out_whole_whatever_the_reads() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let big: String = (0..300_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let want = [
            "{\"op\":\"x\"}".to_string(),
            big.clone(),
            String::new(),
            "tail".into(),
        ];
        let writer = std::thread::spawn(move || {
            let text = format!("{}\n{}\n\n{}\n", want[0], want[1], want[3]);
            for piece in text.as_bytes().chunks(70_001) {
                a.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            want
        });
        let stop = AtomicBool::new(false);
        let (mut buf, mut line) = (Vec::new(), zeroize::Zeroizing::new(Vec::new()));
        let mut got = Vec::new();
        for _ in 0..4 {
            assert!(read_line(
                &mut b,
                &mut buf,
                &mut line,
                true,
                &stop,
                &mut crate::gateway::heap::Idle::default()
            )
            .is_ok());
            got.push(String::from_utf8(line.to_vec()).unwrap());
        }
        assert_eq!(got, writer.join().unwrap());
        assert!(buf.is_empty());
    }

    /// `parse_request` reads what serde_json reads, `text` included, for
    /// strings escaped as serde_json writes them and as Python's json
    /// (ASCII only: every other character as \\u, with surrogate pairs).
    #[test]
    fn requests_parse_as_serde_json_parses_them() {
        let alphabet: Vec<char> = "a0 \"\\/\n\t\r\u{1}\u{8}\u{c}\u{7f}é€😀\u{ffff}"
            .chars()
            .collect();
        let ascii = |s: &str| {
            let mut o = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => o.push_str("\\\""),
                    '\\' => o.push_str("\\\\"),
                    c if (' '..='~').contains(&c) => o.push(c),
                    c => {
                        let mut b = [0u16; 2];
                        for u in c.encode_utf16(&mut b) {
                            o.push_str(&format!("\\u{u:04X}"));
                        }
                    }
                }
            }
            o.push('"');
            o
        };
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for case in 0..20_000 {
            let mut text = String::new();
            for _ in 0..(case % 40) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                text.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            for lit in [serde_json::to_string(&text).unwrap(), ascii(&text)] {
                let line = format!("{{\"v\":2,\"id\":{case},\"op\":\"apply\",\"text\":{lit}}}");
                let want: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(parse_request(line.as_bytes()).unwrap(), want, "{line}");
                assert_eq!(
                    espd_proto::unescape(&lit).as_deref(),
                    Some(text.as_str()),
                    "{lit}"
                );
            }
        }
        // Lone surrogates and other text: as serde_json has it (an error).
        for bad in [
            r#"{"text":"\ud800"}"#,
            r#"{"text":"\udc00x"}"#,
            r#"{"text":"\q"}"#,
        ] {
            assert!(parse_request(bad.as_bytes()).is_err(), "{bad}");
            assert!(serde_json::from_str::<Value>(bad).is_err());
        }
        // Not an object, not JSON, a text that is not a string.
        assert_eq!(parse_request(b"[1]").unwrap(), serde_json::json!([1]));
        assert!(parse_request(b"{\"op\":").is_err());
        assert_eq!(
            parse_request(br#"{"text":5,"op":"x"}"#).unwrap(),
            serde_json::json!({"text": 5, "op": "x"})
        );
    }

    #[test]
    fn extend_wiping_appends_and_grows() {
        let mut v = Vec::with_capacity(2);
        for i in 0..1000u32 {
            extend_wiping(&mut v, &i.to_le_bytes());
        }
        let back: Vec<u32> = v
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(back, (0..1000).collect::<Vec<_>>());
    }
}
