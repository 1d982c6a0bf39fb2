//! `espd run`: the live gateway.
//!
//! ```text
//!            inside interface                         outside interface
//!  hosts ──► XDP espd_inside ──(PROTECT prefix)──► AF_XDP q ──┐
//!            │ DISCARD-only prefix: XDP_DROP                  │ worker q (pinned core):
//!            │ everything else: XDP_PASS → kernel forwarding  │ engine: SPD → SA → ESP
//!            ▼                                                │ next hop (kernel FIB+neigh)
//!                                                             └──► TX ring (outside) ──► peer
//!  peer ──► XDP espd_outside ──(ESP / ESP-in-UDP, known SPI)──► AF_XDP q ──► worker q:
//!            │ IKE, ARP, ND, ICMP, unknown SPI: XDP_PASS          replay, ICV, decrypt,
//!            ▼ kernel                                              policy check, TTL ──► TX (inside)
//! ```
//! One worker per queue pair; each owns a UMEM shared by its two sockets.

pub mod control;
pub mod guard;
pub mod heap;
pub mod host;
mod metrics;
pub mod mirror;
pub mod nexthop;
pub mod seqstore;
mod worker;

use anyhow::{bail, Context, Result};
use espd_config::Config;
#[cfg(test)]
use espd_core::state::Action;
use espd_core::state::Direction;
use espd_core::DropReason;
#[cfg(test)]
use espd_io::steer::SelAction;
use espd_io::steer::{Side, Steering};
use espd_io::xsk::{BindMode, WorkerPorts, WORKER_FRAMES};
use espd_io::Counter;
use serde_json::json;
use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use worker::{Snapshot, Worker};

#[derive(clap::Args)]
pub struct Args {
    /// Configuration in `ip xfrm` syntax (see docs/config.md). Without it
    /// espd starts with no SAs or policies and takes them from `espctl`.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// The control socket `espctl -s PATH` talks to (mode 0600, root only).
    #[arg(long, default_value = espd_proto::DEFAULT_SOCKET)]
    pub control: PathBuf,
    /// The interface towards the protected networks (a gateway).
    #[arg(long, required_unless_present = "host")]
    pub inside: Option<String>,
    /// Host mode: protect this host's own traffic. espd creates a veth pair
    /// (`--host-dev`, and NAME-x for itself), routes the outbound PROTECT
    /// policies' destinations into it (table 4303) and delivers what it
    /// decapsulates for this host through it (docs/operations.md, "Host
    /// mode"). With `--inside` too, a gateway that also protects its own
    /// traffic (management, its IKE or BGP to the peer): both paths at once.
    #[arg(long)]
    pub host: bool,
    /// The kernel's end of the host pair (host mode).
    #[arg(long, default_value = "espd0", value_name = "NAME")]
    pub host_dev: String,
    /// The interface towards the peers (where ESP leaves and arrives).
    #[arg(long)]
    pub outside: String,
    /// Workers, one per queue index: worker q serves RX queue q of each
    /// interface that has it. Default, and the only accepted value: the
    /// larger of the two interfaces' RX queue counts — a queue no socket
    /// serves would be a black hole.
    #[arg(long)]
    pub queues: Option<u32>,
    /// Cores to pin the workers to, in order, e.g. `2,3` (default: worker i
    /// on the i-th core this process may run on).
    #[arg(long, value_delimiter = ',')]
    pub cores: Vec<usize>,
    /// Generic (SKB) XDP instead of native driver XDP.
    #[arg(long)]
    pub skb_mode: bool,
    /// Force AF_XDP copy mode (default: zero-copy where the driver has it,
    /// copy otherwise; veth is copy only).
    #[arg(long, conflicts_with = "zero_copy")]
    pub copy: bool,
    /// Require AF_XDP zero-copy (fail if the driver cannot).
    #[arg(long)]
    pub zero_copy: bool,
    /// Workers never sleep: they poll their rings all the time, one core
    /// each at 100 %, and a packet after a quiet spell does not wait for a
    /// sleeping worker to wake (tens of microseconds per worker on a VM;
    /// docs/performance.md "Host to host"). An idle worker yields its core
    /// to any other runnable thread (sched_yield), so the applications and
    /// softirq threads sharing it run at once. Default: a worker sleeps in
    /// poll(2) after about 256 empty turns.
    #[arg(long)]
    pub busy_poll: bool,
    /// Stop after this many seconds (default: until SIGINT/SIGTERM).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Write counters (per worker, per drop reason, per SA, XDP) as JSON here
    /// on exit, and every second while running.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// Complete TCP/UDP checksums that the sender left partial (checksum
    /// offload on a veth or other virtual link): `auto` does it when the
    /// inside interface is virtual (no device in sysfs). See docs/operations.md.
    #[arg(long, value_enum, default_value_t = CsumFix::Auto)]
    pub fix_partial_checksums: CsumFix,
    /// Benchmarks only (both gateways): every SA keeps its ESP framing,
    /// sequence numbers and replay window but uses no cipher and a zero ICV,
    /// to measure the I/O path without crypto. Protects nothing.
    #[arg(long, hide_short_help = true)]
    pub bench_no_crypto: bool,
    /// Serve Prometheus metrics over HTTP on ADDR:PORT (a bare PORT listens
    /// on 127.0.0.1). Off by default.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
    /// No live counter line even on a TTY.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Where outbound sequence numbers and IV masks are kept across restarts
    /// and crashes (RFC 4303 §3.3.3; 0600). Default:
    /// /var/lib/espd/NAME.seq, NAME the control socket's file name.
    #[arg(long, value_name = "PATH")]
    pub seq_file: Option<PathBuf>,
}

impl Args {
    fn seq_path(&self) -> PathBuf {
        self.seq_file.clone().unwrap_or_else(|| {
            let stem = self
                .control
                .file_stem()
                .map_or("espd".into(), |s| s.to_string_lossy().into_owned());
            PathBuf::from(format!("/var/lib/espd/{stem}.seq"))
        })
    }
}

#[derive(clap::Args)]
pub struct DownArgs {
    /// The control socket of the espd whose guard this is: refused while it answers.
    #[arg(long, default_value = espd_proto::DEFAULT_SOCKET)]
    pub control: PathBuf,
    /// The host pair of a host-mode espd (removed with its routes and rule).
    #[arg(long, default_value = "espd0", value_name = "NAME")]
    pub host_dev: String,
}

