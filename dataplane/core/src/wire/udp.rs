//! UDP header view (RFC 768). Used for NAT-T (RFC 3948) and for selectors.

use super::{Error, Result};

pub const HEADER_LEN: usize = 8;

#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Checks that the header fits and the length field is sane.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let p = Packet { buffer };
        let l = usize::from(p.len());
        if l < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if l > p.buffer.as_ref().len() {
            return Err(Error::Truncated);
        }
        Ok(p)
    }
    fn get16(&self, at: usize) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[at], b[at + 1]])
    }
    pub fn src_port(&self) -> u16 {
        self.get16(0)
    }
    pub fn dst_port(&self) -> u16 {
        self.get16(2)
    }
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u16 {
        self.get16(4)
    }
    pub fn checksum(&self) -> u16 {
        self.get16(6)
    }
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.len())]
    }
}

/// Writes a UDP header (checksum 0) into the first 8 octets of `buf`.
pub fn emit(buf: &mut [u8], sport: u16, dport: u16, len: u16) {
    buf[0..2].copy_from_slice(&sport.to_be_bytes());
    buf[2..4].copy_from_slice(&dport.to_be_bytes());
    buf[4..6].copy_from_slice(&len.to_be_bytes());
    buf[6..8].copy_from_slice(&[0, 0]);
}

/// The UDP checksum over IPv6 (RFC 8200 §8.1 pseudo-header), for a datagram
/// whose checksum field is zero. Never 0 (RFC 768: 0 is sent as 0xffff).
pub fn checksum_v6(src: &[u8], dst: &[u8], datagram: &[u8]) -> u16 {
    use super::checksum::{combine, sum};
    let len = (datagram.len() as u32).to_be_bytes();
    let c = !combine(&[sum(src), sum(dst), sum(&len), 17, sum(datagram)]);
    if c == 0 {
        0xffff
    } else {
        c
    }
}

/// A NAT keepalive (RFC 3948 §2.3: one 0xFF octet) from `src:sport` to
/// `dst:dport` with its IP header, written into `buf`; its length, or
/// `None` for addresses of two families or a `buf` too short. UDP checksum 0
/// over IPv4, computed over IPv6 (RFC 8200 §8.1).
pub fn nat_keepalive(
    buf: &mut [u8],
    src: core::net::IpAddr,
    dst: core::net::IpAddr,
    sport: u16,
    dport: u16,
    ttl: u8,
) -> Option<usize> {
    use super::{ipv4, ipv6, proto};
    use core::net::IpAddr;
    let hl = if src.is_ipv4() {
        ipv4::HEADER_LEN
    } else {
        ipv6::HEADER_LEN
    };
    let n = hl + HEADER_LEN + 1;
    let b = buf.get_mut(..n)?;
    b.fill(0);
    emit(&mut b[hl..], sport, dport, 9);
    b[n - 1] = 0xff;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = ipv4::Packet::new_unchecked(&mut b[..]);
            p.set_version_header_len(hl);
            p.set_total_len(n as u16);
            p.set_ttl(ttl);
            p.set_protocol(proto::UDP);
            p.set_src_addr(s);
            p.set_dst_addr(d);
            p.fill_checksum();
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = ipv6::Packet::new_unchecked(&mut b[..]);
            p.set_ver_tc_flow(0, 0);
            p.set_payload_len(9);
            p.set_next_header(proto::UDP);
            p.set_hop_limit(ttl);
            p.set_src_addr(s);
            p.set_dst_addr(d);
            let c = checksum_v6(&s.octets(), &d.octets(), &b[hl..]);
            b[hl + 6..hl + 8].copy_from_slice(&c.to_be_bytes());
        }
        _ => return None,
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_udp_header() {
        // The UDP part of wire::ipv4's captured packet: 5000 > 53, len 10, "hi".
        let b = [0x13, 0x88, 0x00, 0x35, 0x00, 0x0a, 0xf4, 0x89, 0x68, 0x69];
        let u = Packet::new_checked(&b[..]).unwrap();
        assert_eq!((u.src_port(), u.dst_port(), u.len()), (5000, 53, 10));
        assert_eq!(u.checksum(), 0xf489);
        assert_eq!(u.payload(), b"hi");
        assert_eq!(Packet::new_checked(&b[..9]).unwrap_err(), Error::Truncated);
        let mut bad = b;
        bad[5] = 4;
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Malformed);
    }

    /// scapy 2.8 computes 0x823e for IPv6 2001:db8::1 > 2001:db8::2,
    /// UDP 4500 > 4500, payload ff (a NAT keepalive).
    #[test]
    fn ipv6_checksum_verifies() {
        let src: [u8; 16] = "2001:db8::1"
            .parse::<core::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let dst: [u8; 16] = "2001:db8::2"
            .parse::<core::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let mut d = [0x11, 0x94, 0x11, 0x94, 0x00, 0x09, 0, 0, 0xff];
        let c = checksum_v6(&src, &dst, &d);
        assert_eq!(c, 0x823e);
        d[6..8].copy_from_slice(&c.to_be_bytes());
        // A correct checksum makes the whole sum (pseudo-header included) 0xffff.
        use crate::wire::checksum::{combine, sum};
        assert_eq!(
            combine(&[sum(&src), sum(&dst), sum(&[0, 0, 0, 9]), 17, sum(&d)]),
            0xffff
        );
    }
}
