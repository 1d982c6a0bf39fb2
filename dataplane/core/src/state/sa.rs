//! A security association: its configuration (what `ip xfrm state add` says)
//! and its runtime state (transform, counters, replay window).

use super::replay::ReplayWindow;
use super::selector::Selector;
use crate::crypto::{cbc_hmac, cbc_hmac::CbcHmac, chacha::ChaChaPoly, gcm::AesGcm, Transform};
use crate::drop::DropReason;
use core::net::IpAddr;
use core::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;
use zeroize::Zeroizing;

/// Index of an SA in the SAD.
pub type SaId = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Transport,
    Tunnel,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Transport => "transport",
            Mode::Tunnel => "tunnel",
        }
    }
}

/// One algorithm named on an `aead`, `enc` or `auth-trunc` line, with its
/// key (zeroized on drop) and its ICV / truncation length in bits (0 for `enc`).
///
/// Sized for a carrier edge's 100 000 SAs: the name is an octet that
/// indexes the names espd implements (no allocation an SA) and the key an
/// exactly sized box, so that an SA's core and its inline key schedule fit
/// one 896-octet block (docs/performance.md).
#[derive(Clone)]
pub struct KeyedAlg {
    /// Where the name is in [`NAMES`].
    name: u8,
    pub key: Zeroizing<Box<[u8]>>,
    pub bits: u32,
}

/// Every name of [`AEAD_ALGS`], [`ENC_ALGS`] and [`AUTH_ALGS`], which a
/// [`KeyedAlg`] indexes.
const NAMES: [&str; 7] = [
    AEAD_ALGS[0],
    AEAD_ALGS[1],
    AEAD_ALGS[2],
    ENC_ALGS[0],
    ENC_ALGS[1],
    ENC_ALGS[2],
    AUTH_ALGS[0],
];

/// RFC 8221 §5's AEADs as espd implements them (RFC 4106, RFC 4543, RFC 7634).
pub const AEAD_ALGS: [&str; 3] = [
    "rfc4106(gcm(aes))",
    "rfc4543(gcm(aes))",
    "rfc7539esp(chacha20,poly1305)",
];
/// RFC 8221 §5's ciphers for `enc`: AES-CBC (RFC 3602) and NULL (RFC 2410),
/// which Linux spells two ways.
pub const ENC_ALGS: [&str; 3] = ["cbc(aes)", "ecb(cipher_null)", "cipher_null"];
/// RFC 8221 §6's integrity algorithm for `auth-trunc` (RFC 4868).
pub const AUTH_ALGS: [&str; 1] = ["hmac(sha256)"];

// Why a name is refused: when its line is parsed (with file:line), and by
// `SaConfig::transform` for code that builds a configuration itself.
pub const UNSUPPORTED_AEAD: SaError = SaError("unsupported aead: expected 'rfc4106(gcm(aes))', 'rfc4543(gcm(aes))' or 'rfc7539esp(chacha20,poly1305)'");
pub const UNSUPPORTED_ENC: SaError =
    SaError("unsupported cipher: expected enc 'cbc(aes)' KEY or enc 'ecb(cipher_null)' \"\"");
pub const UNSUPPORTED_AUTH: SaError =
    SaError("unsupported integrity algorithm: expected auth-trunc 'hmac(sha256)' KEY 128");

impl KeyedAlg {
    /// `name` as spelled in `known` (one of the lists above), with its key
    /// in an exactly sized box (the vector's buffer is wiped on drop), or
    /// `unsupported` if espd does not implement it.
    pub fn new(
        name: &str,
        known: &[&'static str],
        unsupported: SaError,
        key: Zeroizing<Vec<u8>>,
        bits: u32,
    ) -> Result<Self, SaError> {
        if !known.contains(&name) {
            return Err(unsupported);
        }
        let name = NAMES
            .iter()
            .position(|n| *n == name)
            .expect("every list above is in NAMES") as u8;
        Ok(KeyedAlg {
            name,
            key: Zeroizing::new(Box::from(&key[..])),
            bits,
        })
    }

    /// The Linux crypto API name, e.g. `rfc4106(gcm(aes))` or `cbc(aes)`:
    /// one of [`AEAD_ALGS`], [`ENC_ALGS`] or [`AUTH_ALGS`].
    pub fn name(&self) -> &'static str {
        NAMES[usize::from(self.name)]
    }
}

