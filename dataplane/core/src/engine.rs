//! The engine: checks a packet's headers once, classifies it, and runs it
//! through the SPD and the SAD — the RFC 4301 §5 processing model with Linux
//! XFRM's semantics. Sans-IO: the caller hands in a buffer and gets a verdict.
//!
//! ```text
//!  IP packet ──► header checks ──► ESP to one of our addresses? ──yes──► SAD (dst, SPI)
//!                 (Runt, BadHeader,      │                                  │ inbound ESP
//!                  BadChecksum)          no                                 ▼
//!                                        │                       decapsulate (replay, ICV,
//!                                        ▼                        padding) ──► SA sel +
//!                             in/fwd policy check (plaintext       in/fwd policy check
//!                             where protection is required ─►         │
//!                             UnprotectedInbound; block ─► Discard)   ▼
//!                                        │                         Decapsulated
//!                                        ▼
//!                             out policy: block ─► Discard; allow+tmpl ─► SA ─► encapsulate
//!                                         allow ─► Bypass; none ─► default (allow/NoPolicy)
//! ```

use crate::buf::PacketBuf;
use crate::drop::DropReason;
use crate::esp::inbound::{self, Decap};
use crate::esp::outbound::{self, OutParams};
use crate::esp::L3;
use crate::state::spd::{Action, Direction, Level};
use crate::state::{Flow, Mode, Sa, SaConfig, SaId, SaShare, Sad, Selector, Spd, Tables, Template};
use core::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// The most ESP layers one packet may carry (an SA bundle), as XFRM's
/// XFRM_MAX_DEPTH bounds it.
pub const MAX_NEST: usize = 4;
use crate::wire::{self, ipv4, ipv6, l4, proto};
use core::net::IpAddr;

/// What happened to a packet. For everything but `Drop` and `Dummy`, the
/// buffer holds the packet to send on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Plaintext protected by this SA.
    Encapsulated(SaId),
    /// ESP received through this SA; the buffer holds the inner packet.
    Decapsulated(SaId),
    /// Passed unchanged (BYPASS, or no policy and a default of allow).
    Bypass,
    /// A valid dummy packet (next header 59) received through this SA: consumed.
    Dummy(SaId),
    /// A NAT keepalive (RFC 3948 §2.3, one 0xFF octet on an encapsulation
    /// port): consumed quietly.
    Keepalive,
    /// The packet was dropped for this reason, and the buffer now holds an
    /// ICMP error to send back to its source (RFC 4301 §8.2.1).
    Icmp(DropReason),
    /// The SA that must process this packet is owned by this other worker
    /// (see [`Engine::set_worker`]): hand it over. The buffer is unchanged.
    Handoff(u32),
    Drop(DropReason),
}

/// Verdict counters of one engine (one worker later).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub encapsulated: u64,
    pub decapsulated: u64,
    pub bypass: u64,
    pub dummy: u64,
    pub keepalive: u64,
    /// IKE on an encapsulation port (non-ESP marker): passed to the host.
    pub ike: u64,
    /// ICMP errors generated (each also counted as a drop).
    pub icmp_sent: u64,
    pub dropped: u64,
    pub drops: crate::drop::DropCounts,
    /// Packets handed to the worker that owns their SA.
    pub handed_off: u64,
}

pub struct Engine {
    /// The SAs and policies, shared with the other workers' engines (see
    /// [`Engine::set_tables`]). They also say which addresses are this
    /// host's (`in` vs `fwd`, which plaintext is for it), where ESP is ours
    /// to open and which UDP ports carry ESP.
    tables: Arc<Tables>,
    /// This engine's runtime state of each SA it has used.
    runs: Runs,
    /// Several engines use the tables' SAs (see [`Engine::set_shared`]).
    shared: bool,
    pub counters: Counters,
    /// The caller's clock in seconds (see [`Engine::set_time`]).
    now: u64,
    /// Path MTU for encapsulated packets (see [`Engine::set_mtu`]).
    mtu: Option<usize>,
    /// ICMP errors allowed per second, and what is left of this second's.
    icmp_rate: u32,
    icmp_left: u32,
    icmp_second: u64,
    /// Router mode (the gateway): forwarded packets have their TTL / hop
    /// limit decremented (see [`Engine::set_router`]).
    router: bool,
    /// This engine's worker, for the ownership of shared SAs' replay windows.
    worker: u32,
    /// Sources for ICMP errors (see [`Engine::set_icmp_sources`]).
    icmp_src: Vec<IpAddr>,
    /// Events since the last [`Engine::take_events`], and the second of the
    /// last unknown-SPI event.
    events: Vec<SaEvent>,
    unknown_spi_second: Option<u64>,
    /// Decisions reused across the packets of bursts (see [`Engine::begin_burst`]).
    burst: BurstCache,
    /// Where the next [`Engine::nat_keepalives`] sweep goes on from.
    keepalive_at: SaId,
    /// Acquire events: policy → the second of its last one (rate limit).
    acquired: rustc_hash::FxHashMap<Selector, u64>,
}

/// Ids per chunk of [`Runs`]: a chunk is allocated when first used, so the
/// table grows without moving the runtime states already in it.
const RUN_CHUNK: usize = 256;

/// One engine's runtime SAs ([`Sa`]), by SA id, made the first time the
/// engine uses an SA; renewed or dropped as the tables change. Idle SAs
/// cost an engine nothing.
#[derive(Default)]
struct Runs {
    chunks: Vec<Option<Box<[Option<Sa>]>>>,
    /// Ids used since the last [`Engine::take_sa_updates`] (each once: `Sa::dirty`).
    touched: Vec<SaId>,
    /// Ids whose runtime state went since then (their SA was removed or replaced).
    gone: Vec<SaId>,
    /// The states that went, kept for [`Engine::take_retired`] (so that
    /// their last reference, and the keys, are let go off the hot path).
    retired: Vec<Sa>,
}

impl Runs {
    fn slot(chunks: &mut Vec<Option<Box<[Option<Sa>]>>>, id: SaId) -> &mut Option<Sa> {
        let (c, i) = (id / RUN_CHUNK, id % RUN_CHUNK);
        if c >= chunks.len() {
            chunks.resize_with(c + 1, || None);
        }
        &mut chunks[c].get_or_insert_with(|| (0..RUN_CHUNK).map(|_| None).collect())[i]
    }

    fn peek(&self, id: SaId) -> Option<&Sa> {
        self.chunks
            .get(id / RUN_CHUNK)?
            .as_ref()?
            .get(id % RUN_CHUNK)?
            .as_ref()
    }

    fn peek_mut(&mut self, id: SaId) -> Option<&mut Sa> {
        self.chunks
            .get_mut(id / RUN_CHUNK)?
            .as_mut()?
            .get_mut(id % RUN_CHUNK)?
            .as_mut()
    }

    /// The runtime state of SA `id` (an id of `t`), made if new.
    #[inline]
    fn get(&mut self, t: &Tables, id: SaId, shared: bool) -> &mut Sa {
        let slot = Self::slot(&mut self.chunks, id);
        let sa = slot.get_or_insert_with(|| {
            let core = t.sad().core(id).expect("an SA id of these tables");
            Sa::from_core(core.clone(), shared)
        });
        if !sa.dirty {
            sa.dirty = true;
            self.touched.push(id);
        }
        sa
    }

    /// After a change of tables to `t`: the state of `id` follows its SA
    /// (same lineage: a `state update`) or goes.
    fn renew(&mut self, t: &Tables, id: SaId, shared: bool) {
        let Some(slot) = self.chunks.get_mut(id / RUN_CHUNK).and_then(|c| c.as_mut()) else {
            return;
        };
        let slot = &mut slot[id % RUN_CHUNK];
        let Some(sa) = slot.as_mut() else { return };
        match t.sad().core(id) {
            Some(c) if c.lineage == sa.core.lineage => {
                sa.core = c.clone();
                sa.share = shared.then(|| c.share.clone());
            }
            _ => {
                if let Some(sa) = slot.take() {
                    self.retired.push(sa);
                }
                self.gone.push(id);
            }
        }
    }

    fn ids(&self) -> impl Iterator<Item = SaId> + '_ {
        self.chunks.iter().enumerate().flat_map(|(c, ch)| {
            ch.iter()
                .flat_map(|ch| ch.iter().enumerate())
                .filter(|(_, s)| s.is_some())
                .map(move |(i, _)| c * RUN_CHUNK + i)
        })
    }
}

