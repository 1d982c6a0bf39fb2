//! No input can panic the engine, and every packet ends in exactly one counted
//! verdict. Random bytes, random headers with random tails, and every
//! single-byte mutation and truncation of valid ESP packets.

mod common;
use common::*;
use espd_config::Config;
use espd_core::engine::{Engine, Verdict};
use espd_core::{DropReason, PacketBuf};

const CONF_GW1: &str = "
state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 reqid 1 mode tunnel aead 'rfc4106(gcm(aes))' 0x0101010101010101010101010101010101010101 128
state add src 198.18.0.2 dst 198.18.0.1 proto esp spi 0x2000 reqid 2 mode tunnel flag esn aead 'rfc4106(gcm(aes))' 0x020202020202020202020202020202020202020202020202020202020202020202020202 64
state add src 2001:db8::2 dst 2001:db8::1 proto esp spi 0x3000 reqid 3 mode transport aead 'rfc4106(gcm(aes))' 0x0303030303030303030303030303030303030303 96
policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel
policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir fwd tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
policy add src 2001:db8::2 dst 2001:db8::1 dir in tmpl proto esp reqid 3 mode transport
state add src 198.18.0.3 dst 198.18.0.1 proto esp spi 0x4000 reqid 4 mode tunnel flag esn enc 'cbc(aes)' 0x0404040404040404040404040404040404040404040404040404040404040404 auth-trunc 'hmac(sha256)' 0x4444444444444444444444444444444444444444444444444444444444444444 128
state add src 198.18.0.4 dst 198.18.0.1 proto esp spi 0x5000 reqid 5 mode tunnel aead 'rfc7539esp(chacha20,poly1305)' 0x050505050505050505050505050505050505050505050505050505050505050505050505 128
state add src 198.18.0.5 dst 198.18.0.1 proto esp spi 0x6000 reqid 6 mode tunnel aead 'rfc4543(gcm(aes))' 0x0606060606060606060606060606060606060606 128
state add src 198.18.0.6 dst 198.18.0.1 proto esp spi 0x7000 reqid 7 mode tunnel enc 'ecb(cipher_null)' '' auth-trunc 'hmac(sha256)' 0x7777777777777777777777777777777777777777777777777777777777777777 128
policy add src 198.18.3.0/24 dst 198.18.1.0/24 dir fwd tmpl src 198.18.0.3 dst 198.18.0.1 proto esp reqid 4 mode tunnel
policy add src 198.18.4.0/24 dst 198.18.1.0/24 dir fwd tmpl src 198.18.0.4 dst 198.18.0.1 proto esp reqid 5 mode tunnel
policy add src 198.18.5.0/24 dst 198.18.1.0/24 dir fwd tmpl src 198.18.0.5 dst 198.18.0.1 proto esp reqid 6 mode tunnel
policy add src 198.18.6.0/24 dst 198.18.1.0/24 dir fwd tmpl src 198.18.0.6 dst 198.18.0.1 proto esp reqid 7 mode tunnel
";
const CONF_GW2: &str = "
state add src 198.18.0.2 dst 198.18.0.1 proto esp spi 0x2000 reqid 2 mode tunnel flag esn aead 'rfc4106(gcm(aes))' 0x020202020202020202020202020202020202020202020202020202020202020202020202 64
state add src 2001:db8::2 dst 2001:db8::1 proto esp spi 0x3000 reqid 3 mode transport aead 'rfc4106(gcm(aes))' 0x0303030303030303030303030303030303030303 96
policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir out tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
policy add src 2001:db8::2 dst 2001:db8::1 dir out tmpl proto esp reqid 3 mode transport
state add src 198.18.0.3 dst 198.18.0.1 proto esp spi 0x4000 reqid 4 mode tunnel flag esn enc 'cbc(aes)' 0x0404040404040404040404040404040404040404040404040404040404040404 auth-trunc 'hmac(sha256)' 0x4444444444444444444444444444444444444444444444444444444444444444 128
state add src 198.18.0.4 dst 198.18.0.1 proto esp spi 0x5000 reqid 5 mode tunnel aead 'rfc7539esp(chacha20,poly1305)' 0x050505050505050505050505050505050505050505050505050505050505050505050505 128
state add src 198.18.0.5 dst 198.18.0.1 proto esp spi 0x6000 reqid 6 mode tunnel aead 'rfc4543(gcm(aes))' 0x0606060606060606060606060606060606060606 128
state add src 198.18.0.6 dst 198.18.0.1 proto esp spi 0x7000 reqid 7 mode tunnel enc 'ecb(cipher_null)' '' auth-trunc 'hmac(sha256)' 0x7777777777777777777777777777777777777777777777777777777777777777 128
policy add src 198.18.3.0/24 dst 198.18.1.0/24 dir out tmpl src 198.18.0.3 dst 198.18.0.1 proto esp reqid 4 mode tunnel
policy add src 198.18.4.0/24 dst 198.18.1.0/24 dir out tmpl src 198.18.0.4 dst 198.18.0.1 proto esp reqid 5 mode tunnel
policy add src 198.18.5.0/24 dst 198.18.1.0/24 dir out tmpl src 198.18.0.5 dst 198.18.0.1 proto esp reqid 6 mode tunnel
policy add src 198.18.6.0/24 dst 198.18.1.0/24 dir out tmpl src 198.18.0.6 dst 198.18.0.1 proto esp reqid 7 mode tunnel
";

fn engine(t: &str) -> Engine {
    let c = Config::parse("t", t).unwrap();
    Engine::new(c.sad, c.spd, &[])
}

