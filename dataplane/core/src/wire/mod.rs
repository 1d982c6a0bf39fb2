//! Zero-copy views of the packet formats espd reads and writes.
//!
//! The contract, as in smoltcp: each view has `new_checked`, which validates the
//! lengths of untrusted bytes once; **after `new_checked` succeeds no accessor
//! panics**. Setters exist only for fields inside the checked length. Nothing here
//! allocates.

pub mod esp;
pub mod ethernet;
pub mod frag;
pub mod icmp;
pub mod ip;
pub mod ipv4;
pub mod ipv6;
pub mod l4;
pub mod udp;

/// Why a view refused its bytes. Flat and `Copy`: it is on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Fewer bytes than the header (or a length field) says there must be.
    Truncated,
    /// A field holds a value the format forbids (version, header length, ...).
    Malformed,
    /// The IPv4 header checksum does not verify.
    Checksum,
}

pub type Result<T> = core::result::Result<T, Error>;

/// IP protocol / IPv6 next-header numbers (IANA "Assigned Internet Protocol Numbers").
pub mod proto {
    pub const HOPOPT: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const IPIP: u8 = 4;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const DCCP: u8 = 33;
    pub const IPV6: u8 = 41;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const GRE: u8 = 47;
    pub const ESP: u8 = 50;
    pub const AH: u8 = 51;
    pub const ICMPV6: u8 = 58;
    /// "No next header": RFC 4303 §2.6 dummy packets carry this.
    pub const NONE: u8 = 59;
    pub const DSTOPTS: u8 = 60;
    pub const MOBILITY: u8 = 135;
    pub const UDPLITE: u8 = 136;
    pub const SCTP: u8 = 132;
    pub const HIP: u8 = 139;
    pub const SHIM6: u8 = 140;
}

/// Internet checksum (RFC 1071) helpers.
pub mod checksum {
    /// One's-complement sum of `data` folded to 16 bits (not inverted).
    pub fn sum(data: &[u8]) -> u16 {
        // 32-bit words: 2^16 ≡ 1 (mod 2^16 − 1), so summing big-endian
        // 32-bit words and folding equals the 16-bit one's-complement sum
        // (RFC 1071 §2(B)), at twice the speed.
        let mut acc: u64 = 0;
        let mut quads = data.chunks_exact(4);
        for c in &mut quads {
            acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        }
        let rest = quads.remainder();
        let mut pairs = rest.chunks_exact(2);
        for c in &mut pairs {
            acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = pairs.remainder() {
            acc += u64::from(*last) << 8;
        }
        fold(acc)
    }

    #[cfg(test)]
    #[test]
    fn sum_matches_16_bit_words() {
        let data: [u8; 1501] = core::array::from_fn(|i| (i * 151 + 7) as u8);
        for n in 0..data.len() {
            let d = &data[..n];
            let mut acc: u64 = 0;
            for c in d.chunks(2) {
                acc += u64::from(c[0]) << 8 | c.get(1).map_or(0, |&b| u64::from(b));
            }
            assert_eq!(sum(d), fold(acc), "length {n}");
        }
    }

    /// Folds a wide one's-complement accumulator to 16 bits.
    pub fn fold(mut acc: u64) -> u16 {
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    /// One's-complement addition of partial sums.
    pub fn combine(parts: &[u16]) -> u16 {
        fold(parts.iter().map(|&p| u64::from(p)).sum())
    }
}
