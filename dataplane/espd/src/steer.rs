//! `espd steer`: the XDP steering program alone, for checking a box's
//! steering before the gateway runs on it.

use anyhow::{bail, Context, Result};
use espd_config::Config;
use espd_io::steer::Steering;
use espd_io::xsk::XskPort;
use espd_io::Counter;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Configuration in `ip xfrm` syntax: its states' SPIs and `encap` ports are steered.
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// The outside interface (where ESP arrives).
    #[arg(long)]
    pub outside: String,
    /// Generic (SKB) XDP instead of native driver XDP.
    #[arg(long)]
    pub skb_mode: bool,
    /// Stop after this many seconds (default: run until SIGINT/SIGTERM).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Write the counters as JSON here on exit.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// Bind an AF_XDP socket on every RX queue and take the steered frames
    /// into user space, counting them (they are consumed, not forwarded: the
    /// gateway does that). Copy mode (veth has no zero-copy) unless --zero-copy.
    #[arg(long)]
    pub xsk: bool,
    /// With --xsk: let the kernel use zero-copy where the driver supports it.
    #[arg(long, requires = "xsk")]
    pub zero_copy: bool,
}

pub fn run(a: &Args) -> Result<()> {
    let cfg = Config::load(&a.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let spis: Vec<u32> = cfg.sad.iter().map(|sa| sa.cfg.spi).collect();
    let mut ports: Vec<u16> = cfg
        .sad
        .iter()
        .filter_map(|sa| sa.cfg.encap)
        .map(|e| e.dport)
        .collect();
    ports.sort();
    ports.dedup();

    let stop = crate::stop_on_signals()?;
    let mode = crate::xdp_mode(a.skb_mode);
    let mut s = match Steering::attach(&a.outside, mode) {
        Ok(s) => s,
        Err(e) if e.is_permission() => bail!(
            "attaching XDP to {} was refused: espd needs CAP_BPF, CAP_NET_ADMIN and CAP_NET_RAW (run it as root): {e}",
            a.outside
        ),
        Err(e) => return Err(e).with_context(|| format!("attaching XDP to {}", a.outside)),
    };
    // The same maps as the gateway's (SPIs by direction, our addresses,
    // inbound and outbound prefixes), so what this shows is what it does.
    let host = espd_io::netlink::local_addrs(None).context("reading this host's addresses")?;
    let tables = cfg.tables(&host);
    let mut maps = crate::gateway::mirror::Maps::default();
    maps.apply(&crate::gateway::mirror::everything(&tables), &tables)
        .add(&mut s)?;
    eprintln!(
        "espd steer: attached to {} ({} mode), {} SPIs, encap ports {:?}",
        a.outside,
        if a.skb_mode { "generic" } else { "native" },
        spis.len(),
        ports
    );
    let mut ports = Vec::new();
    if a.xsk {
        for q in 0..espd_io::xsk::rx_queues(&a.outside) {
            let p = XskPort::bind(&a.outside, q, espd_io::xsk::DEFAULT_FRAMES, !a.zero_copy)?;
            s.set_socket(q, p.fd())?;
            ports.push(p);
        }
        eprintln!("espd steer: AF_XDP sockets on {} RX queue(s)", ports.len());
    }
    let known: std::collections::HashSet<u32> = spis.iter().copied().collect();
    let encap = ports_of(&cfg);
    let (mut received, mut unexpected) = (0u64, 0u64);
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed)
        && a.seconds
            .is_none_or(|n| start.elapsed() < Duration::from_secs(n))
    {
        if ports.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
        for p in &mut ports {
            p.recv(50, |frame| {
                received += 1;
                if !spi_of(frame, &encap).is_some_and(|spi| known.contains(&spi)) {
                    unexpected += 1;
                }
            })?;
        }
        if tty && last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            eprint!("\r{}", line(&s.counters()?));
        }
    }
    let c = s.counters()?;
    if tty {
        eprint!("\r");
    }
    eprintln!("espd steer: {}", line(&c));
    if a.xsk {
        eprintln!("espd steer: AF_XDP received {received} frames, {unexpected} not ESP for a configured SPI");
    }
    if let Some(p) = &a.stats_json {
        let mut m: serde_json::Map<String, serde_json::Value> = Counter::ALL
            .iter()
            .map(|k| (k.name().to_string(), c[*k as usize].into()))
            .collect();
        if a.xsk {
            m.insert("xsk_received".into(), received.into());
            m.insert("xsk_unexpected".into(), unexpected.into());
        }
        std::fs::write(p, serde_json::to_string_pretty(&m)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    drop(ports);
    s.detach().context("detaching XDP")?;
    eprintln!("espd steer: detached from {}", a.outside);
    Ok(())
}

fn ports_of(cfg: &Config) -> Vec<u16> {
    cfg.sad
        .iter()
        .filter_map(|sa| sa.cfg.encap)
        .map(|e| e.dport)
        .collect()
}

/// The SPI of an Ethernet frame carrying ESP or ESP-in-UDP on `encap` ports.
fn spi_of(frame: &[u8], encap: &[u16]) -> Option<u32> {
    use espd_core::engine::parse_ip;
    use espd_core::wire::{ethernet::Frame, proto};
    let f = Frame::new_checked(frame).ok()?;
    let ip = f.payload();
    let (l3, flow, _) = parse_ip(ip).ok()?;
    let at = match l3.proto {
        proto::ESP => l3.upper_at,
        proto::UDP if flow.ports.is_some_and(|p| encap.contains(&p.dport)) => l3.upper_at + 8,
        _ => return None,
    };
    Some(u32::from_be_bytes(ip.get(at..at + 4)?.try_into().ok()?))
}

fn line(c: &[u64]) -> String {
    Counter::ALL
        .iter()
        .map(|k| format!("{} {}", k.name(), c[*k as usize]))
        .collect::<Vec<_>>()
        .join(", ")
}
