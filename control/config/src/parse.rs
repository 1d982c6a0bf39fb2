//! The grammar of one line. See `docs/config.md` for every word.

use crate::lex;
use espd_core::state::replay::MAX_WINDOW;
use espd_core::state::sa;
use espd_core::state::{
    Action, Algs, Direction, Encap, KeyedAlg, Level, Lifetime, Mode, Policy, PortRange, Prefix,
    SaConfig, SaFlags, Selector, Template,
};
use espd_core::wire::proto;
use std::net::IpAddr;
use zeroize::Zeroizing;

/// What one line configures.
#[derive(Debug)]
pub enum Item {
    State(Box<SaConfig>),
    Policy(Policy),
    /// `policy setdefault DIR ACTION …`
    Default(Vec<(Direction, Action)>),
}

/// The default replay window when a state names none (RFC 4303 §3.4.3: 64).
pub const DEFAULT_REPLAY_WINDOW: u32 = 64;

type R<T> = Result<T, String>;

/// Parses one line; `Ok(None)` for blank and comment lines.
pub fn parse_line(line: &str) -> R<Option<Item>> {
    // The words zeroize what they copied when they go (see `lex`).
    parse_words(&lex::words(line)?.strs())
}

/// [`parse_line`] of a line already split into words (the running
/// configuration's batches are split once, not twice).
pub fn parse_words(words: &[&str]) -> R<Option<Item>> {
    let mut w = Words { w: words, i: 0 };
    if w.peek().is_none() {
        return Ok(None);
    }
    if w.peek() == Some("ip") {
        w.next();
        w.expect_word("xfrm", "`xfrm` after `ip`")?;
    }
    match w.next() {
        Some("state") => match w.next() {
            Some("add") => state_add(&mut w).map(|s| Some(Item::State(Box::new(s)))),
            other => Err(expected(
                other,
                "`add` after `state` (a config file adds states)",
            )),
        },
        Some("policy") => match w.next() {
            Some("add") => policy_add(&mut w).map(|p| Some(Item::Policy(p))),
            Some("setdefault") => setdefault(&mut w).map(|d| Some(Item::Default(d))),
            other => Err(expected(other, "`add` or `setdefault` after `policy`")),
        },
        other => Err(expected(
            other,
            "`state add …` or `policy add …` (optionally after `ip xfrm`)",
        )),
    }
}

fn expected(got: Option<&str>, what: &str) -> String {
    match got {
        Some(g) => format!("expected {what}, found `{g}`"),
        None => format!("expected {what}, found end of line"),
    }
}

struct Words<'a> {
    w: &'a [&'a str],
    i: usize,
}

impl<'a> Words<'a> {
    fn peek(&self) -> Option<&'a str> {
        self.w.get(self.i).copied()
    }
    fn next(&mut self) -> Option<&'a str> {
        let r = self.peek();
        if r.is_some() {
            self.i += 1;
        }
        r
    }
    fn value(&mut self, key: &str, what: &str) -> R<&'a str> {
        self.next().ok_or_else(|| format!("`{key}` needs {what}"))
    }
    fn expect_word(&mut self, word: &str, what: &str) -> R<()> {
        match self.next() {
            Some(x) if x == word => Ok(()),
            other => Err(expected(other, what)),
        }
    }
}

/// A number: decimal or 0x-hex (a leading 0 alone is refused as ambiguous,
/// since `ip` would read it as octal).
fn number(key: &str, s: &str, max: u64) -> R<u64> {
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        return Err(format!(
            "`{key}` value `{s}` has a leading zero: write it in decimal or as 0x…"
        ));
    } else {
        s.parse::<u64>().ok()
    };
    match v {
        Some(v) if v <= max => Ok(v),
        Some(_) => Err(format!("`{key}` value `{s}` is larger than {max}")),
        None => Err(format!(
            "`{key}` needs a decimal or 0x-hex number, found `{s}`"
        )),
    }
}

fn addr(key: &str, s: &str) -> R<IpAddr> {
    s.parse()
        .map_err(|_| format!("`{key}` needs an IPv4 or IPv6 address, found `{s}`"))
}

fn prefix(key: &str, s: &str) -> R<Prefix> {
    let (a, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let a = addr(key, a)
        .map_err(|_| format!("`{key}` needs an address or ADDR/LEN prefix, found `{s}`"))?;
    let max = if a.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => return Err(format!("`{key}` prefix length in `{s}` must be 0..={max}")),
        },
    };
    Ok(Prefix::new(a, len).expect("length checked"))
}

