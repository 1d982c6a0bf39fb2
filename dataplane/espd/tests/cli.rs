//! `espd pcap` end to end: capture formats and link types in and out, a round
//! trip through two gateways, stats JSON, and refusal of bad configs.

mod common;
use common::*;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter};
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionBlock;
use pcap_file::pcapng::{Block, PcapNgReader, PcapNgWriter};
use pcap_file::DataLink;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const K: &str = "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223";
fn gw_conf(out_policy: bool) -> String {
    let dir = if out_policy { "out" } else { "fwd" };
    format!(
        "ip xfrm state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 reqid 1 mode tunnel aead 'rfc4106(gcm(aes))' {K} 128\n\
         ip xfrm policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir {dir} tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel\n"
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("espd-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn espd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_espd"))
        .args(args)
        .output()
        .unwrap()
}

fn pcap_run(dir: &Path, conf: &str, input: &Path, out: &Path) -> serde_json::Value {
    let c = dir.join("c.conf");
    std::fs::write(&c, conf).unwrap();
    let stats = dir.join("s.json");
    let o = espd(&[
        "pcap",
        "-q",
        "-c",
        c.to_str().unwrap(),
        "-i",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--stats-json",
        stats.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.starts_with("espd pcap: "), "summary line: {e}");
    serde_json::from_str(&std::fs::read_to_string(stats).unwrap()).unwrap()
}

fn packets() -> Vec<Vec<u8>> {
    (0..20)
        .map(|i| udp4("198.18.1.10", "198.18.2.20", 1000 + i))
        .collect()
}

fn eth(ip: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    f.extend_from_slice(ip);
    f
}

fn write_pcap(path: &Path, dl: DataLink, frames: &[Vec<u8>]) {
    let h = PcapHeader {
        datalink: dl,
        ..Default::default()
    };
    let mut w = PcapWriter::with_header(std::fs::File::create(path).unwrap(), h).unwrap();
    for (i, f) in frames.iter().enumerate() {
        w.write_packet(&PcapPacket::new(
            Duration::from_micros(i as u64),
            f.len() as u32,
            f,
        ))
        .unwrap();
    }
}

fn read_pcap(path: &Path) -> (DataLink, Vec<Vec<u8>>) {
    let mut r = PcapReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let dl = r.header().datalink;
    let mut v = Vec::new();
    while let Some(p) = r.next_packet() {
        v.push(p.unwrap().data.into_owned());
    }
    (dl, v)
}

#[test]
fn classic_pcap_raw_and_ipv4_linktypes_round_trip() {
    for (dl, name) in [
        (DataLink::RAW, "raw"),
        (DataLink::IPV4, "ipv4"),
        (DataLink::ETHERNET, "eth"),
    ] {
        let d = tmp(name);
        let plain = packets();
        let frames: Vec<Vec<u8>> = if dl == DataLink::ETHERNET {
            plain.iter().map(|p| eth(p)).collect()
        } else {
            plain.clone()
        };
        write_pcap(&d.join("in.pcap"), dl, &frames);
        let s1 = pcap_run(&d, &gw_conf(true), &d.join("in.pcap"), &d.join("esp.pcap"));
        assert_eq!(s1["verdicts"]["encapsulated"], 20, "{name}");
        let (dl1, esp) = read_pcap(&d.join("esp.pcap"));
        assert_eq!(dl1, dl, "{name}: same link type out");
        let l2 = if dl == DataLink::ETHERNET { 14 } else { 0 };
        assert!(esp.iter().all(|p| p[l2 + 9] == 50), "{name}: ESP out");
        let s2 = pcap_run(
            &d,
            &gw_conf(false),
            &d.join("esp.pcap"),
            &d.join("back.pcap"),
        );
        assert_eq!(s2["verdicts"]["decapsulated"], 20, "{name}");
        assert_eq!(s2["sas"][0]["replay_top"], 20);
        let (_, back) = read_pcap(&d.join("back.pcap"));
        assert_eq!(back, frames, "{name}: round trip");
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn pcapng_in_pcapng_out() {
    let d = tmp("ng");
    let plain = packets();
    {
        let mut w = PcapNgWriter::new(std::fs::File::create(d.join("in.pcapng")).unwrap()).unwrap();
        w.write_pcapng_block(InterfaceDescriptionBlock::new(DataLink::ETHERNET, 0))
            .unwrap();
        for (i, p) in plain.iter().enumerate() {
            let f = eth(p);
            w.write_pcapng_block(EnhancedPacketBlock {
                interface_id: 0,
                timestamp: Duration::from_millis(i as u64),
                original_len: f.len() as u32,
                data: Cow::Borrowed(&f),
                options: vec![],
            })
            .unwrap();
        }
    }
    let s = pcap_run(
        &d,
        &gw_conf(true),
        &d.join("in.pcapng"),
        &d.join("out.pcapng"),
    );
    assert_eq!(s["verdicts"]["encapsulated"], 20);
    let mut r = PcapNgReader::new(std::fs::File::open(d.join("out.pcapng")).unwrap()).unwrap();
    let mut n = 0;
    while let Some(b) = r.next_block() {
        if let Block::EnhancedPacket(p) = b.unwrap() {
            assert_eq!(p.timestamp, Duration::from_millis(n));
            assert_eq!(
                &p.data[..12],
                &eth(&plain[0])[..12],
                "Ethernet addresses kept"
            );
            assert_eq!(p.data[14 + 9], 50);
            n += 1;
        }
    }
    assert_eq!(n, 20);
    assert_eq!(r.interfaces()[0].linktype, DataLink::ETHERNET);
    std::fs::remove_dir_all(d).ok();
}

#[test]
fn bad_config_fails_with_location_and_writes_nothing() {
    let d = tmp("bad");
    write_pcap(&d.join("in.pcap"), DataLink::RAW, &packets());
    let c = d.join("c.conf");
    std::fs::write(
        &c,
        format!(
            "{}\npolicy add src 198.18.1.0/24 dst 198.18.2.0/24 dir sideways\n",
            gw_conf(true)
        ),
    )
    .unwrap();
    let out = d.join("out.pcap");
    let o = espd(&[
        "pcap",
        "-c",
        c.to_str().unwrap(),
        "-i",
        d.join("in.pcap").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("c.conf:4: expected") || e.contains("c.conf:4: `dir` needs"),
        "{e}"
    );
    assert!(!out.exists(), "no output on a bad config");
    std::fs::remove_dir_all(d).ok();
}

#[test]
fn unsupported_linktype_is_refused_clearly() {
    let d = tmp("lt");
    write_pcap(&d.join("in.pcap"), DataLink::LINUX_SLL, &[vec![0u8; 40]]);
    let c = d.join("c.conf");
    std::fs::write(&c, gw_conf(true)).unwrap();
    let o = espd(&[
        "pcap",
        "-c",
        c.to_str().unwrap(),
        "-i",
        d.join("in.pcap").to_str().unwrap(),
        "-o",
        d.join("o.pcap").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("is not supported: use Ethernet (1), RAW (101), IPv4 (228) or IPv6 (229)"));
    std::fs::remove_dir_all(d).ok();
}
