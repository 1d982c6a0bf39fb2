//! Ethernet II frames, with up to two 802.1Q / 802.1ad tags skipped.

use super::{Error, Result};

pub const HEADER_LEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_QINQ: u16 = 0x88a8;

mod field {
    use core::ops::Range;
    pub const DST: Range<usize> = 0..6;
    pub const SRC: Range<usize> = 6..12;
    pub const ETHERTYPE: usize = 12;
}

/// A view of an Ethernet frame.
#[derive(Debug, Clone)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
    /// Offset of the (innermost) EtherType field.
    type_at: usize,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Checks the header, walking at most two VLAN tags.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let mut type_at = field::ETHERTYPE;
        for _ in 0..2 {
            let ty = u16::from_be_bytes([b[type_at], b[type_at + 1]]);
            if ty != ETHERTYPE_VLAN && ty != ETHERTYPE_QINQ {
                break;
            }
            type_at += 4;
            if b.len() < type_at + 2 {
                return Err(Error::Truncated);
            }
        }
        Ok(Frame { buffer, type_at })
    }

    pub fn dst_addr(&self) -> [u8; 6] {
        let mut a = [0; 6];
        a.copy_from_slice(&self.buffer.as_ref()[field::DST]);
        a
    }

    pub fn src_addr(&self) -> [u8; 6] {
        let mut a = [0; 6];
        a.copy_from_slice(&self.buffer.as_ref()[field::SRC]);
        a
    }

    /// The EtherType after any VLAN tags.
    pub fn ethertype(&self) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[self.type_at], b[self.type_at + 1]])
    }

    /// Length of the L2 header including VLAN tags.
    pub fn header_len(&self) -> usize {
        self.type_at + 2
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    pub fn set_addrs(&mut self, dst: [u8; 6], src: [u8; 6]) {
        let b = self.buffer.as_mut();
        b[field::DST].copy_from_slice(&dst);
        b[field::SRC].copy_from_slice(&src);
    }
    pub fn set_ethertype(&mut self, ty: u16) {
        let at = self.type_at;
        self.buffer.as_mut()[at..at + 2].copy_from_slice(&ty.to_be_bytes());
    }
}

/// The EtherType for an IP packet whose first nibble is `version`.
pub fn ethertype_for_version(version: u8) -> Option<u16> {
    match version {
        4 => Some(ETHERTYPE_IPV4),
        6 => Some(ETHERTYPE_IPV6),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured: ARP-less IPv4 frame header 02:00:00:00:00:02 <- 02:00:00:00:00:01, one 802.1Q tag.
    const VLAN_FRAME: [u8; 22] = [
        0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x81, 0x00, 0x00, 0x64, 0x08, 0x00, 0x45,
        0x00, 0x00, 0x14,
    ];

    #[test]
    fn vlan_tag_skipped() {
        let f = Frame::new_checked(&VLAN_FRAME[..]).unwrap();
        assert_eq!(f.ethertype(), ETHERTYPE_IPV4);
        assert_eq!(f.header_len(), 18);
        assert_eq!(f.dst_addr(), [2, 0, 0, 0, 0, 2]);
        assert_eq!(f.src_addr(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(f.payload()[0], 0x45);
    }

    #[test]
    fn truncated_frames_refused() {
        for n in 0..HEADER_LEN {
            assert_eq!(
                Frame::new_checked(&VLAN_FRAME[..n]).unwrap_err(),
                Error::Truncated
            );
        }
        // Tag present but the inner EtherType cut off.
        assert_eq!(
            Frame::new_checked(&VLAN_FRAME[..15]).unwrap_err(),
            Error::Truncated
        );
        assert!(Frame::new_checked(&VLAN_FRAME[..18]).is_ok());
    }

    #[test]
    fn set_ethertype_after_tag() {
        let mut b = VLAN_FRAME;
        let mut f = Frame::new_checked(&mut b[..]).unwrap();
        f.set_ethertype(ETHERTYPE_IPV6);
        assert_eq!(&b[16..18], &[0x86, 0xdd]);
        assert_eq!(&b[12..14], &[0x81, 0x00]);
    }
}
