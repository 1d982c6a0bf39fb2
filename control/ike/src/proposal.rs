//! Algorithms and proposals: strongSwan's proposal keywords
//! (`aes128gcm16-prfsha256-x25519`), their IKEv2 transform IDs (RFC 7296
//! §3.3.2, IANA "IKEv2 Transform Attribute Types"), and choosing one of a
//! peer's proposals (RFC 7296 §2.7, §3.3.6).

use crate::wire::{proto, tt, Proposal, Transform};

/// An encryption transform (ENCR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encr {
    /// AES-CBC (RFC 3602), key bits.
    AesCbc(u16),
    /// AES-GCM (RFC 4106 / RFC 5282), key bits and ICV octets.
    AesGcm(u16, u8),
    /// ChaCha20-Poly1305 (RFC 7634).
    ChaCha,
    /// AES-GMAC (RFC 4543), ESP only.
    Gmac(u16),
    /// NULL encryption (RFC 2410), ESP only.
    Null,
}

impl Encr {
    pub fn is_aead(self) -> bool {
        matches!(self, Encr::AesGcm(..) | Encr::ChaCha | Encr::Gmac(_))
    }

    /// Key material octets (an AEAD's 4-octet salt included, RFC 4106 §8.1,
    /// RFC 5282 §7.1, RFC 7634 §2).
    pub fn key_len(self) -> usize {
        match self {
            Encr::AesCbc(b) => b as usize / 8,
            Encr::AesGcm(b, _) | Encr::Gmac(b) => b as usize / 8 + 4,
            Encr::ChaCha => 36,
            Encr::Null => 0,
        }
    }

    pub fn transform(self) -> Transform {
        let (id, key_len) = match self {
            Encr::AesCbc(b) => (12, Some(b)),
            Encr::AesGcm(b, 8) => (18, Some(b)),
            Encr::AesGcm(b, 12) => (19, Some(b)),
            Encr::AesGcm(b, _) => (20, Some(b)),
            Encr::ChaCha => (28, None),
            Encr::Gmac(b) => (21, Some(b)),
            Encr::Null => (11, None),
        };
        Transform {
            ty: tt::ENCR,
            id,
            key_len,
        }
    }

    pub fn from_transform(t: &Transform) -> Option<Encr> {
        let bits = |k: Option<u16>| k.filter(|b| matches!(b, 128 | 256));
        Some(match t.id {
            12 => Encr::AesCbc(bits(t.key_len)?),
            18 => Encr::AesGcm(bits(t.key_len)?, 8),
            19 => Encr::AesGcm(bits(t.key_len)?, 12),
            20 => Encr::AesGcm(bits(t.key_len)?, 16),
            28 if t.key_len.is_none() => Encr::ChaCha,
            21 => Encr::Gmac(bits(t.key_len)?),
            11 if t.key_len.is_none() => Encr::Null,
            _ => return None,
        })
    }

    /// strongSwan's keyword.
    pub fn name(self) -> String {
        match self {
            Encr::AesCbc(b) => format!("aes{b}"),
            Encr::AesGcm(b, i) => format!("aes{b}gcm{i}"),
            Encr::ChaCha => "chacha20poly1305".into(),
            Encr::Gmac(b) => format!("aes{b}gmac"),
            Encr::Null => "null".into(),
        }
    }

    /// Usable for IKE's SK payload (ESP has more).
    pub fn for_ike(self) -> bool {
        !matches!(self, Encr::Gmac(_) | Encr::Null)
    }
}

/// An integrity transform (INTEG), HMAC-SHA2 truncated (RFC 4868).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integ {
    Sha256,
    Sha384,
    Sha512,
}

