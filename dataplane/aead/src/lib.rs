//! The fast AEAD providers behind espd-core's `Transform` seam: ring's
//! AES-GCM (AES-NI + PCLMULQDQ/VAES assembly that interleaves the cipher and
//! GHASH in one pass) for RFC 4106 SAs with the full 16-octet ICV — the
//! common case — and ring's ChaCha20-Poly1305 for RFC 7634. Truncated
//! 8/12-octet GCM ICVs, which ring cannot verify, stay with espd-core's own
//! composition.
//!
//! Why a crate of its own: ring does not zeroize its key schedule on drop
//! (briansmith/ring#15), and espd's rule is that key material is. Doing it
//! takes one `unsafe` write over ring's key object, which cannot live in the
//! `#![forbid(unsafe_code)]` core; it lives here, alone and commented.
//!
//! Nonce: RFC 4106 §4 and RFC 7634 §2 alike — salt (the last 4 octets of
//! the keying material) ‖ explicit IV (8 octets, on the wire).

use ring::aead::{
    Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use zeroize::Zeroize;

pub const TAG_LEN: usize = 16;

/// The ICV did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthError;

/// The key is not 16 or 32 octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLenError;

/// An expanded AES-GCM or ChaCha20-Poly1305 key (ring) and its salt;
/// zeroized on drop, in place.
///
/// Inline, not boxed: an SA's core holds it in its own block (a carrier
/// edge holds 100 000; one block each, no pointer to follow on a packet).
/// Moving it leaves a copy where it was, so it is built once into the
/// block it stays in (espd-core's `NewSa`, which then wipes the stack the
/// expansion used).
pub struct RingAead {
    key: LessSafeKey,
    salt: [u8; 4],
}

impl RingAead {
    /// `key` is the 16- or 32-octet AES key, `salt` the 4 octets after it.
    pub fn new(key: &[u8], salt: [u8; 4]) -> Result<Self, KeyLenError> {
        let alg = match key.len() {
            16 => &AES_128_GCM,
            32 => &AES_256_GCM,
            _ => return Err(KeyLenError),
        };
        let unbound = UnboundKey::new(alg, key).map_err(|_| KeyLenError)?;
        Ok(RingAead {
            key: LessSafeKey::new(unbound),
            salt,
        })
    }

    /// ChaCha20-Poly1305 (RFC 7634): a 32-octet key and its 4-octet salt.
    pub fn new_chacha(key: &[u8], salt: [u8; 4]) -> Result<Self, KeyLenError> {
        if key.len() != 32 {
            return Err(KeyLenError);
        }
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, key).map_err(|_| KeyLenError)?;
        Ok(RingAead {
            key: LessSafeKey::new(unbound),
            salt,
        })
    }

    pub fn key_bits(&self) -> usize {
        self.key.algorithm().key_len() * 8
    }

    fn nonce(&self, iv: &[u8; 8]) -> Nonce {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.salt);
        n[4..].copy_from_slice(iv);
        Nonce::assume_unique_for_key(n)
    }

    /// Encrypts `data` in place and writes the 16-octet tag to `icv`.
    pub fn seal(&self, iv: &[u8; 8], aad: &[u8], data: &mut [u8], icv: &mut [u8; TAG_LEN]) {
        let tag = self
            .key
            .seal_in_place_separate_tag(self.nonce(iv), Aad::from(aad), data)
            // ring refuses only inputs over 2^36 octets (SP 800-38D §5.2.1.1);
            // an IP packet is at most 2^16. Not reachable from packet contents.
            .expect("an IP packet is far below GCM's length limit");
        icv.copy_from_slice(tag.as_ref());
    }

    /// Verifies the tag over `aad` and the ciphertext `data`, then leaves the
    /// plaintext in `data`. On failure `data` holds no plaintext (ring
    /// overwrites it) and the caller drops the packet.
    pub fn open(
        &self,
        iv: &[u8; 8],
        aad: &[u8],
        data: &mut [u8],
        icv: &[u8; TAG_LEN],
    ) -> Result<(), AuthError> {
        let tag = Tag::from(*icv);
        self.key
            .open_in_place_separate_tag(self.nonce(iv), Aad::from(aad), tag, data, 0..)
            .map(|_| ())
            .map_err(|_| AuthError)
    }
}

