//! IKEv2 message parsing (RFC 7296 §3): any bytes, no panic; what parses
//! emits again and parses to the same payloads. The DER readers that take
//! a peer's ID (DN), certificate (subjectAltName) and RFC 7427
//! AlgorithmIdentifier (RSA-PSS parameters) get the bytes too.
#![no_main]
use espd_ike::der;
use espd_ike::wire::{emit_chain, parse_chain, Header, Payload, HDR_LEN};
use libfuzzer_sys::fuzz_target;

fn der_readers(b: &[u8]) {
    if let Some(r) = der::dn_rdns(b) {
        // What parses re-encodes to a name that parses to the same text.
        let again = der::dn_rdns(&der::encode_dn(&r)).expect("our DER parses");
        assert_eq!(der::dn_text(&again), der::dn_text(&r));
    }
    let _ = der::san_emails(b);
    let _ = der::pss_params(b);
}

fuzz_target!(|data: &[u8]| {
    der_readers(data);
    let Ok(h) = Header::parse(data) else { return };
    let body = &data[HDR_LEN.min(data.len())..];
    if let Ok(c) = parse_chain(h.next, body, HDR_LEN) {
        for p in &c.payloads {
            match p {
                Payload::IdI(id) | Payload::IdR(id) => {
                    der_readers(&id.data);
                    let _ = id.to_string();
                }
                Payload::Cert { data, .. } => der_readers(data),
                Payload::Auth { data, .. } => der_readers(data.get(1..).unwrap_or_default()),
                _ => {}
            }
        }
        if c.sk.is_none() {
            let mut bytes = Vec::new();
            let first = emit_chain(&c.payloads, &mut bytes);
            let again = parse_chain(first, &bytes, HDR_LEN).expect("what we emit parses");
            assert_eq!(again.payloads.len(), c.payloads.len());
        }
    }
});
