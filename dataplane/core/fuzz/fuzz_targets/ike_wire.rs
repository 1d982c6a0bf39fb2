//! IKEv2 message parsing (RFC 7296 §3): any bytes, no panic; what parses
//! emits again and parses to the same payloads.
#![no_main]
use espd_ike::wire::{emit_chain, parse_chain, Header, HDR_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = Header::parse(data) else { return };
    let body = &data[HDR_LEN.min(data.len())..];
    if let Ok(c) = parse_chain(h.next, body, HDR_LEN) {
        if c.sk.is_none() {
            let mut bytes = Vec::new();
            let first = emit_chain(&c.payloads, &mut bytes);
            let again = parse_chain(first, &bytes, HDR_LEN).expect("what we emit parses");
            assert_eq!(again.payloads.len(), c.payloads.len());
        }
    }
});
