//! One worker: a pinned thread that owns one queue of each interface (one
//! UMEM shared by their sockets: inside, outside, and the host pair of a
//! gateway that protects its own traffic too), its own engine, and a
//! next-hop cache. It busy-polls the RX rings in bursts, runs the engine on
//! each frame in place, writes the Ethernet header for the next hop and
//! queues the frame on the TX ring of the interface it leaves by — or gives
//! it back, counted.

use super::nexthop::{Cache, Resolved};
use espd_core::engine::{complete_partial_checksum, Counters, Engine, Verdict};
use espd_core::wire::ethernet;
use espd_core::{DropReason, PacketBuf};
use espd_io::xsk::{Out, PortStats, WorkerPorts, INSIDE, OUTSIDE, SIDES};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Frames taken from one RX ring per turn.
pub const BURST: usize = 64;
/// Where the IP packet is moved to in its frame before the engine runs:
/// room for the Ethernet header and four nested ESP headers in front.
const HEADROOM: usize = 512;
const ETH: usize = 14;
/// The side a hair-pinned packet is queued with in [`Reinject`] (a
/// pseudo-side, past the interfaces' [`SIDES`]).
const HAIRPIN: usize = SIDES;
/// The side of a finished IP packet queued in [`Reinject`]: a fragment of
/// an outer packet larger than the MTU, or this host's own datagram after
/// the engine; only its next hop and Ethernet header are left to do.
const FINISHED: usize = SIDES + 1;
/// The tag of a held decapsulated packet (its way out decided on release).
const HELD_DECAPSULATED: u8 = 1;
/// How long a frame may wait for its next hop to resolve.
const HOLD_FOR: Duration = Duration::from_secs(3);
/// Empty turns before the worker sleeps in poll(2) (1 ms at most).
const SPIN: u32 = 256;

/// A packet handed to the worker that owns its SA: the received Ethernet
/// frame as the engine saw it (unchanged), and the side it came in on.
pub struct Slot {
    len: u16,
    side: u8,
    data: [u8; SLOT_BYTES],
}

/// Largest frame that can be handed over (a 1500-octet MTU frame fits).
const SLOT_BYTES: usize = 2048;
/// Packets waiting for one worker at most; more are dropped as `HandoffFull`.
pub const HANDOFF_QUEUE: usize = 1024;

/// Frames made inside the worker (inner fragments) waiting to be processed
/// as if received on `side`: Ethernet frames end to end in `arena`. Both
/// vectors keep their capacity, so steady traffic allocates nothing.
#[derive(Default)]
pub struct Reinject {
    arena: Vec<u8>,
    list: Vec<(usize, usize, usize)>,
    scratch: Vec<u8>,
    /// The Identification of the next IPv6 fragment set this worker makes.
    frag_id: u32,
}

impl Reinject {
    /// Queues a finished IP packet (side [`FINISHED`]), split into
    /// fragments of at most `mtu` octets if it is larger (RFC 791 for IPv4
    /// without DF; RFC 8200 §4.5 for IPv6, which espd fragments only as the
    /// source of the packet: `v6` says it is). `Err` changes nothing.
    fn finished(&mut self, ip: &[u8], mtu: usize, v6: bool) -> Result<usize, DropReason> {
        if ip.len() <= mtu {
            self.push(FINISHED, ip);
            return Ok(1);
        }
        self.fragments(FINISHED, ip, mtu, v6)
            .ok_or(DropReason::PacketTooBig)
    }

    /// One packet queued for `side`, behind an Ethernet header of which
    /// the worker reads only the EtherType.
    fn push(&mut self, side: usize, ip: &[u8]) {
        let ty: u16 = if ip.first().is_some_and(|b| b >> 4 == 6) {
            0x86dd
        } else {
            0x0800
        };
        let off = self.arena.len();
        self.arena.extend_from_slice(&[0u8; 12]);
        self.arena.extend_from_slice(&ty.to_be_bytes());
        self.arena.extend_from_slice(ip);
        self.list.push((side, off, ETH + ip.len()));
    }

    /// `ip` split into fragments of at most `mtu` octets (`wire::frag`),
    /// each queued for `side`; how many, or `None` (nothing queued) if it
    /// may not be fragmented (IPv4 DF; IPv6 unless `v6`).
    fn fragments(&mut self, side: usize, ip: &[u8], mtu: usize, v6: bool) -> Option<usize> {
        if self.scratch.len() < mtu {
            self.scratch.resize(mtu.max(9216), 0);
        }
        let (before_list, before_arena) = (self.list.len(), self.arena.len());
        let mut scratch = std::mem::take(&mut self.scratch);
        let r = match ip.first().map(|b| b >> 4) {
            Some(4) => espd_core::wire::frag::ipv4(ip, mtu, &mut scratch, |f| self.push(side, f)),
            Some(6) if v6 => {
                self.frag_id = self.frag_id.wrapping_add(1);
                let id = self.frag_id;
                espd_core::wire::frag::ipv6(ip, mtu, id, &mut scratch, |f| self.push(side, f))
            }
            _ => {
                self.scratch = scratch;
                return None;
            }
        };
        self.scratch = scratch;
        match r {
            Ok(_) => Some(self.list.len() - before_list),
            Err(_) => {
                self.list.truncate(before_list);
                self.arena.truncate(before_arena);
                None
            }
        }
    }
}