fn mode(s: &str) -> R<Mode> {
    match s {
        "transport" => Ok(Mode::Transport),
        "tunnel" => Ok(Mode::Tunnel),
        "beet" | "ro" | "in_trigger" => Err(format!(
            "mode `{s}` is not supported: use `tunnel` or `transport`"
        )),
        _ => Err(format!("`mode` needs `tunnel` or `transport`, found `{s}`")),
    }
}

fn xfrm_proto(s: &str) -> R<()> {
    match s {
        "esp" => Ok(()),
        "ah" | "comp" | "route2" | "hao" | "ipsec-any" => Err(format!(
            "proto `{s}` is not supported: espd does ESP only (`proto esp`)"
        )),
        _ => Err(format!("`proto` needs `esp`, found `{s}`")),
    }
}

/// An upper-layer protocol by name or number.
fn upper_proto(s: &str) -> R<u8> {
    Ok(match s {
        "icmp" => proto::ICMP,
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        "ipv6-icmp" | "icmpv6" => proto::ICMPV6,
        "sctp" => proto::SCTP,
        "dccp" => proto::DCCP,
        "gre" => proto::GRE,
        "esp" => proto::ESP,
        "ah" => proto::AH,
        "udplite" => proto::UDPLITE,
        "ipip" | "ipencap" => proto::IPIP,
        "ipv6" => proto::IPV6,
        _ => number("proto", s, 255)
            .map_err(|_| format!("`proto` needs a protocol name (tcp, udp, icmp, ipv6-icmp, sctp, dccp, gre, …) or number 0..=255, found `{s}`"))? as u8,
    })
}

fn port_range(key: &str, s: &str, max: u64) -> R<PortRange> {
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (number(key, a, max)?, number(key, b, max)?),
        None => {
            let v = number(key, s, max)?;
            (v, v)
        }
    };
    if lo > hi {
        return Err(format!(
            "`{key}` range `{s}` is empty (low end above high end)"
        ));
    }
    Ok(PortRange {
        lo: lo as u16,
        hi: hi as u16,
    })
}

/// `src PREFIX dst PREFIX [dev DEV] [proto P [sport N] [dport N] | [type N] [code N]]`
/// — stops at the first word that is not a selector word.
fn selector(w: &mut Words<'_>, what: &str) -> R<Selector> {
    let (mut src, mut dst, mut pr) = (None, None, None);
    let (mut sport, mut dport, mut ty, mut code) = (None, None, None, None);
    while let Some(k) = w.peek() {
        match k {
            "src" | "dst" | "proto" | "sport" | "dport" | "type" | "code" | "dev" => {
                w.next();
            }
            _ => break,
        }
        match k {
            "src" if src.is_none() => src = Some(prefix(k, w.value(k, "a prefix")?)?),
            "dst" if dst.is_none() => dst = Some(prefix(k, w.value(k, "a prefix")?)?),
            "proto" if pr.is_none() => pr = Some(upper_proto(w.value(k, "a protocol")?)?),
            "sport" if sport.is_none() => {
                sport = Some(port_range(k, w.value(k, "a port or LO-HI range")?, 65535)?)
            }
            "dport" if dport.is_none() => {
                dport = Some(port_range(k, w.value(k, "a port or LO-HI range")?, 65535)?)
            }
            "type" if ty.is_none() => ty = Some(port_range(k, w.value(k, "an ICMP type")?, 255)?),
            "code" if code.is_none() => {
                code = Some(port_range(k, w.value(k, "an ICMP code")?, 255)?)
            }
            "dev" => return Err(
                "`dev` in a selector is not supported: espd selects by address, protocol and port"
                    .into(),
            ),
            _ => return Err(format!("`{k}` given twice in the {what} selector")),
        }
    }
    let src = src.ok_or_else(|| format!("the {what} selector needs `src PREFIX`"))?;
    let dst = dst.ok_or_else(|| format!("the {what} selector needs `dst PREFIX`"))?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(format!(
            "the {what} selector mixes IPv4 and IPv6 (src {src}, dst {dst})"
        ));
    }
    let has_ports = matches!(pr, Some(p) if espd_core::wire::l4::has_ports(p));
    let is_icmp = matches!(pr, Some(proto::ICMP | proto::ICMPV6));
    if (sport.is_some() || dport.is_some()) && !has_ports {
        return Err(
            "`sport`/`dport` need `proto` tcp, udp, sctp, dccp or udplite before them".into(),
        );
    }
    if (ty.is_some() || code.is_some()) && !is_icmp {
        return Err("`type`/`code` need `proto icmp` or `proto ipv6-icmp` before them".into());
    }
    Ok(Selector {
        src,
        dst,
        proto: pr,
        sport: sport.or(ty),
        dport: dport.or(code),
    })
}

