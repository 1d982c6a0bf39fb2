//! SPD and SAD at scale: loading 10 000 states and 10 000 policies, and the
//! per-packet lookup cost with 10, 1 000, 10 000 and 100 000 policies
//! (tuple-space search: the cost should stay flat).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use espd_config::Config;
use espd_core::state::{Direction, Flow};
use espd_core::wire::l4::Ports;
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr};

/// `n` site-to-site tunnels: tunnel i protects 198.18.x.y/30 → 198.19.x.y/30
/// through its own SA pair (the carrier-edge shape: many tunnels, one shape).
pub fn tunnels(n: u32) -> String {
    let mut s = String::new();
    for i in 0..n {
        let net = |hi: u8| Ipv4Addr::new(198, hi, (i >> 6) as u8, ((i & 63) << 2) as u8);
        let (a, b) = (net(18), net(19));
        let peer = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 128, 0)) + i);
        let key = format!("0x{:040x}", u128::from(i) * 0x9e37_79b9 + 1);
        writeln!(s, "state add src 198.18.255.1 dst {peer} proto esp spi {} reqid {} mode tunnel aead 'rfc4106(gcm(aes))' {key} 128", 0x1000 + i, i + 1).unwrap();
        writeln!(s, "policy add src {a}/30 dst {b}/30 dir out tmpl src 198.18.255.1 dst {peer} proto esp reqid {} mode tunnel", i + 1).unwrap();
    }
    s
}

fn load(c: &mut Criterion) {
    let text = tunnels(10_000);
    let mut g = c.benchmark_group("load");
    g.sample_size(10);
    g.bench_function("10000 states + 10000 policies", |b| {
        b.iter(|| {
            let cfg = Config::parse("big.conf", black_box(&text)).unwrap();
            assert_eq!(cfg.sad.len(), 10_000);
        })
    });
    // The shared tables the workers run on, from the parsed configuration.
    let cfg = Config::parse("big.conf", &text).unwrap();
    g.bench_function("tables of 10000 states + 10000 policies", |b| {
        b.iter(|| {
            let t = black_box(&cfg).tables(&[]);
            assert_eq!(t.sad().len(), 10_000);
        })
    });
    g.finish();
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("spd lookup (out)");
    for n in [10u32, 1_000, 10_000, 100_000] {
        let cfg = Config::parse("t", &tunnels(n.min(16_384))).unwrap();
        let mut spd = cfg.spd;
        // Beyond 16 384 tunnels, add more policies of the same shape without SAs.
        for i in 16_384..n {
            let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (i << 2));
            let line = format!("policy add src {a}/30 dst 198.19.0.0/30 dir out action block");
            if let Ok(Some(espd_config::Item::Policy(p))) = espd_config::parse_line(&line) {
                let _ = spd.insert(p);
            }
        }
        // Flows spread over the tunnels, hitting a policy every time.
        let flows: Vec<Flow> = (0..1024u32)
            .map(|k| {
                let i = (k * 7919) % n.min(16_384);
                let src = IpAddr::V4(Ipv4Addr::new(
                    198,
                    18,
                    (i >> 6) as u8,
                    ((i & 63) << 2) as u8 + 1,
                ));
                let dst = IpAddr::V4(Ipv4Addr::new(
                    198,
                    19,
                    (i >> 6) as u8,
                    ((i & 63) << 2) as u8 + 2,
                ));
                Flow {
                    src,
                    dst,
                    proto: 17,
                    ports: Some(Ports {
                        sport: 1000,
                        dport: 53,
                    }),
                }
            })
            .collect();
        // One lookup per packet: lookups per second.
        g.throughput(criterion::Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            let mut k = 0usize;
            b.iter(|| {
                k = (k + 1) & 1023;
                assert!(spd.lookup(Direction::Out, black_box(&flows[k])).is_some());
            })
        });
    }
    g.finish();
}

/// The whole per-packet cost: classify, SPD, SAD and encapsulate 64-octet
/// packets spread over 10 or 10 000 tunnels.
fn per_packet(c: &mut Criterion) {
    use espd_core::engine::{Engine, Verdict};
    use espd_core::PacketBuf;
    let mut g = c.benchmark_group("engine encapsulate 64 B over N tunnels");
    for n in [10u32, 10_000] {
        let cfg = Config::parse("t", &tunnels(n)).unwrap();
        let mut e = Engine::new(cfg.sad, cfg.spd, &[]);
        let pkts: Vec<Vec<u8>> = (0..1024u32)
            .map(|k| {
                let i = (k * 7919) % n;
                let mut p = vec![0u8; 64];
                p[..20].copy_from_slice(&[
                    0x45,
                    0,
                    0,
                    64,
                    0,
                    1,
                    0x40,
                    0,
                    64,
                    17,
                    0,
                    0,
                    198,
                    18,
                    (i >> 6) as u8,
                    ((i & 63) << 2) as u8 + 1,
                    198,
                    19,
                    (i >> 6) as u8,
                    ((i & 63) << 2) as u8 + 2,
                ]);
                espd_core::wire::ipv4::Packet::new_unchecked(&mut p[..]).fill_checksum();
                p
            })
            .collect();
        let mut buf = vec![0u8; 512];
        // One lookup per packet: lookups per second.
        g.throughput(criterion::Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            let mut k = 0usize;
            b.iter(|| {
                k = (k + 1) & 1023;
                buf[128..192].copy_from_slice(&pkts[k]);
                let mut p = PacketBuf::new(&mut buf, 128, 64);
                assert!(matches!(e.process(&mut p), Verdict::Encapsulated(_)));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, load, lookup, per_packet);
criterion_main!(benches);
