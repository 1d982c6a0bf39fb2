//! The ESP transform seam (as in rustls' `crypto::cipher`): one small type per
//! algorithm, chosen once per SA at install time, keys expanded once and
//! zeroized on drop. [`Transform`] is an enum rather than a trait object: the
//! per-packet call is a match, not a virtual call.
//!
//! Every transform works on the ESP region `SPI ‖ seq-lo ‖ IV ‖ plaintext`
//! (plaintext = payload ‖ padding ‖ pad length ‖ next header) and a detached
//! ICV, and builds what it authenticates from it itself: RFC 4106/7634 AAD,
//! RFC 4543 AAD, or the RFC 4303 §2.8 ICV input for encrypt-then-MAC.
//!
//! Algorithms (RFC 8221):
//!
//! | config | RFC | IV | ICV | align |
//! |---|---|---|---|---|
//! | `aead 'rfc4106(gcm(aes))'` | 4106 | 8 | 8/12/16 | 4 |
//! | `aead 'rfc7539esp(chacha20,poly1305)'` | 7634 | 8 | 16 | 4 |
//! | `aead 'rfc4543(gcm(aes))'` (integrity only) | 4543 | 8 | 16 | 4 |
//! | `enc 'cbc(aes)'` + `auth-trunc 'hmac(sha256)' … 128` | 3602, 4868 | 16 | 16 | 16 |
//! | `enc 'ecb(cipher_null)'` + `auth-trunc 'hmac(sha256)' … 128` (integrity only) | 2410, 4868 | 0 | 16 | 4 |

pub mod cbc_hmac;
pub mod chacha;
pub mod gcm;

/// Hex test vectors, whitespace allowed (for the algorithm modules' tests).
#[cfg(test)]
pub(crate) fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The ICV did not verify. Nothing about *why* is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthError;

/// Key material was the wrong length for the algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLenError;

/// An SA's ESP transform.
pub enum Transform {
    /// AES-GCM, RFC 4106.
    Gcm(gcm::AesGcm),
    /// AES-GMAC, RFC 4543: integrity only, the payload travels in clear.
    Gmac(gcm::AesGcm),
    /// ChaCha20-Poly1305, RFC 7634.
    ChaCha(chacha::ChaChaPoly),
    /// AES-CBC (RFC 3602) or NULL (RFC 2410) with HMAC-SHA-256-128 (RFC 4868),
    /// encrypt-then-MAC.
    ///
    /// Boxed: its key schedules (AES both ways, HMAC's inner and outer
    /// states) are a kilobyte, and every SA's transform is as large as the
    /// largest variant.
    CbcHmac(Box<cbc_hmac::CbcHmac>),
    /// Benchmarks only: ESP framing with no cipher and a zero 16-octet ICV,
    /// to measure the I/O path without crypto (`espd run --bench-no-crypto`
    /// on both gateways). Never produced by a configuration: it protects nothing.
    BenchNoCrypto,
}

/// Octets before the IV: SPI and the low 32 bits of the sequence number.
const HDR: usize = 8;

/// RFC 4106 §5 / RFC 4303 §2.2.1: SPI ‖ seq (8 octets), or SPI ‖ seq-hi ‖
/// seq-lo (12) with ESN.
fn aead_aad(esp: &[u8], seq_hi: Option<u32>) -> ([u8; 12], usize) {
    let mut a = [0u8; 12];
    a[..4].copy_from_slice(&esp[..4]);
    match seq_hi {
        Some(hi) => {
            a[4..8].copy_from_slice(&hi.to_be_bytes());
            a[8..12].copy_from_slice(&esp[4..8]);
            (a, 12)
        }
        None => {
            a[4..8].copy_from_slice(&esp[4..8]);
            (a, 8)
        }
    }
}

impl Transform {
    /// Explicit IV octets carried in each packet.
    pub fn iv_len(&self) -> usize {
        match self {
            Transform::Gcm(_)
            | Transform::Gmac(_)
            | Transform::ChaCha(_)
            | Transform::BenchNoCrypto => 8,
            Transform::CbcHmac(c) => c.iv_len(),
        }
    }
    /// ICV octets at the end of each packet.
    pub fn icv_len(&self) -> usize {
        match self {
            Transform::Gcm(g) | Transform::Gmac(g) => g.icv_len(),
            Transform::ChaCha(_) => chacha::ICV_LEN,
            Transform::CbcHmac(_) => cbc_hmac::ICV_LEN,
            Transform::BenchNoCrypto => 16,
        }
    }
    /// Alignment of payload ‖ padding ‖ trailer (RFC 4303 §2.4: at least 4;
    /// the block size for CBC).
    pub fn align(&self) -> usize {
        match self {
            Transform::CbcHmac(c) => c.align(),
            _ => 4,
        }
    }
    /// True when the payload is encrypted (false for GMAC and NULL).
    pub fn encrypts(&self) -> bool {
        match self {
            Transform::Gmac(_) | Transform::BenchNoCrypto => false,
            Transform::CbcHmac(c) => c.encrypts(),
            _ => true,
        }
    }

