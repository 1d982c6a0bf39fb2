//! Offline mode: capture in, engine, capture out.

use anyhow::{bail, Context, Result};
use espd_config::Config;
use espd_core::engine::{Counters, Engine, Verdict};
use espd_core::wire::ethernet::{self, Frame};
use espd_core::wire::frag;
use espd_core::{DropReason, PacketBuf};
use pcap_file::pcap::{PcapPacket, PcapReader, PcapWriter};
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::simple_packet::SimplePacketBlock;
use pcap_file::pcapng::{Block, PcapNgReader, PcapNgWriter};
use pcap_file::DataLink;
use serde_json::json;
use std::borrow::Cow;
use std::fs::File;
use std::io::{BufReader, BufWriter, IsTerminal, Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Configuration in `ip xfrm` syntax (see docs/config.md).
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// Input capture: classic pcap or pcapng; link types Ethernet, RAW, IPv4, IPv6.
    #[arg(long = "in", short = 'i')]
    pub input: PathBuf,
    /// Output capture, in the input's format and link type.
    #[arg(long = "out", short = 'o')]
    pub output: PathBuf,
    /// Write counters per verdict, drop reason and SA as JSON here.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// An address of this host (repeatable), besides those the policies
    /// imply (tmpl src of `out`, tmpl dst of `in`/`fwd` policies).
    #[arg(long = "local")]
    pub local: Vec<IpAddr>,
    /// No progress line.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Path MTU for encapsulated packets: larger ones are fragmented (IPv4
    /// without DF) or answered with ICMP "fragmentation needed"/"packet too
    /// big" (DF or IPv6). Default: no limit.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(576..))]
    pub mtu: Option<u16>,
    /// Send a NAT keepalive (RFC 3948 §4) on UDP-encapsulated outbound SAs
    /// after this many idle seconds of capture time; 0 = never.
    #[arg(long, default_value_t = 20, value_name = "SECS")]
    pub nat_keepalive: u64,
}

/// Room before and after each packet for headers and trailers.
const HEADROOM: usize = 128;
const TAILROOM: usize = 128;
const MAX_PACKET: usize = 65535 + 40;
/// Snap length written to the output: any IP packet fits.
const OUT_SNAPLEN: u32 = 262_144;

/// Link-layer outcomes the engine never sees.
#[derive(Default)]
struct LinkCounters {
    packets_in: u64,
    packets_out: u64,
    /// Frames that are not IPv4/IPv6 (ARP, LLDP, …): passed unchanged, as the
    /// gateway leaves them to the kernel.
    non_ip: u64,
    /// Packets of a link type this mode does not read: passed unchanged.
    other_link: u64,
    /// Results that the output link type cannot hold (an IPv6 outer header in
    /// a LINKTYPE_IPV4 capture): not written.
    unwritable: u64,
    /// NAT keepalives espd added to the output.
    keepalives_sent: u64,
    /// Outer packets fragmented to the MTU, and the fragments written.
    fragmented: u64,
    fragments: u64,
}

struct Run {
    engine: Engine,
    link: LinkCounters,
    buf: Vec<u8>,
    start: Instant,
    last_progress: Instant,
    progress: bool,
    keepalive_idle: u64,
    /// Frames to write for the current input frame, in order.
    pending: Vec<Vec<u8>>,
    /// IPv6 fragment identification for outer packets this run fragments.
    frag_id: u32,
    last_poll: u64,
}

impl Run {
    /// Processes one captured frame; returns the bytes to write, or `None` to drop.
    /// Advances the engine's clock to a capture timestamp and queues any NAT
    /// keepalives that fall due, framed like `data` (same L2 header).
    fn tick(&mut self, ts: Duration, linktype: DataLink, data: &[u8]) {
        let now = ts.as_secs();
        self.engine.set_time(now);
        if self.keepalive_idle == 0 || now == self.last_poll {
            return;
        }
        self.last_poll = now;
        let l2 = match linktype {
            DataLink::ETHERNET => Frame::new_checked(data).map_or(0, |f| f.header_len()),
            _ => 0,
        };
        let mut b = [0u8; 64];
        let mut out = Vec::new();
        self.engine
            .nat_keepalives(self.keepalive_idle, &mut b, |k| {
                let mut f = data[..l2].to_vec();
                if let (Ok(mut e), Some(t)) = (
                    Frame::new_checked(&mut f[..]),
                    ethernet::ethertype_for_version(k[0] >> 4),
                ) {
                    e.set_ethertype(t);
                }
                f.extend_from_slice(k);
                out.push(f);
            });
        self.link.keepalives_sent += out.len() as u64;
        for f in out {
            self.emit(f);
        }
    }