/// What the SPD and the SAD decided for an outbound flow: the part of
/// [`Engine::process`] that depends on the flow alone, so the packets of a
/// burst that share a flow reuse it.
#[derive(Debug, Clone, Copy)]
enum OutDecision {
    /// Dropped (DISCARD, plaintext where protection is required, no policy
    /// or no SA) or delivered to this host.
    Done(Verdict),
    /// BYPASS of a packet not for this host.
    Forward,
    /// Through these SAs, innermost first.
    Protect([SaId; MAX_NEST], u8),
}

/// The state of bursts: flow decisions (kept from burst to burst while the
/// SPD and SAD stay as they are), verdict counts to add to [`Counters`] once
/// at the end, and the SAs that reserved sequence numbers.
#[derive(Debug, Default)]
struct BurstCache {
    active: bool,
    /// Packets still expected in this burst (sequence numbers to reserve).
    left: u64,
    /// Outbound decisions of the burst's flows.
    out: FlowCache<OutDecision>,
    /// The last inbound SA: (destination, SPI) → SA.
    sa_in: Option<(IpAddr, u32, SaId)>,
    /// Inner flows that passed the inbound policy check, with their SA path.
    checked: FlowCache<([SaId; MAX_NEST], usize)>,
    /// SAs holding reserved sequence numbers (given back at the end).
    reserved: [SaId; MAX_RESERVED],
    n_reserved: usize,
    encapsulated: u64,
    decapsulated: u64,
    bypass: u64,
}

/// A direct-mapped cache of per-flow answers: traffic interleaves flows (a
/// gateway's burst holds many), so one entry is not enough; 64 slots by a
/// hash of the 5-tuple cost one compare on a hit. Entries carry the
/// SPD's and SAD's versions when they were made, so any change to either
/// voids them all without writing to the cache (and a new engine starts
/// with an empty one).
#[derive(Debug)]
struct FlowCache<V: Copy> {
    slots: Box<[Option<(u64, Flow, V)>; FLOW_SLOTS]>,
}

const FLOW_SLOTS: usize = 64;

impl<V: Copy> Default for FlowCache<V> {
    fn default() -> Self {
        FlowCache {
            slots: Box::new([None; FLOW_SLOTS]),
        }
    }
}

impl<V: Copy> FlowCache<V> {
    fn slot(f: &Flow) -> usize {
        let a = |x: IpAddr| match x {
            IpAddr::V4(v) => u64::from(v.to_bits()),
            IpAddr::V6(v) => {
                let b = v.to_bits();
                (b as u64) ^ ((b >> 64) as u64)
            }
        };
        let p = f
            .ports
            .map_or(0, |p| u64::from(p.sport) << 16 | u64::from(p.dport));
        let h = (a(f.src) ^ a(f.dst).rotate_left(32) ^ p << 8 ^ u64::from(f.proto))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> 58) as usize
    }

    fn get(&self, burst: u64, f: &Flow) -> Option<V> {
        match &self.slots[Self::slot(f)] {
            Some((b, k, v)) if *b == burst && k == f => Some(*v),
            _ => None,
        }
    }

    fn put(&mut self, burst: u64, f: &Flow, v: V) {
        self.slots[Self::slot(f)] = Some((burst, *f, v));
    }

    fn clear(&mut self) {
        self.slots.fill(None);
    }
}

/// SAs per burst that reserve sequence numbers ahead; further SAs in the
/// same burst take theirs one at a time.
const MAX_RESERVED: usize = 8;

/// A burst of packets through an [`Engine`] (see [`Engine::begin_burst`]);
/// ends when dropped.
pub struct Burst<'e> {
    engine: &'e mut Engine,
}

impl Burst<'_> {
    /// Processes one IP packet of the burst (see [`Engine::process`]).
    pub fn process(&mut self, pkt: &mut PacketBuf<'_>) -> Verdict {
        self.engine.process(pkt)
    }
}

impl Drop for Burst<'_> {
    fn drop(&mut self) {
        self.engine.end_burst();
    }
}

/// Something the control side should hear about (`espctl monitor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaEventKind {
    /// The soft lifetime was reached: time to rekey.
    SoftExpire,
    /// The hard lifetime (or the end of the sequence space) was reached: the
    /// SA carries nothing more and is to be deleted.
    HardExpire,
    /// ESP for one of our addresses with an SPI no SA has (at most one such
    /// event a second per engine).
    UnknownSpi,
    /// A packet matched a PROTECT policy whose template has no SA (RFC 4301
    /// §5.1 step 3a, Linux's XFRM_MSG_ACQUIRE): an IKE daemon may negotiate
    /// one. At most one a second per policy per engine. `dst` is the
    /// template's tunnel destination (or the packet's), `spi` 0.
    Acquire,
}

/// What an [`SaEventKind::Acquire`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquire {
    /// The outbound policy that matched, and the template without an SA.
    pub policy: Selector,
    pub priority: u32,
    pub tmpl: Template,
    /// The packet's own selector fields (what strongSwan narrows to).
    pub flow: Flow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaEvent {
    pub kind: SaEventKind,
    pub dst: IpAddr,
    pub spi: u32,
    /// What was reached: "time", "bytes", "packets", "sequence" (empty for UnknownSpi).
    pub why: &'static str,
    /// For [`SaEventKind::Acquire`].
    pub acquire: Option<Acquire>,
}

/// Events kept at most between two [`Engine::take_events`]; more are counted only.
pub const MAX_EVENTS: usize = 256;

/// Policies remembered for the acquire rate limit (then forgotten at once).
const MAX_ACQUIRING: usize = 4096;

/// SA ids one [`Engine::nat_keepalives`] call looks at.
pub const KEEPALIVE_SWEEP: usize = 2048;

/// Why one layer of ESP was not removed.
enum DecapErr {
    /// Another worker owns the SA (the packet is untouched).
    Owned(u32),
    Failed(DropReason),
}
use DecapErr::{Failed, Owned};

/// An ICMP error this engine can answer with.
#[derive(Clone, Copy)]
enum IcmpKind {
    /// RFC 792 type 3 code 4 / RFC 4443 type 2, with the MTU to report.
    TooBig(usize),
    /// RFC 792 type 11 code 0 / RFC 4443 type 3 code 0.
    TimeExceeded,
}

/// Default ICMP error rate limit (per engine, per second), as Linux's
/// `icmp_ratelimit` bounds it in spirit.
pub const ICMP_PER_SECOND: u32 = 100;

impl Engine {
    /// An engine over installed SAs and policies; this host's addresses are
    /// [`local_addrs`]`(spd, extra_local)`, and ESP is opened when addressed
    /// to one of [`esp_addrs`].
    pub fn new(sad: Sad, spd: Spd, extra_local: &[IpAddr]) -> Self {
        Self::with_tables(Arc::new(Tables::new(sad, spd, extra_local)))
    }

    /// An engine over shared tables (see [`Engine::set_tables`]).
    pub fn with_tables(tables: Arc<Tables>) -> Self {
        Engine {
            tables,
            runs: Runs::default(),
            shared: false,
            counters: Counters::default(),
            now: 0,
            mtu: None,
            icmp_rate: ICMP_PER_SECOND,
            icmp_left: ICMP_PER_SECOND,
            icmp_second: 0,
            router: false,
            worker: 0,
            icmp_src: Vec::new(),
            events: Vec::with_capacity(MAX_EVENTS),
            unknown_spi_second: None,
            burst: BurstCache::default(),
            keepalive_at: 0,
            acquired: Default::default(),
        }
    }

    /// The tables this engine runs on.
    pub fn tables(&self) -> &Arc<Tables> {
        &self.tables
    }

    /// Moves to newer tables (between bursts): O(SAs changed since the
    /// current ones). Each SA that was updated keeps its runtime state —
    /// replay window, sequence number, counters — and each that was
    /// removed (or whose id now names another SA) loses it, so its core
    /// and keys go once no engine and no snapshot holds them. Decisions
    /// cached under the old tables are void.
    ///
    /// Returns the tables it ran on: the caller may hand them (and
    /// [`Engine::take_retired`]) to another thread to be freed, RCU's
    /// deferred reclamation, so a worker never spends its time freeing.
    pub fn set_tables(&mut self, t: Arc<Tables>) -> Arc<Tables> {
        if Arc::ptr_eq(&t, &self.tables) {
            return t;
        }
        if self.burst.active {
            self.end_burst();
        }
        let shared = self.shared;
        match t.changed_since(self.tables.version()) {
            Some(ids) if t.version() >= self.tables.version() => {
                for id in ids {
                    self.runs.renew(&t, id, shared);
                }
            }
            // Too far behind for the log (or unrelated tables): every state.
            _ => {
                let ids: Vec<SaId> = self.runs.ids().collect();
                for id in ids {
                    self.runs.renew(&t, id, shared);
                }
            }
        }
        self.burst.out.clear();
        self.burst.checked.clear();
        core::mem::replace(&mut self.tables, t)
    }

