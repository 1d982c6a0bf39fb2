//! IKEv2 messages on the wire (RFC 7296 §3): the header, the generic
//! payload chain and each payload this daemon reads or writes, as plain
//! `Repr` values with `parse`/`emit`. Every parser is bounded by the octets
//! it is given and answers a named [`Error`]; nothing here panics on input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// RFC 7296 §3.1: the fixed IKE header.
pub const HDR_LEN: usize = 28;
/// RFC 7296 §3.2: the generic payload header.
pub const GEN_LEN: usize = 4;
/// Version 2.0 (major 2, minor 0) in the version octet.
pub const VERSION: u8 = 0x20;

pub mod exchange {
    pub const IKE_SA_INIT: u8 = 34;
    pub const IKE_AUTH: u8 = 35;
    pub const CREATE_CHILD_SA: u8 = 36;
    pub const INFORMATIONAL: u8 = 37;
}

pub mod flags {
    pub const INITIATOR: u8 = 0x08;
    pub const VERSION: u8 = 0x10;
    pub const RESPONSE: u8 = 0x20;
}

/// RFC 7296 §3.15.1: Configuration payload types and attributes.
pub mod cfg {
    pub const REQUEST: u8 = 1;
    pub const REPLY: u8 = 2;
    pub const SET: u8 = 3;
    pub const ACK: u8 = 4;
    pub const INTERNAL_IP4_ADDRESS: u16 = 1;
    pub const INTERNAL_IP4_NETMASK: u16 = 2;
    pub const INTERNAL_IP4_DNS: u16 = 3;
    /// RFC 7296 §3.15.1: an IPv6 address and its prefix length (17 octets).
    pub const INTERNAL_IP6_ADDRESS: u16 = 8;
    pub const INTERNAL_IP6_DNS: u16 = 10;
}

/// One Configuration Attribute (RFC 7296 §3.15.1): the type without the
/// reserved high bit, and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CfgAttr {
    pub ty: u16,
    pub value: Vec<u8>,
}

impl CfgAttr {
    /// INTERNAL_IP4_ADDRESS, or INTERNAL_IP6_ADDRESS with prefix length 128
    /// (§3.15.1); an unspecified address is the empty value that asks for any.
    pub fn address(a: std::net::IpAddr) -> CfgAttr {
        let (ty, value) = match a {
            std::net::IpAddr::V4(x) => (cfg::INTERNAL_IP4_ADDRESS, x.octets().to_vec()),
            std::net::IpAddr::V6(x) => (
                cfg::INTERNAL_IP6_ADDRESS,
                [&x.octets()[..], &[128]].concat(),
            ),
        };
        let value = if a.is_unspecified() {
            Vec::new()
        } else {
            value
        };
        CfgAttr { ty, value }
    }
}

/// RFC 7296 §3.2 payload types.
pub mod pt {
    pub const NONE: u8 = 0;
    pub const SA: u8 = 33;
    pub const KE: u8 = 34;
    pub const IDI: u8 = 35;
    pub const IDR: u8 = 36;
    pub const CERT: u8 = 37;
    pub const CERTREQ: u8 = 38;
    pub const AUTH: u8 = 39;
    pub const NONCE: u8 = 40;
    pub const NOTIFY: u8 = 41;
    pub const DELETE: u8 = 42;
    pub const VENDOR: u8 = 43;
    pub const TSI: u8 = 44;
    pub const TSR: u8 = 45;
    pub const SK: u8 = 46;
    pub const CP: u8 = 47;
    pub const EAP: u8 = 48;
    /// RFC 7383: an encrypted fragment.
    pub const SKF: u8 = 53;
}