/// Outer reassembly of raw ESP fragments for this gateway (RFC 4303
/// §3.4.1), one table per worker: a NIC hashes the fragments of one
/// datagram to one queue (they share addresses and carry no ports), and a
/// veth receives them on the queue they were sent on.
pub struct Reasm {
    table: espd_core::reasm::Reassembler,
    out: Vec<u8>,
    now_ms: u64,
    /// Host mode: this host's own datagrams, fragmented by its stack on
    /// the way into the pair (made at the first fragment).
    own: Option<Box<OwnReasm>>,
}

/// The reassembly of a host's own fragments, and room to encapsulate the
/// whole datagram (up to 64 KiB) outside the UMEM frames.
struct OwnReasm {
    table: espd_core::reasm::Reassembler,
    out: Vec<u8>,
    big: Vec<u8>,
}

/// The largest datagram an IP header describes.
const MAX_DATAGRAM: usize = 65_535;

impl OwnReasm {
    fn new() -> Self {
        use espd_core::reasm::{Limits, Reassembler};
        OwnReasm {
            // One source (this host): no per-source share.
            table: Reassembler::new(Limits {
                datagram: MAX_DATAGRAM,
                per_source: 1024,
                ..Default::default()
            }),
            out: vec![0; MAX_DATAGRAM],
            big: vec![0; HEADROOM + MAX_DATAGRAM + 512],
        }
    }
}

impl Reasm {
    /// A gateway's table takes datagrams up to a frame; a host's up to
    /// 64 KiB (a larger one is decapsulated outside the frames and reaches
    /// the host in fragments: its peer may send what its stack sends).
    pub fn new(host: bool) -> Self {
        let datagram = if host { MAX_DATAGRAM } else { FRAME_ROOM };
        Reasm {
            table: espd_core::reasm::Reassembler::new(espd_core::reasm::Limits {
                datagram,
                ..Default::default()
            }),
            out: vec![0; datagram],
            now_ms: 0,
            own: None,
        }
    }
}

/// The largest IP packet a frame takes at HEADROOM with room after it.
const FRAME_ROOM: usize = 4096 - HEADROOM - 256;

/// What reassembly made of a received packet.
enum Whole {
    /// Not a raw ESP fragment: as it was.
    No,
    /// Held (or dropped, counted): nothing to process now.
    Taken,
    /// The datagram it completed, now at HEADROOM, this long.
    Done(usize),
}

/// Room kept below the outside MTU when fragmenting before encapsulation:
/// outer IPv6 (40) + UDP (8) + ESP header and IV (16) + padding, trailer
/// and ICV (at most 17 + 16), rounded up.
const PREFRAG_OVERHEAD: usize = 100;

/// What a worker publishes for the stats loop (a few times a second).
#[derive(Clone, Default)]
pub struct Snapshot {
    pub engine: Counters,
    /// Drops outside the engine (no route, neighbour, TX ring), by reason.
    pub io_drops: espd_core::drop::DropCounts,
    /// Frames that were not IPv4/IPv6 (the XDP programs pass those; 0).
    pub not_ip: u64,
    pub ports: PortStats,
    /// Per SA this worker used, by SA id: a persistent map, so publishing
    /// costs O(SAs used since the last time), not O(SAs).
    pub sa: espd_core::state::CMap<usize, SaStat>,
    /// IPv4 packets without DF fragmented before encapsulation, and the fragments.
    pub prefragmented: u64,
    /// Decapsulated packets whose next hop is the outside, sent through the
    /// outbound SPD (another tunnel, a bypass, or a drop).
    pub hairpinned: u64,
    pub prefragments: u64,
    /// Packets fragmented after encapsulation (too big for the MTU, allowed
    /// to be fragmented), and the fragments.
    pub fragmented: u64,
    pub fragments: u64,
    /// Host mode: the host's own datagrams reassembled before the engine.
    pub own_reassembled: u64,
    /// Partial TCP/UDP checksums completed (virtual inside links).
    pub csum_fixed: u64,
    /// Outer reassembly: datagrams completed, and the most in progress at once.
    pub reassembled: u64,
    pub reassembly_peak: usize,
    pub busy_turns: u64,
    pub turns: u64,
    /// The longest turn (not counting sleep in poll(2)) since the start,
    /// and since the last publication, in nanoseconds: a stall shows here.
    pub max_turn_ns: u64,
    pub max_turn_recent_ns: u64,
    /// Tables taken (each a configuration change reaching this worker).
    pub tables_taken: u64,
    /// Turns by how long they took (not counting sleep in poll(2)): fewer
    /// than 10, 20, 50, 100, 200, 500 µs, 1, 2, 5 ms, and longer.
    pub turn_hist: [u64; TURN_BUCKETS.len() + 1],
}

/// The bounds of [`Snapshot::turn_hist`], in nanoseconds.
pub const TURN_BUCKETS: [u64; 9] = [
    10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000, 5_000_000,
];

/// What a worker lets go of after taking new tables: freed on the control
/// side (RCU's deferred reclamation), not on the worker's time. Its
/// fields are held only to be dropped there.
#[allow(dead_code)]
pub struct Retired {
    pub tables: Arc<espd_core::state::Tables>,
    pub sas: Vec<espd_core::state::Sa>,
}