    /// The runtime states of SAs that went since the last call.
    pub fn take_retired(&mut self) -> Vec<Sa> {
        core::mem::take(&mut self.runs.retired)
    }

    /// Several engines (the gateway's workers) use these tables' SAs: they
    /// share each SA's outbound sequence counter and owner
    /// ([`crate::state::SaShare`]). Set before the first packet.
    pub fn set_shared(&mut self, on: bool) {
        self.shared = on;
    }

    /// The runtime state of SA `id`, if this engine has used it.
    pub fn sa_state(&self, id: SaId) -> Option<&Sa> {
        self.runs.peek(id)
    }

    /// The runtime state of SA `id` (an id of the current tables), made if
    /// new: for tools and tests that set a state up.
    pub fn sa_mut(&mut self, id: SaId) -> &mut Sa {
        self.run(id)
    }

    /// SA `id`'s shared part: through this engine's runtime state when it
    /// has one (a slice index, where the tables' persistent vector is a
    /// short tree walk), from the tables otherwise.
    #[inline]
    fn core(&self, id: SaId) -> &crate::state::SaCore {
        match self.runs.peek(id) {
            Some(sa) => &sa.core,
            None => self.tables.sad().get(id),
        }
    }

    /// The runtime SA `id` (an id of the current tables), made if new.
    #[inline]
    fn run(&mut self, id: SaId) -> &mut Sa {
        self.runs.get(&self.tables, id, self.shared)
    }

    /// The SAs used since the last call, with their runtime state, and
    /// those whose state went (`None`): what a worker publishes for the
    /// counters and the sequence store — O(SAs used), not O(SAs).
    pub fn take_sa_updates(&mut self, mut f: impl FnMut(SaId, Option<&Sa>)) {
        for id in core::mem::take(&mut self.runs.gone) {
            f(id, None);
        }
        let mut touched = core::mem::take(&mut self.runs.touched);
        for &id in &touched {
            if let Some(sa) = self.runs.peek_mut(id) {
                sa.dirty = false;
                f(id, Some(sa));
            }
        }
        touched.clear();
        self.runs.touched = touched;
    }

    /// True if events wait for [`Engine::take_events`].
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Router mode, for the gateway: what it forwards has its IPv4 TTL or
    /// IPv6 hop limit decremented, as a router must (RFC 1812 §5.3.1,
    /// RFC 8200 §3) — plaintext before it is encapsulated (an expired one is
    /// answered with ICMP time exceeded, rate limited) and the inner packet
    /// after decapsulation (an expired one is dropped: the error would have to
    /// go back through the tunnel). Linux's forwarding path does both.
    pub fn set_router(&mut self, on: bool) {
        self.router = on;
    }

    /// The worker this engine runs on. SAs shared between engines
    /// ([`crate::state::SaShare`]) have one owner: the first worker that
    /// sends through the SA, or that authenticates a packet of it. Another
    /// worker's engine answers [`Verdict::Handoff`] with the owner, before
    /// changing the packet or spending any crypto on it.
    pub fn set_worker(&mut self, id: u32) {
        self.worker = id;
    }

    /// The events since the last call (lifetimes reached, unknown SPIs).
    pub fn take_events(&mut self, out: &mut Vec<SaEvent>) {
        out.append(&mut self.events);
    }

    fn event(&mut self, kind: SaEventKind, dst: IpAddr, spi: u32, why: &'static str) {
        if self.events.len() < MAX_EVENTS {
            self.events.push(SaEvent {
                kind,
                dst,
                spi,
                why,
                acquire: None,
            });
        }
    }

    /// RFC 4301 §4.4.2.1 lifetimes of SA `id` before it carries a packet:
    /// false (and the SA expired, with an event) once a hard limit is
    /// reached; an event the first time a soft one is.
    fn within_lifetime(&mut self, id: SaId) -> bool {
        let now = self.now;
        let core = self.core(id);
        let (lt, added, dst, spi) = (core.cfg.lifetime, core.added, core.cfg.dst, core.cfg.spi);
        let sa = self.run(id);
        if sa.expired {
            return false;
        }
        if lt.is_unlimited() {
            return true;
        }
        let (age, bytes, packets) = (
            now.saturating_sub(added),
            sa.counters.bytes,
            sa.counters.packets,
        );
        // The first limit reached, in the order time, bytes, packets.
        let reached = |limits: [u64; 3]| {
            [("time", age), ("bytes", bytes), ("packets", packets)]
                .into_iter()
                .zip(limits)
                .find(|((_, v), limit)| *limit != 0 && v >= limit)
                .map(|((why, _), _)| why)
        };
        let hard = reached([lt.time_hard, lt.bytes_hard, lt.packets_hard]);
        let soft = reached([lt.time_soft, lt.bytes_soft, lt.packets_soft]);
        if let Some(why) = soft.filter(|_| !sa.soft_reached) {
            sa.soft_reached = true;
            self.event(SaEventKind::SoftExpire, dst, spi, why);
        }
        if let Some(why) = hard {
            self.run(id).expired = true;
            self.event(SaEventKind::HardExpire, dst, spi, why);
            return false;
        }
        true
    }

    /// Checks the time lifetimes of every SA: an SA that idles past its
    /// hard time expires without waiting for a packet. O(SAs): for `espd
    /// pcap` and tests; the gateway's control thread keeps the deadlines.
    pub fn check_lifetimes(&mut self) {
        for id in 0..self.tables.sad().id_bound() {
            let Some(c) = self.tables.sad().core(id) else {
                continue;
            };
            let lt = c.cfg.lifetime;
            if lt.time_soft != 0 || lt.time_hard != 0 {
                self.within_lifetime(id);
            }
        }
    }

    /// The addresses ICMP errors come from, by family: a router's are those
    /// of the interface the error leaves by (RFC 1812 §4.3.2.4) — the
    /// gateway's inside interface. Without one of a family, the first local
    /// address of that family is used.
    pub fn set_icmp_sources(&mut self, addrs: &[IpAddr]) {
        self.icmp_src = addrs.to_vec();
    }

    pub fn local_addrs(&self) -> &[IpAddr] {
        self.tables.local()
    }

    /// True if ESP to `a` is ours to open (see [`esp_addrs`]).
    pub fn opens_esp_to(&self, a: IpAddr) -> bool {
        self.tables.esp_local().binary_search(&a).is_ok()
    }

    fn is_local(&self, a: IpAddr) -> bool {
        self.tables.is_local(a)
    }

    /// Starts a burst of up to `n` packets, processed one by one with
    /// [`Engine::process`] until [`Engine::end_burst`] — DPDK lib/ipsec's and
    /// VPP's vector processing, shaped for a caller that walks its RX ring:
    /// the SPD and SAD decision of a flow is made once and reused by the
    /// following packets of that flow, an SA shared between workers takes
    /// sequence numbers for the rest of the burst in one atomic operation,
    /// and the verdict counters are added once at the end. Verdicts and
    /// packets are exactly those of unbatched processing.
    pub fn begin_burst(&mut self, n: usize) {
        if self.burst.active {
            self.end_burst();
        }
        self.burst.active = true;
        self.burst.left = n as u64;
    }

    /// Ends the burst begun by [`Engine::begin_burst`]: counters added,
    /// unused reserved sequence numbers given back. The flow caches are kept
    /// for the next burst (their entries hold while the SPD and SAD do).
    pub fn end_burst(&mut self) {
        let b = &mut self.burst;
        let c = &mut self.counters;
        c.encapsulated += b.encapsulated;
        c.decapsulated += b.decapsulated;
        c.bypass += b.bypass;
        for &id in &b.reserved[..b.n_reserved] {
            let Some(sa) = self.runs.peek_mut(id) else {
                continue;
            };
            if let (Some((next, last)), Some(share)) = (sa.seq_block.take(), &sa.share) {
                // The owner is the only sender, so the counter still stands
                // at `last`: move it back and no number is skipped. Should
                // it have moved, the numbers stay unused (a gap is allowed,
                // a repeat never).
                if next <= last {
                    let _ = share
                        .oseq
                        .compare_exchange(last, next - 1, Relaxed, Relaxed);
                }
            }
        }
        // The flow caches stay: their entries hold while the SPD and SAD do.
        b.active = false;
        b.left = 0;
        b.sa_in = None;
        b.n_reserved = 0;
        (b.encapsulated, b.decapsulated, b.bypass) = (0, 0, 0);
    }