/// `espd down`: removes the guard's kernel policies in this namespace.
pub fn down(a: &DownArgs) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(&a.control).is_ok() {
        bail!(
            "espd is running here ({} answers): stop it first; the guard is what keeps \
             protected traffic from leaving in clear while espd is down",
            a.control.display()
        );
    }
    let mut g = guard::Guard::open(None).context("opening the kernel's XFRM policy table")?;
    let n = g.lift().context("removing the guard's XFRM policies")?;
    eprintln!(
        "espd down: removed {n} kernel XFRM policies: traffic the policies protected is now \
         forwarded by the kernel in clear"
    );
    if host::remove(&a.host_dev).context("removing the host pair and routes")? > 0 {
        eprintln!(
            "espd down: removed the host pair {} and the host routes (table {})",
            a.host_dev,
            host::HOST_TABLE
        );
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CsumFix {
    Auto,
    On,
    Off,
}

/// Virtual interfaces (veth, bridges, tun…) have no `device` link in sysfs.
fn is_virtual(iface: &str) -> bool {
    !std::path::Path::new(&format!("/sys/class/net/{iface}/device")).exists()
}

/// Capabilities espd needs, as bits of /proc/self/status CapEff.
const CAPS: [(&str, u32); 3] = [("CAP_NET_ADMIN", 12), ("CAP_NET_RAW", 13), ("CAP_BPF", 39)];
const CAP_SYS_ADMIN: u32 = 21;

fn missing_caps() -> Vec<&'static str> {
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let has = |b: u32| eff & (1u64 << b) != 0;
    CAPS.iter()
        // CAP_SYS_ADMIN stands in for CAP_BPF on older kernels.
        .filter(|(n, b)| !(has(*b) || (*n == "CAP_BPF" && has(CAP_SYS_ADMIN))))
        .map(|(n, _)| *n)
        .collect()
}

#[cfg(test)]
/// The destination prefixes the inside XDP program must look at, from the
/// outbound policies: PROTECT and DISCARD prefixes are steered to espd
/// (whose engine makes the exact decision); a DISCARD of any source, protocol
/// and port whose prefix no other policy overlaps is dropped in XDP. With an
/// outbound default of block, everything is steered.
pub fn inside_selectors(cfg: &Config) -> Vec<(IpAddr, u8, SelAction)> {
    let pols = cfg.spd.policies(Direction::Out);
    let pick = |p: &espd_core::state::Policy| {
        if p.action == Action::Block {
            Some(true)
        } else if !p.tmpls.is_empty() {
            Some(false)
        } else {
            None
        }
    };
    let default_block = cfg.spd.default_action(Direction::Out) == Action::Block;
    selectors(&pols, pick, default_block)
}

#[cfg(test)]
/// The destination prefixes the outside XDP program checks plaintext
/// against (RFC 4301 §5.2 step 3a), from the `in` and `fwd` policies:
/// prefixes of PROTECT (a required template) and DISCARD policies are
/// steered to the engine's inbound policy check; where nothing but such
/// policies of any source, protocol and port select a prefix, plaintext to
/// it is dropped in XDP. Traffic to this box never meets the tries (the
/// kernel and its XFRM guard handle it). With an in/fwd default of block,
/// everything is steered.
pub fn outside_selectors(cfg: &Config) -> Vec<(IpAddr, u8, SelAction)> {
    let mut pols = cfg.spd.policies(Direction::In);
    pols.extend(cfg.spd.policies(Direction::Fwd));
    let pick = |p: &espd_core::state::Policy| {
        if p.action == Action::Block || p.requires_protection() {
            Some(true)
        } else {
            None
        }
    };
    let default_block = [Direction::In, Direction::Fwd]
        .iter()
        .any(|d| cfg.spd.default_action(*d) == Action::Block);
    selectors(&pols, pick, default_block)
}

#[cfg(test)]
/// Destination prefixes of the policies `pick` selects: `Some(droppable)`
/// when a policy's prefix is to be looked at, and whether its action alone
/// may drop in XDP (when its selector names no source, protocol or port and
/// no other policy of `pols` overlaps its prefix).
fn selectors(
    pols: &[&espd_core::state::Policy],
    pick: impl Fn(&espd_core::state::Policy) -> Option<bool>,
    default_block: bool,
) -> Vec<(IpAddr, u8, SelAction)> {
    let mut out = Vec::new();
    for p in pols {
        let s = &p.sel;
        let Some(droppable) = pick(p) else {
            continue;
        };
        let alone = droppable
            && s.src.len == 0
            && s.proto.is_none()
            && s.sport.is_none()
            && s.dport.is_none()
            && pols.iter().all(|q| {
                std::ptr::eq(*q, *p)
                    || q.sel.dst.is_ipv4() != s.dst.is_ipv4()
                    || !(q.sel.dst.contains(s.dst.addr) || s.dst.contains(q.sel.dst.addr))
            });
        let act = if alone {
            SelAction::Drop
        } else {
            SelAction::Steer
        };
        out.push((s.dst.addr, s.dst.len, act));
    }
    if default_block {
        out.push((IpAddr::V4(0u32.into()), 0, SelAction::Steer));
        out.push((IpAddr::V6(0u128.into()), 0, SelAction::Steer));
    }
    // A prefix listed twice: steering wins over dropping.
    out.sort_by_key(|(a, l, act)| (*a, *l, *act == SelAction::Drop));
    out.dedup_by(|b, a| a.0 == b.0 && a.1 == b.1);
    out
}

/// How many workers serve `ifaces` with `nq` RX queues each: one per queue
/// index up to the larger count, so every queue of both has a socket (a
/// worker serves queue q of each interface that has it). A `--queues`
/// asking for fewer is refused with the queue it would leave unserved and
/// how to reduce the queues instead; more than there are, too.
fn serving_plan(ifaces: &[&str; 2], nq: [u32; 2], want: Option<u32>) -> Result<u32> {
    let need = nq[0].max(nq[1]);
    match want {
        None => Ok(need),
        Some(0) => bail!("--queues must be at least 1"),
        Some(w) if w < need => {
            let i = usize::from(nq[1] > nq[0]);
            bail!(
                "--queues {w} leaves RX queue {w} of {} unserved ({} has {} RX queues): frames \
                 XDP steers there would find no socket. Serve every queue (omit --queues), or \
                 give the interface fewer queues first: ethtool -L {} combined {w} (or rx {w})",
                ifaces[i],
                ifaces[i],
                nq[i],
                ifaces[i]
            )
        }
        Some(w) if w > need => bail!(
            "--queues {w}: {} has {} and {} has {} RX queues; there is nothing for more than {need} workers",
            ifaces[0],
            nq[0],
            ifaces[1],
            nq[1]
        ),
        Some(w) => Ok(w),
    }
}

