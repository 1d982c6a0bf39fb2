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

/// One AEAD behind a common face: seal then open in place, 8-octet AAD.
trait Provider {
    fn round(&self, iv: [u8; 8], data: &mut [u8]);
}

struct Seam(AesGcm);
impl Provider for Seam {
    fn round(&self, iv: [u8; 8], data: &mut [u8]) {
        let mut icv = [0u8; 16];
        self.0.seal(&iv, &[1; 8], data, &mut icv);
        self.0.open(&iv, &[1; 8], data, &icv).unwrap();
    }
}

struct Chacha(espd_core::crypto::chacha::ChaChaPoly);
impl Provider for Chacha {
    fn round(&self, iv: [u8; 8], data: &mut [u8]) {
        let mut icv = [0u8; 16];
        self.0.seal(&iv, &[1; 8], data, &mut icv);
        self.0.open(&iv, &[1; 8], data, &icv).unwrap();
    }
}

/// RustCrypto's packaged `aes-gcm` 0.10, for comparison only.
struct Packaged(aes_gcm::Aes128Gcm);
impl Provider for Packaged {
    fn round(&self, iv: [u8; 8], data: &mut [u8]) {
        use aes_gcm::aead::AeadInPlace;
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&iv);
        let n = aes_gcm::Nonce::from(n);
        let tag = self.0.encrypt_in_place_detached(&n, &[1; 8], data).unwrap();
        self.0
            .decrypt_in_place_detached(&n, &[1; 8], data, &tag)
            .unwrap();
    }
}

/// AWS-LC through `aws-lc-rs`, for comparison only.
struct AwsLc(aws_lc_rs::aead::LessSafeKey);
impl Provider for AwsLc {
    fn round(&self, iv: [u8; 8], data: &mut [u8]) {
        use aws_lc_rs::aead::{Aad, Nonce};
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&iv);
        let tag = self
            .0
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::from([1u8; 8]), data)
            .unwrap();
        self.0
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(n),
                Aad::from([1u8; 8]),
                tag.as_ref(),
                data,
            )
            .unwrap();
    }
}

/// IMIX by packet count 7:4:1 of 64, 576 and 1500 octets (the classic
/// simple IMIX); one iteration is the twelve packets.
const IMIX: [(usize, usize); 3] = [(64, 7), (576, 4), (1500, 1)];
const IMIX_BYTES: usize = 64 * 7 + 576 * 4 + 1500;

fn aead(c: &mut Criterion) {
    use aes_gcm::KeyInit;
    let providers: Vec<(&str, Box<dyn Provider>)> = vec![
        (
            "ring (espd default, 16-octet ICV)",
            Box::new(Seam(AesGcm::new(&[7u8; 20], 16).unwrap())),
        ),
        (
            "composition aes+ctr+ghash",
            Box::new(Seam(AesGcm::new_composition(&[7u8; 20], 16).unwrap())),
        ),
        (
            "aes-gcm 0.10 (RustCrypto)",
            Box::new(Packaged(aes_gcm::Aes128Gcm::new(&[7u8; 16].into()))),
        ),
        (
            "aws-lc-rs 1.x (AWS-LC)",
            Box::new(AwsLc(aws_lc_rs::aead::LessSafeKey::new(
                aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_128_GCM, &[7u8; 16])
                    .unwrap(),
            ))),
        ),
        (
            "chacha20poly1305 (RFC 7634)",
            Box::new(Chacha(
                espd_core::crypto::chacha::ChaChaPoly::new(&[7u8; 36]).unwrap(),
            )),
        ),
    ];
    for (name, p) in &providers {
        let mut g = c.benchmark_group(format!("aead seal+open: {name}"));
        g.warm_up_time(std::time::Duration::from_millis(500));
        g.measurement_time(std::time::Duration::from_secs(2));
        for n in SIZES {
            g.throughput(Throughput::Bytes(n as u64));
            g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
                let mut data = vec![0u8; n];
                let mut seq = 0u64;
                b.iter(|| {
                    seq += 1;
                    p.round(seq.to_be_bytes(), black_box(&mut data));
                })
            });
        }
        g.throughput(Throughput::Bytes(IMIX_BYTES as u64));
        g.bench_function("imix", |b| {
            let mut data = vec![0u8; 1500];
            let mut seq = 0u64;
            b.iter(|| {
                for (len, count) in IMIX {
                    for _ in 0..count {
                        seq += 1;
                        p.round(seq.to_be_bytes(), black_box(&mut data[..len]));
                    }
                }
            })
        });
        g.finish();
    }
}

