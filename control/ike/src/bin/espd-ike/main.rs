//! `espd-ike`: the IKEv2 daemon beside `espd run` (docs/ike.md).
//!
//! Threads: one reader per UDP socket, one for espd's event connection,
//! one per control client; all of them feed one channel. The main loop
//! owns the protocol core ([`espd_ike::ike::Endpoint`]), the installer
//! ([`espd_ike::espd::Installer`]) and espd's kept connection, so every
//! change to espd happens in the order the core asks for it.

mod ctl;
mod link;
mod udp;

use anyhow::Context;
use clap::Parser;
use espd_ike::conf::{self, Config, StartAction};
use espd_ike::espd::Installer;
use espd_ike::ike::{ChildSa, Dir, Endpoint, Output, SaInfo};
use espd_ike::wire::Ts;
use link::{FromEspd, Link, Refusal};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(
    name = "espd-ike",
    version,
    about = "IKEv2 (RFC 7296) for espd: negotiates CHILD_SAs and installs them in espd"
)]
struct Args {
    /// The swanctl.conf-style configuration (docs/ike.md).
    #[arg(long, default_value = "/etc/swanctl/swanctl.conf")]
    config: PathBuf,
    /// espd's control socket.
    #[arg(long, default_value = espd_proto::DEFAULT_SOCKET)]
    espd: PathBuf,
    /// espd-ike's own control socket (`espctl ike …`).
    #[arg(long, default_value = espd_proto::IKE_SOCKET)]
    socket: PathBuf,
    /// Check the configuration, print every error as FILE:LINE, and exit.
    #[arg(long)]
    check: bool,
    /// The largest IP datagram of an IKE message: larger protected ones go
    /// in RFC 7383 fragments to a peer that takes them (strongSwan's
    /// fragment_size).
    #[arg(long, default_value_t = 1280, value_parser = clap::value_parser!(u16).range(576..))]
    fragment_size: u16,
    /// Seconds before the first retransmission of a request, doubling for
    /// each next one (strongSwan's retransmit_timeout, with base 2).
    #[arg(long, default_value_t = 1.0, value_parser = retransmit_secs)]
    retransmit_timeout: f64,
    /// Retransmissions before the peer is given up (its IKE_SA removed and
    /// each child's dpd_action applied).
    #[arg(long, default_value_t = espd_ike::ike::RETRANSMIT_TRIES, value_parser = clap::value_parser!(u32).range(1..=10))]
    retransmit_tries: u32,
    /// A road-warrior client on an `espd run --host` host: put the virtual
    /// addresses the gateways assign (`vips`) on this device (espd's host
    /// pair, `espd0`) before their CHILD_SAs are installed, and take them
    /// off when their IKE_SA goes (strongSwan's install_virtual_ip_on).
    #[arg(long, value_name = "DEV")]
    vip_dev: Option<String>,
    /// Write the DNS servers the gateways name (RFC 7296 §3.15.1) to this
    /// file, resolv.conf style (`nameserver ADDR` lines), while their
    /// IKE_SAs are up; they are logged and listed by `espctl ike sas` too.
    #[arg(long, value_name = "PATH")]
    dns_file: Option<PathBuf>,
}

