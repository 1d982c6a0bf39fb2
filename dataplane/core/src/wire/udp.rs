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
}
