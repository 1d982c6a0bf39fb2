//! Burst processing (`Engine::begin_burst` / `end_burst`): the same verdicts,
//! packets and counters as packet-by-packet processing, with decisions cached
//! across a burst, and sequence numbers of shared SAs reserved per burst and
//! given back, so none is skipped or repeated.

mod common;
use common::*;
use espd_config::Config;
use espd_core::engine::{Engine, Verdict};
use espd_core::PacketBuf;
use std::sync::atomic::Ordering::Relaxed;

const K: &str = "0x0101010101010101010101010101010101010101";
const K2: &str = "0x0202020202020202020202020202020202020202";

/// Gateway 1: protects A → B, blocks A → 198.18.3/24 (and telnet to B),
/// bypasses A → 198.18.4/24, and takes B → A back through its own SA.
fn gw1() -> String {
    format!(
        "state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 reqid 1 mode tunnel replay-window 64 aead 'rfc4106(gcm(aes))' {K} 128
state add src 198.18.0.2 dst 198.18.0.1 proto esp spi 0x2000 reqid 2 mode tunnel replay-window 64 aead 'rfc4106(gcm(aes))' {K2} 128
policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto tcp dport 23 dir out priority 10 action block
policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out priority 100 tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel
policy add src 198.18.1.0/24 dst 198.18.3.0/24 dir out action block
policy add src 198.18.1.0/24 dst 198.18.4.0/24 dir out
policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir fwd tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
policy setdefault out block
"
    )
}

/// Gateway 2, the peer: makes the ESP gateway 1 receives.
fn gw2() -> String {
    format!(
        "state add src 198.18.0.2 dst 198.18.0.1 proto esp spi 0x2000 reqid 2 mode tunnel aead 'rfc4106(gcm(aes))' {K2} 128
policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir out tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
"
    )
}

fn engine(text: &str) -> Engine {
    let c = Config::parse("t.conf", text).unwrap_or_else(|e| panic!("{e}"));
    let mut e = Engine::new(c.sad, c.spd, &[]);
    e.set_router(true);
    e
}

/// Two engines over gw1 with the same IV masks (the loader picks them at
/// random), so their output can be compared octet by octet.
fn twins() -> (Engine, Engine) {
    let a = engine(&gw1());
    let mut b = engine(&gw1());
    // The same SAs (one set of tables), each engine its own runtime state.
    b.set_tables(a.tables().clone());
    (a, b)
}

#[test]
fn bursts_give_exactly_the_verdicts_packets_and_counters_of_single_packets() {
    let (mut single, mut burst) = twins();
    let mut peer = engine(&gw2());
    // Inbound ESP from the peer: in order, then some replayed, forged, or
    // for an unknown SPI.
    let mut esp: Vec<Vec<u8>> = (0..151)
        .map(|i| run(&mut peer, &udp4("198.18.2.20", "198.18.1.10", 9 + i % 3)).1)
        .collect();
    // The last one is never delivered: forged, it is ahead of the window.
    let mut forged = esp.pop().unwrap();
    let n = forged.len();
    forged[n - 1] ^= 0x80;
    let mut unknown = esp[6].clone();
    unknown[20..24].copy_from_slice(&0x3000u32.to_be_bytes());
    let plain = [
        udp4("198.18.1.10", "198.18.2.20", 9), // protect
        udp4("198.18.1.11", "198.18.2.20", 9), // protect, other flow
        ipv4("198.18.1.10", "198.18.2.20", 6, 0, &tcp(40000, 23)), // block (port)
        udp4("198.18.1.10", "198.18.3.30", 9), // block
        udp4("198.18.1.10", "198.18.4.40", 9), // bypass
        udp4("198.18.1.10", "198.18.9.90", 9), // default block
        udp4("198.18.2.20", "198.18.1.10", 9), // plaintext where ESP is required
    ];
    let mut rng = Rng(0x5eed_0fb0_a7a7);
    let input = mix(&plain, &esp, &[forged, unknown], &mut rng);
    compare(
        &mut single,
        &mut burst,
        &input,
        &mut rng,
        &[
            "Bypass",
            "Decapsulated(1)",
            "Encapsulated(0)",
            "Drop(Discard)",
            "Drop(NoPolicy)",
            "Drop(UnprotectedInbound)",
            "Drop(Replay)",
            "Drop(IcvMismatch)",
            "Drop(NoSa)",
        ],
    );
}

