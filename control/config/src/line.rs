//! The inverse of [`crate::parse`]: an SA or a policy written back as the
//! `add` line that makes it. Listings (`espctl state list`, `policy list`)
//! are written from what runs, so espd keeps no text per tunnel (at
//! 100 000 tunnels the kept lines were about half a kilobyte each; see
//! docs/performance.md).
//!
//! The words are `ip xfrm`'s, in the order `ip xfrm state list` prints
//! them (the SPI as eight hex digits), and a line parses back to the same
//! SA or policy: `parse(write(x)) == x` (tested below on every word the
//! parser knows). What is not configuration is not written: the IV mask
//! espd draws, the runtime sequence numbers and counters. `replay-oseq` is
//! the number an SA started from, which after a restart is the one the
//! sequence store continued from (RFC 4303 §3.3.3): a listing applied
//! again never repeats a sequence number.

use crate::parse::DEFAULT_REPLAY_WINDOW;
use espd_core::state::{Action, KeyedAlg, Level, Policy, PortRange, SaConfig, Selector, Template};
use espd_core::wire::proto;
use std::fmt::Write;
use zeroize::Zeroizing;

/// The `state add` line of `c`; its keys as `<redacted>` unless `keys`.
///
/// Built at a capacity computed first, so no growth leaves a copy of a key
/// in freed memory.
pub fn state(c: &SaConfig, keys: bool) -> Zeroizing<String> {
    let algs = [
        ("aead", &c.algs.aead),
        ("enc", &c.algs.enc),
        ("auth-trunc", &c.algs.auth),
    ];
    let key_text: usize = algs
        .iter()
        .filter_map(|(_, a)| a.as_ref())
        .map(|a| 2 * a.key.len() + a.name().len() + 32)
        .sum();
    // Everything but the keys and names is bounded: addresses (39 octets
    // each at most), numbers (20 digits), a selector and the words.
    let mut l = Zeroizing::new(String::with_capacity(640 + key_text));
    let cap = l.capacity();
    let _ = write!(
        l,
        "state add src {} dst {} proto esp spi 0x{:08x}",
        c.src, c.dst, c.spi
    );
    if c.reqid != 0 {
        let _ = write!(l, " reqid {}", c.reqid);
    }
    let _ = write!(l, " mode {}", c.mode.as_str());
    if c.replay_window != DEFAULT_REPLAY_WINDOW {
        let _ = write!(l, " replay-window {}", c.replay_window);
    }
    for (word, v) in [("replay-seq", c.replay_seq), ("replay-oseq", c.replay_oseq)] {
        // The high half only exists with ESN (the parser refuses it otherwise).
        if v != 0 {
            let _ = write!(l, " {word} {}", v as u32);
        }
        if v >> 32 != 0 {
            let _ = write!(l, " {word}-hi {}", v >> 32);
        }
    }
    let f = &c.flags;
    let flags: Vec<&str> = [
        (f.esn, "esn"),
        (f.noecn, "noecn"),
        (f.decap_dscp, "decap-dscp"),
        (f.nopmtudisc, "nopmtudisc"),
    ]
    .into_iter()
    .filter_map(|(on, w)| on.then_some(w))
    .collect();
    if !flags.is_empty() {
        let _ = write!(l, " flag {}", flags.join(" "));
    }
    for (word, a) in algs {
        if let Some(a) = a {
            alg(&mut l, word, a, keys);
        }
    }
    if let Some(e) = &c.encap {
        let _ = write!(l, " encap espinudp {} {} {}", e.sport, e.dport, e.oa);
    }
    if let Some(s) = &c.sel {
        l.push_str(" sel");
        selector(&mut l, s);
    }
    let lt = &c.lifetime;
    if !lt.is_unlimited() {
        l.push_str(" limit");
        for (w, v) in [
            ("time-soft", lt.time_soft),
            ("time-hard", lt.time_hard),
            ("byte-soft", lt.bytes_soft),
            ("byte-hard", lt.bytes_hard),
            ("packet-soft", lt.packets_soft),
            ("packet-hard", lt.packets_hard),
        ] {
            if v != 0 {
                let _ = write!(l, " {w} {v}");
            }
        }
    }
    debug_assert_eq!(l.capacity(), cap, "the line outgrew its capacity");
    l
}