fn flags(w: &mut Words<'_>, f: &mut SaFlags) -> R<()> {
    let mut n = 0;
    while let Some(k) = w.peek() {
        match k {
            "esn" => f.esn = true,
            "noecn" => f.noecn = true,
            "decap-dscp" => f.decap_dscp = true,
            "nopmtudisc" => f.nopmtudisc = true,
            "wildrecv" | "icmp" | "af-unspec" | "align4" => {
                return Err(format!(
                    "flag `{k}` is not supported (supported: esn, noecn, decap-dscp, nopmtudisc)"
                ))
            }
            _ => break,
        }
        w.next();
        n += 1;
    }
    if n == 0 {
        return Err(expected(
            w.peek(),
            "a flag after `flag` (esn, noecn, decap-dscp, nopmtudisc)",
        ));
    }
    Ok(())
}

fn key_bytes(what: &str, s: &str) -> R<Zeroizing<Vec<u8>>> {
    // Never echo the key in an error.
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if h.len() % 2 != 0 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("`{what}` key must be 0x followed by an even number of hex digits (or a quoted string)"));
        }
        let mut v = Zeroizing::new(Vec::with_capacity(h.len() / 2));
        for i in (0..h.len()).step_by(2) {
            v.push(u8::from_str_radix(&h[i..i + 2], 16).expect("hex checked"));
        }
        Ok(v)
    } else {
        Ok(Zeroizing::new(s.as_bytes().to_vec()))
    }
}

