//! ICMP errors the engine answers with (RFC 4301 §8.2.1, RFC 792, RFC 4443), rate limited.

use super::*;

/// An ICMP error this engine can answer with.
#[derive(Clone, Copy)]
pub(super) enum IcmpKind {
    /// RFC 792 type 3 code 4 / RFC 4443 type 2, with the MTU to report.
    TooBig(usize),
    /// RFC 792 type 11 code 0 / RFC 4443 type 3 code 0.
    TimeExceeded,
}

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
                ip.set_ttl(esp_out::OUTER_TTL);
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
                ip.set_hop_limit(esp_out::OUTER_TTL);
                ip.set_src_addr(s);
                ip.set_dst_addr(d);
            }
            _ => return Verdict::Drop(r),
        }
        Verdict::Icmp(r)
    }
}
