//! The little DER that IKE authentication needs beyond rustls-webpki:
//! distinguished names (ID_DER_ASN1_DN, RFC 7296 §3.5, in strongSwan's
//! `C=CH, O=org, CN=host` text form), the rfc822Name entries of a
//! certificate's subjectAltName (RFC 5280 §4.2.1.6), and the RSASSA-PSS
//! parameters of an RFC 7427 AlgorithmIdentifier (RFC 4055 §3.1).
//!
//! Every reader here is bounded by its input and returns None on anything
//! malformed; nothing panics on bytes from the network.

/// One TLV: (tag, contents), and what follows it.
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let l0 = *b.get(1)?;
    let (len, at) = if l0 < 0x80 {
        (l0 as usize, 2)
    } else {
        let n = (l0 & 0x7f) as usize;
        if n == 0 || n > 3 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = len << 8 | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = at.checked_add(len)?;
    Some((tag, b.get(at..end)?, b.get(end..)?))
}

/// The contents of a TLV with `tag`, and the rest.
fn expect(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, v, rest) = tlv(b)?;
    (t == tag).then_some((v, rest))
}

/// Appends a TLV (lengths up to 16 MiB; nothing here is near that: IKE
/// messages are at most 64 KiB).
fn push_tlv(out: &mut Vec<u8>, tag: u8, v: &[u8]) {
    out.push(tag);
    match v.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n < 0x100 => out.extend_from_slice(&[0x81, n as u8]),
        n if n < 0x1_0000 => out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]),
        n => out.extend_from_slice(&[0x83, (n >> 16) as u8, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(v);
}

/// `v` as one TLV with `tag`.
pub fn wrap(tag: u8, v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + 5);
    push_tlv(&mut out, tag, v);
    out
}

pub const SEQ: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// Attribute names strongSwan writes and reads in DNs, with their OIDs
/// (DER contents).
const ATTRS: &[(&str, &[u8])] = &[
    ("C", &[0x55, 0x04, 0x06]),
    ("ST", &[0x55, 0x04, 0x08]),
    ("L", &[0x55, 0x04, 0x07]),
    ("O", &[0x55, 0x04, 0x0a]),
    ("OU", &[0x55, 0x04, 0x0b]),
    ("CN", &[0x55, 0x04, 0x03]),
    ("SN", &[0x55, 0x04, 0x05]),
    ("serialNumber", &[0x55, 0x04, 0x05]),
    ("T", &[0x55, 0x04, 0x0c]),
    ("title", &[0x55, 0x04, 0x0c]),
    ("street", &[0x55, 0x04, 0x09]),
    ("N", &[0x55, 0x04, 0x29]),
    ("G", &[0x55, 0x04, 0x2a]),
    ("GN", &[0x55, 0x04, 0x2a]),
    ("S", &[0x55, 0x04, 0x04]),
    ("I", &[0x55, 0x04, 0x2b]),
    ("D", &[0x55, 0x04, 0x0d]),
    ("dnQualifier", &[0x55, 0x04, 0x2e]),
    (
        "UID",
        &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01],
    ),
    (
        "DC",
        &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19],
    ),
    ("E", &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01]),
    (
        "Email",
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01],
    ),
    (
        "emailAddress",
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01],
    ),
];

/// One relative distinguished name: an attribute OID and its value.
pub type Rdn = (Vec<u8>, String);

