//! Runtime changes: the control socket and how a change reaches the
//! running workers (docs/control.md).
//!
//! A change is applied to a copy of the running configuration ([`Db`]),
//! all or nothing. From the result one new engine per worker is built (SAs
//! shared between workers linked), the XDP maps get what is new, each worker
//! is handed its new engine through a mailbox and swaps it in between two
//! bursts — taking over the replay windows, sequence numbers and counters of
//! every SA that did not change ([`Engine::adopt_state`]) — and only when
//! every worker has swapped are the XDP entries nothing uses any more
//! removed and the answer sent. The old engines are dropped by the workers,
//! and their keys zeroized with them.

use super::worker::Snapshot;
use super::{inside_selectors, outside_selectors, Stats};
use espd_config::db::Db;
use espd_config::Config;
use espd_core::engine::Engine;
use espd_core::state::SaShare;
use espd_io::steer::{SelAction, Side, Steering, SPI_IN, SPI_OUT};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How engines are built for this gateway.
pub struct EngineParams {
    pub local: Vec<IpAddr>,
    pub inside_addrs: Vec<IpAddr>,
    pub mtu: usize,
    pub bench_no_crypto: bool,
    pub workers: u32,
}

impl EngineParams {
    /// One engine per worker from the configuration; SAs linked between
    /// workers when there are several.
    pub fn build(&self, cfg: &Config) -> anyhow::Result<Vec<Engine>> {
        let mut engines = Vec::new();
        // Parsed once; each worker's SAs expanded anew from it, in parallel
        // (10 000 tunnels, two workers: 69 ms, where parsing twice took 190;
        // docs/performance.md).
        let replicas = cfg
            .replicas(self.workers as usize)
            .map_err(|e| anyhow::anyhow!("building the workers' engines: {e}"))?;
        for (q, c) in (0u32..).zip(replicas) {
            let mut e = Engine::new(c.sad, c.spd, &self.local);
            if self.bench_no_crypto {
                for id in 0..e.sad.len() {
                    e.sad.get_mut(id).transform = espd_core::crypto::Transform::BenchNoCrypto;
                }
            }
            e.set_router(true);
            e.set_worker(q);
            e.set_icmp_sources(&self.inside_addrs);
            e.set_mtu(Some(self.mtu));
            engines.push(e);
        }
        if self.workers > 1 {
            // One owner per SA, and one sequence counter (see docs/architecture.md).
            // The replicas carry the parsed configuration's IV mask: one
            // mask per SA, so two workers' IVs cannot meet.
            for id in 0..engines[0].sad.len() {
                let share = SaShare::new(engines[0].sad.get(id).oseq);
                for e in &mut engines {
                    e.sad.get_mut(id).share = Some(share.clone());
                }
            }
        }
        Ok(engines)
    }
}

/// What the XDP maps must hold for a configuration.
#[derive(Default, PartialEq)]
pub struct Mirror {
    /// SPI → [`SPI_IN`] | [`SPI_OUT`].
    pub spis: BTreeMap<u32, u8>,
    pub ports: BTreeSet<u16>,
    /// Inside program: destination prefixes of outbound PROTECT/DISCARD policies.
    pub sels: Vec<(IpAddr, u8, SelAction)>,
    /// Outside program: destination prefixes of in/fwd PROTECT/DISCARD policies.
    pub in_sels: Vec<(IpAddr, u8, SelAction)>,
    /// Addresses whose ESP is ours ([`espd_core::engine::esp_addrs`]): the
    /// host's own and the inbound SAs' destinations.
    pub local: BTreeSet<IpAddr>,
}

impl Mirror {
    /// The maps for `cfg` on a host with addresses `host`. An SPI is
    /// inbound when its SA's destination is one of ours, as the engine
    /// decides it, so XDP and the engine agree on whose ESP is ours.
    pub fn of(cfg: &Config, host: &[IpAddr]) -> Mirror {
        let local = espd_core::engine::local_addrs(&cfg.spd, host);
        let esp = espd_core::engine::esp_addrs(&cfg.sad, &local);
        let mut spis = BTreeMap::new();
        for sa in cfg.sad.iter() {
            let bit = if esp.binary_search(&sa.cfg.dst).is_ok() {
                SPI_IN
            } else {
                SPI_OUT
            };
            *spis.entry(sa.cfg.spi).or_insert(0) |= bit;
        }
        Mirror {
            spis,
            ports: cfg
                .sad
                .iter()
                .filter_map(|sa| sa.cfg.encap)
                .flat_map(|e| [e.sport, e.dport])
                .collect(),
            sels: inside_selectors(cfg),
            in_sels: outside_selectors(cfg),
            local: esp.into_iter().collect(),
        }
    }