fn state_add(w: &mut Words<'_>) -> R<SaConfig> {
    let (mut src, mut dst, mut spi, mut reqid, mut md) = (None, None, None, None, None);
    let (mut proto_seen, mut win, mut sel) = (false, None, None);
    let (mut aead, mut enc, mut auth, mut encap) = (None, None, None, None);
    let (mut seq, mut seq_hi, mut oseq, mut oseq_hi) = (None, None, None, None);
    let mut fl = SaFlags::default();
    let mut lifetime = Lifetime::default();
    while let Some(k) = w.next() {
        macro_rules! once {
            ($slot:ident, $e:expr) => {{
                if $slot.is_some() {
                    return Err(format!("`{k}` given twice"));
                }
                $slot = Some($e);
            }};
        }
        match k {
            "src" => once!(src, addr(k, w.value(k, "an address")?)?),
            "dst" => once!(dst, addr(k, w.value(k, "an address")?)?),
            "proto" => {
                xfrm_proto(w.value(k, "`esp`")?)?;
                proto_seen = true;
            }
            "spi" => once!(spi, number(k, w.value(k, "an SPI")?, u32::MAX as u64)? as u32),
            "reqid" => once!(reqid, number(k, w.value(k, "a number")?, u32::MAX as u64)? as u32),
            "mode" => once!(md, mode(w.value(k, "tunnel or transport")?)?),
            "replay-window" => once!(win, number(k, w.value(k, "a number of packets")?, MAX_WINDOW as u64)? as u32),
            "replay-seq" => once!(seq, number(k, w.value(k, "a number")?, u32::MAX as u64)?),
            "replay-seq-hi" => once!(seq_hi, number(k, w.value(k, "a number")?, u32::MAX as u64)?),
            "replay-oseq" => once!(oseq, number(k, w.value(k, "a number")?, u32::MAX as u64)?),
            "replay-oseq-hi" => once!(oseq_hi, number(k, w.value(k, "a number")?, u32::MAX as u64)?),
            "flag" => flags(w, &mut fl)?,
            "aead" => {
                let name = w.value(k, "an algorithm name, a key and an ICV length in bits")?;
                let key = key_bytes(k, w.value(k, "a key after the algorithm name")?)?;
                let icv = number("aead ICV length", w.value(k, "an ICV length in bits")?, 1024)?;
                once!(aead, KeyedAlg::new(name, &sa::AEAD_ALGS, sa::UNSUPPORTED_AEAD, key, icv as u32).map_err(|e| e.to_string())?);
            }
            "enc" => {
                let name = w.value(k, "a cipher name and a key")?;
                let key = key_bytes(k, w.value(k, "a key after the cipher name (\"\" for cipher_null)")?)?;
                once!(enc, KeyedAlg::new(name, &sa::ENC_ALGS, sa::UNSUPPORTED_ENC, key, 0).map_err(|e| e.to_string())?);
            }
            "auth-trunc" => {
                let name = w.value(k, "an algorithm name, a key and a truncation length in bits")?;
                let key = key_bytes(k, w.value(k, "a key after the algorithm name")?)?;
                let bits = number("auth-trunc length", w.value(k, "a truncation length in bits")?, 1024)?;
                once!(auth, KeyedAlg::new(name, &sa::AUTH_ALGS, sa::UNSUPPORTED_AUTH, key, bits as u32).map_err(|e| e.to_string())?);
            }
            "auth" => {
                return Err("`auth` truncates hmac(sha256) to 96 bits on Linux, which RFC 4868 does not define: use `auth-trunc 'hmac(sha256)' KEY 128`".into())
            }
            "sel" => once!(sel, selector(w, "state")?),
            "limit" => limits(w, &mut lifetime)?,
            "comp" => return Err("`comp` (IPComp) is not supported".into()),
            "encap" => {
                let ty = w.value(k, "espinudp SPORT DPORT OADDR")?;
                if ty != "espinudp" {
                    return Err(format!("`encap {ty}` is not supported: use `encap espinudp SPORT DPORT OADDR` (RFC 3948)"));
                }
                let sport = number("encap sport", w.value(k, "SPORT DPORT OADDR after espinudp")?, 65535)? as u16;
                let dport = number("encap dport", w.value(k, "DPORT OADDR after the source port")?, 65535)? as u16;
                let oa = addr("encap OADDR", w.value(k, "OADDR (the peer's original address, 0.0.0.0 or :: if none)")?)?;
                if sport == 0 || dport == 0 {
                    return Err("`encap espinudp` ports must not be 0".into());
                }
                once!(encap, Encap { sport, dport, oa });
            }
            other => {
                return Err(format!(
                    "unknown or unsupported word `{other}` in `state add` (expected src, dst, proto, spi, reqid, mode, replay-window, replay-seq, replay-seq-hi, replay-oseq, replay-oseq-hi, flag, aead, enc, auth-trunc, encap, sel, limit)"
                ))
            }
        }
    }
    let src = src.ok_or("`state add` needs `src ADDR`")?;
    let dst = dst.ok_or("`state add` needs `dst ADDR`")?;
    if !proto_seen {
        return Err("`state add` needs `proto esp`".into());
    }
    let spi = spi.ok_or("`state add` needs `spi SPI`")?;
    // RFC 4303 §2.1: SPI 0 is reserved for local use; 1..=255 are reserved by IANA.
    if spi < 256 {
        return Err(format!("spi {spi} is reserved (RFC 4303 §2.1: 0 is local-only, 1-255 belong to IANA): use 256 or more"));
    }
    if aead.is_none() && enc.is_none() && auth.is_none() {
        return Err("`state add` needs `aead NAME KEY ICV-BITS`, or `enc NAME KEY` with `auth-trunc NAME KEY BITS`".into());
    }
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(format!(
            "src {src} and dst {dst} are of different address families"
        ));
    }
    let window = win.unwrap_or(DEFAULT_REPLAY_WINDOW);
    if fl.esn && window == 0 {
        // As Linux: an ESN receiver needs a window to infer the high bits.
        return Err(
            "`flag esn` needs a replay window: drop `replay-window 0` (the default is 64)".into(),
        );
    }
    if !fl.esn && (seq_hi.is_some() || oseq_hi.is_some()) {
        return Err("`replay-seq-hi`/`replay-oseq-hi` need `flag esn`".into());
    }
    Ok(SaConfig {
        src,
        dst,
        spi,
        reqid: reqid.unwrap_or(0),
        // ip xfrm's default mode is transport.
        mode: md.unwrap_or(Mode::Transport),
        replay_window: window,
        flags: fl,
        replay_seq: (seq_hi.unwrap_or(0) << 32) | seq.unwrap_or(0),
        replay_oseq: (oseq_hi.unwrap_or(0) << 32) | oseq.unwrap_or(0),
        algs: Algs { aead, enc, auth },
        encap,
        sel,
        iv_mask: random_u64(),
        lifetime,
    })
}