/// strongSwan's DN text (`C=CH, O=Acme, CN=gw.example`; `,` or `/`
/// between parts) as RDNs, or an error naming what is wrong.
pub fn parse_dn(s: &str) -> Result<Vec<Rdn>, String> {
    let s = s.trim().trim_start_matches('/');
    let mut out = Vec::new();
    for part in s.split([',', '/']).map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` in a distinguished name: expected NAME=value"))?;
        let (k, v) = (k.trim(), v.trim().trim_matches('"'));
        let oid = ATTRS
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, o)| o.to_vec())
            .ok_or_else(|| {
                format!("`{k}` is not a DN attribute espd-ike knows (expected C, ST, L, O, OU, CN, SN, E, DC, UID, T, N, G, S, I, D)")
            })?;
        out.push((oid, v.to_string()));
    }
    if out.is_empty() {
        return Err("an empty distinguished name".into());
    }
    Ok(out)
}

/// DER of a Name (SEQUENCE OF SET OF AttributeTypeAndValue), each value a
/// PrintableString when it can be one, else a UTF8String.
pub fn encode_dn(rdns: &[Rdn]) -> Vec<u8> {
    let mut body = Vec::new();
    for (oid, v) in rdns {
        let printable = v
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b" '()+,-./:=?".contains(&c));
        let mut atv = Vec::new();
        push_tlv(&mut atv, OID, oid);
        push_tlv(&mut atv, if printable { 0x13 } else { 0x0c }, v.as_bytes());
        let mut seq = Vec::new();
        push_tlv(&mut seq, SEQ, &atv);
        push_tlv(&mut body, SET, &seq);
    }
    let mut out = Vec::new();
    push_tlv(&mut out, SEQ, &body);
    out
}

/// The RDNs of a Name's contents (without its outer SEQUENCE, as
/// rustls-webpki gives a subject), or None if malformed.
pub fn name_rdns(mut b: &[u8]) -> Option<Vec<Rdn>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (mut set, rest) = expect(b, SET)?;
        b = rest;
        while !set.is_empty() {
            let (atv, rest) = expect(set, SEQ)?;
            set = rest;
            let (oid, rest) = expect(atv, OID)?;
            let (t, v, _) = tlv(rest)?;
            // UTF8String, PrintableString, TeletexString, IA5String,
            // BMPString (UCS-2), UniversalString: the text.
            let text = match t {
                0x0c | 0x13 | 0x14 | 0x16 => String::from_utf8_lossy(v).into_owned(),
                0x1e => {
                    if v.len() % 2 != 0 {
                        return None;
                    }
                    let u: Vec<u16> = v
                        .chunks(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect();
                    String::from_utf16_lossy(&u)
                }
                _ => return None,
            };
            out.push((oid.to_vec(), text));
        }
    }
    Some(out)
}

/// A full Name's DER (as in an ID payload) as RDNs.
pub fn dn_rdns(der: &[u8]) -> Option<Vec<Rdn>> {
    let (body, rest) = expect(der, SEQ)?;
    if !rest.is_empty() {
        return None;
    }
    name_rdns(body)
}

/// Whether `have` is the name `want` asks for: the same attributes in the
/// same order, values equal ignoring ASCII case; a value `*` in `want`
/// matches any value (strongSwan's wildcards).
pub fn dn_matches(want: &[Rdn], have: &[Rdn]) -> bool {
    want.len() == have.len()
        && want
            .iter()
            .zip(have)
            .all(|((wo, wv), (ho, hv))| wo == ho && (wv == "*" || wv.eq_ignore_ascii_case(hv)))
}

/// strongSwan's text for a DN (`C=CH, O=Acme, CN=gw`).
pub fn dn_text(rdns: &[Rdn]) -> String {
    rdns.iter()
        .map(|(oid, v)| {
            let name = ATTRS
                .iter()
                .find(|(_, o)| o == oid)
                .map_or_else(|| format!("{oid:02x?}"), |(n, _)| n.to_string());
            format!("{name}={v}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The rfc822Name entries of a certificate's subjectAltName extension.
pub fn san_emails(cert: &[u8]) -> Vec<String> {
    fn inner(cert: &[u8]) -> Option<Vec<String>> {
        let (c, _) = expect(cert, SEQ)?;
        let (tbs, _) = expect(c, SEQ)?;
        let mut b = tbs;
        // [0] version, serial, signature, issuer, validity, subject, spki,
        // then [1] [2] unique IDs and [3] extensions.
        let mut exts = None;
        while !b.is_empty() {
            let (t, v, rest) = tlv(b)?;
            b = rest;
            if t == 0xa3 {
                exts = Some(expect(v, SEQ)?.0);
            }
        }
        let mut e = exts?;
        let mut out = Vec::new();
        while !e.is_empty() {
            let (ext, rest) = expect(e, SEQ)?;
            e = rest;
            let (oid, mut r) = expect(ext, OID)?;
            if oid != [0x55, 0x1d, 0x11] {
                continue;
            }
            if r.first() == Some(&0x01) {
                r = tlv(r)?.2; // critical BOOLEAN
            }
            let (octets, _) = expect(r, 0x04)?;
            let (mut names, _) = expect(octets, SEQ)?;
            while !names.is_empty() {
                let (t, v, rest) = tlv(names)?;
                names = rest;
                if t == 0x81 {
                    out.push(String::from_utf8_lossy(v).into_owned());
                }
            }
        }
        Some(out)
    }
    inner(cert).unwrap_or_default()
}

/// RFC 4055 §2.1 hash OIDs (DER contents) and their output lengths.
const SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
const SHA384: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02];
const SHA512: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03];
const SHA1: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1a];
const RSASSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
const MGF1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x08];

/// The PSS parameters of an AlgorithmIdentifier: (hash output octets,
/// MGF1 hash output octets, salt length). None if it is not RSASSA-PSS or
/// is malformed. RFC 4055 §3.1 defaults: SHA-1, MGF1 with SHA-1, salt 20.
pub fn pss_params(alg: &[u8]) -> Option<(usize, usize, usize)> {
    let hash_len = |a: &[u8]| -> Option<usize> {
        let (oid, _) = expect(a, OID)?;
        Some(match oid {
            o if o == SHA1 => 20,
            o if o == SHA256 => 32,
            o if o == SHA384 => 48,
            o if o == SHA512 => 64,
            _ => return None,
        })
    };
    let (body, rest) = expect(alg, SEQ)?;
    if !rest.is_empty() {
        return None;
    }
    let (oid, params) = expect(body, OID)?;
    if oid != RSASSA_PSS {
        return None;
    }
    let (mut p, _) = expect(params, SEQ)?;
    let (mut hash, mut mgf, mut salt) = (20, 20, 20);
    while !p.is_empty() {
        let (t, v, rest) = tlv(p)?;
        p = rest;
        match t {
            0xa0 => hash = hash_len(expect(v, SEQ)?.0)?,
            0xa1 => {
                let (m, _) = expect(v, SEQ)?;
                let (oid, r) = expect(m, OID)?;
                if oid != MGF1 {
                    return None;
                }
                mgf = hash_len(expect(r, SEQ)?.0)?;
            }
            0xa2 => {
                let (i, _) = expect(v, 0x02)?;
                if i.is_empty() || i.len() > 2 {
                    return None;
                }
                salt = i.iter().fold(0usize, |a, &b| a << 8 | b as usize);
            }
            // trailerField: only 1 (trailerFieldBC) exists.
            0xa3 => {
                if expect(v, 0x02)?.0 != [1] {
                    return None;
                }
            }
            _ => return None,
        }
    }
    Some((hash, mgf, salt))
}

/// The RFC 7427 AlgorithmIdentifier for RSASSA-PSS with SHA-`bits`, MGF1
/// with the same hash and a salt as long as the hash (what aws-lc-rs signs,
/// and strongSwan's `rsa/pss` default).
pub fn pss_alg(bits: u16) -> Vec<u8> {
    let (oid, salt) = match bits {
        384 => (SHA384, 48u8),
        512 => (SHA512, 64),
        _ => (SHA256, 32),
    };
    let mut hash_alg = Vec::new();
    let mut h = Vec::new();
    push_tlv(&mut h, OID, oid);
    h.extend_from_slice(&[0x05, 0x00]);
    push_tlv(&mut hash_alg, SEQ, &h);
    let mut mgf = Vec::new();
    push_tlv(&mut mgf, OID, MGF1);
    mgf.extend_from_slice(&hash_alg);
    let mut mgf_alg = Vec::new();
    push_tlv(&mut mgf_alg, SEQ, &mgf);
    let mut params = Vec::new();
    push_tlv(&mut params, 0xa0, &hash_alg);
    push_tlv(&mut params, 0xa1, &mgf_alg);
    let mut s = Vec::new();
    push_tlv(&mut s, 0x02, &[salt]);
    push_tlv(&mut params, 0xa2, &s);
    let mut body = Vec::new();
    push_tlv(&mut body, OID, RSASSA_PSS);
    push_tlv(&mut body, SEQ, &params);
    let mut out = Vec::new();
    push_tlv(&mut out, SEQ, &body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dn_text_round_trips_and_matches() {
        let r = parse_dn("C=CH, O=strongSwan Project, CN=moon.strongswan.org").unwrap();
        let der = encode_dn(&r);
        assert_eq!(dn_rdns(&der).unwrap(), r);
        assert_eq!(
            dn_text(&r),
            "C=CH, O=strongSwan Project, CN=moon.strongswan.org"
        );
        let slash = parse_dn("/C=CH/O=strongSwan Project/CN=MOON.strongswan.org").unwrap();
        assert!(dn_matches(&r, &slash));
        let wild = parse_dn("C=CH, O=strongSwan Project, CN=*").unwrap();
        assert!(dn_matches(&wild, &r));
        assert!(!dn_matches(&r, &wild[..2]));
        assert!(parse_dn("C=CH, XX=1").is_err());
        assert!(parse_dn("C").is_err());
        // Truncated or trailing bytes never parse.
        for n in 0..der.len() {
            assert!(dn_rdns(&der[..n]).is_none());
        }
    }

    #[test]
    fn pss_parameters_round_trip_and_rfc7427_example() {
        for bits in [256u16, 384, 512] {
            let n = bits as usize / 8;
            assert_eq!(pss_params(&pss_alg(bits)), Some((n, n, n)));
        }
        // RSASSA-PSS with SHA-256, MGF1-SHA-256, salt 32, as OpenSSL
        // writes it (the Chromium/webpki test vectors' ALGORITHM block).
        let a = [
            0x30, 0x41, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a, 0x30,
            0x34, 0xa0, 0x0f, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04,
            0x02, 0x01, 0x05, 0x00, 0xa1, 0x1c, 0x30, 0x1a, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86,
            0xf7, 0x0d, 0x01, 0x01, 0x08, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65,
            0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0xa2, 0x03, 0x02, 0x01, 0x20,
        ];
        assert_eq!(pss_params(&a), Some((32, 32, 32)));
        assert_eq!(pss_params(&a[..a.len() - 1]), None);
        assert_eq!(
            pss_params(&[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70]),
            None
        );
    }
}
