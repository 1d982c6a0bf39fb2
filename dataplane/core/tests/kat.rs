//! Known-answer tests on whole ESP packets: the AES-GCM vectors of
//! draft-mcgrew-gcm-test-01 as carried (with sequence number 1 and corrected
//! L4 checksums) in DPDK's app/test/test_cryptodev_security_ipsec_test_vectors.h:
//! `pkt_aes_128_gcm`, `pkt_aes_256_gcm` (tunnel 4in4) and `pkt_aes_256_gcm_v6`
//! (tunnel 6in6). Outbound must produce the vector's ESP octets exactly (the
//! outer IP header's ID/TTL/DF are local choices); inbound must give back the
//! inner packet exactly.

use espd_core::engine::parse_ip;
use espd_core::esp::inbound::{decapsulate, Decap};
use espd_core::esp::outbound::{encapsulate, OutParams};
use espd_core::state::{Algs, Mode, Sa, SaConfig, SaFlags};
use espd_core::PacketBuf;
use std::net::IpAddr;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

struct Vector {
    name: &'static str,
    key: &'static str,
    salt: &'static str,
    iv: &'static str,
    spi: u32,
    input: &'static str,
    output: &'static str,
}

const VECTORS: &[Vector] = &[
    Vector {
        name: "pkt_aes_128_gcm",
        key: "feffe9928665731c6d6a8f9467308308",
        salt: "cafebabe",
        iv: "facedbaddecaf888",
        spi: 0xa5f8,
        input: "4500003e698f000080114dccc0a80102c0a80101
                0a980035002a2343b2d001000001000000000000037369700963796265726369747902646b0000010001",
        output: "45000074698f000080324d75c0a80102c0a80101
                 0000a5f800000001 facedbaddecaf888
                 deb22cd9b07c72c16e3a65beeb8df304a5a5897d33ae530f1ba76d5d114d2a5c
                 3de81827c10e9a4f51330d0eec416642cfbb85a5b47e48a4ec3b9ba95d918bd4
                 29c737579ff19e58cffc607a3bce8994",
    },
    Vector {
        name: "pkt_aes_256_gcm",
        key: "abbccddef00112233445566778899aababbccddef00112233445566778899aab",
        salt: "11223344",
        iv: "0102030405060708",
        spi: 0x4a2cbfe3,
        input: "4500003069a6400080062690c0a80102938915 5e
                0a9e008b2dc57ee000000000700240 0020bf0000020405b401010402",
        output: "45000068698f000080324d81c0a80102c0a80101
                 4a2cbfe300000001 0102030405060708
                 ff425c9b724599df7a3bcd510194e00d6a78107f1b0b1cbf06efae9d65a5d763
                 748a637985771d347f0545659f14e99def842d8b00144a1fec6adf0c9a927fee
                 a6c51160",
    },
    Vector {
        name: "pkt_aes_256_gcm_v6",
        key: "de12be56deadbeefdeadbeefdeadbeef1278be3401020307aabbccf108070605",
        salt: "11223344",
        iv: "45adfe2378561200",
        spi: 52,
        input: "6000000000200638 2607f8b0400c0c03000000000000001a 20010470e5bfdead49572174e82c4887
                0019f9c79563979c03a0883180 12a7d625830000020405 6a0101040201030307",
        output: "60000000006c3240 1234122117451134 11fc8971df225678 1234122117451134 11fc8971df223456
                 0000003400000001 45adfe2378561200
                 e7dfc47e21bdec1b745ae47e2e94210a9b0e59be062adab86b487f0b883aa9fd
                 3cfe9fb18c67d2f8afb5ad16dbff8d50d348f56c3c0c27342b65c8ffeb5fb8ff
                 12001c9fb785dd7d4019cb18eb15c488e1c291c7b165c32716068ff2",
    },
];