/// One SA's counters on one worker.
#[derive(Clone, Copy, Default)]
pub struct SaStat {
    pub packets: u64,
    pub bytes: u64,
    pub drops: espd_core::drop::DropCounts,
    pub oseq: u64,
}

pub struct Worker {
    pub ports: WorkerPorts,
    pub engine: Engine,
    pub cache: Cache,
    /// MAC addresses of the interfaces, by side (`xsk::INSIDE`, ...).
    pub macs: [[u8; 6]; SIDES],
    /// Largest IP packet each interface sends (its MTU).
    pub mtu: [usize; SIDES],
    /// Complete partial checksums of frames from this side (veth & co.).
    pub fix_csum: [bool; SIDES],
    /// The side of the host pair: `INSIDE` in host mode alone, `HOST`
    /// for a gateway that protects its own traffic too, `None` for a
    /// gateway.
    pub host: Option<usize>,
    /// Forwards between the inside and the outside (a gateway, with or
    /// without a host pair). In host mode alone what comes from the
    /// outside is delivered to this host or dropped, never forwarded.
    pub router: bool,
    /// Never sleep in poll(2) (`--busy-poll`): the lowest latency, a core each.
    pub busy_poll: bool,
    /// Packets other workers hand to this one, and every worker's inbox (by id).
    pub inbox: Receiver<Slot>,
    pub peers: Vec<SyncSender<Slot>>,
    pub reinject: Reinject,
    pub reasm: Reasm,
    /// The tables the control side publishes, and what this worker tells it.
    pub tables: Arc<arc_swap::ArcSwap<espd_core::state::Tables>>,
    pub sync: Arc<super::control::WorkerSync>,
    /// Where the old tables and the runtime states of removed SAs go.
    pub retired: SyncSender<Retired>,
    /// Where this worker's SA events go (the control thread).
    pub events: SyncSender<(u32, espd_core::engine::SaEvent)>,
    pub id: u32,
    pub out: Arc<Mutex<Snapshot>>,
    pub stop: Arc<AtomicBool>,
}

/// Per-frame state the closure needs besides the ports.
struct Ctx<'a> {
    engine: &'a mut Engine,
    cache: &'a mut Cache,
    macs: [[u8; 6]; SIDES],
    mtu: [usize; SIDES],
    io_drops: &'a mut espd_core::drop::DropCounts,
    not_ip: &'a mut u64,
    fix_csum: bool,
    host: Option<usize>,
    router: bool,
    csum_fixed: &'a mut u64,
    /// The side the frame came in on, and where to hand packets over.
    side: usize,
    /// A decapsulated packet sent round again (outbound processing only).
    hairpin: bool,
    peers: &'a [SyncSender<Slot>],
    reinject: &'a mut Reinject,
    reasm: &'a mut Reasm,
    prefrag: (&'a mut u64, &'a mut u64),
    /// Packets fragmented after ESP, and the fragments.
    postfrag: (&'a mut u64, &'a mut u64),
    /// Host mode: this host's own datagrams reassembled from its fragments.
    own_reassembled: &'a mut u64,
    hairpinned: &'a mut u64,
}

/// The per-frame context over a worker's fields (one place, four users).
macro_rules! ctx {
    ($w:expr, $snap:expr, $side:expr, $fix:expr) => {
        Ctx {
            engine: &mut $w.engine,
            cache: &mut $w.cache,
            macs: $w.macs,
            mtu: $w.mtu,
            io_drops: &mut $snap.io_drops,
            not_ip: &mut $snap.not_ip,
            fix_csum: $fix,
            host: $w.host,
            router: $w.router,
            csum_fixed: &mut $snap.csum_fixed,
            side: $side,
            hairpin: false,
            peers: &$w.peers,
            reinject: &mut $w.reinject,
            reasm: &mut $w.reasm,
            prefrag: (&mut $snap.prefragmented, &mut $snap.prefragments),
            postfrag: (&mut $snap.fragmented, &mut $snap.fragments),
            own_reassembled: &mut $snap.own_reassembled,
            hairpinned: &mut $snap.hairpinned,
        }
    };
}