/// `limit time-soft N time-hard N byte-soft N byte-hard N packet-soft N
/// packet-hard N` (any of them, at least one): ip xfrm's lifetime words.
fn limits(w: &mut Words<'_>, lt: &mut Lifetime) -> R<()> {
    let mut any = false;
    while let Some(k) = w.peek() {
        let slot = match k {
            "time-soft" => &mut lt.time_soft,
            "time-hard" => &mut lt.time_hard,
            "byte-soft" => &mut lt.bytes_soft,
            "byte-hard" => &mut lt.bytes_hard,
            "packet-soft" => &mut lt.packets_soft,
            "packet-hard" => &mut lt.packets_hard,
            "time-use-soft" | "time-use-hard" => {
                return Err(format!(
                    "`limit {k}` is not supported: use time-soft/time-hard"
                ))
            }
            _ => break,
        };
        w.next();
        *slot = number(
            k,
            w.value(k, "a number (seconds, octets or packets)")?,
            u64::MAX,
        )?;
        any = true;
    }
    if !any {
        return Err("`limit` needs time-soft, time-hard, byte-soft, byte-hard, packet-soft or packet-hard followed by a number".into());
    }
    let pairs = [
        ("time", lt.time_soft, lt.time_hard),
        ("byte", lt.bytes_soft, lt.bytes_hard),
        ("packet", lt.packets_soft, lt.packets_hard),
    ];
    for (what, soft, hard) in pairs {
        if soft != 0 && hard != 0 && soft > hard {
            return Err(format!(
                "`limit {what}-soft` ({soft}) is above `{what}-hard` ({hard})"
            ));
        }
    }
    Ok(())
}

/// An IV mask from the system's CSPRNG. Uniqueness of the IV does not
/// depend on this value, only its opacity does. The bytes are drawn 512 at
/// a time (one system call for 64 SAs, not one an SA: a batch of thousands
/// of SAs spent 0.23 µs an SA on it) and each is used once, then cleared.
fn random_u64() -> u64 {
    use std::cell::RefCell;
    const N: usize = 64;
    thread_local! {
        static POOL: RefCell<(Zeroizing<[u64; N]>, usize)> =
            RefCell::new((Zeroizing::new([0; N]), N));
    }
    POOL.with(|p| {
        let (buf, used) = &mut *p.borrow_mut();
        if *used == N {
            let mut b = Zeroizing::new([0u8; 8 * N]);
            let _ = getrandom::getrandom(&mut b[..]);
            for (x, c) in buf.iter_mut().zip(b.chunks_exact(8)) {
                *x = u64::from_ne_bytes(c.try_into().expect("8 octets"));
            }
            *used = 0;
        }
        let v = std::mem::take(&mut buf[*used]);
        *used += 1;
        v
    })
}

fn template(w: &mut Words<'_>) -> R<Template> {
    let (mut src, mut dst, mut spi, mut reqid, mut md, mut level) =
        (None, None, None, None, None, None);
    let mut proto_seen = false;
    while let Some(k) = w.peek() {
        macro_rules! once {
            ($slot:ident, $e:expr) => {{
                w.next();
                if $slot.is_some() {
                    return Err(format!("`{k}` given twice in `tmpl`"));
                }
                $slot = Some($e);
            }};
        }
        match k {
            "src" => once!(src, addr(k, w.value(k, "an address")?)?),
            "dst" => once!(dst, addr(k, w.value(k, "an address")?)?),
            "proto" => {
                w.next();
                xfrm_proto(w.value(k, "`esp`")?)?;
                proto_seen = true;
            }
            "spi" => once!(
                spi,
                number(k, w.value(k, "an SPI")?, u32::MAX as u64)? as u32
            ),
            "reqid" => once!(
                reqid,
                number(k, w.value(k, "a number")?, u32::MAX as u64)? as u32
            ),
            "mode" => once!(md, mode(w.value(k, "tunnel or transport")?)?),
            "level" => once!(
                level,
                match w.value(k, "required or use")? {
                    "required" => Level::Required,
                    "use" => Level::Use,
                    o => return Err(format!("`level` needs `required` or `use`, found `{o}`")),
                }
            ),
            _ => break,
        }
    }
    if !proto_seen {
        return Err("`tmpl` needs `proto esp`".into());
    }
    let mode = md.unwrap_or(Mode::Transport);
    let (src, dst) = (
        src.filter(|a: &IpAddr| !a.is_unspecified()),
        dst.filter(|a: &IpAddr| !a.is_unspecified()),
    );
    if mode == Mode::Tunnel && (src.is_none() || dst.is_none()) {
        return Err("a tunnel-mode `tmpl` needs `src ADDR dst ADDR` (the tunnel endpoints)".into());
    }
    if let (Some(s), Some(d)) = (src, dst) {
        if s.is_ipv4() != d.is_ipv4() {
            return Err(format!(
                "`tmpl` src {s} and dst {d} are of different address families"
            ));
        }
    }
    Ok(Template {
        src,
        dst,
        spi,
        reqid: reqid.unwrap_or(0),
        mode,
        level: level.unwrap_or(Level::Required),
    })
}

