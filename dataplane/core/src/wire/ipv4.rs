//! IPv4 header view (RFC 791).

use super::{checksum, Error, Result};
use core::net::Ipv4Addr;

pub const HEADER_LEN: usize = 20;
/// The DF flag in the flags/fragment-offset word.
pub const FLAG_DF: u16 = 0x4000;
pub const FLAG_MF: u16 = 0x2000;
pub const OFFSET_MASK: u16 = 0x1fff;

mod field {
    use core::ops::Range;
    pub const VER_IHL: usize = 0;
    pub const TOS: usize = 1;
    pub const LENGTH: Range<usize> = 2..4;
    pub const IDENT: Range<usize> = 4..6;
    pub const FLG_OFF: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC: Range<usize> = 12..16;
    pub const DST: Range<usize> = 16..20;
}

/// A view of an IPv4 packet. The buffer may be longer than the datagram
/// (Ethernet padding); `total_len` bounds the payload.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Checks version 4, IHL ≥ 5 and that header and total length fit the buffer.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Packet { buffer };
        p.check_len()?;
        Ok(p)
    }

    fn check_len(&self) -> Result<()> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if b[field::VER_IHL] >> 4 != 4 {
            return Err(Error::Malformed);
        }
        let hl = self.header_len();
        let tl = self.total_len() as usize;
        if hl < HEADER_LEN || tl < hl {
            return Err(Error::Malformed);
        }
        if b.len() < hl || b.len() < tl {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn get16(&self, r: core::ops::Range<usize>) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[r.start], b[r.start + 1]])
    }

    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }
    /// The whole TOS octet: DSCP (6 bits) and ECN (2 bits).
    pub fn tos(&self) -> u8 {
        self.buffer.as_ref()[field::TOS]
    }
    pub fn total_len(&self) -> u16 {
        self.get16(field::LENGTH)
    }
    pub fn ident(&self) -> u16 {
        self.get16(field::IDENT)
    }
    pub fn flags_frag(&self) -> u16 {
        self.get16(field::FLG_OFF)
    }
    pub fn dont_frag(&self) -> bool {
        self.flags_frag() & FLAG_DF != 0
    }
    /// True for any fragment: MF set or a non-zero offset.
    pub fn is_fragment(&self) -> bool {
        self.flags_frag() & (FLAG_MF | OFFSET_MASK) != 0
    }
    /// True for a fragment that is not the first one (no L4 header in it).
    pub fn is_later_fragment(&self) -> bool {
        self.flags_frag() & OFFSET_MASK != 0
    }
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }
    pub fn checksum(&self) -> u16 {
        self.get16(field::CHECKSUM)
    }
    pub fn src_addr(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        Ipv4Addr::new(b[12], b[13], b[14], b[15])
    }
    pub fn dst_addr(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        Ipv4Addr::new(b[16], b[17], b[18], b[19])
    }
    /// True when the header checksum is right (sums to 0xffff).
    pub fn verify_checksum(&self) -> bool {
        checksum::sum(&self.buffer.as_ref()[..self.header_len()]) == 0xffff
    }
    /// The datagram's payload, bounded by the total length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..usize::from(self.total_len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn set16(&mut self, r: core::ops::Range<usize>, v: u16) {
        self.buffer.as_mut()[r].copy_from_slice(&v.to_be_bytes());
    }
    /// Writes version 4 and the given header length (a multiple of 4).
    pub fn set_version_header_len(&mut self, len: usize) {
        self.buffer.as_mut()[field::VER_IHL] = 0x40 | ((len / 4) as u8 & 0x0f);
    }
    pub fn set_tos(&mut self, v: u8) {
        self.buffer.as_mut()[field::TOS] = v;
    }
    pub fn set_total_len(&mut self, v: u16) {
        self.set16(field::LENGTH, v)
    }
    pub fn set_ident(&mut self, v: u16) {
        self.set16(field::IDENT, v)
    }
    pub fn set_flags_frag(&mut self, v: u16) {
        self.set16(field::FLG_OFF, v)
    }
    pub fn set_ttl(&mut self, v: u8) {
        self.buffer.as_mut()[field::TTL] = v;
    }
    pub fn set_protocol(&mut self, v: u8) {
        self.buffer.as_mut()[field::PROTOCOL] = v;
    }
    pub fn set_src_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.octets());
    }
    pub fn set_dst_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.octets());
    }
    /// Recomputes the header checksum.
    pub fn fill_checksum(&mut self) {
        self.set16(field::CHECKSUM, 0);
        let hl = self.header_len();
        let c = !checksum::sum(&self.buffer.as_ref()[..hl]);
        self.set16(field::CHECKSUM, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured (scapy 2.8): 198.18.1.2 > 198.18.2.3 UDP 5000 > 53 "hi", TOS 0xb9, DF, TTL 63.
    pub(crate) const UDP_PKT: [u8; 30] = [
        0x45, 0xb9, 0x00, 0x1e, 0x12, 0x34, 0x40, 0x00, 0x3f, 0x11, 0x99, 0xb8, 0xc6, 0x12, 0x01,
        0x02, 0xc6, 0x12, 0x02, 0x03, 0x13, 0x88, 0x00, 0x35, 0x00, 0x0a, 0xf4, 0x89, 0x68, 0x69,
    ];

    #[test]
    fn fields_of_captured_packet() {
        let p = Packet::new_checked(&UDP_PKT[..]).unwrap();
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.tos(), 0xb9);
        assert_eq!(p.total_len(), 30);
        assert_eq!(p.ident(), 0x1234);
        assert!(p.dont_frag());
        assert!(!p.is_fragment());
        assert_eq!(p.ttl(), 63);
        assert_eq!(p.protocol(), 17);
        assert_eq!(p.src_addr(), Ipv4Addr::new(198, 18, 1, 2));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(198, 18, 2, 3));
        assert!(p.verify_checksum());
        assert_eq!(p.payload().len(), 10);
    }

    #[test]
    fn checksum_refill_matches_capture() {
        let mut b = UDP_PKT;
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_ttl(63);
        p.fill_checksum();
        assert_eq!(b, UDP_PKT);
    }

    #[test]
    fn trailing_bytes_allowed_and_truncation_refused() {
        let mut long = [0u8; 64];
        long[..30].copy_from_slice(&UDP_PKT);
        assert_eq!(Packet::new_checked(&long[..]).unwrap().payload().len(), 10);
        for n in 0..30 {
            assert!(Packet::new_checked(&UDP_PKT[..n]).is_err(), "len {n}");
        }
    }

    #[test]
    fn malformed_headers_refused() {
        let mut b = UDP_PKT;
        b[0] = 0x44; // IHL 4
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::Malformed);
        b[0] = 0x65; // version 6
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::Malformed);
        b = UDP_PKT;
        b[3] = 10; // total length < header length
        assert_eq!(Packet::new_checked(&b[..]).unwrap_err(), Error::Malformed);
        b = UDP_PKT;
        b[0] = 0x4f; // IHL 15 = 60 bytes > buffer
        assert!(Packet::new_checked(&b[..]).is_err());
    }
}