impl Worker {
    pub fn run(mut self) {
        let start = Instant::now();
        let mut last_pub = Instant::now();
        let mut idle = 0u32;
        let mut snap = Snapshot::default();
        let mut turn = 0u64;
        let mut max_recent = 0u64;
        // What the control side waits on: stored again whenever it changes.
        self.sync
            .seen
            .store(self.engine.tables().version(), Ordering::SeqCst);
        // Tests only (super::fault): a worker that dies on its first packet.
        let panic_on_traffic = super::fault("worker-panic").is_err();
        // Tests only: a worker slower than its traffic (2 ms a turn), to
        // overrun its rings on purpose.
        let slow = super::fault("slow-worker").is_err();
        while !self.stop.load(Ordering::Relaxed) {
            turn += 1;
            let t0 = Instant::now();
            // A configuration change: the new tables between two bursts
            // (one pointer compare when nothing changed).
            self.take_tables(&mut snap);
            if turn.is_multiple_of(64) {
                self.engine.set_time(start.elapsed().as_secs());
                self.reasm.now_ms = start.elapsed().as_millis() as u64;
                if !self.reasm.table.is_empty() {
                    let n = self.reasm.table.expire(self.reasm.now_ms);
                    snap.io_drops[DropReason::FragTimeout as usize] += n;
                }
                if let Some(own) = self.reasm.own.as_mut().filter(|o| !o.table.is_empty()) {
                    let n = own.table.expire(self.reasm.now_ms);
                    snap.io_drops[DropReason::FragTimeout as usize] += n;
                }
            }
            let changed = self.cache.sync();
            if (changed || turn.is_multiple_of(4096)) && self.ports.held() > 0 {
                // The next-hop table changed: frames waiting for a neighbour may go.
                let mut ctx = ctx!(self, snap, INSIDE, false);
                self.ports
                    .release_held(|buf, at, len, waited, tag| ctx.retry(buf, at, len, waited, tag));
            }
            let mut got = 0;
            for side in 0..SIDES {
                if self.ports.fd(side).is_none() {
                    continue;
                }
                // One engine burst per RX burst: flow decisions reused,
                // sequence numbers reserved, counters added once.
                self.engine.begin_burst(BURST);
                let mut ctx = ctx!(self, snap, side, self.fix_csum[side]);
                got += self
                    .ports
                    .rx_burst(side, BURST, |buf, len| ctx.frame(buf, len));
                self.engine.end_burst();
            }
            if slow {
                std::thread::sleep(Duration::from_millis(2));
            }
            assert!(
                !(panic_on_traffic && got > 0),
                "ESPD_FAULT=worker-panic: injected panic (tests only)"
            );
            // Packets other workers handed over: processed as if received here.
            self.engine.begin_burst(BURST);
            for _ in 0..BURST {
                // A slot waits in the inbox until a frame is free for it.
                if self.ports.free_frames() == 0 {
                    break;
                }
                let Ok(slot) = self.inbox.try_recv() else {
                    break;
                };
                got += 1;
                let side = usize::from(slot.side);
                let mut ctx = ctx!(self, snap, side, false);
                if side == HAIRPIN {
                    ctx.side = INSIDE;
                    ctx.hairpin = true;
                }
                let len = usize::from(slot.len);
                let ok = self.ports.inject(|buf| {
                    buf[..len].copy_from_slice(&slot.data[..len]);
                    ctx.frame(buf, len)
                });
                if !ok {
                    snap.io_drops[DropReason::HandoffFull as usize] += 1;
                }
            }
            self.engine.end_burst();
            // Inner fragments made this turn: processed like received frames.
            if !self.reinject.list.is_empty() {
                let list = std::mem::take(&mut self.reinject.list);
                let arena = std::mem::take(&mut self.reinject.arena);
                for &(side, off, len) in &list {
                    // Side HAIRPIN: a decapsulated packet, processed as
                    // outbound; FINISHED: a packet only to be sent.
                    // A prefragment is processed as received on its side.
                    let mut ctx =
                        ctx!(self, snap, if side < SIDES { side } else { OUTSIDE }, false);
                    if side == HAIRPIN {
                        ctx.side = INSIDE;
                        ctx.hairpin = true;
                    }
                    let ok = self.ports.inject(|buf| {
                        buf[..len].copy_from_slice(&arena[off..off + len]);
                        if side == FINISHED {
                            ctx.finished(buf, len)
                        } else {
                            ctx.frame(buf, len)
                        }
                    });
                    if !ok {
                        snap.io_drops[DropReason::TxRingFull as usize] += 1;
                    }
                }
                // Give the buffers back, emptied, capacity kept — unless
                // these packets queued others (a hairpinned packet
                // fragmented after ESP): those wait for the next turn.
                if self.reinject.list.is_empty() {
                    let (mut list, mut arena) = (list, arena);
                    list.clear();
                    arena.clear();
                    self.reinject.list = list;
                    self.reinject.arena = arena;
                }
            }
            self.ports.flush();
            // Events at once (an acquire must reach the IKE daemon fast).
            if self.engine.has_events() {
                self.send_events();
            }
            let took = t0.elapsed().as_nanos() as u64;
            max_recent = max_recent.max(took);
            snap.turn_hist[TURN_BUCKETS.partition_point(|b| *b <= took)] += 1;
            snap.turns += 1;
            if got > 0 {
                snap.busy_turns += 1;
                idle = 0;
            } else {
                idle = idle.saturating_add(1);
                if idle > SPIN && self.busy_poll {
                    // Spinning, but not in the way of the threads that share
                    // this core (a host's applications, softirq threads): with
                    // EEVDF a woken thread could otherwise wait for the rest
                    // of the worker's slice. Measured: ping through two hosts
                    // +31 µs over the plain path instead of +46..+141 µs.
                    std::thread::yield_now();
                } else if idle > SPIN {
                    // Parked: the control side need not wait for this worker
                    // (it takes the newest tables before its next packet).
                    self.sync.parked.store(true, Ordering::SeqCst);
                    if self.tables.load().version() == self.engine.tables().version() {
                        let _ = self.ports.wait(1);
                    }
                    self.sync.parked.store(false, Ordering::SeqCst);
                }
            }
            if turn.is_multiple_of(64) && last_pub.elapsed() >= Duration::from_millis(100) {
                last_pub = Instant::now();
                snap.max_turn_recent_ns = max_recent;
                snap.max_turn_ns = snap.max_turn_ns.max(max_recent);
                max_recent = 0;
                self.publish(&mut snap);
            }
        }
        self.ports.flush();
        self.publish(&mut snap);
    }

