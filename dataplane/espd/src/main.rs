//! `espd`: the IPsec ESP data plane.
//!
//! `espd pcap` runs every packet of a capture through the same engine the
//! gateway uses, so correctness can be proven against scapy and tshark
//! without any kernel I/O.

/// The allocator: see docs/performance.md (the control plane at scale).
#[global_allocator]
static ALLOC: gateway::heap::Alloc = gateway::heap::Alloc;

mod bench;
mod gateway;
mod pcap;
mod steer;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "espd", version, about = "IPsec ESP data plane")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Keep transparent huge pages for espd's own memory. Without it espd
    /// takes 4 KiB pages: a 2 MiB page fault stalls the thread that takes it
    /// while the kernel zeroes the page (and, in a VM, while the host backs
    /// it), which held up control changes and workers (docs/performance.md)
    #[arg(long, global = true)]
    thp: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a capture through the ESP engine: decapsulate ESP for known states,
    /// encapsulate what outbound policies protect, pass what they allow, drop the rest.
    Pcap(pcap::Args),
    /// Diagnostic: attach only the outside XDP program, with the maps the
    /// gateway would give it, and report what it steers, drops and passes to
    /// the kernel (no workers: steered frames fall back to the kernel unless
    /// --xsk takes them). Detaches on SIGINT/SIGTERM.
    Steer(steer::Args),
    /// In-memory benchmark: a generator feeds encapsulation and then
    /// decapsulation through the gateway's engine, one pinned worker per core;
    /// reports packets/s, Gbit/s, latency percentiles and, measured in the
    /// same run, the raw seal+open rate of the same cipher and the ratio.
    Bench(bench::Args),
    /// The gateway: XDP steering on the inside and outside interfaces,
    /// AF_XDP sockets per queue, one pinned worker per queue pair running the
    /// ESP engine, next hops from the kernel's routing and neighbour tables.
    /// Live counters on a TTY; detaches cleanly on SIGINT/SIGTERM.
    Run(gateway::Args),
    /// Lifts the fail-closed guard that `espd run` leaves in the kernel (its
    /// XFRM policies: what the policies protect is dropped while espd is not
    /// running): afterwards this host forwards that traffic as a plain
    /// router would — in clear. Refused while espd runs here.
    Down(gateway::DownArgs),
}

/// A flag set by SIGINT or SIGTERM, for the long-running commands.
fn stop_on_signals() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use anyhow::Context;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, std::sync::Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    Ok(stop)
}

/// Native (driver) XDP, or generic with `--skb-mode`.
fn xdp_mode(skb: bool) -> aya::programs::XdpMode {
    if skb {
        aya::programs::XdpMode::Skb
    } else {
        aya::programs::XdpMode::Driver
    }
}

fn main() {
    let cli = Cli::parse();
    if !cli.thp {
        gateway::heap::small_pages();
    }
    let r: Result<()> = match cli.cmd {
        Cmd::Pcap(a) => pcap::run(&a),
        Cmd::Steer(a) => steer::run(&a),
        Cmd::Bench(a) => bench::run(&a),
        Cmd::Run(a) => gateway::run(&a),
        Cmd::Down(a) => gateway::down(&a),
    };
    if let Err(e) = r {
        eprintln!("espd: {e:#}");
        std::process::exit(1);
    }
}
