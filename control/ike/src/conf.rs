//! swanctl.conf (strongSwan's settings grammar) for espd-ike: sections
//! `name { … }`, `key = value` lines, `#` comments, quoted strings and
//! `include`. The tree is then read against the words espd-ike supports
//! (docs/ike.md); every other word is an error naming FILE:LINE and what
//! was expected, or a warning where strongSwan's meaning is what espd-ike
//! does anyway.

use crate::proposal::{self, AlgSet};
use crate::ts::{self, TsConf};
use crate::wire::{idt, Id};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// Reqids from here up are handed out by espd-ike to CHILD_SAs of one
/// child config that need their own (several peers of a responder's
/// connection, e.g. road-warrior clients behind one NAT).
pub const DYNAMIC_REQIDS: u32 = 0x4000_0000;

/// A `key = value` with where it was written.
#[derive(Debug, Clone)]
pub struct Kv {
    pub key: String,
    pub value: String,
    pub at: String,
}

#[derive(Debug, Clone, Default)]
pub struct Section {
    pub name: String,
    pub at: String,
    pub kvs: Vec<Kv>,
    pub subs: Vec<Section>,
}

/// Reads FILE (and what it includes) into a tree.
pub fn read_tree(path: &Path) -> Result<Section, Vec<String>> {
    let mut root = Section {
        name: String::new(),
        at: path.display().to_string(),
        ..Section::default()
    };
    let mut errs = Vec::new();
    let mut stack: Vec<Section> = Vec::new();
    read_into(path, &mut root, &mut stack, &mut errs, 0);
    if let Some(s) = stack.last() {
        errs.push(format!(
            "{}: section `{}` is never closed (expected `}}`)",
            s.at, s.name
        ));
    }
    if errs.is_empty() {
        Ok(root)
    } else {
        Err(errs)
    }
}

fn read_into(
    path: &Path,
    root: &mut Section,
    stack: &mut Vec<Section>,
    errs: &mut Vec<String>,
    depth: usize,
) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            errs.push(format!("{}: cannot read: {e}", path.display()));
            return;
        }
    };
    let name = path.display().to_string();
    let toks = match lex(&text, &name) {
        Ok(t) => t,
        Err(e) => {
            errs.push(e);
            return;
        }
    };
    let mut i = 0;
    while i < toks.len() {
        let (t, at) = (&toks[i].0, &toks[i].1);
        match t {
            Tok::Close => match stack.pop() {
                Some(s) => parent(root, stack).subs.push(s),
                None => errs.push(format!("{at}: `}}` without an open section")),
            },
            Tok::Word(w) if w == "include" => {
                match toks.get(i + 1) {
                    Some((Tok::Word(f), _)) | Some((Tok::Value(f), _)) => {
                        let p = Path::new(f);
                        // strongSwan: relative to the including file's directory.
                        let p: PathBuf = if p.is_absolute() {
                            p.into()
                        } else {
                            path.parent().unwrap_or(Path::new(".")).join(p)
                        };
                        if depth > 8 {
                            errs.push(format!("{at}: includes nested deeper than 8"));
                        } else {
                            let mut files: Vec<PathBuf> = glob_simple(&p);
                            files.sort();
                            if files.is_empty() && !f.contains('*') {
                                errs.push(format!("{at}: include {f}: no such file"));
                            }
                            for f in files {
                                // An included file continues the current section.
                                let mut sub = std::mem::take(parent(root, stack));
                                read_into(&f, &mut sub, &mut Vec::new(), errs, depth + 1);
                                *parent(root, stack) = sub;
                            }
                        }
                        i += 1;
                    }
                    _ => errs.push(format!("{at}: `include` needs a file name")),
                }
            }
            Tok::Word(w) => match toks.get(i + 1).map(|t| &t.0) {
                Some(Tok::Open) => {
                    if w.contains(':') || w.contains('.') {
                        errs.push(format!("{at}: section `{w}`: section references (`name : base`) are not supported"));
                    }
                    stack.push(Section {
                        name: w.clone(),
                        at: at.clone(),
                        ..Section::default()
                    });
                    i += 1;
                }
                Some(Tok::Eq) => {
                    let value = match toks.get(i + 2) {
                        Some((Tok::Value(v), _)) => {
                            i += 1;
                            v.clone()
                        }
                        _ => String::new(),
                    };
                    parent(root, stack).kvs.push(Kv {
                        key: w.clone(),
                        value,
                        at: at.clone(),
                    });
                    i += 1;
                }
                _ => errs.push(format!("{at}: `{w}` must be followed by `=` or `{{`")),
            },
            Tok::Open => errs.push(format!("{at}: `{{` without a section name")),
            Tok::Eq => errs.push(format!("{at}: `=` without a key")),
            Tok::Value(v) => errs.push(format!("{at}: unexpected `{v}`")),
        }
        i += 1;
    }
    // A file that leaves sections open closes them (an error, reported by read_tree).
    if depth > 0 {
        while let Some(s) = stack.pop() {
            errs.push(format!(
                "{}: section `{}` is never closed in its file",
                s.at, s.name
            ));
        }
    }
}

fn glob_simple(p: &Path) -> Vec<PathBuf> {
    let s = p.display().to_string();
    if !s.contains('*') {
        return if p.exists() { vec![p.into()] } else { vec![] };
    }
    let (dir, pat) = (
        p.parent().unwrap_or(Path::new(".")),
        p.file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default(),
    );
    let (pre, post) = pat.split_once('*').unwrap_or((&pat, ""));
    std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|e| {
                    let n = e
                        .file_name()
                        .map(|f| f.to_string_lossy().to_string())
                        .unwrap_or_default();
                    n.starts_with(pre) && n.ends_with(post) && n.len() >= pre.len() + post.len()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn parent<'a>(root: &'a mut Section, stack: &'a mut [Section]) -> &'a mut Section {
    match stack.last_mut() {
        Some(s) => s,
        None => root,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Open,
    Close,
    Eq,
    Value(String),
}

/// Tokens with "FILE:LINE". After `=`, the value runs to the end of the
/// line, a `#` or a `}` (quoted strings may hold anything, `\"` escapes).
fn lex(text: &str, name: &str) -> Result<Vec<(Tok, String)>, String> {
    let mut out = Vec::new();
    let mut line = 1usize;
    let b: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let at = format!("{name}:{line}");
        match c {
            '\n' => {
                line += 1;
                i += 1;
            }
            ' ' | '\t' | '\r' => i += 1,
            '#' => {
                while i < b.len() && b[i] != '\n' {
                    i += 1;
                }
            }
            '{' => {
                out.push((Tok::Open, at));
                i += 1;
            }
            '}' => {
                out.push((Tok::Close, at));
                i += 1;
            }
            '=' => {
                out.push((Tok::Eq, at.clone()));
                i += 1;
                // The value.
                while i < b.len() && (b[i] == ' ' || b[i] == '\t') {
                    i += 1;
                }
                let mut v = String::new();
                if i < b.len() && b[i] == '"' {
                    i += 1;
                    let start_line = line;
                    loop {
                        match b.get(i) {
                            None => return Err(format!("{name}:{start_line}: a quoted value is never closed (expected `\"`)")),
                            Some('"') => {
                                i += 1;
                                break;
                            }
                            Some('\\') if i + 1 < b.len() => {
                                match b[i + 1] {
                                    'n' => v.push('\n'),
                                    't' => v.push('\t'),
                                    o => v.push(o),
                                }
                                i += 2;
                            }
                            Some(&ch) => {
                                if ch == '\n' {
                                    line += 1;
                                }
                                v.push(ch);
                                i += 1;
                            }
                        }
                    }
                } else {
                    while i < b.len() && !matches!(b[i], '\n' | '#' | '}' | '{') {
                        v.push(b[i]);
                        i += 1;
                    }
                    v = v.trim().to_string();
                }
                out.push((Tok::Value(v), at));
            }
            _ => {
                let mut w = String::new();
                while i < b.len()
                    && !matches!(b[i], ' ' | '\t' | '\r' | '\n' | '{' | '}' | '=' | '#')
                {
                    w.push(b[i]);
                    i += 1;
                }
                out.push((Tok::Word(w), at));
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tunnel,
    Transport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAction {
    None,
    Start,
    Trap,
}

/// What becomes of a child when its IKE_SA's peer stops answering (DPD or
/// any retransmission given up; strongSwan's `dpd_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpdAction {
    /// Removed (`none` and `clear`).
    Clear,
    /// Removed; its trap policies stay, so the next packet renegotiates
    /// (only with `start_action = trap`).
    Trap,
    /// Negotiated again at once, and again while the peer does not answer.
    Restart,
}

/// What becomes of a child when the peer deletes it, or its IKE_SA, other
/// than to replace it (strongSwan's `close_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseAction {
    /// Nothing more (`none` and `clear`).
    Clear,
    /// Its trap policies stay (only with `start_action = trap`).
    Trap,
    /// Negotiated again at once.
    Start,
}

/// An identity as written (strongSwan's forms), or `%any`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdConf {
    Any,
    Id(Id),
}

impl std::fmt::Display for IdConf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdConf::Any => f.write_str("%any"),
            IdConf::Id(i) => write!(f, "{i}"),
        }
    }
}

