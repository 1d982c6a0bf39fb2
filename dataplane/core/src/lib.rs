//! espd-core: the sans-IO IPsec ESP engine.
//!
//! Packet flow, and so the module order: [`wire`] formats → [`state`] (SAD, SPD,
//! replay windows) → [`esp`] inbound and outbound processing → [`engine`], which
//! classifies a packet and runs it through the SPD and the ESP code. No sockets,
//! threads or per-packet allocation; the caller owns every buffer.
#![forbid(unsafe_code)]

pub mod buf;
pub mod crypto;
pub mod drop;
pub mod engine;
pub mod esp;
pub mod reasm;
pub mod state;
pub mod wire;

pub use buf::PacketBuf;
pub use drop::DropReason;
pub use engine::{Engine, Verdict};