impl Drop for RingAead {
    fn drop(&mut self) {
        self.salt.zeroize();
        let p: *mut LessSafeKey = &mut self.key;
        // SAFETY: `p` points to the initialised LessSafeKey this struct owns
        // exclusively (it is a field, inline wherever the SA's core lives);
        // nothing else can observe it during drop. LessSafeKey is plain data
        // (expanded AES round keys, the GHASH key table and a
        // `&'static Algorithm`) with no drop glue, so overwriting it with
        // zeros runs no code on the zeroed value: the field's own
        // `drop_in_place`, which runs next, is a no-op for this type
        // (checked at compile time below), and no code reads the field
        // after it (an enclosing enum reads its discriminant before it drops
        // the variant, never after). `zeroize_flat_type` uses volatile
        // writes the optimiser keeps.
        unsafe { zeroize::zeroize_flat_type(p) };
    }
}

// LessSafeKey must stay free of drop glue for the wipe above to be sound.
const _: () = assert!(!std::mem::needs_drop::<LessSafeKey>());

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The GCM specification's Test Case 4 (McGrew & Viega; also NIST's
    /// gcmEncryptExtIV128 set): AES-128, 96-bit IV split as RFC 4106 does
    /// (salt ‖ explicit IV), 20 octets of AAD, 60 of plaintext.
    /// RFC 7539 §2.8.2 (the AEAD example): its 12-octet nonce is
    /// 07000000 ‖ 4041424344454647, i.e. salt ‖ IV as RFC 7634 builds it.
    #[test]
    fn chacha_rfc7539_2_8_2() {
        let key = hex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f");
        let salt = [0x07, 0, 0, 0];
        let iv: [u8; 8] = hex("4041424344454647").try_into().unwrap();
        let aad = hex("50515253c0c1c2c3c4c5c6c7");
        let plain = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.".to_vec();
        let g = RingAead::new_chacha(&key, salt).unwrap();
        let mut data = plain.clone();
        let mut tag = [0u8; 16];
        g.seal(&iv, &aad, &mut data, &mut tag);
        assert_eq!(&data[..16], &hex("d31a8d34648e60db7b86afbc53ef7ec2")[..]);
        assert_eq!(tag.to_vec(), hex("1ae10b594f09e26a7e902ecbd0600691"));
        g.open(&iv, &aad, &mut data, &tag).unwrap();
        assert_eq!(data, plain);
        tag[3] ^= 4;
        assert_eq!(g.open(&iv, &aad, &mut data, &tag), Err(AuthError));
    }

    #[test]
    fn gcm_spec_test_case_4() {
        let key = hex("feffe9928665731c6d6a8f9467308308");
        let salt = [0xca, 0xfe, 0xba, 0xbe];
        let iv: [u8; 8] = hex("facedbaddecaf888").try_into().unwrap();
        let aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let plain = hex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39");
        let g = RingAead::new(&key, salt).unwrap();
        let mut data = plain.clone();
        let mut tag = [0u8; 16];
        g.seal(&iv, &aad, &mut data, &mut tag);
        assert_eq!(data, hex("42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091"));
        assert_eq!(tag.to_vec(), hex("5bc94fbc3221a5db94fae95ae7121a47"));
        g.open(&iv, &aad, &mut data, &tag).unwrap();
        assert_eq!(data, plain);
        // Any flipped bit of tag, AAD or ciphertext fails.
        g.seal(&iv, &aad, &mut data, &mut tag);
        let mut bad = tag;
        bad[15] ^= 0x80;
        assert_eq!(g.open(&iv, &aad, &mut data.clone(), &bad), Err(AuthError));
        let mut a2 = aad.clone();
        a2[0] ^= 1;
        assert_eq!(g.open(&iv, &a2, &mut data.clone(), &tag), Err(AuthError));
        let mut c2 = data.clone();
        c2[59] ^= 1;
        assert_eq!(g.open(&iv, &aad, &mut c2, &tag), Err(AuthError));
        assert!(RingAead::new(&[0u8; 24], salt).is_err());
    }
}