/// 600 packets in runs of one kind, so the flow caches both hit and miss:
/// the first two `plain` packets (the common case), the others, the ESP in
/// order, and replays of ESP already sent or the `bad` packets.
fn mix(plain: &[Vec<u8>], esp: &[Vec<u8>], bad: &[Vec<u8>], rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut input = Vec::new();
    let mut next_esp = 0;
    while input.len() < 600 {
        let run_len = 1 + rng.below(6) as usize;
        let kind = rng.below(10);
        for _ in 0..run_len {
            let p = match kind {
                0..=4 => plain[rng.below(2) as usize].clone(),
                5 => plain[2 + rng.below(plain.len() as u64 - 2) as usize].clone(),
                6..=8 if next_esp < esp.len() => {
                    next_esp += 1;
                    esp[next_esp - 1].clone()
                }
                _ => match rng.below(1 + bad.len() as u64) as usize {
                    0 => esp[rng.below(next_esp.max(1) as u64) as usize].clone(),
                    i => bad[i - 1].clone(),
                },
            };
            input.push(p);
        }
    }
    input
}

/// Runs `input` through `single` one packet at a time and through `burst`
/// in bursts of random sizes: the same verdicts, the same octets, the same
/// engine and SA counters. `must` names verdicts the mix has to contain.
fn compare(
    single: &mut Engine,
    burst: &mut Engine,
    input: &[Vec<u8>],
    rng: &mut Rng,
    must: &[&str],
) {
    let want: Vec<_> = input.iter().map(|p| run(single, p)).collect();
    let mut got = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let n = (1 + rng.below(20) as usize).min(rest.len());
        let mut b = burst.burst(n);
        for p in &rest[..n] {
            let mut buf = vec![0u8; 256 + p.len() + 256];
            buf[256..256 + p.len()].copy_from_slice(p);
            let mut pb = PacketBuf::new(&mut buf, 256, p.len());
            let v = b.process(&mut pb);
            got.push((v, pb.data().to_vec()));
        }
        drop(b);
        rest = &rest[n..];
    }
    let mut mix = std::collections::BTreeMap::new();
    for (v, _) in &want {
        *mix.entry(format!("{v:?}")).or_insert(0) += 1;
    }
    for k in must {
        assert!(mix.contains_key(*k), "{k} missing from the mix: {mix:?}");
    }
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w, g, "packet {i}");
    }
    let (a, b) = (&single.counters(), &burst.counters());
    assert_eq!(
        (a.encapsulated, a.decapsulated, a.bypass, a.dropped, a.drops),
        (b.encapsulated, b.decapsulated, b.bypass, b.dropped, b.drops)
    );
    for id in 0..single.tables().sad().id_bound() {
        let (x, y) = (single.sa_state(id), burst.sa_state(id));
        assert_eq!(x.is_some(), y.is_some());
        if let (Some(x), Some(y)) = (x, y) {
            assert_eq!(x.oseq(), y.oseq());
            assert_eq!(x.counters().packets, y.counters().packets);
            assert_eq!(x.counters().drops, y.counters().drops);
        }
    }
}

/// IPv6 host A to host B, transport mode end to end inside a tunnel to the
/// gateway G (an SA bundle, RFC 4301 §4.5; as scripts/oracle/test_bundle.py).
fn host_a() -> String {
    let k = |b: u8| format!("0x{}", format!("{b:02x}").repeat(20));
    format!(
        "state add src 2001:db8:1::10 dst 2001:db8:2::20 proto esp spi 0x3001 reqid 31 mode transport aead 'rfc4106(gcm(aes))' {k1} 128
state add src 2001:db8:2::20 dst 2001:db8:1::10 proto esp spi 0x3002 reqid 32 mode transport aead 'rfc4106(gcm(aes))' {k2} 128
state add src 2001:db8:1::10 dst 2001:db8::1 proto esp spi 0x3003 reqid 33 mode tunnel aead 'rfc4106(gcm(aes))' {k3} 128
state add src 2001:db8::1 dst 2001:db8:1::10 proto esp spi 0x3004 reqid 34 mode tunnel aead 'rfc4106(gcm(aes))' {k4} 128
policy add src 2001:db8:1::10 dst 2001:db8:2::20 dir out tmpl proto esp reqid 31 mode transport tmpl src 2001:db8:1::10 dst 2001:db8::1 proto esp reqid 33 mode tunnel
policy add src 2001:db8:2::20 dst 2001:db8:1::10 dir in tmpl proto esp reqid 32 mode transport tmpl src 2001:db8::1 dst 2001:db8:1::10 proto esp reqid 34 mode tunnel
policy add src 2001:db8:1::10 dst 2001:db8:3::/48 dir out action block
",
        k1 = k(1),
        k2 = k(2),
        k3 = k(3),
        k4 = k(4)
    )
}

