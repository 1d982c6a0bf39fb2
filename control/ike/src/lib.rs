//! espd-ike: an IKEv2 daemon (RFC 7296) for espd (docs/ike.md).
//!
//! The protocol is sans-IO ([`ike::Endpoint`]: datagrams and time in;
//! datagrams, CHILD_SA installs and timers out). The daemon that puts it
//! between UDP sockets on 500/4500 and espd's control socket is not
//! written yet (docs/ike.md, "Status").
#![forbid(unsafe_code)]

pub mod conf;
pub mod crypto;
pub mod ike;
pub mod proposal;
pub mod ts;
pub mod wire;
