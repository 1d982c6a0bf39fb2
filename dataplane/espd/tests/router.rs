//! The gateway's engine options: router mode (TTL / hop limit, ICMP time
//! exceeded) and SAs shared between workers (one sequence counter, one owner
//! of each inbound replay window).

mod common;
use common::*;
use espd_config::Config;
use espd_core::engine::{Engine, Verdict};
use espd_core::state::SaShare;
use espd_core::wire::{checksum, proto};
use espd_core::DropReason;

const K: &str = "0x0101010101010101010101010101010101010101";

fn gw1() -> String {
    format!(
        "state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 reqid 1 mode tunnel aead 'rfc4106(gcm(aes))' {K} 128
policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel
"
    )
}

fn gw2() -> String {
    format!(
        "state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 reqid 1 mode tunnel aead 'rfc4106(gcm(aes))' {K} 128
policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir fwd tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel
"
    )
}

fn engine(text: &str, local: &[&str]) -> Engine {
    let c = Config::parse("t.conf", text).unwrap_or_else(|e| panic!("{e}"));
    let local: Vec<_> = local.iter().map(|a| a.parse().unwrap()).collect();
    let mut e = Engine::new(c.sad, c.spd, &local);
    e.set_router(true);
    e
}

fn ipv4_ok(p: &[u8]) -> bool {
    checksum::sum(&p[..20]) == 0xffff
}

#[test]
fn ttl_is_decremented_once_at_each_gateway() {
    let mut a = engine(&gw1(), &["198.18.1.254"]);
    let mut b = engine(&gw2(), &["198.18.2.254"]);
    let pkt = udp4("198.18.1.10", "198.18.2.20", 9);
    assert_eq!(pkt[8], 61);
    let (v, esp) = run(&mut a, &pkt);
    assert!(matches!(v, Verdict::Encapsulated(_)), "{v:?}");
    let (v, inner) = run(&mut b, &esp);
    assert!(matches!(v, Verdict::Decapsulated(_)), "{v:?}");
    assert_eq!(inner[8], 59, "one hop at each gateway");
    assert!(ipv4_ok(&inner), "header checksum updated");
    assert_eq!(inner[20..], pkt[20..]);
}

#[test]
fn expiring_plaintext_gets_time_exceeded_and_expiring_inner_is_dropped() {
    let mut a = engine(&gw1(), &["198.18.1.254"]);
    a.set_icmp_sources(&["198.18.1.254".parse().unwrap()]);
    let mut pkt = udp4("198.18.1.10", "198.18.2.20", 9);
    pkt[8] = 1;
    pkt[10..12].fill(0);
    let c = !checksum::sum(&pkt[..20]);
    pkt[10..12].copy_from_slice(&c.to_be_bytes());
    let (v, icmp) = run(&mut a, &pkt);
    assert_eq!(v, Verdict::Icmp(DropReason::TtlExceeded));
    assert_eq!(icmp[9], proto::ICMP);
    assert_eq!(&icmp[12..16], &[198, 18, 1, 254], "from the gateway");
    assert_eq!(&icmp[16..20], &[198, 18, 1, 10], "to the sender");
    assert_eq!((icmp[20], icmp[21]), (11, 0), "time exceeded in transit");
    assert!(ipv4_ok(&icmp));
    assert_eq!(checksum::sum(&icmp[20..]), 0xffff, "ICMP checksum");
    assert_eq!(&icmp[28..48], &pkt[..20], "quotes the offending header");
    assert_eq!(a.counters().drops[DropReason::TtlExceeded as usize], 1);

    // TTL 2 leaves gw1 with 1 and expires at gw2 after decapsulation.
    let mut b = engine(&gw2(), &["198.18.2.254"]);
    let mut pkt = udp4("198.18.1.10", "198.18.2.20", 9);
    pkt[8] = 2;
    pkt[10..12].fill(0);
    let c = !checksum::sum(&pkt[..20]);
    pkt[10..12].copy_from_slice(&c.to_be_bytes());
    let (v, esp) = run(&mut a, &pkt);
    assert!(matches!(v, Verdict::Encapsulated(_)));
    let (v, _) = run(&mut b, &esp);
    assert_eq!(v, Verdict::Drop(DropReason::TtlExceeded));
    assert_eq!(
        b.sa_state(0).unwrap().counters().drops[DropReason::TtlExceeded as usize],
        1
    );
}

