//! IKE's key schedule and message protection (RFC 7296 §2.13–2.15, §2.17,
//! §3.14; RFC 5282 for AES-GCM, RFC 7634 for ChaCha20-Poly1305, RFC 5903
//! and RFC 8031 for the groups). Primitives come from aws-lc-rs (HMAC,
//! ECDH, X25519, AEADs) and RustCrypto's `aes`/`cbc` (AES-CBC with IKE's own
//! padding); nothing here is a hand-written primitive. Secrets live in
//! [`Secret`] (zeroized on drop).

use crate::proposal::{Encr, Group, Integ, Prf};
use crate::wire::{Header, GEN_LEN, HDR_LEN};
use aws_lc_rs::{aead, agreement, constant_time, digest, hmac, rand};
use zeroize::Zeroizing;

pub type Secret = Zeroizing<Vec<u8>>;

/// A check failed (an ICV, a length, a peer's key exchange value); the
/// caller names the reason it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bad;

fn hmac_alg(p: Prf) -> hmac::Algorithm {
    match p {
        Prf::Sha256 => hmac::HMAC_SHA256,
        Prf::Sha384 => hmac::HMAC_SHA384,
        Prf::Sha512 => hmac::HMAC_SHA512,
    }
}

/// prf(K, S) (RFC 7296 §2.13) over the concatenation of `parts`.
pub fn prf(p: Prf, key: &[u8], parts: &[&[u8]]) -> Secret {
    let k = hmac::Key::new(hmac_alg(p), key);
    let mut c = hmac::Context::with_key(&k);
    for s in parts {
        c.update(s);
    }
    Zeroizing::new(c.sign().as_ref().to_vec())
}

/// prf+(K, S) (RFC 7296 §2.13): T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n).
pub fn prf_plus(p: Prf, key: &[u8], seed: &[u8], len: usize) -> Secret {
    let mut out = Zeroizing::new(Vec::with_capacity(len + p.out_len()));
    let mut t: Secret = Zeroizing::new(Vec::new());
    let mut n = 1u8;
    while out.len() < len {
        t = prf(p, key, &[&t, seed, &[n]]);
        out.extend_from_slice(&t);
        // RFC 7296 §2.13: at most 255 blocks.
        n = n.wrapping_add(1);
        if n == 0 {
            break;
        }
    }
    out.truncate(len);
    out
}

pub fn random(buf: &mut [u8]) {
    // aws-lc's DRBG; a failure here means the system has no entropy source.
    rand::fill(buf).expect("the system random source failed");
}

pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    random(&mut b);
    u64::from_ne_bytes(b)
}

pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    random(&mut b);
    u32::from_ne_bytes(b)
}

/// RFC 7296 §2.23: SHA-1(SPIi | SPIr | IP | Port).
pub fn nat_hash(spi_i: u64, spi_r: u64, addr: std::net::SocketAddr) -> Vec<u8> {
    let mut c = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    c.update(&spi_i.to_be_bytes());
    c.update(&spi_r.to_be_bytes());
    match addr.ip() {
        std::net::IpAddr::V4(a) => c.update(&a.octets()),
        std::net::IpAddr::V6(a) => c.update(&a.octets()),
    }
    c.update(&addr.port().to_be_bytes());
    c.finish().as_ref().to_vec()
}

/// SHA-256 for COOKIE (RFC 7296 §2.6).
pub fn sha256(parts: &[&[u8]]) -> Vec<u8> {
    let mut c = digest::Context::new(&digest::SHA256);
    for p in parts {
        c.update(p);
    }
    c.finish().as_ref().to_vec()
}

pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// Our half of a key exchange.
pub struct KeyShare {
    pub group: Group,
    key: Private,
    public: Vec<u8>,
}

enum Private {
    Ec(agreement::EphemeralPrivateKey),
    Modp(crate::modp::Modp),
}

fn ec_alg(group: Group) -> &'static agreement::Algorithm {
    match group {
        Group::Ecp256 => &agreement::ECDH_P256,
        Group::Ecp384 => &agreement::ECDH_P384,
        Group::Ecp521 => &agreement::ECDH_P521,
        _ => &agreement::X25519,
    }
}

