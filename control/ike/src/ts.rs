//! Traffic selectors: swanctl's `local_ts`/`remote_ts` syntax, narrowing
//! (RFC 7296 §2.9) and the prefixes espd's SPD takes.

use crate::wire::Ts;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A configured selector: `dynamic` stands for the IKE SA's own address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsConf {
    Dynamic { proto: u8, ports: (u16, u16) },
    Range(Ts),
}

pub(crate) fn u128_of(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

pub(crate) fn addr_of(v4: bool, x: u128) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(x as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(x))
    }
}

pub fn proto_number(s: &str) -> Option<u8> {
    Some(match s {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "ipv6-icmp" | "icmpv6" => 58,
        "sctp" => 132,
        "gre" => 47,
        "%any" | "any" => 0,
        n => n.parse().ok()?,
    })
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "ipv6-icmp".into(),
        132 => "sctp".into(),
        47 => "gre".into(),
        n => n.to_string(),
    }
}

/// One `local_ts`/`remote_ts` entry: `198.18.1.0/24`, `198.18.1.10`,
/// `2001:db8:1::/64`, `dynamic`, optionally `[PROTO]` or `[PROTO/PORT]`
/// or `[PROTO/LO-HI]` (strongSwan's forms).
pub fn parse(s: &str) -> Result<TsConf, String> {
    let (net, extra) = match s.find('[') {
        Some(i) => {
            let rest = &s[i + 1..];
            let close = rest
                .strip_suffix(']')
                .ok_or_else(|| format!("`{s}`: `[` without a closing `]`"))?;
            (&s[..i], Some(close))
        }
        None => (s, None),
    };
    let (mut proto, mut ports) = (0u8, (0u16, 65535u16));
    if let Some(x) = extra {
        let (p, port) = match x.split_once('/') {
            Some((p, port)) => (p, Some(port)),
            None => (x, None),
        };
        proto = proto_number(p).ok_or_else(|| {
            format!(
                "`{s}`: unknown protocol `{p}` (tcp, udp, icmp, ipv6-icmp, sctp, gre or a number)"
            )
        })?;
        if let Some(port) = port {
            if port != "%any" {
                if !matches!(proto, 6 | 17 | 132) {
                    return Err(format!("`{s}`: ports need tcp, udp or sctp"));
                }
                let num = |x: &str| {
                    x.parse::<u16>()
                        .map_err(|_| format!("`{s}`: `{x}` is not a port number"))
                };
                ports = match port.split_once('-') {
                    Some((a, b)) => (num(a)?, num(b)?),
                    None => (num(port)?, num(port)?),
                };
                if ports.0 > ports.1 {
                    return Err(format!("`{s}`: the port range is empty"));
                }
            }
        }
    }
    if net == "dynamic" {
        return Ok(TsConf::Dynamic { proto, ports });
    }
    let (a, len) = match net.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (net, None),
    };
    let addr: IpAddr = a.parse().map_err(|_| {
        format!("`{s}`: expected an address, a prefix (198.18.1.0/24) or `dynamic`")
    })?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u32 = match len {
        Some(l) => l
            .parse()
            .ok()
            .filter(|&l| l <= max)
            .ok_or_else(|| format!("`{s}`: prefix length must be 0-{max}"))?,
        None => max,
    };
    let host_bits = max - len;
    let x = u128_of(addr);
    let mask: u128 = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    if x & mask != 0 {
        return Err(format!(
            "`{s}`: host bits set (did you mean {}/{len}?)",
            addr_of(addr.is_ipv4(), x & !mask)
        ));
    }
    Ok(TsConf::Range(Ts {
        proto,
        start_port: ports.0,
        end_port: ports.1,
        start: addr,
        end: addr_of(addr.is_ipv4(), x | mask),
    }))
}

impl TsConf {
    /// `dynamic` made concrete with the IKE SA's address.
    pub fn resolve(&self, own: IpAddr) -> Ts {
        match *self {
            TsConf::Range(t) => t,
            TsConf::Dynamic { proto, ports } => Ts {
                proto,
                start_port: ports.0,
                end_port: ports.1,
                start: own,
                end: own,
            },
        }
    }
}

/// The intersection of two selectors, if any (RFC 7296 §2.9).
pub fn intersect(a: &Ts, b: &Ts) -> Option<Ts> {
    if a.start.is_ipv4() != b.start.is_ipv4() {
        return None;
    }
    let proto = match (a.proto, b.proto) {
        (0, p) | (p, 0) => p,
        (p, q) if p == q => p,
        _ => return None,
    };
    let sp = a.start_port.max(b.start_port);
    let ep = a.end_port.min(b.end_port);
    if sp > ep {
        return None;
    }
    let s = u128_of(a.start).max(u128_of(b.start));
    let e = u128_of(a.end).min(u128_of(b.end));
    if s > e {
        return None;
    }
    let v4 = a.start.is_ipv4();
    Some(Ts {
        proto,
        start_port: sp,
        end_port: ep,
        start: addr_of(v4, s),
        end: addr_of(v4, e),
    })
}

/// Narrowing (RFC 7296 §2.9): every non-empty intersection of what was
/// proposed with what is configured, without duplicates.
pub fn narrow(proposed: &[Ts], allowed: &[Ts]) -> Vec<Ts> {
    let mut out: Vec<Ts> = Vec::new();
    for p in proposed {
        for a in allowed {
            if let Some(i) = intersect(p, a) {
                if !out.contains(&i) {
                    out.push(i);
                }
            }
        }
    }
    out
}

