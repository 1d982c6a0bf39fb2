//! AES-CBC (RFC 3602) or NULL encryption (RFC 2410) with HMAC-SHA-256-128
//! (RFC 4868), encrypt-then-MAC as RFC 4303 §3.3.2 orders it. Primitives from
//! the RustCrypto `aes`, `cbc`, `hmac` and `sha2` crates.
//!
//! The ICV covers SPI ‖ seq-lo ‖ IV ‖ ciphertext, followed by seq-hi when ESN
//! is on (RFC 4303 §2.2.1 and §3.3.2.1: the high half is appended for the ICV
//! computation only). It is checked in constant time before any decryption.
//!
//! The HMAC is keyed per packet from the raw key, which is held in a
//! `Zeroizing` buffer: the `hmac` crate's precomputed state would not be
//! zeroized on drop. (The inner/outer key blocks cost two SHA-256 compressions
//! per packet; SHA-NI makes that small.)

use super::{AuthError, KeyLenError};
use aes::cipher::block_padding::NoPadding;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecryptMut, BlockEncrypt, BlockEncryptMut, InnerIvInit, KeyInit};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// RFC 4868 §2.3: HMAC-SHA-256-128 truncates to 128 bits.
pub const ICV_LEN: usize = 16;
/// RFC 4868 §2.1.1: the key is 256 bits.
pub const AUTH_KEY_LEN: usize = 32;
const HDR: usize = 8;

#[allow(clippy::large_enum_variant)]
enum Cipher {
    Null,
    Aes128(aes::Aes128),
    Aes256(aes::Aes256),
}

pub struct CbcHmac {
    cipher: Cipher,
    auth_key: Zeroizing<[u8; AUTH_KEY_LEN]>,
}

macro_rules! with_aes {
    ($self:expr, $c:ident => $body:expr, null => $null:expr) => {
        match &$self.cipher {
            Cipher::Null => $null,
            Cipher::Aes128($c) => $body,
            Cipher::Aes256($c) => $body,
        }
    };
}

impl CbcHmac {
    /// `enc_key`: 16 or 32 octets for AES-CBC, `None` for NULL encryption.
    /// `auth_key`: 32 octets.
    pub fn new(enc_key: Option<&[u8]>, auth_key: &[u8]) -> Result<Self, KeyLenError> {
        let cipher = match enc_key {
            None => Cipher::Null,
            Some(k) if k.len() == 16 => {
                Cipher::Aes128(aes::Aes128::new(GenericArray::from_slice(k)))
            }
            Some(k) if k.len() == 32 => {
                Cipher::Aes256(aes::Aes256::new(GenericArray::from_slice(k)))
            }
            Some(_) => return Err(KeyLenError),
        };
        if auth_key.len() != AUTH_KEY_LEN {
            return Err(KeyLenError);
        }
        let mut k = Zeroizing::new([0u8; AUTH_KEY_LEN]);
        k.copy_from_slice(auth_key);
        Ok(CbcHmac {
            cipher,
            auth_key: k,
        })
    }