    /// Takes the published tables if they are newer than the engine's.
    fn take_tables(&mut self, snap: &mut Snapshot) {
        let cur = self.tables.load();
        if !Arc::ptr_eq(&cur, self.engine.tables()) {
            let old = self.engine.set_tables(arc_swap::Guard::into_inner(cur));
            let sas = self.engine.take_retired();
            // Full: the control side is behind; freed here then.
            let _ = self.retired.try_send(Retired { tables: old, sas });
            snap.tables_taken += 1;
            self.sync
                .seen
                .store(self.engine.tables().version(), Ordering::SeqCst);
        }
    }

    fn send_events(&mut self) {
        let mut ev = Vec::new();
        self.engine.take_events(&mut ev);
        for e in ev {
            // Full: the control side is behind; the counters still tell.
            let _ = self.events.try_send((self.id, e));
        }
    }

    fn publish(&mut self, snap: &mut Snapshot) {
        self.ports.kernel_stats();
        self.send_events();
        let s = &mut *snap;
        s.reassembled = self.reasm.table.reassembled;
        s.reassembly_peak = self.reasm.table.peak;
        s.engine = self.engine.counters().clone();
        s.ports = self.ports.stats;
        let map = &mut s.sa;
        self.engine.take_sa_updates(|id, sa| match sa {
            Some(sa) => {
                map.insert(
                    id,
                    SaStat {
                        packets: sa.counters().packets,
                        bytes: sa.counters().bytes,
                        drops: sa.counters().drops,
                        oseq: sa.oseq(),
                    },
                );
            }
            None => {
                map.remove(&id);
            }
        });
        if let Ok(mut o) = self.out.lock() {
            o.clone_from(s);
        }
    }
}