fn read_mtu(iface: &str) -> usize {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1500)
}

pub fn run(a: &Args) -> Result<()> {
    let missing = missing_caps();
    if !missing.is_empty() {
        bail!(
            "espd run needs {} (missing: {}); run it as root or grant them (setcap), \
             and allow locking memory for the UMEM (ulimit -l / LimitMEMLOCK)",
            CAPS.map(|c| c.0).join(", "),
            missing.join(", ")
        );
    }
    // The running configuration: the file's lines, as if applied by espctl.
    let mut ops = Vec::new();
    if let Some(path) = &a.config {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        );
        let none = espd_core::state::Tables::default();
        ops = espd_config::db::apply(&path.display().to_string(), &text, none.sad(), none.spd())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .1;
    }
    let (out_idx, out_mac) = espd_io::netlink::link_info(&a.outside)
        .with_context(|| format!("outside interface {}", a.outside))?;
    // Host mode: the pair stands where a gateway's inside interface is, or
    // beside it as a third side (nothing is routed into it before the
    // workers run; see host.rs).
    let pair = if a.host {
        host::create_pair(&a.host_dev, espd_io::xsk::rx_queues(&a.outside))?;
        Some(host::espd_end(&a.host_dev))
    } else {
        None
    };
    let inside = match (&a.inside, &pair) {
        (Some(i), _) => i.clone(),
        (None, Some(p)) => p.clone(),
        (None, None) => bail!("--inside IF or --host is needed"),
    };
    // The pair's side: the inside in host mode alone, a third side beside
    // an inside interface (`xsk::HOST`).
    let both = a.host && a.inside.is_some();
    let host_side = a.host.then_some(if both {
        espd_io::xsk::HOST
    } else {
        espd_io::xsk::INSIDE
    });
    let host_mac = if a.host {
        Some(espd_io::netlink::link_info(&a.host_dev)?.1)
    } else {
        None
    };
    let (in_idx, in_mac) = espd_io::netlink::link_info(&inside)
        .with_context(|| format!("inside interface {inside}"))?;
    if in_idx == out_idx {
        bail!("--inside and --outside must be different interfaces");
    }
    let pair_mac = match (&pair, both) {
        (Some(p), true) => espd_io::netlink::link_info(p)?.1,
        _ => in_mac,
    };
    let local = espd_io::netlink::local_addrs(None).context("reading this host's addresses")?;
    // The sources of espd's ICMP errors towards the inside: the host's own
    // addresses in host mode alone.
    let inside_addrs = if a.inside.is_none() {
        local.iter().copied().filter(|x| !x.is_loopback()).collect()
    } else {
        espd_io::netlink::local_addrs(Some(&inside))?
    };
    // Outbound SAs continue their sequence numbers and IV masks (RFC 4303
    // §3.3.3), written down before any worker sends.
    let seq_path = a.seq_path();
    let mut seqs = seqstore::SeqStore::open(&seq_path)?;
    let nq = [
        espd_io::xsk::rx_queues(&inside),
        espd_io::xsk::rx_queues(&a.outside),
    ];
    let queues = serving_plan(&[&inside, &a.outside], nq, a.queues)?;
    let cores: Vec<usize> = if a.cores.is_empty() {
        core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect()
    } else {
        a.cores.clone()
    };
    if cores.is_empty() {
        bail!("no cores to run workers on");
    }

    let stop = crate::stop_on_signals()?;
    let params = control::EngineParams {
        inside_addrs: inside_addrs.clone(),
        mtu: read_mtu(&a.outside),
        bench_no_crypto: a.bench_no_crypto,
        workers: queues,
        host: !both && a.host,
        start: std::time::Instant::now(),
    };
    // The shared tables: the policies first (they say which addresses are
    // ours), then the SAs, each outbound one continuing its recorded numbers.
    let mut tables = espd_core::state::Tables::default();
    tables.set_extra(&local);
    let (sa_ops, pol_ops): (Vec<_>, Vec<_>) = ops.into_iter().partition(|o| {
        matches!(
            o,
            espd_config::db::Op::AddSa(_)
                | espd_config::db::Op::UpdateSa(_)
                | espd_config::db::Op::DelSa(..)
        )
    });
    params
        .apply_ops(&mut tables, pol_ops, &seqs)
        .map_err(|e| anyhow::anyhow!(e))?;
    let d = params
        .apply_ops(&mut tables, sa_ops, &seqs)
        .map_err(|e| anyhow::anyhow!(e))?;
    // Records of SAs that are not configured stay: a daemon (espd-ike) that
    // installed them at run time adds them again, with the same keys, when
    // it sees espd back, and they must continue their numbers (RFC 4303
    // §3.3.3; else the IV, seq ⊕ mask, repeats under the key). A record
    // goes when its SA is deleted. The configured outbound SAs' are written.
    seqs.apply(&d.seqs);
    let restored = seqs.restored();
    seqs.save(false)
        .with_context(|| format!("writing {}", seq_path.display()))?;
    let cfg = Config {
        sad: tables.sad().clone(),
        spd: tables.spd().clone(),
    };

    // The guard before anything else: from here on, what the policies
    // protect is dropped by the kernel whenever espd is not handling it —
    // if a step below fails, when espd stops, or if it dies. It stays after
    // exit; `espd down` lifts it (docs/operations.md, "Failure modes").
    let shape = a.host.then_some(guard::HostShape { outside: out_idx });
    let mut guard = guard::Guard::open(shape).context("opening the kernel's XFRM policy table")?;
    guard
        .sync(&cfg)
        .context("installing the fail-closed guard (kernel XFRM policies)")?;
    // Host mode: every protected destination prohibited in the host table
    // now, routed into the pair once the workers run.
    let mut host_routes = None;
    if a.host {
        let mut r = host::Routes::new(
            &a.host_dev,
            read_mtu(&a.outside).saturating_sub(host::OVERHEAD).max(576),
        );
        let pols: Vec<&espd_core::state::Policy> = Direction::ALL
            .iter()
            .flat_map(|d| cfg.spd.policies(*d))
            .collect();
        let staged = r.stage(pols.into_iter().map(|p| (true, p)));
        r.tighten(&staged)?;
        host_routes = Some((r, staged));
    }
    eprintln!(
        "espd run: guard: {} kernel XFRM policies (`ip xfrm policy` lists them; `espd down` lifts them)",
        guard.len()
    );
    fault("attach")?;

    // XDP first (dropping `steer` detaches on every error path below).
    let mode = crate::xdp_mode(a.skb_mode);
    let mut steer = Steering::load().map_err(|e| {
        if e.is_permission() {
            anyhow::anyhow!("loading XDP was refused: espd needs CAP_BPF, CAP_NET_ADMIN and CAP_NET_RAW and enough locked memory: {e}")
        } else {
            anyhow::anyhow!("loading XDP: {e}")
        }
    })?;
    let mut maps = mirror::Maps::default();
    let plan = maps.apply(&mirror::everything(&tables), &tables);
    plan.add(&mut steer)?;
    let sels_len = plan.sels[0].len();
    // Workers' ports and engines (one engine per worker, from the same config).
    let bind = if a.copy {
        BindMode::Copy
    } else if a.zero_copy {
        BindMode::ZeroCopy
    } else {
        BindMode::Auto
    };
    let shared = Arc::new(arc_swap::ArcSwap::from_pointee(tables.clone()));
    let engines = params.build(&shared.load_full());
    let mut wports = Vec::new();
    // By side: inside, outside, and the host pair beside an inside interface.
    let mut ifaces = vec![inside.as_str(), a.outside.as_str()];
    let mut serve_n = nq.to_vec();
    if let (true, Some(p)) = (both, &pair) {
        ifaces.push(p);
        serve_n.push(espd_io::xsk::rx_queues(p));
    }
    for q in 0..queues {
        let serve: Vec<bool> = serve_n.iter().map(|n| q < *n).collect();
        let p = WorkerPorts::bind(&ifaces, q, WORKER_FRAMES, bind, &serve)
            .with_context(|| format!("AF_XDP sockets on queue {q}"))?;
        wports.push(p);
    }
    let listener = control::bind(&a.control)
        .with_context(|| format!("control socket {}", a.control.display()))?;
    let metrics = match &a.metrics {
        Some(m) => {
            let addr = metrics::parse_addr(m).map_err(|e| anyhow::anyhow!(e))?;
            Some(std::net::TcpListener::bind(addr).with_context(|| format!("--metrics {addr}"))?)
        }
        None => None,
    };
    for (q, p) in wports.iter().enumerate() {
        for (side, s) in [
            (Side::Inside, espd_io::xsk::INSIDE),
            (Side::Outside, espd_io::xsk::OUTSIDE),
            (Side::Host, espd_io::xsk::HOST),
        ] {
            if let Some(fd) = p.fd(s) {
                steer.set_socket_side(side, q as u32, fd)?;
            }
        }
    }
    steer
        .attach_side(Side::Outside, &a.outside, mode)
        .with_context(|| format!("attaching XDP to {}", a.outside))?;
    steer
        .attach_side(Side::Inside, &inside, mode)
        .with_context(|| format!("attaching XDP to {inside}"))?;
    if let (true, Some(p)) = (both, &pair) {
        steer
            .attach_side(Side::Host, p, mode)
            .with_context(|| format!("attaching XDP to {p}"))?;
    }
    if a.host {
        steer
            .attach_host_mark(&a.host_dev)
            .with_context(|| format!("attaching the mark program to {}", a.host_dev))?;
    }

    // Next hops: warm with the peers of the SAs.
    let mut peers: Vec<IpAddr> = cfg
        .sad
        .iter()
        .flat_map(|sa| [sa.cfg.src, sa.cfg.dst])
        .filter(|x| !local.contains(x))
        .collect();
    if a.host {
        // This host's addresses: where decapsulated packets go (through the pair).
        peers.extend(local.iter().filter(|x| !x.is_loopback()));
    }
    let links = nexthop::Links {
        inside: in_idx,
        outside: out_idx,
        host: host_mac
            .zip(host_side)
            .map(|(mac, side)| nexthop::HostLink { mac, side }),
    };
    let (table, resolver) =
        nexthop::start(links, peers, Arc::clone(&stop)).context("opening rtnetlink")?;

    let mut handles = Vec::new();
    let mut snaps = Vec::new();
    let (events_tx, events_rx) = std::sync::mpsc::sync_channel(1024);
    let (retired_tx, retired_rx) = std::sync::mpsc::sync_channel(4096);
    let syncs: Vec<Arc<control::WorkerSync>> = (0..queues)
        .map(|_| Arc::new(control::WorkerSync::default()))
        .collect();
    let (peers, mut inboxes): (Vec<_>, Vec<_>) = (0..queues)
        .map(|_| std::sync::mpsc::sync_channel(worker::HANDOFF_QUEUE))
        .unzip();
    for (q, (engine, p)) in engines.into_iter().zip(wports).enumerate() {
        let out = Arc::new(Mutex::new(Snapshot::default()));
        snaps.push(Arc::clone(&out));
        let core = cores[q % cores.len()];
        let w = Worker {
            ports: p,
            engine,
            cache: nexthop::Cache::new(Arc::clone(&table)),
            macs: [in_mac, out_mac, pair_mac],
            mtu: [
                read_mtu(&inside),
                read_mtu(&a.outside),
                pair.as_deref().map_or(0, read_mtu),
            ],
            // The host pair is a veth: the host's stack leaves checksums
            // partial there.
            fix_csum: match a.fix_partial_checksums {
                CsumFix::On => [true, false, true],
                CsumFix::Off => [false; 3],
                CsumFix::Auto => [is_virtual(&inside), false, true],
            },
            host: host_side,
            router: a.inside.is_some(),
            busy_poll: a.busy_poll,
            inbox: inboxes.remove(0),
            peers: peers.clone(),
            reinject: worker::Reinject::default(),
            reasm: worker::Reasm::new(a.host),
            tables: Arc::clone(&shared),
            sync: Arc::clone(&syncs[q]),
            retired: retired_tx.clone(),
            events: events_tx.clone(),
            id: q as u32,
            out,
            stop: Arc::clone(&stop),
        };
        let h = std::thread::Builder::new()
            .name(format!("espd-w{q}"))
            .spawn(move || {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                    eprintln!("espd: worker {q}: could not pin to core {core}");
                }
                w.run();
            })?;
        handles.push((q, core, h));
    }
    for (q, core) in handles.iter().map(|h| (h.0, h.1)) {
        let q32 = q as u32;
        let on = |i: usize, name: &str| {
            if q32 < nq[i] {
                format!("{name} RX queue {q}")
            } else {
                format!("{name}: sends through AF_PACKET (no queue {q})")
            }
        };
        let third = match (both, &pair) {
            (true, Some(p)) => format!(", host pair {p} RX queue {q}"),
            _ => String::new(),
        };
        eprintln!(
            "espd run: worker {q} (core {core}): {}, {}{third}",
            on(0, &inside),
            on(1, &a.outside)
        );
    }
    eprintln!(
        "espd run: inside {} outside {} ({} XDP, {} AF_XDP), {} worker(s) on core(s) {:?}, {} SAs, {} policies, {} inside prefixes",
        inside,
        a.outside,
        if a.skb_mode { "generic" } else { "native" },
        match bind {
            BindMode::Auto => "zero-copy where supported",
            BindMode::Copy => "copy",
            BindMode::ZeroCopy => "zero-copy",
        },
        queues,
        handles.iter().map(|h| h.1).collect::<Vec<_>>(),
        cfg.sad.len(),
        Direction::ALL.iter().map(|d| cfg.spd.policies(*d).len()).sum::<usize>(),
        sels_len,
    );
    eprintln!("espd run: control socket {}", a.control.display());
    eprintln!(
        "espd run: outbound sequence numbers in {} ({restored} SA(s) continued)",
        seq_path.display()
    );
    let cores_used: Vec<(usize, usize)> = handles.iter().map(|h| (h.0, h.1)).collect();
    let steer = Arc::new(Mutex::new(steer));
    let ctl = Arc::new(control::Control {
        tables: Mutex::new(tables),
        shared,
        cfg: Mutex::new(cfg),
        maps: Mutex::new(maps),
        steer: Arc::clone(&steer),
        workers: syncs,
        snaps: snaps.clone(),
        cores: cores_used.clone(),
        params,
        guard: Mutex::new(guard),
        host: Mutex::new(None),
        nexthop: Arc::clone(&table),
        seqs: Mutex::new(seqs),
        apply_lock: Mutex::new(()),
        monitors: Mutex::new(Vec::new()),
        clients: std::sync::atomic::AtomicUsize::new(0),
    });
    // The workers run: protected destinations are routed into the pair.
    if let Some((mut r, staged)) = host_routes {
        r.loosen(&staged)
            .context("routing the protected destinations into the host pair")?;
        eprintln!(
            "espd run: host mode: {} protected prefixes routed into {} (table {}, rule pref {})",
            r.len(),
            a.host_dev,
            host::HOST_TABLE,
            host::HOST_RULE_PREF
        );
        *ctl.host.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(r);
    }
    let events_thread = {
        let (c, st) = (Arc::clone(&ctl), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("espd-events".into())
            .spawn(move || control::events(c, events_rx, retired_rx, st))?
    };
    let metrics_thread = match metrics {
        Some(l) => {
            eprintln!("espd run: metrics on http://{}/metrics", l.local_addr()?);
            let (c, st) = (Arc::clone(&ctl), Arc::clone(&stop));
            Some(
                std::thread::Builder::new()
                    .name("espd-metrics".into())
                    .spawn(move || metrics::serve(l, c, st))?,
            )
        }
        None => None,
    };
    let ctl_thread = {
        let (c, st, path) = (Arc::clone(&ctl), Arc::clone(&stop), a.control.clone());
        std::thread::Builder::new()
            .name("espd-control".into())
            .spawn(move || control::serve(listener, path, c, st))?
    };

    if a.bench_no_crypto {
        eprintln!("espd run: WARNING: --bench-no-crypto: ESP without encryption or integrity, for benchmarks only");
    }
    // What startup allocated and freed (the XDP object parsed, the
    // configuration checked) goes back to the system now (see `heap`).
    heap::give_back();
    let tty = !a.quiet && std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut last = Instant::now();
    let mut stats_every = Duration::from_secs(1);
    let mut last_seq = Instant::now();
    let mut failed = None;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if a.seconds
            .is_some_and(|s| start.elapsed() >= Duration::from_secs(s))
        {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if let Some((q, _, _)) = handles.iter().find(|h| h.2.is_finished()) {
            failed = Some(*q);
            break;
        }
        if last_seq.elapsed() >= seqstore::PERIOD {
            last_seq = Instant::now();
            if let Err(e) = ctl.save_sequences(false) {
                eprintln!("espd run: {e:#}");
            }
        }
        // The counters walk every SA: only when someone reads them, and at
        // most 5 % of this thread's time (with 100 000 SAs a walk takes
        // about 0.1 s; it competes with the control thread for the cores).
        if (tty || a.stats_json.is_some()) && last.elapsed() >= stats_every {
            last = Instant::now();
            let s = ctl.counters();
            if tty {
                eprint!("\r\x1b[K{}", s.line());
            }
            if let Some(p) = &a.stats_json {
                let _ = s.write_json(p);
            }
            stats_every = Duration::from_secs(1).max(last.elapsed() * 20);
        }
    }
    // Host mode: the pair routes go before the workers stop, so the host's
    // protected traffic meets the `prohibit` routes (EACCES), not a pair
    // nobody reads.
    if let Ok(mut h) = ctl.host.lock() {
        if let Some(r) = h.as_mut() {
            if let Err(e) = r.withdraw() {
                eprintln!("espd run: host routes: {e:#}");
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut panicked = false;
    for (_, _, h) in handles {
        panicked |= h.join().is_err();
    }
    let _ = resolver.join();
    let _ = ctl_thread.join();
    let _ = events_thread.join();
    if let Some(t) = metrics_thread {
        let _ = t.join();
    }
    // Every worker has stopped: the numbers are final (a clean stop needs
    // no margin on the next start). A worker that died may have sent more
    // than it reported, so that stop is not clean.
    if let Err(e) = ctl.save_sequences(!panicked && failed.is_none()) {
        eprintln!("espd run: {e:#}");
    }
    let s = ctl.counters();
    if tty {
        eprint!("\r\x1b[K");
    }
    eprintln!("espd run: {}", s.line());
    if let Some(p) = &a.stats_json {
        s.write_json(p)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    drop(ctl);
    let steer = Arc::try_unwrap(steer)
        .map_err(|_| anyhow::anyhow!("steering still shared at exit"))?
        .into_inner()
        .map_err(|_| anyhow::anyhow!("steering lock poisoned"))?;
    steer.detach().context("detaching XDP")?;
    eprintln!(
        "espd run: detached from {} and {}; the guard stays (`espd down` lifts it)",
        inside, a.outside
    );
    if panicked || failed.is_some() {
        bail!("worker {} stopped unexpectedly", failed.unwrap_or(0));
    }
    Ok(())
}

/// Test-only fault injection (`ESPD_FAULT`), so the tests can make espd
/// fail where a real one might: `attach` fails the start before XDP is
/// attached; `worker-panic` panics a worker on its first packet;
/// `slow-worker` makes workers sleep 2 ms a turn (rings overrun).
pub(crate) fn fault(at: &str) -> Result<()> {
    if std::env::var("ESPD_FAULT").is_ok_and(|f| f == at) {
        bail!("ESPD_FAULT={at}: injected failure (tests only)");
    }
    Ok(())
}

pub struct Stats {
    /// Everything but the per-SA rows, which are written from `sas` as they
    /// are serialized: at 100 000 SAs a tree of JSON values for them took
    /// over 100 MiB while it lived (ctlbench saw it in RSS).
    head: serde_json::Map<String, serde_json::Value>,
    sas: SaRows,
    rx: u64,
    tx: u64,
    enc: u64,
    dec: u64,
    bytes: u64,
    per_worker: Vec<(u64, u64)>,
    drops: Vec<(DropReason, u64)>,
}

impl Stats {
    pub fn gather_final(
        snaps: &[Arc<Mutex<Snapshot>>],
        xdp_counts: Option<[u64; Counter::COUNT as usize]>,
        cfg: &Config,
        cores: &[(usize, usize)],
    ) -> Stats {
        let snaps: Vec<Snapshot> = snaps
            .iter()
            .map(|s| s.lock().map(|s| s.clone()).unwrap_or_default())
            .collect();
        let mut total = [0u64; DropReason::COUNT];
        // What the kernel lost on the way into the AF_XDP sockets is a loss
        // like any other: in the summary, under its own names.
        for s in &snaps {
            total[DropReason::XskRingFull as usize] +=
                s.ports.kernel_rx_ring_full.iter().sum::<u64>();
            total[DropReason::XskDropped as usize] += s.ports.kernel_rx_dropped.iter().sum::<u64>();
            total[DropReason::TxFailed as usize] += s.ports.tx_dropped.iter().sum::<u64>();
        }
        let (mut rx, mut tx, mut enc, mut dec) = (0, 0, 0, 0);
        let mut per_worker = Vec::new();
        let mut workers = Vec::new();
        for (i, s) in snaps.iter().enumerate() {
            let mut d = serde_json::Map::new();
            for r in DropReason::ALL {
                let n = s.engine.drops[*r as usize] + s.io_drops[*r as usize];
                total[*r as usize] += n;
                if n > 0 {
                    d.insert(r.name().into(), json!(n));
                }
            }
            let (wrx, wtx) = (
                s.ports.rx.iter().sum::<u64>(),
                s.ports.tx.iter().sum::<u64>(),
            );
            per_worker.push((wrx, wtx));
            rx += wrx;
            tx += wtx;
            enc += s.engine.encapsulated;
            dec += s.engine.decapsulated;
            workers.push(json!({
                "worker": i,
                "core": cores.iter().find(|c| c.0 == i).map(|c| c.1),
                "rx_inside": s.ports.rx[0], "rx_outside": s.ports.rx[1],
                "tx_inside": s.ports.tx[0], "tx_outside": s.ports.tx[1],
                "fill_inside": s.ports.in_fill[0], "fill_outside": s.ports.in_fill[1],
                // The host pair beside an inside interface (--inside with --host).
                "rx_host": s.ports.rx[2], "tx_host": s.ports.tx[2],
                "free_frames": s.ports.free,
                "tx_ring_full": s.ports.tx_full.iter().sum::<u64>(),
                "kernel_rx_dropped_inside": s.ports.kernel_rx_dropped[0],
                "kernel_rx_dropped_outside": s.ports.kernel_rx_dropped[1],
                "kernel_rx_dropped_host": s.ports.kernel_rx_dropped[2],
                "kernel_rx_ring_full": s.ports.kernel_rx_ring_full.iter().sum::<u64>(),
                "kernel_fill_ring_empty": s.ports.kernel_fill_empty.iter().sum::<u64>(),
                "kernel_tx_invalid": s.ports.kernel_tx_invalid.iter().sum::<u64>(),
                "encapsulated": s.engine.encapsulated,
                "decapsulated": s.engine.decapsulated,
                "bypass": s.engine.bypass,
                "icmp_sent": s.engine.icmp_sent,
                "handed_off": s.engine.handed_off,
                "checksums_completed": s.csum_fixed,
                "prefragmented": s.prefragmented,
                "hairpinned": s.hairpinned,
                "prefragments": s.prefragments,
                "fragmented": s.fragmented, "fragments": s.fragments,
                "own_reassembled": s.own_reassembled,
                "reassembled": s.reassembled, "reassembly_peak": s.reassembly_peak,
                "busy_turns": s.busy_turns, "turns": s.turns,
                "max_turn_ns": s.max_turn_ns, "max_turn_recent_ns": s.max_turn_recent_ns,
                "tables_taken": s.tables_taken,
                "turns_over_50us": s.turn_hist[worker::TURN_BUCKETS.partition_point(|b| *b <= 50_000)..].iter().sum::<u64>(),
                "turn_hist": s.turn_hist.to_vec(),
                "drops": d,
            }));
        }
        // Drops made in XDP belong in the same summary (under the engine's
        // names for them): an operator reads one list.
        if let Some(c) = &xdp_counts {
            for (k, r) in [
                (Counter::UnprotectedInbound, DropReason::UnprotectedInbound),
                (Counter::OwnEsp, DropReason::OwnEsp),
                (Counter::NoSocket, DropReason::NoSocket),
                (Counter::InsideNoSocket, DropReason::NoSocket),
            ] {
                total[r as usize] += c[k as usize];
            }
        }
        let mut drops_json = serde_json::Map::new();
        for r in DropReason::ALL {
            drops_json.insert(r.name().into(), json!(total[*r as usize]));
        }
        let sas = SaRows {
            cfg: cfg.clone(),
            snaps,
        };
        let bytes = sas.rows().map(|r| r.bytes).sum();
        let xdp: serde_json::Map<String, serde_json::Value> = match xdp_counts {
            Some(c) => Counter::ALL
                .iter()
                .map(|k| (k.name().to_string(), json!(c[*k as usize])))
                .collect(),
            None => serde_json::Map::new(),
        };
        let drops: Vec<(DropReason, u64)> = DropReason::ALL
            .iter()
            .filter(|r| total[**r as usize] > 0)
            .map(|r| (*r, total[*r as usize]))
            .collect();
        let head = match json!({
            "rx": rx, "tx": tx, "encapsulated": enc, "decapsulated": dec,
            "drops": drops_json, "workers": workers, "xdp": xdp,
        }) {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("an object"),
        };
        Stats {
            head,
            sas,
            rx,
            tx,
            enc,
            dec,
            bytes,
            per_worker,
            drops,
        }
    }

    /// The whole document as a JSON value (for `espctl stats` and the
    /// metrics page, on request).
    #[cfg(test)]
    pub fn json(&self) -> serde_json::Value {
        serde_json::to_value(self.doc()).unwrap_or_default()
    }

    /// Writes the whole document to `path`, as `serde_json` pretty-prints a
    /// value (the same text), the per-SA rows streamed.
    pub fn write_json(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
        serde_json::to_writer_pretty(&mut w, &self.doc())?;
        w.write_all(b"\n")?;
        w.flush()
    }

    /// The control socket's answer to `stats` with this request `id` and
    /// protocol version `v`: the text `serde_json` gives the answer as a
    /// value (`{"id":…,"ok":true,"stats":…,"v":…}`), the per-SA rows
    /// streamed.
    pub fn answer(&self, id: Option<&serde_json::Value>, v: u64) -> String {
        serde_json::to_string(&StatsAnswer {
            id,
            stats: self.doc(),
            v,
        })
        .unwrap_or_default()
    }

    fn doc(&self) -> StatsDoc<'_> {
        StatsDoc {
            head: &self.head,
            sas: &self.sas,
        }
    }

    fn line(&self) -> String {
        let mut s = format!(
            "rx {} tx {} encapsulated {} decapsulated {} ({:.1} MB through SAs)",
            self.rx,
            self.tx,
            self.enc,
            self.dec,
            self.bytes as f64 / 1e6
        );
        if self.per_worker.len() > 1 {
            let w: Vec<String> = self
                .per_worker
                .iter()
                .enumerate()
                .map(|(i, (r, t))| format!("w{i} {r}/{t}"))
                .collect();
            s.push_str(&format!(" [rx/tx {}]", w.join(" ")));
        }
        if !self.drops.is_empty() {
            let d: Vec<String> = self
                .drops
                .iter()
                .map(|(r, n)| format!("{} {n}", r.name()))
                .collect();
            s.push_str(&format!(" drops: {}", d.join(", ")));
        }
        s
    }
}

/// The per-SA rows of [`Stats`], made as they are serialized.
struct SaRows {
    cfg: Config,
    snaps: Vec<Snapshot>,
}

/// One SA's row: its fields in the order a `serde_json` object (sorted
/// keys) gives them, so the text is what it was when rows were values.
#[derive(serde::Serialize)]
struct SaRow {
    bytes: u64,
    drops: std::collections::BTreeMap<&'static str, u64>,
    dst: IpAddr,
    oseq: u64,
    packets: u64,
    spi: String,
    src: IpAddr,
}

impl SaRows {
    /// Every SA's row, its counters summed over the workers.
    fn rows(&self) -> impl Iterator<Item = SaRow> + '_ {
        self.cfg.sad.iter_ids().map(|(id, sa)| {
            let (mut packets, mut bytes, mut d) = (0, 0, [0u64; DropReason::COUNT]);
            let mut oseq = 0;
            for s in &self.snaps {
                if let Some(st) = s.sa.get(&id) {
                    packets += st.packets;
                    bytes += st.bytes;
                    for (x, y) in d.iter_mut().zip(st.drops.iter()) {
                        *x += y;
                    }
                    oseq = oseq.max(st.oseq);
                }
            }
            SaRow {
                bytes,
                drops: DropReason::ALL
                    .iter()
                    .filter(|r| d[**r as usize] > 0)
                    .map(|r| (r.name(), d[*r as usize]))
                    .collect(),
                dst: sa.cfg.dst,
                oseq,
                packets,
                spi: format!("0x{:08x}", sa.cfg.spi),
                src: sa.cfg.src,
            }
        })
    }
}

impl serde::Serialize for SaRows {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.rows())
    }
}