impl IdConf {
    pub fn matches(&self, id: &Id) -> bool {
        match self {
            IdConf::Any => true,
            IdConf::Id(x) if x.ty == idt::DER_ASN1_DN && id.ty == idt::DER_ASN1_DN => {
                match (crate::der::dn_rdns(&x.data), crate::der::dn_rdns(&id.data)) {
                    (Some(w), Some(h)) => crate::der::dn_matches(&w, &h),
                    _ => false,
                }
            }
            IdConf::Id(x) => x == id,
        }
    }
}

/// strongSwan's identity syntax (`identification_create_from_string`):
/// an IP address, `@fqdn`, `@#hex` (KEY_ID), `user@host` (RFC822), `fqdn:`/
/// `email:`/`keyid:` prefixes, `%any`, else an FQDN.
pub fn parse_id(s: &str) -> Result<IdConf, String> {
    if s == "%any" || s.is_empty() {
        return Ok(IdConf::Any);
    }
    let id = |ty, d: &[u8]| {
        Ok(IdConf::Id(Id {
            ty,
            data: d.to_vec(),
        }))
    };
    if let Ok(a) = s.parse::<IpAddr>() {
        return match a {
            IpAddr::V4(a) => id(idt::IPV4_ADDR, &a.octets()),
            IpAddr::V6(a) => id(idt::IPV6_ADDR, &a.octets()),
        };
    }
    if let Some(h) = s.strip_prefix("@#").or_else(|| s.strip_prefix("keyid:#")) {
        let bytes = hex(h).ok_or_else(|| format!("`{s}`: expected hex digits after @#"))?;
        return id(idt::KEY_ID, &bytes);
    }
    if let Some(r) = s.strip_prefix("@@") {
        return id(idt::RFC822_ADDR, r.as_bytes());
    }
    if let Some(r) = s.strip_prefix('@').or_else(|| s.strip_prefix("fqdn:")) {
        return id(idt::FQDN, r.as_bytes());
    }
    if let Some(r) = s.strip_prefix("email:") {
        return id(idt::RFC822_ADDR, r.as_bytes());
    }
    // RFC 7296 §3.5 ID_DER_ASN1_DN, written as strongSwan does.
    if s.contains('=') {
        let rdns = crate::der::parse_dn(s.strip_prefix("asn1dn:").unwrap_or(s))
            .map_err(|e| format!("`{s}`: {e}"))?;
        return id(idt::DER_ASN1_DN, &crate::der::encode_dn(&rdns));
    }
    if s.contains('*') {
        return Err(format!(
            "`{s}`: wildcard identities are not supported (use %any)"
        ));
    }
    if s.contains('@') {
        return id(idt::RFC822_ADDR, s.as_bytes());
    }
    id(idt::FQDN, s.as_bytes())
}

pub fn hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_start_matches("0x");
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub(crate) fn base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let s: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let s = s
        .strip_suffix(b"==")
        .or_else(|| s.strip_suffix(b"="))
        .unwrap_or(&s);
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for &c in s {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// A byte or packet count: digits, optionally with K, M or G (powers of 1024).
fn volume(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| "expected a number, optionally with K, M or G".to_string())
}

