//! SA and policy state: the SAD (RFC 4301 §4.4.2), the SPD (§4.4.1), selectors
//! and the anti-replay window (RFC 4303 §3.4.3, RFC 6479).

pub mod pmap;
pub mod replay;
pub mod sa;
pub mod sad;
pub mod selector;
pub mod spd;
pub mod tables;

pub use replay::{ReplayError, ReplayWindow};
pub use sa::{
    Algs, Encap, KeyScope, KeyedAlg, Lifetime, Mode, NewSa, Sa, SaConfig, SaCore, SaCounters,
    SaError, SaFlags, SaId, SaShare,
};
pub use sad::Sad;
pub use selector::{Flow, PortRange, Prefix, Selector};
pub use spd::{Action, Direction, Level, Policy, Spd, Template};
pub use tables::Tables;

/// The persistent hash map of the shared tables' two hot lookups (the
/// SAD's (destination, SPI), the SPD's shapes): our own dense hash trie,
/// about 60 octets an entry at 100 000 entries against imbl's 195, and no
/// slower to look up.
pub use pmap::PMap;

/// The persistent map of what only the control side reads: a B-tree, about
/// 80 octets an entry at 100 000 entries (a hash trie's is three times that)
/// at the price of slower lookups, which packets never make.
pub type CMap<K, V> = imbl::OrdMap<K, V>;