fn total(e: &Engine) -> u64 {
    let c = &e.counters();
    let drops: u64 = c.drops.iter().sum();
    assert_eq!(drops, c.dropped, "every drop has exactly one reason");
    c.encapsulated + c.decapsulated + c.bypass + c.dummy + c.dropped
}

fn feed(e: &mut Engine, pkt: &[u8], buf: &mut [u8]) -> Verdict {
    let n = pkt.len().min(buf.len() - 256);
    buf[128..128 + n].copy_from_slice(&pkt[..n]);
    let mut p = PacketBuf::new(buf, 128, n);
    let v = e.process(&mut p);
    assert!(p.len() <= buf.len());
    v
}

fn ipv6_udp(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    let u = udp(1, 2, payload);
    let mut b = vec![0u8; 40];
    b[0] = 0x60;
    b[4..6].copy_from_slice(&(u.len() as u16).to_be_bytes());
    b[6] = 17;
    b[7] = 64;
    b[8..24].copy_from_slice(&src.parse::<std::net::Ipv6Addr>().unwrap().octets());
    b[24..40].copy_from_slice(&dst.parse::<std::net::Ipv6Addr>().unwrap().octets());
    b.extend(u);
    b
}

#[test]
fn random_bytes_never_panic() {
    let mut e = engine(CONF_GW1);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut buf = vec![0u8; 2048];
    let n = 300_000u64;
    for i in 0..n {
        let len = rng.below(if i % 7 == 0 { 1600 } else { 120 }) as usize;
        let mut p: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        // Bias towards headers that get past the first checks.
        if len >= 40 && i % 2 == 0 {
            let v6 = i % 4 == 0;
            p[0] = if v6 { 0x60 } else { 0x45 };
            if v6 {
                p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
                p[24..40].copy_from_slice(
                    &"2001:db8::1"
                        .parse::<std::net::Ipv6Addr>()
                        .unwrap()
                        .octets(),
                );
                if i % 8 == 0 {
                    p[6] = 50;
                }
            } else {
                p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                p[6] &= 0x40;
                p[7] = 0;
                p[9] = [50u8, 17, 6, 1][(i / 2 % 4) as usize];
                p[16..20].copy_from_slice(&[198, 18, 0, 1]);
                let mut h = espd_core::wire::ipv4::Packet::new_unchecked(&mut p[..]);
                h.fill_checksum();
            }
        }
        feed(&mut e, &p, &mut buf);
    }
    assert_eq!(total(&e), n);
}

#[test]
fn mutated_esp_never_panics_and_never_passes() {
    let mut gw1 = engine(CONF_GW1);
    let mut gw2 = engine(CONF_GW2);
    // Outer-header mutations may legitimately pass; they go to their own engine
    // so that gw1's replay windows see only packets that must all be refused.
    let mut gw1_hdr = engine(CONF_GW1);
    let mut buf = vec![0u8; 2048];
    let mut valid = Vec::new();
    // Every algorithm: GCM-256/64 (site 2), CBC+HMAC with ESN (3), ChaCha (4),
    // GMAC (5), NULL+HMAC (6), and GCM-128/96 in IPv6 transport mode.
    for i in 0..36usize {
        let inner = match i % 6 {
            5 => ipv6_udp("2001:db8::2", "2001:db8::1", &vec![i as u8; i * 3]),
            site => udp4(
                &format!("198.18.{}.20", site + 2),
                "198.18.1.10",
                1000 + i as u16,
            ),
        };
        let mut b2 = vec![0u8; 2048];
        b2[128..128 + inner.len()].copy_from_slice(&inner);
        let mut p = PacketBuf::new(&mut b2, 128, inner.len());
        assert!(matches!(gw2.process(&mut p), Verdict::Encapsulated(_)));
        valid.push((p.data().to_vec(), inner));
    }
    let before = total(&gw1);
    let mut fed = 0u64;
    for (esp, _) in &valid {
        for at in 0..esp.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut m = esp.clone();
                m[at] ^= flip;
                // Any change from the SPI to the ICV must be refused. The outer
                // IP header is not covered by ESP (RFC 4303 §3.1), so changes
                // there (TOS, TTL, flow label) may pass: they must only not panic.
                let esp_at = if esp[0] >> 4 == 4 { 20 } else { 40 };
                if at < esp_at {
                    feed(&mut gw1_hdr, &m, &mut buf);
                    continue;
                }
                let v = feed(&mut gw1, &m, &mut buf);
                fed += 1;
                assert!(
                    !matches!(v, Verdict::Decapsulated(_) | Verdict::Dummy(_)),
                    "byte {at} ^ {flip:#x} accepted: {v:?}"
                );
            }
        }
        for cut in 0..esp.len() {
            let v = feed(&mut gw1, &esp[..cut], &mut buf);
            fed += 1;
            assert!(
                !matches!(v, Verdict::Decapsulated(_)),
                "cut at {cut} accepted"
            );
        }
    }
    assert_eq!(total(&gw1) - before, fed);
    // None of that moved a replay window: every genuine packet still decapsulates.
    for (esp, inner) in &valid {
        let mut b = vec![0u8; 2048];
        b[128..128 + esp.len()].copy_from_slice(esp);
        let mut p = PacketBuf::new(&mut b, 128, esp.len());
        let v = gw1.process(&mut p);
        assert!(matches!(v, Verdict::Decapsulated(_)), "{v:?}");
        assert_eq!(p.data(), &inner[..]);
    }
    assert!(gw1.counters().drops[DropReason::IcvMismatch as usize] > 0);
}