    /// The tag of cached decisions: grows with any change to the SPD or SAD.
    fn tables_version(&self) -> u64 {
        self.tables.version()
    }

    /// [`Engine::begin_burst`] as a guard that ends the burst when dropped.
    pub fn burst(&mut self, n: usize) -> Burst<'_> {
        self.begin_burst(n);
        Burst { engine: self }
    }

    /// Processes one IP packet (no link-layer header) in place.
    pub fn process(&mut self, pkt: &mut PacketBuf<'_>) -> Verdict {
        let v = self.classify(pkt);
        let (c, b) = (&mut self.counters, &mut self.burst);
        b.left = b.left.saturating_sub(1);
        match v {
            Verdict::Encapsulated(_) if b.active => b.encapsulated += 1,
            Verdict::Decapsulated(_) if b.active => b.decapsulated += 1,
            Verdict::Bypass if b.active => b.bypass += 1,
            Verdict::Encapsulated(_) => c.encapsulated += 1,
            Verdict::Decapsulated(_) => c.decapsulated += 1,
            Verdict::Bypass => c.bypass += 1,
            Verdict::Dummy(_) => c.dummy += 1,
            Verdict::Keepalive => c.keepalive += 1,
            Verdict::Icmp(r) => {
                c.dropped += 1;
                c.drops[r as usize] += 1;
                c.icmp_sent += 1;
            }
            Verdict::Drop(r) => {
                c.dropped += 1;
                c.drops[r as usize] += 1;
            }
            Verdict::Handoff(_) => c.handed_off += 1,
        }
        v
    }

    fn classify(&mut self, pkt: &mut PacketBuf<'_>) -> Verdict {
        let (l3, flow) = match parse(pkt) {
            Ok(x) => x,
            Err(r) => return Verdict::Drop(r),
        };
        // RFC 4301 §4.4.2: inbound SAs are looked up for this host's
        // addresses only; ESP to anyone else is not ours to open.
        let ours = self.opens_esp_to(flow.dst);
        let encap = l3.proto == proto::UDP
            && flow
                .ports
                .is_some_and(|p| self.tables.encap_ports().contains(&p.dport));
        if l3.proto == proto::ESP && ours {
            return self.inbound(pkt, &l3, flow.dst);
        }
        if encap && ours {
            return self.udp_encapsulated(pkt, &l3, flow.dst);
        }
        if (l3.proto == proto::ESP || encap) && self.is_own_esp(pkt.data(), &l3, encap, flow.dst) {
            return Verdict::Drop(DropReason::OwnEsp);
        }
        if flow
            .ports
            .is_some_and(|p| l4::is_icmp_error(flow.proto, p.sport as u8))
            && self.icmp_error_about_protected(pkt.data(), &l3, &flow)
        {
            return Verdict::Drop(DropReason::UnprotectedInbound);
        }
        self.outbound(pkt, &l3, &flow)
    }

    /// RFC 4301 §6.1.1: an ICMP error that arrives unprotected while the
    /// packet it quotes belongs to a flow the SPD protects is not accepted —
    /// otherwise anyone on the wire could reset or redirect protected flows.
    /// An error that is itself selected for protection (a host behind us
    /// answering a peer) goes on through the normal path. Checked per packet,
    /// not through the flow cache: two errors with one outer 5-tuple may
    /// quote different packets.
    fn icmp_error_about_protected(&self, d: &[u8], l3: &L3, flow: &Flow) -> bool {
        if l3.fragment
            || self
                .tables
                .spd()
                .lookup(Direction::Out, flow)
                .is_some_and(|p| p.requires_protection())
        {
            return false;
        }
        let Some((src, dst, proto, ports)) = d.get(l3.upper_at..).and_then(l4::quoted) else {
            return false;
        };
        if src.is_ipv4() != flow.src.is_ipv4() || dst.is_ipv4() != flow.dst.is_ipv4() {
            return false;
        }
        let q = Flow {
            src,
            dst,
            proto,
            ports,
        };
        // The quoted packet went out from behind us (out policy), or came in
        // to us or our hosts (in/fwd policy): either way, protected traffic.
        [Direction::Out, Direction::Fwd, Direction::In]
            .iter()
            .any(|dir| {
                self.tables
                    .spd()
                    .lookup(*dir, &q)
                    .is_some_and(|p| p.requires_protection())
            })
    }

    /// ESP (raw, or behind an encapsulation port's UDP header) not addressed
    /// to us whose destination and SPI are one of our SAs': a copy of our own
    /// outbound traffic that came back (reflected, looped, or the other
    /// direction of a capture). Dropped before any crypto.
    fn is_own_esp(&self, d: &[u8], l3: &L3, encap: bool, dst: IpAddr) -> bool {
        if l3.fragment {
            return false;
        }
        let at = l3.upper_at + if encap { wire::udp::HEADER_LEN } else { 0 };
        let Some(spi) = d
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            return false;
        };
        spi != 0
            && self
                .tables
                .sad()
                .lookup_in(dst, spi)
                .is_some_and(|id| self.tables.sad().get(id).cfg.encap.is_some() == encap)
    }

    fn inbound(&mut self, pkt: &mut PacketBuf<'_>, l3: &L3, dst: IpAddr) -> Verdict {
        // The SAs this packet came through, outermost first (XFRM's secpath):
        // a tunnel may carry ESP for this host again (an SA bundle).
        let mut sp = [0 as SaId; MAX_NEST];
        let mut n = 0;
        let (mut l3, mut dst) = (*l3, dst);
        loop {
            let id = match self.decap_one(pkt, &l3, dst) {
                Ok((id, Decap::Packet)) => id,
                Ok((id, Decap::Dummy)) => return Verdict::Dummy(id),
                Err(Owned(w)) if n == 0 => return Verdict::Handoff(w),
                Err(Owned(_)) => return self.drop_for(&sp[..n], DropReason::ForeignQueue),
                Err(Failed(r)) => return Verdict::Drop(r),
            };
            sp[n] = id;
            n += 1;
            let Ok((inner, flow)) = parse_ro(pkt.data()) else {
                return self.drop_for(&sp[..n], DropReason::BadInner);
            };
            let nested = inner.proto == proto::ESP && self.opens_esp_to(flow.dst);
            if !nested {
                // The inner packet is parsed once; the policy check uses this flow.
                return match self.check_decapsulated_cached(&flow, &sp[..n]) {
                    Ok(()) if self.router && !self.is_local(flow.dst) => {
                        match decrement_ttl(pkt.data_mut(), &inner) {
                            Ok(()) => Verdict::Decapsulated(sp[0]),
                            Err(r) => self.drop_for(&sp[..n], r),
                        }
                    }
                    Ok(()) => Verdict::Decapsulated(sp[0]),
                    Err(r) => self.drop_for(&sp[..n], r),
                };
            }
            if n == MAX_NEST {
                return self.drop_for(&sp[..n], DropReason::BadInner);
            }
            (l3, dst) = (inner, flow.dst);
        }
    }

    /// RFC 3948 §2: on an encapsulation port, a lone 0xFF is a NAT keepalive,
    /// a zero non-ESP marker starts an IKE message (for the IKE daemon, never
    /// decrypted), anything else is ESP. The UDP checksum is not checked
    /// (§3.1.2: any value is accepted).
    fn udp_encapsulated(&mut self, pkt: &mut PacketBuf<'_>, l3: &L3, dst: IpAddr) -> Verdict {
        if l3.fragment {
            return Verdict::Drop(DropReason::Fragment);
        }
        let d = pkt.data();
        let Ok(u) = wire::udp::Packet::new_checked(&d[l3.upper_at..]) else {
            return Verdict::Drop(DropReason::Runt);
        };
        let payload = u.payload();
        if payload == [0xff] {
            return Verdict::Keepalive;
        }
        if payload.len() >= 4 && payload[..4] == [0, 0, 0, 0] {
            self.counters.ike += 1;
            return Verdict::Bypass;
        }
        if payload.len() < wire::esp::HEADER_LEN {
            return Verdict::Drop(DropReason::Runt);
        }
        // Trailing octets past the UDP length are not part of the ESP packet.
        let end = l3.upper_at + usize::from(u.len());
        pkt.truncate(end);
        let esp_l3 = L3 {
            upper_at: l3.upper_at + wire::udp::HEADER_LEN,
            udp_encap: true,
            ..*l3
        };
        self.inbound(pkt, &esp_l3, dst)
    }

    /// The path MTU for packets this engine encapsulates. A packet that would
    /// exceed it and may not be fragmented gets an ICMP "fragmentation needed"
    /// or "packet too big" with the MTU left after the IPsec overhead
    /// (RFC 4301 §8.2.1); one that may be fragmented is encapsulated, and the
    /// caller fragments the outer packet ([`crate::wire::frag`]).
    pub fn set_mtu(&mut self, mtu: Option<usize>) {
        self.mtu = mtu;
    }

    pub fn mtu(&self) -> Option<usize> {
        self.mtu
    }

    /// ICMP errors allowed per second (0: none are sent).
    pub fn set_icmp_rate(&mut self, per_second: u32) {
        self.icmp_rate = per_second;
        self.icmp_left = per_second;
    }

    /// Sets the caller's clock (seconds, any epoch). NAT keepalive timing uses it.
    pub fn set_time(&mut self, now: u64) {
        self.now = now;
    }

    /// RFC 3948 §4: for every outbound UDP-encapsulated SA that has sent
    /// nothing for `idle` seconds, builds a NAT keepalive (one 0xFF octet from
    /// the SA's source port to its destination port) into `buf` and hands it
    /// to `emit`. Call it about once a second.
    pub fn nat_keepalives(&mut self, idle: u64, buf: &mut [u8], mut emit: impl FnMut(&[u8])) {
        let now = self.now;
        let bound = self.tables.sad().id_bound();
        // A bounded sweep that goes on where the last one stopped: with
        // calls ten times a second, 100 000 SAs are all visited within the
        // 20 s a keepalive interval lasts, and no call stalls the worker.
        for _ in 0..bound.min(KEEPALIVE_SWEEP) {
            let id = self.keepalive_at % bound;
            self.keepalive_at = id + 1;
            let Some(core) = self.tables.sad().core(id) else {
                continue;
            };
            let Some(e) = core.cfg.encap else { continue };
            let (src, dst) = (core.cfg.src, core.cfg.dst);
            if !self.is_local(src) {
                continue;
            }
            let sa = self.run(id);
            if sa.last_tx == 0 {
                // First sight: start the idle timer now.
                sa.last_tx = now;
                continue;
            }
            if now.saturating_sub(sa.last_tx) < idle {
                continue;
            }
            sa.last_tx = now;
            let n = keepalive(buf, src, dst, e.sport, e.dport);
            emit(&buf[..n]);
        }
    }

    /// Counts `r` against the innermost SA of the path and drops.
    fn drop_for(&mut self, sp: &[SaId], r: DropReason) -> Verdict {
        if let Some(&id) = sp.last() {
            self.run(id).count_drop(r);
        }
        Verdict::Drop(r)
    }

    /// One layer of ESP: the SA, and the inner packet in `pkt` or a dummy
    /// packet (RFC 4303 §2.6).
    fn decap_one(
        &mut self,
        pkt: &mut PacketBuf<'_>,
        l3: &L3,
        dst: IpAddr,
    ) -> Result<(SaId, Decap), DecapErr> {
        if l3.fragment {
            // RFC 4303 §3.4.1: reassembly happens before ESP; we do not reassemble.
            return Err(Failed(DropReason::Fragment));
        }
        let d = pkt.data();
        let esp = wire::esp::Packet::new_checked(&d[l3.upper_at..])
            .map_err(|_| Failed(DropReason::Runt))?;
        let spi = esp.spi();
        if spi == 0 {
            return Err(Failed(DropReason::SpiZero));
        }
        let cached = match self.burst.sa_in {
            Some((d, s, id)) if s == spi && d == dst => Some(id),
            _ => None,
        };
        let Some(id) = cached.or_else(|| self.tables.sad().lookup_in(dst, spi)) else {
            if self.unknown_spi_second != Some(self.now) {
                self.unknown_spi_second = Some(self.now);
                self.event(SaEventKind::UnknownSpi, dst, spi, "");
            }
            return Err(Failed(DropReason::NoSa));
        };
        if self.burst.active {
            self.burst.sa_in = Some((dst, spi, id));
        }
        let worker = self.worker;
        let sa = self.run(id);
        if sa.core.cfg.encap.is_some() != l3.udp_encap {
            sa.count_drop(DropReason::EncapMismatch);
            return Err(Failed(DropReason::EncapMismatch));
        }
        // One replay window per SA (RFC 4303 §3.4.3): with several workers,
        // the owner's. No crypto is spent here on another worker's packets.
        if let Some(w) = sa.share.as_ref().map(|s| s.owner.load(Relaxed)) {
            if w != SaShare::NO_OWNER && w != worker {
                return Err(Owned(w));
            }
        }
        if !self.within_lifetime(id) {
            self.run(id).count_drop(DropReason::SaExpired);
            return Err(Failed(DropReason::SaExpired));
        }
        let sa = self.run(id);
        let r = inbound::decapsulate(sa, pkt, l3);
        let r = match (r, sa.share.as_ref()) {
            // Claimed only after the ICV verified, so forged packets on
            // another queue cannot take a tunnel away from its worker.
            (Ok(d), Some(s)) if s.owner.load(Relaxed) == worker => Ok(d),
            (Ok(d), Some(s)) => {
                match s
                    .owner
                    .compare_exchange(SaShare::NO_OWNER, worker, Relaxed, Relaxed)
                {
                    Ok(_) => Ok(d),
                    Err(o) if o == worker => Ok(d),
                    // Another worker claimed it at the same moment: this packet
                    // is already decrypted and cannot be handed over.
                    Err(_) => Err(DropReason::ForeignQueue),
                }
            }
            (r, _) => r,
        };
        match r {
            Err(r) => {
                sa.count_drop(r);
                Err(Failed(r))
            }
            Ok(d) => Ok((id, d)),
        }
    }

    /// [`Engine::check_decapsulated`], answered from the flow cache when this
    /// inner flow came through the same SA path before (in a burst only).
    fn check_decapsulated_cached(&mut self, flow: &Flow, sp: &[SaId]) -> Result<(), DropReason> {
        let n = self.tables_version();
        if let Some((p, k)) = self
            .burst
            .checked
            .get(n, flow)
            .filter(|_| self.burst.active)
        {
            if p[..k] == *sp {
                return Ok(());
            }
        }
        let r = self.check_decapsulated(flow, sp);
        if r.is_ok() && self.burst.active {
            let mut p = [0 as SaId; MAX_NEST];
            p[..sp.len()].copy_from_slice(sp);
            self.burst.checked.put(n, flow, (p, sp.len()));
        }
        r
    }

    /// RFC 4301 §5.2 step 4 and Linux `__xfrm_policy_check`: what came out of
    /// the SAs `sp` (outermost first) must match every SA's selector and an
    /// in/fwd policy whose templates, read from the last, name those SAs.
    fn check_decapsulated(&self, flow: &Flow, sp: &[SaId]) -> Result<(), DropReason> {
        let mut path = [None; MAX_NEST];
        for (slot, &id) in path.iter_mut().zip(sp) {
            let c = &self.core(id).cfg;
            if c.sel.as_ref().is_some_and(|sel| !sel.matches(flow)) {
                return Err(DropReason::PolicyMismatch);
            }
            *slot = Some(c);
        }
        let path = &path[..sp.len()];
        let all_transport = path.iter().flatten().all(|c| c.mode == Mode::Transport);
        // A transport-mode SA ends at this host (RFC 4301 §4.1), so what it
        // carries is checked against `in`; tunnel-mode traffic against `in` or
        // `fwd` by its inner destination.
        let innermost = path.last().copied().flatten().map(|c| c.mode);
        let dir = if innermost == Some(Mode::Transport) || self.is_local(flow.dst) {
            Direction::In
        } else {
            Direction::Fwd
        };
        match self.tables.spd().lookup(dir, flow) {
            Some(p) if p.action == Action::Block => Err(DropReason::Discard),
            Some(p) if templates_match(&p.tmpls, path) => Ok(()),
            Some(_) => Err(DropReason::PolicyMismatch),
            // No policy: transport-mode traffic is accepted when the default
            // allows; tunnel-mode traffic never is (XFRM's XfrmInNoPols).
            None if all_transport && self.tables.spd().default_action(dir) == Action::Allow => {
                Ok(())
            }
            None => Err(DropReason::NoPolicy),
        }
    }

    fn outbound(&mut self, pkt: &mut PacketBuf<'_>, l3: &L3, flow: &Flow) -> Verdict {
        let (b, n) = (&self.burst, self.tables_version());
        let decision = match b.out.get(n, flow).filter(|_| b.active) {
            Some(d) => d,
            None => {
                let d = self.out_decision(flow);
                if self.burst.active {
                    self.burst.out.put(n, flow, d);
                }
                d
            }
        };
        let (chain, k) = match decision {
            OutDecision::Done(v @ Verdict::Drop(DropReason::NoOutSa)) => {
                self.acquire(flow);
                return v;
            }
            OutDecision::Done(v) => return v,
            OutDecision::Forward => return self.forward_bypass(pkt, l3, flow),
            OutDecision::Protect(chain, k) => (chain, usize::from(k)),
        };
        let chain = &chain[..k];
        // The owner of the first SA encapsulates, so that its packets leave
        // in sequence-number order; the first worker to send claims it.
        if let Some(s) = self.shared.then(|| &self.core(chain[0]).share) {
            // A plain load first: the owner's own packets need no atomic write.
            let owner = s.owner.load(Relaxed);
            let claim = if owner == SaShare::NO_OWNER {
                s.owner
                    .compare_exchange(SaShare::NO_OWNER, self.worker, Relaxed, Relaxed)
            } else {
                Err(owner)
            };
            match claim {
                Ok(_) => {}
                Err(w) if w == self.worker => {}
                Err(w) => return Verdict::Handoff(w),
            }
        }
        if self.router {
            if let Err(r) = decrement_ttl(pkt.data_mut(), l3) {
                return self.icmp_error(pkt, l3, flow, IcmpKind::TimeExceeded, r);
            }
        }
        if let Some(mtu) = self.mtu {
            if let Some(v) = self.check_mtu(pkt, l3, flow, chain, mtu) {
                return v;
            }
        }
        // RFC 6437: only an IPv6 tunnel header carries the flow label.
        let v6_tunnel = chain.iter().any(|&id| {
            let c = &self.core(id).cfg;
            c.mode == Mode::Tunnel && c.dst.is_ipv6()
        });
        let mut params = OutParams {
            flow_label: if v6_tunnel { flow_label(flow) } else { 0 },
            reserve: 1,
        };
        let mut l3 = *l3;
        for &id in chain {
            if !self.within_lifetime(id) {
                // An SA that ran out of sequence numbers keeps saying so.
                let sa = self.run(id);
                let r = if sa.exhausted {
                    DropReason::SeqCycled
                } else {
                    DropReason::SaExpired
                };
                sa.count_drop(r);
                return Verdict::Drop(r);
            }
        }
        for (i, &id) in chain.iter().enumerate() {
            let b = &mut self.burst;
            let sa = self.runs.get(&self.tables, id, self.shared);
            sa.last_tx = self.now;
            // Reserve the burst's numbers only where end_burst will find them.
            let listed = b.reserved[..b.n_reserved].contains(&id);
            params.reserve = if b.active && (listed || b.n_reserved < MAX_RESERVED) {
                b.left.max(1)
            } else {
                1
            };
            let r = outbound::encapsulate(sa, pkt, &l3, &params);
            if sa.seq_block.is_some() && !listed {
                if let Some(slot) = b.reserved.get_mut(b.n_reserved) {
                    *slot = id;
                    b.n_reserved += 1;
                }
            }
            if let Err(r) = r {
                sa.count_drop(r);
                if r == DropReason::SeqCycled && !sa.expired {
                    // The end of the sequence space acts as a hard expiry.
                    sa.expired = true;
                    let (dst, spi) = (sa.core.cfg.dst, sa.core.cfg.spi);
                    self.event(SaEventKind::HardExpire, dst, spi, "sequence");
                }
                return Verdict::Drop(r);
            }
            // Only a further layer needs the new header's facts.
            if i + 1 < chain.len() {
                match parse_ro(pkt.data()) {
                    Ok((next, _)) => l3 = next,
                    Err(r) => return Verdict::Drop(r),
                }
            }
        }
        Verdict::Encapsulated(chain[0])
    }

    /// The SPD and SAD part of outbound processing for `flow`.
    fn out_decision(&self, flow: &Flow) -> OutDecision {
        use OutDecision::{Done, Forward, Protect};
        // Inbound check on plaintext (RFC 4301 §5.2 step 3a): a packet that a
        // policy says must arrive protected is dropped when it arrives in clear.
        let local = self.is_local(flow.dst);
        let dir = if local { Direction::In } else { Direction::Fwd };
        match self.tables.spd().lookup(dir, flow) {
            Some(p) if p.action == Action::Block => {
                return Done(Verdict::Drop(DropReason::Discard))
            }
            Some(p) if p.requires_protection() => {
                return Done(Verdict::Drop(DropReason::UnprotectedInbound))
            }
            Some(_) => {}
            None if self.tables.spd().default_action(dir) == Action::Block => {
                return Done(Verdict::Drop(DropReason::NoPolicy))
            }
            None => {}
        }
        if local {
            // Addressed to this host and allowed: delivered, not forwarded.
            return Done(Verdict::Bypass);
        }
        let Some(p) = self.tables.spd().lookup(Direction::Out, flow) else {
            return match self.tables.spd().default_action(Direction::Out) {
                Action::Allow => Forward,
                Action::Block => Done(Verdict::Drop(DropReason::NoPolicy)),
            };
        };
        if p.action == Action::Block {
            return Done(Verdict::Drop(DropReason::Discard));
        }
        // An SA bundle applies its templates in order: the first innermost
        // (XFRM), e.g. transport end to end, then the tunnel to the gateway.
        // Resolve the whole chain before touching the packet.
        let mut chain = [0 as SaId; MAX_NEST];
        let mut k = 0;
        for t in p.tmpls.iter().take(MAX_NEST) {
            match self.tables.sad().lookup_out(t, flow) {
                Some(id) => {
                    chain[k] = id;
                    k += 1;
                }
                None if t.level == Level::Use => {}
                None => return Done(Verdict::Drop(DropReason::NoOutSa)),
            }
        }
        if k == 0 {
            return Forward;
        }
        Protect(chain, k as u8)
    }

    /// RFC 4301 §5.1 step 3a: a PROTECT policy matched and its SA does not
    /// exist — the packet is dropped (XFRM's larval state does the same)
    /// and the IKE daemon hears of it once a second per policy, with the
    /// policy and the packet's selector fields, to negotiate the SA (Linux's
    /// XFRM_MSG_ACQUIRE; strongSwan's `start_action = trap`).
    fn acquire(&mut self, flow: &Flow) {
        let Some(p) = self.tables.spd().lookup(Direction::Out, flow) else {
            return;
        };
        if self.acquired.get(&p.sel) == Some(&self.now) || self.events.len() >= MAX_EVENTS {
            return;
        }
        let Some(t) = p
            .tmpls
            .iter()
            .find(|t| t.level == Level::Required && self.tables.sad().lookup_out(t, flow).is_none())
            .copied()
        else {
            return;
        };
        let (sel, priority) = (p.sel, p.priority);
        if self.acquired.len() >= MAX_ACQUIRING {
            self.acquired.clear();
        }
        self.acquired.insert(sel, self.now);
        self.events.push(SaEvent {
            kind: SaEventKind::Acquire,
            dst: t.dst.unwrap_or(flow.dst),
            spi: 0,
            why: "",
            acquire: Some(Acquire {
                policy: sel,
                priority,
                tmpl: t,
                flow: *flow,
            }),
        });
    }

    /// BYPASS of a packet that is not for this host: forwarded in clear,
    /// one hop less in router mode.
    fn forward_bypass(&mut self, pkt: &mut PacketBuf<'_>, l3: &L3, flow: &Flow) -> Verdict {
        if self.router {
            if let Err(r) = decrement_ttl(pkt.data_mut(), l3) {
                return self.icmp_error(pkt, l3, flow, IcmpKind::TimeExceeded, r);
            }
        }
        Verdict::Bypass
    }

    /// RFC 4301 §8.2.1 / §8.1: `None` to go on and encapsulate (it fits, or
    /// the outer packet may be fragmented by the caller), or the verdict for a
    /// packet that is too big and may not be fragmented.
    fn check_mtu(
        &mut self,
        pkt: &mut PacketBuf<'_>,
        l3: &L3,
        flow: &Flow,
        chain: &[SaId],
        mtu: usize,
    ) -> Option<Verdict> {
        let keep = if l3.version == 4 {
            l3.upper_at
        } else {
            l3.esp_at
        };
        let mut len = pkt.len();
        let mut keep_now = keep;
        for &id in chain {
            len = outbound::encapsulated_len(self.core(id), len, keep_now);
            keep_now = 0;
        }
        if len <= mtu {
            return None;
        }
        // The largest inner packet that fits, from the outermost SA inwards.
        let mut fit = mtu;
        for (i, &id) in chain.iter().enumerate().rev() {
            fit = outbound::max_inner(self.core(id), fit, if i == 0 { keep } else { 0 });
        }
        // IPv4 without DF: encapsulate; the outer packet will be fragmented.
        // IPv6 of at most 1280 octets must get through whatever the tunnel's
        // MTU (RFC 8200 §5): fragment the outer packet for it too.
        let may_fragment = (l3.version == 4 && !l3.df) || (l3.version == 6 && pkt.len() <= 1280);
        if may_fragment {
            return None;
        }
        Some(self.icmp_error(
            pkt,
            l3,
            flow,
            IcmpKind::TooBig(fit),
            DropReason::PacketTooBig,
        ))
    }

    /// Replaces the packet with an ICMP error to its source: "fragmentation
    /// needed" (RFC 792, RFC 1191) / ICMPv6 "packet too big" (RFC 4443 §3.2)
    /// reporting an MTU, or "time exceeded" (RFC 792 / RFC 4443 §3.3), from an
    /// address of this host of the same family; rate limited. Without a
    /// source address or budget the packet is dropped for `r`.
    fn icmp_error(
        &mut self,
        pkt: &mut PacketBuf<'_>,
        l3: &L3,
        flow: &Flow,
        kind: IcmpKind,
        r: DropReason,
    ) -> Verdict {
        if self.icmp_second != self.now {
            self.icmp_second = self.now;
            self.icmp_left = self.icmp_rate;
        }
        let v4 = l3.version == 4;
        let Some(src) = (self.icmp_src.iter().chain(self.tables.local()))
            .copied()
            .find(|a| a.is_ipv4() == v4)
        else {
            return Verdict::Drop(r);
        };
        if self.icmp_left == 0 || pkt.headroom() < 48 {
            return Verdict::Drop(r);
        }
        self.icmp_left -= 1;
        match (src, flow.src) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                // RFC 1812 §4.3.2.3: quote as much as fits in 576 octets.
                pkt.truncate(576 - 28);
                pkt.prepend(28).expect("headroom checked");
                let n = pkt.len();
                let b = pkt.data_mut();
                b[..28].fill(0);
                match kind {
                    IcmpKind::TooBig(mtu) => {
                        b[20] = 3; // destination unreachable
                        b[21] = 4; // fragmentation needed and DF set
                        b[26..28].copy_from_slice(&(mtu.min(0xffff) as u16).to_be_bytes());
                    }
                    IcmpKind::TimeExceeded => b[20] = 11, // code 0: TTL exceeded in transit
                }
                let c = !wire::checksum::sum(&b[20..n]);
                b[22..24].copy_from_slice(&c.to_be_bytes());
                let mut ip = ipv4::Packet::new_unchecked(&mut b[..]);
                ip.set_version_header_len(20);
                ip.set_tos(0xc0); // network control
                ip.set_total_len(n as u16);
                ip.set_ttl(outbound::OUTER_TTL);
                ip.set_protocol(proto::ICMP);
                ip.set_src_addr(s);
                ip.set_dst_addr(d);
                ip.fill_checksum();
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                // RFC 4443 §3.2: as much of the packet as fits in 1280 octets.
                pkt.truncate(1280 - 48);
                pkt.prepend(48).expect("headroom checked");
                let n = pkt.len();
                let b = pkt.data_mut();
                b[..48].fill(0);
                match kind {
                    IcmpKind::TooBig(mtu) => {
                        b[40] = 2; // packet too big
                        b[44..48].copy_from_slice(&(mtu as u32).to_be_bytes());
                    }
                    IcmpKind::TimeExceeded => b[40] = 3, // code 0: hop limit exceeded
                }
                let len = ((n - 40) as u32).to_be_bytes();
                let c = !wire::checksum::combine(&[
                    wire::checksum::sum(&s.octets()),
                    wire::checksum::sum(&d.octets()),
                    wire::checksum::sum(&len),
                    u16::from(proto::ICMPV6),
                    wire::checksum::sum(&b[40..n]),
                ]);
                b[42..44].copy_from_slice(&c.to_be_bytes());
                let mut ip = ipv6::Packet::new_unchecked(&mut b[..]);
                ip.set_ver_tc_flow(0xc0, 0);
                ip.set_payload_len((n - 40) as u16);
                ip.set_next_header(proto::ICMPV6);
                ip.set_hop_limit(outbound::OUTER_TTL);
                ip.set_src_addr(s);
                ip.set_dst_addr(d);
            }
            _ => return Verdict::Drop(r),
        }
        Verdict::Icmp(r)
    }
}

