use super::*;
use espd_core::state::{Level, Mode};

const K16: &str = "0x0102030405060708090a0b0c0d0e0f1011121314";

fn good() -> String {
    format!(
        "# gw1 of a site-to-site tunnel\n\
         \n\
         ip xfrm state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 reqid 1 mode tunnel aead 'rfc4106(gcm(aes))' {K16} 128\n\
         state add src 198.18.0.2 dst 198.18.0.1 proto esp spi 4097 reqid 2 mode tunnel replay-window 1024 flag esn replay-seq 0xfffffff0 replay-seq-hi 0 aead \"rfc4106(gcm(aes))\" {K16} 96 sel src 198.18.2.0/24 dst 198.18.1.0/24\n\
         state add src 2001:db8::1 dst 2001:db8::2 proto esp spi 0x2000 aead 'rfc4106(gcm(aes))' {K16} 64   # transport by default\n\
         ip xfrm policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel\n\
         policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir fwd priority 10 tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel level required\n\
         policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto udp dport 5000-5010 dir out priority 5 action block\n\
         policy add src 2001:db8::1/128 dst 2001:db8::2/128 proto ipv6-icmp type 128 dir out tmpl proto esp\n\
         policy setdefault fwd block\n"
    )
}

#[test]
fn full_config_loads() {
    let c = Config::parse("gw1.conf", &good()).unwrap();
    assert_eq!(c.sad.len(), 3);
    assert_eq!(c.spd.len(), 4);
    let sa = c.sad.get(
        c.sad
            .lookup_in("198.18.0.1".parse().unwrap(), 4097)
            .unwrap(),
    );
    assert!(sa.cfg.flags.esn);
    assert_eq!(sa.cfg.replay_window, 1024);
    assert_eq!(sa.cfg.replay_seq, 0xffff_fff0);
    assert_eq!(sa.transform.icv_len(), 12);
    assert!(sa.cfg.sel.is_some());
    let v6 = c.sad.get(
        c.sad
            .lookup_in("2001:db8::2".parse().unwrap(), 0x2000)
            .unwrap(),
    );
    assert_eq!(v6.cfg.mode, Mode::Transport);
    assert_eq!(v6.cfg.replay_window, 64);
    // Lower priority values come first (XFRM).
    let out = c.spd.policies(Direction::Out);
    assert_eq!(out[0].priority, 0);
    assert_eq!(out.last().unwrap().priority, 5);
    let fwd = &c.spd.policies(Direction::Fwd)[0];
    assert_eq!(fwd.tmpls[0].level, Level::Required);
    assert_eq!(c.spd.default_action(Direction::Fwd), Action::Block);
    assert_eq!(c.spd.default_action(Direction::Out), Action::Allow);
    assert_eq!(summary(&c), "3 states, 4 policies, default fwd block");
}

