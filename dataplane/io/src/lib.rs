//! espd's I/O layer, above the sans-IO core: the XDP steering program and,
//! with the live gateway, AF_XDP UMEM, rings and sockets. Everything `unsafe`
//! in espd lives in this crate (and in the eBPF program), each block with a
//! `// SAFETY:` line.

mod mapbatch;
pub mod netlink;
pub mod steer;
pub mod xfrm;
pub mod xsk;

pub use espd_common::{Counter, MAX_ENCAP_PORTS, MAX_LOCAL, MAX_SELECTORS, MAX_SPIS};
