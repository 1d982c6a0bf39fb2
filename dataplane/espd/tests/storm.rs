//! Workers and a change storm together (docs/architecture.md, "Shared
//! tables"): two worker threads encapsulate through their own tunnel while a
//! control thread publishes thousands of changes to other tunnels (SAs
//! deleted and added back with new keys, policies added and removed), each
//! an O(1) copy of the tables swapped in as the gateway does. The counters
//! must come out exact: every packet encapsulated once, in sequence, and
//! opened by the peer; nothing dropped; no number skipped or repeated; and
//! the SAs removed by the storm are freed once the workers let go.

use espd_config::Config;
use espd_core::engine::{Engine, Verdict};
use espd_core::state::{Direction, SaCore, Tables};
use espd_core::PacketBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const KEY: &str = "0x0101010101010101010101010101010101010101";

/// Tunnel `i`'s SA and its policy in direction `dir` (198.19.i.0/24 → 198.20.…/30).
fn lines(i: u32, key: &str, dir: &str) -> String {
    let peer = format!("198.18.{}.{}", 100 + i / 250, i % 250 + 1);
    format!(
        "state add src 198.18.0.1 dst {peer} proto esp spi {:#x} reqid {} mode tunnel replay-window 4096 aead 'rfc4106(gcm(aes))' {key} 128\n\
         policy add src 198.19.{}.0/24 dst 198.20.{}.{}/30 dir {dir} tmpl src 198.18.0.1 dst {peer} proto esp reqid {} mode tunnel\n",
        0x3000 + i,
        i + 10,
        i % 200,
        (i >> 6) & 255,
        (i & 63) << 2,
        i + 10
    )
}

fn tunnel(i: u32, key: &str) -> String {
    lines(i, key, "out")
}

/// The peer's view of tunnel `i`: the inbound SA and a fwd policy.
fn peer(i: u32) -> Engine {
    let p = format!("198.18.{}.{}", 100 + i / 250, i % 250 + 1);
    let c = Config::parse("peer", &lines(i, KEY, "fwd")).unwrap();
    Engine::new(c.sad, c.spd, &[p.parse().unwrap()])
}

fn udp(src: [u8; 4], dst: [u8; 4], n: u64) -> Vec<u8> {
    let mut p = vec![0u8; 20 + 8 + 8];
    p[0] = 0x45;
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let c = !espd_core::wire::checksum::sum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&1000u16.to_be_bytes());
    p[22..24].copy_from_slice(&2000u16.to_be_bytes());
    p[24..26].copy_from_slice(&16u16.to_be_bytes());
    p[28..36].copy_from_slice(&n.to_be_bytes());
    p
}