impl KeyShare {
    pub fn new(group: Group) -> KeyShare {
        if let Group::Modp2048 | Group::Modp3072 = group {
            let m = crate::modp::Modp::new(group.public_len() * 8, random);
            let public = m.public.clone();
            return KeyShare {
                group,
                key: Private::Modp(m),
                public,
            };
        }
        let rng = rand::SystemRandom::new();
        let key = agreement::EphemeralPrivateKey::generate(ec_alg(group), &rng)
            .expect("key generation failed");
        let pk = key.compute_public_key().expect("public key");
        // RFC 5903 §7: the ECP key data is x | y without SEC1's 0x04 prefix.
        let public = match group {
            Group::Curve25519 => pk.as_ref().to_vec(),
            _ => pk.as_ref()[1..].to_vec(),
        };
        KeyShare {
            group,
            key: Private::Ec(key),
            public,
        }
    }

    pub fn public(&self) -> &[u8] {
        &self.public
    }

    /// g^ir: for ECP the x coordinate (RFC 5903 §7), for Curve25519 the
    /// X25519 output (RFC 8031 §2.2; aws-lc refuses an all-zero result), for
    /// MODP g^xy mod p (crate::modp). An invalid peer value (length, off the
    /// curve, outside 1 < y < p − 1) is an error.
    pub fn agree(self, peer: &[u8]) -> Result<Secret, Bad> {
        if peer.len() != self.group.public_len() {
            return Err(Bad);
        }
        let key = match self.key {
            Private::Modp(m) => return m.agree(peer).ok_or(Bad),
            Private::Ec(k) => k,
        };
        let bytes = match self.group {
            Group::Curve25519 => peer.to_vec(),
            _ => {
                let mut b = Vec::with_capacity(peer.len() + 1);
                b.push(4);
                b.extend_from_slice(peer);
                b
            }
        };
        let pk = agreement::UnparsedPublicKey::new(ec_alg(self.group), bytes);
        agreement::agree_ephemeral(key, &pk, Bad, |s| Ok(Zeroizing::new(s.to_vec())))
    }
}

/// The keys of one IKE SA (RFC 7296 §2.14).
pub struct IkeKeys {
    pub prf: Prf,
    pub sk_d: Secret,
    pub sk_pi: Secret,
    pub sk_pr: Secret,
    pub sk: SkKeys,
}

/// SK_e and SK_a of both directions with the agreed algorithms.
pub struct SkKeys {
    pub encr: Encr,
    pub integ: Option<Integ>,
    ei: Secret,
    er: Secret,
    ai: Secret,
    ar: Secret,
    /// Per-direction IV counters for the AEADs (RFC 5282 §3: never repeat an IV under one key).
    iv_i: u64,
    iv_r: u64,
}

#[allow(clippy::too_many_arguments)]
/// RFC 7296 §2.14: SKEYSEED = prf(Ni | Nr, g^ir); the seven keys from
/// prf+(SKEYSEED, Ni | Nr | SPIi | SPIr).
pub fn derive_ike(
    p: Prf,
    encr: Encr,
    integ: Option<Integ>,
    ni: &[u8],
    nr: &[u8],
    shared: &[u8],
    spi_i: u64,
    spi_r: u64,
) -> IkeKeys {
    let skeyseed = prf(p, &[ni, nr].concat(), &[shared]);
    keys_from_skeyseed(p, encr, integ, &skeyseed, ni, nr, spi_i, spi_r)
}

/// RFC 7296 §2.18: a rekeyed IKE SA's SKEYSEED = prf(SK_d (old), g^ir (new)
/// | Ni | Nr) with the *old* SA's PRF; its seven keys as in §2.14 with the
/// new SA's PRF, SPIs and nonces.
#[allow(clippy::too_many_arguments)]
pub fn derive_ike_rekey(
    old_prf: Prf,
    old_sk_d: &[u8],
    p: Prf,
    encr: Encr,
    integ: Option<Integ>,
    ni: &[u8],
    nr: &[u8],
    shared: &[u8],
    spi_i: u64,
    spi_r: u64,
) -> IkeKeys {
    let skeyseed = prf(old_prf, old_sk_d, &[shared, ni, nr]);
    keys_from_skeyseed(p, encr, integ, &skeyseed, ni, nr, spi_i, spi_r)
}

/// {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED,
/// Ni | Nr | SPIi | SPIr) (RFC 7296 §2.14).
#[allow(clippy::too_many_arguments)]
fn keys_from_skeyseed(
    p: Prf,
    encr: Encr,
    integ: Option<Integ>,
    skeyseed: &[u8],
    ni: &[u8],
    nr: &[u8],
    spi_i: u64,
    spi_r: u64,
) -> IkeKeys {
    let seed = [ni, nr, &spi_i.to_be_bytes(), &spi_r.to_be_bytes()].concat();
    let (pl, al, el) = (p.out_len(), integ.map_or(0, Integ::key_len), encr.key_len());
    let km = prf_plus(p, skeyseed, &seed, 3 * pl + 2 * al + 2 * el);
    let mut at = 0;
    let mut take = |n: usize| {
        let s = Zeroizing::new(km[at..at + n].to_vec());
        at += n;
        s
    };
    let sk_d = take(pl);
    let ai = take(al);
    let ar = take(al);
    let ei = take(el);
    let er = take(el);
    let sk_pi = take(pl);
    let sk_pr = take(pl);
    IkeKeys {
        prf: p,
        sk_d,
        sk_pi,
        sk_pr,
        sk: SkKeys {
            encr,
            integ,
            ei,
            er,
            ai,
            ar,
            iv_i: 0,
            iv_r: 0,
        },
    }
}

