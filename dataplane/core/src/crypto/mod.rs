//! The AEAD provider seam (as in rustls' `crypto::cipher`): one small type per
//! algorithm that seals and opens in place with a detached tag. Keys are
//! expanded once when an SA is installed and zeroized when it is dropped.
//!
//! [`Transform`] is an enum rather than a trait object: the algorithm is
//! chosen once per SA at install time, and the per-packet call is a match.

pub mod gcm;

/// The ICV did not verify. Nothing about *why* is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthError;

/// Key material was the wrong length for the algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLenError;

/// An SA's ESP transform: the cipher state plus the per-SA constants
/// the packet code needs (IV length, ICV length, block alignment).
pub enum Transform {
    /// AES-GCM per RFC 4106 (`rfc4106(gcm(aes))`).
    Gcm(gcm::AesGcm),
}

impl Transform {
    /// Explicit IV octets carried in each packet.
    pub fn iv_len(&self) -> usize {
        match self {
            Transform::Gcm(_) => gcm::IV_LEN,
        }
    }
    /// ICV octets at the end of each packet.
    pub fn icv_len(&self) -> usize {
        match self {
            Transform::Gcm(g) => g.icv_len(),
        }
    }
    /// Alignment of payload+padding+trailer (RFC 4303 §2.4: at least 4).
    pub fn align(&self) -> usize {
        match self {
            Transform::Gcm(_) => 4,
        }
    }
    /// Encrypts `data` in place and writes the ICV to `icv`.
    /// `aad` is SPI ‖ seq (or SPI ‖ seq-hi ‖ seq-lo with ESN), RFC 4106 §5.
    pub fn seal(&self, iv: &[u8; 8], aad: &[u8], data: &mut [u8], icv: &mut [u8]) {
        match self {
            Transform::Gcm(g) => g.seal(iv, aad, data, icv),
        }
    }
    /// Verifies the ICV and decrypts `data` in place; on error `data` is untouched.
    pub fn open(
        &self,
        iv: &[u8; 8],
        aad: &[u8],
        data: &mut [u8],
        icv: &[u8],
    ) -> Result<(), AuthError> {
        match self {
            Transform::Gcm(g) => g.open(iv, aad, data, icv),
        }
    }
}

impl core::fmt::Debug for Transform {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never print key material.
        match self {
            Transform::Gcm(g) => write!(f, "rfc4106(gcm(aes)) icv {}", g.icv_len() * 8),
        }
    }
}
