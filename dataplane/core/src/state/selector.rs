//! Traffic selectors (RFC 4301 §4.4.1.1) in Linux XFRM's shape: source and
//! destination prefixes, an optional protocol and, for protocols with ports,
//! port ranges; for ICMP/ICMPv6 the "ports" are type and code.

use crate::wire::l4::Ports;
use core::fmt;
use core::net::IpAddr;

/// An address prefix. The family of `addr` is the family the prefix matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// A prefix with the host bits cleared; `None` if `len` is too long.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return None;
        }
        Some(Prefix {
            addr: mask(addr, len),
            len,
        })
    }
    pub fn host(addr: IpAddr) -> Self {
        Prefix {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }
    pub fn contains(&self, a: IpAddr) -> bool {
        a.is_ipv4() == self.addr.is_ipv4() && mask(a, self.len) == self.addr
    }
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

fn mask(a: IpAddr, len: u8) -> IpAddr {
    match a {
        IpAddr::V4(v) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4((u32::from(v) & m).into())
        }
        IpAddr::V6(v) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6((u128::from(v) & m).into())
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// An inclusive port (or ICMP type/code) range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn one(p: u16) -> Self {
        PortRange { lo: p, hi: p }
    }
    pub fn contains(&self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
}

/// What a policy or an SA's `sel` matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    pub src: Prefix,
    pub dst: Prefix,
    /// `None` = any protocol.
    pub proto: Option<u8>,
    /// Source port, or ICMP type. `None` = any.
    pub sport: Option<PortRange>,
    /// Destination port, or ICMP code. `None` = any.
    pub dport: Option<PortRange>,
}

/// The fields of one packet that selectors look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// `None` for protocols without ports and for non-initial fragments
    /// (RFC 4301 §4.4.1.1 OPAQUE): those match only selectors that name no port.
    pub ports: Option<Ports>,
}

impl Selector {
    pub fn matches(&self, f: &Flow) -> bool {
        if !self.src.contains(f.src) || !self.dst.contains(f.dst) {
            return false;
        }
        if let Some(p) = self.proto {
            if p != f.proto {
                return false;
            }
        }
        if self.sport.is_none() && self.dport.is_none() {
            return true;
        }
        match f.ports {
            None => false,
            Some(ports) => {
                self.sport.is_none_or(|r| r.contains(ports.sport))
                    && self.dport.is_none_or(|r| r.contains(ports.dport))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str, l: u8) -> Prefix {
        Prefix::new(s.parse().unwrap(), l).unwrap()
    }

    #[test]
    fn prefixes_match_by_family_and_bits() {
        let n = p("198.18.1.77", 24);
        assert_eq!(n.addr, "198.18.1.0".parse::<IpAddr>().unwrap());
        assert!(n.contains("198.18.1.200".parse().unwrap()));
        assert!(!n.contains("198.18.2.1".parse().unwrap()));
        let any4 = p("0.0.0.0", 0);
        assert!(any4.contains("198.19.0.1".parse().unwrap()));
        assert!(!any4.contains("2001:db8::1".parse().unwrap()));
        let v6 = p("2001:db8:1::", 48);
        assert!(v6.contains("2001:db8:1:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db8:2::1".parse().unwrap()));
        assert!(Prefix::new("198.18.0.0".parse().unwrap(), 33).is_none());
    }

    #[test]
    fn ports_and_opaque() {
        let sel = Selector {
            src: p("198.18.1.0", 24),
            dst: p("198.18.2.0", 24),
            proto: Some(17),
            sport: None,
            dport: Some(PortRange { lo: 50, hi: 60 }),
        };
        let mut f = Flow {
            src: "198.18.1.1".parse().unwrap(),
            dst: "198.18.2.1".parse().unwrap(),
            proto: 17,
            ports: Some(Ports {
                sport: 9,
                dport: 53,
            }),
        };
        assert!(sel.matches(&f));
        f.ports = Some(Ports {
            sport: 9,
            dport: 61,
        });
        assert!(!sel.matches(&f));
        f.ports = None; // a later fragment: ports unknown
        assert!(!sel.matches(&f));
        let noports = Selector { dport: None, ..sel };
        assert!(noports.matches(&f));
        f.proto = 6;
        assert!(!noports.matches(&f));
    }
}