    /// Processes one captured frame; what is to be written goes to `pending`.
    fn frame(&mut self, linktype: DataLink, data: &[u8]) {
        self.link.packets_in += 1;
        self.maybe_progress();
        let (l2_len, ip_only) = match linktype {
            DataLink::ETHERNET => match Frame::new_checked(data) {
                Err(_) => {
                    self.engine.count_drop(DropReason::Runt);
                    return;
                }
                Ok(f) => match f.ethertype() {
                    ethernet::ETHERTYPE_IPV4 | ethernet::ETHERTYPE_IPV6 => (f.header_len(), None),
                    _ => {
                        self.link.non_ip += 1;
                        return self.emit(data.to_vec());
                    }
                },
            },
            DataLink::RAW => (0, None),
            DataLink::IPV4 => (0, Some(4u8)),
            DataLink::IPV6 => (0, Some(6u8)),
            _ => {
                self.link.other_link += 1;
                return self.emit(data.to_vec());
            }
        };
        let ip = &data[l2_len..];
        if ip.len() > MAX_PACKET {
            self.engine.count_drop(DropReason::TooBig);
            return;
        }
        self.buf[HEADROOM..HEADROOM + ip.len()].copy_from_slice(ip);
        let mut pkt = PacketBuf::new(&mut self.buf, HEADROOM, ip.len());
        let v = self.engine.process(&mut pkt);
        let (s, n) = (pkt.start(), pkt.len());
        let reply = match v {
            // One engine owns every SA here: no handoff ever happens.
            Verdict::Drop(_) | Verdict::Dummy(_) | Verdict::Keepalive | Verdict::Handoff(_) => {
                return
            }
            Verdict::Icmp(_) => true,
            Verdict::Encapsulated(_) | Verdict::Decapsulated(_) | Verdict::Bypass => false,
        };
        let out = self.buf[s..s + n].to_vec();
        let version = out.first().map_or(0, |b| b >> 4);
        if ip_only.is_some_and(|v| v != version) {
            self.link.unwritable += 1;
            return;
        }
        // Keep the Ethernet addresses (swapped for an ICMP error, which goes
        // back to the sender); the EtherType follows the new IP header.
        let mut l2 = data[..l2_len].to_vec();
        if let Ok(mut f) = Frame::new_checked(&mut l2[..]) {
            if let Some(t) = ethernet::ethertype_for_version(version) {
                f.set_ethertype(t);
            }
            if reply {
                let (d, sr) = (f.dst_addr(), f.src_addr());
                f.set_addrs(sr, d);
            }
        }
        let mtu = self.engine.mtu().unwrap_or(usize::MAX);
        if matches!(v, Verdict::Encapsulated(_)) && out.len() > mtu {
            self.fragment(&l2, &out, mtu);
        } else {
            let mut f = l2;
            f.extend_from_slice(&out);
            self.emit(f);
        }
    }

    /// Fragments an outer packet that exceeds the MTU (the engine encapsulated
    /// it because the inner packet allowed fragmentation).
    fn fragment(&mut self, l2: &[u8], pkt: &[u8], mtu: usize) {
        let mut scratch = vec![0u8; mtu];
        let mut frags = Vec::new();
        let r = if pkt[0] >> 4 == 4 {
            frag::ipv4(pkt, mtu, &mut scratch, |f| frags.push(f.to_vec()))
        } else {
            self.frag_id = self.frag_id.wrapping_add(1);
            frag::ipv6(pkt, mtu, self.frag_id, &mut scratch, |f| {
                frags.push(f.to_vec())
            })
        };
        if r.is_err() {
            self.engine.count_drop(DropReason::TooBig);
            return;
        }
        self.link.fragmented += 1;
        self.link.fragments += frags.len() as u64;
        for f in frags {
            let mut out = l2.to_vec();
            out.extend_from_slice(&f);
            self.emit(out);
        }
    }

    fn emit(&mut self, frame: Vec<u8>) {
        self.link.packets_out += 1;
        self.pending.push(frame);
    }

    fn maybe_progress(&mut self) {
        if self.progress && self.link.packets_in.is_multiple_of(4096) {
            let now = Instant::now();
            if now.duration_since(self.last_progress) >= Duration::from_secs(1) {
                self.last_progress = now;
                eprint!("\r{}", self.line());
            }
        }
    }