/// strongSwan's durations: `3600`, `60s`, `60m`, `1h`, `1d`.
pub fn duration(s: &str) -> Result<Duration, String> {
    let (n, mul) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    n.trim()
        .parse::<u64>()
        .map(|n| Duration::from_secs(n * mul))
        .map_err(|_| format!("`{s}`: expected a duration (3600, 60s, 60m, 1h, 1d)"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrSpec {
    Any,
    Addr(IpAddr),
    /// remote_addrs only: a peer from this prefix (a responder's range).
    Prefix(IpAddr, u32),
}

impl AddrSpec {
    pub fn matches(&self, a: IpAddr) -> bool {
        match *self {
            AddrSpec::Any => true,
            AddrSpec::Addr(x) => x == a,
            AddrSpec::Prefix(p, l) => match (p, a) {
                (IpAddr::V4(p), IpAddr::V4(a)) => {
                    l == 0 || (u32::from(p) ^ u32::from(a)) >> (32 - l) == 0
                }
                (IpAddr::V6(p), IpAddr::V6(a)) => {
                    l == 0 || (u128::from(p) ^ u128::from(a)) >> (128 - l) == 0
                }
                _ => false,
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Child {
    pub name: String,
    pub mode: Mode,
    pub local_ts: Vec<TsConf>,
    pub remote_ts: Vec<TsConf>,
    pub esp: Vec<AlgSet>,
    pub start_action: StartAction,
    pub rekey_time: Duration,
    pub life_time: Duration,
    /// How much earlier than `rekey_time` a rekey may start, spread per SA
    /// (strongSwan's `rand_time`; default 10 % of `rekey_time`; at most
    /// the margin to `life_time`; `0` rekeys exactly at `rekey_time`).
    pub rand_time: Option<Duration>,
    pub dpd_action: DpdAction,
    pub close_action: CloseAction,
    /// Volume lifetimes (strongSwan's `rekey_bytes`, `life_bytes`,
    /// `rekey_packets`, `life_packets`; 0 none): espd's soft expiry starts
    /// a rekey, its hard expiry ends the SA.
    pub rekey_bytes: u64,
    pub life_bytes: u64,
    pub rekey_packets: u64,
    pub life_packets: u64,
    pub replay_window: u32,
    pub reqid: u32,
    pub at: String,
}

#[derive(Debug, Clone)]
pub struct Conn {
    pub name: String,
    pub local_addrs: Vec<AddrSpec>,
    pub remote_addrs: Vec<AddrSpec>,
    pub local_port: u16,
    pub remote_port: u16,
    pub proposals: Vec<AlgSet>,
    pub encap: bool,
    /// RFC 7383: announce and accept IKE fragments (strongSwan's default).
    pub fragmentation: bool,
    /// `unique = never`: no INITIAL_CONTACT sent as initiator, none acted on
    /// as responder (strongSwan's meaning; many clients sharing one identity).
    pub unique_never: bool,
    pub dpd_delay: Option<Duration>,
    /// IKE_SA rekey interval (RFC 7296 §2.18; strongSwan's connection-level
    /// `rekey_time`, 4 h by default; `0` never).
    pub ike_rekey_time: Option<Duration>,
    /// How long past `rekey_time` an IKE SA whose rekey has not succeeded
    /// lives before it is deleted (strongSwan's `over_time`, by default
    /// 10 % of `rekey_time`).
    pub ike_over_time: Option<Duration>,
    /// The IKE SA rekey's jitter span (strongSwan's `rand_time`; by
    /// default 10 % of `rekey_time`).
    pub ike_rand_time: Option<Duration>,
    pub local_id: IdConf,
    pub remote_id: IdConf,
    /// `local { auth = pubkey certs = … }`: our certificate (DER) and the
    /// key whose public half it carries (from `secrets`).
    pub local_cert: Option<(Vec<u8>, Arc<crate::cert::Signer>)>,
    /// `remote { auth = pubkey }`: the CAs (`cacerts`, else every file in
    /// x509ca/) and CRLs (x509crl/) the peer's certificate is checked against.
    pub remote_trust: Option<crate::cert::Trust>,
    /// `local { auth = rsa/pss-shaN }`: sign RSASSA-PSS with SHA-N.
    pub local_rsa_pss: Option<u16>,
    /// `remote { auth = rsa/pss… }`: the peer must sign RSASSA-PSS.
    pub remote_rsa_pss: bool,
    pub children: Vec<Child>,
    /// `pools = NAME, …`: as a responder, the pools a peer's CFG_REQUEST
    /// is answered from (RFC 7296 §2.19, §3.15).
    pub pools: Vec<String>,
    /// `vips = 0.0.0.0, ::`: as an initiator, the virtual addresses to ask
    /// for in a CFG_REQUEST (an unspecified one asks for any of its family).
    pub vips: Vec<IpAddr>,
    /// Where each of `pools` was named (checked once the file is read).
    pub pools_at: Vec<(String, String)>,
    pub at: String,
}

/// `pools { NAME { addrs = … dns = … } }`: virtual addresses a responder
/// hands out (strongSwan's swanctl pools; RFC 7296 §3.15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// The first and last address handed out, inclusive.
    pub first: IpAddr,
    pub last: IpAddr,
    /// INTERNAL_IP4_DNS / INTERNAL_IP6_DNS sent with an address.
    pub dns: Vec<IpAddr>,
    pub at: String,
}

impl Pool {
    pub fn contains(&self, a: IpAddr) -> bool {
        a.is_ipv4() == self.first.is_ipv4()
            && ts::u128_of(self.first) <= ts::u128_of(a)
            && ts::u128_of(a) <= ts::u128_of(self.last)
    }
}

/// A pool's `addrs`: `PREFIX/LEN` (without its network address and, for
/// IPv4 up to /30, its broadcast address), `FIRST-LAST`, or one address.
fn pool_addrs(v: &str) -> Result<(IpAddr, IpAddr), String> {
    let bad = || format!("`{v}`: expected PREFIX/LEN, FIRST-LAST or an address");
    if let Some((a, l)) = v.split_once('/') {
        let a: IpAddr = a.trim().parse().map_err(|_| bad())?;
        let bits = if a.is_ipv4() { 32 } else { 128 };
        let l: u32 = l
            .trim()
            .parse()
            .ok()
            .filter(|&l| l <= bits)
            .ok_or_else(bad)?;
        let host = if l == bits {
            0
        } else {
            u128::MAX >> (128 - (bits - l))
        };
        let net = ts::u128_of(a) & !host;
        if ts::u128_of(a) != net {
            return Err(format!(
                "`{v}`: host bits set (the prefix is {}/{l})",
                ts::addr_of(a.is_ipv4(), net)
            ));
        }
        let (first, last) = match (a.is_ipv4(), bits - l) {
            (_, 0) => (net, net),
            (true, 1) => (net, net + 1),
            (true, _) => (net + 1, net + host - 1),
            (false, _) => (net + 1, net + host),
        };
        return Ok((
            ts::addr_of(a.is_ipv4(), first),
            ts::addr_of(a.is_ipv4(), last),
        ));
    }
    if let Some((f, l)) = v.split_once('-') {
        let (f, l): (IpAddr, IpAddr) = (
            f.trim().parse().map_err(|_| bad())?,
            l.trim().parse().map_err(|_| bad())?,
        );
        if f.is_ipv4() != l.is_ipv4() || ts::u128_of(f) > ts::u128_of(l) {
            return Err(format!(
                "`{v}`: the range must run upwards within one family"
            ));
        }
        return Ok((f, l));
    }
    let a: IpAddr = v.trim().parse().map_err(|_| bad())?;
    Ok((a, a))
}

fn pool(s: &Section) -> Result<Pool, Vec<String>> {
    let mut errs = Vec::new();
    let mut range = None;
    let mut dns = Vec::new();
    for kv in &s.kvs {
        match kv.key.as_str() {
            "addrs" => match pool_addrs(&kv.value) {
                Ok(r) => range = Some(r),
                Err(e) => errs.push(format!("{}: addrs: {e}", kv.at)),
            },
            "dns" => {
                for w in list(&kv.value) {
                    match w.parse::<IpAddr>() {
                        Ok(a) => dns.push(a),
                        Err(_) => errs.push(format!("{}: dns = {w}: expected IP addresses", kv.at)),
                    }
                }
            }
            other => errs.push(format!(
                "{}: `{other}` is not supported in a pool (expected addrs, dns)",
                kv.at
            )),
        }
    }
    for sub in &s.subs {
        errs.push(format!(
            "{}: unknown section `{}` in a pool",
            sub.at, sub.name
        ));
    }
    let Some((first, last)) = range else {
        errs.push(format!("{}: pool `{}` has no `addrs`", s.at, s.name));
        return Err(errs);
    };
    if errs.is_empty() {
        Ok(Pool {
            name: s.name.clone(),
            first,
            last,
            dns,
            at: s.at.clone(),
        })
    } else {
        Err(errs)
    }
}

pub struct Psk {
    pub ids: Vec<IdConf>,
    pub secret: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Psk {{ ids: {:?}, secret: <redacted> }}", self.ids)
    }
}

#[derive(Debug, Default)]
pub struct Config {
    pub connections: Vec<Conn>,
    pub pools: Vec<Pool>,
    pub secrets: Vec<Psk>,
    pub warnings: Vec<String>,
    /// Child name → (connection, child) indexes, the first of each name
    /// (built by [`load`]; a load generator's file has thousands).
    children_by_name: std::collections::HashMap<String, (usize, usize)>,
    /// Connection name → index (built by [`load`]): the engine looks up an
    /// IKE SA's connection on every message and timer, and a load
    /// generator's or a carrier's file has tens of thousands.
    conns_by_name: std::collections::HashMap<String, usize>,
}

impl Config {
    /// The PSK for these two identities (as strongSwan: a secret naming
    /// both beats one naming one, which beats one naming none).
    pub fn psk(&self, local: &Id, remote: Option<&Id>) -> Option<&[u8]> {
        let mut best: Option<(u8, &Psk)> = None;
        for s in &self.secrets {
            let named = |id: &Id| s.ids.iter().any(|i| matches!(i, IdConf::Id(x) if x == id));
            let score = if s.ids.is_empty() || s.ids.contains(&IdConf::Any) {
                1
            } else {
                match (named(local), remote.is_some_and(named)) {
                    (true, true) => 3,
                    (false, true) | (true, false) => 2,
                    _ => 0,
                }
            };
            if score > 0 && best.is_none_or(|(b, _)| score > b) {
                best = Some((score, s));
            }
        }
        best.map(|(_, s)| &s.secret[..])
    }

    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }

    pub fn conn(&self, name: &str) -> Option<&Conn> {
        if let Some(&i) = self.conns_by_name.get(name) {
            return self.connections.get(i);
        }
        self.connections.iter().find(|c| c.name == name)
    }

    /// The connection and child named `child` (the first with that name).
    pub fn child(&self, child: &str) -> Option<(&Conn, &Child)> {
        if let Some(&(c, h)) = self.children_by_name.get(child) {
            let conn = &self.connections[c];
            return Some((conn, &conn.children[h]));
        }
        self.connections.iter().find_map(|c| {
            c.children
                .iter()
                .find(|ch| ch.name == child)
                .map(|ch| (c, ch))
        })
    }
}

fn yes_no(kv: &Kv) -> Result<bool, String> {
    match kv.value.as_str() {
        "yes" | "true" | "enabled" | "1" => Ok(true),
        "no" | "false" | "disabled" | "0" => Ok(false),
        v => Err(format!("{}: {} = {v}: expected yes or no", kv.at, kv.key)),
    }
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Reads and checks a swanctl.conf. All errors are returned, each with FILE:LINE.
pub fn load(path: &Path) -> Result<Config, Vec<String>> {
    let root = read_tree(path)?;
    let mut errs = Vec::new();
    let mut cfg = Config::default();
    for kv in &root.kvs {
        errs.push(format!(
            "{}: `{}` outside a section (expected connections {{ … }} or secrets {{ … }})",
            kv.at, kv.key
        ));
    }
    let mut reqid = 1;
    let mut pend: Vec<Vec<(bool, AuthConf)>> = Vec::new();
    let mut conn_names = std::collections::HashSet::new();
    let mut keys: Vec<Arc<crate::cert::Signer>> = Vec::new();
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    for s in &root.subs {
        match s.name.as_str() {
            "connections" => {
                for kv in &s.kvs {
                    errs.push(format!(
                        "{}: `{}` directly in connections (expected a connection section)",
                        kv.at, kv.key
                    ));
                }
                for c in &s.subs {
                    let mut pending = Vec::new();
                    match connection(c, &mut reqid, &mut cfg.warnings, &mut pending) {
                        Ok(c) => {
                            pend.push(pending);
                            if !conn_names.insert(c.name.clone()) {
                                errs.push(format!(
                                    "{}: connection `{}` defined twice",
                                    c.at, c.name
                                ));
                            }
                            cfg.connections.push(c)
                        }
                        Err(mut e) => errs.append(&mut e),
                    }
                }
            }
            "secrets" => {
                for kv in &s.kvs {
                    errs.push(format!(
                        "{}: `{}` directly in secrets (expected ike-NAME {{ id = … secret = … }})",
                        kv.at, kv.key
                    ));
                }
                for sec in &s.subs {
                    if ["ecdsa", "rsa", "private", "pkcs8", "ed25519"]
                        .iter()
                        .any(|p| sec.name.starts_with(p))
                    {
                        if let Err(e) = key_secret(sec, &base) {
                            errs.push(e);
                        }
                        continue;
                    }
                    match secret(sec) {
                        Ok(Some(p)) => cfg.secrets.push(p),
                        Ok(None) => {}
                        Err(e) => errs.push(e),
                    }
                }
            }
            "pools" => {
                for kv in &s.kvs {
                    errs.push(format!(
                        "{}: `{}` directly in pools (expected NAME {{ addrs = … }})",
                        kv.at, kv.key
                    ));
                }
                for p in &s.subs {
                    match pool(p) {
                        Ok(p) => {
                            if let Some(o) = cfg.pools.iter().find(|o| o.name == p.name) {
                                errs.push(format!(
                                    "{}: pool `{}` defined twice (first at {})",
                                    p.at, p.name, o.at
                                ));
                            } else if let Some(o) = cfg.pools.iter().find(|o| {
                                o.contains(p.first) || o.contains(p.last) || p.contains(o.first)
                            }) {
                                errs.push(format!(
                                    "{}: pool `{}` overlaps pool `{}` ({}): an address would be handed out twice",
                                    p.at, p.name, o.name, o.at
                                ));
                            } else {
                                cfg.pools.push(p);
                            }
                        }
                        Err(mut e) => errs.append(&mut e),
                    }
                }
            }
            "authorities" => errs.push(format!(
                "{}: `{}` is not supported yet (docs/ike.md, \"Not yet here\")",
                s.at, s.name
            )),
            other => errs.push(format!(
                "{}: unknown section `{other}` (expected connections or secrets)",
                s.at
            )),
        }
    }
    // swanctl loads every private key in these folders beside the file
    // (the `secrets` entries only give passphrases).
    for dir in ["private", "ecdsa", "rsa", "pkcs8"] {
        if let Ok(rd) = std::fs::read_dir(base.join(dir)) {
            let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            files.sort();
            for f in files {
                match crate::cert::Signer::load(&f) {
                    Ok(k) => keys.push(Arc::new(k)),
                    Err(e) => errs.push(e),
                }
            }
        }
    }
    // One entry of `pend` per connection, in the same order.
    for (c, pending) in cfg.connections.iter_mut().zip(pend) {
        for (local, a) in pending {
            if let Err(e) = resolve_auth(c, local, a, &base, &keys) {
                errs.push(e);
            }
        }
    }
    for c in &cfg.connections {
        for (at, p) in &c.pools_at {
            if cfg.pool(p).is_none() {
                errs.push(format!("{at}: pools = {p}: no pool `{p}` in pools {{ … }}"));
            }
        }
    }
    let mut names = std::collections::HashSet::new();
    for c in &cfg.connections {
        for ch in &c.children {
            if !names.insert(ch.name.clone()) {
                errs.push(format!(
                    "{}: child `{}` is defined twice (`espctl ike initiate` names children)",
                    ch.at, ch.name
                ));
            }
        }
    }
    for (ci, c) in cfg.connections.iter().enumerate() {
        cfg.conns_by_name.entry(c.name.clone()).or_insert(ci);
        for (hi, ch) in c.children.iter().enumerate() {
            cfg.children_by_name
                .entry(ch.name.clone())
                .or_insert((ci, hi));
        }
    }
    if errs.is_empty() {
        Ok(cfg)
    } else {
        Err(errs)
    }
}

fn addrs(kv: &Kv, remote: bool) -> Result<Vec<AddrSpec>, String> {
    let mut out = Vec::new();
    for w in list(&kv.value) {
        if w == "%any" || w == "%any4" || w == "%any6" {
            out.push(AddrSpec::Any);
        } else if let Ok(a) = w.parse::<IpAddr>() {
            out.push(AddrSpec::Addr(a));
        } else if let (true, Some((a, l))) = (remote, w.split_once('/')) {
            let a: IpAddr = a
                .parse()
                .map_err(|_| format!("{}: {} = {w}: not an address prefix", kv.at, kv.key))?;
            let max = if a.is_ipv4() { 32 } else { 128 };
            let l: u32 = l.parse().ok().filter(|&l| l <= max).ok_or(format!(
                "{}: {} = {w}: prefix length must be 0-{max}",
                kv.at, kv.key
            ))?;
            out.push(AddrSpec::Prefix(a, l));
        } else {
            return Err(format!(
                "{}: {} = {w}: expected IP addresses{} or %any (host names are not resolved)",
                kv.at,
                kv.key,
                if remote { ", prefixes" } else { "" }
            ));
        }
    }
    Ok(out)
}

/// Certificate settings of one `local`/`remote` section, resolved once the
/// whole file (and its `secrets`) is read.
#[derive(Default)]
struct AuthConf {
    pubkey: bool,
    /// `rsa/pss[-shaN]`: RSASSA-PSS with SHA-N (local: how we sign; remote:
    /// what the peer must sign with).
    pss: Option<u16>,
    at: String,
    /// (where, file) of `certs` (local) or `cacerts` (remote).
    files: Vec<(String, String)>,
}

fn connection(
    s: &Section,
    reqid: &mut u32,
    warnings: &mut Vec<String>,
    pending: &mut Vec<(bool, AuthConf)>,
) -> Result<Conn, Vec<String>> {
    let mut errs = Vec::new();
    let mut c = Conn {
        name: s.name.clone(),
        local_addrs: vec![AddrSpec::Any],
        remote_addrs: vec![AddrSpec::Any],
        local_port: 500,
        remote_port: 500,
        proposals: proposal::defaults(true),
        encap: false,
        fragmentation: true,
        unique_never: false,
        dpd_delay: None,
        ike_rekey_time: Some(Duration::from_secs(4 * 3600)),
        ike_over_time: None,
        ike_rand_time: None,
        local_id: IdConf::Any,
        remote_id: IdConf::Any,
        local_cert: None,
        remote_trust: None,
        local_rsa_pss: None,
        remote_rsa_pss: false,
        children: Vec::new(),
        pools: Vec::new(),
        pools_at: Vec::new(),
        vips: Vec::new(),
        at: s.at.clone(),
    };
    for kv in &s.kvs {
        let r: Result<(), String> = (|| {
            match kv.key.as_str() {
                "version" => {
                    if !matches!(kv.value.as_str(), "2" | "0") {
                        return Err(format!("{}: version = {}: espd-ike speaks IKEv2 only (expected 2)", kv.at, kv.value));
                    }
                }
                "local_addrs" => c.local_addrs = addrs(kv, false)?,
                "remote_addrs" => c.remote_addrs = addrs(kv, true)?,
                "local_port" | "remote_port" => {
                    let p: u16 = kv.value.parse().map_err(|_| format!("{}: {} = {}: expected a port", kv.at, kv.key, kv.value))?;
                    if kv.key == "local_port" {
                        c.local_port = p;
                    } else {
                        c.remote_port = p;
                    }
                }
                "proposals" => c.proposals = proposal::parse_list(&kv.value, true).map_err(|e| format!("{}: proposals: {e}", kv.at))?,
                "encap" => c.encap = yes_no(kv)?,
                "pools" => {
                    for p in list(&kv.value) {
                        c.pools.push(p.clone());
                        c.pools_at.push((kv.at.clone(), p));
                    }
                }
                "vips" => {
                    for w in list(&kv.value) {
                        let a: IpAddr = w.parse().map_err(|_| format!("{}: vips = {w}: expected IP addresses (0.0.0.0 or :: asks for any)", kv.at))?;
                        c.vips.push(a);
                    }
                }
                "mobike" => {
                    if yes_no(kv)? {
                        warnings.push(format!("{}: mobike = yes: espd-ike does not do MOBIKE (RFC 4555); the tunnel runs without it", kv.at));
                    }
                }
                "dpd_delay" => {
                    let d = duration(&kv.value).map_err(|e| format!("{}: dpd_delay: {e}", kv.at))?;
                    c.dpd_delay = (d > Duration::ZERO).then_some(d);
                }
                "rekey_time" => {
                    let d = duration(&kv.value).map_err(|e| format!("{}: rekey_time: {e}", kv.at))?;
                    c.ike_rekey_time = (d > Duration::ZERO).then_some(d);
                }
                "rand_time" => {
                    c.ike_rand_time = Some(duration(&kv.value).map_err(|e| format!("{}: rand_time: {e}", kv.at))?);
                }
                "over_time" => {
                    c.ike_over_time = Some(duration(&kv.value).map_err(|e| format!("{}: over_time: {e}", kv.at))?);
                }
                "reauth_time" => {
                    if duration(&kv.value).map_err(|e| format!("{}: reauth_time: {e}", kv.at))? > Duration::ZERO {
                        return Err(format!("{}: reauth_time = {}: espd-ike does not reauthenticate; it rekeys the IKE_SA (rekey_time, RFC 7296 §2.18) (expected 0)", kv.at, kv.value));
                    }
                }
                "fragmentation" => match kv.value.as_str() {
                    "yes" | "accept" | "force" => {
                        c.fragmentation = true;
                        if kv.value != "accept" {
                            warnings.push(format!("{}: fragmentation = {}: espd-ike reassembles fragmented IKE messages (RFC 7383) but sends its own whole, as `accept`", kv.at, kv.value));
                        }
                    }
                    "no" => c.fragmentation = false,
                    v => return Err(format!("{}: fragmentation = {v}: expected yes, accept, force or no", kv.at)),
                },
                "unique" => {
                    c.unique_never = kv.value == "never";
                    if !matches!(kv.value.as_str(), "no" | "never") {
                        warnings.push(format!("{}: unique = {}: espd-ike keeps every IKE_SA a peer makes (strongSwan's `no`)", kv.at, kv.value));
                    }
                }
                "send_certreq" | "send_cert" => {
                    warnings.push(format!("{}: `{}` has no effect with PSK authentication", kv.at, kv.key));
                }
                other => {
                    return Err(format!(
                        "{}: `{other}` is not supported in a connection (expected version, local_addrs, remote_addrs, local_port, remote_port, proposals, encap, pools, vips, mobike, dpd_delay, rekey_time, over_time, rand_time, reauth_time, fragmentation, unique, local, remote, children)",
                        kv.at
                    ))
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            errs.push(e);
        }
    }
    for sub in &s.subs {
        match sub.name.as_str() {
            n if n == "local" || n.starts_with("local-") || n == "remote" || n.starts_with("remote-") => {
                let local = n.starts_with("local");
                match auth_section(sub) {
                    Ok((id, a)) => {
                        if local {
                            c.local_id = id;
                            if a.pubkey {
                                pending.push((true, a));
                            }
                        } else {
                            c.remote_id = id;
                            if a.pubkey {
                                pending.push((false, a));
                            }
                        }
                    }
                    Err(mut e) => errs.append(&mut e),
                }
            }
            "children" => {
                for kv in &sub.kvs {
                    errs.push(format!("{}: `{}` directly in children (expected a child section)", kv.at, kv.key));
                }
                for ch in &sub.subs {
                    match child(ch, reqid) {
                        Ok(ch) => c.children.push(ch),
                        Err(mut e) => errs.append(&mut e),
                    }
                }
            }
            other => errs.push(format!("{}: unknown section `{other}` in a connection (expected local, remote or children)", sub.at)),
        }
    }
    if errs.is_empty() {
        Ok(c)
    } else {
        Err(errs)
    }
}

/// strongSwan's `auth` words: `psk` (None), or a public-key method with
/// optional signature constraints — `pubkey`, `rsa`, `ecdsa`, `ed25519`,
/// `rsa/pss`, each with `-sha256|-sha384|-sha512` and an `ike:` prefix —
/// as Some(RSA-PSS hash bits when `rsa/pss`).
fn pubkey_auth(v: &str) -> Result<Option<Option<u16>>, String> {
    if v == "psk" {
        return Ok(None);
    }
    let expected = "expected psk, pubkey, rsa, ecdsa, ed25519 or rsa/pss, optionally with -sha256, -sha384 or -sha512";
    let v = v.strip_prefix("ike:").unwrap_or(v);
    let mut words = v.split('-');
    let pss = match words.next().unwrap_or("") {
        "pubkey" | "rsa" | "ecdsa" | "ed25519" => false,
        "rsa/pss" => true,
        "eap" | "xauth" => {
            return Err("EAP and XAuth are not supported (expected psk or pubkey)".into())
        }
        w => return Err(format!("`{w}`: {expected}")),
    };
    let mut bits = None;
    for w in words {
        let b = match w {
            "sha256" | "sha2_256" => 256,
            "sha384" | "sha2_384" => 384,
            "sha512" | "sha2_512" => 512,
            "identity" if !pss => continue,
            w => return Err(format!("`{w}`: {expected}")),
        };
        bits.get_or_insert(b);
    }
    Ok(Some(pss.then(|| bits.unwrap_or(256))))
}

fn auth_section(s: &Section) -> Result<(IdConf, AuthConf), Vec<String>> {
    let mut errs = Vec::new();
    let mut id = IdConf::Any;
    let mut auth_seen = false;
    let local = s.name.starts_with("local");
    let mut a = AuthConf {
        at: s.at.clone(),
        ..AuthConf::default()
    };
    for kv in &s.kvs {
        match kv.key.as_str() {
            "auth" => {
                auth_seen = true;
                match pubkey_auth(&kv.value) {
                    Ok(None) => {}
                    Ok(Some(pss)) => {
                        a.pubkey = true;
                        a.pss = pss;
                    }
                    Err(e) => errs.push(format!("{}: auth = {}: {e}", kv.at, kv.value)),
                }
            }
            "id" => match parse_id(&kv.value) {
                Ok(i) => id = i,
                Err(e) => errs.push(format!("{}: id: {e}", kv.at)),
            },
            "certs" if local => a
                .files
                .extend(list(&kv.value).into_iter().map(|f| (kv.at.clone(), f))),
            "cacerts" if !local => a
                .files
                .extend(list(&kv.value).into_iter().map(|f| (kv.at.clone(), f))),
            other => errs.push(format!(
                "{}: `{other}` is not supported in {} (expected auth, id, {})",
                kv.at,
                s.name,
                if local { "certs" } else { "cacerts" }
            )),
        }
    }
    if !auth_seen {
        // strongSwan's default is pubkey.
        a.pubkey = true;
    }
    if a.pubkey && local && a.files.is_empty() {
        errs.push(format!(
            "{}: `{}` authenticates with a certificate: give `certs = FILE` (or `auth = psk`)",
            s.at, s.name
        ));
    }
    for sub in &s.subs {
        errs.push(format!(
            "{}: unknown section `{}` in {}",
            sub.at, sub.name, s.name
        ));
    }
    if errs.is_empty() {
        Ok((id, a))
    } else {
        Err(errs)
    }
}

fn child(s: &Section, reqid: &mut u32) -> Result<Child, Vec<String>> {
    let mut errs = Vec::new();
    let mut c = Child {
        name: s.name.clone(),
        mode: Mode::Tunnel,
        local_ts: vec![TsConf::Dynamic {
            proto: 0,
            ports: (0, 65535),
        }],
        remote_ts: vec![TsConf::Dynamic {
            proto: 0,
            ports: (0, 65535),
        }],
        esp: proposal::defaults(false),
        start_action: StartAction::None,
        rekey_time: Duration::from_secs(3600),
        life_time: Duration::ZERO,
        rand_time: None,
        dpd_action: DpdAction::Clear,
        close_action: CloseAction::Clear,
        rekey_bytes: 0,
        life_bytes: 0,
        rekey_packets: 0,
        life_packets: 0,
        // RFC 4303 §3.4.3: 64 SHOULD be the default (strongSwan uses 32).
        replay_window: 64,
        reqid: 0,
        at: s.at.clone(),
    };
    let mut life_set = false;
    let mut dpd_at = String::new();
    let mut close_at = String::new();
    for kv in &s.kvs {
        let r: Result<(), String> = (|| {
            match kv.key.as_str() {
                "mode" => {
                    c.mode = match kv.value.as_str() {
                        "tunnel" => Mode::Tunnel,
                        "transport" => Mode::Transport,
                        v => return Err(format!("{}: mode = {v}: expected tunnel or transport", kv.at)),
                    }
                }
                "local_ts" | "remote_ts" => {
                    let mut v = Vec::new();
                    for t in list(&kv.value) {
                        v.push(ts::parse(&t).map_err(|e| format!("{}: {}: {e}", kv.at, kv.key))?);
                    }
                    if v.is_empty() {
                        return Err(format!("{}: {} is empty", kv.at, kv.key));
                    }
                    if kv.key == "local_ts" {
                        c.local_ts = v
                    } else {
                        c.remote_ts = v
                    }
                }
                "esp_proposals" => c.esp = proposal::parse_list(&kv.value, false).map_err(|e| format!("{}: esp_proposals: {e}", kv.at))?,
                "start_action" => {
                    c.start_action = match kv.value.as_str() {
                        "none" => StartAction::None,
                        "start" => StartAction::Start,
                        "trap" => StartAction::Trap,
                        "trap|start" | "start|trap" => return Err(format!("{}: start_action = {}: expected none, start or trap", kv.at, kv.value)),
                        v => return Err(format!("{}: start_action = {v}: expected none, start or trap", kv.at)),
                    }
                }
                "rekey_time" => c.rekey_time = duration(&kv.value).map_err(|e| format!("{}: rekey_time: {e}", kv.at))?,
                "life_time" => {
                    c.life_time = duration(&kv.value).map_err(|e| format!("{}: life_time: {e}", kv.at))?;
                    life_set = true;
                }
                "rekey_bytes" => c.rekey_bytes = volume(&kv.value).map_err(|e| format!("{}: rekey_bytes = {}: {e}", kv.at, kv.value))?,
                "life_bytes" => c.life_bytes = volume(&kv.value).map_err(|e| format!("{}: life_bytes = {}: {e}", kv.at, kv.value))?,
                "rekey_packets" => c.rekey_packets = volume(&kv.value).map_err(|e| format!("{}: rekey_packets = {}: {e}", kv.at, kv.value))?,
                "life_packets" => c.life_packets = volume(&kv.value).map_err(|e| format!("{}: life_packets = {}: {e}", kv.at, kv.value))?,
                "replay_window" => {
                    c.replay_window = kv.value.parse().ok().filter(|&w| w <= 65536).ok_or(format!("{}: replay_window = {}: expected 0-65536", kv.at, kv.value))?
                }
                "reqid" => {
                    c.reqid = kv.value.parse().ok().filter(|&r| r > 0 && r < DYNAMIC_REQIDS).ok_or(format!("{}: reqid = {}: expected 1-{} (higher reqids are espd-ike's own)", kv.at, kv.value, DYNAMIC_REQIDS - 1))?
                }
                "dpd_action" => {
                    c.dpd_action = match kv.value.as_str() {
                        "none" | "clear" => DpdAction::Clear,
                        "trap" => DpdAction::Trap,
                        "restart" => DpdAction::Restart,
                        other => return Err(format!("{}: dpd_action = {other}: expected none, clear, trap or restart", kv.at)),
                    };
                    dpd_at = kv.at.clone();
                }
                "close_action" => {
                    c.close_action = match kv.value.as_str() {
                        "none" | "clear" => CloseAction::Clear,
                        "trap" => CloseAction::Trap,
                        "start" => CloseAction::Start,
                        other => return Err(format!("{}: close_action = {other}: expected none, clear, trap or start", kv.at)),
                    };
                    close_at = kv.at.clone();
                }
                "rand_time" => {
                    c.rand_time = Some(duration(&kv.value).map_err(|e| format!("{}: rand_time: {e}", kv.at))?);
                }
                other => {
                    return Err(format!(
                        "{}: `{other}` is not supported in a child (expected mode, local_ts, remote_ts, esp_proposals, start_action, rekey_time, life_time, rand_time, replay_window, reqid, dpd_action, close_action)",
                        kv.at
                    ))
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            errs.push(e);
        }
    }
    if c.close_action == CloseAction::Trap && c.start_action != StartAction::Trap {
        errs.push(format!(
            "{close_at}: close_action = trap: espd-ike keeps trap policies only for a child with start_action = trap (expected clear or start, or start_action = trap)"
        ));
    }
    if c.dpd_action == DpdAction::Trap && c.start_action != StartAction::Trap {
        errs.push(format!(
            "{dpd_at}: dpd_action = trap: espd-ike keeps trap policies only for a child with start_action = trap (expected clear or restart, or start_action = trap)"
        ));
    }
    // strongSwan: a volume lifetime defaults to 110 % of its rekey volume.
    if c.life_bytes == 0 {
        c.life_bytes = c.rekey_bytes.saturating_add(c.rekey_bytes / 10);
    }
    if c.life_packets == 0 {
        c.life_packets = c.rekey_packets.saturating_add(c.rekey_packets / 10);
    }
    for (what, r, l) in [
        ("bytes", c.rekey_bytes, c.life_bytes),
        ("packets", c.rekey_packets, c.life_packets),
    ] {
        if r > 0 && l <= r {
            errs.push(format!(
                "{}: life_{what} ({l}) must be above rekey_{what} ({r})",
                s.at
            ));
        }
    }
    if !life_set {
        // strongSwan: life_time defaults to 110 % of rekey_time.
        c.life_time = c.rekey_time + c.rekey_time / 10;
    }
    if c.reqid == 0 {
        c.reqid = *reqid;
        *reqid += 1;
    }
    for sub in &s.subs {
        errs.push(format!(
            "{}: unknown section `{}` in a child",
            sub.at, sub.name
        ));
    }
    if errs.is_empty() {
        Ok(c)
    } else {
        Err(errs)
    }
}

/// swanctl's layout: a relative file name is looked up in DIR beside the
/// configuration file (x509/, x509ca/, x509crl/, ecdsa/, rsa/, private/).
fn swanctl_path(base: &Path, dir: &str, f: &str) -> PathBuf {
    let p = Path::new(f);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(dir).join(p)
    }
}

/// `ecdsa-*|rsa-*|private-* { file = F secret = … }`: in swanctl the
/// passphrase of an encrypted key in that folder. espd-ike reads only
/// unencrypted keys (0600 files): the entry may name the file, which must be
/// there; a passphrase is refused.
fn key_secret(s: &Section, base: &Path) -> Result<(), String> {
    let dir = if s.name.starts_with("ecdsa") {
        "ecdsa"
    } else if s.name.starts_with("rsa") {
        "rsa"
    } else {
        "private"
    };
    for kv in &s.kvs {
        match kv.key.as_str() {
            "file" => {
                let p = swanctl_path(base, dir, &kv.value);
                if !p.exists() {
                    return Err(format!("{}: file: {} does not exist", kv.at, p.display()));
                }
            }
            "secret" => {
                return Err(format!(
                    "{}: encrypted private keys are not supported (keep the key unencrypted, mode 0600, in {dir}/)",
                    kv.at
                ))
            }
            other => {
                return Err(format!(
                    "{}: `{other}` is not supported in a private key secret (expected file)",
                    kv.at
                ))
            }
        }
    }
    Ok(())
}

/// Loads a connection's certificate and key, or its trusted CAs and CRLs.
fn resolve_auth(
    c: &mut Conn,
    local: bool,
    a: AuthConf,
    base: &Path,
    keys: &[Arc<crate::cert::Signer>],
) -> Result<(), String> {
    if local {
        let (at, f) = &a.files[0];
        let cert = crate::cert::read_pem(&swanctl_path(base, "x509", f), "CERTIFICATE")
            .map_err(|e| format!("{at}: certs: {e}"))?
            .remove(0);
        // The key is the one whose public half the certificate carries.
        let key = keys
            .iter()
            .find(|k| {
                let p = k.public();
                !p.is_empty() && cert.windows(p.len()).any(|w| w == &p[..])
            })
            .ok_or(format!(
                "{at}: certs: no private key in secrets (ecdsa-*, rsa-*, private-* {{ file = … }}) matches {f}"
            ))?;
        // The ID is the certificate's: with none configured strongSwan sends
        // the subject DN; a configured DN must be the subject, and is sent
        // as the certificate spells it (RFC 4945 §3.1.5).
        let subject = crate::cert::subject_der(&cert)
            .ok_or_else(|| format!("{at}: certs: {f} does not parse as an X.509 certificate"))?;
        match &c.local_id {
            IdConf::Any => {
                c.local_id = IdConf::Id(Id {
                    ty: idt::DER_ASN1_DN,
                    data: subject,
                })
            }
            IdConf::Id(id) if id.ty == idt::DER_ASN1_DN => {
                let want = crate::der::dn_rdns(&id.data).unwrap_or_default();
                let have = crate::der::dn_rdns(&subject).unwrap_or_default();
                if !crate::der::dn_matches(&want, &have) || want.iter().any(|(_, v)| v == "*") {
                    return Err(format!(
                        "{at}: id \"{id}\" is not the subject of {f} (\"{}\")",
                        crate::der::dn_text(&have)
                    ));
                }
                c.local_id = IdConf::Id(Id {
                    ty: idt::DER_ASN1_DN,
                    data: subject,
                });
            }
            IdConf::Id(_) => {}
        }
        c.local_cert = Some((cert, key.clone()));
        c.local_rsa_pss = a.pss;
    } else {
        let mut t = crate::cert::Trust::default();
        if a.files.is_empty() {
            // strongSwan trusts every CA loaded from x509ca/.
            if let Ok(rd) = std::fs::read_dir(base.join("x509ca")) {
                for e in rd.flatten() {
                    t.cas.extend(
                        crate::cert::read_pem(&e.path(), "CERTIFICATE")
                            .map_err(|e| format!("{}: {e}", a.at))?,
                    );
                }
            }
        }
        for (at, f) in &a.files {
            t.cas.extend(
                crate::cert::read_pem(&swanctl_path(base, "x509ca", f), "CERTIFICATE")
                    .map_err(|e| format!("{at}: cacerts: {e}"))?,
            );
        }
        if t.cas.is_empty() {
            return Err(format!(
                "{}: `remote` authenticates by certificate but no CA is configured (cacerts = FILE, or files in x509ca/)",
                a.at
            ));
        }
        if let Ok(rd) = std::fs::read_dir(base.join("x509crl")) {
            for e in rd.flatten() {
                t.crls.extend(
                    crate::cert::read_pem(&e.path(), "X509 CRL")
                        .map_err(|e| format!("{}: {e}", a.at))?,
                );
            }
        }
        c.remote_trust = Some(t);
        c.remote_rsa_pss = a.pss.is_some();
    }
    Ok(())
}

fn secret(s: &Section) -> Result<Option<Psk>, String> {
    if !s.name.starts_with("ike") {
        return Err(format!(
            "{}: secret `{}`: only ike-* (pre-shared keys) are supported so far (eap-, xauth-, private-, rsa-, ecdsa- come with certificates and EAP)",
            s.at, s.name
        ));
    }
    let mut ids = Vec::new();
    let mut secret = None;
    for kv in &s.kvs {
        if kv.key == "id" || kv.key.starts_with("id-") {
            ids.push(parse_id(&kv.value).map_err(|e| format!("{}: {e}", kv.at))?);
        } else if kv.key == "secret" {
            let v = &kv.value;
            let bytes = if let Some(h) = v.strip_prefix("0x") {
                hex(h).ok_or(format!("{}: secret: bad hex after 0x", kv.at))?
            } else if let Some(b) = v.strip_prefix("0s") {
                base64(b).ok_or(format!("{}: secret: bad base64 after 0s", kv.at))?
            } else {
                v.as_bytes().to_vec()
            };
            if bytes.is_empty() {
                return Err(format!("{}: secret is empty", kv.at));
            }
            secret = Some(Zeroizing::new(bytes));
        } else {
            return Err(format!(
                "{}: `{}` is not supported in a secret (expected id, id-*, secret)",
                kv.at, kv.key
            ));
        }
    }
    let secret = secret.ok_or(format!("{}: secret `{}` has no `secret =`", s.at, s.name))?;
    Ok(Some(Psk { ids, secret }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("espd-ike-conf-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("swanctl.conf");
        std::fs::write(&p, text).unwrap();
        p
    }

    const NET2NET: &str = r#"
# the strongswan-peer.sh file
connections {
  site {
    version = 2
    local_addrs = 198.18.0.1
    remote_addrs = 198.18.0.2
    proposals = aes128-sha256-x25519
    encap = yes
    mobike = no
    local { auth = psk
            id = gw1 }
    remote { auth = psk
             id = gw2 }
    children {
      net {
        local_ts = 198.18.1.0/24, 2001:db8:1::/64
        remote_ts = 198.18.2.0/24
        esp_proposals = aes128gcm16
        start_action = trap
        rekey_time = 1h
      }
    }
  }
}
secrets {
  ike-1 {
    id-1 = gw1
    id-2 = gw2
    secret = "a secret # not a comment"
  }
}
"#;

    #[test]
    fn net2net_file() {
        let c = load(&write("ok", NET2NET)).unwrap();
        let s = &c.connections[0];
        assert_eq!(s.name, "site");
        assert!(s.encap);
        assert_eq!(
            s.remote_addrs,
            vec![AddrSpec::Addr("198.18.0.2".parse().unwrap())]
        );
        assert_eq!(s.children[0].local_ts.len(), 2);
        assert_eq!(s.children[0].start_action, StartAction::Trap);
        assert_eq!(s.children[0].life_time, Duration::from_secs(3960));
        let (IdConf::Id(l), IdConf::Id(r)) = (&s.local_id, &s.remote_id) else {
            panic!()
        };
        assert_eq!(c.psk(l, Some(r)), Some(&b"a secret # not a comment"[..]));
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn every_error_names_file_and_line() {
        let bad = NET2NET
            .replace("encap = yes", "encap = maybe\n    aggressive = yes")
            .replace("aes128gcm16", "aes128gcm16-bogus");
        let e = load(&write("bad", &bad)).unwrap_err();
        assert_eq!(e.len(), 3, "{e:#?}");
        assert!(
            e[0].contains("swanctl.conf:9: encap = maybe: expected yes or no"),
            "{}",
            e[0]
        );
        assert!(
            e[1].contains(":10: `aggressive` is not supported"),
            "{}",
            e[1]
        );
        assert!(
            e[2].contains(":20: esp_proposals: unknown algorithm `bogus`"),
            "{}",
            e[2]
        );
        let e = load(&write("open", "connections {\n a {\n")).unwrap_err();
        assert!(
            e.iter()
                .any(|x| x.contains(":2: section `a` is never closed")),
            "{e:?}"
        );
        let e = load(&write(
            "pubkey",
            &NET2NET.replace("auth = psk\n            id = gw1", "auth = pubkey"),
        ))
        .unwrap_err();
        assert!(
            e[0].contains(":11: `local` authenticates with a certificate: give `certs = FILE`"),
            "{e:?}"
        );
    }

    #[test]
    fn dpd_action_words() {
        let with = |w: &str| {
            NET2NET.replace(
                "esp_proposals = aes128gcm16",
                &format!("esp_proposals = aes128gcm16\n        dpd_action = {w}"),
            )
        };
        let c = load(&write("restart", &with("restart"))).unwrap();
        assert_eq!(c.connections[0].children[0].dpd_action, DpdAction::Restart);
        let c = load(&write("trap", &with("trap"))).unwrap();
        assert_eq!(c.connections[0].children[0].dpd_action, DpdAction::Trap);
        let start = with("trap").replace("start_action = trap", "start_action = start");
        let e = load(&write("trap-start", &start)).unwrap_err();
        assert!(
            e[0].contains(":20: dpd_action = trap: espd-ike keeps trap policies only for a child with start_action = trap"),
            "{e:?}"
        );
        let e = load(&write("hold", &with("hold"))).unwrap_err();
        assert!(
            e[0].contains(":20: dpd_action = hold: expected none, clear, trap or restart"),
            "{e:?}"
        );
    }

    #[test]
    fn close_action_words() {
        let with = |w: &str| {
            NET2NET.replace(
                "esp_proposals = aes128gcm16",
                &format!("esp_proposals = aes128gcm16\n        close_action = {w}"),
            )
        };
        let c = load(&write("close-start", &with("start"))).unwrap();
        assert_eq!(
            c.connections[0].children[0].close_action,
            CloseAction::Start
        );
        let c = load(&write("close-trap", &with("trap"))).unwrap();
        assert_eq!(c.connections[0].children[0].close_action, CloseAction::Trap);
        let start = with("trap").replace("start_action = trap", "start_action = start");
        let e = load(&write("close-trap-start", &start)).unwrap_err();
        assert!(
            e[0].contains(":20: close_action = trap: espd-ike keeps trap policies only"),
            "{e:?}"
        );
        let e = load(&write("close-hold", &with("hold"))).unwrap_err();
        assert!(
            e[0].contains(":20: close_action = hold: expected none, clear, trap or start"),
            "{e:?}"
        );
    }

    #[test]
    fn pools_and_their_errors() {
        let text = |pools: &str, named: &str| {
            format!(
                "pools {{\n{pools}\n}}\n{}",
                NET2NET.replace(
                    "    version = 2",
                    &format!("    version = 2\n    pools = {named}")
                )
            )
        };
        let ok = "  v4 { addrs = 198.18.100.0/24\n    dns = 198.18.1.53, 2001:db8::53 }\n  v6 { addrs = 2001:db8:100::/64 }\n  one { addrs = 198.18.101.7 }\n  r { addrs = 198.18.102.10-198.18.102.20 }";
        let c = load(&write("pools", &text(ok, "v4, v6"))).unwrap();
        let p = c.pool("v4").unwrap();
        // Without the network and broadcast addresses.
        assert_eq!(
            (p.first.to_string(), p.last.to_string()),
            ("198.18.100.1".into(), "198.18.100.254".into())
        );
        assert_eq!(p.dns.len(), 2);
        let p = c.pool("v6").unwrap();
        assert_eq!(
            (p.first.to_string(), p.last.to_string()),
            (
                "2001:db8:100::1".into(),
                "2001:db8:100:0:ffff:ffff:ffff:ffff".into()
            )
        );
        assert_eq!(c.pool("one").unwrap().first, c.pool("one").unwrap().last);
        assert_eq!(c.pool("r").unwrap().last.to_string(), "198.18.102.20");
        assert_eq!(c.connections[0].pools, ["v4", "v6"]);
        for (pools, named, want) in [
            (
                ok,
                "v4, nope",
                ":13: pools = nope: no pool `nope` in pools { … }",
            ),
            (
                "  a { addrs = 198.18.100.1/24 }",
                "a",
                ":2: addrs: `198.18.100.1/24`: host bits set (the prefix is 198.18.100.0/24)",
            ),
            (
                "  a { addrs = 198.18.100.9-198.18.100.1 }",
                "a",
                ":2: addrs: `198.18.100.9-198.18.100.1`: the range must run upwards",
            ),
            (
                "  a { addrs = 198.18.100.0/24 }\n  b { addrs = 198.18.100.128/25 }",
                "a",
                ":3: pool `b` overlaps pool `a`",
            ),
            (
                "  a { dns = 198.18.1.53 }",
                "a",
                ":2: pool `a` has no `addrs`",
            ),
            (
                "  a { addrs = 198.18.100.0/24\n    split_include = 198.18.0.0/16 }",
                "a",
                ":3: `split_include` is not supported in a pool (expected addrs, dns)",
            ),
            (
                "  a { addrs = 198.18.100.0/24\n    dns = ns1 }",
                "a",
                ":3: dns = ns1: expected IP addresses",
            ),
        ] {
            let e = load(&write("bad-pool", &text(pools, named))).unwrap_err();
            assert!(e.iter().any(|e| e.contains(want)), "{want}: {e:?}");
        }
        let e = load(&write(
            "vips",
            &NET2NET.replace("    version = 2", "    version = 2\n    vips = any"),
        ))
        .unwrap_err();
        assert!(
            e[0].contains(":6: vips = any: expected IP addresses (0.0.0.0 or :: asks for any)"),
            "{e:?}"
        );
        let e = load(&write(
            "reqid",
            &NET2NET.replace(
                "esp_proposals = aes128gcm16",
                "esp_proposals = aes128gcm16\n        reqid = 1073741824",
            ),
        ))
        .unwrap_err();
        assert!(
            e[0].contains("reqid = 1073741824: expected 1-1073741823"),
            "{e:?}"
        );
    }

    #[test]
    fn ids_and_secrets() {
        assert_eq!(
            parse_id("@gw1.example").unwrap(),
            IdConf::Id(Id {
                ty: idt::FQDN,
                data: b"gw1.example".to_vec()
            })
        );
        assert_eq!(
            parse_id("198.18.0.1").unwrap(),
            IdConf::Id(Id {
                ty: idt::IPV4_ADDR,
                data: vec![198, 18, 0, 1]
            })
        );
        assert_eq!(
            parse_id("me@site").unwrap(),
            IdConf::Id(Id {
                ty: idt::RFC822_ADDR,
                data: b"me@site".to_vec()
            })
        );
        assert_eq!(parse_id("%any").unwrap(), IdConf::Any);
        let IdConf::Id(dn) = parse_id("C=CH, O=Site, CN=gw").unwrap() else {
            panic!("a DN is an identity")
        };
        assert_eq!(dn.ty, idt::DER_ASN1_DN);
        assert_eq!(dn.to_string(), "C=CH, O=Site, CN=gw");
        // Matched attribute by attribute, case-insensitively, `*` for any value.
        assert!(parse_id("/C=CH/O=site/CN=*").unwrap().matches(&dn));
        assert!(!parse_id("C=CH, O=Site, CN=other").unwrap().matches(&dn));
        assert!(parse_id("C=CH, ZZ=gw").is_err());
        assert_eq!(pubkey_auth("psk").unwrap(), None);
        assert_eq!(pubkey_auth("pubkey").unwrap(), Some(None));
        assert_eq!(pubkey_auth("ike:rsa/pss-sha384").unwrap(), Some(Some(384)));
        assert_eq!(pubkey_auth("rsa/pss").unwrap(), Some(Some(256)));
        assert_eq!(pubkey_auth("ecdsa-sha256-sha384").unwrap(), Some(None));
        assert!(pubkey_auth("rsa-md5").is_err());
        assert!(pubkey_auth("eap-tls").is_err());
        assert_eq!(base64("c2VjcmV0").unwrap(), b"secret");
        assert_eq!(duration("2m").unwrap(), Duration::from_secs(120));
    }

    #[test]
    fn include_is_relative_to_the_file() {
        let p = write("inc", "connections {\n include conns.conf\n}\n");
        std::fs::write(
            p.with_file_name("conns.conf"),
            "c { local { auth = psk } remote { auth = psk } }\n",
        )
        .unwrap();
        let c = load(&p).unwrap();
        assert_eq!(c.connections[0].name, "c");
    }
}