impl core::fmt::Debug for KeyedAlg {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} <{}-octet key> {}",
            self.name(),
            self.key.len(),
            self.bits
        )
    }
}

/// The algorithms of a state: an AEAD, or a cipher plus an integrity algorithm.
#[derive(Debug, Clone, Default)]
pub struct Algs {
    pub aead: Option<KeyedAlg>,
    pub enc: Option<KeyedAlg>,
    pub auth: Option<KeyedAlg>,
}

impl Algs {
    /// An AEAD of [`AEAD_ALGS`]; panics on another name (for tests and
    /// code that names a constant; a configuration goes through
    /// [`KeyedAlg::new`]).
    pub fn aead(name: &str, key: Vec<u8>, icv_bits: u32) -> Self {
        let alg = KeyedAlg::new(
            name,
            &AEAD_ALGS,
            UNSUPPORTED_AEAD,
            Zeroizing::new(key),
            icv_bits,
        );
        Algs {
            aead: Some(alg.expect("an AEAD espd implements")),
            ..Algs::default()
        }
    }
}

/// RFC 3948 UDP encapsulation of an SA's ESP packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encap {
    /// UDP source port of packets sent through the SA (usually 4500).
    pub sport: u16,
    /// UDP destination port (usually 4500, or the port a NAT mapped it to).
    pub dport: u16,
    /// The peer's original address before NAT (NAT-OA), as `ip xfrm` takes it.
    pub oa: IpAddr,
}

/// Flags from `flag …` (XFRM state flags) that change packet processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SaFlags {
    /// RFC 4303 ESN: 64-bit sequence numbers, 32 low bits on the wire.
    pub esn: bool,
    /// No ECN propagation (RFC 6040 compatibility mode instead of normal mode).
    pub noecn: bool,
    /// On decap, copy the outer DSCP into the inner header.
    pub decap_dscp: bool,
    /// Never set DF on the outer IPv4 header.
    pub nopmtudisc: bool,
}

/// What an `ip xfrm state add` line configures.
#[derive(Debug, Clone)]
pub struct SaConfig {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub spi: u32,
    pub reqid: u32,
    pub mode: Mode,
    pub replay_window: u32,
    pub flags: SaFlags,
    /// Inbound: the highest sequence number already received (`replay-seq`, `-hi`).
    pub replay_seq: u64,
    /// Outbound: the last sequence number sent (`replay-oseq`, `-hi`); the next is +1.
    pub replay_oseq: u64,
    pub algs: Algs,
    /// The SA's own selector (`sel …`): decapsulated traffic must match it
    /// and only matching traffic is sent through it.
    pub sel: Option<Selector>,
    /// RFC 3948 UDP encapsulation (`encap espinudp SPORT DPORT OADDR`).
    pub encap: Option<Encap>,
    /// XORed into the 64-bit sequence number to make the explicit IV, as
    /// Linux's `seqiv` does: unique per packet (a bijection of a counter that
    /// never cycles) without exposing the counter. The loader picks it at random.
    pub iv_mask: u64,
    /// `limit …`: soft and hard lifetimes (RFC 4301 §4.4.2.1).
    pub lifetime: Lifetime,
}

/// SA lifetimes as `ip xfrm state add … limit` gives them; 0 = no limit.
/// Soft raises an event (time for IKE to rekey); hard ends the SA: its
/// packets are dropped as `SaExpired` and the gateway deletes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lifetime {
    /// Seconds since the SA was installed.
    pub time_soft: u64,
    pub time_hard: u64,
    /// Octets of inner packets through the SA.
    pub bytes_soft: u64,
    pub bytes_hard: u64,
    pub packets_soft: u64,
    pub packets_hard: u64,
}

impl Lifetime {
    pub fn is_unlimited(&self) -> bool {
        *self == Lifetime::default()
    }
}