impl Integ {
    pub fn id(self) -> u16 {
        match self {
            Integ::Sha256 => 12,
            Integ::Sha384 => 13,
            Integ::Sha512 => 14,
        }
    }
    pub fn from_id(id: u16) -> Option<Integ> {
        Some(match id {
            12 => Integ::Sha256,
            13 => Integ::Sha384,
            14 => Integ::Sha512,
            _ => return None,
        })
    }
    /// RFC 4868 §2.1.1: the key is the hash's output length.
    pub fn key_len(self) -> usize {
        match self {
            Integ::Sha256 => 32,
            Integ::Sha384 => 48,
            Integ::Sha512 => 64,
        }
    }
    /// RFC 4868 §2.3: truncated to half.
    pub fn icv_len(self) -> usize {
        self.key_len() / 2
    }
    pub fn name(self) -> &'static str {
        match self {
            Integ::Sha256 => "sha256",
            Integ::Sha384 => "sha384",
            Integ::Sha512 => "sha512",
        }
    }
    pub fn prf(self) -> Prf {
        match self {
            Integ::Sha256 => Prf::Sha256,
            Integ::Sha384 => Prf::Sha384,
            Integ::Sha512 => Prf::Sha512,
        }
    }
}

/// A pseudo-random function (PRF_HMAC_SHA2_*, RFC 4868).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prf {
    Sha256,
    Sha384,
    Sha512,
}

impl Prf {
    pub fn id(self) -> u16 {
        match self {
            Prf::Sha256 => 5,
            Prf::Sha384 => 6,
            Prf::Sha512 => 7,
        }
    }
    pub fn from_id(id: u16) -> Option<Prf> {
        Some(match id {
            5 => Prf::Sha256,
            6 => Prf::Sha384,
            7 => Prf::Sha512,
            _ => return None,
        })
    }
    pub fn out_len(self) -> usize {
        match self {
            Prf::Sha256 => 32,
            Prf::Sha384 => 48,
            Prf::Sha512 => 64,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Prf::Sha256 => "prfsha256",
            Prf::Sha384 => "prfsha384",
            Prf::Sha512 => "prfsha512",
        }
    }
}

/// A key exchange group (IKEv2 "Transform Type 4").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Ecp256,
    Ecp384,
    Ecp521,
    Curve25519,
    /// RFC 3526 MODP groups 14 and 15 (for peers without elliptic curves).
    Modp2048,
    Modp3072,
}

impl Group {
    pub fn id(self) -> u16 {
        match self {
            Group::Ecp256 => 19,
            Group::Ecp384 => 20,
            Group::Ecp521 => 21,
            Group::Curve25519 => 31,
            Group::Modp2048 => 14,
            Group::Modp3072 => 15,
        }
    }
    pub fn from_id(id: u16) -> Option<Group> {
        Some(match id {
            19 => Group::Ecp256,
            20 => Group::Ecp384,
            21 => Group::Ecp521,
            31 => Group::Curve25519,
            14 => Group::Modp2048,
            15 => Group::Modp3072,
            _ => return None,
        })
    }
    /// The KE payload's key data length (RFC 5903 §7, RFC 8031 §3.1).
    pub fn public_len(self) -> usize {
        match self {
            Group::Ecp256 => 64,
            Group::Ecp384 => 96,
            Group::Ecp521 => 132,
            Group::Curve25519 => 32,
            // RFC 7296 §3.4: padded to the prime's length.
            Group::Modp2048 => 256,
            Group::Modp3072 => 384,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Group::Ecp256 => "ecp256",
            Group::Ecp384 => "ecp384",
            Group::Ecp521 => "ecp521",
            Group::Curve25519 => "curve25519",
            Group::Modp2048 => "modp2048",
            Group::Modp3072 => "modp3072",
        }
    }
}

/// One configured proposal: each type's algorithms in preference order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AlgSet {
    pub encr: Vec<Encr>,
    pub integ: Vec<Integ>,
    pub prf: Vec<Prf>,
    pub dh: Vec<Group>,
    /// ESP only: ESN offered (true), not (false); in preference order.
    pub esn: Vec<bool>,
}

/// What was agreed: one of each type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chosen {
    pub encr: Encr,
    pub integ: Option<Integ>,
    pub prf: Option<Prf>,
    pub dh: Option<Group>,
    pub esn: bool,
}

impl Chosen {
    /// As strongSwan prints it (`AES_GCM_16_128/PRF_HMAC_SHA2_256/CURVE_25519` in
    /// swanctl; ours is the keyword form).
    pub fn describe(&self) -> String {
        let mut s = vec![self.encr.name()];
        if let Some(i) = self.integ {
            s.push(i.name().into());
        }
        if let Some(p) = self.prf {
            s.push(p.name().into());
        }
        if let Some(d) = self.dh {
            s.push(d.name().into());
        }
        if self.esn {
            s.push("esn".into());
        }
        s.join("-")
    }