/// RFC 1812 §5.3.1 / RFC 8200 §3: a forwarded packet's TTL / hop limit goes
/// down by one; one that would reach 0 is not forwarded. The IPv4 header
/// checksum is updated incrementally (RFC 1624 eqn. 3).
fn decrement_ttl(ip: &mut [u8], l3: &L3) -> Result<(), DropReason> {
    let at = if l3.version == 4 { 8 } else { 7 };
    let Some(&ttl) = ip.get(at) else {
        return Err(DropReason::Runt);
    };
    if ttl <= 1 {
        return Err(DropReason::TtlExceeded);
    }
    ip[at] = ttl - 1;
    if l3.version == 4 {
        // HC' = ~(~HC + ~m + m'), m = the TTL/protocol word.
        let old = u16::from_be_bytes([ttl, ip[9]]);
        let new = u16::from_be_bytes([ttl - 1, ip[9]]);
        let hc = u16::from_be_bytes([ip[10], ip[11]]);
        let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    }
    Ok(())
}

/// XFRM's `xfrm_policy_ok` walk: templates from the last (outermost) to the
/// first against the SA path from the outermost; a `level use` template may be
/// missing; SAs left over must be transport mode (`secpath_has_nontransport`).
fn templates_match(tmpls: &[Template], path: &[Option<&SaConfig>]) -> bool {
    let mut k = 0;
    for t in tmpls.iter().rev() {
        if let Some(Some(c)) = path.get(k) {
            if t.accepts(c.mode, c.reqid, c.spi, c.src, c.dst) {
                k += 1;
                continue;
            }
        }
        if t.level != Level::Use {
            return false;
        }
    }
    path[k..]
        .iter()
        .flatten()
        .all(|c| c.mode == Mode::Transport)
}