impl Ctx<'_> {
    fn drop_io(&mut self, r: DropReason) -> Out {
        self.io_drops[r as usize] += 1;
        Out::Drop
    }

    /// One frame: `buf` is the frame's writable area, the first `len`
    /// octets the received Ethernet frame.
    fn frame(&mut self, buf: &mut [u8], len: usize) -> Out {
        // The one L2 parser espd has (`espd pcap` uses it too): VLAN tags
        // are walked, so a tagged frame is never lost for its form (the XDP
        // programs pass tagged frames to the kernel; see docs/operations.md).
        // What leaves is untagged, as the interface it leaves by is.
        let (l2, ty) = match ethernet::Frame::new_checked(&buf[..len.min(buf.len())]) {
            Ok(f) => (f.header_len(), f.ethertype()),
            Err(_) => (len, 0),
        };
        if len < l2 + 20 || !matches!(ty, ethernet::ETHERTYPE_IPV4 | ethernet::ETHERTYPE_IPV6) {
            *self.not_ip += 1;
            return Out::Drop;
        }
        let mut ip_len = len - l2;
        if HEADROOM + ip_len + 256 > buf.len() {
            return self.drop_io(DropReason::TooBig);
        }
        // The engine needs room in front for outer headers: move the IP
        // packet back (one memmove of the frame; see docs/architecture.md).
        buf.copy_within(l2..len, HEADROOM);
        if self.router && self.host.is_some() {
            // A gateway with a host pair counts the hops it forwards, not
            // those of what the host it runs on sends itself through the
            // pair (a plain gateway's engine is a router throughout).
            self.engine.set_router(Some(self.side) != self.host);
        }
        if self.side == OUTSIDE {
            match self.reassemble(buf, ip_len) {
                Whole::No => {}
                Whole::Taken => return Out::Drop,
                Whole::Done(n) => ip_len = n,
            }
        } else if Some(self.side) == self.host && !self.hairpin {
            if let Some(o) = self.own_fragment(buf, ip_len) {
                return o;
            }
        }
        let mut pkt = PacketBuf::new(buf, HEADROOM, ip_len);
        if self.fix_csum && complete_partial_checksum(pkt.data_mut()) {
            *self.csum_fixed += 1;
        }
        // RFC 4301 §8.1 allows fragmenting before or after IPsec; a gateway
        // fragments an IPv4 packet without DF that cannot fit the outside MTU
        // once encapsulated first, as Linux's tunnel path does, and each
        // fragment goes through the tunnel on its own (no reassembly needed
        // at the peer before its ESP). DF packets get ICMP from the engine
        // instead. (A host's own datagrams: see `own_fragment`.)
        let limit = self.mtu[OUTSIDE].saturating_sub(PREFRAG_OVERHEAD);
        if self.side != OUTSIDE && ip_len > limit && limit >= 576 && pkt.data()[0] >> 4 == 4 {
            let r = self.prefragment(&buf[HEADROOM..HEADROOM + ip_len], limit);
            if r {
                // buf[..ETH] was copied with each fragment: this frame is done.
                return Out::Drop;
            }
            pkt = PacketBuf::new(buf, HEADROOM, ip_len);
        }
        let v = if self.hairpin {
            self.engine.process_forwarded(&mut pkt)
        } else {
            self.engine.process(&mut pkt)
        };
        match v {
            Verdict::Encapsulated(_)
            | Verdict::Decapsulated(_)
            | Verdict::Bypass
            | Verdict::Icmp(_) => {}
            Verdict::Dummy(_) | Verdict::Keepalive | Verdict::Drop(_) => return Out::Drop,
            Verdict::Handoff(w) => {
                // The engine left the packet as it was: the frame's first
                // ETH octets and the IP packet at HEADROOM.
                let ip = pkt.data();
                let n = ETH + ip.len();
                if n > SLOT_BYTES {
                    return self.drop_io(DropReason::HandoffTooBig);
                }
                let Some(to) = self.peers.get(w as usize) else {
                    return self.drop_io(DropReason::ForeignQueue);
                };
                let mut slot = Slot {
                    len: n as u16,
                    // A hair-pinned packet stays one at its owner.
                    side: if self.hairpin {
                        HAIRPIN as u8
                    } else {
                        self.side as u8
                    },
                    data: [0; SLOT_BYTES],
                };
                slot.data[ETH..n].copy_from_slice(ip);
                let ty = if ip[0] >> 4 == 6 {
                    ethernet::ETHERTYPE_IPV6
                } else {
                    ethernet::ETHERTYPE_IPV4
                };
                // An untagged header: the addresses, the packet's EtherType.
                slot.data[..12].copy_from_slice(&buf[..12]);
                slot.data[12..ETH].copy_from_slice(&ty.to_be_bytes());
                return match to.try_send(slot) {
                    Ok(()) => Out::Drop,
                    Err(_) => self.drop_io(DropReason::HandoffFull),
                };
            }
        }
        let Some(dst) = dst_of(pkt.data()) else {
            return self.drop_io(DropReason::BadInner);
        };
        if !self.router
            && self.side == OUTSIDE
            && matches!(v, Verdict::Decapsulated(_) | Verdict::Bypass)
        {
            // A host is not a router: what it decapsulated is for its own
            // sockets (delivered through the pair) or for nobody. Not held
            // while unresolved (a held frame is retried without this check;
            // this host's addresses are resolved at start).
            match self.cache.get(dst) {
                Resolved::Hop { side, .. } if Some(side) == self.host => {}
                Resolved::Pending => return self.drop_io(DropReason::NoNeighbour),
                _ => return self.drop_io(DropReason::HostForward),
            }
        }
        let (at, n) = (pkt.start(), pkt.len());
        if self.router && self.side == OUTSIDE && matches!(v, Verdict::Decapsulated(_)) {
            // A gateway forwards what it decapsulated; where that is out of
            // the outside again, or nowhere the kernel routes (a road warrior
            // to another, through the gateway), the packet is outbound
            // traffic like any other and meets the outbound SPD (RFC 4301
            // §5.1): another tunnel, a bypass or a drop. While the next hop
            // resolves it is held and decided on release.
            match self.cache.get(dst) {
                Resolved::Hop { side: OUTSIDE, .. } | Resolved::NoRoute => {
                    return self.hairpin(buf, at, n)
                }
                Resolved::Pending => {
                    return Out::Hold {
                        at,
                        len: n,
                        tag: HELD_DECAPSULATED,
                    }
                }
                _ => {}
            }
        }

        // What the engine encapsulated may be fragmented after ESP if the
        // inner packet allowed it (the engine answered the others with ICMP).
        self.send(buf, at, n, dst, matches!(v, Verdict::Encapsulated(_)))
    }

    /// A decapsulated packet for the outside, processed again as if it had
    /// arrived on the inside (queued, with an Ethernet header of its family).
    fn hairpin(&mut self, buf: &[u8], at: usize, n: usize) -> Out {
        self.reinject.push(HAIRPIN, &buf[at..at + n]);
        *self.hairpinned += 1;
        Out::Drop
    }

    /// Fragments of ESP addressed to us, raw or in UDP (XDP steers only
    /// those), go into the reassembly table; a completed datagram replaces
    /// the frame's packet.
    fn reassemble(&mut self, buf: &mut [u8], ip_len: usize) -> Whole {
        use espd_core::reasm::Added;
        let ip = &buf[HEADROOM..HEADROOM + ip_len];
        // XDP steers raw ESP fragments and those of ESP in UDP.
        let Some(f) = fragment_of(ip, |p| matches!(p, 50 | 17)) else {
            return Whole::No;
        };
        // Only what is addressed to us: fragments of plaintext steered to the
        // inbound policy check go on to the engine as they are.
        if !self.engine.opens_esp_to(f.dst) {
            return Whole::No;
        }
        let r = &mut *self.reasm;
        match r.table.add(&f, r.now_ms, &mut r.out) {
            Ok(Added::Held) => Whole::Taken,
            Ok(Added::Complete(n)) if HEADROOM + n + 256 <= buf.len() => {
                buf[HEADROOM..HEADROOM + n].copy_from_slice(&r.out[..n]);
                Whole::Done(n)
            }
            Ok(Added::Complete(n)) if self.host.is_some() => {
                self.deliver_big(n);
                Whole::Taken
            }
            Ok(Added::Complete(_)) => {
                self.io_drops[DropReason::FragTooBig as usize] += 1;
                Whole::Taken
            }
            Err(e) => {
                self.io_drops[e as usize] += 1;
                Whole::Taken
            }
        }
    }

    /// Host mode, from the pair: a fragment of this host's own datagram (its
    /// stack fragments to the pair routes' MTU) is held until the datagram
    /// is whole, which then goes through the engine as one (transport mode
    /// carries only whole datagrams, RFC 4301 §7) and leaves fragmented
    /// after ESP if it must. `None`: not a fragment.
    fn own_fragment(&mut self, buf: &[u8], ip_len: usize) -> Option<Out> {
        use espd_core::reasm::Added;
        let f = fragment_of(&buf[HEADROOM..HEADROOM + ip_len], |_| true)?;
        let r = &mut *self.reasm;
        let own = r.own.get_or_insert_with(|| Box::new(OwnReasm::new()));
        let n = match own.table.add(&f, r.now_ms, &mut own.out) {
            Ok(Added::Held) => return Some(Out::Drop),
            Ok(Added::Complete(n)) => n,
            Err(e) => {
                self.io_drops[e as usize] += 1;
                return Some(Out::Drop);
            }
        };
        *self.own_reassembled += 1;
        own.big[HEADROOM..HEADROOM + n].copy_from_slice(&own.out[..n]);
        let mut pkt = PacketBuf::new(&mut own.big, HEADROOM, n);
        match self.engine.process_own_datagram(&mut pkt) {
            Verdict::Encapsulated(_) | Verdict::Bypass | Verdict::Icmp(_) => {}
            // Too large for a slot: the owner of a shared SA cannot take it.
            Verdict::Handoff(_) => return Some(self.drop_io(DropReason::HandoffTooBig)),
            _ => return Some(Out::Drop),
        }
        let (at, n) = (pkt.start(), pkt.len());
        let ip = &own.big[at..at + n];
        let Some(dst) = dst_of(ip) else {
            return Some(self.drop_io(DropReason::BadInner));
        };
        // Fragmented for the interface it leaves by (while the next hop
        // resolves, the outside's: each fragment is held then).
        let mtu = match self.cache.get(dst) {
            Resolved::Hop { side, .. } => self.mtu[side],
            Resolved::Pending => self.mtu[OUTSIDE],
            Resolved::NoRoute => return Some(self.drop_io(DropReason::NoRoute)),
            Resolved::Local => return Some(self.drop_io(DropReason::LocalDelivery)),
        };
        match self.reinject.finished(ip, mtu, true) {
            Ok(k) if k > 1 => {
                *self.postfrag.0 += 1;
                *self.postfrag.1 += k as u64;
            }
            Ok(_) => {}
            Err(e) => return Some(self.drop_io(e)),
        }
        Some(Out::Drop)
    }

    /// Host mode: an ESP datagram reassembled from the outside that is
    /// larger than a frame (in `reasm.out`), decapsulated in the big buffer
    /// and delivered to this host through the pair in fragments its stack
    /// reassembles (the pair is this host's own link). A gateway forwards
    /// no such datagram (`FragTooBig`).
    fn deliver_big(&mut self, n: usize) {
        let Some(pair) = self.host else {
            self.drop_io(DropReason::FragTooBig);
            return;
        };
        let r = &mut *self.reasm;
        let own = r.own.get_or_insert_with(|| Box::new(OwnReasm::new()));
        own.big[HEADROOM..HEADROOM + n].copy_from_slice(&r.out[..n]);
        let mut pkt = PacketBuf::new(&mut own.big, HEADROOM, n);
        match self.engine.process(&mut pkt) {
            Verdict::Decapsulated(_) => {}
            Verdict::Handoff(_) => {
                self.drop_io(DropReason::HandoffTooBig);
                return;
            }
            _ => return,
        }
        let (at, n) = (pkt.start(), pkt.len());
        let ip = &own.big[at..at + n];
        match dst_of(ip).map(|d| self.cache.get(d)) {
            Some(Resolved::Hop { side, .. }) if side == pair => {}
            // Past a frame: a gateway forwards no such datagram.
            Some(Resolved::Hop { .. }) if self.router => {
                self.drop_io(DropReason::FragTooBig);
                return;
            }
            _ => {
                self.drop_io(DropReason::HostForward);
                return;
            }
        }
        match self.reinject.finished(ip, self.mtu[pair], true) {
            Ok(k) => {
                *self.postfrag.0 += u64::from(k > 1);
                *self.postfrag.1 += k as u64;
            }
            Err(e) => {
                self.drop_io(e);
            }
        }
    }

    /// A finished packet from [`Reinject`] (side [`FINISHED`]): its IP
    /// packet follows a placeholder Ethernet header.
    fn finished(&mut self, buf: &mut [u8], len: usize) -> Out {
        let Some(dst) = dst_of(&buf[ETH..len]) else {
            return self.drop_io(DropReason::BadInner);
        };
        self.send(buf, ETH, len - ETH, dst, false)
    }

    /// Splits an IPv4 packet without DF into fragments of at most `limit`
    /// octets, queued (with this frame's Ethernet header) to be processed
    /// like received frames. False, changing nothing, if it may not be
    /// fragmented (DF) — the engine answers with ICMP then.
    fn prefragment(&mut self, ip: &[u8], limit: usize) -> bool {
        match self.reinject.fragments(self.side, ip, limit, false) {
            Some(k) => {
                *self.prefrag.0 += 1;
                *self.prefrag.1 += k as u64;
                true
            }
            None => false,
        }
    }

    /// A held frame (its packet processed, at `at..at + n`) once more.
    fn retry(&mut self, buf: &mut [u8], at: usize, n: usize, waited: Duration, tag: u8) -> Out {
        let Some(dst) = dst_of(&buf[at..at + n]) else {
            return self.drop_io(DropReason::BadInner);
        };
        if tag == HELD_DECAPSULATED {
            match self.cache.get(dst) {
                Resolved::Hop { side: OUTSIDE, .. } | Resolved::NoRoute => {
                    return self.hairpin(buf, at, n)
                }
                Resolved::Pending if waited > HOLD_FOR => {
                    return self.drop_io(DropReason::NoNeighbour)
                }
                Resolved::Pending => return Out::Hold { at, len: n, tag },
                _ => {}
            }
        }
        match self.send(buf, at, n, dst, false) {
            // Linux gives up on a neighbour after about 3 s of probes.
            Out::Hold { .. } if waited > HOLD_FOR => self.drop_io(DropReason::NoNeighbour),
            o => o,
        }
    }

    /// The L2 step: next hop, Ethernet header, frame to the front.
    /// `encapsulated`: espd made this packet (it may fragment an IPv6 one).
    fn send(
        &mut self,
        buf: &mut [u8],
        at: usize,
        n: usize,
        dst: IpAddr,
        encapsulated: bool,
    ) -> Out {
        let (side, mac) = match self.cache.get(dst) {
            Resolved::Hop { side, mac } => (side, mac),
            Resolved::NoRoute => return self.drop_io(DropReason::NoRoute),
            Resolved::Local => return self.drop_io(DropReason::LocalDelivery),
            // Kept while the kernel resolves it (the first packets of a new
            // destination are not lost, as with Linux's unresolved queue).
            Resolved::Pending => return Out::Hold { at, len: n, tag: 0 },
        };
        if n > self.mtu[side] {
            // The engine fits DF/IPv6 traffic to the MTU with ICMP; what is
            // left is fragmented here, after ESP (RFC 4301 §8.1): IPv4
            // without DF, and an outer IPv6 packet espd is the source of.
            return match self
                .reinject
                .finished(&buf[at..at + n], self.mtu[side], encapsulated)
            {
                Ok(k) => {
                    *self.postfrag.0 += 1;
                    *self.postfrag.1 += k as u64;
                    Out::Drop
                }
                Err(e) => self.drop_io(e),
            };
        }
        if at < ETH {
            return self.drop_io(DropReason::TooBig);
        }
        let version = buf[at] >> 4;
        let h = at - ETH;
        buf[h..h + 6].copy_from_slice(&mac);
        buf[h + 6..h + 12].copy_from_slice(&self.macs[side]);
        let ty: u16 = if version == 4 { 0x0800 } else { 0x86dd };
        buf[h + 12..h + 14].copy_from_slice(&ty.to_be_bytes());
        // TX starts at the frame's data address: move the result to the front.
        buf.copy_within(h..at + n, 0);
        Out::Tx { side, len: ETH + n }
    }
}

