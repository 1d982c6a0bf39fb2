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