/// A NAT keepalive datagram (RFC 3948 §2.3) from `src:sport` to `dst:dport`
/// written into `buf`; returns its length. UDP checksum 0 over IPv4.
fn keepalive(buf: &mut [u8], src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> usize {
    let hl = if src.is_ipv4() {
        ipv4::HEADER_LEN
    } else {
        ipv6::HEADER_LEN
    };
    let n = hl + wire::udp::HEADER_LEN + 1;
    let b = &mut buf[..n];
    b.fill(0);
    wire::udp::emit(&mut b[hl..], sport, dport, 9);
    b[n - 1] = 0xff;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = ipv4::Packet::new_unchecked(&mut b[..]);
            p.set_version_header_len(hl);
            p.set_total_len(n as u16);
            p.set_ttl(outbound::OUTER_TTL);
            p.set_protocol(proto::UDP);
            p.set_src_addr(s);
            p.set_dst_addr(d);
            p.fill_checksum();
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = ipv6::Packet::new_unchecked(&mut b[..]);
            p.set_ver_tc_flow(0, 0);
            p.set_payload_len(9);
            p.set_next_header(proto::UDP);
            p.set_hop_limit(outbound::OUTER_TTL);
            p.set_src_addr(s);
            p.set_dst_addr(d);
            let c = wire::udp::checksum_v6(&s.octets(), &d.octets(), &b[hl..]);
            b[hl + 6..hl + 8].copy_from_slice(&c.to_be_bytes());
        }
        _ => unreachable!("Sa::new refuses mixed-family endpoints"),
    }
    n
}