#[test]
fn without_router_mode_nothing_changes() {
    let c = Config::parse("t.conf", &gw1()).unwrap();
    let mut a = Engine::new(c.sad, c.spd, &[]);
    let c = Config::parse("t.conf", &gw2()).unwrap();
    let mut b = Engine::new(c.sad, c.spd, &[]);
    let mut pkt = udp4("198.18.1.10", "198.18.2.20", 9);
    pkt[8] = 1;
    pkt[10..12].fill(0);
    let c = !checksum::sum(&pkt[..20]);
    pkt[10..12].copy_from_slice(&c.to_be_bytes());
    let (_, esp) = run(&mut a, &pkt);
    let (v, inner) = run(&mut b, &esp);
    assert!(matches!(v, Verdict::Decapsulated(_)));
    assert_eq!(inner, pkt);
}

/// Two workers' engines over the same SAs, linked as the gateway links them.
fn shared_pair(text: &str, local: &[&str]) -> (Engine, Engine) {
    let mut e0 = engine(text, local);
    let mut e1 = engine(text, local);
    link_workers(&mut e0, &mut e1);
    (e0, e1)
}

#[test]
fn one_worker_owns_an_outbound_sa_and_the_others_hand_over() {
    let (mut w0, mut w1) = shared_pair(&gw1(), &[]);
    let pkt = udp4("198.18.1.10", "198.18.2.20", 9);
    let mut seen = Vec::new();
    for i in 0..1000 {
        let first = if i % 3 == 0 { &mut w1 } else { &mut w0 };
        let (v, out) = run(first, &pkt);
        let esp = match v {
            Verdict::Encapsulated(_) => out,
            Verdict::Handoff(to) => {
                // Untouched (not even the TTL), and the owner takes it.
                assert_eq!(out, pkt);
                assert_eq!(to, 1, "worker 1 sent first and owns the SA");
                let (v, out) = run(&mut w1, &out);
                assert!(matches!(v, Verdict::Encapsulated(_)), "{v:?}");
                out
            }
            v => panic!("{v:?}"),
        };
        seen.push(u32::from_be_bytes(esp[24..28].try_into().unwrap()));
    }
    // One sender: the numbers leave in order, none twice.
    assert_eq!(seen, (1..=1000).collect::<Vec<_>>());
    assert_eq!(w0.counters().handed_off, 666);
    assert_eq!(w0.counters().encapsulated, 0);
}

#[test]
fn the_shared_counter_never_reuses_a_number_even_across_owners() {
    // Belt and braces: should two engines ever encapsulate through one SA
    // (ownership reset), the shared counter still never repeats a number.
    let (mut w0, mut w1) = shared_pair(&gw1(), &[]);
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..100 {
        let e = if i % 2 == 0 { &mut w0 } else { &mut w1 };
        let owner = &e.tables().sad().get(0).share.owner;
        owner.store(SaShare::NO_OWNER, std::sync::atomic::Ordering::Relaxed);
        let (v, esp) = run(e, &udp4("198.18.1.10", "198.18.2.20", 9));
        assert!(matches!(v, Verdict::Encapsulated(_)));
        assert!(seen.insert(u32::from_be_bytes(esp[24..28].try_into().unwrap())));
    }
    assert_eq!(seen.len(), 100);
}

#[test]
fn one_worker_owns_an_inbound_window_once_it_authenticates() {
    let mut a = engine(&gw1(), &[]);
    let (mut w0, mut w1) = shared_pair(&gw2(), &[]);
    let esp: Vec<Vec<u8>> = (0..4)
        .map(|_| run(&mut a, &udp4("198.18.1.10", "198.18.2.20", 9)).1)
        .collect();
    // A forged packet on worker 1 does not claim the SA.
    let mut forged = esp[3].clone();
    let n = forged.len();
    forged[n - 1] ^= 1;
    assert_eq!(
        run(&mut w1, &forged).0,
        Verdict::Drop(DropReason::IcvMismatch)
    );
    // Worker 0 authenticates first and owns it from then on; worker 1 hands
    // over without touching the packet or spending crypto on it.
    assert!(matches!(run(&mut w0, &esp[0]).0, Verdict::Decapsulated(_)));
    let (v, same) = run(&mut w1, &esp[1]);
    assert_eq!(v, Verdict::Handoff(0));
    assert_eq!(same, esp[1]);
    assert!(matches!(run(&mut w0, &esp[1]).0, Verdict::Decapsulated(_)));
    assert_eq!(run(&mut w0, &esp[1]).0, Verdict::Drop(DropReason::Replay));
    assert_eq!(w1.counters().handed_off, 1);
}

