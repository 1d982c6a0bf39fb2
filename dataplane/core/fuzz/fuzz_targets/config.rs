//! The configuration grammar: any text, no panic; errors name a line.
//! What parses is written back as `add` lines (the listings, espd_config's
//! `line`), and those parse back to the same SAs and policies.
#![no_main]
use espd_config::{line, parse_line, Config, Item};
use espd_core::state::Direction;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = match Config::parse("fuzz.conf", text) {
        Ok(c) => c,
        Err(e) => {
            for err in &e.0 {
                assert!(err.line >= 1 && err.line <= text.lines().count().max(1));
            }
            return;
        }
    };
    for sa in cfg.sad.iter() {
        let l = line::state(&sa.cfg, true);
        match parse_line(&l) {
            Ok(Some(Item::State(c))) => assert!(line::same_sa(&sa.cfg, &c), "{}", l.as_str()),
            other => panic!("{}: {other:?}", l.as_str()),
        }
    }
    for d in Direction::ALL {
        for p in cfg.spd.policies(d) {
            let l = line::policy(p);
            match parse_line(&l) {
                Ok(Some(Item::Policy(q))) => assert_eq!(format!("{q:?}"), format!("{p:?}"), "{l}"),
                other => panic!("{l}: {other:?}"),
            }
        }
    }
});
