//! `espd steer`: the XDP steering program alone, for checking a box's
//! steering before the gateway runs on it.

use anyhow::{bail, Context, Result};
use aya::programs::XdpMode;
use espd_config::Config;
use espd_io::steer::Steering;
use espd_io::Counter;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    let mode = if a.skb_mode {
        XdpMode::Skb
    } else {
        XdpMode::Driver
    };
    let mut s = match Steering::attach(&a.outside, mode) {
        Ok(s) => s,
        Err(e) if e.is_permission() => bail!(
            "attaching XDP to {} was refused: espd needs CAP_BPF, CAP_NET_ADMIN and CAP_NET_RAW (run it as root): {e}",
            a.outside
        ),
        Err(e) => return Err(e).with_context(|| format!("attaching XDP to {}", a.outside)),
    };
    s.add_spis(spis.iter().copied())?;
    s.add_encap_ports(ports.iter().copied())?;
    eprintln!(
        "espd steer: attached to {} ({} mode), {} SPIs, encap ports {:?}",
        a.outside,
        if a.skb_mode { "generic" } else { "native" },
        spis.len(),
        ports
    );
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed)
        && a.seconds
            .is_none_or(|n| start.elapsed() < Duration::from_secs(n))
    {
        std::thread::sleep(Duration::from_millis(100));
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
    if let Some(p) = &a.stats_json {
        let m: serde_json::Map<String, serde_json::Value> = Counter::ALL
            .iter()
            .map(|k| (k.name().to_string(), c[*k as usize].into()))
            .collect();
        std::fs::write(p, serde_json::to_string_pretty(&m)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    s.detach().context("detaching XDP")?;
    eprintln!("espd steer: detached from {}", a.outside);
    Ok(())
}

fn line(c: &[u64]) -> String {
    Counter::ALL
        .iter()
        .map(|k| format!("{} {}", k.name(), c[*k as usize]))
        .collect::<Vec<_>>()
        .join(", ")
}
