//! SA and policy state: the SAD (RFC 4301 §4.4.2), the SPD (§4.4.1), selectors
//! and the anti-replay window (RFC 4303 §3.4.3, RFC 6479).

pub mod replay;
pub mod sa;
pub mod sad;
pub mod selector;
pub mod spd;

pub use replay::{ReplayError, ReplayWindow};
pub use sa::{
    Algs, Encap, KeyedAlg, Lifetime, Mode, Sa, SaConfig, SaCounters, SaError, SaFlags, SaId,
    SaShare,
};
pub use sad::Sad;
pub use selector::{Flow, PortRange, Prefix, Selector};
pub use spd::{Action, Direction, Level, Policy, Spd, Template};