/// RFC 7296 §3.10.1 notify message types (and later RFCs').
pub mod notify {
    pub const UNSUPPORTED_CRITICAL_PAYLOAD: u16 = 1;
    pub const INVALID_IKE_SPI: u16 = 4;
    pub const INVALID_MAJOR_VERSION: u16 = 5;
    pub const INVALID_SYNTAX: u16 = 7;
    pub const INVALID_MESSAGE_ID: u16 = 9;
    pub const INVALID_SPI: u16 = 11;
    pub const NO_PROPOSAL_CHOSEN: u16 = 14;
    pub const INVALID_KE_PAYLOAD: u16 = 17;
    pub const AUTHENTICATION_FAILED: u16 = 24;
    pub const SINGLE_PAIR_REQUIRED: u16 = 34;
    pub const NO_ADDITIONAL_SAS: u16 = 35;
    pub const INTERNAL_ADDRESS_FAILURE: u16 = 36;
    pub const FAILED_CP_REQUIRED: u16 = 37;
    pub const TS_UNACCEPTABLE: u16 = 38;
    pub const INVALID_SELECTORS: u16 = 39;
    pub const TEMPORARY_FAILURE: u16 = 43;
    pub const CHILD_SA_NOT_FOUND: u16 = 44;
    /// Error types are below 16384 (RFC 7296 §3.10.1).
    pub const FIRST_STATUS: u16 = 16384;
    pub const INITIAL_CONTACT: u16 = 16384;
    pub const SET_WINDOW_SIZE: u16 = 16385;
    pub const ADDITIONAL_TS_POSSIBLE: u16 = 16386;
    pub const IPCOMP_SUPPORTED: u16 = 16387;
    pub const NAT_DETECTION_SOURCE_IP: u16 = 16388;
    pub const NAT_DETECTION_DESTINATION_IP: u16 = 16389;
    pub const COOKIE: u16 = 16390;
    pub const USE_TRANSPORT_MODE: u16 = 16391;
    pub const HTTP_CERT_LOOKUP_SUPPORTED: u16 = 16392;
    pub const REKEY_SA: u16 = 16393;
    pub const ESP_TFC_PADDING_NOT_SUPPORTED: u16 = 16394;
    pub const NON_FIRST_FRAGMENTS_ALSO: u16 = 16395;
    pub const MOBIKE_SUPPORTED: u16 = 16396;
    pub const MULTIPLE_AUTH_SUPPORTED: u16 = 16404;
    pub const EAP_ONLY_AUTHENTICATION: u16 = 16417;
    pub const CHILDLESS_IKEV2_SUPPORTED: u16 = 16418;
    /// RFC 7383 §2.3.
    pub const IKEV2_FRAGMENTATION_SUPPORTED: u16 = 16430;
    /// RFC 7427 §4.
    pub const SIGNATURE_HASH_ALGORITHMS: u16 = 16431;

    /// A name for logs.
    pub fn name(t: u16) -> String {
        match t {
            UNSUPPORTED_CRITICAL_PAYLOAD => "UNSUPPORTED_CRITICAL_PAYLOAD".into(),
            INVALID_IKE_SPI => "INVALID_IKE_SPI".into(),
            INVALID_MAJOR_VERSION => "INVALID_MAJOR_VERSION".into(),
            INVALID_SYNTAX => "INVALID_SYNTAX".into(),
            INVALID_MESSAGE_ID => "INVALID_MESSAGE_ID".into(),
            INVALID_SPI => "INVALID_SPI".into(),
            NO_PROPOSAL_CHOSEN => "NO_PROPOSAL_CHOSEN".into(),
            INVALID_KE_PAYLOAD => "INVALID_KE_PAYLOAD".into(),
            AUTHENTICATION_FAILED => "AUTHENTICATION_FAILED".into(),
            SINGLE_PAIR_REQUIRED => "SINGLE_PAIR_REQUIRED".into(),
            NO_ADDITIONAL_SAS => "NO_ADDITIONAL_SAS".into(),
            INTERNAL_ADDRESS_FAILURE => "INTERNAL_ADDRESS_FAILURE".into(),
            FAILED_CP_REQUIRED => "FAILED_CP_REQUIRED".into(),
            TS_UNACCEPTABLE => "TS_UNACCEPTABLE".into(),
            INVALID_SELECTORS => "INVALID_SELECTORS".into(),
            TEMPORARY_FAILURE => "TEMPORARY_FAILURE".into(),
            CHILD_SA_NOT_FOUND => "CHILD_SA_NOT_FOUND".into(),
            INITIAL_CONTACT => "INITIAL_CONTACT".into(),
            NAT_DETECTION_SOURCE_IP => "NAT_DETECTION_SOURCE_IP".into(),
            NAT_DETECTION_DESTINATION_IP => "NAT_DETECTION_DESTINATION_IP".into(),
            COOKIE => "COOKIE".into(),
            USE_TRANSPORT_MODE => "USE_TRANSPORT_MODE".into(),
            REKEY_SA => "REKEY_SA".into(),
            ESP_TFC_PADDING_NOT_SUPPORTED => "ESP_TFC_PADDING_NOT_SUPPORTED".into(),
            other => format!("notify {other}"),
        }
    }
}

/// Protocol IDs of SA proposals, notifies and deletes (RFC 7296 §3.3.1).
pub mod proto {
    pub const IKE: u8 = 1;
    pub const AH: u8 = 2;
    pub const ESP: u8 = 3;
}

