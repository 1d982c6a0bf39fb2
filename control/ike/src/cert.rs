//! Certificate authentication (RFC 7296 §2.15, §3.6–3.8; RFC 7427):
//! our certificate and private key, the trusted CAs and CRLs, signing the
//! AUTH octets and checking a peer's chain, identity and signature.
//!
//! Chains are validated by rustls-webpki (validity dates, CA constraints,
//! name constraints, CRLs); signatures are made and checked by aws-lc-rs.
//! Nothing is parsed here but PEM armour and the RFC 7427 AlgorithmIdentifier
//! that starts a Digital Signature AUTH payload.

use crate::wire::{idt, Id};
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use rustls_pki_types::{CertificateDer, ServerName, SignatureVerificationAlgorithm, UnixTime};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use webpki::aws_lc_rs as algs;

/// RFC 7296 §3.8: authentication methods.
pub const AUTH_RSA: u8 = 1;
pub const AUTH_ECDSA_256: u8 = 9;
pub const AUTH_ECDSA_384: u8 = 10;
pub const AUTH_ECDSA_521: u8 = 11;
/// RFC 7427 §3: Digital Signature.
pub const AUTH_DIGITAL_SIGNATURE: u8 = 14;
/// RFC 7296 §3.6: X.509 Certificate - Signature.
pub const CERT_X509: u8 = 4;
/// RFC 7427 §4: the hashes we take in SIGNATURE_HASH_ALGORITHMS (SHA2-256,
/// -384, -512, and Identity for Ed25519).
pub const HASHES: [u16; 4] = [2, 3, 4, 5];

// RFC 7427 Appendix A: AlgorithmIdentifier DER.
const ALG_ECDSA_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];
const ALG_ECDSA_SHA384: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03,
];
const ALG_ECDSA_SHA512: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04,
];
const ALG_RSA_SHA256: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05, 0x00,
];
const ALG_RSA_SHA384: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c, 0x05, 0x00,
];
const ALG_RSA_SHA512: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d, 0x05, 0x00,
];
const ALG_ED25519: &[u8] = &[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];

/// The DER blocks of a PEM file (every `-----BEGIN label-----`), or the
/// file itself if it is DER.
pub fn read_pem(path: &Path, label: &str) -> Result<Vec<Vec<u8>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return Ok(vec![bytes]);
    };
    if !text.contains("-----BEGIN") {
        return Ok(vec![bytes]);
    }
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with("-----BEGIN ") {
            if l.contains(label) {
                cur = Some(String::new());
            }
        } else if l.starts_with("-----END ") {
            if let Some(b) = cur.take() {
                out.push(
                    crate::conf::base64(&b)
                        .ok_or_else(|| format!("{}: bad base64 in PEM", path.display()))?,
                );
            }
        } else if let Some(b) = cur.as_mut() {
            b.push_str(l);
        }
    }
    if out.is_empty() {
        return Err(format!("{}: no `{label}` PEM block", path.display()));
    }
    Ok(out)
}

/// A private key.
pub enum Signer {
    Ecdsa(EcdsaKeyPair, u16),
    Rsa(RsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signer::Ecdsa(_, 256) => "Signer(ECDSA P-256, <redacted>)",
            Signer::Ecdsa(..) => "Signer(ECDSA, <redacted>)",
            Signer::Rsa(_) => "Signer(RSA, <redacted>)",
            Signer::Ed25519(_) => "Signer(Ed25519, <redacted>)",
        })
    }
}