    /// Make-before-break, first half: everything `new` needs (changed
    /// actions overwrite in place).
    pub fn add(steer: &mut Steering, new: &Mirror) -> anyhow::Result<()> {
        steer.add_local(new.local.iter().copied())?;
        steer.add_spis(new.spis.iter().map(|(s, b)| (*s, *b)))?;
        steer.add_encap_ports(new.ports.iter().copied())?;
        steer.add_selectors(Side::Inside, new.sels.iter().copied())?;
        steer.add_selectors(Side::Outside, new.in_sels.iter().copied())?;
        Ok(())
    }

    /// Second half, once the workers run on `new`: what only `old` had.
    pub fn remove_stale(steer: &mut Steering, old: &Mirror, new: &Mirror) -> anyhow::Result<()> {
        steer.remove_spis(
            old.spis
                .keys()
                .filter(|s| !new.spis.contains_key(s))
                .copied(),
        )?;
        steer.remove_encap_ports(old.ports.difference(&new.ports).copied())?;
        for (side, o, n) in [
            (Side::Inside, &old.sels, &new.sels),
            (Side::Outside, &old.in_sels, &new.in_sels),
        ] {
            let keep: BTreeSet<(IpAddr, u8)> = n.iter().map(|s| (s.0, s.1)).collect();
            steer.remove_selectors(
                side,
                o.iter().map(|s| (s.0, s.1)).filter(|k| !keep.contains(k)),
            )?;
        }
        steer.remove_local(old.local.difference(&new.local).copied())?;
        Ok(())
    }
}

/// A worker's inbox for a new engine.
#[derive(Default)]
pub struct Mailbox {
    pub next: Mutex<Option<Engine>>,
    /// Bumped when `next` is filled; the worker stores it in `seen` once swapped.
    pub gen: AtomicU64,
    pub seen: AtomicU64,
}

/// Everything the control socket acts on.
pub struct Control {
    pub db: Mutex<Db>,
    pub cfg: Mutex<Config>,
    pub mirror: Mutex<Mirror>,
    pub steer: Arc<Mutex<Steering>>,
    pub mailboxes: Vec<Arc<Mailbox>>,
    pub snaps: Vec<Arc<Mutex<Snapshot>>>,
    pub cores: Vec<(usize, usize)>,
    pub params: EngineParams,
    /// The kernel's fail-closed copy of the SPD (see [`super::guard`]).
    pub guard: Mutex<super::guard::Guard>,
    /// Outbound sequence numbers kept across restarts (see [`super::seqstore`]).
    pub seqs: Mutex<super::seqstore::SeqStore>,
    /// One change at a time.
    pub apply_lock: Mutex<()>,
    /// `espctl monitor` connections.
    pub monitors: Mutex<Vec<UnixStream>>,
}

