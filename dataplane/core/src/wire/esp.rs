//! ESP header and trailer (RFC 4303 §2).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |               Security Parameters Index (SPI)                 |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                      Sequence Number                          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    IV (8 octets for GCM, RFC 4106 §3.1)       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ~        Payload | Padding | Pad Length | Next Header  (encrypted)~
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |         Integrity Check Value (ICV, 8/12/16 octets)           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use super::{Error, Result};

pub const HEADER_LEN: usize = 8;
/// Pad Length and Next Header.
pub const TRAILER_LEN: usize = 2;

#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub fn new_checked(buffer: T) -> Result<Self> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        Ok(Packet { buffer })
    }
    pub fn spi(&self) -> u32 {
        let b = self.buffer.as_ref();
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }
    pub fn seq(&self) -> u32 {
        let b = self.buffer.as_ref();
        u32::from_be_bytes([b[4], b[5], b[6], b[7]])
    }
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

/// Writes SPI and sequence number into the first 8 octets of `buf`.
pub fn emit_header(buf: &mut [u8; HEADER_LEN], spi: u32, seq: u32) {
    buf[..4].copy_from_slice(&spi.to_be_bytes());
    buf[4..].copy_from_slice(&seq.to_be_bytes());
}

/// Pad length for `payload_len` octets so that payload, padding and the two
/// trailer octets end on a multiple of `align` (RFC 4303 §2.4: at least 4).
pub fn pad_len(payload_len: usize, align: usize) -> usize {
    let align = align.max(4);
    (align - (payload_len + TRAILER_LEN) % align) % align
}

/// Writes the RFC 4303 §2.4 default padding 1, 2, 3, … into `pad`.
pub fn fill_padding(pad: &mut [u8]) {
    for (i, b) in pad.iter_mut().enumerate() {
        *b = (i + 1) as u8;
    }
}

/// Checks the padding before a decrypted trailer and returns
/// `(payload_len, next_header)`. RFC 4303 §2.4: the receiver SHOULD check the
/// monotonically increasing default pad bytes.
pub fn parse_trailer(plain: &[u8]) -> core::result::Result<(usize, u8), TrailerError> {
    let n = plain.len();
    if n < TRAILER_LEN {
        return Err(TrailerError::Short);
    }
    let pad = usize::from(plain[n - 2]);
    let nh = plain[n - 1];
    if pad + TRAILER_LEN > n {
        return Err(TrailerError::PadTooLong);
    }
    let start = n - TRAILER_LEN - pad;
    for (i, b) in plain[start..n - TRAILER_LEN].iter().enumerate() {
        if usize::from(*b) != i + 1 {
            return Err(TrailerError::PadBytes);
        }
    }
    Ok((start, nh))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrailerError {
    Short,
    PadTooLong,
    PadBytes,
}

impl From<TrailerError> for Error {
    fn from(_: TrailerError) -> Self {
        Error::Malformed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields() {
        let b = [0x00, 0x00, 0xa5, 0xf8, 0x00, 0x00, 0x00, 0x0a, 0xff];
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.spi(), 0xa5f8);
        assert_eq!(p.seq(), 10);
        assert_eq!(p.payload(), &[0xff]);
        assert_eq!(Packet::new_checked(&b[..7]).unwrap_err(), Error::Truncated);
        let mut h = [0u8; 8];
        emit_header(&mut h, 0xa5f8, 10);
        assert_eq!(&h, &b[..8]);
    }

    #[test]
    fn padding_lengths() {
        // payload + pad + 2 is a multiple of 4 (or of the block size).
        for len in 0..64 {
            let p = pad_len(len, 4);
            assert_eq!((len + p + 2) % 4, 0);
            assert!(p < 4);
            let p16 = pad_len(len, 16);
            assert_eq!((len + p16 + 2) % 16, 0);
        }
    }

    #[test]
    fn trailer_checks() {
        assert_eq!(parse_trailer(&[9, 9, 1, 2, 3, 3, 4]), Ok((2, 4)));
        assert_eq!(parse_trailer(&[9, 0, 41]), Ok((1, 41)));
        assert_eq!(parse_trailer(&[9, 1, 3, 3, 4]), Err(TrailerError::PadBytes));
        assert_eq!(parse_trailer(&[1, 2, 5, 4]), Err(TrailerError::PadTooLong));
        assert_eq!(parse_trailer(&[4]), Err(TrailerError::Short));
    }
}