    /// The one-proposal SA payload that answers `num` (RFC 7296 §3.3.1).
    pub fn proposal(&self, num: u8, protocol: u8, spi: Vec<u8>) -> Proposal {
        let one = AlgSet {
            encr: vec![self.encr],
            integ: self.integ.into_iter().collect(),
            prf: self.prf.into_iter().collect(),
            dh: self.dh.into_iter().collect(),
            esn: vec![self.esn],
        };
        one.proposal(num, protocol, spi, self.dh.is_some())
    }
}

impl AlgSet {
    /// This set as a proposal to send.
    pub fn proposal(&self, num: u8, protocol: u8, spi: Vec<u8>, with_dh: bool) -> Proposal {
        let mut t: Vec<Transform> = self.encr.iter().map(|e| e.transform()).collect();
        t.extend(self.prf.iter().map(|p| Transform {
            ty: tt::PRF,
            id: p.id(),
            key_len: None,
        }));
        t.extend(self.integ.iter().map(|i| Transform {
            ty: tt::INTEG,
            id: i.id(),
            key_len: None,
        }));
        if with_dh {
            t.extend(self.dh.iter().map(|d| Transform {
                ty: tt::DH,
                id: d.id(),
                key_len: None,
            }));
        }
        if protocol == proto::ESP {
            let esn = if self.esn.is_empty() {
                vec![false]
            } else {
                self.esn.clone()
            };
            t.extend(esn.iter().map(|e| Transform {
                ty: tt::ESN,
                id: *e as u16,
                key_len: None,
            }));
        }
        Proposal {
            num,
            proto: protocol,
            spi,
            transforms: t,
            unknown_attr: false,
        }
    }

    /// Picks one of each type from `p` that this set allows, in our
    /// preference order. `want_dh`: the proposal must carry a group (IKE,
    /// or a CREATE_CHILD_SA with PFS) — if false, a proposal carrying
    /// groups (besides NONE) still matches only when this set has none of them
    /// to offer, so PFS is not silently dropped.
    pub fn choose(&self, p: &Proposal, protocol: u8, want_dh: bool) -> Option<Chosen> {
        if p.unknown_attr || p.proto != protocol {
            return None;
        }
        let of = |ty: u8| p.transforms.iter().filter(move |t| t.ty == ty);
        // RFC 7296 §3.3.6: a transform type we do not know fails the proposal.
        if p.transforms
            .iter()
            .any(|t| !(tt::ENCR..=tt::ESN).contains(&t.ty))
        {
            return None;
        }
        for &e in &self.encr {
            if !of(tt::ENCR).any(|t| Encr::from_transform(t) == Some(e)) {
                continue;
            }
            let integ = if e.is_aead() {
                // RFC 8247 §3.1 / RFC 5282 §8: no integrity with an AEAD (or NONE).
                if of(tt::INTEG).any(|t| t.id != 0) {
                    continue;
                }
                None
            } else {
                match self
                    .integ
                    .iter()
                    .find(|i| of(tt::INTEG).any(|t| t.id == i.id()))
                {
                    Some(i) => Some(*i),
                    None => continue,
                }
            };
            let prf = if protocol == proto::IKE {
                match self
                    .prf
                    .iter()
                    .find(|x| of(tt::PRF).any(|t| t.id == x.id()))
                {
                    Some(x) => Some(*x),
                    None => return None,
                }
            } else {
                if of(tt::PRF).next().is_some() {
                    return None;
                }
                None
            };
            let theirs_dh: Vec<u16> = of(tt::DH).map(|t| t.id).filter(|&i| i != 0).collect();
            let dh = if want_dh {
                match self.dh.iter().find(|d| theirs_dh.contains(&d.id())) {
                    Some(d) => Some(*d),
                    None => return None,
                }
            } else {
                None
            };
            let esn = if protocol == proto::ESP {
                let theirs: Vec<u16> = of(tt::ESN).map(|t| t.id).collect();
                let ours = if self.esn.is_empty() {
                    vec![false]
                } else {
                    self.esn.clone()
                };
                // RFC 7296 §3.3.3: ESN is mandatory in ESP proposals; be lenient
                // with a peer that leaves it out (no ESN).
                match ours
                    .iter()
                    .find(|&&e| theirs.is_empty() && !e || theirs.contains(&(e as u16)))
                {
                    Some(e) => *e,
                    None => return None,
                }
            } else {
                false
            };
            return Some(Chosen {
                encr: e,
                integ,
                prf,
                dh,
                esn,
            });
        }
        None
    }
}

