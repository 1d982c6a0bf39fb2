//! Bursts: the flow caches that let the packets of a burst share one SPD
//! and SAD decision, sequence numbers reserved per burst, counters added once.

use super::*;

/// What the SPD and the SAD decided for an outbound flow: the part of
/// [`Engine::process`] that depends on the flow alone, so the packets of a
/// burst that share a flow reuse it.
#[derive(Debug, Clone, Copy)]
pub(super) enum OutDecision {
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
pub(super) struct BurstCache {
    pub(super) active: bool,
    /// Packets still expected in this burst (sequence numbers to reserve).
    pub(super) left: u64,
    /// Outbound decisions of the burst's flows.
    pub(super) out: FlowCache<OutDecision>,
    /// The last inbound SA: (destination, SPI) → SA.
    pub(super) sa_in: Option<(IpAddr, u32, SaId)>,
    /// Inner flows that passed the inbound policy check, with their SA path.
    pub(super) checked: FlowCache<([SaId; MAX_NEST], usize)>,
    /// SAs holding reserved sequence numbers (given back at the end).
    pub(super) reserved: [SaId; MAX_RESERVED],
    pub(super) n_reserved: usize,
    pub(super) encapsulated: u64,
    pub(super) decapsulated: u64,
    pub(super) bypass: u64,
}

/// A direct-mapped cache of per-flow answers: traffic interleaves flows (a
/// gateway's burst holds many), so one entry is not enough; 64 slots by a
/// hash of the 5-tuple cost one compare on a hit. Entries carry the
/// SPD's and SAD's versions when they were made, so any change to either
/// voids them all without writing to the cache (and a new engine starts
/// with an empty one).
#[derive(Debug)]
pub(super) struct FlowCache<V: Copy> {
    pub(super) slots: Box<[Option<(u64, Flow, V)>; FLOW_SLOTS]>,
}

pub(super) const FLOW_SLOTS: usize = 64;

impl<V: Copy> Default for FlowCache<V> {
    fn default() -> Self {
        FlowCache {
            slots: Box::new([None; FLOW_SLOTS]),
        }
    }
}

impl<V: Copy> FlowCache<V> {
    pub(super) fn slot(f: &Flow) -> usize {
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

    pub(super) fn get(&self, burst: u64, f: &Flow) -> Option<V> {
        match &self.slots[Self::slot(f)] {
            Some((b, k, v)) if *b == burst && k == f => Some(*v),
            _ => None,
        }
    }

    pub(super) fn put(&mut self, burst: u64, f: &Flow, v: V) {
        self.slots[Self::slot(f)] = Some((burst, *f, v));
    }

    pub(super) fn clear(&mut self) {
        self.slots.fill(None);
    }
}

/// SAs per burst that reserve sequence numbers ahead; further SAs in the
/// same burst take theirs one at a time.
pub(super) const MAX_RESERVED: usize = 8;

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

impl Engine {
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
    pub(super) fn tables_version(&self) -> u64 {
        self.tables.version()
    }

    /// [`Engine::begin_burst`] as a guard that ends the burst when dropped.
    pub fn burst(&mut self, n: usize) -> Burst<'_> {
        self.begin_burst(n);
        Burst { engine: self }
    }
}
