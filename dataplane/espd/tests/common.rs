//! Packet builders shared by the integration tests.
#![allow(dead_code)]

use espd_core::engine::{Engine, Verdict};
use espd_core::wire::{ipv4, proto};
use espd_core::PacketBuf;
use std::net::Ipv4Addr;

/// An IPv4 packet with a correct header checksum. `l4` is the upper layer.
pub fn ipv4(src: &str, dst: &str, protocol: u8, tos: u8, l4: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + l4.len()];
    b[20..].copy_from_slice(l4);
    let mut p = ipv4::Packet::new_unchecked(&mut b[..]);
    p.set_version_header_len(20);
    p.set_tos(tos);
    p.set_total_len((20 + l4.len()) as u16);
    p.set_ident(0x4242);
    p.set_flags_frag(ipv4::FLAG_DF);
    p.set_ttl(61);
    p.set_protocol(protocol);
    p.set_src_addr(src.parse::<Ipv4Addr>().unwrap());
    p.set_dst_addr(dst.parse::<Ipv4Addr>().unwrap());
    p.fill_checksum();
    b
}

/// UDP header (checksum 0: allowed for IPv4) and payload.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + payload.len());
    b.extend_from_slice(&sport.to_be_bytes());
    b.extend_from_slice(&dport.to_be_bytes());
    b.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(payload);
    b
}

pub fn tcp(sport: u16, dport: u16) -> Vec<u8> {
    let mut b = vec![0u8; 20];
    b[..2].copy_from_slice(&sport.to_be_bytes());
    b[2..4].copy_from_slice(&dport.to_be_bytes());
    b[12] = 0x50;
    b[13] = 0x02;
    b
}

pub fn icmp_echo() -> Vec<u8> {
    vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0]
}

pub fn udp4(src: &str, dst: &str, dport: u16) -> Vec<u8> {
    ipv4(src, dst, proto::UDP, 0, &udp(40000, dport, b"payload"))
}

/// An IPv6/UDP packet (hop limit 61) with a correct UDP checksum.
pub fn udp6(src: &str, dst: &str, dport: u16) -> Vec<u8> {
    let (s, d): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
        (src.parse().unwrap(), dst.parse().unwrap());
    let mut l4 = udp(40000, dport, b"payload");
    let c = espd_core::wire::udp::checksum_v6(&s.octets(), &d.octets(), &l4);
    l4[6..8].copy_from_slice(&c.to_be_bytes());
    let mut b = vec![0x60, 0, 0, 0];
    b.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    b.extend_from_slice(&[proto::UDP, 61]);
    b.extend_from_slice(&s.octets());
    b.extend_from_slice(&d.octets());
    b.extend_from_slice(&l4);
    b
}

/// A tiny deterministic PRNG (xorshift64*), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Runs one IP packet through an engine (256 octets of room on each side):
/// the verdict and what the buffer holds afterwards.
pub fn run(e: &mut Engine, pkt: &[u8]) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; 256 + pkt.len() + 256];
    buf[256..256 + pkt.len()].copy_from_slice(pkt);
    let mut p = PacketBuf::new(&mut buf, 256, pkt.len());
    let v = e.process(&mut p);
    (v, p.data().to_vec())
}

/// Links two workers' engines as the gateway links them: one set of
/// tables (each SA once, with its shared counter and owner), workers 0 and 1.
pub fn link_workers(e0: &mut Engine, e1: &mut Engine) {
    e1.set_tables(e0.tables().clone());
    e0.set_shared(true);
    e1.set_shared(true);
    e0.set_worker(0);
    e1.set_worker(1);
}

/// Applies a change to an engine's tables as the control side does: a
/// copy changed and published.
pub fn change(e: &mut Engine, f: impl FnOnce(&mut espd_core::state::Tables)) {
    let mut t = (**e.tables()).clone();
    f(&mut t);
    e.set_tables(std::sync::Arc::new(t));
}
