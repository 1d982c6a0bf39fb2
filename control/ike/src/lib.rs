//! espd-ike: an IKEv2 daemon (RFC 7296) for espd (docs/ike.md).
//!
//! The protocol is sans-IO ([`ike::Endpoint`]: datagrams and time in;
//! datagrams, CHILD_SA installs and timers out); [`espd`] turns CHILD_SAs
//! into espd's batches. The daemon (src/bin/espd-ike) puts them between
//! UDP sockets on 500/4500 and espd's control socket.
#![forbid(unsafe_code)]

pub mod cert;
pub mod conf;
pub mod crypto;
pub mod der;
pub mod espd;
pub mod ike;
pub mod modp;
pub mod pool;
pub mod proposal;
pub mod ts;
pub mod wire;
