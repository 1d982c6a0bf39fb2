//! ChaCha20-Poly1305 for ESP, RFC 7634: ring's assembly through espd-aead
//! with the `ring` feature (the default; about 10× faster on small packets
//! here), the RustCrypto `chacha20poly1305` crate without it. Both keys are
//! zeroized on drop.

use super::{AuthError, KeyLenError};
use chacha20poly1305::aead::generic_array::GenericArray;
use chacha20poly1305::{AeadInPlace, ChaCha20Poly1305, KeyInit};
use zeroize::Zeroize;

/// RFC 7634 §2: the ICV is the full 16-octet Poly1305 tag.
pub const ICV_LEN: usize = 16;

/// An expanded ChaCha20-Poly1305 key and its salt, on one provider: ring's
/// key sits inline (one block with the SA's core, as for AES-GCM).
pub struct ChaChaPoly(Provider);

// The composition is 36 octets, ring's key schedule 544: clippy's
// large-variant rule would box ring's, the one every packet reads.
#[allow(clippy::large_enum_variant)]
enum Provider {
    #[cfg(feature = "ring")]
    Ring(espd_aead::RingAead),
    Composition(Composition),
}

struct Composition {
    aead: ChaCha20Poly1305,
    salt: [u8; 4],
}

impl Drop for Composition {
    fn drop(&mut self) {
        // The ChaCha20 key zeroizes itself (crate feature).
        self.salt.zeroize();
    }
}

impl ChaChaPoly {
    /// RFC 7634 §4 (KEYMAT): a 32-octet key followed by a 4-octet salt.
    pub fn new(keymat: &[u8]) -> Result<Self, KeyLenError> {
        if keymat.len() != 36 {
            return Err(KeyLenError);
        }
        let mut salt = [0u8; 4];
        salt.copy_from_slice(&keymat[32..]);
        #[cfg(feature = "ring")]
        if let Ok(r) = espd_aead::RingAead::new_chacha(&keymat[..32], salt) {
            salt.zeroize();
            return Ok(ChaChaPoly(Provider::Ring(r)));
        }
        Ok(ChaChaPoly(Provider::Composition(Composition {
            aead: ChaCha20Poly1305::new(GenericArray::from_slice(&keymat[..32])),
            salt,
        })))
    }

    // Without ring, the match below has one arm.
    #[cfg_attr(not(feature = "ring"), allow(clippy::infallible_destructuring_match))]
    pub fn seal(&self, iv: &[u8; 8], aad: &[u8], data: &mut [u8], icv: &mut [u8]) {
        let c = match &self.0 {
            #[cfg(feature = "ring")]
            Provider::Ring(r) => {
                // The engine passes ICV_LEN octets.
                let icv = icv
                    .first_chunk_mut::<ICV_LEN>()
                    .expect("a 16-octet ICV for ChaCha20-Poly1305");
                return r.seal(iv, aad, data, icv);
            }
            Provider::Composition(c) => c,
        };
        let n = c.nonce(iv);
        let tag = c
            .aead
            .encrypt_in_place_detached(GenericArray::from_slice(&n), aad, data)
            .expect("ESP payloads are far below the ChaCha20 length limit");
        icv[..ICV_LEN].copy_from_slice(&tag);
    }

    #[cfg_attr(not(feature = "ring"), allow(clippy::infallible_destructuring_match))]
    pub fn open(
        &self,
        iv: &[u8; 8],
        aad: &[u8],
        data: &mut [u8],
        icv: &[u8],
    ) -> Result<(), AuthError> {
        let icv = icv
            .first_chunk::<ICV_LEN>()
            .filter(|_| icv.len() == ICV_LEN)
            .ok_or(AuthError)?;
        let c = match &self.0 {
            #[cfg(feature = "ring")]
            Provider::Ring(r) => return r.open(iv, aad, data, icv).map_err(|_| AuthError),
            Provider::Composition(c) => c,
        };
        let n = c.nonce(iv);
        // The crate verifies the tag in constant time before it decrypts.
        c.aead
            .decrypt_in_place_detached(
                GenericArray::from_slice(&n),
                aad,
                data,
                GenericArray::from_slice(icv),
            )
            .map_err(|_| AuthError)
    }
}

impl Composition {
    /// RFC 7634 §2: nonce = salt ‖ IV.
    fn nonce(&self, iv: &[u8; 8]) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.salt);
        n[4..].copy_from_slice(iv);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::hex;

    /// RFC 7539 §2.8.2 (the AEAD example): key, nonce = 07000000 ‖ 4041424344454647,
    /// AAD 50515253c0c1c2c3c4c5c6c7, the "sunscreen" plaintext → its tag.
    /// In RFC 7634 terms the salt is 07000000 and the IV 4041424344454647.
    #[test]
    fn rfc7539_aead_example() {
        let mut keymat = hex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f");
        keymat.extend(hex("07000000"));
        let c = ChaChaPoly::new(&keymat).unwrap();
        let iv: [u8; 8] = hex("4041424344454647").try_into().unwrap();
        let aad = hex("50515253c0c1c2c3c4c5c6c7");
        let pt = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let mut data = pt.to_vec();
        let mut icv = [0u8; 16];
        c.seal(&iv, &aad, &mut data, &mut icv);
        assert_eq!(&data[..16], &hex("d31a8d34648e60db7b86afbc53ef7ec2")[..]);
        assert_eq!(icv.to_vec(), hex("1ae10b594f09e26a7e902ecbd0600691"));
        c.open(&iv, &aad, &mut data, &icv).unwrap();
        assert_eq!(&data[..], &pt[..]);
        icv[3] ^= 4;
        assert_eq!(c.open(&iv, &aad, &mut data, &icv), Err(AuthError));
        assert!(ChaChaPoly::new(&keymat[..32]).is_err());
    }
}