#[test]
fn workers_and_a_change_storm_give_exact_counters() {
    const OTHERS: u32 = 2000;
    // At least this many packets each, and on until the storm is over.
    const PACKETS: u64 = 20_000;
    const CHANGES: u32 = 3000;
    let mut text: String = (0..OTHERS + 2).map(|i| tunnel(i, KEY)).collect();
    text.push('\n');
    let c = Config::parse("storm", &text).unwrap();
    let tables = Tables::new(c.sad, c.spd, &["198.18.0.1".parse().unwrap()]);
    let shared = Arc::new(arc_swap::ArcSwap::from_pointee(tables.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let retired = Arc::new(Mutex::new(Vec::new()));
    // The storm starts once both workers run (else, on a loaded machine, it
    // can be over before they see it).
    let start = Arc::new(std::sync::Barrier::new(3));
    // The storm: other tunnels' SAs go and come back with new keys, and
    // their policies go and come back, one published change at a time.
    let storm = {
        let (shared, stop, retired, start) = (
            Arc::clone(&shared),
            Arc::clone(&stop),
            Arc::clone(&retired),
            Arc::clone(&start),
        );
        std::thread::spawn(move || {
            start.wait();
            let mut t = tables;
            let mut n = 0u32;
            let mut weak = Vec::new();
            while n < CHANGES {
                let i = 2 + n % OTHERS;
                let key = format!("0x{:040x}", u128::from(n) + 7);
                let c = Config::parse("x", &tunnel(i, &key)).unwrap();
                let sa = c.sad.iter().next().unwrap().cfg.clone();
                let pol = c.spd.policies(Direction::Out)[0].clone();
                let (_, old) = t.remove_sa(sa.dst, sa.spi).unwrap();
                if weak.len() < 100 {
                    weak.push(Arc::downgrade(&old));
                }
                drop(old);
                t.insert_sa(SaCore::new(sa).unwrap()).unwrap();
                t.remove_policy(Direction::Out, &pol.sel).unwrap();
                t.insert_policy(pol).unwrap();
                shared.store(Arc::new(t.clone()));
                n += 1;
                // What the workers retired is freed here, off their time.
                retired.lock().unwrap().clear();
            }
            stop.store(true, Ordering::Relaxed);
            (n, weak)
        })
    };
    let workers: Vec<_> = (0..2u32)
        .map(|w| {
            let (shared, retired, stop, start) = (
                Arc::clone(&shared),
                Arc::clone(&retired),
                Arc::clone(&stop),
                Arc::clone(&start),
            );
            std::thread::spawn(move || {
                start.wait();
                let mut e = Engine::with_tables(shared.load_full());
                e.set_shared(true);
                e.set_worker(w);
                e.set_router(true);
                let mut rx = peer(w);
                rx.set_router(true);
                let mut buf = vec![0u8; 512];
                let (mut seqs, mut switches) = (Vec::with_capacity(PACKETS as usize), 0u64);
                let mut n = 0u64;
                while n < PACKETS || !stop.load(Ordering::Relaxed) {
                    let cur = shared.load();
                    if !Arc::ptr_eq(&cur, e.tables()) {
                        let old = e.set_tables(arc_swap::Guard::into_inner(cur));
                        retired.lock().unwrap().push((old, e.take_retired()));
                        switches += 1;
                    }
                    // Worker w's own tunnel: 198.19.w.0/24 → 198.20.0.(4w)/30.
                    let p = udp([198, 19, w as u8, 10], [198, 20, 0, 4 * w as u8 + 1], n);
                    buf[128..128 + p.len()].copy_from_slice(&p);
                    let mut b = PacketBuf::new(&mut buf, 128, p.len());
                    assert!(
                        matches!(e.process(&mut b), Verdict::Encapsulated(_)),
                        "packet {n}"
                    );
                    let d = b.data();
                    seqs.push(u32::from_be_bytes(d[24..28].try_into().unwrap()));
                    assert!(
                        matches!(rx.process(&mut b), Verdict::Decapsulated(_)),
                        "packet {n}"
                    );
                    assert_eq!(&b.data()[28..36], &n.to_be_bytes());
                    n += 1;
                }
                let id = e
                    .tables()
                    .sad()
                    .lookup_in(format!("198.18.100.{}", w + 1).parse().unwrap(), 0x3000 + w);
                let oseq = id.and_then(|id| e.sa_state(id)).map(|s| s.oseq());
                (
                    e.counters().clone(),
                    rx.counters().clone(),
                    seqs,
                    switches,
                    oseq,
                    n,
                )
            })
        })
        .collect();
    let results: Vec<_> = workers.into_iter().map(|h| h.join().unwrap()).collect();
    let (changes, weak) = storm.join().unwrap();
    assert_eq!(changes, CHANGES);
    for (tx, rx, seqs, switches, oseq, sent) in results {
        assert!(sent >= PACKETS);
        assert_eq!((tx.encapsulated, tx.dropped), (sent, 0));
        assert_eq!((rx.decapsulated, rx.dropped), (sent, 0));
        // In order, none skipped, none twice, across every table switch.
        assert!(
            seqs.iter().zip(1..).all(|(s, i)| *s == i),
            "sequence numbers"
        );
        assert_eq!(oseq, Some(sent));
        // The workers ran through the storm (they go on until it is over).
        assert!(switches > 10, "{switches} table switches seen");
    }
    // The storm's removed SAs were freed once every engine and snapshot let go.
    drop(shared);
    retired.lock().unwrap().clear();
    assert!(
        weak.iter().all(|w| w.upgrade().is_none()),
        "a removed SA's core is still held"
    );
}