impl Signer {
    /// A key file: PKCS#8, SEC1 (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE
    /// KEY`), PEM or DER. aws-lc-rs keeps the key material and wipes it.
    pub fn load(path: &Path) -> Result<Signer, String> {
        let ders = read_pem(path, "PRIVATE KEY")?;
        let der = &ders[0];
        let bad = || {
            format!(
                "{}: not an ECDSA (P-256, P-384, P-521), RSA or Ed25519 private key",
                path.display()
            )
        };
        for (alg, bits) in [
            (&signature::ECDSA_P256_SHA256_ASN1_SIGNING, 256),
            (&signature::ECDSA_P384_SHA384_ASN1_SIGNING, 384),
            (&signature::ECDSA_P521_SHA512_ASN1_SIGNING, 521),
        ] {
            if let Ok(k) = EcdsaKeyPair::from_private_key_der(alg, der) {
                return Ok(Signer::Ecdsa(k, bits));
            }
        }
        if let Ok(k) = RsaKeyPair::from_pkcs8(der).or_else(|_| RsaKeyPair::from_der(der)) {
            return Ok(Signer::Rsa(k));
        }
        if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            return Ok(Signer::Ed25519(k));
        }
        Err(bad())
    }

    pub fn public(&self) -> Vec<u8> {
        match self {
            Signer::Ecdsa(k, _) => k.public_key().as_ref().to_vec(),
            Signer::Rsa(k) => k.public_key().as_ref().to_vec(),
            Signer::Ed25519(k) => k.public_key().as_ref().to_vec(),
        }
    }

    /// RFC 7427 §3: AUTH data = AlgorithmIdentifier length ‖ AlgorithmIdentifier
    /// ‖ signature over the octets. RSA signs PKCS#1 v1.5 with SHA-256 (never
    /// RustCrypto's `rsa`: aws-lc-rs).
    /// The classic method (RFC 7296 §3.8: 9–11 for ECDSA, RFC 4754) and
    /// signature over `octets`, for a peer that did not announce RFC 7427
    /// hashes; None for keys that only sign with RFC 7427 here.
    pub fn sign_classic(&self, octets: &[u8]) -> Option<(u8, Vec<u8>)> {
        let Signer::Ecdsa(k, bits) = self else {
            return None;
        };
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let der = k.sign(&rng, octets).ok()?;
        let (m, n) = match bits {
            256 => (AUTH_ECDSA_256, 32),
            384 => (AUTH_ECDSA_384, 48),
            _ => (AUTH_ECDSA_521, 66),
        };
        Some((m, ecdsa_der_to_fixed(der.as_ref(), n)?))
    }

    pub fn sign(&self, octets: &[u8]) -> Result<Vec<u8>, String> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let (alg, sig) = match self {
            Signer::Ecdsa(k, bits) => (
                match bits {
                    256 => ALG_ECDSA_SHA256,
                    384 => ALG_ECDSA_SHA384,
                    _ => ALG_ECDSA_SHA512,
                },
                k.sign(&rng, octets)
                    .map_err(|_| "ECDSA signing failed")?
                    .as_ref()
                    .to_vec(),
            ),
            Signer::Rsa(k) => {
                let mut sig = vec![0u8; k.public_modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, octets, &mut sig)
                    .map_err(|_| "RSA signing failed")?;
                (ALG_RSA_SHA256, sig)
            }
            Signer::Ed25519(k) => (ALG_ED25519, k.sign(octets).as_ref().to_vec()),
        };
        let mut out = vec![alg.len() as u8];
        out.extend_from_slice(alg);
        out.extend_from_slice(&sig);
        Ok(out)
    }
}

/// Our side: the certificate we send and the key that signs for it.
#[derive(Debug)]
pub struct Credential {
    pub cert: Vec<u8>,
    pub key: Signer,
}

/// What we trust: CA certificates and CRLs (DER).
#[derive(Debug, Default, Clone)]
pub struct Trust {
    pub cas: Vec<Vec<u8>>,
    pub crls: Vec<Vec<u8>>,
}

/// The signature algorithms a chain may use.
static CHAIN_ALGS: &[&dyn SignatureVerificationAlgorithm] = &[
    algs::ECDSA_P256_SHA256,
    algs::ECDSA_P256_SHA384,
    algs::ECDSA_P384_SHA256,
    algs::ECDSA_P384_SHA384,
    algs::ECDSA_P521_SHA256,
    algs::ECDSA_P521_SHA384,
    algs::ECDSA_P521_SHA512,
    algs::RSA_PKCS1_2048_8192_SHA256,
    algs::RSA_PKCS1_2048_8192_SHA384,
    algs::RSA_PKCS1_2048_8192_SHA512,
    algs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    algs::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    algs::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
    algs::ED25519,
];

impl Trust {
    /// RFC 7296 §3.7: CERTREQ data for X.509 is the SHA-1 hashes of the
    /// trusted CAs' SubjectPublicKeyInfo, concatenated.
    pub fn certreq(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for ca in &self.cas {
            let der = CertificateDer::from(ca.as_slice());
            if let Ok(a) = webpki::anchor_from_trusted_cert(&der) {
                let spki = webpki::spki_for_anchor(&a);
                out.extend_from_slice(
                    aws_lc_rs::digest::digest(
                        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
                        spki.as_ref(),
                    )
                    .as_ref(),
                );
            }
        }
        out
    }