impl Control {
    /// Applies a batch to the running gateway; the changes made, or why not.
    pub fn apply(&self, name: &str, text: &str) -> Result<Value, String> {
        let _one = self
            .apply_lock
            .lock()
            .map_err(|_| "control state poisoned")?;
        let mut db = self
            .db
            .lock()
            .map_err(|_| "control state poisoned")?
            .clone();
        let ch = db.apply(name, text).map_err(|e| e.to_string())?;
        let mut new_cfg = db.config().map_err(|e| e.to_string())?;
        // New outbound SAs continue a recorded key's numbers, and every one
        // is written down before a worker can send through it.
        {
            let running = self.cfg.lock().map_err(|_| "poisoned")?;
            let ids = super::seqstore::outbound(&new_cfg, &self.params.local);
            let mut seqs = self.seqs.lock().map_err(|_| "poisoned")?;
            seqs.reconcile(&mut new_cfg, &ids, &running);
            seqs.save(false).map_err(|e| format!("{e:#}"))?;
        }
        let engines = self.params.build(&new_cfg).map_err(|e| e.to_string())?;
        let new_mirror = Mirror::of(&new_cfg, &self.params.local);
        // The guard first: what the change protects or blocks is dropped by
        // the kernel before espd's workers handle it (make-before-break).
        let want = super::guard::desired(&new_cfg);
        self.guard
            .lock()
            .map_err(|_| "guard poisoned")?
            .tighten(&want)
            .map_err(|e| format!("kernel XFRM guard: {e}"))?;
        {
            let mut st = self.steer.lock().map_err(|_| "steering poisoned")?;
            Mirror::add(&mut st, &new_mirror).map_err(|e| format!("XDP maps: {e}"))?;
        }
        // Hand each worker its engine and wait until all have swapped.
        let mut gens = Vec::new();
        for (mb, e) in self.mailboxes.iter().zip(engines) {
            *mb.next.lock().map_err(|_| "mailbox poisoned")? = Some(e);
            gens.push(mb.gen.fetch_add(1, Ordering::AcqRel) + 1);
        }
        let start = Instant::now();
        while self
            .mailboxes
            .iter()
            .zip(&gens)
            .any(|(mb, g)| mb.seen.load(Ordering::Acquire) < *g)
        {
            if start.elapsed() > Duration::from_secs(10) {
                return Err("a worker did not take the new configuration within 10 s".into());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        {
            let mut st = self.steer.lock().map_err(|_| "steering poisoned")?;
            let old = self.mirror.lock().map_err(|_| "poisoned")?;
            Mirror::remove_stale(&mut st, &old, &new_mirror)
                .map_err(|e| format!("XDP maps: {e}"))?;
        }
        // Loosened only now that every worker runs on the new policies. A
        // failure leaves stricter entries behind (fail closed): logged.
        if let Err(e) = self
            .guard
            .lock()
            .map_err(|_| std::io::Error::other("guard poisoned"))
            .and_then(|mut g| g.loosen(&want))
        {
            eprintln!("espd run: guard: removing entries the change no longer needs: {e}");
        }
        *self.mirror.lock().map_err(|_| "poisoned")? = new_mirror;
        *self.cfg.lock().map_err(|_| "poisoned")? = new_cfg;
        let (before, after): (BTreeSet<_>, BTreeSet<_>) = {
            let mut cur = self.db.lock().map_err(|_| "poisoned")?;
            let before = cur.state_keys().into_iter().collect();
            let after = db.state_keys().into_iter().collect();
            *cur = db;
            (before, after)
        };
        for (dst, spi) in after.difference(&before) {
            self.broadcast(json!({"event": "sa-added", "dst": dst.to_string(), "spi": format!("0x{spi:08x}"), "by": name}));
        }
        for (dst, spi) in before.difference(&after) {
            self.broadcast(json!({"event": "sa-removed", "dst": dst.to_string(), "spi": format!("0x{spi:08x}"), "by": name}));
        }
        Ok(json!({
            "states_added": ch.states_added, "states_updated": ch.states_updated,
            "states_deleted": ch.states_deleted, "policies_added": ch.policies_added,
            "policies_updated": ch.policies_updated, "policies_deleted": ch.policies_deleted,
        }))
    }

    /// One event line to every `espctl monitor`; gone ones are forgotten.
    pub fn broadcast(&self, ev: Value) {
        let mut line = ev.to_string();
        line.push('\n');
        if let Ok(mut m) = self.monitors.lock() {
            m.retain_mut(|s| s.write_all(line.as_bytes()).is_ok());
        }
    }

    /// The counters of every worker, SA and XDP action, now.
    pub fn counters(&self) -> Stats {
        let st = self.steer.lock().expect("steering lock");
        let cfg = self.cfg.lock().expect("config lock");
        Stats::gather_final(&self.snaps, &st, &cfg, &self.cores)
    }

    /// The workers' latest outbound sequence numbers to the store; `clean`
    /// once they have all stopped.
    pub fn save_sequences(&self, clean: bool) -> anyhow::Result<()> {
        let cfg = self.cfg.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let snaps: Vec<Snapshot> = self
            .snaps
            .iter()
            .map(|s| s.lock().map(|s| s.clone()).unwrap_or_default())
            .collect();
        let mut seqs = self.seqs.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        seqs.update(|dst, spi| {
            let id = cfg.sad.lookup_in(dst, spi)?;
            snaps.iter().filter_map(|s| s.oseq.get(id).copied()).max()
        });
        seqs.save(clean)
    }

    pub fn stats(&self) -> Value {
        self.counters().json
    }

    fn handle(&self, mut req: Value) -> Value {
        if let Err(e) = espd_proto::check_version(&req) {
            return e;
        }
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
            Some("states") => {
                let keys = req.get("keys").and_then(Value::as_bool).unwrap_or(false);
                let db = self.db.lock().expect("db lock");
                let lines: Vec<String> =
                    db.state_lines(keys).iter().map(|l| l.to_string()).collect();
                espd_proto::ok(json!({ "text": lines.join("\n") }))
            }
            Some("policies") => {
                let db = self.db.lock().expect("db lock");
                espd_proto::ok(json!({ "text": db.policy_lines().join("\n") }))
            }
            Some("stats") => espd_proto::ok(json!({ "stats": self.stats() })),
            other => espd_proto::error(format!(
                "unknown op {other:?}: expected apply, states, policies or stats"
            )),
        }
    }
}

/// Binds the control socket: its directory created 0700 if missing, the
/// socket 0600; a stale socket file is replaced, a live one refused.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{} is in use by a running espd (use --control PATH for another instance)",
                path.display()
            );
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves requests until `stop`; removes the socket file at the end.
pub fn serve(l: UnixListener, path: PathBuf, c: Arc<Control>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                let _ = one(&c, s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// The workers' SA events: to the monitors, and a hard expiry deletes the
/// SA (RFC 4301 §4.4.2.1) through the same path as `espctl state delete`.
pub fn events(
    c: Arc<Control>,
    rx: std::sync::mpsc::Receiver<(u32, espd_core::engine::SaEvent)>,
    stop: Arc<AtomicBool>,
) {
    use espd_core::engine::SaEventKind;
    let mut last_check = Instant::now();
    let mut unknown_seen = None;
    while !stop.load(Ordering::Relaxed) {
        // ESP with an SPI we do not know never reaches the workers (the XDP
        // program passes it to the kernel): report its count once a second.
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
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
        }
        let Ok((w, e)) = rx.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        let kind = match e.kind {
            SaEventKind::SoftExpire => "soft-expire",
            SaEventKind::HardExpire => "hard-expire",
            SaEventKind::UnknownSpi => "unknown-spi",
        };
        let spi = format!("0x{:08x}", e.spi);
        if e.kind != SaEventKind::UnknownSpi {
            eprintln!("espd run: SA dst {} spi {spi}: {kind} ({})", e.dst, e.why);
        }
        c.broadcast(
            json!({"event": kind, "dst": e.dst.to_string(), "spi": spi, "why": e.why, "worker": w}),
        );
        if e.kind == SaEventKind::HardExpire {
            // Several workers may report one SA: the first delete wins.
            let _ = c.apply(
                "hard lifetime",
                &format!("state delete dst {} spi {spi}", e.dst),
            );
        }
    }
}

fn one(c: &Control, mut s: UnixStream) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // Root only (SO_PEERCRED), whatever the file mode says.
    let uid = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.uid())
        .ok();
    let answer = if uid != Some(0) {
        espd_proto::error(format!(
            "permission denied: espd's control socket serves root only (peer uid {})",
            uid.map_or("unknown".into(), |u| u.to_string())
        ))
    } else {
        let mut line = String::new();
        BufReader::new(&s).take_line(&mut line)?;
        let line = zeroize::Zeroizing::new(line);
        match serde_json::from_str::<Value>(&line) {
            Ok(req) if req.get("op").and_then(Value::as_str) == Some("monitor") => {
                if let Err(e) = espd_proto::check_version(&req) {
                    e
                } else {
                    // The connection stays open: events follow, one per line.
                    s.write_all(format!("{}\n", espd_proto::ok(json!({}))).as_bytes())?;
                    s.set_write_timeout(Some(Duration::from_millis(200)))?;
                    if let Ok(mut m) = c.monitors.lock() {
                        m.push(s);
                    }
                    return Ok(());
                }
            }
            Ok(req) => c.handle(req),
            Err(e) => espd_proto::error(format!("request is not JSON: {e}")),
        }
    };
    let mut out = answer.to_string();
    out.push('\n');
    s.write_all(out.as_bytes())
}

trait TakeLine {
    fn take_line(self, out: &mut String) -> std::io::Result<usize>;
}

impl<R: BufRead> TakeLine for R {
    /// One line of at most 16 MiB (a batch of many thousand states).
    fn take_line(self, out: &mut String) -> std::io::Result<usize> {
        self.take(16 << 20).read_line(out)
    }
}