/// B and G together: what A receives, transport inside the tunnel.
fn b_and_g() -> String {
    let k = |b: u8| format!("0x{}", format!("{b:02x}").repeat(20));
    format!(
        "state add src 2001:db8:2::20 dst 2001:db8:1::10 proto esp spi 0x3002 reqid 32 mode transport aead 'rfc4106(gcm(aes))' {k2} 128
state add src 2001:db8::1 dst 2001:db8:1::10 proto esp spi 0x3004 reqid 34 mode tunnel aead 'rfc4106(gcm(aes))' {k4} 128
policy add src 2001:db8:2::20 dst 2001:db8:1::10 dir out tmpl proto esp reqid 32 mode transport tmpl src 2001:db8::1 dst 2001:db8:1::10 proto esp reqid 34 mode tunnel
",
        k2 = k(2),
        k4 = k(4)
    )
}

#[test]
fn bursts_match_single_packets_for_an_ipv6_bundle_too() {
    let single_e = || {
        let c = Config::parse("a.conf", &host_a()).unwrap_or_else(|e| panic!("{e}"));
        Engine::new(c.sad, c.spd, &["2001:db8:1::10".parse().unwrap()])
    };
    let (mut single, mut burst) = (single_e(), single_e());
    burst.set_tables(single.tables().clone());
    let c = Config::parse("bg.conf", &b_and_g()).unwrap_or_else(|e| panic!("{e}"));
    let mut peer = Engine::new(c.sad, c.spd, &[]);
    let mut esp: Vec<Vec<u8>> = (0..151)
        .map(|i| {
            let (v, p) = run(
                &mut peer,
                &udp6("2001:db8:2::20", "2001:db8:1::10", 9 + i % 3),
            );
            assert!(matches!(v, Verdict::Encapsulated(_)), "{v:?}");
            p
        })
        .collect();
    let mut forged = esp.pop().unwrap();
    let n = forged.len();
    forged[n - 1] ^= 0x80;
    let plain = [
        udp6("2001:db8:1::10", "2001:db8:2::20", 9), // protect: transport in tunnel
        udp6("2001:db8:1::10", "2001:db8:2::20", 53), // another flow
        udp6("2001:db8:1::10", "2001:db8:3::30", 9), // block
        udp6("2001:db8:1::10", "2001:db8:4::40", 9), // no policy: default allow
        udp6("2001:db8:2::20", "2001:db8:1::10", 9), // plaintext where ESP is required
    ];
    let mut rng = Rng(0x0b0b_1e5e_ed00_0006);
    let input = mix(&plain, &esp, &[forged], &mut rng);
    compare(
        &mut single,
        &mut burst,
        &input,
        &mut rng,
        &[
            "Bypass",
            "Decapsulated(3)",
            "Encapsulated(0)",
            "Drop(Discard)",
            "Drop(UnprotectedInbound)",
            "Drop(Replay)",
            "Drop(IcvMismatch)",
        ],
    );
}

#[test]
fn counters_are_added_when_the_burst_ends() {
    let mut e = engine(&gw1());
    e.begin_burst(8);
    for _ in 0..3 {
        let mut buf = vec![0u8; 512];
        let p = udp4("198.18.1.10", "198.18.2.20", 9);
        buf[256..256 + p.len()].copy_from_slice(&p);
        let mut pb = PacketBuf::new(&mut buf, 256, p.len());
        assert!(matches!(e.process(&mut pb), Verdict::Encapsulated(0)));
    }
    assert_eq!(e.counters().encapsulated, 0, "not yet: once per burst");
    assert_eq!(
        e.sa_state(0).unwrap().counters().packets,
        3,
        "the SA's own count is live"
    );
    e.end_burst();
    assert_eq!(e.counters().encapsulated, 3);
}

/// Two workers' engines over gw1's SAs, linked as the gateway links them.
fn shared_pair() -> (Engine, Engine) {
    let (mut e0, mut e1) = twins();
    link_workers(&mut e0, &mut e1);
    (e0, e1)
}