/// A UDP/IPv4 or TCP/IPv6 packet with a correct checksum, and its pseudo-header sum.
fn with_checksum(v6: bool) -> (Vec<u8>, u16) {
    use espd_core::wire::checksum::{combine, sum};
    let payload: Vec<u8> = (0..333u32).map(|i| (i * 7) as u8).collect();
    if !v6 {
        let mut p = udp4("198.18.1.10", "198.18.2.20", 9);
        p.truncate(20);
        p.extend_from_slice(&udp(40000, 9, &payload));
        let n = p.len();
        p[2..4].copy_from_slice(&(n as u16).to_be_bytes());
        p[10..12].fill(0);
        let c = !checksum::sum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let l4 = (n - 20) as u16;
        let pseudo = combine(&[sum(&p[12..16]), sum(&p[16..20]), 17, l4]);
        let c = !combine(&[pseudo, sum(&p[20..])]);
        p[26..28].copy_from_slice(&c.to_be_bytes());
        (p, pseudo)
    } else {
        let mut t = tcp(40000, 80);
        t.extend_from_slice(&payload);
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(t.len() as u16).to_be_bytes());
        p[6] = proto::TCP;
        p[7] = 64;
        p[8..24].copy_from_slice(
            &"2001:db8:1::10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        p[24..40].copy_from_slice(
            &"2001:db8:2::20"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        p.extend_from_slice(&t);
        let pseudo = combine(&[
            sum(&p[8..24]),
            sum(&p[24..40]),
            sum(&(t.len() as u32).to_be_bytes()),
            u16::from(proto::TCP),
        ]);
        let c = !combine(&[pseudo, sum(&p[40..])]);
        p[56..58].copy_from_slice(&c.to_be_bytes());
        (p, pseudo)
    }
}

#[test]
fn partial_checksums_are_completed_and_nothing_else_is_touched() {
    use espd_core::engine::complete_partial_checksum;
    for v6 in [false, true] {
        let (good, pseudo) = with_checksum(v6);
        let at = if v6 { 56 } else { 26 };
        // As veth leaves it with checksum offload: the pseudo-header sum only.
        let mut partial = good.clone();
        partial[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
        assert!(complete_partial_checksum(&mut partial), "v6={v6}");
        assert_eq!(partial, good, "v6={v6}");
        // Correct checksums stay as they are.
        let mut same = good.clone();
        assert!(!complete_partial_checksum(&mut same));
        assert_eq!(same, good);
        // A corrupted payload is not laundered into a valid checksum.
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 1] ^= 0x55;
        let copy = bad.clone();
        assert!(!complete_partial_checksum(&mut bad));
        assert_eq!(bad, copy);
    }
    // Not TCP/UDP, or garbage: untouched.
    let mut icmp = ipv4("198.18.1.10", "198.18.2.20", proto::ICMP, 0, &icmp_echo());
    assert!(!complete_partial_checksum(&mut icmp));
    assert!(!complete_partial_checksum(&mut [0x45, 0, 0]));
}

