//! The upper-layer fields that policy selectors look at (RFC 4301 §4.4.1.1):
//! ports for TCP, UDP, SCTP, DCCP and UDP-Lite; type and code for ICMP and ICMPv6.

use super::proto;

/// Selector fields of the upper layer. For ICMP, `sport` carries the type and
/// `dport` the code, as in Linux XFRM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ports {
    pub sport: u16,
    pub dport: u16,
}

/// True for protocols whose first four octets are source and destination port.
pub fn has_ports(p: u8) -> bool {
    matches!(
        p,
        proto::TCP | proto::UDP | proto::SCTP | proto::DCCP | proto::UDPLITE
    )
}

/// Reads the selector fields from the start of an upper-layer header.
/// `None` when the protocol has none, or the header is cut short (then the
/// packet matches only selectors that do not name ports: RFC 4301 §4.4.1.1 OPAQUE).
pub fn ports(protocol: u8, l4: &[u8]) -> Option<Ports> {
    if has_ports(protocol) {
        let b = l4.get(..4)?;
        Some(Ports {
            sport: u16::from_be_bytes([b[0], b[1]]),
            dport: u16::from_be_bytes([b[2], b[3]]),
        })
    } else if protocol == proto::ICMP || protocol == proto::ICMPV6 {
        let b = l4.get(..2)?;
        Some(Ports {
            sport: u16::from(b[0]),
            dport: u16::from(b[1]),
        })
    } else {
        None
    }
}

/// True for ICMP / ICMPv6 error messages, which quote the packet they are
/// about: IPv4 destination unreachable (3), source quench (4), redirect (5),
/// time exceeded (11), parameter problem (12); ICMPv6 types 1–4 (RFC 4443).
pub fn is_icmp_error(protocol: u8, ty: u8) -> bool {
    match protocol {
        proto::ICMP => matches!(ty, 3 | 4 | 5 | 11 | 12),
        proto::ICMPV6 => (1..=4).contains(&ty),
        _ => false,
    }
}

/// The packet an ICMP error quotes (after its 8-octet header): source,
/// destination, protocol and, when enough of it is quoted, its selector
/// fields. IPv6 extension headers are not walked (ports `None`: OPAQUE).
pub fn quoted(icmp: &[u8]) -> Option<(core::net::IpAddr, core::net::IpAddr, u8, Option<Ports>)> {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let q = icmp.get(8..)?;
    match q.first()? >> 4 {
        4 => {
            let ihl = usize::from(q[0] & 0x0f) * 4;
            let h = q.get(..20)?;
            let src = IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19]));
            let first = u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0;
            let p = (first && ihl >= 20)
                .then(|| q.get(ihl..).and_then(|l4| ports(h[9], l4)))
                .flatten();
            Some((src, dst, h[9], p))
        }
        6 => {
            let h = q.get(..40)?;
            let a = |o: usize| {
                let b: [u8; 16] = h[o..o + 16].try_into().unwrap_or([0; 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let (src, dst) = (a(8), a(24));
            Some((src, dst, h[6], ports(h[6], &q[40..])))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_icmp() {
        assert_eq!(
            ports(proto::UDP, &[0x13, 0x88, 0, 53]),
            Some(Ports {
                sport: 5000,
                dport: 53
            })
        );
        assert_eq!(
            ports(proto::ICMP, &[8, 0]),
            Some(Ports { sport: 8, dport: 0 })
        );
        assert_eq!(ports(proto::TCP, &[1, 2, 3]), None);
        assert_eq!(ports(proto::GRE, &[1, 2, 3, 4]), None);
    }
}
