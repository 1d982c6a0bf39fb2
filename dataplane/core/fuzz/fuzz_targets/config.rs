//! The configuration grammar: any text, no panic; errors name a line.
#![no_main]
use espd_config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = Config::parse("fuzz.conf", text) {
        for err in &e.0 {
            assert!(err.line >= 1 && err.line <= text.lines().count().max(1));
        }
    }
});