impl SaConfig {
    /// Expands the keys: fails if the algorithms or keys do not fit (RFC 8221 set).
    pub fn transform(&self) -> Result<Transform, SaError> {
        if self.src.is_ipv4() != self.dst.is_ipv4() {
            return Err(SaError("src and dst must be of one address family"));
        }
        let a = &self.algs;
        match (&a.aead, &a.enc, &a.auth) {
            (Some(x), None, None) => match x.name() {
                "rfc4106(gcm(aes))" => {
                    if !matches!(x.bits, 64 | 96 | 128) {
                        return Err(SaError(
                            "rfc4106(gcm(aes)): ICV length must be 64, 96 or 128 bits",
                        ));
                    }
                    AesGcm::new(&x.key, x.bits as usize / 8).map(Transform::Gcm).map_err(|_| {
                        SaError("rfc4106(gcm(aes)): key must be 20 or 36 octets (a 16- or 32-octet AES key followed by a 4-octet salt)")
                    })
                }
                "rfc4543(gcm(aes))" => {
                    if x.bits != 128 {
                        return Err(SaError(
                            "rfc4543(gcm(aes)): the ICV is 128 bits (RFC 4543 §3.5)",
                        ));
                    }
                    AesGcm::new_gmac(&x.key, 16).map(Transform::Gmac).map_err(|_| {
                        SaError("rfc4543(gcm(aes)): key must be 20 or 36 octets (a 16- or 32-octet AES key followed by a 4-octet salt)")
                    })
                }
                "rfc7539esp(chacha20,poly1305)" => {
                    if x.bits != 128 {
                        return Err(SaError(
                            "rfc7539esp(chacha20,poly1305): the ICV is 128 bits (RFC 7634 §2)",
                        ));
                    }
                    ChaChaPoly::new(&x.key).map(Transform::ChaCha).map_err(|_| {
                        SaError("rfc7539esp(chacha20,poly1305): key must be 36 octets (a 32-octet key followed by a 4-octet salt)")
                    })
                }
                _ => Err(UNSUPPORTED_AEAD),
            },
            (Some(_), _, _) => Err(SaError(
                "`aead` cannot be combined with `enc` or `auth-trunc`",
            )),
            (None, Some(e), Some(m)) => {
                if m.name() != "hmac(sha256)" {
                    return Err(UNSUPPORTED_AUTH);
                }
                if m.bits != 128 {
                    return Err(SaError(
                        "hmac(sha256) must be truncated to 128 bits (RFC 4868 §2.3)",
                    ));
                }
                if m.key.len() != cbc_hmac::AUTH_KEY_LEN {
                    return Err(SaError(
                        "hmac(sha256) key must be 32 octets (RFC 4868 §2.1.1)",
                    ));
                }
                let enc_key = match e.name() {
                    "cbc(aes)" => {
                        if !matches!(e.key.len(), 16 | 32) {
                            return Err(SaError(
                                "cbc(aes) key must be 16 or 32 octets (AES-128 or AES-256)",
                            ));
                        }
                        Some(&e.key[..])
                    }
                    "ecb(cipher_null)" | "cipher_null" => {
                        if !e.key.is_empty() {
                            return Err(SaError("cipher_null takes an empty key: \"\""));
                        }
                        None
                    }
                    _ => return Err(UNSUPPORTED_ENC),
                };
                CbcHmac::new(enc_key, &m.key)
                    .map(|c| Transform::CbcHmac(Box::new(c)))
                    .map_err(|_| SaError("bad key length"))
            }
            (None, Some(e), None) => {
                Err(if matches!(e.name(), "ecb(cipher_null)" | "cipher_null") {
                    SaError("NULL encryption without integrity protects nothing: add auth-trunc 'hmac(sha256)' KEY 128")
                } else {
                    SaError("encryption without integrity is not allowed (RFC 8221 §5): add auth-trunc 'hmac(sha256)' KEY 128")
                })
            }
            (None, None, Some(_)) => Err(SaError(
                "integrity without `enc`: add enc 'ecb(cipher_null)' \"\" for integrity-only ESP",
            )),
            (None, None, None) => Err(SaError(
                "a state needs `aead …`, or `enc …` with `auth-trunc …`",
            )),
        }
    }
}

/// Why an SA cannot be installed: a sentence for the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaError(pub &'static str);

impl core::fmt::Display for SaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.0)
    }
}

/// Per-SA counters. Drops here are the ones attributable to this SA.
#[derive(Debug, Clone, Default)]
#[repr(C)]
pub struct SaCounters {
    pub packets: u64,
    pub bytes: u64,
    pub drops: crate::drop::DropCounts,
}

