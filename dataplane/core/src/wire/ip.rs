//! An IP packet's headers as one checked, parsed value (smoltcp's `Repr`):
//! [`Repr::parse`] validates untrusted bytes once — IPv4 header and its
//! checksum, or IPv6 with its extension-header chain — and returns what the
//! engine needs; nothing is read from the packet by offset after that.

use super::{ipv4, ipv6, l4, Error, Result};
use core::net::IpAddr;

/// What the headers of an IP packet say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// 4 or 6.
    pub version: u8,
    /// The upper-layer protocol after any IPv6 extension headers.
    pub proto: u8,
    /// Offset of the upper-layer header.
    pub upper_at: usize,
    /// Offset of the octet that names `proto` (IPv4: 9).
    pub upper_nh_at: usize,
    /// IPv6 transport mode: where ESP is inserted and the octet naming it
    /// (after the headers that must stay in front, RFC 4303 §3.1.1).
    pub esp_at: usize,
    pub esp_nh_at: usize,
    /// Any fragment; `later_fragment`: not the first one (no ports).
    pub fragment: bool,
    pub later_fragment: bool,
    /// IPv4 TOS / IPv6 traffic class.
    pub tos: u8,
    /// IPv4 DF (IPv6: false).
    pub df: bool,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TCP/UDP/SCTP/… ports or ICMP type and code (see [`l4::ports`]).
    pub ports: Option<l4::Ports>,
    /// The packet's length without link-layer padding.
    pub len: usize,
}

impl Repr {
    /// Checks the headers of the IP packet at the start of `d`.
    #[inline(always)]
    pub fn parse(d: &[u8]) -> Result<Repr> {
        match d.first().map(|b| b >> 4) {
            None => Err(Error::Truncated),
            Some(4) => {
                let p = ipv4::Packet::new_checked(d)?;
                if !p.verify_checksum() {
                    return Err(Error::Checksum);
                }
                let hl = p.header_len();
                let later = p.is_later_fragment();
                Ok(Repr {
                    version: 4,
                    proto: p.protocol(),
                    upper_at: hl,
                    upper_nh_at: 9,
                    esp_at: hl,
                    esp_nh_at: 9,
                    fragment: p.is_fragment(),
                    later_fragment: later,
                    tos: p.tos(),
                    df: p.dont_frag(),
                    src: p.src_addr().into(),
                    dst: p.dst_addr().into(),
                    ports: if later {
                        None
                    } else {
                        l4::ports(p.protocol(), p.payload())
                    },
                    len: usize::from(p.total_len()),
                })
            }
            Some(6) => {
                let p = ipv6::Packet::new_checked(d)?;
                let c = p.walk()?;
                let later = c.fragment.is_some_and(|(off, _)| off != 0);
                Ok(Repr {
                    version: 6,
                    proto: c.upper,
                    upper_at: c.upper_at,
                    upper_nh_at: c.upper_nh_at,
                    esp_at: c.esp_at,
                    esp_nh_at: c.esp_nh_at,
                    fragment: c.fragment.is_some(),
                    later_fragment: later,
                    tos: p.traffic_class(),
                    df: false,
                    src: p.src_addr().into(),
                    dst: p.dst_addr().into(),
                    ports: if later {
                        None
                    } else {
                        l4::ports(c.upper, &p.packet()[c.upper_at..])
                    },
                    len: p.total_len(),
                })
            }
            Some(_) => Err(Error::Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured bytes: an IPv4 UDP datagram (198.18.1.10:1000 → 198.18.2.20:9)
    /// with two octets of Ethernet padding after it.
    const V4: [u8; 32] = [
        0x45, 0x00, 0x00, 0x1e, 0x00, 0x01, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 198, 18, 1, 10,
        198, 18, 2, 20, 0x03, 0xe8, 0x00, 0x09, 0x00, 0x0a, 0x00, 0x00, b'h', b'i', 0, 0,
    ];

    fn fixed() -> [u8; 32] {
        let mut p = V4;
        let c = !super::super::checksum::sum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn parses_once_and_says_what_is_wrong() {
        let p = fixed();
        let r = Repr::parse(&p).unwrap();
        assert_eq!((r.version, r.proto, r.upper_at, r.len), (4, 17, 20, 30));
        assert_eq!(
            r.ports,
            Some(l4::Ports {
                sport: 1000,
                dport: 9
            })
        );
        assert!(r.df && !r.fragment);
        let mut bad = p;
        bad[10] ^= 1;
        assert_eq!(Repr::parse(&bad), Err(Error::Checksum));
        assert_eq!(Repr::parse(&p[..10]), Err(Error::Truncated));
        assert_eq!(Repr::parse(&[0x75, 0, 0, 0]), Err(Error::Malformed));
        assert_eq!(Repr::parse(&[]), Err(Error::Truncated));
    }
}
