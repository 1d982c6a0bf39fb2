//! Micro and pipeline benchmarks: the AEAD seam, the replay window, header
//! parsing and the whole engine (encapsulate on gw1, decapsulate on gw2).
//! Sizes are inner IP packet sizes in octets; throughput is in bytes of them.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use espd_config::Config;
use espd_core::crypto::gcm::AesGcm;
use espd_core::engine::{parse_ip, Engine, Verdict};
use espd_core::state::ReplayWindow;
use espd_core::PacketBuf;

const SIZES: [usize; 3] = [64, 512, 1420];

fn aead(c: &mut Criterion) {
    let mut g = c.benchmark_group("aes-gcm-128 seal+open");
    let k = AesGcm::new(&[7u8; 20], 16).unwrap();
    for n in SIZES {
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            let mut data = vec![0u8; n];
            let mut icv = [0u8; 16];
            let mut seq = 0u64;
            b.iter(|| {
                seq += 1;
                let iv = seq.to_be_bytes();
                k.seal(&iv, &[1; 8], &mut data, &mut icv);
                k.open(&iv, &[1; 8], &mut data, &icv).unwrap();
            })
        });
    }
    g.finish();
}

fn replay(c: &mut Criterion) {
    c.bench_function("replay check+commit (in order, window 1024)", |b| {
        let mut w = ReplayWindow::new(1024, 0);
        let mut s = 0u64;
        b.iter(|| {
            s += 1;
            w.check(s).unwrap();
            w.commit(black_box(s)).unwrap();
        })
    });
}

fn parse(c: &mut Criterion) {
    let mut p = vec![0u8; 1420];
    p[..20].copy_from_slice(&[
        0x45, 0, 0x05, 0x8c, 0, 1, 0x40, 0, 64, 17, 0, 0, 198, 18, 1, 10, 198, 18, 2, 20,
    ]);
    let mut h = espd_core::wire::ipv4::Packet::new_unchecked(&mut p[..]);
    h.fill_checksum();
    c.bench_function("parse_ip ipv4/udp", |b| {
        b.iter(|| parse_ip(black_box(&p)).unwrap())
    });
}

const SA: &str = "state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 reqid 1 mode tunnel aead 'rfc4106(gcm(aes))' 0x0102030405060708090a0b0c0d0e0f1011121314 128\n";
const GW1: &str = "policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel";
const GW2: &str = "policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir fwd tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel";

fn pipeline(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine encap+decap (tunnel 4in4, AES-GCM-128)");
    for n in SIZES {
        let cfg1 = Config::parse("gw1", &format!("{SA}{GW1}")).unwrap();
        let cfg2 = Config::parse("gw2", &format!("{SA}{GW2}")).unwrap();
        let mut gw1 = Engine::new(cfg1.sad, cfg1.spd, &[]);
        let mut gw2 = Engine::new(cfg2.sad, cfg2.spd, &[]);
        let mut inner = vec![0u8; n];
        inner[..20].copy_from_slice(&[
            0x45,
            0,
            (n >> 8) as u8,
            n as u8,
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
            1,
            10,
            198,
            18,
            2,
            20,
        ]);
        espd_core::wire::ipv4::Packet::new_unchecked(&mut inner[..]).fill_checksum();
        let mut buf = vec![0u8; 2048];
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                buf[128..128 + n].copy_from_slice(&inner);
                let mut p = PacketBuf::new(&mut buf, 128, n);
                assert!(matches!(gw1.process(&mut p), Verdict::Encapsulated(_)));
                assert!(matches!(gw2.process(&mut p), Verdict::Decapsulated(_)));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, aead, replay, parse, pipeline);
criterion_main!(benches);