/// Why a message could not be read; each is a counted drop reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Shorter than its header or than a length it announces.
    Truncated,
    /// A length field that does not fit what holds it.
    BadLength,
    /// Major version other than 2 (RFC 7296 §2.5).
    BadVersion,
    /// A payload the receiver must understand and does not (critical bit).
    UnsupportedCritical(u8),
    /// A payload whose contents break its format.
    Malformed(&'static str),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Truncated => "truncated",
            Error::BadLength => "bad-length",
            Error::BadVersion => "bad-version",
            Error::UnsupportedCritical(_) => "unsupported-critical-payload",
            Error::Malformed(_) => "malformed",
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Truncated => f.write_str("message truncated"),
            Error::BadLength => f.write_str("a length field does not fit"),
            Error::BadVersion => f.write_str("IKE major version is not 2"),
            Error::UnsupportedCritical(t) => write!(f, "unsupported critical payload {t}"),
            Error::Malformed(w) => write!(f, "malformed {w}"),
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// RFC 7296 §3.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub spi_i: u64,
    pub spi_r: u64,
    pub next: u8,
    pub exchange: u8,
    pub flags: u8,
    pub msg_id: u32,
    pub length: u32,
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header, Error> {
        if b.len() < HDR_LEN {
            return Err(Error::Truncated);
        }
        // RFC 7296 §2.5: a major version we do not speak.
        if b[17] >> 4 != 2 {
            return Err(Error::BadVersion);
        }
        let length = be32(b, 24);
        if (length as usize) < HDR_LEN || length as usize > b.len() {
            return Err(Error::BadLength);
        }
        Ok(Header {
            spi_i: u64::from_be_bytes(b[0..8].try_into().unwrap_or_default()),
            spi_r: u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()),
            next: b[16],
            exchange: b[18],
            flags: b[19],
            msg_id: be32(b, 20),
            length,
        })
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.spi_i.to_be_bytes());
        out.extend_from_slice(&self.spi_r.to_be_bytes());
        out.push(self.next);
        out.push(VERSION);
        out.push(self.exchange);
        out.push(self.flags);
        out.extend_from_slice(&self.msg_id.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    pub fn is_response(&self) -> bool {
        self.flags & flags::RESPONSE != 0
    }

    /// Sent by the original initiator of the IKE SA (RFC 7296 §3.1, I flag).
    pub fn from_initiator(&self) -> bool {
        self.flags & flags::INITIATOR != 0
    }
}

/// A transform (RFC 7296 §3.3.2) with its key length attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transform {
    pub ty: u8,
    pub id: u16,
    pub key_len: Option<u16>,
}

pub mod tt {
    pub const ENCR: u8 = 1;
    pub const PRF: u8 = 2;
    pub const INTEG: u8 = 3;
    pub const DH: u8 = 4;
    pub const ESN: u8 = 5;
}

/// A proposal (RFC 7296 §3.3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub num: u8,
    pub proto: u8,
    pub spi: Vec<u8>,
    pub transforms: Vec<Transform>,
    /// A transform carried an attribute we do not know: RFC 7296 §3.3.6
    /// says to reject the proposal, so it never matches.
    pub unknown_attr: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Id {
    pub ty: u8,
    pub data: Vec<u8>,
}

pub mod idt {
    pub const IPV4_ADDR: u8 = 1;
    pub const FQDN: u8 = 2;
    pub const RFC822_ADDR: u8 = 3;
    pub const IPV6_ADDR: u8 = 5;
    pub const DER_ASN1_DN: u8 = 9;
    pub const DER_ASN1_GN: u8 = 10;
    pub const KEY_ID: u8 = 11;
}