/// The replay window (RFC 4303 §3.4.3): check and commit per packet, in
/// order and with the reordering multi-queue NICs and ECMP cause (each
/// group of 64 arrives in a shuffled order). Packets per second.
fn replay(c: &mut Criterion) {
    let mut g = c.benchmark_group("replay window check+commit");
    g.throughput(Throughput::Elements(1));
    for size in [64u32, 1024, 4096] {
        g.bench_with_input(BenchmarkId::new("in order", size), &size, |b, &size| {
            let mut w = ReplayWindow::new(size, 0);
            let mut s = 0u64;
            b.iter(|| {
                s += 1;
                w.check(s).unwrap();
                w.commit(black_box(s)).unwrap();
            })
        });
    }
    // A fixed permutation of 0..64 (multiplying by an odd number mod 64).
    let order: Vec<u64> = (0..64u64).map(|i| (i * 37) % 64).collect();
    g.bench_function(BenchmarkId::new("reordered within 64", 1024), |b| {
        let mut w = ReplayWindow::new(1024, 0);
        let (mut base, mut k) = (0u64, 0usize);
        b.iter(|| {
            let s = base + 1 + order[k];
            w.check(s).unwrap();
            w.commit(black_box(s)).unwrap();
            k += 1;
            if k == 64 {
                (base, k) = (base + 64, 0);
            }
        })
    });
    g.finish();
}

fn parse(c: &mut Criterion) {
    let mut p = vec![0u8; 1420];
    p[..20].copy_from_slice(&[
        0x45, 0, 0x05, 0x8c, 0, 1, 0x40, 0, 64, 17, 0, 0, 198, 18, 1, 10, 198, 18, 2, 20,
    ]);
    let mut h = espd_core::wire::ipv4::Packet::new_unchecked(&mut p[..]);
    h.fill_checksum();
    // Header checks and selector fields of one packet: packets per second.
    let mut g = c.benchmark_group("wire parsing");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_ip ipv4/udp", |b| {
        b.iter(|| parse_ip(black_box(&p)).unwrap())
    });
    g.finish();
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
        g.bench_with_input(BenchmarkId::new("one by one", n), &n, |b, &n| {
            b.iter(|| {
                buf[128..128 + n].copy_from_slice(&inner);
                let mut p = PacketBuf::new(&mut buf, 128, n);
                assert!(matches!(gw1.process(&mut p), Verdict::Encapsulated(_)));
                assert!(matches!(gw2.process(&mut p), Verdict::Decapsulated(_)));
            })
        });
        // The whole burst pipeline, as the gateway's workers run it.
        g.throughput(Throughput::Bytes((BURST * n) as u64));
        let mut bursts = |name: &str, gw1: &mut Engine, gw2: &mut Engine| {
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                b.iter(|| {
                    let (mut b1, mut b2) = (gw1.burst(BURST), gw2.burst(BURST));
                    for _ in 0..BURST {
                        buf[128..128 + n].copy_from_slice(&inner);
                        let mut p = PacketBuf::new(&mut buf, 128, n);
                        assert!(matches!(b1.process(&mut p), Verdict::Encapsulated(_)));
                        assert!(matches!(b2.process(&mut p), Verdict::Decapsulated(_)));
                    }
                })
            });
        };
        bursts("bursts of 64", &mut gw1, &mut gw2);
        // The same with the cipher taken out: the ESP work around it alone.
        for e in [&mut gw1, &mut gw2] {
            let mut t = (**e.tables()).clone();
            let mut c = espd_core::state::SaCore::new(t.sad().get(0).cfg.clone()).unwrap();
            c.transform = espd_core::crypto::Transform::BenchNoCrypto;
            t.update_sa(c).unwrap();
            e.set_tables(std::sync::Arc::new(t));
        }
        bursts("bursts of 64, no cipher", &mut gw1, &mut gw2);
    }
    g.finish();
}

/// Packets per burst in the burst pipeline bench (the gateway's RX burst).
const BURST: usize = 64;

criterion_group!(benches, aead, replay, parse, pipeline);
criterion_main!(benches);