/// True if `a` and `b` configure the same SA: every field, the keys
/// included, but the IV mask each parse draws at random. For checking
/// that a written line parses back to its SA (the tests here, the config
/// fuzz target); not a comparison of secrets (it is not constant-time).
pub fn same_sa(a: &SaConfig, b: &SaConfig) -> bool {
    let keys = |c: &SaConfig| {
        [&c.algs.aead, &c.algs.enc, &c.algs.auth]
            .map(|a| a.as_ref().map(|a| (a.name(), a.key.clone(), a.bits)))
    };
    let (mut a2, mut b2) = (a.clone(), b.clone());
    (a2.iv_mask, b2.iv_mask) = (0, 0);
    format!("{a2:?}") == format!("{b2:?}") && keys(a) == keys(b)
}

/// ` WORD 'NAME' KEY [BITS]`: `enc` has no length.
fn alg(l: &mut String, word: &str, a: &KeyedAlg, keys: bool) {
    l.push(' ');
    l.push_str(word);
    l.push(' ');
    push_word(l, a.name());
    l.push(' ');
    if !keys {
        l.push_str("<redacted>");
    } else if a.key.is_empty() {
        // cipher_null's empty key.
        l.push_str("''");
    } else {
        l.push_str("0x");
        for b in a.key.iter() {
            let _ = write!(l, "{b:02x}");
        }
    }
    if word != "enc" {
        let _ = write!(l, " {}", a.bits);
    }
}

/// The `policy add` line of `p`.
pub fn policy(p: &Policy) -> String {
    let mut l = String::from("policy add");
    selector(&mut l, &p.sel);
    let _ = write!(l, " dir {} priority {}", p.dir.as_str(), p.priority);
    if p.action == Action::Block {
        l.push_str(" action block");
    }
    for t in &p.tmpls {
        template(&mut l, t);
    }
    l
}

fn template(l: &mut String, t: &Template) {
    l.push_str(" tmpl");
    if let Some(a) = t.src {
        let _ = write!(l, " src {a}");
    }
    if let Some(a) = t.dst {
        let _ = write!(l, " dst {a}");
    }
    l.push_str(" proto esp");
    if let Some(s) = t.spi {
        let _ = write!(l, " spi 0x{s:08x}");
    }
    if t.reqid != 0 {
        let _ = write!(l, " reqid {}", t.reqid);
    }
    let _ = write!(l, " mode {}", t.mode.as_str());
    // `mode` is always written: the parser's default is transport.
    if t.level == Level::Use {
        l.push_str(" level use");
    }
}

/// ` src P dst P [proto X [sport R] [dport R] | [type R] [code R]]`.
fn selector(l: &mut String, s: &Selector) {
    let _ = write!(l, " src {} dst {}", s.src, s.dst);
    let Some(p) = s.proto else { return };
    let _ = write!(l, " proto {}", proto_name(p));
    // The parser keeps an ICMP type in `sport` and its code in `dport`.
    let (a, b) = if matches!(p, proto::ICMP | proto::ICMPV6) {
        ("type", "code")
    } else {
        ("sport", "dport")
    };
    for (w, r) in [(a, s.sport), (b, s.dport)] {
        if let Some(r) = r {
            let _ = write!(l, " {w} {}", range(r));
        }
    }
}

fn range(r: PortRange) -> String {
    if r.lo == r.hi {
        r.lo.to_string()
    } else {
        format!("{}-{}", r.lo, r.hi)
    }
}

/// The name the parser reads for `p`, or its number.
fn proto_name(p: u8) -> String {
    match p {
        proto::ICMP => "icmp",
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::ICMPV6 => "ipv6-icmp",
        proto::SCTP => "sctp",
        proto::DCCP => "dccp",
        proto::GRE => "gre",
        proto::ESP => "esp",
        proto::AH => "ah",
        proto::UDPLITE => "udplite",
        proto::IPIP => "ipip",
        proto::IPV6 => "ipv6",
        n => return n.to_string(),
    }
    .to_string()
}