/// RFC 7296 §2.17: KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr).
pub fn child_keymat(
    p: Prf,
    sk_d: &[u8],
    shared: Option<&[u8]>,
    ni: &[u8],
    nr: &[u8],
    len: usize,
) -> Secret {
    let seed = Zeroizing::new([shared.unwrap_or(&[]), ni, nr].concat());
    prf_plus(p, sk_d, &seed, len)
}

const AEAD_IV: usize = 8;
const CBC_IV: usize = 16;

fn aead_alg(e: Encr) -> &'static aead::Algorithm {
    match e {
        Encr::AesGcm(128, _) => &aead::AES_128_GCM,
        Encr::AesGcm(_, _) => &aead::AES_256_GCM,
        _ => &aead::CHACHA20_POLY1305,
    }
}

type Aes128CbcEnc = cbc::Encryptor<aes::Aes128>;
type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
type Aes128CbcDec = cbc::Decryptor<aes::Aes128>;
type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

impl SkKeys {
    fn keys(&self, from_initiator: bool) -> (&[u8], &[u8]) {
        if from_initiator {
            (&self.ei, &self.ai)
        } else {
            (&self.er, &self.ar)
        }
    }

    /// The AEAD ICV, or the truncated HMAC.
    fn icv_len(&self) -> usize {
        match self.encr {
            Encr::AesGcm(_, i) => i as usize,
            _ if self.encr.is_aead() => 16,
            _ => self.integ.map_or(0, Integ::icv_len),
        }
    }

    /// A whole protected message (RFC 7296 §3.14): `hdr` (its length is
    /// filled in), an SK payload whose inner chain starts with `first`.
    pub fn seal(&mut self, hdr: Header, first: u8, inner: &[u8]) -> Vec<u8> {
        self.seal_frag(hdr, first, inner, None)
    }

    /// [`seal`](Self::seal), or with `frag = (number, total)` one Encrypted
    /// Fragment (RFC 7383 §2.5): the SKF payload, whose Fragment Number and
    /// Total Fragments are in the associated data; only fragment 1 names the
    /// first inner payload.
    pub fn seal_frag(
        &mut self,
        mut hdr: Header,
        first: u8,
        inner: &[u8],
        frag: Option<(u16, u16)>,
    ) -> Vec<u8> {
        let from_i = hdr.from_initiator();
        hdr.next = if frag.is_some() {
            crate::wire::pt::SKF
        } else {
            crate::wire::pt::SK
        };
        let extra = if frag.is_some() { 4 } else { 0 };
        let aead_mode = self.encr.is_aead();
        let iv_len = if aead_mode { AEAD_IV } else { CBC_IV };
        // RFC 7296 §3.14: padding then the Pad Length octet; CBC needs whole
        // blocks, the AEADs (RFC 5282 §3, RFC 7634 §3) none.
        let pad = if aead_mode {
            0
        } else {
            (16 - (inner.len() + 1) % 16) % 16
        };
        let ct_len = inner.len() + pad + 1;
        let icv = self.icv_len();
        let sk_len = GEN_LEN + extra + iv_len + ct_len + icv;
        hdr.length = (HDR_LEN + sk_len) as u32;
        let mut m = Vec::with_capacity(hdr.length as usize);
        hdr.emit(&mut m);
        m.push(match frag {
            Some((n, _)) if n != 1 => 0,
            _ => first,
        });
        m.push(0);
        m.extend_from_slice(&(sk_len as u16).to_be_bytes());
        if let Some((n, t)) = frag {
            m.extend_from_slice(&n.to_be_bytes());
            m.extend_from_slice(&t.to_be_bytes());
        }
        let aad_end = m.len();
        let mut iv = vec![0u8; iv_len];
        if aead_mode {
            let ctr = if from_i {
                &mut self.iv_i
            } else {
                &mut self.iv_r
            };
            *ctr += 1;
            iv.copy_from_slice(&ctr.to_be_bytes());
        } else {
            // RFC 7296 §3.14: a CBC IV must be unpredictable.
            random(&mut iv);
        }
        m.extend_from_slice(&iv);
        let ct_at = m.len();
        m.extend_from_slice(inner);
        m.extend(std::iter::repeat_n(0u8, pad));
        m.push(pad as u8);
        let (ek, ak) = self.keys(from_i);
        if aead_mode {
            let (key, salt) = ek.split_at(ek.len() - 4);
            let k = aead::LessSafeKey::new(
                aead::UnboundKey::new(aead_alg(self.encr), key).expect("key length"),
            );
            let mut nonce = [0u8; 12];
            nonce[..4].copy_from_slice(salt);
            nonce[4..].copy_from_slice(&iv);
            let (head, body) = m.split_at_mut(ct_at);
            let tag = k
                .seal_in_place_separate_tag(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aead::Aad::from(&head[..aad_end]),
                    body,
                )
                .expect("seal");
            m.extend_from_slice(&tag.as_ref()[..icv]);
        } else {
            use cbc::cipher::{block_padding::NoPadding, BlockEncryptMut, KeyIvInit};
            let body = &mut m[ct_at..];
            let n = body.len();
            let _ = match ek.len() {
                16 => Aes128CbcEnc::new_from_slices(ek, &iv)
                    .expect("key")
                    .encrypt_padded_mut::<NoPadding>(body, n)
                    .map(|_| ()),
                _ => Aes256CbcEnc::new_from_slices(ek, &iv)
                    .expect("key")
                    .encrypt_padded_mut::<NoPadding>(body, n)
                    .map(|_| ()),
            };
            let i = self.integ.expect("CBC has integrity");
            let mac = prf(i.prf(), ak, &[&m]);
            m.extend_from_slice(&mac[..icv]);
        }
        m
    }

