//! Differential: bursts against one packet at a time. The input is a
//! sequence of packets, each a length octet and that many octets; a length
//! with its top bit set marks an inner packet that gw2 protects before gw1
//! receives it (to get past the ICV). Two identical gateway pairs (same
//! keys, same IV masks) take the same sequence, one pair packet by packet,
//! the other in one engine burst per input: verdicts and packets must be
//! the same, and stay the same as the engines' state (replay windows,
//! sequence numbers, flow caches) carries over from input to input.
#![no_main]
use espd_config::Config;
use espd_core::engine::{Engine, Verdict};
use espd_core::PacketBuf;
use libfuzzer_sys::fuzz_target;
use std::sync::Mutex;

const GW1: &str = include_str!("../seeds/gw1.conf");
const GW2: &str = include_str!("../seeds/gw2.conf");

struct Pairs {
    single: (Engine, Engine),
    burst: (Engine, Engine),
}

static PAIRS: Mutex<Option<Pairs>> = Mutex::new(None);

fn twins(t: &str) -> (Engine, Engine) {
    let c = Config::parse("fuzz", t).expect("fuzz config");
    let a = Engine::new(c.sad, c.spd, &[]);
    let c = Config::parse("fuzz", t).expect("fuzz config");
    let mut b = Engine::new(c.sad, c.spd, &[]);
    // The same SAs (one set of tables), each engine its own runtime state.
    b.set_tables(a.tables().clone());
    (a, b)
}

fn step(gw1: &mut Engine, gw2: &mut Engine, inner: bool, pkt: &[u8]) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; 256 + pkt.len() + 256];
    buf[256..256 + pkt.len()].copy_from_slice(pkt);
    let mut p = PacketBuf::new(&mut buf, 256, pkt.len());
    if inner {
        let v = gw2.process(&mut p);
        if !matches!(v, Verdict::Encapsulated(_)) {
            return (v, p.data().to_vec());
        }
    }
    let v = gw1.process(&mut p);
    (v, p.data().to_vec())
}

fuzz_target!(|data: &[u8]| {
    let mut g = PAIRS.lock().unwrap();
    let pairs = g.get_or_insert_with(|| {
        let (a1, b1) = twins(GW1);
        let (a2, b2) = twins(GW2);
        Pairs {
            single: (a1, a2),
            burst: (b1, b2),
        }
    });
    let mut pkts = Vec::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len & 0x7f).min(tail.len());
        pkts.push((len & 0x80 != 0, &tail[..n]));
        rest = &tail[n..];
    }
    let (s1, s2) = (&mut pairs.single.0, &mut pairs.single.1);
    let want: Vec<_> = pkts.iter().map(|&(i, p)| step(s1, s2, i, p)).collect();
    let (b1, b2) = (&mut pairs.burst.0, &mut pairs.burst.1);
    b1.begin_burst(pkts.len());
    b2.begin_burst(pkts.len());
    let got: Vec<_> = pkts.iter().map(|&(i, p)| step(b1, b2, i, p)).collect();
    b1.end_burst();
    b2.end_burst();
    assert_eq!(want, got);
    assert_eq!(pairs.single.0.counters().drops, pairs.burst.0.counters().drops);
    assert_eq!(
        pairs.single.0.counters().decapsulated,
        pairs.burst.0.counters().decapsulated
    );
});