/// Picks from a peer's proposals (RFC 7296 §2.7): our configured proposals
/// in order, each against each of theirs (strongSwan's
/// `prefer_configured_proposals = yes`). Answers their proposal number too.
pub fn select(
    ours: &[AlgSet],
    theirs: &[Proposal],
    protocol: u8,
    want_dh: bool,
) -> Option<(u8, Chosen, Vec<u8>)> {
    for o in ours {
        for p in theirs {
            if let Some(c) = o.choose(p, protocol, want_dh) {
                return Some((p.num, c, p.spi.clone()));
            }
        }
    }
    None
}

/// Checks a responder's single answer against what we offered: each of its
/// transforms must have been in the proposal it names (RFC 7296 §2.7).
pub fn accept_answer(
    offered: &[AlgSet],
    answer: &[Proposal],
    protocol: u8,
    want_dh: bool,
) -> Option<(Chosen, Vec<u8>)> {
    if answer.len() != 1 {
        return None;
    }
    let a = &answer[0];
    let one_each =
        (tt::ENCR..=tt::ESN).all(|ty| a.transforms.iter().filter(|t| t.ty == ty).count() <= 1);
    if !one_each {
        return None;
    }
    let idx = (a.num as usize).checked_sub(1)?;
    let set = offered.get(idx)?;
    set.choose(a, protocol, want_dh).map(|c| (c, a.spi.clone()))
}