    /// Checks and decrypts the SK payload at `sk_at` of `msg` (the whole
    /// message, `msg.len()` = the header's length); answers the inner
    /// chain's octets. Err if the ICV is bad or the lengths do not fit.
    pub fn open(&self, msg: &[u8], sk_at: usize) -> Result<Secret, Bad> {
        self.open_at(msg, sk_at, 0)
    }

    /// [`open`](Self::open) for an Encrypted Fragment payload (RFC 7383
    /// §2.5): `extra` = 4 octets of Fragment Number and Total Fragments
    /// after the generic header, covered by the AEAD's associated data.
    pub fn open_at(&self, msg: &[u8], sk_at: usize, extra: usize) -> Result<Secret, Bad> {
        let hdr = Header::parse(msg).map_err(|_| Bad)?;
        let (ek, ak) = self.keys(hdr.from_initiator());
        let aead_mode = self.encr.is_aead();
        let iv_len = if aead_mode { AEAD_IV } else { CBC_IV };
        let icv = self.icv_len();
        if sk_at + GEN_LEN + extra > msg.len() {
            return Err(Bad);
        }
        let sk_len = u16::from_be_bytes([msg[sk_at + 2], msg[sk_at + 3]]) as usize;
        if sk_at + sk_len != msg.len() || sk_len < GEN_LEN + extra + iv_len + icv + 1 {
            return Err(Bad);
        }
        let head = sk_at + GEN_LEN + extra;
        let iv = &msg[head..head + iv_len];
        let ct = &msg[head + iv_len..msg.len() - icv];
        let tag = &msg[msg.len() - icv..];
        let mut plain: Secret = Zeroizing::new(ct.to_vec());
        if aead_mode {
            if icv != 16 {
                // aws-lc's AEADs give a 16-octet tag; shorter GCM ICVs are not offered.
                return Err(Bad);
            }
            let (key, salt) = ek.split_at(ek.len() - 4);
            let k = aead::LessSafeKey::new(
                aead::UnboundKey::new(aead_alg(self.encr), key).map_err(|_| Bad)?,
            );
            let mut nonce = [0u8; 12];
            nonce[..4].copy_from_slice(salt);
            nonce[4..].copy_from_slice(iv);
            let mut buf = Zeroizing::new([&plain[..], tag].concat());
            let n = k
                .open_in_place(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aead::Aad::from(&msg[..head]),
                    &mut buf,
                )
                .map_err(|_| Bad)?
                .len();
            buf.truncate(n);
            plain = buf;
        } else {
            let i = self.integ.ok_or(Bad)?;
            let mac = prf(i.prf(), ak, &[&msg[..msg.len() - icv]]);
            if !ct_eq(&mac[..icv], tag) {
                return Err(Bad);
            }
            if !plain.len().is_multiple_of(16) {
                return Err(Bad);
            }
            use cbc::cipher::{block_padding::NoPadding, BlockDecryptMut, KeyIvInit};
            let r = match ek.len() {
                16 => Aes128CbcDec::new_from_slices(ek, iv)
                    .map_err(|_| Bad)?
                    .decrypt_padded_mut::<NoPadding>(&mut plain)
                    .map(|_| ()),
                _ => Aes256CbcDec::new_from_slices(ek, iv)
                    .map_err(|_| Bad)?
                    .decrypt_padded_mut::<NoPadding>(&mut plain)
                    .map(|_| ()),
            };
            r.map_err(|_| Bad)?;
        }
        let pad = *plain.last().ok_or(Bad)? as usize;
        if pad + 1 > plain.len() {
            return Err(Bad);
        }
        let n = plain.len() - pad - 1;
        plain.truncate(n);
        Ok(plain)
    }
}