/// The reassembly facts of an IP fragment (IPv4, or IPv6 with the Fragment
/// header first) whose protocol `carried` accepts; `None` for anything else.
fn fragment_of(ip: &[u8], carried: impl Fn(u8) -> bool) -> Option<espd_core::reasm::Fragment<'_>> {
    use espd_core::reasm::Fragment;
    match ip.first()? >> 4 {
        4 if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let fo = u16::from_be_bytes([ip[6], ip[7]]);
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            if fo & 0x3fff == 0 || !carried(ip[9]) || ihl < 20 || total > ip.len() || total < ihl {
                return None;
            }
            Some(Fragment {
                src: IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])),
                dst: IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])),
                id: u32::from(u16::from_be_bytes([ip[4], ip[5]])),
                proto: ip[9],
                offset: usize::from(fo & 0x1fff) * 8,
                more: fo & 0x2000 != 0,
                header: &ip[..ihl],
                next: 0,
                payload: &ip[ihl..total],
            })
        }
        6 if ip.len() >= 48 && ip[6] == 44 && carried(ip[40]) => {
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if 40 + plen > ip.len() || plen < 8 {
                return None;
            }
            let fo = u16::from_be_bytes([ip[42], ip[43]]);
            let a = |o: usize| {
                let b: [u8; 16] = ip[o..o + 16].try_into().unwrap_or([0; 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            Some(Fragment {
                src: a(8),
                dst: a(24),
                id: u32::from_be_bytes([ip[44], ip[45], ip[46], ip[47]]),
                proto: 0,
                offset: usize::from(fo >> 3) * 8,
                more: fo & 1 != 0,
                header: &ip[..40],
                next: ip[40],
                payload: &ip[48..40 + plen],
            })
        }
        _ => None,
    }
}

/// The destination address of an IP packet.
fn dst_of(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 => Some(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(p.get(16..20)?).ok()?,
        ))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(p.get(24..40)?).ok()?,
        ))),
        _ => None,
    }
}