    /// Writes the IV for the packet with 64-bit sequence number `seq`.
    /// Counter-mode IVs (RFC 4106 §3.1, RFC 7634 §2) must be unique: seq ⊕
    /// mask is (seq never repeats). A CBC IV must be unpredictable
    /// (RFC 3602 §3): see [`cbc_hmac::CbcHmac::make_iv`].
    pub fn make_iv(&self, seq: u64, mask: u64, iv: &mut [u8]) {
        match self {
            Transform::CbcHmac(c) => c.make_iv(seq, mask, iv),
            _ => iv.copy_from_slice(&(seq ^ mask).to_be_bytes()[..iv.len()]),
        }
    }

    /// Protects `esp` = SPI ‖ seq-lo ‖ IV ‖ plaintext in place (the plaintext
    /// is encrypted unless the algorithm is integrity-only) and writes the ICV.
    /// `seq_hi` is the high half of the sequence number when ESN is on.
    pub fn seal(&self, esp: &mut [u8], seq_hi: Option<u32>, icv: &mut [u8]) {
        let iv_len = self.iv_len();
        match self {
            Transform::Gcm(g) => {
                let (a, n) = aead_aad(esp, seq_hi);
                let (head, data) = esp.split_at_mut(HDR + iv_len);
                let iv: [u8; 8] = head[HDR..].try_into().expect("8-octet IV");
                g.seal(&iv, &a[..n], data, icv);
            }
            Transform::ChaCha(c) => {
                let (a, n) = aead_aad(esp, seq_hi);
                let (head, data) = esp.split_at_mut(HDR + iv_len);
                let iv: [u8; 8] = head[HDR..].try_into().expect("8-octet IV");
                c.seal(&iv, &a[..n], data, icv);
            }
            Transform::Gmac(g) => {
                let iv: [u8; 8] = esp[HDR..HDR + 8].try_into().expect("8-octet IV");
                g.gmac(&iv, &gmac_aad(esp, seq_hi), icv);
            }
            Transform::CbcHmac(c) => c.seal(esp, seq_hi, icv),
            Transform::BenchNoCrypto => icv.fill(0),
        }
    }

    /// Verifies the ICV, then decrypts in place. On error `esp` holds no
    /// plaintext: left as it was, or its payload wiped (ring's AES-GCM); the
    /// caller drops the packet either way.
    pub fn open(&self, esp: &mut [u8], seq_hi: Option<u32>, icv: &[u8]) -> Result<(), AuthError> {
        let iv_len = self.iv_len();
        match self {
            Transform::Gcm(g) => {
                let (a, n) = aead_aad(esp, seq_hi);
                let (head, data) = esp.split_at_mut(HDR + iv_len);
                let iv: [u8; 8] = head[HDR..].try_into().expect("8-octet IV");
                g.open(&iv, &a[..n], data, icv)
            }
            Transform::ChaCha(c) => {
                let (a, n) = aead_aad(esp, seq_hi);
                let (head, data) = esp.split_at_mut(HDR + iv_len);
                let iv: [u8; 8] = head[HDR..].try_into().expect("8-octet IV");
                c.open(&iv, &a[..n], data, icv)
            }
            Transform::Gmac(g) => {
                let iv: [u8; 8] = esp[HDR..HDR + 8].try_into().expect("8-octet IV");
                g.verify_gmac(&iv, &gmac_aad(esp, seq_hi), icv)
            }
            Transform::CbcHmac(c) => c.open(esp, seq_hi, icv),
            Transform::BenchNoCrypto if icv.iter().all(|b| *b == 0) => Ok(()),
            Transform::BenchNoCrypto => Err(AuthError),
        }
    }
}

/// RFC 4543 §3.3 (ENCR_NULL_AUTH_AES_GMAC): the AAD is SPI ‖ [seq-hi] ‖
/// seq-lo ‖ IV ‖ payload ‖ padding ‖ trailer, and nothing is encrypted.
fn gmac_aad<'a>(esp: &'a [u8], seq_hi: Option<u32>) -> GmacAad<'a> {
    GmacAad {
        spi: &esp[..4],
        hi: seq_hi.map(u32::to_be_bytes),
        rest: &esp[4..],
    }
}

/// The three pieces of a GMAC AAD (the ESN high word sits between SPI and the rest).
pub struct GmacAad<'a> {
    pub spi: &'a [u8],
    pub hi: Option<[u8; 4]>,
    pub rest: &'a [u8],
}

impl core::fmt::Debug for Transform {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never print key material.
        match self {
            Transform::Gcm(g) => write!(
                f,
                "rfc4106(gcm(aes)) {} icv {}",
                g.key_bits(),
                g.icv_len() * 8
            ),
            Transform::Gmac(g) => write!(f, "rfc4543(gcm(aes)) {}", g.key_bits()),
            Transform::ChaCha(_) => f.write_str("rfc7539esp(chacha20,poly1305)"),
            Transform::CbcHmac(c) => write!(f, "{} + hmac(sha256) 128", c.enc_name()),
            Transform::BenchNoCrypto => f.write_str("bench-no-crypto (unprotected)"),
        }
    }
}