fn retransmit_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=60.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}`: expected seconds from 0.1 to 60")),
    }
}

/// What the threads pass to the main loop.
pub enum Ev {
    Udp(udp::Rx),
    Espd(FromEspd),
    Ctl(Value, Sender<Value>),
}

fn log(msg: &str) {
    eprintln!("espd-ike: {msg}");
}

/// The counter of an installed half.
fn installed(dir: Dir) -> &'static str {
    if dir == Dir::In {
        "installed-in"
    } else {
        "installed-out"
    }
}

fn load(path: &std::path::Path) -> Result<Config, String> {
    match conf::load(path) {
        Ok(c) => {
            for w in &c.warnings {
                log(&format!("warning: {w}"));
            }
            Ok(c)
        }
        Err(errs) => Err(errs.join("\n")),
    }
}

struct Daemon {
    ep: Endpoint,
    inst: Installer,
    link: Link,
    socks: Vec<Arc<udp::Sock>>,
    cfg_path: PathBuf,
    counters: BTreeMap<&'static str, u64>,
    next_connect: Instant,
    /// This process has been connected to espd before (leftovers of an
    /// earlier espd-ike are looked for on the first connection only).
    connected_once: bool,
    /// Until then, policies a killed espd-ike left wait for our children.
    adopted_until: Option<Instant>,
    /// `--vip-dev`: the device and the virtual addresses put on it.
    vip_dev: Option<String>,
    vips_on: std::collections::BTreeSet<IpAddr>,
    /// `--dns-file`, and the servers last written there.
    dns_file: Option<PathBuf>,
    dns_written: Vec<IpAddr>,
}

/// How long policies a killed espd-ike left in espd wait for a child of
/// ours to take them over before they are deleted: traffic they protect
/// stays blocked meanwhile (fail closed), and start/trap children and
/// peers that reconnect come back well within it.
const ADOPT_GRACE: Duration = Duration::from_secs(60);

/// Events taken in one turn before the outputs are carried out (a burst of
/// IKE_AUTHs then costs two espd batches; bounded so timers and control
/// requests wait little).
const BURST_EVENTS: usize = 256;

impl Daemon {
    fn count(&mut self, k: &'static str) {
        *self.counters.entry(k).or_default() += 1;
    }

    /// Applies a batch; a lost espd is retried on reconnection (the
    /// installer remembers what we put).
    fn apply(&mut self, text: &str) -> Result<(), Refusal> {
        if text.is_empty() {
            return Ok(());
        }
        if !self.link.is_up() {
            // A fresh connection re-applies everything the installer holds,
            // and every batch is recorded there before it is applied: this
            // one included (applying it again would be refused as existing).
            self.try_connect();
            return if self.link.is_up() {
                Ok(())
            } else {
                Err(Refusal::Unreachable("espd is not reachable".into()))
            };
        }
        self.link.apply("espd-ike", text)
    }

    /// Removes from espd: all the lines as one batch, or, if espd refuses
    /// it (one of them names what is gone already), line by line, where
    /// "no state" and "no policy" are not errors.
    fn delete(&mut self, lines: Vec<String>) {
        if lines.len() > 1 && self.apply(&lines.join("\n")).is_ok() {
            return;
        }
        for l in lines {
            match self.apply(&l) {
                Ok(()) => {}
                Err(Refusal::Refused(e)) if e.contains("no state") || e.contains("no policy") => {}
                Err(Refusal::Refused(e) | Refusal::Unreachable(e)) => {
                    log(&format!("removing from espd: {l}: {e}"))
                }
            }
        }
    }

    /// An espd-ike that was killed removed nothing: its SAs (which no IKE
    /// SA of ours can rekey or delete) are removed now, and its policies —
    /// those whose template names one of our reqids — are kept so that what
    /// they protect stays blocked, then replaced in place by our children
    /// (`policy update`), or deleted after [`ADOPT_GRACE`] if none takes
    /// them. The keys of policies espd holds.
    fn adopt_leftovers(&mut self) -> std::collections::HashSet<String> {
        let cfg = self.ep.config().clone();
        let ours = |line: &str| -> bool {
            let w: Vec<&str> = line.split_whitespace().collect();
            let Some(r) = w
                .iter()
                .position(|x| *x == "reqid")
                .and_then(|i| w.get(i + 1))
                .and_then(|r| r.parse::<u32>().ok())
            else {
                return false;
            };
            r >= conf::DYNAMIC_REQIDS
                || cfg
                    .connections
                    .iter()
                    .flat_map(|c| &c.children)
                    .any(|ch| ch.reqid == r)
        };
        let (states, policies) = match (self.link.listing("states"), self.link.listing("policies"))
        {
            (Ok(s), Ok(p)) => (s, p),
            (Err(Refusal::Refused(e) | Refusal::Unreachable(e)), _)
            | (_, Err(Refusal::Refused(e) | Refusal::Unreachable(e))) => {
                log(&format!("listing espd's SAs and policies: {e}"));
                return Default::default();
            }
        };
        let mut dels = Vec::new();
        for l in states
            .lines()
            .filter(|l| l.starts_with("state add") && ours(l))
        {
            let w: Vec<&str> = l.split_whitespace().collect();
            if let Some(i) = w.iter().position(|x| *x == "spi") {
                if i + 1 < w.len() {
                    dels.push(format!("state delete {}", w[2..=i + 1].join(" ")));
                }
            }
        }
        let pols: Vec<&str> = policies
            .lines()
            .filter(|l| l.starts_with("policy add") && ours(l))
            .collect();
        if dels.is_empty() && pols.is_empty() {
            return Default::default();
        }
        log(&format!(
            "espd holds {} SA(s) and {} policy(ies) of an earlier espd-ike that did not remove them: the SAs are removed, the policies kept (blocking) until our children replace them, at most {} s",
            dels.len(),
            pols.len(),
            ADOPT_GRACE.as_secs()
        ));
        self.count("leftover-sas-removed");
        self.delete(dels);
        self.adopted_until = Some(Instant::now() + ADOPT_GRACE);
        self.inst.adopt(&pols)
    }

    /// The grace for adopted policies is over: those no child took go.
    fn end_adoption(&mut self, now: Instant) {
        if self.adopted_until.is_some_and(|t| now >= t) {
            self.adopted_until = None;
            let lines = self.inst.drop_adopted();
            if !lines.is_empty() {
                log(&format!(
                    "{} policy(ies) of the earlier espd-ike were not taken over by a child: deleted",
                    lines.len()
                ));
                self.delete(lines);
            }
        }
    }

    fn try_connect(&mut self) {
        match self.link.connect() {
            Ok(true) => {
                log(&format!(
                    "connected to espd at {}",
                    self.link.path.display()
                ));
                let mut in_espd = std::collections::HashSet::new();
                if !self.connected_once {
                    self.connected_once = true;
                    in_espd = self.adopt_leftovers();
                }
                let batches = self.inst.reinstall(&in_espd);
                if !batches.is_empty() {
                    log(&format!(
                        "installing {} batch(es) of CHILD_SAs and policies again",
                        batches.len()
                    ));
                }
                for b in batches {
                    if let Err(Refusal::Refused(e) | Refusal::Unreachable(e)) =
                        self.link.apply("espd-ike", &b)
                    {
                        log(&format!("re-installing in espd: {e}"));
                    }
                }
            }
            Ok(false) => {}
            Err(e) => {
                if self.next_connect <= Instant::now() {
                    log(&e);
                }
            }
        }
        self.next_connect = Instant::now() + Duration::from_secs(1);
    }

    fn sock(&self, local: SocketAddr) -> Option<Arc<udp::Sock>> {
        self.socks
            .iter()
            .find(|s| s.port == local.port() && s.v6 == local.is_ipv6())
            .cloned()
    }

    /// `--vip-dev` / `--dns-file`: the virtual addresses and DNS servers of
    /// the IKE_SAs there are, put on the device and written down; called
    /// before the outputs of an event are carried out, so an address is on
    /// the host before the policies whose source it is (espd routes the
    /// protected prefixes with it as source), and after, so it goes with
    /// its IKE_SA.
    fn sync_vips(&mut self, now: Instant) {
        if self.vip_dev.is_none() && self.dns_file.is_none() {
            return;
        }
        let sas = self.ep.list(now);
        if let Some(dev) = self.vip_dev.clone() {
            let want: std::collections::BTreeSet<IpAddr> = sas
                .iter()
                .flat_map(|s| s.local_vips.iter().copied())
                .collect();
            for a in want.difference(&self.vips_on.clone()) {
                let len = if a.is_ipv4() { 32 } else { 128 };
                match ip(&[
                    "addr",
                    "replace",
                    &format!("{a}/{len}"),
                    "dev",
                    &dev,
                    "nodad",
                ]) {
                    Ok(()) => {
                        log(&format!("virtual IP {a} put on {dev}"));
                        self.vips_on.insert(*a);
                    }
                    Err(e) => log(&format!("virtual IP {a} on {dev}: {e}")),
                }
            }
            for a in self.vips_on.clone().difference(&want) {
                let len = if a.is_ipv4() { 32 } else { 128 };
                let _ = ip(&["addr", "del", &format!("{a}/{len}"), "dev", &dev]);
                log(&format!("virtual IP {a} taken off {dev}"));
                self.vips_on.remove(a);
            }
        }
        if let Some(path) = self.dns_file.clone() {
            let mut dns: Vec<IpAddr> = Vec::new();
            for d in sas.iter().flat_map(|s| s.local_dns.iter()) {
                if !dns.contains(d) {
                    dns.push(*d);
                }
            }
            if dns != self.dns_written {
                let text: String = std::iter::once(
                    "# written by espd-ike (DNS servers of the gateways)\n".to_string(),
                )
                .chain(dns.iter().map(|d| format!("nameserver {d}\n")))
                .collect();
                match std::fs::write(&path, text) {
                    Ok(()) => self.dns_written = dns,
                    Err(e) => log(&format!("writing {}: {e}", path.display())),
                }
            }
        }
    }

    /// At exit: every virtual address off the device, the DNS file emptied.
    fn release_vips(&mut self) {
        if let Some(dev) = self.vip_dev.clone() {
            for a in std::mem::take(&mut self.vips_on) {
                let len = if a.is_ipv4() { 32 } else { 128 };
                let _ = ip(&["addr", "del", &format!("{a}/{len}"), "dev", &dev]);
                log(&format!("virtual IP {a} taken off {dev}"));
            }
        }
        if let Some(path) = &self.dns_file {
            if !self.dns_written.is_empty() {
                let _ = std::fs::write(path, "# written by espd-ike (no IKE_SA up)\n");
            }
        }
    }

    /// One event for the core (its outputs wait for [`Daemon::drain`]).
    fn event(&mut self, ev: Ev, now: Instant) {
        match ev {
            Ev::Udp(udp::Rx::Ike {
                local,
                remote,
                data,
            }) => self.ep.handle(now, local, remote, &data),
            Ev::Udp(udp::Rx::Dropped(why)) => self.count(why),
            Ev::Espd(FromEspd::Event(v)) => self.espd_event(v, now),
            Ev::Espd(FromEspd::Down(g)) => {
                if g == self.link.generation && self.link.is_up() {
                    log("lost the connection to espd; reconnecting");
                    self.link.lost();
                }
            }
            Ev::Ctl(req, reply) => {
                // The outputs of the events before it are carried out
                // first: a listing never shows a CHILD_SA whose halves,
                // virtual addresses or DNS servers are still to be put in
                // place (the burst in `run` would otherwise hold them).
                self.drain(now);
                let a = self.control(&req, now);
                let _ = reply.send(a);
            }
        }
    }

    /// Carries out what the protocol core asks, in its order.
    fn drain(&mut self, now: Instant) {
        self.sync_vips(now);
        self.drain_outputs(now);
        self.sync_vips(now);
    }

    /// Carries out the core's outputs, in its order but for one freedom:
    /// within a run of sends and installs (up to a removal), every
    /// inbound half is applied first, in one espd batch, and every
    /// outbound half last, in another. Each CHILD_SA keeps its order —
    /// inbound installed before its answer leaves, outbound after it
    /// (make-before-break) — and a burst of set-ups costs two round trips
    /// to espd, not two each. A removal is a barrier: what came before it
    /// is done first.
    fn drain_outputs(&mut self, now: Instant) {
        let mut next = self.ep.poll_output();
        loop {
            let mut run = Vec::new();
            while let Some(o) = next.take() {
                match o {
                    Output::Send { .. } | Output::Install { .. } | Output::Log(_) => run.push(o),
                    other => {
                        next = Some(other);
                        break;
                    }
                }
                next = self.ep.poll_output();
            }
            if run.is_empty() && next.is_none() {
                return;
            }
            self.run_outputs(run, now);
            // A run of removals (a barrier to what came before and after
            // it): their espd lines as one batch.
            let mut gone = Vec::new();
            while let Some(o) = next.take() {
                match o {
                    Output::Remove { child, why } => gone.extend(self.removal(&child, &why)),
                    other => {
                        next = Some(other);
                        break;
                    }
                }
                next = self.ep.poll_output();
            }
            self.delete(gone);
        }
    }

    /// A run of sends, installs and log lines (see [`Daemon::drain_outputs`]).
    fn run_outputs(&mut self, run: Vec<Output>, now: Instant) {
        let (mut ins, mut outs, mut rest) = (Vec::new(), Vec::new(), Vec::new());
        for o in run {
            match o {
                Output::Install {
                    child,
                    dir: Dir::In,
                } => ins.push(*child),
                Output::Install {
                    child,
                    dir: Dir::Out,
                } => outs.push(*child),
                o => rest.push(o),
            }
        }
        self.install_all(&ins, Dir::In, now);
        for o in rest {
            self.output(o, now);
        }
        self.install_all(&outs, Dir::Out, now);
    }

    /// Installs these halves in one espd batch; if espd refuses it, one by
    /// one (so that one bad CHILD_SA costs only itself).
    fn install_all(&mut self, children: &[ChildSa], dir: Dir, now: Instant) {
        if children.is_empty() {
            return;
        }
        let texts: Vec<Zeroizing<String>> =
            children.iter().map(|c| self.inst.install(c, dir)).collect();
        if children.len() > 1 {
            let mut all = Zeroizing::new(String::new());
            for t in texts.iter().filter(|t| !t.is_empty()) {
                all.push_str(t);
                all.push('\n');
            }
            match self.apply(&all) {
                Ok(()) => {
                    for _ in children {
                        self.count(installed(dir));
                    }
                    return;
                }
                Err(Refusal::Unreachable(e)) => {
                    for c in children {
                        self.deferred(c, &e);
                    }
                    return;
                }
                // One of them is bad: each on its own below.
                Err(Refusal::Refused(_)) => {}
            }
        }
        for (c, text) in children.iter().zip(texts) {
            match self.apply(&text) {
                Ok(()) => self.count(installed(dir)),
                Err(Refusal::Unreachable(e)) => self.deferred(c, &e),
                Err(Refusal::Refused(e)) => {
                    self.count("install-refused");
                    log(&format!(
                        "espd refused CHILD_SA {} ({:08x}/{:08x}): {e}; deleting it",
                        c.name, c.spi_in, c.spi_out
                    ));
                    let b = self.inst.refused(c);
                    self.delete(b.delete);
                    self.ep.terminate_child(&c.name, now);
                }
            }
        }
    }

    fn deferred(&mut self, c: &ChildSa, e: &str) {
        self.count("install-deferred");
        log(&format!(
            "CHILD_SA {} ({:08x}/{:08x}): {e}; installed when espd is back",
            c.name, c.spi_in, c.spi_out
        ));
    }

    /// One output, at once.
    fn output(&mut self, o: Output, now: Instant) {
        match o {
            Output::Send {
                local,
                remote,
                data,
            } => match self.sock(local) {
                Some(s) => {
                    if let Err(e) = s.send(local.ip(), remote, &data) {
                        self.count("tx-errors");
                        log(&format!("sending to {remote}: {e}"));
                    } else {
                        self.count("tx");
                    }
                }
                None => log(&format!("no socket for {local}")),
            },
            Output::Install { child, dir } => self.install_all(&[*child], dir, now),
            Output::Remove { child, why } => {
                let lines = self.removal(&child, &why);
                self.delete(lines);
            }
            Output::Log(s) => log(&s),
        }
    }

    /// A CHILD_SA leaves espd: logged, and the lines that remove it.
    fn removal(&mut self, child: &ChildSa, why: &str) -> Vec<String> {
        log(&format!(
            "removing CHILD_SA {} ({:08x}/{:08x}) from espd: {why}",
            child.name, child.spi_in, child.spi_out
        ));
        self.inst.remove(child.spi_in).delete
    }

    /// Trap policies and `start_action = start` of the configuration.
    fn start(&mut self, now: Instant) {
        let cfg = self.ep.config().clone();
        for conn in &cfg.connections {
            for ch in &conn.children {
                match ch.start_action {
                    StartAction::Trap => match self.inst.trap(conn, ch) {
                        Ok(text) => {
                            if let Err(Refusal::Refused(e) | Refusal::Unreachable(e)) =
                                self.apply(&text)
                            {
                                log(&format!("trap policies of {}: {e}", ch.name));
                            } else {
                                log(&format!("child {}: trap policies installed", ch.name));
                            }
                        }
                        Err(e) => log(&e),
                    },
                    StartAction::Start => {
                        if let Err(e) = self.ep.initiate(&ch.name, None, now) {
                            log(&format!("start_action = start of {}: {e}", ch.name));
                        }
                    }
                    StartAction::None => {}
                }
            }
        }
    }

    fn espd_event(&mut self, v: Value, now: Instant) {
        match v.get("event").and_then(Value::as_str) {
            Some("acquire") => {
                self.count("acquires");
                let reqid = v["tmpl"]["reqid"].as_u64().unwrap_or(0) as u32;
                let cfg = self.ep.config().clone();
                let Some(ch) = cfg
                    .connections
                    .iter()
                    .flat_map(|c| c.children.iter())
                    .find(|c| c.reqid == reqid && c.start_action == StartAction::Trap)
                else {
                    return;
                };
                let packet = packet_ts(&v["packet"]);
                match self.ep.initiate(&ch.name, packet, now) {
                    Ok(()) => log(&format!("acquire for {}: negotiating", ch.name)),
                    Err(e) => {
                        if !e.contains("already") && !e.contains("being set up") {
                            log(&format!("acquire for {}: {e}", ch.name))
                        }
                    }
                }
            }
            Some("soft-expire") => {
                // Our SA's soft lifetime (bytes, packets or time): rekey it.
                let dst = v["dst"].as_str().and_then(|d| d.parse::<IpAddr>().ok());
                let spi = v["spi"]
                    .as_str()
                    .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok());
                if let (Some(dst), Some(spi)) = (dst, spi) {
                    self.ep.soft_expired(dst, spi, now);
                }
            }
            Some("hard-expire") => {
                // espd removed the SA (RFC 4301 §4.4.2.1): the child goes
                // with the peer too.
                let dst = v["dst"].as_str().and_then(|d| d.parse::<IpAddr>().ok());
                let spi = v["spi"]
                    .as_str()
                    .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok());
                let ours = match (dst, spi) {
                    (Some(dst), Some(spi)) => self.ep.hard_expired(dst, spi, now),
                    _ => false,
                };
                if !ours {
                    log(&format!("espd: hard expiry of an SA that is not ours: {v}"));
                }
            }
            _ => {}
        }
    }

    fn control(&mut self, req: &Value, now: Instant) -> Value {
        let name = || req.get("name").and_then(Value::as_str).unwrap_or("");
        match req.get("op").and_then(Value::as_str) {
            Some("sas") => {
                let sas = self.ep.list(now);
                json!({"ok": true, "sas": sas.iter().map(sa_json).collect::<Vec<_>>(),
                       "text": sas.iter().map(sa_text).collect::<String>()})
            }
            Some("initiate") => match self.ep.initiate(name(), None, now) {
                Ok(()) => json!({"ok": true, "text": format!("initiating {}\n", name())}),
                Err(e) => json!({"ok": false, "error": e}),
            },
            Some("terminate") => {
                let n = self.ep.terminate(name(), now);
                let n = if n == 0 {
                    self.ep.terminate_child(name(), now)
                } else {
                    n
                };
                if n == 0 {
                    json!({"ok": false, "error": format!("no IKE_SA or CHILD_SA named `{}` is up", name())})
                } else {
                    json!({"ok": true, "text": format!("terminating {n} SA(s) of {}\n", name())})
                }
            }
            Some("reload") => match load(&self.cfg_path) {
                Ok(c) => {
                    let text = self.reload(c, now);
                    json!({"ok": true, "text": text})
                }
                Err(e) => json!({"ok": false, "error": format!("nothing changed:\n{e}")}),
            },
            Some("stats") => {
                let mut s: BTreeMap<String, u64> = self
                    .ep
                    .stats()
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect();
                for (k, v) in &self.counters {
                    s.insert(format!("daemon.{k}"), *v);
                }
                s.insert("ike-sas".into(), self.ep.sa_count() as u64);
                s.insert("half-open".into(), self.ep.half_open() as u64);
                s.insert("child-sas-installed".into(), self.inst.child_count() as u64);
                s.insert("policies-installed".into(), self.inst.policy_count() as u64);
                s.insert("espd-connected".into(), self.link.is_up() as u64);
                for p in self.ep.pool_usage() {
                    s.insert(
                        format!("pool.{}.size", p.name),
                        p.size.min(u64::MAX as u128) as u64,
                    );
                    s.insert(format!("pool.{}.online", p.name), p.online as u64);
                    s.insert(format!("pool.{}.offline", p.name), p.offline as u64);
                }
                json!({"ok": true, "stats": s})
            }
            other => json!({"ok": false, "error": format!(
                "unknown op {other:?}: expected sas, initiate, terminate, reload or stats")}),
        }
    }

    /// A changed configuration: IKE_SAs of connections that changed or went
    /// are deleted, the others stay; traps follow the new file.
    fn reload(&mut self, new: Config, now: Instant) -> String {
        let old = self.ep.config().clone();
        let mut out = String::new();
        for c in &old.connections {
            let same = new
                .connections
                .iter()
                .find(|n| n.name == c.name)
                .is_some_and(|n| {
                    format!("{:?}", strip_at(n)) == format!("{:?}", strip_at(c))
                        && pools_of(&new, n) == pools_of(&old, c)
                });
            if !same {
                let n = self.ep.terminate(&c.name, now);
                out += &format!(
                    "connection {}: changed or removed, {n} IKE_SA(s) deleted\n",
                    c.name
                );
                for ch in &c.children {
                    let lines = self.inst.untrap(&c.name, &ch.name);
                    self.delete(lines);
                }
            }
        }
        self.ep.set_config(Arc::new(new));
        self.start_new_traps();
        out + "reloaded\n"
    }

    fn start_new_traps(&mut self) {
        let cfg = self.ep.config().clone();
        let have = self.inst.trapped();
        for conn in &cfg.connections {
            for ch in conn
                .children
                .iter()
                .filter(|c| c.start_action == StartAction::Trap)
            {
                if have.contains(&format!("{}/{}", conn.name, ch.name)) {
                    continue;
                }
                match self.inst.trap(conn, ch) {
                    Ok(t) => {
                        if let Err(Refusal::Refused(e) | Refusal::Unreachable(e)) = self.apply(&t) {
                            log(&format!("trap policies of {}: {e}", ch.name));
                        }
                    }
                    Err(e) => log(&e),
                }
            }
        }
    }
}

/// A connection's settings without where they were written (a reload
/// that only moved lines changes nothing).
/// The pools a connection hands out from, as written (a changed pool
/// changes the connection: its clients' leases start afresh).
/// `ip ARGS…`: an error with what ip said.
fn ip(args: &[&str]) -> Result<(), String> {
    let o = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
    }
}

fn pools_of(cfg: &Config, c: &conf::Conn) -> Vec<Option<(IpAddr, IpAddr, Vec<IpAddr>)>> {
    c.pools
        .iter()
        .map(|p| cfg.pool(p).map(|p| (p.first, p.last, p.dns.clone())))
        .collect()
}

fn strip_at(c: &conf::Conn) -> conf::Conn {
    let mut c = c.clone();
    c.at.clear();
    c.pools_at.clear();
    for ch in &mut c.children {
        ch.at.clear();
    }
    c
}

/// The acquire's packet as a pair of host selectors (RFC 7296 §2.9: the
/// first TS of each list is the packet that triggered the negotiation).
fn packet_ts(p: &Value) -> Option<(Ts, Ts)> {
    let src: IpAddr = p["src"].as_str()?.parse().ok()?;
    let dst: IpAddr = p["dst"].as_str()?.parse().ok()?;
    let proto = p["proto"].as_u64().unwrap_or(0) as u8;
    let (sp, dp) = match p["ports"].as_array() {
        Some(a) if a.len() == 2 => (a[0].as_u64()? as u16, a[1].as_u64()? as u16),
        _ => (0, 0),
    };
    let ports = |x: u16| {
        if p["ports"].is_array() {
            (x, x)
        } else {
            (0, 65535)
        }
    };
    let t = |a: IpAddr, (s, e): (u16, u16)| Ts {
        proto,
        start_port: s,
        end_port: e,
        start: a,
        end: a,
    };
    Some((t(src, ports(sp)), t(dst, ports(dp))))
}

fn sa_json(s: &SaInfo) -> Value {
    json!({
        "name": s.conn, "spi_i": format!("{:016x}", s.spi_i), "spi_r": format!("{:016x}", s.spi_r),
        "initiator": s.initiator, "state": s.state, "local": s.local.to_string(),
        "remote": s.remote.to_string(), "local_id": s.local_id, "remote_id": s.remote_id,
        "alg": s.alg, "nat": s.nat, "established_secs": s.established_secs,
        "local_vips": s.local_vips.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "remote_vips": s.remote_vips.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "local_dns": s.local_dns.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "children": s.children.iter().map(|c| json!({
            "name": c.name, "reqid": c.reqid, "mode": c.mode,
            "spi_in": format!("{:08x}", c.spi_in), "spi_out": format!("{:08x}", c.spi_out),
            "alg": c.alg, "encap": c.encap, "local_ts": c.local_ts, "remote_ts": c.remote_ts,
            "installed_secs": c.installed_secs,
            "peer_takes_tfc_padding": c.peer_takes_tfc,
        })).collect::<Vec<_>>(),
    })
}

/// `swanctl --list-sas`'s layout.
fn sa_text(s: &SaInfo) -> String {
    let mut t = format!(
        "{}: {}, IKEv2, {:016x}_i{} {:016x}_r{}\n  local  '{}' @ {}\n  remote '{}' @ {}\n  {}\n",
        s.conn,
        s.state,
        s.spi_i,
        if s.initiator { "*" } else { "" },
        s.spi_r,
        if s.initiator { "" } else { "*" },
        s.local_id,
        s.local,
        s.remote_id,
        s.remote,
        s.alg
    );
    if let Some(e) = s.established_secs {
        t += &format!("  established {e}s ago\n");
    }
    for (side, v) in [("local", &s.local_vips), ("remote", &s.remote_vips)] {
        if !v.is_empty() {
            let v: Vec<String> = v.iter().map(|a| a.to_string()).collect();
            t += &format!("  {side} virtual IP {}\n", v.join(" "));
        }
    }
    if !s.local_dns.is_empty() {
        let v: Vec<String> = s.local_dns.iter().map(|a| a.to_string()).collect();
        t += &format!("  DNS {}\n", v.join(" "));
    }
    for c in &s.children {
        t += &format!(
            "  {}: reqid {}, INSTALLED, {}{}, ESP:{}\n    installed {}s ago\n    in  {:08x}\n    out {:08x}\n    local  {}\n    remote {}\n",
            c.name,
            c.reqid,
            c.mode.to_uppercase(),
            if c.encap { "-in-UDP" } else { "" },
            c.alg,
            c.installed_secs,
            c.spi_in,
            c.spi_out,
            c.local_ts.join(" "),
            c.remote_ts.join(" ")
        );
    }
    t
}

fn main() {
    if let Err(e) = run() {
        log(&format!("{e:#}"));
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = match load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if args.check {
        println!(
            "{}: ok ({} connection(s))",
            args.config.display(),
            cfg.connections.len()
        );
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    let (tx, rx) = mpsc::channel::<Ev>();
    let mut ports: Vec<u16> = vec![500, espd_ike::ike::NATT_PORT];
    for c in &cfg.connections {
        if !ports.contains(&c.local_port) {
            ports.push(c.local_port);
        }
    }
    let mut socks = Vec::new();
    for &p in &ports {
        for v6 in [false, true] {
            match udp::open(p, v6) {
                Ok(s) => socks.push(Arc::new(s)),
                Err(e) if v6 => log(&format!("no IPv6 IKE on port {p}: {e:#}")),
                Err(e) => return Err(e),
            }
        }
    }
    for s in &socks {
        let s = Arc::clone(s);
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("udp-{}", s.port))
            .spawn(move || s.run(tx))?;
    }
    let listener = ctl::bind(&args.socket)
        .with_context(|| format!("binding the control socket {}", args.socket.display()))?;
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("ike-ctl-accept".into())
            .spawn(move || ctl::serve(listener, tx))?;
    }
    let mut ep = Endpoint::new(Arc::new(cfg));
    ep.fragment_size = args.fragment_size as usize;
    ep.retransmit_base = std::time::Duration::from_secs_f64(args.retransmit_timeout);
    ep.retransmit_tries = args.retransmit_tries;
    let mut d = Daemon {
        ep,
        inst: Installer::new(),
        link: Link::new(args.espd.clone(), tx.clone()),
        socks,
        cfg_path: args.config.clone(),
        counters: BTreeMap::new(),
        next_connect: Instant::now(),
        connected_once: false,
        adopted_until: None,
        vip_dev: args.vip_dev.clone(),
        vips_on: Default::default(),
        dns_file: args.dns_file.clone(),
        dns_written: Vec::new(),
    };
    log(&format!(
        "started: UDP ports {ports:?}, control {}, espd {}",
        args.socket.display(),
        args.espd.display()
    ));
    d.try_connect();
    let now = Instant::now();
    d.start(now);
    d.drain(now);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait =
            d.ep.poll_timeout()
                .map_or(Duration::from_millis(200), |t| {
                    t.saturating_duration_since(now)
                })
                .min(Duration::from_millis(200));
        match rx.recv_timeout(wait) {
            Ok(ev) => {
                d.event(ev, Instant::now());
                // Whatever else has arrived, before the outputs are carried
                // out: a burst of set-ups shares its espd batches.
                for _ in 0..BURST_EVENTS {
                    match rx.try_recv() {
                        Ok(ev) => d.event(ev, Instant::now()),
                        Err(_) => break,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        if d.ep.poll_timeout().is_some_and(|t| t <= now) {
            d.ep.handle_timeout(now);
        }
        if !d.link.is_up() && d.next_connect <= now {
            d.try_connect();
        }
        d.end_adoption(now);
        d.drain(now);
    }
    // Exit: DELETE every IKE_SA (RFC 7296 §1.4.1), give the answers half a
    // second, then take everything we installed out of espd; trap
    // policies stay so that protected traffic stays blocked (fail closed).
    log("stopping: deleting IKE_SAs and removing CHILD_SAs from espd");
    let now = Instant::now();
    d.ep.terminate_all(now);
    d.drain(now);
    let until = Instant::now() + Duration::from_millis(500);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if let Ok(Ev::Udp(udp::Rx::Ike {
            local,
            remote,
            data,
        })) = rx.recv_timeout(left)
        {
            d.ep.handle(Instant::now(), local, remote, &data);
            d.drain(Instant::now());
        }
    }
    let lines = d.inst.remove_all(true);
    d.delete(lines);
    // The virtual addresses and DNS servers go with the IKE_SAs (those
    // whose DELETE was not answered too).
    d.release_vips();
    let _ = std::fs::remove_file(&args.socket);
    log("stopped");
    Ok(())
}