    pub fn encrypts(&self) -> bool {
        !matches!(self.cipher, Cipher::Null)
    }
    pub fn iv_len(&self) -> usize {
        if self.encrypts() {
            16
        } else {
            0
        }
    }
    pub fn align(&self) -> usize {
        if self.encrypts() {
            16
        } else {
            4
        }
    }
    pub fn enc_name(&self) -> &'static str {
        with_aes!(self, _c => "cbc(aes)", null => "ecb(cipher_null)")
    }

    /// RFC 3602 §3: the IV must be unpredictable. NIST SP 800-38A Appendix C:
    /// encrypting a nonce under the cipher key gives such an IV; the nonce is
    /// seq ⊕ mask, unique for the SA's life.
    pub fn make_iv(&self, seq: u64, mask: u64, iv: &mut [u8]) {
        let mut b = GenericArray::from([0u8; 16]);
        b[..8].copy_from_slice(&(seq ^ mask).to_be_bytes());
        b[8..].copy_from_slice(&mask.rotate_left(32).to_be_bytes());
        with_aes!(self, c => c.encrypt_block(&mut b), null => {});
        let n = iv.len().min(16);
        iv[..n].copy_from_slice(&b[..n]);
    }

    fn icv(&self, esp: &[u8], seq_hi: Option<u32>) -> [u8; 32] {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.auth_key[..]).expect("any key length");
        m.update(esp);
        if let Some(hi) = seq_hi {
            m.update(&hi.to_be_bytes());
        }
        m.finalize().into_bytes().into()
    }

    pub fn seal(&self, esp: &mut [u8], seq_hi: Option<u32>, icv: &mut [u8]) {
        let iv_len = self.iv_len();
        let (head, data) = esp.split_at_mut(HDR + iv_len);
        let n = data.len();
        // (NULL has no IV: it is read only for AES.)
        with_aes!(self, c => {
            cbc::Encryptor::inner_iv_init(c, GenericArray::from_slice(&head[HDR..]))
                .encrypt_padded_mut::<NoPadding>(data, n)
                .expect("ESP padding makes the payload block-aligned");
        }, null => {});
        let t = self.icv(esp, seq_hi);
        icv[..ICV_LEN].copy_from_slice(&t[..ICV_LEN]);
    }

    pub fn open(&self, esp: &mut [u8], seq_hi: Option<u32>, icv: &[u8]) -> Result<(), AuthError> {
        let t = self.icv(esp, seq_hi);
        if icv.len() != ICV_LEN || !bool::from(t[..ICV_LEN].ct_eq(icv)) {
            return Err(AuthError);
        }
        let iv_len = self.iv_len();
        let (head, data) = esp.split_at_mut(HDR + iv_len);
        with_aes!(self, c => {
            cbc::Decryptor::inner_iv_init(c, GenericArray::from_slice(&head[HDR..]))
                .decrypt_padded_mut::<NoPadding>(data)
                .map_err(|_| AuthError)?;
        }, null => {});
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::hex;

    /// RFC 3602 §4 Case #1: AES-128-CBC, one block.
    #[test]
    fn rfc3602_case_1() {
        let c = CbcHmac::new(Some(&hex("06a9214036b8a15b512e03d534120006")), &[0; 32]).unwrap();
        let mut esp = vec![0u8; 8];
        esp.extend(hex("3dafba429d9eb430b422da802c9fac41"));
        esp.extend(b"Single block msg");
        let mut icv = [0u8; 16];
        c.seal(&mut esp, None, &mut icv);
        assert_eq!(esp[24..], hex("e353779c1079aeb82708942dbe77181a")[..]);
        c.open(&mut esp, None, &icv).unwrap();
        assert_eq!(&esp[24..], b"Single block msg");
    }

    /// RFC 4231 §4.2 test case 1, key 0x0b × 20 → 32 (the ICV is the leading
    /// 16 octets of HMAC-SHA-256): check against the full-length key version.
    #[test]
    fn hmac_truncation_and_esn_position() {
        let key = [0x0bu8; 32];
        let c = CbcHmac::new(None, &key).unwrap();
        let mut esp = b"\x00\x00\x10\x00\x00\x00\x00\x01payload!".to_vec();
        let mut icv = [0u8; 16];
        c.seal(&mut esp, Some(7), &mut icv);
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap();
        m.update(&esp);
        m.update(&[0, 0, 0, 7]); // seq-hi appended after the payload (RFC 4303 §3.3.2.1)
        assert_eq!(icv, m.finalize().into_bytes()[..16]);
        c.open(&mut esp, Some(7), &icv).unwrap();
        assert_eq!(c.open(&mut esp, Some(8), &icv), Err(AuthError));
        assert_eq!(c.open(&mut esp, None, &icv), Err(AuthError));
    }

    #[test]
    fn tamper_refused_before_decrypting() {
        let c = CbcHmac::new(Some(&[1u8; 32]), &[2u8; 32]).unwrap();
        let mut esp = vec![0u8; 8 + 16 + 32];
        c.make_iv(5, 9, &mut esp[8..24]);
        let mut icv = [0u8; 16];
        c.seal(&mut esp, None, &mut icv);
        let sealed = esp.clone();
        for i in 0..esp.len() {
            esp[i] ^= 1;
            assert_eq!(c.open(&mut esp, None, &icv), Err(AuthError), "byte {i}");
            esp[i] ^= 1;
            assert_eq!(esp, sealed);
        }
        // IVs differ per sequence number and are not the counter itself.
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        c.make_iv(1, 9, &mut a);
        c.make_iv(2, 9, &mut b);
        assert_ne!(a, b);
        assert_ne!(&a[..8], &(1u64 ^ 9).to_be_bytes());
        assert!(CbcHmac::new(Some(&[0; 24]), &[0; 32]).is_err());
        assert!(CbcHmac::new(None, &[0; 20]).is_err());
    }
}