/// RFC 6437 §3: a tunnel endpoint may set the outer flow label from a hash of
/// the inner flow, so ECMP can spread tunnels without looking inside ESP.
/// This host's addresses as the engine sees them (sorted): `extra` (the
/// gateway passes every address of its namespace; `espd pcap` its
/// `--local`) and those the policies imply — the `tmpl src` of `out`
/// policies and the `tmpl dst` of `in`/`fwd` policies.
pub fn local_addrs(spd: &Spd, extra: &[IpAddr]) -> Vec<IpAddr> {
    let mut local: Vec<IpAddr> = extra.to_vec();
    for dir in Direction::ALL {
        for p in spd.policies(dir) {
            for t in &p.tmpls {
                let a = if dir == Direction::Out { t.src } else { t.dst };
                if let Some(a) = a.filter(|a| !a.is_unspecified()) {
                    local.push(a);
                }
            }
        }
    }
    local.sort();
    local.dedup();
    local
}

/// The addresses whose ESP is ours to open (RFC 4301 §4.4.2), sorted:
/// `local` ([`local_addrs`]) and the destination of every SA whose source
/// is not one of them — an SA from one of our addresses is outbound and its
/// destination is the peer's. A configuration of bare states with no
/// policies and no `--local` thus opens ESP to every SA's destination.
pub fn esp_addrs(sad: &Sad, local: &[IpAddr]) -> Vec<IpAddr> {
    let mut out = local.to_vec();
    out.extend(
        sad.iter()
            .filter(|sa| local.binary_search(&sa.cfg.src).is_err())
            .map(|sa| sa.cfg.dst),
    );
    out.sort();
    out.dedup();
    out
}