/// Parses one proposal string (`aes128gcm16-prfsha256-x25519`, or
/// `default`). `ike`: an IKE proposal (needs a PRF and a group) or ESP.
pub fn parse(s: &str, ike: bool) -> Result<Vec<AlgSet>, String> {
    if s == "default" {
        return Ok(defaults(ike));
    }
    let mut a = AlgSet::default();
    for w in s.split('-') {
        let w = w.trim();
        let gcm = |bits: u16, rest: &str| -> Option<Encr> {
            match rest {
                "gcm16" | "gcm128" | "gcm" => Some(Encr::AesGcm(bits, 16)),
                "gcm12" | "gcm96" => Some(Encr::AesGcm(bits, 12)),
                "gcm8" | "gcm64" => Some(Encr::AesGcm(bits, 8)),
                "gmac" => Some(Encr::Gmac(bits)),
                "" => Some(Encr::AesCbc(bits)),
                _ => None,
            }
        };
        let e = if let Some(r) = w.strip_prefix("aes128") {
            gcm(128, r)
        } else if let Some(r) = w.strip_prefix("aes256") {
            gcm(256, r)
        } else if w == "aes" {
            Some(Encr::AesCbc(128))
        } else if w == "chacha20poly1305" {
            Some(Encr::ChaCha)
        } else if w == "null" {
            Some(Encr::Null)
        } else {
            None
        };
        if let Some(e) = e {
            if ike && !e.for_ike() {
                return Err(format!(
                    "`{w}` is an ESP-only algorithm: not allowed in IKE `proposals`"
                ));
            }
            a.encr.push(e);
            continue;
        }
        match w {
            "sha256" | "sha2_256" => a.integ.push(Integ::Sha256),
            "sha384" | "sha2_384" => a.integ.push(Integ::Sha384),
            "sha512" | "sha2_512" => a.integ.push(Integ::Sha512),
            "prfsha256" => a.prf.push(Prf::Sha256),
            "prfsha384" => a.prf.push(Prf::Sha384),
            "prfsha512" => a.prf.push(Prf::Sha512),
            "ecp256" => a.dh.push(Group::Ecp256),
            "ecp384" => a.dh.push(Group::Ecp384),
            "ecp521" => a.dh.push(Group::Ecp521),
            "x25519" | "curve25519" => a.dh.push(Group::Curve25519),
            "esn" if !ike => a.esn.push(true),
            "noesn" if !ike => a.esn.push(false),
            "modp2048" => a.dh.push(Group::Modp2048),
            "modp3072" => a.dh.push(Group::Modp3072),
            w if w.starts_with("aes192") => {
                return Err(format!("`{w}`: AES-192 is not supported: use aes128… or aes256…"))
            }
            "sha1" | "sha" | "md5" | "3des" | "des" | "aesxcbc" | "prfsha1" | "prfmd5" | "modp1024" | "modp768" => {
                return Err(format!("`{w}` is not supported: RFC 8247/8221 deprecate it"))
            }
            _ => {
                return Err(format!(
                    "unknown algorithm `{w}` (expected aes128, aes256, aes128gcm16, aes256gcm16, aes128gcm12, aes128gcm8, chacha20poly1305, {}sha256, sha384, sha512, prfsha256, prfsha384, prfsha512, ecp256, ecp384, ecp521, x25519, modp2048, modp3072{})",
                    if ike { "" } else { "aes128gmac, aes256gmac, null, " },
                    if ike { "" } else { ", esn, noesn" }
                ))
            }
        }
    }
    if a.encr.is_empty() {
        return Err(format!("proposal `{s}` has no encryption algorithm"));
    }
    let aead = a.encr.iter().filter(|e| e.is_aead()).count();
    if aead != 0 && aead != a.encr.len() {
        return Err(format!(
            "proposal `{s}` mixes AEAD and non-AEAD encryption: write them as two proposals"
        ));
    }
    if aead != 0 && !a.integ.is_empty() {
        return Err(format!(
            "proposal `{s}`: an AEAD algorithm takes no integrity algorithm (RFC 8247 §3.1)"
        ));
    }
    if aead == 0 && a.integ.is_empty() && !a.encr.contains(&Encr::Null) {
        return Err(format!(
            "proposal `{s}` has no integrity algorithm (RFC 8221 §5)"
        ));
    }
    if a.encr.contains(&Encr::Null) && a.integ.is_empty() {
        return Err(format!(
            "proposal `{s}`: null encryption needs an integrity algorithm"
        ));
    }
    if ike {
        if a.prf.is_empty() {
            if aead != 0 {
                // As strongSwan: an AEAD IKE proposal names its PRF.
                return Err(format!(
                    "IKE proposal `{s}` needs a PRF with an AEAD algorithm (e.g. -prfsha256)"
                ));
            }
            // As strongSwan: the PRFs of the integrity algorithms.
            a.prf = a.integ.iter().map(|i| i.prf()).collect();
        }
        if a.dh.is_empty() {
            return Err(format!(
                "IKE proposal `{s}` needs a key exchange group (e.g. -x25519)"
            ));
        }
    } else {
        if !a.prf.is_empty() {
            return Err(format!("ESP proposal `{s}` takes no PRF"));
        }
        // RFC 4303: with ESP only our supported combinations (docs/config.md).
        for i in &a.integ {
            if *i != Integ::Sha256 {
                return Err(format!(
                    "ESP proposal `{s}`: espd does ESP integrity with sha256 only"
                ));
            }
        }
    }
    Ok(vec![a])
}

/// A comma-separated list (`proposals = a, b`).
pub fn parse_list(s: &str, ike: bool) -> Result<Vec<AlgSet>, String> {
    let mut out = Vec::new();
    for p in s.split(',') {
        let p = p.trim();
        if p.is_empty() {
            return Err("empty proposal in the list".into());
        }
        out.extend(parse(p, ike)?);
    }
    Ok(out)
}

