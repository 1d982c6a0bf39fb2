//! The SPD as a table: for each packet, the expected verdict and SA
//! (RFC 4301 §4.4.1 with Linux XFRM semantics).

mod common;
use common::*;
use espd_config::Config;
use espd_core::engine::{Engine, Verdict};
use espd_core::wire::proto;
use espd_core::DropReason;

const K1: &str = "0x0101010101010101010101010101010101010101";
const K2: &str = "0x0202020202020202020202020202020202020202";

/// A row: what it is, the packet, and the verdict (`Ok(SPI)`, `Ok(None)` = bypass).
type Row = (&'static str, Vec<u8>, Result<Option<u32>, DropReason>);

fn gw1_conf(extra: &str) -> String {
    format!(
        "state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 reqid 1 mode tunnel aead 'rfc4106(gcm(aes))' {K1} 128
state add src 198.18.0.2 dst 198.18.0.1 proto esp spi 0x2000 reqid 2 mode tunnel aead 'rfc4106(gcm(aes))' {K2} 128 sel src 198.18.2.0/24 dst 198.18.1.0/24
policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out priority 100 tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel
policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto udp dport 53 dir out priority 10
policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto tcp dport 23 dir out priority 10 action block
policy add src 198.18.1.0/24 dst 198.18.3.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.9 proto esp reqid 9 mode tunnel
policy add src 198.18.1.0/24 dst 198.18.4.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.9 proto esp reqid 9 mode tunnel level use
policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir fwd tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
policy add src 198.18.7.0/24 dst 198.18.1.0/24 dir fwd tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
policy add src 198.18.8.0/24 dst 198.18.1.0/24 dir fwd action block
{extra}"
    )
}

/// The peer (gw2) protects everything towards site A with SPI 0x2000 — also
/// traffic the SA's selector at gw1 does not cover, to see gw1 refuse it.
fn gw2_conf() -> String {
    format!(
        "state add src 198.18.0.2 dst 198.18.0.1 proto esp spi 0x2000 reqid 2 mode tunnel aead 'rfc4106(gcm(aes))' {K2} 128
policy add src 0.0.0.0/0 dst 198.18.1.0/24 dir out tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
"
    )
}

fn engine(text: &str) -> Engine {
    let c = Config::parse("t.conf", text).unwrap_or_else(|e| panic!("{e}"));
    Engine::new(c.sad, c.spd, &[])
}

fn spi_of(e: &Engine, v: Verdict) -> Option<u32> {
    match v {
        Verdict::Encapsulated(id) | Verdict::Decapsulated(id) | Verdict::Dummy(id) => {
            Some(e.tables().sad().get(id).cfg.spi)
        }
        _ => None,
    }
}

/// Runs each row's packet and checks its verdict (and SA).
fn check_rows(e: &mut Engine, table: &[Row]) {
    for (what, pkt, want) in table {
        let (v, _) = run(e, pkt);
        match want {
            Ok(spi) => {
                assert!(!matches!(v, Verdict::Drop(_)), "{what}: {v:?}");
                assert_eq!(spi_of(e, v), *spi, "{what}: {v:?}");
            }
            Err(r) => assert_eq!(v, Verdict::Drop(*r), "{what}"),
        }
    }
}

#[test]
fn outbound_and_plaintext_verdicts() {
    use DropReason::*;
    let mut gw1 = engine(&gw1_conf(""));
    #[rustfmt::skip]
    let table: &[Row] = &[
        ("A→B udp: PROTECT", udp4("198.18.1.10", "198.18.2.20", 5000), Ok(Some(0x1000))),
        ("A→B udp/53: BYPASS wins by priority", udp4("198.18.1.10", "198.18.2.20", 53), Ok(None)),
        ("A→B tcp/23: DISCARD wins by priority", ipv4("198.18.1.10", "198.18.2.20", proto::TCP, 0, &tcp(1, 23)), Err(Discard)),
        ("A→B tcp/22: PROTECT", ipv4("198.18.1.10", "198.18.2.20", proto::TCP, 0, &tcp(1, 22)), Ok(Some(0x1000))),
        ("A→B icmp: PROTECT", ipv4("198.18.1.10", "198.18.2.20", proto::ICMP, 0, &icmp_echo()), Ok(Some(0x1000))),
        ("A→C: PROTECT but no SA", udp4("198.18.1.10", "198.18.3.5", 1), Err(NoOutSa)),
        ("A→D: level use, no SA: sent in clear", udp4("198.18.1.10", "198.18.4.5", 1), Ok(None)),
        ("unrelated: default allow", udp4("198.18.9.1", "198.18.9.2", 1), Ok(None)),
        ("B→A in clear: fwd policy requires ESP", udp4("198.18.2.20", "198.18.1.10", 1), Err(UnprotectedInbound)),
        ("site 8 → A: fwd block", udp4("198.18.8.1", "198.18.1.10", 1), Err(Discard)),
        ("to gw1 itself, no policy: delivered", udp4("198.18.2.20", "198.18.0.1", 1), Ok(None)),
    ];
    for (what, pkt, want) in table {
        let (v, out) = run(&mut gw1, pkt);
        match want {
            Ok(spi) => {
                assert!(!matches!(v, Verdict::Drop(_)), "{what}: {v:?}");
                assert_eq!(spi_of(&gw1, v), *spi, "{what}: {v:?}");
                if spi.is_none() {
                    assert_eq!(&out, pkt, "{what}: bypass must not change the packet");
                }
            }
            Err(r) => assert_eq!(v, Verdict::Drop(*r), "{what}"),
        }
    }
    let c = &gw1.counters();
    assert_eq!((c.encapsulated, c.bypass, c.dropped), (3, 4, 4));
    assert_eq!(c.drops[Discard as usize], 2);
}

#[test]
fn inbound_selector_and_policy_checks() {
    use DropReason::*;
    let mut gw1 = engine(&gw1_conf(""));
    let mut gw2 = engine(&gw2_conf());
    #[rustfmt::skip]
    let table: &[(&str, Vec<u8>, Verdict)] = &[
        ("B→A through 0x2000: decapsulated", udp4("198.18.2.20", "198.18.1.10", 7), Verdict::Decapsulated(1)),
        ("site 7 → A: fwd policy names the SA, but the SA's sel does not cover it", udp4("198.18.7.7", "198.18.1.10", 7), Verdict::Drop(PolicyMismatch)),
        ("site 6 → A: outside the SA's sel as well", udp4("198.18.6.6", "198.18.1.10", 7), Verdict::Drop(PolicyMismatch)),
    ];
    for (what, inner, want) in table {
        let (v2, esp) = run(&mut gw2, inner);
        assert_eq!(
            spi_of(&gw2, v2),
            Some(0x2000),
            "{what}: peer must protect it"
        );
        let (v, out) = run(&mut gw1, &esp);
        assert_eq!(v, *want, "{what}");
        if let Verdict::Decapsulated(_) = v {
            assert_eq!(&out, inner, "{what}: inner packet must come out unchanged");
        }
    }
}

/// Upper-layer selectors: ICMP type/code, SCTP port ranges, protocol numbers.
#[test]
fn icmp_type_code_and_port_range_selectors() {
    use DropReason::*;
    let mut gw1 = engine(&gw1_conf(
        "policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto icmp type 8 code 0 dir out priority 1 action block
policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto sctp dport 3868-3869 dir out priority 1 action block
policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto 47 dir out priority 1",
    ));
    let sctp = |dport: u16| {
        let mut l4 = vec![0u8; 12];
        l4[..2].copy_from_slice(&2905u16.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        ipv4("198.18.1.10", "198.18.2.20", proto::SCTP, 0, &l4)
    };
    #[rustfmt::skip]
    let table: &[Row] = &[
        ("echo request (type 8 code 0): blocked", ipv4("198.18.1.10", "198.18.2.20", proto::ICMP, 0, &icmp_echo()), Err(Discard)),
        ("echo reply (type 0): protected", ipv4("198.18.1.10", "198.18.2.20", proto::ICMP, 0, &[0, 0, 0xff, 0xff, 0, 0, 0, 0]), Ok(Some(0x1000))),
        ("type 8 code 1: protected", ipv4("198.18.1.10", "198.18.2.20", proto::ICMP, 0, &[8, 1, 0xf6, 0xff, 0, 0, 0, 0]), Ok(Some(0x1000))),
        ("SCTP to 3868 (range low end): blocked", sctp(3868), Err(Discard)),
        ("SCTP to 3869 (range high end): blocked", sctp(3869), Err(Discard)),
        ("SCTP to 3870: protected", sctp(3870), Ok(Some(0x1000))),
        ("GRE (proto 47): bypass", ipv4("198.18.1.10", "198.18.2.20", proto::GRE, 0, &[0, 0, 8, 0]), Ok(None)),
    ];
    check_rows(&mut gw1, table);
}

#[test]
fn default_block_and_no_policy() {
    let mut gw1 = engine(&gw1_conf("policy setdefault out block fwd block"));
    let (v, _) = run(&mut gw1, &udp4("198.18.9.1", "198.18.9.2", 1));
    assert_eq!(v, Verdict::Drop(DropReason::NoPolicy));
    // As in XFRM, `fwd block` covers forwarded traffic in both directions: A→B
    // needs an allowing fwd policy too (strongSwan installs one).
    let (v, _) = run(&mut gw1, &udp4("198.18.1.10", "198.18.2.20", 5000));
    assert_eq!(v, Verdict::Drop(DropReason::NoPolicy));
    let mut gw1 = engine(&gw1_conf(
        "policy setdefault out block fwd block\npolicy add src 198.18.1.0/24 dst 198.18.2.0/24 dir fwd",
    ));
    let (v, _) = run(&mut gw1, &udp4("198.18.1.10", "198.18.2.20", 5000));
    assert_eq!(spi_of(&gw1, v), Some(0x1000));
}

/// An ICMPv4 error (type 3, code 1) quoting the first 28 octets of `quoted`.
fn icmp_unreach(src: &str, dst: &str, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![3, 1, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[..28.min(quoted.len())]);
    ipv4(src, dst, proto::ICMP, 0, &icmp)
}

#[test]
fn unprotected_icmp_errors_about_protected_flows_are_dropped() {
    use DropReason::*;
    let mut gw1 = engine(&gw1_conf(""));
    let a2b = udp4("198.18.1.10", "198.18.2.20", 5000);
    let b2a = udp4("198.18.2.20", "198.18.1.10", 5000);
    let other = udp4("198.18.1.10", "198.18.9.9", 5000);
    #[rustfmt::skip]
    let table: &[Row] = &[
        // RFC 4301 §6.1.1: anyone on the wire could forge these to cut a tunnelled flow.
        ("wire router → A about A→B", icmp_unreach("198.18.0.99", "198.18.1.10", &a2b), Err(UnprotectedInbound)),
        ("wire router → A about B→A", icmp_unreach("198.18.0.99", "198.18.1.10", &b2a), Err(UnprotectedInbound)),
        // Outer selectors in the protected range: the plaintext check already refuses it.
        ("forged B → A about A→B", icmp_unreach("198.18.2.20", "198.18.1.10", &a2b), Err(UnprotectedInbound)),
        // About an unprotected flow: forwarded as any bypass traffic.
        ("wire router → A about A→9.9", icmp_unreach("198.18.0.99", "198.18.1.10", &other), Ok(None)),
        // A host behind us answering the peer's site: protected like any A→B traffic.
        ("A → B about B→A", icmp_unreach("198.18.1.10", "198.18.2.20", &b2a), Ok(Some(0x1000))),
        // Cut short before the quoted header: nothing to check, so the outer selectors decide.
        ("truncated error", ipv4("198.18.0.99", "198.18.1.10", proto::ICMP, 0, &[3, 1, 0, 0, 0, 0, 0, 0, 0x45]), Ok(None)),
    ];
    check_rows(&mut gw1, table);
    assert_eq!(gw1.counters().drops[UnprotectedInbound as usize], 3);
}

#[test]
fn our_own_esp_coming_back_is_dropped_before_any_crypto() {
    use DropReason::*;
    let mut gw1 = engine(&gw1_conf(""));
    let (v, esp) = run(&mut gw1, &udp4("198.18.1.10", "198.18.2.20", 5000));
    assert_eq!(spi_of(&gw1, v), Some(0x1000));
    // The same packet back at gw1 (a reflection, or the other direction of a
    // capture): addressed to the peer, SPI of our outbound SA.
    let (v, out) = run(&mut gw1, &esp);
    assert_eq!(v, Verdict::Drop(OwnEsp));
    assert_eq!(out, esp, "nothing decrypted or changed");
    assert_eq!(gw1.counters().drops[OwnEsp as usize], 1);
    // Not counted against the SA: it is not the SA's traffic.
    // Not even a runtime state: the SA was never touched.
    assert!(gw1
        .sa_state(0)
        .is_none_or(|s| s.counters().drops.iter().sum::<u64>() == 0));
    // ESP to the peer with an SPI we do not have is transit traffic: not ours.
    let mut transit = esp.clone();
    transit[20..24].copy_from_slice(&0x7777u32.to_be_bytes());
    let (v, _) = run(&mut gw1, &transit);
    assert_eq!(v, Verdict::Bypass);
    // A bare-states configuration (no policies, no --local) still opens ESP
    // to every SA's destination, as `espd pcap` users rely on.
    let mut bare = engine(
        &gw1_conf("")
            .lines()
            .filter(|l| l.starts_with("state"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let (v, _) = run(&mut bare, &esp);
    assert_ne!(v, Verdict::Drop(OwnEsp));
}