fn policy_add(w: &mut Words<'_>) -> R<Policy> {
    let sel = selector(w, "policy")?;
    let (mut dir, mut prio, mut action) = (None, None, None);
    let mut tmpls = Vec::new();
    while let Some(k) = w.next() {
        match k {
            "dir" if dir.is_none() => {
                dir = Some(match w.value(k, "in, out or fwd")? {
                    "in" => Direction::In,
                    "out" => Direction::Out,
                    "fwd" => Direction::Fwd,
                    o => return Err(format!("`dir` needs `in`, `out` or `fwd`, found `{o}`")),
                })
            }
            "priority" if prio.is_none() => prio = Some(number(k, w.value(k, "a number")?, u32::MAX as u64)? as u32),
            "action" if action.is_none() => {
                action = Some(match w.value(k, "allow or block")? {
                    "allow" => Action::Allow,
                    "block" => Action::Block,
                    o => return Err(format!("`action` needs `allow` or `block`, found `{o}`")),
                })
            }
            "ptype" => match w.value(k, "main")? {
                "main" => {}
                o => return Err(format!("`ptype {o}` is not supported: only `main` policies exist in espd")),
            },
            "tmpl" => tmpls.push(template(w)?),
            "dir" | "priority" | "action" => return Err(format!("`{k}` given twice")),
            other => {
                return Err(format!(
                    "unknown or unsupported word `{other}` in `policy add` (expected a selector, then dir, priority, action, ptype main, tmpl)"
                ))
            }
        }
    }
    let dir = dir.ok_or("`policy add` needs `dir in|out|fwd`")?;
    let action = action.unwrap_or(Action::Allow);
    if tmpls.len() > espd_core::engine::MAX_NEST {
        return Err(format!(
            "at most {} templates in one policy (an SA bundle)",
            espd_core::engine::MAX_NEST
        ));
    }
    if action == Action::Block && !tmpls.is_empty() {
        return Err(
            "`action block` with a `tmpl`: a blocking policy protects nothing, remove the template"
                .into(),
        );
    }
    // Mixed families are fine in tunnel mode (4in6, 6in4), not in transport mode.
    for t in &tmpls {
        if t.mode == Mode::Transport {
            for a in [t.src, t.dst].into_iter().flatten() {
                if a.is_ipv4() != sel.src.is_ipv4() {
                    return Err(
                        "a transport-mode `tmpl` must be of the selector's address family".into(),
                    );
                }
            }
        }
    }
    Ok(Policy {
        sel,
        dir,
        priority: prio.unwrap_or(0),
        action,
        tmpls: tmpls.into(),
    })
}

fn setdefault(w: &mut Words<'_>) -> R<Vec<(Direction, Action)>> {
    let mut out = Vec::new();
    while let Some(k) = w.next() {
        let dir = match k {
            "in" => Direction::In,
            "out" => Direction::Out,
            "fwd" => Direction::Fwd,
            o => {
                return Err(format!(
                    "`setdefault` needs DIR ACTION pairs (in|out|fwd allow|block), found `{o}`"
                ))
            }
        };
        let a = match w.value(k, "allow or block")? {
            "allow" => Action::Allow,
            "block" => Action::Block,
            o => {
                return Err(format!(
                    "`setdefault {k}` needs `allow` or `block`, found `{o}`"
                ))
            }
        };
        out.push((dir, a));
    }
    if out.is_empty() {
        return Err("`policy setdefault` needs at least one DIR ACTION pair".into());
    }
    Ok(out)
}

#[cfg(test)]
mod mask_tests {
    /// Masks across several refills of the pool are all different (a
    /// 64-bit draw repeating in 1 000 is a broken pool, not chance).
    #[test]
    fn iv_masks_are_fresh_across_refills() {
        let mut seen: Vec<u64> = (0..1000).map(|_| super::random_u64()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 1000);
    }
}
