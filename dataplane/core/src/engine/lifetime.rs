//! Lifetimes (RFC 4301 §4.4.2.1), events for the control side, and acquires
//! for a PROTECT policy without an SA (RFC 4301 §5.1 step 3a).

use super::*;

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
pub(super) const MAX_ACQUIRING: usize = 4096;

impl Engine {
    /// True if events wait for [`Engine::take_events`].
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The events since the last call (lifetimes reached, unknown SPIs).
    pub fn take_events(&mut self, out: &mut Vec<SaEvent>) {
        out.append(&mut self.events);
    }

    pub(super) fn event(&mut self, kind: SaEventKind, dst: IpAddr, spi: u32, why: &'static str) {
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
    pub(super) fn within_lifetime(&mut self, id: SaId) -> bool {
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

    /// RFC 4301 §5.1 step 3a: a PROTECT policy matched and its SA does not
    /// exist — the packet is dropped (XFRM's larval state does the same)
    /// and the IKE daemon hears of it once a second per policy, with the
    /// policy and the packet's selector fields, to negotiate the SA (Linux's
    /// XFRM_MSG_ACQUIRE; strongSwan's `start_action = trap`).
    pub(super) fn acquire(&mut self, flow: &Flow) {
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
}
