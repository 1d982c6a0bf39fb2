//! Certificate authentication (RFC 7296 §2.15, §3.6–3.8; RFC 7427):
//! our certificate and private key, the trusted CAs and CRLs, signing the
//! AUTH octets and checking a peer's chain, identity and signature.
//!
//! Chains are validated by rustls-webpki (validity dates, CA constraints,
//! name constraints, CRLs); signatures are made and checked by aws-lc-rs.
//! Nothing is parsed here but PEM armour and the RFC 7427 AlgorithmIdentifier
//! that starts a Digital Signature AUTH payload.

use crate::der;
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

    /// The classic method (RFC 7296 §3.8: 9–11 for ECDSA, RFC 4754) and
    /// signature over `octets`, for a peer that did not announce RFC 7427
    /// hashes; None for keys that only sign with RFC 7427 here: RSA's method
    /// 1 hashes with SHA-1, which aws-lc-rs does not sign with (RFC 8247
    /// §3.2 deprecates it), so an RSA key sends RFC 7427 PKCS#1 v1.5 SHA-256.
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

    /// RFC 7427 §3: AUTH data = AlgorithmIdentifier length ‖ AlgorithmIdentifier
    /// ‖ signature over the octets (aws-lc-rs; never RustCrypto's `rsa`).
    /// `pss`: an RSA key signs RSASSA-PSS with SHA-`bits` (strongSwan's
    /// `auth = rsa/pss-shaN`; MGF1 with the same hash, salt as long as the
    /// hash) instead of PKCS#1 v1.5 with SHA-256.
    pub fn sign(&self, octets: &[u8], pss: Option<u16>) -> Result<Vec<u8>, String> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pss_alg;
        let (alg, sig): (&[u8], Vec<u8>) = match self {
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
                let (enc, alg) = match pss {
                    None => (&signature::RSA_PKCS1_SHA256, ALG_RSA_SHA256),
                    Some(bits) => {
                        pss_alg = crate::der::pss_alg(bits);
                        let enc = match bits {
                            384 => &signature::RSA_PSS_SHA384,
                            512 => &signature::RSA_PSS_SHA512,
                            _ => &signature::RSA_PSS_SHA256,
                        };
                        (enc, &pss_alg[..])
                    }
                };
                k.sign(enc, &rng, octets, &mut sig)
                    .map_err(|_| "RSA signing failed")?;
                (alg, sig)
            }
            Signer::Ed25519(k) => (ALG_ED25519, k.sign(octets).as_ref().to_vec()),
        };
        let mut out = vec![alg.len() as u8];
        out.extend_from_slice(alg);
        out.extend_from_slice(&sig);
        Ok(out)
    }
}