/// What one SA's engines on several workers share (see
/// docs/architecture.md): which worker owns the SA — only the owner
/// encapsulates through it (so its packets leave in sequence-number order)
/// or checks its replay window; other workers hand the packet over — and,
/// as a second line of defence, one outbound sequence counter, so no number
/// is ever used twice (RFC 4303 §3.3.3; for GCM a repeated number is a
/// repeated nonce).
///
/// One allocation for both (an SA's share is its own, shared only by the
/// engines' runtime states and a `state update`'s successor): reached as
/// `share.oseq` and `share.owner` through [`Deref`](core::ops::Deref).
#[derive(Debug, Clone)]
pub struct SaShare(Arc<Shared>);

/// The fields of an [`SaShare`].
#[derive(Debug)]
pub struct Shared {
    /// The last outbound sequence number used.
    pub oseq: AtomicU64,
    /// The worker that owns the SA; [`SaShare::NO_OWNER`] until the first
    /// worker sends through it (outbound) or authenticates a packet of it
    /// (inbound).
    pub owner: AtomicU32,
}

impl core::ops::Deref for SaShare {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl SaShare {
    pub const NO_OWNER: u32 = u32::MAX;
    pub fn new(oseq: u64) -> Self {
        SaShare(Arc::new(Shared {
            oseq: AtomicU64::new(oseq),
            owner: AtomicU32::new(Self::NO_OWNER),
        }))
    }
}

/// The part of an SA that exists once, whatever the number of workers:
/// its configuration, its expanded keys and the state the workers share.
/// Immutable once installed and reached through an `Arc`: a `state update`
/// installs a new `SaCore` under the same [`SaCore::lineage`]; the old one
/// (and its keys, zeroized) goes when the last worker lets go of it.
pub struct SaCore {
    pub cfg: SaConfig,
    pub transform: Transform,
    pub share: SaShare,
    /// Kept across `state update`: a worker's runtime state (replay window,
    /// sequence number, counters) follows the lineage, not the object.
    pub lineage: u64,
    /// When it was installed (the tables' clock, seconds), for time lifetimes.
    pub added: u64,
}

impl SaCore {
    /// Expands the keys (see [`SaConfig::transform`]).
    pub fn new(cfg: SaConfig) -> Result<Self, SaError> {
        let transform = cfg.transform()?;
        Ok(SaCore {
            share: SaShare::new(cfg.replay_oseq),
            transform,
            lineage: 0,
            added: 0,
            cfg,
        })
    }
}

/// A core built and not yet installed, in the block it will live in.
///
/// An SA's key schedule sits inline in its core (one 896-octet block; see
/// [`crate::crypto::gcm::AesGcm`]), so moving a core from one heap block to
/// another would leave a copy of its keys in the freed one. A `NewSa` is
/// built where it stays: the tables take its `Arc` as it is. It is never
/// shared until it is installed, so it can still be changed (its sequence
/// number continued, its share replaced) through `DerefMut`.
pub struct NewSa(Arc<SaCore>);

impl NewSa {
    /// Expands the keys into the core's own block, then wipes the stack the
    /// expansion used (ring builds its key schedule by value, and moves
    /// leave copies there).
    pub fn new(cfg: SaConfig) -> Result<Self, SaError> {
        let sa = Self::build(cfg);
        scrub_stack();
        sa
    }

    // Not inlined: every copy of the keys made on the way lives in this
    // frame or below it, the stack `scrub_stack` then overwrites.
    #[inline(never)]
    fn build(cfg: SaConfig) -> Result<Self, SaError> {
        Ok(NewSa(Arc::new(SaCore::new(cfg)?)))
    }

    /// Expands the keys into the core's own block and leaves the stack to
    /// `scope`, which wipes it once for the whole batch when it is dropped.
    pub fn in_scope(cfg: SaConfig, scope: &KeyScope) -> Result<Self, SaError> {
        let _ = scope;
        Self::build(cfg)
    }

    /// The core, to install: the tables' `Arc` is this block.
    pub fn into_shared(self) -> Arc<SaCore> {
        self.0
    }
}

impl core::fmt::Debug for NewSa {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.fmt(f)
    }
}

impl From<SaCore> for NewSa {
    /// A core built on the stack (tests and tools): moved into its block once.
    fn from(core: SaCore) -> Self {
        NewSa(Arc::new(core))
    }
}