/// `inner` lies wholly inside one of `outer` (an initiator's check of the
/// responder's narrowed answer).
pub fn covered(inner: &[Ts], outer: &[Ts]) -> bool {
    inner
        .iter()
        .all(|i| outer.iter().any(|o| intersect(i, o) == Some(*i)))
}

/// The CIDR prefixes that exactly cover an address range.
pub fn prefixes(t: &Ts) -> Vec<(IpAddr, u32)> {
    let v4 = t.start.is_ipv4();
    let bits = if v4 { 32 } else { 128 };
    let (mut s, e) = (u128_of(t.start), u128_of(t.end));
    let mut out = Vec::new();
    loop {
        // The largest aligned block starting at s that ends at or before e.
        let mut size = if s == 0 {
            bits
        } else {
            s.trailing_zeros().min(bits)
        };
        while size > 0 {
            let span = if size == 128 {
                u128::MAX
            } else {
                (1u128 << size) - 1
            };
            if s.checked_add(span).is_some_and(|end| end <= e) {
                break;
            }
            size -= 1;
        }
        out.push((addr_of(v4, s), bits - size));
        let span = if size == 128 {
            u128::MAX
        } else {
            (1u128 << size) - 1
        };
        match s.checked_add(span) {
            Some(end) if end < e => s = end + 1,
            _ => break,
        }
        if out.len() > 256 {
            // A pathological range: espd gets the covering prefixes so far
            // and the log says so; never loop without bound.
            break;
        }
    }
    out
}

/// The espd selector words (`src P dst P [proto X [sport A-B] [dport C-D]]`).
pub fn selector_words(src: &Ts, sp: (IpAddr, u32), dst: &Ts, dp: (IpAddr, u32)) -> String {
    let mut s = format!("src {}/{} dst {}/{}", sp.0, sp.1, dp.0, dp.1);
    let proto = if src.proto != 0 { src.proto } else { dst.proto };
    if proto != 0 {
        s += &format!(" proto {}", proto_name(proto));
        if matches!(proto, 6 | 17 | 132) {
            let port = |a: u16, b: u16| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            };
            if (src.start_port, src.end_port) != (0, 65535) {
                s += &format!(" sport {}", port(src.start_port, src.end_port));
            }
            if (dst.start_port, dst.end_port) != (0, 65535) {
                s += &format!(" dport {}", port(dst.start_port, dst.end_port));
            }
        }
    }
    s
}

pub fn describe(t: &Ts) -> String {
    let p = prefixes(t);
    let mut s = if p.len() == 1 {
        format!("{}/{}", p[0].0, p[0].1)
    } else {
        format!("{}-{}", t.start, t.end)
    };
    if t.proto != 0 {
        s += &format!("[{}", proto_name(t.proto));
        if (t.start_port, t.end_port) != (0, 65535) {
            s += &format!(
                "/{}",
                if t.start_port == t.end_port {
                    t.start_port.to_string()
                } else {
                    format!("{}-{}", t.start_port, t.end_port)
                }
            );
        }
        s += "]";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Ts {
        match parse(s).unwrap() {
            TsConf::Range(t) => t,
            _ => panic!(),
        }
    }

    #[test]
    fn parse_and_narrow() {
        let a = r("198.18.1.0/24");
        assert_eq!(a.end, "198.18.1.255".parse::<IpAddr>().unwrap());
        assert!(parse("198.18.1.1/24").unwrap_err().contains("host bits"));
        let h = r("198.18.1.10[tcp/80]");
        assert_eq!((h.proto, h.start_port, h.end_port), (6, 80, 80));
        assert_eq!(narrow(&[r("198.18.0.0/16")], &[a]), vec![a]);
        assert_eq!(narrow(&[h], &[a]), vec![h]);
        assert!(narrow(&[r("198.18.2.0/24")], &[a]).is_empty());
        assert!(narrow(&[r("2001:db8::/32")], &[a]).is_empty());
        assert!(covered(&[h], &[a]));
        assert!(!covered(&[r("198.18.0.0/16")], &[a]));
        assert!(matches!(
            parse("dynamic[udp/500]").unwrap(),
            TsConf::Dynamic {
                proto: 17,
                ports: (500, 500)
            }
        ));
    }

    #[test]
    fn ranges_to_prefixes() {
        assert_eq!(
            prefixes(&r("198.18.1.0/24")),
            vec![("198.18.1.0".parse().unwrap(), 24)]
        );
        assert_eq!(
            prefixes(&r("0.0.0.0/0")),
            vec![("0.0.0.0".parse().unwrap(), 0)]
        );
        assert_eq!(prefixes(&r("::/0")), vec![("::".parse().unwrap(), 0)]);
        let t = Ts {
            proto: 0,
            start_port: 0,
            end_port: 65535,
            start: "198.18.1.1".parse().unwrap(),
            end: "198.18.1.6".parse().unwrap(),
        };
        let p: Vec<String> = prefixes(&t)
            .iter()
            .map(|(a, l)| format!("{a}/{l}"))
            .collect();
        assert_eq!(
            p,
            [
                "198.18.1.1/32",
                "198.18.1.2/31",
                "198.18.1.4/31",
                "198.18.1.6/32"
            ]
        );
    }
}
