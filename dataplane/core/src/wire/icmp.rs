//! ICMP errors (RFC 792, RFC 4443) as the engine sends them: "fragmentation
//! needed" / "packet too big" with an MTU (RFC 1191, RFC 4443 §3.2) and
//! "time exceeded" (RFC 792, RFC 4443 §3.3). [`emit_v4`] and [`emit_v6`]
//! write the IP and ICMP headers in front of the quoted packet.

use super::{checksum, ipv4, ipv6, proto};
use core::net::{Ipv4Addr, Ipv6Addr};

/// An ICMP error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repr {
    /// Type 3 code 4 / ICMPv6 type 2, with the MTU to report.
    TooBig(usize),
    /// Type 11 code 0 / ICMPv6 type 3 code 0.
    TimeExceeded,
}

/// Octets of IPv4 + ICMP header in front of the quote.
pub const V4_HEADERS: usize = ipv4::HEADER_LEN + 8;
/// Octets of IPv6 + ICMPv6 header in front of the quote.
pub const V6_HEADERS: usize = ipv6::HEADER_LEN + 8;

impl Repr {
    /// Writes an IPv4 ICMP error over `b`: its first [`V4_HEADERS`] octets
    /// get the headers, the rest is the quoted packet. `b` is at least
    /// [`V4_HEADERS`] long.
    pub fn emit_v4(&self, b: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, ttl: u8) {
        let n = b.len();
        b[..V4_HEADERS].fill(0);
        match *self {
            Repr::TooBig(mtu) => {
                b[20] = 3; // destination unreachable
                b[21] = 4; // fragmentation needed and DF set
                b[26..28].copy_from_slice(&(mtu.min(0xffff) as u16).to_be_bytes());
            }
            Repr::TimeExceeded => b[20] = 11, // code 0: TTL exceeded in transit
        }
        let c = !checksum::sum(&b[20..n]);
        b[22..24].copy_from_slice(&c.to_be_bytes());
        let mut ip = ipv4::Packet::new_unchecked(&mut b[..]);
        ip.set_version_header_len(ipv4::HEADER_LEN);
        ip.set_tos(0xc0); // network control
        ip.set_total_len(n as u16);
        ip.set_ttl(ttl);
        ip.set_protocol(proto::ICMP);
        ip.set_src_addr(src);
        ip.set_dst_addr(dst);
        ip.fill_checksum();
    }

    /// The same for IPv6 (the ICMPv6 checksum over the pseudo-header).
    pub fn emit_v6(&self, b: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr, hop_limit: u8) {
        let n = b.len();
        b[..V6_HEADERS].fill(0);
        match *self {
            Repr::TooBig(mtu) => {
                b[40] = 2; // packet too big
                b[44..48].copy_from_slice(&(mtu as u32).to_be_bytes());
            }
            Repr::TimeExceeded => b[40] = 3, // code 0: hop limit exceeded
        }
        let len = ((n - 40) as u32).to_be_bytes();
        let c = !checksum::combine(&[
            checksum::sum(&src.octets()),
            checksum::sum(&dst.octets()),
            checksum::sum(&len),
            u16::from(proto::ICMPV6),
            checksum::sum(&b[40..n]),
        ]);
        b[42..44].copy_from_slice(&c.to_be_bytes());
        let mut ip = ipv6::Packet::new_unchecked(&mut b[..]);
        ip.set_ver_tc_flow(0xc0, 0);
        ip.set_payload_len((n - 40) as u16);
        ip.set_next_header(proto::ICMPV6);
        ip.set_hop_limit(hop_limit);
        ip.set_src_addr(src);
        ip.set_dst_addr(dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_their_type_code_mtu_and_a_good_checksum() {
        let mut b = [0u8; V4_HEADERS + 8];
        b[V4_HEADERS..].copy_from_slice(&[0x45, 0, 0, 40, 1, 2, 3, 4]);
        Repr::TooBig(1400).emit_v4(&mut b, [198, 18, 1, 1].into(), [198, 18, 1, 10].into(), 64);
        let ip = ipv4::Packet::new_checked(&b[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(
            (b[20], b[21], u16::from_be_bytes([b[26], b[27]])),
            (3, 4, 1400)
        );
        assert_eq!(checksum::sum(&b[20..]), 0xffff, "ICMP checksum");
        let mut b = [0u8; V6_HEADERS + 8];
        let (s, d): (Ipv6Addr, Ipv6Addr) = (
            "2001:db8:1::1".parse().unwrap(),
            "2001:db8:1::10".parse().unwrap(),
        );
        Repr::TimeExceeded.emit_v6(&mut b, s, d, 64);
        assert_eq!((b[6], b[40], b[41]), (proto::ICMPV6, 3, 0));
        let len = ((b.len() - 40) as u32).to_be_bytes();
        let sum = checksum::combine(&[
            checksum::sum(&s.octets()),
            checksum::sum(&d.octets()),
            checksum::sum(&len),
            u16::from(proto::ICMPV6),
            checksum::sum(&b[40..]),
        ]);
        assert_eq!(sum, 0xffff, "ICMPv6 checksum");
    }
}