fn outer_addrs(out: &[u8]) -> (IpAddr, IpAddr) {
    if out[0] >> 4 == 4 {
        let a = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&out[o..o + 4]).unwrap());
        (a(12), a(16))
    } else {
        let a = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&out[o..o + 16]).unwrap());
        (a(8), a(24))
    }
}

fn sa_for(v: &Vector, out: &[u8]) -> Sa {
    let (src, dst) = outer_addrs(out);
    let mut key = hex(v.key);
    key.extend(hex(v.salt));
    let iv = u64::from_be_bytes(hex(v.iv).try_into().unwrap());
    Sa::new(SaConfig {
        src,
        dst,
        spi: v.spi,
        reqid: 1,
        mode: Mode::Tunnel,
        replay_window: 64,
        flags: SaFlags::default(),
        replay_seq: 0,
        replay_oseq: 0,
        algs: Algs::aead("rfc4106(gcm(aes))", key, 128),
        sel: None,
        encap: None,
        // The first packet has sequence number 1: make its IV the vector's.
        iv_mask: iv ^ 1,
        lifetime: Default::default(),
    })
    .unwrap()
}

#[test]
fn outbound_matches_published_esp_octets() {
    for v in VECTORS {
        let (input, want) = (hex(v.input), hex(v.output));
        let mut sa = sa_for(v, &want);
        let mut buf = vec![0u8; 512];
        buf[128..128 + input.len()].copy_from_slice(&input);
        let mut pkt = PacketBuf::new(&mut buf, 128, input.len());
        let (l3, _, _) = parse_ip(pkt.data()).unwrap();
        encapsulate(&mut sa, &mut pkt, &l3, &OutParams::default()).unwrap();
        let got = pkt.data();
        assert_eq!(got.len(), want.len(), "{}", v.name);
        let hl = if want[0] >> 4 == 4 { 20 } else { 40 };
        assert_eq!(
            got[hl..],
            want[hl..],
            "{}: ESP header, IV, ciphertext and ICV",
            v.name
        );
        // The outer header: same addresses, protocol and length.
        assert_eq!(outer_addrs(got), outer_addrs(&want), "{}", v.name);
        if hl == 20 {
            assert_eq!(got[9], 50);
            assert_eq!(got[2..4], want[2..4]);
        } else {
            assert_eq!(got[6], 50);
            assert_eq!(got[4..6], want[4..6]);
        }
        assert_eq!(sa.oseq(), 1);
    }
}

#[test]
fn inbound_recovers_published_inner_packet() {
    for v in VECTORS {
        let (want, esp) = (hex(v.input), hex(v.output));
        let mut sa = sa_for(v, &esp);
        let mut buf = esp.clone();
        let mut pkt = PacketBuf::new(&mut buf, 0, esp.len());
        let (l3, _, _) = parse_ip(pkt.data()).unwrap();
        assert_eq!(
            decapsulate(&mut sa, &mut pkt, &l3),
            Ok(Decap::Packet),
            "{}",
            v.name
        );
        assert_eq!(pkt.data(), &want[..], "{}", v.name);
        assert_eq!(sa.replay().top(), 1);
        // The same packet again is a replay, and a flipped bit anywhere in the
        // ciphertext or ICV fails the ICV — with the window untouched.
        let mut again = esp.clone();
        let mut p2 = PacketBuf::new(&mut again, 0, esp.len());
        assert_eq!(
            decapsulate(&mut sa, &mut p2, &l3),
            Err(espd_core::DropReason::Replay)
        );
        let mut fresh = sa_for(v, &esp);
        for i in (l3.upper_at + 16)..esp.len() {
            let mut bad = esp.clone();
            bad[i] ^= 1;
            let mut p3 = PacketBuf::new(&mut bad, 0, esp.len());
            assert_eq!(
                decapsulate(&mut fresh, &mut p3, &l3),
                Err(espd_core::DropReason::IcvMismatch),
                "{} byte {i}",
                v.name
            );
        }
        assert_eq!(fresh.replay().top(), 0);
    }
}
