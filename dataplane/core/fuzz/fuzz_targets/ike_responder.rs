//! The responder fed arbitrary datagrams (a length-prefixed sequence, with
//! time passing between them): no panic, nothing installed, every datagram
//! dropped or answered.
#![no_main]
use espd_ike::conf;
use espd_ike::ike::{Endpoint, Output};
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn config() -> Arc<conf::Config> {
    static C: OnceLock<Arc<conf::Config>> = OnceLock::new();
    C.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("espd-ike-fuzz-{}.conf", std::process::id()));
        std::fs::write(
            &p,
            "connections { site { local_addrs = 198.18.0.2\n remote_addrs = %any\n \
             local { auth = psk\n id = gw2 }\n remote { auth = psk\n id = gw1 }\n \
             children { net { local_ts = 198.18.2.0/24\n remote_ts = 198.18.1.0/24 } } } }\n\
             secrets { ike-1 { id-1 = gw1\n id-2 = gw2\n secret = fuzzfuzzfuzzfuzz } }\n",
        )
        .unwrap();
        let c = conf::load(&p).expect("fuzz config loads");
        let _ = std::fs::remove_file(&p);
        Arc::new(c)
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let mut ep = Endpoint::new(config());
    let local: SocketAddr = "198.18.0.2:500".parse().unwrap();
    let remote: SocketAddr = "198.18.0.1:500".parse().unwrap();
    let mut now = Instant::now();
    let mut rest = data;
    while rest.len() >= 2 {
        let n = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        ep.handle(now, local, remote, &rest[2..2 + n]);
        rest = &rest[2 + n..];
        now += Duration::from_millis(700);
        ep.handle_timeout(now);
        while let Some(o) = ep.poll_output() {
            assert!(!matches!(o, Output::Install { .. }), "installed without authentication");
        }
    }
});
