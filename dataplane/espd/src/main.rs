//! `espd`: the IPsec ESP data plane.
//!
//! `espd pcap` runs every packet of a capture through the same engine the
//! gateway uses, so correctness can be proven against scapy and tshark
//! without any kernel I/O.

mod pcap;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::net::IpAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "espd", version, about = "IPsec ESP data plane")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a capture through the ESP engine: decapsulate ESP for known states,
    /// encapsulate what outbound policies protect, pass what they allow, drop the rest.
    Pcap {
        /// Configuration in `ip xfrm` syntax (see docs/config.md).
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// Input capture: classic pcap or pcapng; link types Ethernet, RAW, IPv4, IPv6.
        #[arg(long = "in", short = 'i')]
        input: PathBuf,
        /// Output capture, in the input's format and link type.
        #[arg(long = "out", short = 'o')]
        output: PathBuf,
        /// Write counters per verdict, drop reason and SA as JSON here.
        #[arg(long)]
        stats_json: Option<PathBuf>,
        /// An address of this host (repeatable), besides those the policies
        /// imply (tmpl src of `out`, tmpl dst of `in`/`fwd` policies).
        #[arg(long = "local")]
        local: Vec<IpAddr>,
        /// No progress line.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let r: Result<()> = match cli.cmd {
        Cmd::Pcap {
            config,
            input,
            output,
            stats_json,
            local,
            quiet,
        } => pcap::run(&pcap::Args {
            config,
            input,
            output,
            stats_json,
            local,
            quiet,
        }),
    };
    if let Err(e) = r {
        eprintln!("espd: {e:#}");
        std::process::exit(1);
    }
}