/// RFC 7296 §2.15: the PSK's AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>).
pub fn psk_auth(p: Prf, psk: &[u8], signed_octets: &[&[u8]]) -> Secret {
    let k = prf(p, psk, &[b"Key Pad for IKEv2"]);
    prf(p, &k, signed_octets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{exchange, flags, parse_chain, pt, Payload};

    // RFC 4231 test case 2 (HMAC-SHA-256, key "Jefe").
    #[test]
    fn prf_known_answer() {
        let t = prf(
            Prf::Sha256,
            b"Jefe",
            &[b"what do ya want ", b"for nothing?"],
        );
        assert_eq!(
            t.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // prf+: T1 = prf(K, S | 0x01), T2 = prf(K, T1 | S | 0x02).
        let pp = prf_plus(Prf::Sha256, b"k", b"seed", 40);
        let t1 = prf(Prf::Sha256, b"k", &[b"seed", &[1]]);
        let t2 = prf(Prf::Sha256, b"k", &[&t1, b"seed", &[2]]);
        assert_eq!(&pp[..32], &t1[..]);
        assert_eq!(&pp[32..], &t2[..8]);
    }

    #[test]
    fn every_group_agrees() {
        for g in [
            Group::Ecp256,
            Group::Ecp384,
            Group::Ecp521,
            Group::Curve25519,
            Group::Modp2048,
            Group::Modp3072,
        ] {
            let a = KeyShare::new(g);
            let b = KeyShare::new(g);
            assert_eq!(a.public().len(), g.public_len());
            let (pa, pb) = (a.public().to_vec(), b.public().to_vec());
            assert_eq!(a.agree(&pb).unwrap(), b.agree(&pa).unwrap());
        }
        // A point off the curve is refused.
        let a = KeyShare::new(Group::Ecp256);
        assert!(a.agree(&[1u8; 64]).is_err());
        let a = KeyShare::new(Group::Curve25519);
        assert!(
            a.agree(&[0u8; 32]).is_err(),
            "all-zero X25519 output (RFC 8031 §2.2)"
        );
    }

    #[test]
    fn sk_round_trip_and_tamper() {
        for (e, i) in [
            (Encr::AesGcm(128, 16), None),
            (Encr::AesGcm(256, 16), None),
            (Encr::ChaCha, None),
            (Encr::AesCbc(128), Some(Integ::Sha256)),
            (Encr::AesCbc(256), Some(Integ::Sha512)),
        ] {
            let mut k = derive_ike(Prf::Sha256, e, i, &[1; 32], &[2; 32], &[3; 32], 7, 9);
            let inner = {
                let mut v = Vec::new();
                crate::wire::emit_chain(
                    &[Payload::Nonce(vec![5; 20]), Payload::notify(16384, vec![])],
                    &mut v,
                );
                v
            };
            let hdr = Header {
                spi_i: 7,
                spi_r: 9,
                next: 0,
                exchange: exchange::IKE_AUTH,
                flags: flags::INITIATOR,
                msg_id: 1,
                length: 0,
            };
            let m = k.sk.seal(hdr, pt::NONCE, &inner);
            let h = Header::parse(&m).unwrap();
            assert_eq!(h.length as usize, m.len());
            let c = parse_chain(h.next, &m[28..], 28).unwrap();
            let (at, first) = c.sk.unwrap();
            assert_eq!(first, pt::NONCE);
            let plain = k.sk.open(&m, at).unwrap();
            assert_eq!(&plain[..], &inner[..], "{e:?}");
            for flip in [0, 20, 30, m.len() - 1] {
                let mut t = m.clone();
                t[flip] ^= 1;
                assert!(k.sk.open(&t, at).is_err(), "{e:?} flip {flip}");
            }
        }
    }
}