#[test]
fn a_change_of_tables_keeps_windows_sequence_numbers_and_iv_masks() {
    let mut a = engine(&gw1(), &[]);
    let mut b = engine(&gw2(), &[]);
    let pkt = udp4("198.18.1.10", "198.18.2.20", 9);
    let esp: Vec<Vec<u8>> = (0..5).map(|_| run(&mut a, &pkt).1).collect();
    for e in &esp[..3] {
        assert!(matches!(run(&mut b, e).0, Verdict::Decapsulated(_)));
    }
    // A configuration change elsewhere (a policy), and a `state update` of
    // the SAs themselves (a new lifetime): both sides take new tables.
    let extra = Config::parse(
        "x.conf",
        "policy add src 198.18.7.0/24 dst 198.18.8.0/24 dir out action block\n",
    )
    .unwrap();
    let pol = extra.spd.policies(espd_core::state::Direction::Out)[0].clone();
    let mask = a.tables().sad().get(0).cfg.iv_mask;
    for e in [&mut a, &mut b] {
        let p = pol.clone();
        let mut cfg = e.tables().sad().get(0).cfg.clone();
        cfg.lifetime.packets_hard = 1000;
        // A fresh parse would draw another mask: the update keeps the running one.
        cfg.iv_mask ^= 0xffff;
        change(e, move |t| {
            t.insert_policy(p).unwrap();
            t.update_sa(espd_core::state::SaCore::new(cfg).unwrap())
                .unwrap();
        });
    }
    assert_eq!(a.tables().sad().get(0).cfg.iv_mask, mask);
    assert_eq!(a.tables().sad().get(0).cfg.lifetime.packets_hard, 1000);
    // The window survived: a replay of an old packet is refused, the unseen ones pass.
    assert_eq!(run(&mut b, &esp[1]).0, Verdict::Drop(DropReason::Replay));
    assert!(matches!(run(&mut b, &esp[4]).0, Verdict::Decapsulated(_)));
    assert!(matches!(run(&mut b, &esp[3]).0, Verdict::Decapsulated(_)));
    // The sequence goes on (6, not 1), with the same IV mask: no IV repeats.
    let next = run(&mut a, &pkt).1;
    assert_eq!(u32::from_be_bytes(next[24..28].try_into().unwrap()), 6);
    let iv = |p: &[u8]| p[28..36].to_vec();
    assert!(esp.iter().all(|e| iv(e) != iv(&next)));
    assert!(matches!(run(&mut b, &next).0, Verdict::Decapsulated(_)));
    assert_eq!(b.counters().decapsulated, 6);
    // A delete and a re-add under the same id is a new SA: a fresh window.
    let cfg = b.tables().sad().get(0).cfg.clone();
    let (d, spi) = (cfg.dst, cfg.spi);
    change(&mut b, move |t| {
        t.remove_sa(d, spi).unwrap();
        t.insert_sa(espd_core::state::SaCore::new(cfg).unwrap())
            .unwrap();
    });
    assert!(b.sa_state(0).is_none(), "the old state went with its SA");
    assert!(matches!(run(&mut b, &esp[1]).0, Verdict::Decapsulated(_)));
}

#[test]
fn lifetimes_soft_then_hard_by_packets_bytes_and_time() {
    use espd_core::engine::{SaEvent, SaEventKind};
    let lim = |l: &str| gw1().replace(" 128\n", &format!(" 128 limit {l}\n"));
    let pkt = udp4("198.18.1.10", "198.18.2.20", 9);
    // Packets: soft at 2, hard at 3 — the 4th packet is refused.
    let mut a = engine(&lim("packet-soft 2 packet-hard 3"), &[]);
    let v: Vec<Verdict> = (0..4).map(|_| run(&mut a, &pkt).0).collect();
    assert!(
        v[..3].iter().all(|v| matches!(v, Verdict::Encapsulated(_))),
        "{v:?}"
    );
    assert_eq!(v[3], Verdict::Drop(DropReason::SaExpired));
    let mut ev = Vec::new();
    a.take_events(&mut ev);
    let kinds: Vec<(SaEventKind, &str)> = ev.iter().map(|e: &SaEvent| (e.kind, e.why)).collect();
    assert_eq!(
        kinds,
        [
            (SaEventKind::SoftExpire, "packets"),
            (SaEventKind::HardExpire, "packets")
        ]
    );
    // Bytes: hard at 100 octets of inner packets (35 each here).
    let mut b = engine(&lim("byte-hard 100"), &[]);
    let n = (0..5)
        .filter(|_| matches!(run(&mut b, &pkt).0, Verdict::Encapsulated(_)))
        .count();
    assert_eq!(n, 3, "35 + 35 + 35 ≥ 100 after the third");
    // Time: an idle SA expires on the clock alone.
    let mut c = engine(&lim("time-soft 10 time-hard 20"), &[]);
    c.set_time(15);
    c.check_lifetimes();
    c.set_time(25);
    c.check_lifetimes();
    let mut ev = Vec::new();
    c.take_events(&mut ev);
    assert_eq!(ev.len(), 2);
    assert_eq!(
        (ev[0].kind, ev[1].kind),
        (SaEventKind::SoftExpire, SaEventKind::HardExpire)
    );
    assert_eq!(run(&mut c, &pkt).0, Verdict::Drop(DropReason::SaExpired));
}