fn seq_of(esp: &[u8]) -> u32 {
    u32::from_be_bytes(esp[24..28].try_into().unwrap())
}

#[test]
fn a_shared_sa_reserves_a_bursts_numbers_at_once_and_gives_back_the_rest() {
    let (mut w0, mut w1) = shared_pair();
    let shared = w0.tables().sad().get(0).share.clone();
    let pkt = udp4("198.18.1.10", "198.18.2.20", 9);
    let mut seen = Vec::new();
    for (burst, used) in [(64, 10), (64, 64), (16, 3), (1, 1), (64, 0), (32, 31)] {
        w0.begin_burst(burst);
        for i in 0..used {
            let (v, esp) = run(&mut w0, &pkt);
            assert_eq!(v, Verdict::Encapsulated(0));
            seen.push(seq_of(&esp));
            if i == 0 {
                // The rest of the burst is reserved: one atomic operation.
                let last = seen.len() as u64 - 1 + burst as u64;
                assert_eq!(shared.oseq.load(Relaxed), last);
            }
        }
        // Another worker meanwhile hands the SA's packets over untouched.
        let (v, same) = run(&mut w1, &pkt);
        assert_eq!(v, Verdict::Handoff(0));
        assert_eq!(same, pkt);
        w0.end_burst();
        // What was not used is given back: the counter stands at the last number sent.
        assert_eq!(shared.oseq.load(Relaxed), seen.len() as u64);
        assert_eq!(w0.sa_state(0).unwrap().seq_block(), None);
    }
    // In order, none skipped, none twice.
    assert_eq!(seen, (1..=seen.len() as u32).collect::<Vec<_>>());
    assert_eq!(w0.sa_state(0).unwrap().oseq(), seen.len() as u64);
}

#[test]
fn a_reservation_never_passes_the_end_of_the_sequence_space() {
    let (mut w0, _w1) = shared_pair();
    // Without ESN the last number is 2^32 - 1; leave room for 5.
    let start = u64::from(u32::MAX) - 5;
    w0.sa_mut(0).set_oseq(start);
    let shared = w0.tables().sad().get(0).share.clone();
    shared.oseq.store(start, Relaxed);
    let pkt = udp4("198.18.1.10", "198.18.2.20", 9);
    let mut e = w0.burst(64);
    let verdicts: Vec<Verdict> = (0..8)
        .map(|_| {
            let mut buf = vec![0u8; 512];
            buf[256..256 + pkt.len()].copy_from_slice(&pkt);
            let mut pb = PacketBuf::new(&mut buf, 256, pkt.len());
            e.process(&mut pb)
        })
        .collect();
    drop(e);
    assert_eq!(
        verdicts
            .iter()
            .filter(|v| **v == Verdict::Encapsulated(0))
            .count(),
        5
    );
    assert_eq!(
        verdicts[5..],
        [Verdict::Drop(espd_core::DropReason::SeqCycled); 3]
    );
    assert_eq!(shared.oseq.load(Relaxed), u64::from(u32::MAX));
}

#[test]
fn a_change_to_the_spd_voids_the_cached_decisions() {
    use espd_core::state::{Direction, Spd};
    let mut e = engine(&gw1());
    let pkt = udp4("198.18.1.10", "198.18.2.20", 9);
    let one = |e: &mut Engine| {
        let mut b = e.burst(4);
        let mut buf = vec![0u8; 512];
        buf[256..256 + pkt.len()].copy_from_slice(&pkt);
        let mut pb = PacketBuf::new(&mut buf, 256, pkt.len());
        b.process(&mut pb)
    };
    assert_eq!(one(&mut e), Verdict::Encapsulated(0));
    assert_eq!(one(&mut e), Verdict::Encapsulated(0), "from the cache");
    // A higher-priority DISCARD for the same traffic, put into the live SPD.
    let block = Config::parse(
        "b.conf",
        "policy add src 198.18.1.10/32 dst 198.18.2.0/24 dir out priority 1 action block\n",
    )
    .unwrap();
    let p: &Spd = &block.spd;
    let pol = p.policies(Direction::Out)[0].clone();
    change(&mut e, |t| t.insert_policy(pol).unwrap());
    assert_eq!(
        one(&mut e),
        Verdict::Drop(espd_core::DropReason::Discard),
        "the cached PROTECT is void"
    );
}
