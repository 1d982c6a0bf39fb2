//! Finite-field Diffie-Hellman with the MODP groups 14 (2048-bit) and 15
//! (3072-bit) of RFC 3526 (IKEv2 transform IDs, RFC 7296 §3.3.2), for peers
//! that offer no elliptic curve. aws-lc-rs has no FFDH, so the modular
//! exponentiation is RustCrypto's crypto-bigint (constant-time Montgomery
//! arithmetic); nothing is hand-written here but the checks.
//!
//! The private exponent is 512 random bits: at least twice the groups'
//! security strength (112 and 128 bits, NIST SP 800-57), as RFC 3526 §8
//! asks. The peer's value must satisfy 1 < y < p − 1 (RFC 6989 §2.1: the
//! other values give a known shared secret). The shared secret is g^xy
//! mod p as big-endian octets of the prime's length (leading zeros kept,
//! as strongSwan and RFC 2631 §2.1.2 do).

use crypto_bigint::modular::runtime_mod::{DynResidue, DynResidueParams};
use crypto_bigint::{Encoding, Uint, U2048, U3072, U512};
use zeroize::{Zeroize, Zeroizing};

/// RFC 3526 §3.
const P2048: &str = concat!(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74",
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437",
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED",
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05",
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB",
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B",
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718",
    "3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
);
/// RFC 3526 §4.
const P3072: &str = concat!(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74",
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437",
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED",
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05",
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB",
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B",
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718",
    "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33",
    "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7",
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864",
    "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2",
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF",
);

/// The exponent's bits.
const EXP_BITS: usize = 512;

fn pow<const L: usize>(p_hex: &str, base: &[u8], exp: &[u8; EXP_BITS / 8]) -> Zeroizing<Vec<u8>>
where
    Uint<L>: Encoding,
{
    let p = Uint::<L>::from_be_hex(p_hex);
    let params = DynResidueParams::new(&p);
    let mut b = Uint::<L>::from_be_slice(base);
    let mut e = U512::from_be_slice(exp);
    let mut r = DynResidue::new(&b, params)
        .pow_bounded_exp(&e, EXP_BITS)
        .retrieve();
    let out = Zeroizing::new(r.to_be_bytes().as_ref().to_vec());
    b.zeroize();
    e.zeroize();
    r.zeroize();
    out
}

/// One side of a MODP exchange.
pub struct Modp {
    bits: usize,
    x: Zeroizing<[u8; EXP_BITS / 8]>,
    pub public: Vec<u8>,
}

impl Modp {
    /// `bits`: 2048 or 3072. `random` fills the exponent.
    pub fn new(bits: usize, random: impl FnOnce(&mut [u8])) -> Modp {
        let mut x = Zeroizing::new([0u8; EXP_BITS / 8]);
        random(&mut x[..]);
        // Not zero, and of full length so the exponent's size is fixed.
        x[0] |= 0x80;
        let mut g = vec![0u8; bits / 8];
        g[bits / 8 - 1] = 2;
        let public = Modp::pow(bits, &g, &x).to_vec();
        Modp { bits, x, public }
    }

    fn pow(bits: usize, base: &[u8], x: &[u8; EXP_BITS / 8]) -> Zeroizing<Vec<u8>> {
        match bits {
            2048 => pow::<{ U2048::LIMBS }>(P2048, base, x),
            _ => pow::<{ U3072::LIMBS }>(P3072, base, x),
        }
    }

    /// g^xy mod p, or None for a value outside 1 < y < p − 1.
    pub fn agree(&self, y: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let n = self.bits / 8;
        if y.len() != n {
            return None;
        }
        let p = hex_bytes(if self.bits == 2048 { P2048 } else { P3072 });
        let mut pm1 = p.clone();
        pm1[n - 1] -= 1; // p is odd
        let mut one = vec![0u8; n];
        one[n - 1] = 1;
        // Big-endian octet strings of one length compare as the numbers do.
        if y <= &one[..] || y >= &pm1[..] {
            return None;
        }
        Some(Modp::pow(self.bits, y, &self.x))
    }
}

fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("a constant"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primes_are_rfc_3526s() {
        for (h, bits) in [(P2048, 2048), (P3072, 3072)] {
            assert_eq!(h.len() * 4, bits);
            // RFC 3526: p = 2^b − 2^(b−64) − 1 + 2^64 · ([2^(b−130) π] + k):
            // the top and bottom 64 bits are all ones, then π's digits.
            assert!(h.starts_with("FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD1"));
            assert!(h.ends_with("FFFFFFFFFFFFFFFF"));
        }
        assert!(P2048.ends_with("15728E5A8AACAA68FFFFFFFFFFFFFFFF"));
        assert!(P3072.ends_with("4B82D120A93AD2CAFFFFFFFFFFFFFFFF"));
    }

    #[test]
    fn both_sides_agree_and_bad_values_are_refused() {
        let mut seed = 1u8;
        let mut rnd = |b: &mut [u8]| {
            for x in b.iter_mut() {
                seed = seed.wrapping_mul(37).wrapping_add(11);
                *x = seed;
            }
        };
        for bits in [2048, 3072] {
            let a = Modp::new(bits, &mut rnd);
            let b = Modp::new(bits, &mut rnd);
            assert_eq!(a.public.len(), bits / 8);
            let (sa, sb) = (a.agree(&b.public).unwrap(), b.agree(&a.public).unwrap());
            assert_eq!(sa, sb);
            assert_eq!(sa.len(), bits / 8);
            let n = bits / 8;
            let mut one = vec![0u8; n];
            one[n - 1] = 1;
            assert!(a.agree(&one).is_none(), "y = 1");
            assert!(a.agree(&vec![0u8; n]).is_none(), "y = 0");
            let mut pm1 = hex_bytes(if bits == 2048 { P2048 } else { P3072 });
            pm1[n - 1] -= 1;
            assert!(a.agree(&pm1).is_none(), "y = p - 1");
            assert!(a.agree(&vec![0xff; n]).is_none(), "y > p");
            assert!(a.agree(&b.public[1..]).is_none(), "short");
        }
    }

    #[test]
    fn a_known_answer() {
        // 2^(2^511 + 1) mod p of group 14, from Python's pow(2, 2**511 + 1, p)
        // (plain modular arithmetic, not Montgomery's): its first 16 octets.
        let mut x = [0u8; 64];
        x[0] = 0x80;
        x[63] = 1;
        let mut g = vec![0u8; 256];
        g[255] = 2;
        let got = Modp::pow(2048, &g, &x);
        assert_eq!(hex(&got[..16]), KAT_2048_HEAD);
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    const KAT_2048_HEAD: &str = "8db3c0c877deb7a2c4e01fd319ac9d12";
}