#[test]
fn limit_words_are_checked() {
    let bad = |l: &str| {
        Config::parse("t", &gw1().replace(" 128\n", &format!(" 128 limit {l}\n"))).is_err()
    };
    assert!(bad(""));
    assert!(bad("packet-soft 5 packet-hard 3"));
    assert!(bad("time-use-hard 5"));
    assert!(bad("byte-hard lots"));
    assert!(!bad(
        "time-soft 3600 time-hard 3900 byte-soft 1000000 packet-hard 99"
    ));
}

/// A road warrior to another through the gateway (hairpin): the packet
/// decapsulated from client 1's SA is plaintext a `fwd` PROTECT policy
/// selects, so the ordinary path drops it as unprotected (RFC 4301 §5.2
/// step 3a); the gateway hands it to `process_forwarded`, which runs only
/// the outbound SPD (§5.1) and encapsulates it into client 2's SA.
#[test]
fn a_forwarded_decapsulated_packet_meets_the_outbound_spd_only() {
    let text = format!(
        "state add src 198.18.0.2 dst 198.18.0.1 proto esp spi 0x2001 reqid 1 mode tunnel aead 'rfc4106(gcm(aes))' {K} 128
state add src 198.18.0.1 dst 198.18.0.3 proto esp spi 0x1002 reqid 2 mode tunnel aead 'rfc4106(gcm(aes))' {K} 128
policy add src 198.18.100.1/32 dst 198.18.100.0/28 dir fwd tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 1 mode tunnel
policy add src 198.18.100.0/28 dst 198.18.100.2/32 dir out tmpl src 198.18.0.1 dst 198.18.0.3 proto esp reqid 2 mode tunnel
"
    );
    let mut gw = engine(&text, &["198.18.0.1"]);
    let pkt = udp4("198.18.100.1", "198.18.100.2", 9);
    let (v, _) = run(&mut gw, &pkt);
    assert_eq!(v, Verdict::Drop(DropReason::UnprotectedInbound));
    let mut buf = vec![0u8; 256 + pkt.len() + 256];
    buf[256..256 + pkt.len()].copy_from_slice(&pkt);
    let mut p = espd_core::PacketBuf::new(&mut buf, 256, pkt.len());
    let v = gw.process_forwarded(&mut p);
    assert!(matches!(v, Verdict::Encapsulated(_)), "{v:?}");
    let out = p.data();
    assert_eq!(
        (out[9], &out[16..20]),
        (proto::ESP, &[198, 18, 0, 3][..]),
        "into client 2's SA"
    );
    // One hop through the gateway, counted once: decapsulation took the
    // TTL down (RFC 1812 §5.3.1), the second pass through the SPD does not.
    let out = out.to_vec();
    let mut c2 = Engine::new(
        Config::parse(
            "c2.conf",
            &format!(
                "state add src 198.18.0.1 dst 198.18.0.3 proto esp spi 0x1002 reqid 2 mode tunnel aead 'rfc4106(gcm(aes))' {K} 128
policy add src 198.18.100.0/28 dst 198.18.100.2/32 dir in tmpl src 198.18.0.1 dst 198.18.0.3 proto esp reqid 2 mode tunnel
"
            ),
        )
        .unwrap()
        .sad,
        Config::parse(
            "c2.conf",
            "policy add src 198.18.100.0/28 dst 198.18.100.2/32 dir in tmpl src 198.18.0.1 dst 198.18.0.3 proto esp reqid 2 mode tunnel\n",
        )
        .unwrap()
        .spd,
        &["198.18.0.3".parse().unwrap(), "198.18.100.2".parse().unwrap()],
    );
    let (v, inner) = run(&mut c2, &out);
    assert!(matches!(v, Verdict::Decapsulated(_)), "{v:?}");
    assert_eq!(inner[8], pkt[8], "TTL decremented once, at decapsulation");
    assert!(ipv4_ok(&inner));
    // The flag does not stick: the next ordinary packet is checked again.
    let (v, _) = run(&mut gw, &pkt);
    assert_eq!(v, Verdict::Drop(DropReason::UnprotectedInbound));
}
