//! The engine: checks a packet's headers once, classifies it, and runs it
//! through the SPD and the SAD — the RFC 4301 §5 processing model with Linux
//! XFRM's semantics. Sans-IO: the caller hands in a buffer and gets a verdict.
//!
//! One file per stage, in the packet's order: [`parse`] (header checks),
//! `inbound` (ESP for us, then the policy check on what came out),
//! `outbound` (the SPD decision, the SAs of a bundle, TTL, MTU, NAT
//! keepalives), `icmp` (the errors it answers with), `lifetime` (lifetimes,
//! events, acquires) and `burst` (flow caches and per-burst reservations).
//! This file holds the engine's state: the shared tables
//! ([`crate::state::Tables`]) it runs on and its own runtime state of the
//! SAs it uses.
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
use crate::esp::inbound::{self as esp_in, Decap};
use crate::esp::outbound::{self as esp_out, OutParams};
use crate::esp::L3;
use crate::state::spd::{Action, Direction, Level};
use crate::state::{Flow, Mode, Sa, SaConfig, SaId, SaShare, Sad, Selector, Spd, Tables, Template};
use crate::wire::{self, l4, proto};
use core::net::IpAddr;
use core::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

mod burst;
mod icmp;
mod inbound;
mod lifetime;
mod outbound;
mod parse;

pub use burst::Burst;
use burst::*;
pub use icmp::ICMP_PER_SECOND;
use icmp::*;
pub use lifetime::{Acquire, SaEvent, SaEventKind, MAX_EVENTS};
pub use outbound::KEEPALIVE_SWEEP;
use outbound::*;
use parse::*;
pub use parse::{complete_partial_checksum, parse_ip};

/// The most ESP layers one packet may carry (an SA bundle), as XFRM's
/// XFRM_MAX_DEPTH bounds it.
pub const MAX_NEST: usize = 4;

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
    counters: Counters,
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
    /// Set for the packet [`Engine::process_forwarded`] runs: it was
    /// decapsulated and checked against its SA already.
    forwarded: bool,
    /// Set for the packet [`Engine::process_own_datagram`] runs: this
    /// host's own datagram, whose outer packet the caller may fragment.
    own_datagram: bool,
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

/// RFC 6437 §3: a tunnel endpoint may set the outer flow label from a hash of
/// the inner flow, so ECMP can spread tunnels without looking inside ESP.
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
            forwarded: false,
            own_datagram: false,
            worker: 0,
            icmp_src: Vec::new(),
            events: Vec::with_capacity(MAX_EVENTS),
            unknown_spi_second: None,
            burst: BurstCache::default(),
            keepalive_at: 0,
            acquired: Default::default(),
        }
    }

    /// This engine's verdict counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counts a drop its caller made before the engine saw the packet (a
    /// frame too short to hold an IP header, a buffer too small), with the
    /// engine's own, so one set of counters tells all.
    pub fn count_drop(&mut self, r: DropReason) {
        self.counters.dropped += 1;
        self.counters.drops[r as usize] += 1;
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
        // Newer tables of the same line void the flow caches by their
        // version tag alone; others (older, or unrelated tables that may
        // reuse a version) are cleared.
        let newer = t.version() > self.tables.version();
        match t.changed_since(self.tables.version()) {
            Some(ids) if newer => {
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
        if !newer {
            self.burst.out.clear();
            self.burst.checked.clear();
        }
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

    /// Processes a packet this engine decapsulated that a gateway forwards
    /// out of the interface it came in by (one road warrior to another):
    /// outbound processing only (RFC 4301 §5.1) — its inbound policy check
    /// (§5.2) was made against the SA it arrived in, and a plaintext check
    /// against the `fwd` policies would drop it as unprotected.
    pub fn process_forwarded(&mut self, pkt: &mut PacketBuf<'_>) -> Verdict {
        self.forwarded = true;
        let v = self.process(pkt);
        self.forwarded = false;
        v
    }

    /// Processes a datagram this host sent and its stack fragmented, which
    /// the caller reassembled (host mode): RFC 4301 §7 carries only whole
    /// datagrams in transport mode, and fragmentation belongs after IPsec
    /// processing, so the outer packet may be larger than the MTU for IPv6
    /// too (this host is its source, RFC 8200 §4.5): the caller fragments it.
    pub fn process_own_datagram(&mut self, pkt: &mut PacketBuf<'_>) -> Verdict {
        self.own_datagram = true;
        let v = self.process(pkt);
        self.own_datagram = false;
        v
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

    /// Sets the caller's clock (seconds, any epoch). NAT keepalive timing uses it.
    pub fn set_time(&mut self, now: u64) {
        self.now = now;
    }
}
