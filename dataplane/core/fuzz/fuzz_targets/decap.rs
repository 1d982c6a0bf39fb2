//! The engine end to end. First byte even: the rest is a packet arriving at
//! gw1 (ESP or not). First byte odd: the rest is an inner packet that gw2
//! protects and gw1 then receives — this gets past the ICV into trailer and
//! inner-packet parsing; what comes out must be what went in.
#![no_main]
use espd_config::Config;
use espd_core::engine::{Engine, Verdict};
use espd_core::PacketBuf;
use libfuzzer_sys::fuzz_target;
use std::sync::Mutex;

const GW1: &str = include_str!("../seeds/gw1.conf");
const GW2: &str = include_str!("../seeds/gw2.conf");

static ENGINES: Mutex<Option<(Engine, Engine)>> = Mutex::new(None);

fn engine(t: &str) -> Engine {
    let c = Config::parse("fuzz", t).expect("fuzz config");
    Engine::new(c.sad, c.spd, &[])
}

fuzz_target!(|data: &[u8]| {
    let mut g = ENGINES.lock().unwrap();
    let (gw1, gw2) = g.get_or_insert_with(|| (engine(GW1), engine(GW2)));
    let Some((&sel, pkt)) = data.split_first() else { return };
    let mut buf = vec![0u8; 256 + pkt.len() + 256];
    buf[256..256 + pkt.len()].copy_from_slice(pkt);
    let mut p = PacketBuf::new(&mut buf, 256, pkt.len());
    if sel % 2 == 0 {
        let _ = gw1.process(&mut p);
        return;
    }
    if !matches!(gw2.process(&mut p), Verdict::Encapsulated(_)) {
        return;
    }
    if let Verdict::Decapsulated(_) = gw1.process(&mut p) {
        // The inner packet comes back exactly (without any link padding).
        assert_eq!(p.data(), &pkt[..p.len()]);
    }
});