    /// Checks the peer's certificate (and intermediates) up to one of our
    /// CAs at `now`, against the CRLs, and that it names `id` (RFC 7296
    /// §3.5: FQDN and IP against subjectAltName). Then checks `auth`
    /// (method, data) over `octets` with its key.
    pub fn verify(
        &self,
        chain: &[Vec<u8>],
        id: &Id,
        method: u8,
        auth: &[u8],
        octets: &[u8],
        now: std::time::SystemTime,
    ) -> Result<(), String> {
        let Some(ee) = chain.first() else {
            return Err("the peer sent no certificate".into());
        };
        let ee_der = CertificateDer::from(ee.as_slice());
        let cert = webpki::EndEntityCert::try_from(&ee_der)
            .map_err(|e| format!("the peer's certificate does not parse: {e:?}"))?;
        let ca_ders: Vec<CertificateDer> = self
            .cas
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let anchors: Vec<_> = ca_ders
            .iter()
            .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
            .collect();
        if anchors.is_empty() {
            return Err("no trusted CA is configured (remote cacerts, or x509ca/)".into());
        }
        let inter: Vec<CertificateDer> = chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let crls: Vec<webpki::CertRevocationList> = self
            .crls
            .iter()
            .filter_map(|c| webpki::BorrowedCertRevocationList::from_der(c).ok())
            .map(webpki::CertRevocationList::from)
            .collect();
        let crl_refs: Vec<&webpki::CertRevocationList> = crls.iter().collect();
        let revocation = webpki::RevocationOptionsBuilder::new(&crl_refs)
            .ok()
            .map(|b| {
                b.with_depth(webpki::RevocationCheckDepth::EndEntity)
                    .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                    .build()
            });
        let t = UnixTime::since_unix_epoch(
            now.duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        // IKE certificates often carry no EKU; one that has it must allow
        // serverAuth or IPsec use as strongSwan's do (we accept any: RFC 4945
        // §5.1.3.12 says an EKU must not be required).
        cert.verify_for_usage(CHAIN_ALGS, &anchors, &inter, t, AnyEku, revocation, None)
            .map_err(|e| match e {
                webpki::Error::CertRevoked => "the peer's certificate is revoked (CRL)".to_string(),
                webpki::Error::UnknownIssuer => {
                    "the peer's certificate is not issued by a trusted CA".to_string()
                }
                webpki::Error::CertExpired { .. } => {
                    "the peer's certificate has expired".to_string()
                }
                webpki::Error::CertNotValidYet { .. } => {
                    "the peer's certificate is not valid yet".to_string()
                }
                e => format!("the peer's certificate chain does not verify: {e:?}"),
            })?;
        let name = match id.ty {
            idt::FQDN => ServerName::try_from(String::from_utf8_lossy(&id.data).into_owned())
                .map_err(|_| format!("ID {id} is not a DNS name"))?,
            idt::IPV4_ADDR if id.data.len() == 4 => {
                let a: [u8; 4] = id.data[..].try_into().unwrap_or_default();
                ServerName::IpAddress(IpAddr::V4(Ipv4Addr::from(a)).into())
            }
            idt::IPV6_ADDR if id.data.len() == 16 => {
                let a: [u8; 16] = id.data[..].try_into().unwrap_or_default();
                ServerName::IpAddress(IpAddr::V6(Ipv6Addr::from(a)).into())
            }
            _ => {
                return Err(format!(
                    "ID {id}: only FQDN and IP identities are matched against certificates so far"
                ))
            }
        };
        cert.verify_is_valid_for_subject_name(&name)
            .map_err(|_| format!("the peer's certificate does not name {id}"))?;
        let classic;
        let (cands, sig): (Vec<&dyn SignatureVerificationAlgorithm>, &[u8]) = match method {
            AUTH_DIGITAL_SIGNATURE => {
                let n = *auth.first().ok_or("empty AUTH")? as usize;
                if auth.len() < 1 + n {
                    return Err("truncated RFC 7427 AUTH".into());
                }
                let (alg, sig) = (&auth[1..1 + n], &auth[1 + n..]);
                let c: Vec<&dyn SignatureVerificationAlgorithm> = match alg {
                    a if a == ALG_ECDSA_SHA256 => vec![
                        algs::ECDSA_P256_SHA256,
                        algs::ECDSA_P384_SHA256,
                        algs::ECDSA_P521_SHA256,
                    ],
                    a if a == ALG_ECDSA_SHA384 => vec![
                        algs::ECDSA_P256_SHA384,
                        algs::ECDSA_P384_SHA384,
                        algs::ECDSA_P521_SHA384,
                    ],
                    a if a == ALG_ECDSA_SHA512 => vec![algs::ECDSA_P521_SHA512],
                    a if a == ALG_RSA_SHA256 => vec![algs::RSA_PKCS1_2048_8192_SHA256],
                    a if a == ALG_RSA_SHA384 => vec![algs::RSA_PKCS1_2048_8192_SHA384],
                    a if a == ALG_RSA_SHA512 => vec![algs::RSA_PKCS1_2048_8192_SHA512],
                    a if a == ALG_ED25519 => vec![algs::ED25519],
                    _ => {
                        return Err(
                            "the peer signs with an algorithm espd-ike does not take (RSA-PSS parameters are not read yet)"
                                .into(),
                        )
                    }
                };
                (c, sig)
            }
            // RFC 4754 §7: r ‖ s; the curve and hash are the method's.
            AUTH_ECDSA_256 | AUTH_ECDSA_384 | AUTH_ECDSA_521 => {
                classic = ecdsa_fixed_to_der(auth).ok_or("malformed ECDSA AUTH")?;
                let a: &dyn SignatureVerificationAlgorithm = match method {
                    AUTH_ECDSA_256 => algs::ECDSA_P256_SHA256,
                    AUTH_ECDSA_384 => algs::ECDSA_P384_SHA384,
                    _ => algs::ECDSA_P521_SHA512,
                };
                (vec![a], &classic[..])
            }
            AUTH_RSA => {
                return Err(
                    "AUTH method 1 (RSA with SHA-1) is not taken: espd-ike asks for RFC 7427 signatures (SIGNATURE_HASH_ALGORITHMS)"
                        .into(),
                )
            }
            m => return Err(format!("AUTH method {m} is not a signature")),
        };
        if cands
            .iter()
            .any(|a| cert.verify_signature(*a, octets, sig).is_ok())
        {
            Ok(())
        } else {
            Err("the peer's AUTH signature does not verify".into())
        }
    }
}

/// Any (or no) extended key usage.
struct AnyEku;

impl webpki::ExtendedKeyUsageValidator for AnyEku {
    fn validate(&self, _: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        Ok(())
    }
}

/// An ECDSA signature as DER `SEQUENCE { INTEGER r, INTEGER s }` from the
/// fixed r ‖ s form of the classic methods (RFC 4754 §7), or None.
fn ecdsa_fixed_to_der(sig: &[u8]) -> Option<Vec<u8>> {
    if sig.is_empty() || !sig.len().is_multiple_of(2) || sig.len() > 132 {
        return None;
    }
    let int = |x: &[u8]| {
        let mut x = x;
        while x.len() > 1 && x[0] == 0 {
            x = &x[1..];
        }
        let mut v = vec![0x02];
        let pad = x[0] & 0x80 != 0;
        v.push((x.len() + pad as usize) as u8);
        if pad {
            v.push(0);
        }
        v.extend_from_slice(x);
        v
    };
    let (r, s) = sig.split_at(sig.len() / 2);
    let body = [int(r), int(s)].concat();
    let mut out = vec![0x30];
    if body.len() >= 128 {
        out.push(0x81);
    }
    out.push(body.len() as u8);
    out.extend_from_slice(&body);
    Some(out)
}

/// The fixed r ‖ s form (each `n` octets) of a DER ECDSA signature.
fn ecdsa_der_to_fixed(der: &[u8], n: usize) -> Option<Vec<u8>> {
    let mut at = 2;
    if der.first() != Some(&0x30) || der.len() < 8 {
        return None;
    }
    if der[1] == 0x81 {
        at = 3;
    }
    let mut out = Vec::with_capacity(2 * n);
    for _ in 0..2 {
        if der.get(at) != Some(&0x02) {
            return None;
        }
        let l = *der.get(at + 1)? as usize;
        let mut x = der.get(at + 2..at + 2 + l)?;
        while x.len() > n && x[0] == 0 {
            x = &x[1..];
        }
        if x.len() > n {
            return None;
        }
        out.extend(std::iter::repeat_n(0u8, n - x.len()));
        out.extend_from_slice(x);
        at += 2 + l;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_signature_forms_round_trip() {
        for n in [32usize, 48, 66] {
            for hi in [0x00u8, 0x7f, 0x80, 0xff] {
                let mut fixed = vec![hi; 2 * n];
                fixed[1] = 0x11;
                fixed[n + 1] = 0x22;
                let der = ecdsa_fixed_to_der(&fixed).unwrap();
                assert_eq!(ecdsa_der_to_fixed(&der, n).unwrap(), fixed);
            }
        }
        assert!(ecdsa_fixed_to_der(&[1, 2, 3]).is_none());
        assert!(ecdsa_der_to_fixed(&[0x30, 2, 2, 0], 32).is_none());
    }
}