    fn line(&self) -> String {
        let c: &Counters = self.engine.counters();
        let t = self.start.elapsed().as_secs_f64();
        let mut s = format!(
            "{} packets in {:.2} s: {} encapsulated, {} decapsulated, {} bypass, {} dummy, {} dropped",
            self.link.packets_in,
            t,
            c.encapsulated,
            c.decapsulated,
            c.bypass + self.link.non_ip + self.link.other_link,
            c.dummy,
            c.dropped + self.link.unwritable,
        );
        let reasons: Vec<String> = DropReason::ALL
            .iter()
            .filter(|r| c.drops[**r as usize] > 0)
            .map(|r| format!("{} {}", r.name(), c.drops[*r as usize]))
            .collect();
        if !reasons.is_empty() {
            s.push_str(&format!(" ({})", reasons.join(", ")));
        }
        if c.keepalive + c.ike + self.link.keepalives_sent > 0 {
            s.push_str(&format!(
                "; NAT-T: {} keepalives received, {} IKE passed, {} keepalives sent",
                c.keepalive, c.ike, self.link.keepalives_sent
            ));
        }
        if self.link.unwritable > 0 {
            s.push_str(&format!(
                "; {} not writable in the output link type",
                self.link.unwritable
            ));
        }
        s
    }

    fn stats(&self) -> serde_json::Value {
        let c = self.engine.counters();
        let drops: serde_json::Map<String, serde_json::Value> = DropReason::ALL
            .iter()
            .map(|r| (r.name().to_string(), json!(c.drops[*r as usize])))
            .collect();
        let e = &self.engine;
        let sas: Vec<serde_json::Value> = e
            .tables()
            .sad()
            .iter_ids()
            .map(|(id, core)| {
                // An SA no packet used has its configured state.
                let fresh = espd_core::state::Sa::from_core(core.clone(), false);
                let sa = e.sa_state(id).unwrap_or(&fresh);
                let d: serde_json::Map<String, serde_json::Value> = DropReason::ALL
                    .iter()
                    .filter(|r| sa.counters().drops[**r as usize] > 0)
                    .map(|r| {
                        (
                            r.name().to_string(),
                            json!(sa.counters().drops[*r as usize]),
                        )
                    })
                    .collect();
                let cfg = sa.cfg();
                json!({
                    "spi": format!("0x{:08x}", cfg.spi),
                    "src": cfg.src.to_string(),
                    "dst": cfg.dst.to_string(),
                    "reqid": cfg.reqid,
                    "mode": cfg.mode.as_str(),
                    "packets": sa.counters().packets,
                    "bytes": sa.counters().bytes,
                    "oseq": sa.oseq(),
                    "replay_top": sa.replay().top(),
                    "exhausted": sa.exhausted(),
                    "drops": d,
                })
            })
            .collect();
        json!({
            "packets_in": self.link.packets_in,
            "packets_out": self.link.packets_out,
            "verdicts": {
                "encapsulated": c.encapsulated,
                "decapsulated": c.decapsulated,
                "bypass": c.bypass,
                "dummy": c.dummy,
                "keepalive": c.keepalive,
                "ike": c.ike,
                "keepalives_sent": self.link.keepalives_sent,
                "icmp_sent": c.icmp_sent,
                "fragmented": self.link.fragmented,
                "fragments": self.link.fragments,
                "dropped": c.dropped,
                "non_ip": self.link.non_ip,
                "other_link": self.link.other_link,
                "unwritable": self.link.unwritable,
            },
            "drops": drops,
            "sas": sas,
        })
    }
}