/// `x` as one word [`crate::lex::words`] reads back as `x`.
pub(crate) fn push_word(l: &mut String, x: &str) {
    let q = if x.contains('\'') {
        Some('"')
    } else if x.is_empty() || x.contains(|c: char| c.is_whitespace() || "()#\"".contains(c)) {
        Some('\'')
    } else {
        None
    };
    match q {
        Some(q) => {
            l.push(q);
            l.push_str(x);
            l.push(q);
        }
        None => l.push_str(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lex;
    use crate::parse::{parse_line, Item};

    const K20: &str = "0x0102030405060708090a0b0c0d0e0f1011121314";
    const K32: &str = "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn sa(l: &str) -> SaConfig {
        match parse_line(l) {
            Ok(Some(Item::State(c))) => *c,
            other => panic!("{l}: {other:?}"),
        }
    }

    fn pol(l: &str) -> Policy {
        match parse_line(l) {
            Ok(Some(Item::Policy(p))) => p,
            other => panic!("{l}: {other:?}"),
        }
    }

    #[test]
    fn states_parse_back_to_themselves() {
        let lines = [
            format!("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 reqid 1 mode tunnel aead 'rfc4106(gcm(aes))' {K20} 128"),
            format!("state add src 198.18.0.2 dst 198.18.0.1 proto esp spi 4097 reqid 2 mode tunnel replay-window 1024 flag esn replay-seq 0xfffffff0 replay-seq-hi 7 replay-oseq 5 replay-oseq-hi 1 aead \"rfc4106(gcm(aes))\" {K20} 96 sel src 198.18.2.0/24 dst 198.18.1.0/24"),
            format!("state add src 2001:db8::1 dst 2001:db8::2 proto esp spi 0x2000 aead 'rfc4106(gcm(aes))' {K20} 64"),
            format!("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x3000 mode tunnel replay-window 0 flag noecn decap-dscp nopmtudisc enc 'cbc(aes)' 0x000102030405060708090a0b0c0d0e0f auth-trunc 'hmac(sha256)' {K32} 128 encap espinudp 4500 4501 198.18.9.9 limit time-soft 30 time-hard 60 byte-soft 1000 byte-hard 2000 packet-soft 5 packet-hard 9"),
            format!("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x3001 mode transport enc 'ecb(cipher_null)' '' auth-trunc 'hmac(sha256)' {K32} 128 sel src 198.18.0.1/32 dst 198.18.0.2/32 proto udp sport 1000-2000 dport 53"),
            format!("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x3002 aead 'rfc7539esp(chacha20,poly1305)' {K32}01020304 128 sel src 2001:db8::/64 dst 2001:db8:1::/64 proto ipv6-icmp type 128-129 code 0"),
            format!("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x3003 aead 'rfc4543(gcm(aes))' {K20} 128 sel src 198.18.0.0/16 dst 0.0.0.0/0 proto 99"),
            "state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0xffffffff mode tunnel aead 'rfc4106(gcm(aes))' 'abcdefghijklmnopqrst' 128 encap espinudp 4500 4500 0.0.0.0".to_string(),
        ];
        for l in &lines {
            let c = sa(l);
            let w = state(&c, true);
            let again = sa(&w);
            assert!(same_sa(&c, &again), "{l}\n -> {}", *w);
            assert_eq!(*state(&again, true), *w, "written twice the same");
            // Without keys: the same words, each key one `<redacted>`.
            let r = state(&c, false);
            assert!(!r.contains("0x0102") && !r.contains("0x0001"), "{}", *r);
            assert_eq!(
                lex::words(&r).unwrap().len(),
                lex::words(&w).unwrap().len(),
                "{}",
                *r
            );
        }
        // As `ip xfrm state list` writes an SPI, and nothing a parse draws.
        let w = state(&sa(&lines[0]), false);
        assert_eq!(
            *w,
            "state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x00001000 reqid 1 mode tunnel aead 'rfc4106(gcm(aes))' <redacted> 128"
        );
    }

    #[test]
    fn policies_parse_back_to_themselves() {
        let lines = [
            "policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel",
            "policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir fwd priority 10 tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel level use",
            "policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto udp dport 5000-5010 dir out priority 5 action block",
            "policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto tcp sport 22 dir in priority 5 action allow",
            "policy add src 2001:db8::1/128 dst 2001:db8::2/128 proto ipv6-icmp type 128 code 0-3 dir out tmpl proto esp",
            "policy add src 198.18.1.1 dst 198.18.2.2 proto icmp code 3 dir out ptype main tmpl proto esp spi 0x1234 mode transport tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 9 mode tunnel",
            "policy add src 0.0.0.0/0 dst 0.0.0.0/0 proto 132 dir fwd priority 4294967295",
        ];
        for l in lines {
            let p = pol(l);
            let w = policy(&p);
            assert_eq!(format!("{:?}", pol(&w)), format!("{p:?}"), "{l}\n -> {w}");
            assert_eq!(policy(&pol(&w)), w);
        }
    }

    #[test]
    fn words_read_back_as_given() {
        for x in [
            "plain",
            "rfc4106(gcm(aes))",
            "a b",
            "a#b",
            "it's",
            "say \"x\"",
            "",
        ] {
            let mut s = String::new();
            push_word(&mut s, x);
            assert_eq!(lex::words(&s).unwrap().strs(), vec![x], "{x:?}");
        }
    }
}