impl core::ops::Deref for NewSa {
    type Target = SaCore;
    fn deref(&self) -> &SaCore {
        &self.0
    }
}

impl core::ops::DerefMut for NewSa {
    fn deref_mut(&mut self) -> &mut SaCore {
        Arc::get_mut(&mut self.0).expect("a NewSa's Arc is its own until into_shared")
    }
}

/// One wipe of the stack for a batch of SAs ([`NewSa::in_scope`]), when it
/// is dropped.
///
/// [`NewSa::new`] wipes 24 KiB of stack after every SA, about a
/// microsecond: at 100 000 SAs a second, a tenth of the time. A batch
/// (`espd_config::db::apply`, every line of one change) builds its SAs in
/// frames below the one that holds its scope and wipes once, deeper, when
/// the scope goes: on success, on an error, or on a panic that unwinds.
/// Until then the copies are in the frames of the thread building the
/// batch, the only place they ever were; the keys themselves are in the
/// new cores, which live on.
///
/// Hold it in a frame above every build (a local of the function that
/// loops over the batch), and keep the builds within [`KeyScope::DEPTH`]
/// below it (`dataplane/espd/tests/key_residue.rs` measures the batch path).
#[derive(Debug)]
pub struct KeyScope(());

impl KeyScope {
    /// How deep the wipe reaches below the scope's frame: the per-SA depth
    /// (11 KiB in release, 38 in debug) and the batch's own frames
    /// (a line's lexer and parser), with room to spare.
    pub const DEPTH: usize = if cfg!(debug_assertions) { 96 } else { 48 } * 1024;

    pub fn new() -> Self {
        KeyScope(())
    }
}

impl Default for KeyScope {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for KeyScope {
    fn drop(&mut self) {
        scrub_below::<{ KeyScope::DEPTH / 8 }>();
    }
}

/// Overwrites the stack below the caller's frame, where key expansion and
/// its moves left copies of a key schedule: about 11 KiB deep in a release
/// build and 38 in a debug one (measured; `dataplane/espd/tests/
/// key_residue.rs` checks that none is left), so 24 and 64 KiB.
/// `black_box` makes the zeroed array observable, so the optimiser writes
/// it (a memset: about a microsecond).
fn scrub_stack() {
    const WORDS: usize = if cfg!(debug_assertions) { 8192 } else { 3072 };
    scrub_below::<WORDS>();
}

/// Writes `WORDS` zero words in a frame of its own, just below the caller's.
#[inline(never)]
fn scrub_below<const WORDS: usize>() {
    let mut below = [0u64; WORDS];
    core::hint::black_box(&mut below);
}

impl core::fmt::Debug for SaCore {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "SaCore {{ dst: {}, spi: 0x{:08x}, lineage: {} }}",
            self.cfg.dst, self.cfg.spi, self.lineage
        )
    }
}

/// One engine's runtime SA: everything the hot path writes, beside the
/// shared [`SaCore`] it reads.
///
/// Laid out for the data path (DPDK's `rte_ipsec_sa` and VPP's
/// `ipsec_sa_t` do the same): C order with the fields every packet reads or
/// writes first, so they share the SA's first cache lines, and each SA
/// starts on its own line, so two workers' SAs never share one.
#[repr(C, align(64))]
pub struct Sa {
    /// Last outbound sequence number used (the next one is `oseq + 1`).
    pub(crate) oseq: u64,
    /// Sequence numbers taken from the shared counter for the current burst
    /// and not used yet: `(next, last)`; `None` outside a burst (see
    /// `OutParams::reserve` and `Engine::end_burst`).
    pub(crate) seq_block: Option<(u64, u64)>,
    /// When the SA last sent (the caller's clock, seconds): NAT keepalives
    /// go out after an idle time (RFC 3948 §4).
    pub(crate) last_tx: u64,
    /// IPv4 identification for outer headers (tunnel mode).
    pub(crate) ip_id: u16,
    /// Set when the outbound sequence space is exhausted: the SA sends nothing more.
    pub(crate) exhausted: bool,
    /// The soft lifetime was reached (reported once).
    pub(crate) soft_reached: bool,
    /// The hard lifetime was reached, or the sequence space: no more packets.
    pub(crate) expired: bool,
    /// Counted since the engine last published its counters.
    pub(crate) dirty: bool,
    pub(crate) replay: ReplayWindow,
    /// Packet and octet counts first; the per-reason drops after them.
    pub(crate) counters: SaCounters,
    /// Set when several workers' engines use this SA (the core's share).
    pub(crate) share: Option<SaShare>,
    pub(crate) core: Arc<SaCore>,
}

