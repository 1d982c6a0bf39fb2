//! ICMP errors the engine answers with (RFC 4301 §8.2.1, RFC 792, RFC 4443), rate limited.

use super::*;

/// An ICMP error this engine can answer with (built by [`wire::icmp`]).
pub(super) use crate::wire::icmp::Repr as IcmpKind;

/// Default ICMP error rate limit (per engine, per second), as Linux's
/// `icmp_ratelimit` bounds it in spirit.
pub const ICMP_PER_SECOND: u32 = 100;

impl Engine {
    /// The addresses ICMP errors come from, by family: a router's are those
    /// of the interface the error leaves by (RFC 1812 §4.3.2.4) — the
    /// gateway's inside interface. Without one of a family, the first local
    /// address of that family is used.
    pub fn set_icmp_sources(&mut self, addrs: &[IpAddr]) {
        self.icmp_src = addrs.to_vec();
    }

    /// ICMP errors allowed per second (0: none are sent).
    pub fn set_icmp_rate(&mut self, per_second: u32) {
        self.icmp_rate = per_second;
        self.icmp_left = per_second;
    }

    /// Replaces the packet with an ICMP error to its source: "fragmentation
    /// needed" (RFC 792, RFC 1191) / ICMPv6 "packet too big" (RFC 4443 §3.2)
    /// reporting an MTU, or "time exceeded" (RFC 792 / RFC 4443 §3.3), from an
    /// address of this host of the same family; rate limited. Without a
    /// source address or budget the packet is dropped for `r`.
    pub(super) fn icmp_error(
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
                pkt.truncate(576 - wire::icmp::V4_HEADERS);
                pkt.prepend(wire::icmp::V4_HEADERS)
                    .expect("headroom checked");
                kind.emit_v4(pkt.data_mut(), s, d, esp_out::OUTER_TTL);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                // RFC 4443 §3.2: as much of the packet as fits in 1280 octets.
                pkt.truncate(1280 - wire::icmp::V6_HEADERS);
                pkt.prepend(wire::icmp::V6_HEADERS)
                    .expect("headroom checked");
                kind.emit_v6(pkt.data_mut(), s, d, esp_out::OUTER_TTL);
            }
            _ => return Verdict::Drop(r),
        }
        Verdict::Icmp(r)
    }
}