/// `default`: what espd-ike supports, AEAD first (docs/ike.md).
pub fn defaults(ike: bool) -> Vec<AlgSet> {
    if ike {
        let dh = vec![
            Group::Curve25519,
            Group::Ecp256,
            Group::Ecp384,
            Group::Ecp521,
            Group::Modp3072,
            Group::Modp2048,
        ];
        vec![
            AlgSet {
                encr: vec![Encr::AesGcm(128, 16), Encr::AesGcm(256, 16), Encr::ChaCha],
                integ: vec![],
                prf: vec![Prf::Sha256, Prf::Sha384, Prf::Sha512],
                dh: dh.clone(),
                esn: vec![],
            },
            AlgSet {
                encr: vec![Encr::AesCbc(128), Encr::AesCbc(256)],
                integ: vec![Integ::Sha256, Integ::Sha384, Integ::Sha512],
                prf: vec![Prf::Sha256, Prf::Sha384, Prf::Sha512],
                dh,
                esn: vec![],
            },
        ]
    } else {
        vec![
            AlgSet {
                encr: vec![Encr::AesGcm(128, 16), Encr::AesGcm(256, 16), Encr::ChaCha],
                esn: vec![false],
                ..AlgSet::default()
            },
            AlgSet {
                encr: vec![Encr::AesCbc(128), Encr::AesCbc(256)],
                integ: vec![Integ::Sha256],
                esn: vec![false],
                ..AlgSet::default()
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords() {
        let a = parse("aes128gcm16-prfsha256-x25519", true).unwrap();
        assert_eq!(a[0].encr, vec![Encr::AesGcm(128, 16)]);
        assert_eq!(a[0].dh, vec![Group::Curve25519]);
        let b = parse("aes128-sha256-ecp256", true).unwrap();
        assert_eq!(
            b[0].prf,
            vec![Prf::Sha256],
            "PRF from the integrity algorithm"
        );
        assert!(parse("aes128gcm16-x25519", true).is_err());
        assert!(parse("aes128gcm16-sha256-prfsha256-x25519", true).is_err());
        assert!(parse("aes128-sha256", true).is_err());
        assert_eq!(
            parse("aes128-sha256-modp3072", true).unwrap()[0].dh,
            vec![Group::Modp3072]
        );
        assert!(parse("aes128-sha256-modp1024", true).is_err());
        assert!(parse("aes128gcm16-esn", false).unwrap()[0].esn == vec![true]);
        assert!(parse("bogus", false)
            .unwrap_err()
            .contains("unknown algorithm `bogus`"));
    }

    #[test]
    fn choose_follows_our_order_and_checks_answers() {
        let ours = parse_list(
            "aes256gcm16-prfsha384-ecp384, aes128gcm16-prfsha256-x25519",
            true,
        )
        .unwrap();
        let theirs = parse_list(
            "aes128gcm16-aes256gcm16-prfsha256-prfsha384-x25519-ecp384",
            true,
        )
        .unwrap();
        let p = theirs[0].proposal(1, proto::IKE, vec![], true);
        let (num, c, _) = select(&ours, &[p], proto::IKE, true).unwrap();
        assert_eq!(num, 1);
        assert_eq!(c.encr, Encr::AesGcm(256, 16));
        assert_eq!(c.dh, Some(Group::Ecp384));
        // The answer names their proposal 1: accepted by the offerer.
        let ans = c.proposal(1, proto::IKE, vec![]);
        assert!(accept_answer(&theirs, std::slice::from_ref(&ans), proto::IKE, true).is_some());
        // An answer with a transform we never offered is refused.
        let mut bad = ans;
        bad.transforms[0] = Encr::ChaCha.transform();
        assert!(accept_answer(&theirs, &[bad], proto::IKE, true).is_none());
    }

    #[test]
    fn esp_esn_negotiation() {
        let ours = parse_list("aes128gcm16-esn-noesn", false).unwrap();
        let theirs = parse_list("aes128gcm16-noesn", false).unwrap()[0].proposal(
            1,
            proto::ESP,
            vec![1, 2, 3, 4],
            false,
        );
        let (_, c, spi) = select(&ours, &[theirs], proto::ESP, false).unwrap();
        assert!(!c.esn);
        assert_eq!(spi, vec![1, 2, 3, 4]);
        let only_esn = parse_list("aes128gcm16-esn", false).unwrap();
        let theirs = parse_list("aes128gcm16", false).unwrap()[0].proposal(
            1,
            proto::ESP,
            vec![1, 2, 3, 4],
            false,
        );
        assert!(select(&only_esn, &[theirs], proto::ESP, false).is_none());
    }
}