impl Sa {
    /// An SA of its own (one engine, nothing shared): for tests and tools.
    pub fn new(cfg: SaConfig) -> Result<Self, SaError> {
        Ok(Sa::from_core(NewSa::new(cfg)?.into_shared(), false))
    }

    /// A fresh runtime state for `core`; `shared` when several engines use it.
    pub fn from_core(core: Arc<SaCore>, shared: bool) -> Self {
        let cfg = &core.cfg;
        let replay = ReplayWindow::new(cfg.replay_window, cfg.replay_seq);
        // A per-SA start for the IPv4 ID so two tunnels do not march in step.
        let ip_id = (cfg.spi ^ (cfg.spi >> 16)) as u16;
        Sa {
            share: shared.then(|| core.share.clone()),
            oseq: cfg.replay_oseq,
            seq_block: None,
            replay,
            exhausted: false,
            ip_id,
            last_tx: 0,
            counters: SaCounters::default(),
            soft_reached: false,
            expired: false,
            dirty: false,
            core,
        }
    }

    pub fn cfg(&self) -> &SaConfig {
        &self.core.cfg
    }

    /// The shared part: configuration, keys, shared counter and owner.
    pub fn core(&self) -> &Arc<SaCore> {
        &self.core
    }

    /// Packets, octets and drops through this SA on this engine.
    pub fn counters(&self) -> &SaCounters {
        &self.counters
    }

    /// The last outbound sequence number used.
    pub fn oseq(&self) -> u64 {
        self.oseq
    }

    /// Continues the outbound sequence after `n` (tools and tests that set
    /// a state up; the gateway continues from its sequence store instead).
    pub fn set_oseq(&mut self, n: u64) {
        self.oseq = n;
    }

    /// Sequence numbers reserved for the current burst, `(next, last)`.
    pub fn seq_block(&self) -> Option<(u64, u64)> {
        self.seq_block
    }

    pub fn replay(&self) -> &ReplayWindow {
        &self.replay
    }

    /// The outbound sequence space is used up.
    pub fn exhausted(&self) -> bool {
        self.exhausted
    }

    /// The hard lifetime (or the sequence space) was reached.
    pub fn expired(&self) -> bool {
        self.expired
    }

    /// The highest outbound sequence number this SA may use:
    /// RFC 4303 §3.3.3, the counter must not cycle.
    pub fn seq_limit(&self) -> u64 {
        if self.core.cfg.flags.esn {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        }
    }

    pub fn count_drop(&mut self, r: DropReason) {
        self.counters.drops[r as usize] += 1;
        self.dirty = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An SA's core with ring's key schedule inline fits one 896-octet
    /// block of mimalloc's (its `Arc` adds two counters): a carrier edge's
    /// 100 000 SAs are one block each (docs/performance.md). A field added
    /// to `SaConfig` that breaks this costs 128 octets an SA.
    #[test]
    #[cfg(feature = "ring")]
    fn an_sa_core_and_its_keys_fit_one_896_octet_block() {
        let arc_inner = core::mem::size_of::<SaCore>() + 2 * core::mem::size_of::<usize>();
        assert!(arc_inner <= 896, "Arc<SaCore> is {arc_inner} octets");
        assert_eq!(core::mem::size_of::<KeyedAlg>(), 24);
    }

    /// Every name an SA can carry is one `KeyedAlg` can index, and reads
    /// back as given.
    #[test]
    fn every_algorithm_name_reads_back() {
        for (known, why) in [
            (&AEAD_ALGS[..], UNSUPPORTED_AEAD),
            (&ENC_ALGS[..], UNSUPPORTED_ENC),
            (&AUTH_ALGS[..], UNSUPPORTED_AUTH),
        ] {
            for name in known {
                let a = KeyedAlg::new(name, known, why, Zeroizing::new(vec![1; 4]), 0).unwrap();
                assert_eq!(a.name(), *name);
            }
            let other = KeyedAlg::new("gcm(aes)", known, why, Zeroizing::new(vec![]), 0);
            assert_eq!(other.err(), Some(why));
        }
    }
}