/// Each bad line, alone in a file after a good line, gives `f:2: …` with the
/// expected text, and the load fails as a whole.
#[test]
fn bad_lines_are_located_and_explained() {
    let ok = format!("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 aead 'rfc4106(gcm(aes))' {K16} 128");
    let cases: &[(&str, &str)] = &[
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 aead 'rfc4106(gcm(aes))' 0x0102 128", "key must be 20 or 36 octets"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0 aead 'rfc4106(gcm(aes))' 0x00 128", "spi 0 is reserved"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto ah spi 0x1001", "espd does ESP only"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 aead 'rfc4106(gcm(aes))' KEY 128", "exists already"),
        ("state add src 198.18.0.1 dst 2001:db8::2 proto esp spi 0x1001 aead 'rfc4106(gcm(aes))' KEY 128", "different address families"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 aead 'rfc4106(gcm(aes))' KEY 100", "ICV length must be 64, 96 or 128"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 aead 'gcm(aes)' KEY 128", "expected 'rfc4106(gcm(aes))', 'rfc4543(gcm(aes))' or 'rfc7539esp(chacha20,poly1305)'"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 enc 'cbc(des3_ede)' 0x000102030405060708090a0b0c0d0e0f0001020304050607 auth-trunc 'hmac(sha256)' AK 128", "unsupported cipher: expected enc 'cbc(aes)' KEY"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 enc 'cbc(aes)' 0x000102030405060708090a0b0c0d0e0f auth-trunc 'hmac(sha1)' AK 96", "unsupported integrity algorithm: expected auth-trunc 'hmac(sha256)'"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 colour blue", "unknown or unsupported word `colour`"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 flag esn replay-window 0 aead 'rfc4106(gcm(aes))' KEY 128", "needs a replay window"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 replay-seq-hi 1 aead 'rfc4106(gcm(aes))' KEY 128", "need `flag esn`"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 replay-window 70000 aead 'rfc4106(gcm(aes))' KEY 128", "larger than 65536"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 mode beet aead 'rfc4106(gcm(aes))' KEY 128", "mode `beet` is not supported"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 flag wildrecv aead 'rfc4106(gcm(aes))' KEY 128", "flag `wildrecv` is not supported"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 enc 'cbc(aes)' 0x000102030405060708090a0b0c0d0e0f", "encryption without integrity is not allowed"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 enc 'ecb(cipher_null)' \"\"", "NULL encryption without integrity protects nothing"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 auth-trunc 'hmac(sha256)' AK 128", "integrity without `enc`"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 enc 'cbc(aes)' 0x00 auth-trunc 'hmac(sha256)' AK 128", "cbc(aes) key must be 16 or 32 octets"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 enc 'cbc(aes)' 0x000102030405060708090a0b0c0d0e0f auth-trunc 'hmac(sha256)' AK 96", "truncated to 128 bits"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 enc 'cbc(aes)' 0x000102030405060708090a0b0c0d0e0f auth-trunc 'hmac(sha256)' 0x0102 128", "key must be 32 octets"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 enc 'cbc(aes)' 0x000102030405060708090a0b0c0d0e0f auth 'hmac(sha256)' AK", "use `auth-trunc 'hmac(sha256)' KEY 128`"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 aead 'rfc4106(gcm(aes))' KEY 128 enc 'cbc(aes)' 0x000102030405060708090a0b0c0d0e0f", "cannot be combined"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 aead 'rfc7539esp(chacha20,poly1305)' KEY 128", "key must be 36 octets"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 aead 'rfc4543(gcm(aes))' KEY 96", "the ICV is 128 bits"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 encap espintcp 4500 4500 0.0.0.0 aead 'rfc4106(gcm(aes))' KEY 128", "`encap espintcp` is not supported"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 encap espinudp 4500 aead 'rfc4106(gcm(aes))' KEY 128", "`encap dport` needs a decimal"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 encap espinudp 0 4500 0.0.0.0 aead 'rfc4106(gcm(aes))' KEY 128", "must not be 0"),
        ("state add src 198.18.0.1 proto esp spi 0x1001 aead 'rfc4106(gcm(aes))' KEY 128", "needs `dst ADDR`"),
        ("state add src 198.18.0.1 dst 198.18.0.2 spi 0x1001 aead 'rfc4106(gcm(aes))' KEY 128", "needs `proto esp`"),
        ("state add src 198.18.0.300 dst 198.18.0.2 proto esp spi 1", "needs an IPv4 or IPv6 address, found `198.18.0.300`"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 010", "leading zero"),
        ("policy add src 198.18.1.0/24 dst 198.18.2.0/24 tmpl proto esp", "needs `dir in|out|fwd`"),
        ("policy add src 198.18.1.0/24 dst 198.18.2.0/33 dir out", "prefix length"),
        ("policy add src 198.18.1.0/24 dst 2001:db8::/32 dir out", "mixes IPv4 and IPv6"),
        ("policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir sideways", "`dir` needs `in`, `out` or `fwd`"),
        ("policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out tmpl proto esp mode tunnel", "needs `src ADDR dst ADDR`"),
        ("policy add src 198.18.1.0/24 dst 198.18.2.0/24 dport 80 dir out", "need `proto` tcp, udp"),
        ("policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto tcp dport 90-80 dir out", "is empty"),
        ("policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out action block tmpl proto esp", "a blocking policy protects nothing"),
        ("policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out tmpl proto esp tmpl proto esp tmpl proto esp tmpl proto esp tmpl proto esp", "at most 4 templates"),
        ("policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out mark 7", "unknown or unsupported word `mark`"),
        ("policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out ptype sub", "ptype sub"),
        ("policy setdefault fwd maybe", "needs `allow` or `block`"),
        ("policy flush", "`add` or `setdefault`"),
        ("ip route add 198.18.0.0/15 dev eth0", "`xfrm` after `ip`"),
        ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 aead 'rfc4106(gcm(aes)) 0x00 128", "unterminated"),
    ];
    for (bad, want) in cases {
        let bad = bad
            .replace("KEY", K16)
            .replace("AK", &format!("0x{}", "ab".repeat(32)));
        let text = format!("{ok}\n{bad}\n");
        let err = match Config::parse("site.conf", &text) {
            Ok(_) => panic!("accepted: {bad}"),
            Err(e) => e,
        };
        assert_eq!(err.0.len(), 1, "{bad}: {err}");
        let e = &err.0[0];
        assert_eq!((e.file.as_str(), e.line), ("site.conf", 2), "{bad}");
        assert!(
            e.msg.contains(want),
            "{bad}\n  got: {}\n  want: {want}",
            e.msg
        );
        assert!(e.to_string().starts_with("site.conf:2: "));
        assert!(
            !e.msg.contains("0102030405") && !e.msg.contains("abababab"),
            "key echoed: {}",
            e.msg
        );
    }
}

#[test]
fn all_errors_reported_and_nothing_installed() {
    let text = format!("{}\nbogus line\npolicy add dir out\n", good());
    let err = Config::parse("x.conf", &text).err().expect("must fail");
    let lines: Vec<usize> = err.0.iter().map(|e| e.line).collect();
    assert_eq!(lines, vec![12, 13]); // good() is 11 lines
}

#[test]
fn defaults_follow_ip_xfrm() {
    let c = Config::parse(
        "d",
        &format!("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 aead 'rfc4106(gcm(aes))' {K16} 128"),
    )
    .unwrap();
    let sa = c.sad.get(0);
    assert_eq!(sa.cfg.mode, Mode::Transport);
    assert_eq!(sa.cfg.reqid, 0);
    assert_eq!(sa.cfg.replay_window, 64);
    assert_eq!(sa.cfg.replay_oseq, 0);
    assert!(!sa.cfg.flags.esn);
}

#[test]
fn batches_give_the_tables_a_whole_parse_gives() {
    use crate::db::{apply, Op};
    use espd_core::state::{Direction, Tables};
    // The running tables follow the batches' ops; the reference is the
    // resulting text parsed from scratch.
    let text = good();
    let mut t = Tables::default();
    for (i, chunk) in text.lines().collect::<Vec<_>>().chunks(3).enumerate() {
        let (_, ops) = apply(&format!("b{i}"), &chunk.join("\n"), t.sad(), t.spd()).unwrap();
        for op in ops {
            match op {
                Op::AddSa(c) => drop(t.insert_sa(c).unwrap()),
                Op::UpdateSa(c) => drop(t.update_sa(c).unwrap()),
                Op::DelSa(d, s) => drop(t.remove_sa(d, s).unwrap()),
                Op::AddPolicy(p) => t.insert_policy(p).unwrap(),
                Op::UpdatePolicy(p) => drop(t.update_policy(p).unwrap()),
                Op::DelPolicy(d, s) => drop(t.remove_policy(d, &s).unwrap()),
                Op::Default(d, a) => t.set_default(d, a),
            }
        }
    }
    let c = Config::parse("gw1.conf", &text).unwrap();
    assert_eq!(t.sad().len(), c.sad.len());
    for sa in c.sad.iter() {
        let id = t.sad().lookup_in(sa.cfg.dst, sa.cfg.spi).unwrap();
        assert_eq!(t.sad().get(id).cfg.reqid, sa.cfg.reqid);
    }
    for dir in Direction::ALL {
        assert_eq!(t.spd().default_action(dir), c.spd.default_action(dir));
        let (pa, pb) = (c.spd.policies(dir), t.spd().policies(dir));
        assert_eq!(pa.len(), pb.len());
        for (a, b) in pa.iter().zip(&pb) {
            assert_eq!((a.sel, a.priority, a.action), (b.sel, b.priority, b.action));
        }
    }
}
