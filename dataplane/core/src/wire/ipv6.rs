//! IPv6 header view (RFC 8200) and the extension-header walk.

use super::{proto, Error, Result};
use core::net::Ipv6Addr;

pub const HEADER_LEN: usize = 40;
/// Most extension headers a packet may carry before we call it malformed.
const MAX_EXT_HEADERS: usize = 12;

mod field {
    use core::ops::Range;
    pub const VER_TC_FLOW: Range<usize> = 0..4;
    pub const LENGTH: Range<usize> = 4..6;
    pub const NXT_HDR: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: Range<usize> = 8..24;
    pub const DST: Range<usize> = 24..40;
}

/// A view of an IPv6 packet. The buffer may be longer than the packet.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

/// Where the extension-header chain ends, found by [`Packet::walk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    /// The upper-layer protocol (or ESP/AH/59), after all extension headers.
    pub upper: u8,
    /// Offset of the upper-layer header from the start of the IPv6 header.
    pub upper_at: usize,
    /// Offset of the octet that holds `upper` (6 if no extension header).
    pub upper_nh_at: usize,
    /// A fragment header was seen: (fragment offset in 8-octet units, more-fragments).
    pub fragment: Option<(u16, bool)>,
    /// RFC 4303 §3.1.1: where transport-mode ESP goes — after hop-by-hop,
    /// routing and fragment headers (and destination options before a routing
    /// header). Destination options after that are encrypted with the payload.
    pub esp_at: usize,
    /// Offset of the next-header octet that must name ESP when it is inserted at `esp_at`.
    pub esp_nh_at: usize,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Checks version 6 and that the payload length fits the buffer.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if b[0] >> 4 != 6 {
            return Err(Error::Malformed);
        }
        let p = Packet { buffer };
        if p.buffer.as_ref().len() < p.total_len() {
            return Err(Error::Truncated);
        }
        Ok(p)
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn word0(&self) -> u32 {
        let b = self.buffer.as_ref();
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }
    pub fn traffic_class(&self) -> u8 {
        (self.word0() >> 20) as u8
    }
    pub fn flow_label(&self) -> u32 {
        self.word0() & 0x000f_ffff
    }
    pub fn payload_len(&self) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[4], b[5]])
    }
    /// Header plus payload length.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + usize::from(self.payload_len())
    }
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::NXT_HDR]
    }
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }
    pub fn src_addr(&self) -> Ipv6Addr {
        let mut a = [0; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::SRC]);
        Ipv6Addr::from(a)
    }
    pub fn dst_addr(&self) -> Ipv6Addr {
        let mut a = [0; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::DST]);
        Ipv6Addr::from(a)
    }
    /// The packet without trailing link padding.
    pub fn packet(&self) -> &[u8] {
        &self.buffer.as_ref()[..self.total_len()]
    }

    /// Walks the extension-header chain (RFC 8200 §4) to the upper layer.
    /// ESP, AH's payload and "no next header" end the walk; so does any
    /// protocol that is not an extension header.
    pub fn walk(&self) -> Result<Chain> {
        let pkt = self.packet();
        let mut nh = self.next_header();
        let mut nh_at = field::NXT_HDR;
        let mut at = HEADER_LEN;
        let mut fragment = None;
        let (mut esp_at, mut esp_nh_at) = (HEADER_LEN, field::NXT_HDR);
        for _ in 0..MAX_EXT_HEADERS {
            let len = match nh {
                proto::HOPOPT
                | proto::ROUTING
                | proto::DSTOPTS
                | proto::MOBILITY
                | proto::HIP
                | proto::SHIM6 => {
                    let l = pkt.get(at + 1).ok_or(Error::Truncated)?;
                    (usize::from(*l) + 1) * 8
                }
                proto::FRAGMENT => {
                    if pkt.len() < at + 8 {
                        return Err(Error::Truncated);
                    }
                    let w = u16::from_be_bytes([pkt[at + 2], pkt[at + 3]]);
                    fragment = Some((w >> 3, w & 1 != 0));
                    8
                }
                proto::AH => {
                    let l = pkt.get(at + 1).ok_or(Error::Truncated)?;
                    (usize::from(*l) + 2) * 4
                }
                _ => {
                    return Ok(Chain {
                        upper: nh,
                        upper_at: at,
                        upper_nh_at: nh_at,
                        fragment,
                        esp_at,
                        esp_nh_at,
                    })
                }
            };
            if pkt.len() < at + len {
                return Err(Error::Truncated);
            }
            let this = nh;
            nh = pkt[at];
            nh_at = at;
            at += len;
            if matches!(this, proto::HOPOPT | proto::ROUTING | proto::FRAGMENT) {
                esp_at = at;
                esp_nh_at = nh_at;
            }
        }
        Err(Error::Malformed)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes version 6, traffic class and flow label.
    pub fn set_ver_tc_flow(&mut self, tc: u8, flow: u32) {
        let w = (6u32 << 28) | (u32::from(tc) << 20) | (flow & 0x000f_ffff);
        self.buffer.as_mut()[field::VER_TC_FLOW].copy_from_slice(&w.to_be_bytes());
    }
    pub fn set_traffic_class(&mut self, tc: u8) {
        let fl = self.flow_label();
        self.set_ver_tc_flow(tc, fl);
    }
    pub fn set_payload_len(&mut self, v: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_next_header(&mut self, v: u8) {
        self.buffer.as_mut()[field::NXT_HDR] = v;
    }
    pub fn set_hop_limit(&mut self, v: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = v;
    }
    pub fn set_src_addr(&mut self, a: Ipv6Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.octets());
    }
    pub fn set_dst_addr(&mut self, a: Ipv6Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.octets());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured (scapy 2.8): 2001:db8:1::2 > 2001:db8:2::3, TC 0x2e, flow 0x12345,
    /// hop limit 60, hop-by-hop → routing (type 0, 0 segments left) → destination
    /// options → UDP 1 > 2.
    const EXT_PKT: [u8; 72] = [
        0x62, 0xe1, 0x23, 0x45, 0x00, 0x20, 0x00, 0x3c, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x01, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x02,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x2b, 0x00, 0x01, 0x04, 0x00,
        0x00, 0x00, 0x00, 0x3c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x11, 0x00, 0x01, 0x04,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x02, 0x00, 0x08, 0xa4, 0x61,
    ];

    #[test]
    fn fields_of_captured_packet() {
        let p = Packet::new_checked(&EXT_PKT[..]).unwrap();
        assert_eq!(p.traffic_class(), 0x2e);
        assert_eq!(p.flow_label(), 0x12345);
        assert_eq!(p.payload_len(), 32);
        assert_eq!(p.hop_limit(), 60);
        assert_eq!(p.src_addr(), "2001:db8:1::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst_addr(), "2001:db8:2::3".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn walk_skips_extension_headers() {
        let c = Packet::new_checked(&EXT_PKT[..]).unwrap().walk().unwrap();
        assert_eq!(c.upper, proto::UDP);
        assert_eq!(c.upper_at, 64);
        assert_eq!(c.upper_nh_at, 56);
        assert_eq!(c.fragment, None);
        // ESP goes after hop-by-hop and routing; the destination options follow it.
        assert_eq!(c.esp_at, 56);
        assert_eq!(c.esp_nh_at, 48);
    }

    #[test]
    fn fragment_header_reported() {
        let mut b = [0u8; 56];
        b[0] = 0x60;
        b[5] = 16;
        b[6] = proto::FRAGMENT;
        b[40] = proto::UDP;
        b[42..44].copy_from_slice(&((3u16 << 3) | 1).to_be_bytes());
        let c = Packet::new_checked(&b[..]).unwrap().walk().unwrap();
        assert_eq!(c.fragment, Some((3, true)));
        assert_eq!(c.upper, proto::UDP);
        assert_eq!(c.upper_at, 48);
    }

    #[test]
    fn truncated_chain_refused_without_panic() {
        for n in 0..EXT_PKT.len() {
            let mut b = EXT_PKT[..n].to_vec();
            if n >= 6 {
                let pl = n.saturating_sub(40) as u16;
                b[4..6].copy_from_slice(&pl.to_be_bytes());
            }
            if let Ok(p) = Packet::new_checked(&b[..]) {
                // Never panics; either walks or refuses.
                let _ = p.walk();
            }
        }
        let mut b = EXT_PKT;
        b[5] = 0x40; // payload length beyond the buffer
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::Truncated);
    }

    #[test]
    fn endless_chain_is_malformed() {
        let mut b = [0u8; 40 + 8 * 20];
        b[0] = 0x60;
        b[5] = 160;
        b[6] = proto::DSTOPTS;
        for i in 0..20 {
            b[40 + 8 * i] = proto::DSTOPTS;
        }
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.walk().unwrap_err(), Error::Malformed);
    }
}