/// A certificate's subject Name, DER with its SEQUENCE (an ID_DER_ASN1_DN's
/// data), or None if the certificate does not parse.
pub fn subject_der(cert: &[u8]) -> Option<Vec<u8>> {
    let der = CertificateDer::from(cert);
    let c = webpki::EndEntityCert::try_from(&der).ok()?;
    Some(der::wrap(der::SEQ, c.subject()))
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
    /// §3.5: a DN its subject, FQDN, RFC822 and IP its subjectAltName).
    /// Then checks `auth` (method, data) over `octets` with its key — an
    /// RSA-PSS signature if `require_pss`. Ok: how the peer signed.
    pub fn verify(
        &self,
        chain: &[Vec<u8>],
        id: &Id,
        (method, auth): (u8, &[u8]),
        octets: &[u8],
        now: std::time::SystemTime,
        require_pss: bool,
    ) -> Result<String, String> {
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
        // RFC 7296 §3.5 / RFC 4945 §3.1: the ID names the certificate — a
        // DN its subject, FQDN/IP/RFC822 an entry of its subjectAltName.
        let name = match id.ty {
            idt::FQDN => Some(
                ServerName::try_from(String::from_utf8_lossy(&id.data).into_owned())
                    .map_err(|_| format!("ID {id} is not a DNS name"))?,
            ),
            idt::IPV4_ADDR if id.data.len() == 4 => {
                let a: [u8; 4] = id.data[..].try_into().unwrap_or_default();
                Some(ServerName::IpAddress(IpAddr::V4(Ipv4Addr::from(a)).into()))
            }
            idt::IPV6_ADDR if id.data.len() == 16 => {
                let a: [u8; 16] = id.data[..].try_into().unwrap_or_default();
                Some(ServerName::IpAddress(IpAddr::V6(Ipv6Addr::from(a)).into()))
            }
            idt::DER_ASN1_DN => {
                let want = der::dn_rdns(&id.data).ok_or("the peer's DN identity does not parse")?;
                let have = der::name_rdns(cert.subject())
                    .ok_or("the peer's certificate subject does not parse")?;
                if !der::dn_matches(&want, &have) {
                    return Err(format!(
                        "the peer's certificate subject is \"{}\", not its ID \"{id}\"",
                        der::dn_text(&have)
                    ));
                }
                None
            }
            idt::RFC822_ADDR => {
                let want = String::from_utf8_lossy(&id.data);
                if !der::san_emails(ee)
                    .iter()
                    .any(|e| e.eq_ignore_ascii_case(&want))
                {
                    return Err(format!("the peer's certificate does not name {id}"));
                }
                None
            }
            _ => {
                return Err(format!(
                "ID {id}: only DN, FQDN, RFC822 and IP identities are matched against certificates"
            ))
            }
        };
        if let Some(name) = name {
            cert.verify_is_valid_for_subject_name(&name)
                .map_err(|_| format!("the peer's certificate does not name {id}"))?;
        }
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
                    // RFC 7427 §3 / RFC 4055 §3.1: RSASSA-PSS names its hash,
                    // MGF1 hash and salt length in the parameters; aws-lc-rs
                    // checks the salt as long as the hash, as strongSwan signs.
                    a => match der::pss_params(a) {
                        Some((32, 32, 32)) => vec![algs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY],
                        Some((48, 48, 48)) => vec![algs::RSA_PSS_2048_8192_SHA384_LEGACY_KEY],
                        Some((64, 64, 64)) => vec![algs::RSA_PSS_2048_8192_SHA512_LEGACY_KEY],
                        Some((h, m, salt)) => {
                            return Err(format!(
                                "the peer signs RSA-PSS with a {}-bit hash, MGF1 {}-bit and a {salt}-octet salt: espd-ike takes SHA-256/384/512 with MGF1 of the same hash and a salt as long as it",
                                h * 8,
                                m * 8
                            ))
                        }
                        None => {
                            return Err(
                                "the peer signs with an algorithm espd-ike does not take (expected ECDSA, RSA PKCS#1 v1.5 or PSS with SHA-2, or Ed25519)"
                                    .into(),
                            )
                        }
                    },
                };
                if require_pss && der::pss_params(alg).is_none() {
                    return Err("the peer did not sign with RSA-PSS (remote auth = rsa/pss)".into());
                }
                (c, sig)
            }
            // RFC 4754 §7: r ‖ s; the curve and hash are the method's.
            AUTH_ECDSA_256 | AUTH_ECDSA_384 | AUTH_ECDSA_521 => {
                if require_pss {
                    return Err(
                        "the peer signed with ECDSA, not RSA-PSS (remote auth = rsa/pss)".into(),
                    );
                }
                classic = ecdsa_fixed_to_der(auth).ok_or("malformed ECDSA AUTH")?;
                let a: &dyn SignatureVerificationAlgorithm = match method {
                    AUTH_ECDSA_256 => algs::ECDSA_P256_SHA256,
                    AUTH_ECDSA_384 => algs::ECDSA_P384_SHA384,
                    _ => algs::ECDSA_P521_SHA512,
                };
                (vec![a], &classic[..])
            }
            // RFC 7296 §3.8 method 1: RSASSA-PKCS1-v1_5, with SHA-1 as every
            // implementation hashes it (RFC 7427 §1), from a peer that does
            // not do RFC 7427; keys of at least 2048 bits (RFC 8247 §3.2).
            AUTH_RSA => {
                if require_pss {
                    return Err(
                        "the peer signed with AUTH method 1, not RSA-PSS (remote auth = rsa/pss)"
                            .into(),
                    );
                }
                (
                    vec![&RsaPkcs1Sha1 as &dyn SignatureVerificationAlgorithm],
                    auth,
                )
            }
            m => return Err(format!("AUTH method {m} is not a signature")),
        };
        if cands
            .iter()
            .any(|a| cert.verify_signature(*a, octets, sig).is_ok())
        {
            Ok(match method {
                AUTH_RSA => "RSA signature, method 1 (SHA-1)".to_string(),
                AUTH_DIGITAL_SIGNATURE => format!("{} signature (RFC 7427)", alg_name(auth)),
                m => format!(
                    "ECDSA-{} signature (RFC 4754)",
                    [256, 384, 521][(m - AUTH_ECDSA_256) as usize]
                ),
            })
        } else {
            Err("the peer's AUTH signature does not verify".into())
        }
    }
}

/// A name for the AlgorithmIdentifier that starts RFC 7427 AUTH data.
fn alg_name(auth: &[u8]) -> String {
    let n = auth.first().copied().unwrap_or(0) as usize;
    let alg = auth.get(1..1 + n).unwrap_or_default();
    match alg {
        a if a == ALG_ECDSA_SHA256 => "ECDSA SHA-256".into(),
        a if a == ALG_ECDSA_SHA384 => "ECDSA SHA-384".into(),
        a if a == ALG_ECDSA_SHA512 => "ECDSA SHA-512".into(),
        a if a == ALG_RSA_SHA256 => "RSA PKCS#1 v1.5 SHA-256".into(),
        a if a == ALG_RSA_SHA384 => "RSA PKCS#1 v1.5 SHA-384".into(),
        a if a == ALG_RSA_SHA512 => "RSA PKCS#1 v1.5 SHA-512".into(),
        a if a == ALG_ED25519 => "Ed25519".into(),
        a => match der::pss_params(a) {
            Some((h, ..)) => format!("RSA-PSS SHA-{}", h * 8),
            None => "unknown".into(),
        },
    }
}

/// RSASSA-PKCS1-v1_5 with SHA-1 over an rsaEncryption key (AUTH method 1
/// only; never for chains), checked by aws-lc-rs.
#[derive(Debug)]
struct RsaPkcs1Sha1;

impl SignatureVerificationAlgorithm for RsaPkcs1Sha1 {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), rustls_pki_types::InvalidSignature> {
        signature::UnparsedPublicKey::new(
            &signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
            public_key,
        )
        .verify(message, signature)
        .map_err(|_| rustls_pki_types::InvalidSignature)
    }

    fn public_key_alg_id(&self) -> rustls_pki_types::AlgorithmIdentifier {
        rustls_pki_types::alg_id::RSA_ENCRYPTION
    }

    fn signature_alg_id(&self) -> rustls_pki_types::AlgorithmIdentifier {
        // sha1WithRSAEncryption (contents of the AlgorithmIdentifier).
        rustls_pki_types::AlgorithmIdentifier::from_slice(&[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05, 0x05, 0x00,
        ])
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