pub fn run(a: &Args) -> Result<()> {
    let cfg = Config::load(&a.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let engine = Engine::new(cfg.sad, cfg.spd, &a.local);
    let mut run = Run {
        engine,
        link: LinkCounters::default(),
        buf: vec![0u8; HEADROOM + MAX_PACKET + TAILROOM],
        start: Instant::now(),
        last_progress: Instant::now(),
        progress: !a.quiet && std::io::stderr().is_terminal(),
        keepalive_idle: a.nat_keepalive,
        pending: Vec::new(),
        frag_id: 0,
        last_poll: 0,
    };
    run.engine.set_mtu(a.mtu.map(usize::from));
    let mut f = BufReader::new(
        File::open(&a.input).with_context(|| format!("cannot open {}", a.input.display()))?,
    );
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .with_context(|| format!("{}: too short for a capture", a.input.display()))?;
    let f = BufReader::new(File::open(&a.input)?);
    let out = BufWriter::new(
        File::create(&a.output).with_context(|| format!("cannot create {}", a.output.display()))?,
    );
    match u32::from_le_bytes(magic) {
        0xa1b2_c3d4 | 0xd4c3_b2a1 | 0xa1b2_3c4d | 0x4d3c_b2a1 => classic(&mut run, f, out, a)?,
        0x0a0d_0d0a => pcapng(&mut run, f, out, a)?,
        _ => bail!("{}: not a pcap or pcapng capture", a.input.display()),
    }
    if run.progress {
        eprint!("\r");
    }
    eprintln!("espd pcap: {}", run.line());
    if let Some(p) = &a.stats_json {
        let s = serde_json::to_string_pretty(&run.stats())?;
        std::fs::write(p, s + "\n").with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

fn classic<R: Read, W: Write>(run: &mut Run, r: R, w: W, a: &Args) -> Result<()> {
    let mut rd =
        PcapReader::new(r).with_context(|| format!("{}: bad pcap header", a.input.display()))?;
    let mut hdr = rd.header();
    let linktype = hdr.datalink;
    check_linktype(linktype, a)?;
    hdr.snaplen = hdr.snaplen.max(OUT_SNAPLEN);
    let mut wr = PcapWriter::with_header(w, hdr)?;
    let mut n = 0u64;
    while let Some(p) = rd.next_packet() {
        n += 1;
        let p = p.with_context(|| format!("{}: packet {n} is unreadable", a.input.display()))?;
        run.tick(p.timestamp, linktype, &p.data);
        run.frame(linktype, &p.data);
        for k in std::mem::take(&mut run.pending) {
            wr.write_packet(&PcapPacket::new(p.timestamp, k.len() as u32, &k))?;
        }
    }
    wr.into_writer().flush()?;
    Ok(())
}

fn pcapng<R: Read, W: Write>(run: &mut Run, r: R, w: W, a: &Args) -> Result<()> {
    let mut rd = PcapNgReader::new(r)
        .with_context(|| format!("{}: bad pcapng header", a.input.display()))?;
    let mut wr = PcapNgWriter::with_section_header(w, rd.section().clone().into_owned())?;
    let mut n = 0u64;
    while let Some(b) = rd.next_block() {
        n += 1;
        let b = b.with_context(|| format!("{}: block {n} is unreadable", a.input.display()))?;
        match b {
            Block::EnhancedPacket(p) => {
                let lt = wr
                    .interfaces()
                    .get(p.interface_id as usize)
                    .map(|i| i.linktype)
                    .with_context(|| {
                        format!(
                            "{}: block {n} names an unknown interface",
                            a.input.display()
                        )
                    })?;
                run.tick(p.timestamp, lt, &p.data);
                run.frame(lt, &p.data);
                for k in std::mem::take(&mut run.pending) {
                    wr.write_pcapng_block(EnhancedPacketBlock {
                        interface_id: p.interface_id,
                        timestamp: p.timestamp,
                        original_len: k.len() as u32,
                        data: Cow::Borrowed(&k),
                        options: p.options.clone(),
                    })?;
                }
            }
            Block::SimplePacket(p) => {
                let lt = wr
                    .interfaces()
                    .first()
                    .map(|i| i.linktype)
                    .unwrap_or(DataLink::ETHERNET);
                run.frame(lt, &p.data);
                for k in std::mem::take(&mut run.pending) {
                    wr.write_pcapng_block(SimplePacketBlock {
                        original_len: k.len() as u32,
                        data: Cow::Borrowed(&k),
                    })?;
                }
            }
            Block::InterfaceDescription(mut i) => {
                check_linktype(i.linktype, a)?;
                i.snaplen = 0; // no limit
                wr.write_block(&Block::InterfaceDescription(i))?;
            }
            other => {
                wr.write_block(&other)?;
            }
        }
    }
    wr.into_inner().flush()?;
    Ok(())
}

fn check_linktype(l: DataLink, a: &Args) -> Result<()> {
    match l {
        DataLink::ETHERNET | DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => Ok(()),
        other => bail!(
            "{}: link type {:?} ({}) is not supported: use Ethernet (1), RAW (101), IPv4 (228) or IPv6 (229)",
            a.input.display(),
            other,
            u32::from(other)
        ),
    }
}