impl Id {
    /// RFC 7296 §2.15 "RestOfInitIDPayload": the ID payload's body.
    pub fn body(&self) -> Vec<u8> {
        let mut b = vec![self.ty, 0, 0, 0];
        b.extend_from_slice(&self.data);
        b
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ty {
            idt::IPV4_ADDR if self.data.len() == 4 => {
                let a: [u8; 4] = self.data[..].try_into().unwrap_or_default();
                write!(f, "{}", Ipv4Addr::from(a))
            }
            idt::IPV6_ADDR if self.data.len() == 16 => {
                let a: [u8; 16] = self.data[..].try_into().unwrap_or_default();
                write!(f, "{}", Ipv6Addr::from(a))
            }
            idt::FQDN | idt::RFC822_ADDR => f.write_str(&String::from_utf8_lossy(&self.data)),
            idt::DER_ASN1_DN if crate::der::dn_rdns(&self.data).is_some() => f.write_str(
                &crate::der::dn_text(&crate::der::dn_rdns(&self.data).unwrap_or_default()),
            ),
            _ => {
                write!(f, "#")?;
                for b in &self.data {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// A traffic selector (RFC 7296 §3.13.1): an address range, a protocol
/// (0 = any) and a port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ts {
    pub proto: u8,
    pub start_port: u16,
    pub end_port: u16,
    pub start: IpAddr,
    pub end: IpAddr,
}

pub const TS_IPV4_ADDR_RANGE: u8 = 7;
pub const TS_IPV6_ADDR_RANGE: u8 = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    pub proto: u8,
    pub spi: Vec<u8>,
    pub ty: u16,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Sa(Vec<Proposal>),
    Ke {
        group: u16,
        data: Vec<u8>,
    },
    IdI(Id),
    IdR(Id),
    Cert {
        encoding: u8,
        data: Vec<u8>,
    },
    CertReq {
        encoding: u8,
        data: Vec<u8>,
    },
    Auth {
        method: u8,
        data: Vec<u8>,
    },
    Nonce(Vec<u8>),
    Notify(Notify),
    Delete {
        proto: u8,
        spi_size: u8,
        spis: Vec<Vec<u8>>,
    },
    Vendor(Vec<u8>),
    TsI(Vec<Ts>),
    TsR(Vec<Ts>),
    /// RFC 7296 §3.15: a Configuration payload (CFG_REQUEST, CFG_REPLY, …).
    Cp {
        ty: u8,
        attrs: Vec<CfgAttr>,
    },
    /// A non-critical payload we do not know (skipped, RFC 7296 §2.5).
    Unknown {
        ty: u8,
        body: Vec<u8>,
    },
}

impl Payload {
    pub fn ty(&self) -> u8 {
        match self {
            Payload::Sa(_) => pt::SA,
            Payload::Ke { .. } => pt::KE,
            Payload::IdI(_) => pt::IDI,
            Payload::IdR(_) => pt::IDR,
            Payload::Cert { .. } => pt::CERT,
            Payload::CertReq { .. } => pt::CERTREQ,
            Payload::Auth { .. } => pt::AUTH,
            Payload::Nonce(_) => pt::NONCE,
            Payload::Notify(_) => pt::NOTIFY,
            Payload::Delete { .. } => pt::DELETE,
            Payload::Vendor(_) => pt::VENDOR,
            Payload::TsI(_) => pt::TSI,
            Payload::TsR(_) => pt::TSR,
            Payload::Cp { .. } => pt::CP,
            Payload::Unknown { ty, .. } => *ty,
        }
    }

    pub fn notify(ty: u16, data: Vec<u8>) -> Payload {
        Payload::Notify(Notify {
            proto: 0,
            spi: Vec::new(),
            ty,
            data,
        })
    }

    fn parse(ty: u8, b: &[u8]) -> Result<Payload, Error> {
        Ok(match ty {
            pt::SA => Payload::Sa(parse_sa(b)?),
            pt::KE => {
                if b.len() < 4 {
                    return Err(Error::Malformed("KE payload"));
                }
                Payload::Ke {
                    group: be16(b, 0),
                    data: b[4..].to_vec(),
                }
            }
            pt::IDI | pt::IDR => {
                if b.len() < 4 {
                    return Err(Error::Malformed("ID payload"));
                }
                let id = Id {
                    ty: b[0],
                    data: b[4..].to_vec(),
                };
                if ty == pt::IDI {
                    Payload::IdI(id)
                } else {
                    Payload::IdR(id)
                }
            }
            pt::CERT | pt::CERTREQ => {
                if b.is_empty() {
                    return Err(Error::Malformed("CERT payload"));
                }
                let (encoding, data) = (b[0], b[1..].to_vec());
                if ty == pt::CERT {
                    Payload::Cert { encoding, data }
                } else {
                    Payload::CertReq { encoding, data }
                }
            }
            pt::AUTH => {
                if b.len() < 4 {
                    return Err(Error::Malformed("AUTH payload"));
                }
                Payload::Auth {
                    method: b[0],
                    data: b[4..].to_vec(),
                }
            }
            pt::NONCE => {
                // RFC 7296 §3.9: 16 to 256 octets.
                if !(16..=256).contains(&b.len()) {
                    return Err(Error::Malformed("Nonce payload (16-256 octets)"));
                }
                Payload::Nonce(b.to_vec())
            }
            pt::NOTIFY => {
                if b.len() < 4 || b.len() < 4 + b[1] as usize {
                    return Err(Error::Malformed("Notify payload"));
                }
                let n = b[1] as usize;
                Payload::Notify(Notify {
                    proto: b[0],
                    spi: b[4..4 + n].to_vec(),
                    ty: be16(b, 2),
                    data: b[4 + n..].to_vec(),
                })
            }
            pt::DELETE => {
                if b.len() < 4 {
                    return Err(Error::Malformed("Delete payload"));
                }
                let (size, count) = (b[1] as usize, be16(b, 2) as usize);
                if b.len() != 4 + size * count || (count > 0 && size == 0 && b[0] != proto::IKE) {
                    return Err(Error::Malformed("Delete payload"));
                }
                let spis = if size == 0 {
                    Vec::new()
                } else {
                    b[4..].chunks(size).map(<[u8]>::to_vec).collect()
                };
                Payload::Delete {
                    proto: b[0],
                    spi_size: b[1],
                    spis,
                }
            }
            pt::VENDOR => Payload::Vendor(b.to_vec()),
            pt::TSI | pt::TSR => {
                let ts = parse_ts(b)?;
                if ty == pt::TSI {
                    Payload::TsI(ts)
                } else {
                    Payload::TsR(ts)
                }
            }
            pt::CP => {
                // RFC 7296 §3.15: CFG Type, three reserved octets, then
                // attributes (R bit, 15-bit type, 2-octet length, value).
                if b.len() < 4 {
                    return Err(Error::Malformed("Configuration payload"));
                }
                let mut attrs = Vec::new();
                let mut rest = &b[4..];
                while !rest.is_empty() {
                    if rest.len() < 4 || rest.len() < 4 + be16(rest, 2) as usize {
                        return Err(Error::Malformed("Configuration attribute"));
                    }
                    let len = be16(rest, 2) as usize;
                    attrs.push(CfgAttr {
                        ty: be16(rest, 0) & 0x7fff,
                        value: rest[4..4 + len].to_vec(),
                    });
                    rest = &rest[4 + len..];
                }
                Payload::Cp { ty: b[0], attrs }
            }
            other => Payload::Unknown {
                ty: other,
                body: b.to_vec(),
            },
        })
    }

    fn emit_body(&self, out: &mut Vec<u8>) {
        match self {
            Payload::Sa(props) => emit_sa(props, out),
            Payload::Ke { group, data } => {
                out.extend_from_slice(&group.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(data);
            }
            Payload::IdI(id) | Payload::IdR(id) => out.extend_from_slice(&id.body()),
            Payload::Cert { encoding, data } | Payload::CertReq { encoding, data } => {
                out.push(*encoding);
                out.extend_from_slice(data);
            }
            Payload::Auth { method, data } => {
                out.extend_from_slice(&[*method, 0, 0, 0]);
                out.extend_from_slice(data);
            }
            Payload::Nonce(n) => out.extend_from_slice(n),
            Payload::Notify(n) => {
                out.push(n.proto);
                out.push(n.spi.len() as u8);
                out.extend_from_slice(&n.ty.to_be_bytes());
                out.extend_from_slice(&n.spi);
                out.extend_from_slice(&n.data);
            }
            Payload::Delete {
                proto,
                spi_size,
                spis,
            } => {
                out.push(*proto);
                out.push(*spi_size);
                out.extend_from_slice(&(spis.len() as u16).to_be_bytes());
                for s in spis {
                    out.extend_from_slice(s);
                }
            }
            Payload::Vendor(v) => out.extend_from_slice(v),
            Payload::TsI(ts) | Payload::TsR(ts) => emit_ts(ts, out),
            Payload::Cp { ty, attrs } => {
                out.extend_from_slice(&[*ty, 0, 0, 0]);
                for a in attrs {
                    out.extend_from_slice(&(a.ty & 0x7fff).to_be_bytes());
                    out.extend_from_slice(&(a.value.len() as u16).to_be_bytes());
                    out.extend_from_slice(&a.value);
                }
            }
            Payload::Unknown { body, .. } => out.extend_from_slice(body),
        }
    }
}

fn parse_sa(mut b: &[u8]) -> Result<Vec<Proposal>, Error> {
    let mut props = Vec::new();
    while !b.is_empty() {
        if b.len() < 8 {
            return Err(Error::Malformed("SA proposal"));
        }
        let last = b[0];
        let len = be16(b, 2) as usize;
        if len < 8 || len > b.len() || (last != 0 && last != 2) {
            return Err(Error::Malformed("SA proposal"));
        }
        let p = &b[..len];
        let spi_size = p[6] as usize;
        let n = p[7] as usize;
        if 8 + spi_size > len {
            return Err(Error::Malformed("SA proposal SPI"));
        }
        let mut t = &p[8 + spi_size..];
        let mut transforms = Vec::with_capacity(n);
        let mut unknown_attr = false;
        for i in 0..n {
            if t.len() < 8 {
                return Err(Error::Malformed("SA transform"));
            }
            let tl = be16(t, 2) as usize;
            let tlast = t[0];
            if tl < 8
                || tl > t.len()
                || (tlast != 0 && tlast != 3)
                || ((tlast == 0) != (i + 1 == n))
            {
                return Err(Error::Malformed("SA transform"));
            }
            let mut key_len = None;
            let mut a = &t[8..tl];
            // RFC 7296 §3.3.5 attributes: TV (AF set) or TLV.
            while !a.is_empty() {
                if a.len() < 4 {
                    return Err(Error::Malformed("transform attribute"));
                }
                let ty = be16(a, 0);
                let (used, val) = if ty & 0x8000 != 0 {
                    (4, Some(be16(a, 2)))
                } else {
                    let l = be16(a, 2) as usize;
                    if 4 + l > a.len() {
                        return Err(Error::Malformed("transform attribute"));
                    }
                    (4 + l, None)
                };
                match (ty & 0x7fff, val) {
                    (14, Some(v)) => key_len = Some(v),
                    _ => unknown_attr = true,
                }
                a = &a[used..];
            }
            transforms.push(Transform {
                ty: t[4],
                id: be16(t, 6),
                key_len,
            });
            t = &t[tl..];
        }
        if !t.is_empty() {
            return Err(Error::Malformed("SA proposal length"));
        }
        props.push(Proposal {
            num: p[4],
            proto: p[5],
            spi: p[8..8 + spi_size].to_vec(),
            transforms,
            unknown_attr,
        });
        b = &b[len..];
        if last == 0 {
            if !b.is_empty() {
                return Err(Error::Malformed("SA payload after the last proposal"));
            }
            break;
        }
    }
    if props.is_empty() {
        return Err(Error::Malformed("SA payload without proposals"));
    }
    Ok(props)
}

fn emit_sa(props: &[Proposal], out: &mut Vec<u8>) {
    for (pi, p) in props.iter().enumerate() {
        let start = out.len();
        out.push(if pi + 1 == props.len() { 0 } else { 2 });
        out.push(0);
        out.extend_from_slice(&[0, 0]);
        out.push(p.num);
        out.push(p.proto);
        out.push(p.spi.len() as u8);
        out.push(p.transforms.len() as u8);
        out.extend_from_slice(&p.spi);
        for (ti, t) in p.transforms.iter().enumerate() {
            let ts = out.len();
            out.push(if ti + 1 == p.transforms.len() { 0 } else { 3 });
            out.push(0);
            out.extend_from_slice(&[0, 0]);
            out.push(t.ty);
            out.push(0);
            out.extend_from_slice(&t.id.to_be_bytes());
            if let Some(k) = t.key_len {
                out.extend_from_slice(&(0x8000u16 | 14).to_be_bytes());
                out.extend_from_slice(&k.to_be_bytes());
            }
            let l = (out.len() - ts) as u16;
            out[ts + 2..ts + 4].copy_from_slice(&l.to_be_bytes());
        }
        let l = (out.len() - start) as u16;
        out[start + 2..start + 4].copy_from_slice(&l.to_be_bytes());
    }
}

fn parse_ts(b: &[u8]) -> Result<Vec<Ts>, Error> {
    if b.len() < 4 {
        return Err(Error::Malformed("TS payload"));
    }
    let n = b[0] as usize;
    let mut r = &b[4..];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if r.len() < 8 {
            return Err(Error::Malformed("traffic selector"));
        }
        let len = be16(r, 2) as usize;
        if len > r.len() {
            return Err(Error::Malformed("traffic selector"));
        }
        let (start, end) = match (r[0], len) {
            (TS_IPV4_ADDR_RANGE, 16) => {
                let s: [u8; 4] = r[8..12].try_into().unwrap_or_default();
                let e: [u8; 4] = r[12..16].try_into().unwrap_or_default();
                (IpAddr::from(s), IpAddr::from(e))
            }
            (TS_IPV6_ADDR_RANGE, 40) => {
                let s: [u8; 16] = r[8..24].try_into().unwrap_or_default();
                let e: [u8; 16] = r[24..40].try_into().unwrap_or_default();
                (IpAddr::from(s), IpAddr::from(e))
            }
            _ => return Err(Error::Malformed("traffic selector type or length")),
        };
        out.push(Ts {
            proto: r[1],
            start_port: be16(r, 4),
            end_port: be16(r, 6),
            start,
            end,
        });
        r = &r[len..];
    }
    if !r.is_empty() || n == 0 {
        return Err(Error::Malformed("TS payload count"));
    }
    Ok(out)
}

fn emit_ts(ts: &[Ts], out: &mut Vec<u8>) {
    out.extend_from_slice(&[ts.len() as u8, 0, 0, 0]);
    for t in ts {
        let (ty, len) = if t.start.is_ipv4() {
            (TS_IPV4_ADDR_RANGE, 16u16)
        } else {
            (TS_IPV6_ADDR_RANGE, 40)
        };
        out.extend_from_slice(&[ty, t.proto]);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&t.start_port.to_be_bytes());
        out.extend_from_slice(&t.end_port.to_be_bytes());
        for a in [t.start, t.end] {
            match a {
                IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
            }
        }
    }
}

/// A payload chain starting with type `first` (RFC 7296 §3.2). Stops at an
/// SK payload (which must be last, §3.14) and returns its offset in `b`.
pub struct Chain {
    pub payloads: Vec<Payload>,
    /// (offset of the SK payload's generic header, its first inner type).
    pub sk: Option<(usize, u8)>,
}

/// At most this many payloads in one message (a bound on work per packet).
pub const MAX_PAYLOADS: usize = 64;

pub fn parse_chain(first: u8, b: &[u8], base: usize) -> Result<Chain, Error> {
    let mut next = first;
    let mut at = 0;
    let mut payloads = Vec::new();
    while next != pt::NONE {
        if payloads.len() >= MAX_PAYLOADS {
            return Err(Error::Malformed("too many payloads"));
        }
        if b.len() < at + GEN_LEN {
            return Err(Error::Truncated);
        }
        let ty = next;
        let critical = b[at + 1] & 0x80 != 0;
        let len = be16(b, at + 2) as usize;
        if len < GEN_LEN || at + len > b.len() {
            return Err(Error::BadLength);
        }
        let following = b[at];
        if ty == pt::SK || ty == pt::SKF {
            // RFC 7296 §3.14: the Encrypted payload is the last one.
            if at + len != b.len() {
                return Err(Error::Malformed("payloads after the Encrypted payload"));
            }
            if ty == pt::SKF {
                return Err(Error::UnsupportedCritical(pt::SKF));
            }
            return Ok(Chain {
                payloads,
                sk: Some((base + at, following)),
            });
        }
        let body = &b[at + GEN_LEN..at + len];
        let known = matches!(ty, pt::SA..=pt::TSR);
        if !known && critical {
            // RFC 7296 §2.5: reject with UNSUPPORTED_CRITICAL_PAYLOAD.
            return Err(Error::UnsupportedCritical(ty));
        }
        payloads.push(Payload::parse(ty, body)?);
        at += len;
        next = following;
    }
    if at != b.len() {
        return Err(Error::Malformed("octets after the last payload"));
    }
    Ok(Chain { payloads, sk: None })
}

/// Emits `payloads` as a chain; returns the first payload's type.
pub fn emit_chain(payloads: &[Payload], out: &mut Vec<u8>) -> u8 {
    for (i, p) in payloads.iter().enumerate() {
        let start = out.len();
        out.push(payloads.get(i + 1).map_or(pt::NONE, Payload::ty));
        out.push(0);
        out.extend_from_slice(&[0, 0]);
        p.emit_body(out);
        let l = (out.len() - start) as u16;
        out[start + 2..start + 4].copy_from_slice(&l.to_be_bytes());
    }
    payloads.first().map_or(pt::NONE, Payload::ty)
}

/// An unencrypted message (IKE_SA_INIT, or an unprotected notify).
pub fn emit_plain(mut hdr: Header, payloads: &[Payload]) -> Vec<u8> {
    let mut body = Vec::new();
    hdr.next = emit_chain(payloads, &mut body);
    hdr.length = (HDR_LEN + body.len()) as u32;
    let mut out = Vec::with_capacity(hdr.length as usize);
    hdr.emit(&mut out);
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let ps = vec![
            Payload::Sa(vec![Proposal {
                num: 1,
                proto: proto::IKE,
                spi: vec![],
                transforms: vec![
                    Transform {
                        ty: tt::ENCR,
                        id: 20,
                        key_len: Some(128),
                    },
                    Transform {
                        ty: tt::PRF,
                        id: 5,
                        key_len: None,
                    },
                    Transform {
                        ty: tt::DH,
                        id: 31,
                        key_len: None,
                    },
                ],
                unknown_attr: false,
            }]),
            Payload::Ke {
                group: 31,
                data: vec![7; 32],
            },
            Payload::Nonce(vec![1; 32]),
            Payload::notify(notify::NAT_DETECTION_SOURCE_IP, vec![2; 20]),
            Payload::TsI(vec![Ts {
                proto: 17,
                start_port: 0,
                end_port: 65535,
                start: "198.18.1.0".parse().unwrap(),
                end: "198.18.1.255".parse().unwrap(),
            }]),
            Payload::TsR(vec![Ts {
                proto: 0,
                start_port: 0,
                end_port: 65535,
                start: "2001:db8::".parse().unwrap(),
                end: "2001:db8::ffff".parse().unwrap(),
            }]),
            Payload::Delete {
                proto: proto::ESP,
                spi_size: 4,
                spis: vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]],
            },
            Payload::IdI(Id {
                ty: idt::FQDN,
                data: b"gw1".to_vec(),
            }),
            Payload::Auth {
                method: 2,
                data: vec![9; 32],
            },
            Payload::Cp {
                ty: cfg::REPLY,
                attrs: vec![
                    CfgAttr {
                        ty: cfg::INTERNAL_IP4_ADDRESS,
                        value: vec![198, 18, 100, 1],
                    },
                    CfgAttr {
                        ty: cfg::INTERNAL_IP6_DNS,
                        value: vec![],
                    },
                ],
            },
        ];
        let hdr = Header {
            spi_i: 1,
            spi_r: 0,
            next: 0,
            exchange: exchange::IKE_SA_INIT,
            flags: flags::INITIATOR,
            msg_id: 0,
            length: 0,
        };
        let m = emit_plain(hdr, &ps);
        let h = Header::parse(&m).unwrap();
        assert_eq!(h.length as usize, m.len());
        let c = parse_chain(h.next, &m[HDR_LEN..], HDR_LEN).unwrap();
        assert_eq!(c.payloads, ps);
        assert!(c.sk.is_none());
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let ps = vec![
            Payload::Nonce(vec![1; 32]),
            Payload::notify(notify::COOKIE, vec![3; 16]),
        ];
        let hdr = Header {
            spi_i: 1,
            spi_r: 2,
            next: 0,
            exchange: 34,
            flags: 8,
            msg_id: 0,
            length: 0,
        };
        let m = emit_plain(hdr, &ps);
        for n in 0..m.len() {
            let mut t = m[..n].to_vec();
            if t.len() >= HDR_LEN {
                let l = t.len() as u32;
                t[24..28].copy_from_slice(&l.to_be_bytes());
                let h = Header::parse(&t).unwrap();
                assert!(parse_chain(h.next, &t[HDR_LEN..], HDR_LEN).is_err());
            } else {
                assert!(Header::parse(&t).is_err());
            }
        }
    }

    #[test]
    fn critical_unknown_payload_is_refused() {
        let mut body = vec![0u8, 0x80, 0, 8, 1, 2, 3, 4];
        assert_eq!(
            parse_chain(99, &body, 0).err(),
            Some(Error::UnsupportedCritical(99))
        );
        body[1] = 0;
        assert!(matches!(
            parse_chain(99, &body, 0).unwrap().payloads[0],
            Payload::Unknown { ty: 99, .. }
        ));
    }

    #[test]
    fn configuration_payload_as_a_client_sends_it() {
        // RFC 7296 §3.15: CFG_REQUEST, INTERNAL_IP4_ADDRESS and
        // INTERNAL_IP6_ADDRESS empty, as strongSwan asks for `vips = 0.0.0.0, ::`;
        // the reserved R bit is ignored.
        let body = [1, 0, 0, 0, 0, 1, 0, 0, 0x80, 8, 0, 0];
        let p = Payload::parse(pt::CP, &body).unwrap();
        assert_eq!(
            p,
            Payload::Cp {
                ty: cfg::REQUEST,
                attrs: vec![
                    CfgAttr {
                        ty: cfg::INTERNAL_IP4_ADDRESS,
                        value: vec![]
                    },
                    CfgAttr {
                        ty: cfg::INTERNAL_IP6_ADDRESS,
                        value: vec![]
                    },
                ],
            }
        );
        // An attribute longer than the payload, or a cut header, is malformed.
        assert!(Payload::parse(pt::CP, &[2, 0, 0, 0, 0, 1, 0, 4, 198, 18]).is_err());
        assert!(Payload::parse(pt::CP, &[2, 0, 0, 0, 0, 1, 0]).is_err());
        assert!(Payload::parse(pt::CP, &[2, 0, 0]).is_err());
    }
}