/// The answer to `stats`, keys in sorted order as a value's.
struct StatsAnswer<'a> {
    id: Option<&'a serde_json::Value>,
    stats: StatsDoc<'a>,
    v: u64,
}

impl serde::Serialize for StatsAnswer<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        if let Some(id) = self.id {
            m.serialize_entry("id", id)?;
        }
        m.serialize_entry("ok", &true)?;
        m.serialize_entry("stats", &self.stats)?;
        m.serialize_entry("v", &self.v)?;
        m.end()
    }
}

/// [`Stats`] as one JSON object, keys in sorted order as before.
struct StatsDoc<'a> {
    head: &'a serde_json::Map<String, serde_json::Value>,
    sas: &'a SaRows,
}

impl serde::Serialize for StatsDoc<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.head.len() + 1))?;
        let mut sas = Some(self.sas);
        for (k, v) in self.head {
            if k.as_str() > "sas" {
                if let Some(rows) = sas.take() {
                    m.serialize_entry("sas", rows)?;
                }
            }
            m.serialize_entry(k, v)?;
        }
        if let Some(rows) = sas {
            m.serialize_entry("sas", rows)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stats document written with the per-SA rows streamed is the
    /// text a JSON value of it pretty-prints to, rows as they were built
    /// before (objects of strings and numbers).
    #[test]
    fn streamed_stats_are_the_text_of_the_value() {
        let cfg = Config::parse(
            "t.conf",
            "state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x100 reqid 1 mode tunnel aead 'rfc4106(gcm(aes))' 0x1111111111111111111111111111111111111111 128\n\
             state add src 2001:db8::1 dst 2001:db8::2 proto esp spi 0x200 reqid 2 mode tunnel aead 'rfc4106(gcm(aes))' 0x1111111111111111111111111111111111111111 128\n",
        )
        .unwrap();
        let mut snap = Snapshot::default();
        let mut st = worker::SaStat {
            packets: 7,
            bytes: 700,
            drops: Default::default(),
            oseq: 9,
        };
        st.drops[DropReason::Replay as usize] = 3;
        snap.sa.insert(0, st);
        let s = Stats::gather_final(&[Arc::new(Mutex::new(snap))], None, &cfg, &[]);
        let v = s.json();
        assert_eq!(
            v["sas"],
            json!([
                {"bytes": 700, "drops": {DropReason::Replay.name(): 3}, "dst": "198.18.0.2",
                 "oseq": 9, "packets": 7, "spi": "0x00000100", "src": "198.18.0.1"},
                {"bytes": 0, "drops": {}, "dst": "2001:db8::2",
                 "oseq": 0, "packets": 0, "spi": "0x00000200", "src": "2001:db8::1"},
            ])
        );
        assert_eq!(s.bytes, 700);
        let p = std::env::temp_dir().join(format!("espd-stats-{}.json", std::process::id()));
        s.write_json(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        assert_eq!(text, serde_json::to_string_pretty(&v).unwrap() + "\n");
        // Keys in sorted order, "sas" among them as before.
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
        // The control socket's answer: the text of the answer as a value,
        // with and without an id.
        assert_eq!(
            s.answer(Some(&json!(7)), 2),
            json!({"id": 7, "ok": true, "stats": v, "v": 2}).to_string()
        );
        assert_eq!(
            s.answer(None, 1),
            json!({"ok": true, "stats": v, "v": 1}).to_string()
        );
        // The metrics page: every SA's counters, and the totals.
        let page = metrics::render(&s);
        for line in [
            "espd_sa_packets_total{spi=\"0x00000100\",src=\"198.18.0.1\",dst=\"198.18.0.2\"} 7",
            "espd_sa_bytes_total{spi=\"0x00000100\",src=\"198.18.0.1\",dst=\"198.18.0.2\"} 700",
            "espd_sa_packets_total{spi=\"0x00000200\",src=\"2001:db8::1\",dst=\"2001:db8::2\"} 0",
            "espd_sa_bytes_total{spi=\"0x00000200\",src=\"2001:db8::1\",dst=\"2001:db8::2\"} 0",
            "espd_esp_total{operation=\"encapsulated\"} 0",
            "# TYPE espd_sa_packets_total counter",
        ] {
            assert!(page.lines().any(|l| l == line), "{line} not in\n{page}");
        }
        assert_eq!(page.matches("espd_sa_packets_total{").count(), 2);
    }

    fn sels(text: &str) -> Vec<(IpAddr, u8, SelAction)> {
        inside_selectors(&Config::parse("t.conf", text).unwrap())
    }

    #[test]
    fn protect_prefixes_are_steered_and_lone_discards_dropped() {
        let t = "policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out priority 100 tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel
policy add src 198.18.1.0/24 dst 198.18.2.21/32 proto icmp dir out priority 10 action block
policy add src 0.0.0.0/0 dst 198.18.3.0/24 dir out action block
policy add src 198.18.1.0/24 dst 198.18.4.0/24 dir out action block
policy add src 198.18.1.0/24 dst 198.18.5.0/24 dir out
policy add src 2001:db8:1::/64 dst 2001:db8:2::/64 dir out tmpl src 2001:db8::1 dst 2001:db8::2 proto esp reqid 3 mode tunnel
";
        let s = sels(t);
        let get = |a: &str, l: u8| {
            s.iter()
                .find(|x| x.0 == a.parse::<IpAddr>().unwrap() && x.1 == l)
                .map(|x| x.2)
        };
        assert_eq!(get("198.18.2.0", 24), Some(SelAction::Steer));
        // Inside a PROTECT prefix, or with a source: the engine decides.
        assert_eq!(get("198.18.2.21", 32), Some(SelAction::Steer));
        assert_eq!(get("198.18.4.0", 24), Some(SelAction::Steer));
        // Any source, any protocol, nothing overlapping: dropped in XDP.
        assert_eq!(get("198.18.3.0", 24), Some(SelAction::Drop));
        // BYPASS policies are not steered.
        assert_eq!(get("198.18.5.0", 24), None);
        assert_eq!(get("2001:db8:2::", 64), Some(SelAction::Steer));
        assert_eq!(s.len(), 5);
    }

    #[test]
    fn every_queue_of_both_interfaces_gets_a_worker() {
        let i = ["i1", "o1"];
        assert_eq!(serving_plan(&i, [1, 2], None).unwrap(), 2);
        assert_eq!(serving_plan(&i, [4, 2], None).unwrap(), 4);
        assert_eq!(serving_plan(&i, [2, 2], Some(2)).unwrap(), 2);
        let e = serving_plan(&i, [1, 2], Some(1)).unwrap_err().to_string();
        assert!(
            e.contains("RX queue 1 of o1 unserved") && e.contains("ethtool -L o1 combined 1"),
            "{e}"
        );
        let e = serving_plan(&i, [1, 1], Some(2)).unwrap_err().to_string();
        assert!(e.contains("nothing for more than 1"), "{e}");
        assert!(serving_plan(&i, [1, 1], Some(0)).is_err());
    }

    #[test]
    fn default_block_steers_everything() {
        let s = sels("policy setdefault out block\n");
        assert_eq!(s.len(), 2);
        assert!(s.iter().all(|x| x.1 == 0 && x.2 == SelAction::Steer));
    }
}