pub fn flow_label(f: &Flow) -> u32 {
    // FNV-1a over the 5-tuple.
    let mut h: u32 = 0x811c_9dc5;
    let mut eat = |b: &[u8]| {
        for x in b {
            h ^= u32::from(*x);
            h = h.wrapping_mul(0x0100_0193);
        }
    };
    match (f.src, f.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            eat(&s.octets());
            eat(&d.octets());
        }
        (s, d) => {
            eat(&ipv6_octets(s));
            eat(&ipv6_octets(d));
        }
    }
    eat(&[f.proto]);
    if let Some(p) = f.ports {
        eat(&p.sport.to_be_bytes());
        eat(&p.dport.to_be_bytes());
    }
    (h ^ (h >> 20)) & 0x000f_ffff
}

fn ipv6_octets(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
        IpAddr::V6(v) => v.octets(),
    }
}

fn map_wire(e: wire::Error) -> DropReason {
    match e {
        wire::Error::Truncated => DropReason::Runt,
        wire::Error::Malformed => DropReason::BadHeader,
    }
}

/// Checks the headers of an IP packet, trims link-layer padding and returns
/// what processing needs.
// Inlined: its result is large, and built in place it is not copied.
#[inline(always)]
fn parse(pkt: &mut PacketBuf<'_>) -> Result<(L3, Flow), DropReason> {
    let (l3, flow, len) = parse_inner(pkt.data())?;
    pkt.truncate(len);
    Ok((l3, flow))
}

// Inlined: its result is large, and built in place it is not copied.
#[inline(always)]
fn parse_ro(d: &[u8]) -> Result<(L3, Flow), DropReason> {
    parse_inner(d).map(|(a, b, _)| (a, b))
}

/// Checks the headers of the IP packet at the start of `d`: its L3 facts, its
/// selector fields, and its length without link-layer padding.
pub fn parse_ip(d: &[u8]) -> Result<(L3, Flow, usize), DropReason> {
    parse_inner(d)
}

/// Completes a TCP or UDP checksum left partial by checksum offload.
///
/// A sender that offloads its checksum (`CHECKSUM_PARTIAL`) writes only the
/// folded pseudo-header sum into the checksum field and leaves the rest to
/// the NIC. On veth no NIC ever does it, and a frame taken by XDP into
/// AF_XDP keeps the partial value, which the far host would reject. When the
/// checksum does not verify and the field holds exactly the pseudo-header
/// sum, this computes the real one (RFC 793 / RFC 768 / RFC 8200 §8.1) and
/// returns true. A correct checksum, fragments and other protocols are left
/// alone. For the inside interface of virtual links only (see
/// docs/operations.md): a real NIC never hands partial checksums to RX.
pub fn complete_partial_checksum(ip: &mut [u8]) -> bool {
    use wire::checksum::{combine, sum};
    let Ok((l3, flow, len)) = parse_inner(ip) else {
        return false;
    };
    let at = match l3.proto {
        proto::TCP => 16,
        proto::UDP => 6,
        _ => return false,
    };
    if l3.fragment || len > ip.len() || l3.upper_at + at + 2 > len {
        return false;
    }
    let l4_len = len - l3.upper_at;
    let pseudo = match (flow.src, flow.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => combine(&[
            sum(&s.octets()),
            sum(&d.octets()),
            u16::from(l3.proto),
            l4_len as u16,
        ]),
        (IpAddr::V6(s), IpAddr::V6(d)) => combine(&[
            sum(&s.octets()),
            sum(&d.octets()),
            sum(&(l4_len as u32).to_be_bytes()),
            u16::from(l3.proto),
        ]),
        _ => return false,
    };
    let l4 = &mut ip[l3.upper_at..len];
    let field = u16::from_be_bytes([l4[at], l4[at + 1]]);
    if field != pseudo || (l3.proto == proto::UDP && field == 0 && l3.version == 4) {
        return false;
    }
    if combine(&[pseudo, sum(l4)]) == 0xffff {
        return false; // it verifies: not partial
    }
    l4[at..at + 2].fill(0);
    let mut c = !combine(&[pseudo, sum(l4)]);
    if c == 0 && l3.proto == proto::UDP {
        c = 0xffff; // RFC 768: a computed 0 is sent as all ones
    }
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

// Inlined: its result is large, and built in place it is not copied.
#[inline(always)]
fn parse_inner(d: &[u8]) -> Result<(L3, Flow, usize), DropReason> {
    match d.first().map(|b| b >> 4) {
        None => Err(DropReason::Runt),
        Some(4) => {
            let p = ipv4::Packet::new_checked(d).map_err(map_wire)?;
            if !p.verify_checksum() {
                return Err(DropReason::BadChecksum);
            }
            let hl = p.header_len();
            let l3 = L3 {
                version: 4,
                proto: p.protocol(),
                upper_at: hl,
                upper_nh_at: 9,
                esp_at: hl,
                esp_nh_at: 9,
                fragment: p.is_fragment(),
                later_fragment: p.is_later_fragment(),
                tos: p.tos(),
                df: p.dont_frag(),
                udp_encap: false,
            };
            let ports = if l3.later_fragment {
                None
            } else {
                l4::ports(l3.proto, p.payload())
            };
            let flow = Flow {
                src: p.src_addr().into(),
                dst: p.dst_addr().into(),
                proto: l3.proto,
                ports,
            };
            Ok((l3, flow, usize::from(p.total_len())))
        }
        Some(6) => {
            let p = ipv6::Packet::new_checked(d).map_err(map_wire)?;
            let c = p.walk().map_err(map_wire)?;
            let l3 = L3 {
                version: 6,
                proto: c.upper,
                upper_at: c.upper_at,
                upper_nh_at: c.upper_nh_at,
                esp_at: c.esp_at,
                esp_nh_at: c.esp_nh_at,
                fragment: c.fragment.is_some(),
                later_fragment: c.fragment.is_some_and(|(off, _)| off != 0),
                tos: p.traffic_class(),
                df: false,
                udp_encap: false,
            };
            let ports = if l3.later_fragment {
                None
            } else {
                l4::ports(l3.proto, &p.packet()[c.upper_at..])
            };
            let flow = Flow {
                src: p.src_addr().into(),
                dst: p.dst_addr().into(),
                proto: l3.proto,
                ports,
            };
            Ok((l3, flow, p.total_len()))
        }
        Some(_) => Err(DropReason::BadHeader),
    }
}
