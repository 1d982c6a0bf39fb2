//! Outbound ESP processing (RFC 4303 §3.3): sequence number, padding, trailer,
//! AEAD seal in place, and the outer header for tunnel mode or the adjusted
//! IP header for transport mode.

use super::{ecn, L3};
use crate::buf::PacketBuf;
use crate::drop::DropReason;
use crate::state::{Mode, Sa, SaCore};
use crate::wire::{esp, ipv4, ipv6, proto, udp};
use core::net::IpAddr;

/// Outer TTL / hop limit for tunnel mode (Linux's default `ip_default_ttl`).
pub const OUTER_TTL: u8 = 64;

/// Per-packet inputs the engine computed from the inner packet.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutParams {
    /// RFC 6437 flow label for an IPv6 outer header (hash of the inner flow).
    pub flow_label: u32,
    /// For an SA shared between workers: how many sequence numbers to take
    /// from the shared counter at once when this SA has none reserved (the
    /// packets left in the burst; 0 or 1: one at a time). See [`Sa::seq_block`].
    pub reserve: u64,
}

/// Octets of ESP framing around `payload` octets through `sa`, not counting
/// any outer IP header: UDP (NAT-T), ESP header, IV, padding, trailer, ICV.
fn framing(sa: &SaCore, payload: usize) -> usize {
    let t = &sa.transform;
    let udp = if sa.cfg.encap.is_some() {
        udp::HEADER_LEN
    } else {
        0
    };
    udp + esp::HEADER_LEN
        + t.iv_len()
        + esp::pad_len(payload, t.align())
        + esp::TRAILER_LEN
        + t.icv_len()
}

fn outer_len(sa: &SaCore) -> usize {
    match (sa.cfg.mode, sa.cfg.dst) {
        (Mode::Tunnel, IpAddr::V4(_)) => ipv4::HEADER_LEN,
        (Mode::Tunnel, IpAddr::V6(_)) => ipv6::HEADER_LEN,
        (Mode::Transport, _) => 0,
    }
}

/// The length of a packet of `len` octets after encapsulation through `sa`.
/// `keep` is what transport mode leaves in front of ESP (the IP header and
/// the extension headers before ESP); tunnel mode protects everything.
pub fn encapsulated_len(sa: &SaCore, len: usize, keep: usize) -> usize {
    let keep = if sa.cfg.mode == Mode::Tunnel { 0 } else { keep };
    len + outer_len(sa) + framing(sa, len - keep.min(len))
}

/// The largest packet that still fits `mtu` after encapsulation through `sa`
/// (RFC 4301 §8.2.1: the MTU to report back is the path MTU less the
/// IPsec overhead). 0 if nothing fits.
pub fn max_inner(sa: &SaCore, mtu: usize, keep: usize) -> usize {
    let keep = if sa.cfg.mode == Mode::Tunnel { 0 } else { keep };
    let t = &sa.transform;
    let udp = if sa.cfg.encap.is_some() {
        udp::HEADER_LEN
    } else {
        0
    };
    let fixed = outer_len(sa) + udp + esp::HEADER_LEN + t.iv_len() + t.icv_len() + keep;
    let Some(room) = mtu.checked_sub(fixed) else {
        return 0;
    };
    let align = t.align().max(4);
    // payload + padding + 2 is a multiple of `align` and at most `room`.
    (room / align * align).saturating_sub(esp::TRAILER_LEN) + keep
}

/// Reserves the next outbound sequence number. RFC 4303 §3.3.3: it starts at 1
/// and never cycles; at the end of the space the SA is exhausted for good.
fn next_seq(sa: &mut Sa, reserve: u64) -> Result<u64, DropReason> {
    let limit = sa.seq_limit();
    if sa.exhausted {
        return Err(DropReason::SeqCycled);
    }
    if let Some((next, end)) = sa.seq_block.filter(|(n, e)| n <= e) {
        // A number reserved for this burst (DPDK lib/ipsec reserves per
        // burst the same way): no atomic operation per packet.
        sa.seq_block = Some((next + 1, end));
        sa.oseq = next;
        return Ok(next);
    }
    if let Some(share) = &sa.share {
        // Several workers send through this SA: one counter for all of them.
        // Take `reserve` numbers at once (fewer at the end of the space).
        use core::sync::atomic::Ordering::Relaxed;
        let n = reserve.max(1);
        return match share.oseq.fetch_update(Relaxed, Relaxed, |c| {
            (c < limit).then_some(c.saturating_add(n).min(limit))
        }) {
            Ok(prev) => {
                let end = prev.saturating_add(n).min(limit);
                if end > prev + 1 {
                    sa.seq_block = Some((prev + 2, end));
                }
                sa.oseq = prev + 1;
                Ok(prev + 1)
            }
            Err(_) => {
                sa.exhausted = true;
                Err(DropReason::SeqCycled)
            }
        };
    }
    if sa.oseq >= limit {
        sa.exhausted = true;
        return Err(DropReason::SeqCycled);
    }
    sa.oseq += 1;
    Ok(sa.oseq)
}

/// Encapsulates the IP packet in `pkt` through `sa`. On error the packet is
/// to be dropped; the SA's state is unchanged except for `SeqCycled`.
pub fn encapsulate(
    sa: &mut Sa,
    pkt: &mut PacketBuf<'_>,
    l3: &L3,
    params: &OutParams,
) -> Result<(), DropReason> {
    let iv_len = sa.core.transform.iv_len();
    let icv_len = sa.core.transform.icv_len();
    // Where the protected payload starts in the original packet, and its next header.
    let (keep, nh) = match sa.core.cfg.mode {
        Mode::Tunnel => (
            0,
            if l3.version == 4 {
                proto::IPIP
            } else {
                proto::IPV6
            },
        ),
        Mode::Transport => {
            if l3.fragment {
                // RFC 4301 §7: transport mode does not carry fragments.
                return Err(DropReason::Fragment);
            }
            if l3.version == 4 {
                (l3.upper_at, l3.proto)
            } else {
                (l3.esp_at, pkt.data()[l3.esp_nh_at])
            }
        }
    };
    let payload_len = pkt.len() - keep;
    let pad = esp::pad_len(payload_len, sa.core.transform.align());
    let tail = pad + esp::TRAILER_LEN + icv_len;
    let outer_len = match (sa.core.cfg.mode, sa.core.cfg.dst) {
        (Mode::Tunnel, IpAddr::V4(_)) => ipv4::HEADER_LEN,
        (Mode::Tunnel, IpAddr::V6(_)) => ipv6::HEADER_LEN,
        (Mode::Transport, _) => keep,
    };
    // RFC 3948 §2.1: a UDP header between the IP header and ESP.
    let udp_len = if sa.core.cfg.encap.is_some() {
        udp::HEADER_LEN
    } else {
        0
    };
    let grow = udp_len
        + esp::HEADER_LEN
        + iv_len
        + if sa.core.cfg.mode == Mode::Tunnel {
            outer_len
        } else {
            0
        };
    let new_len = pkt.len() + grow + tail;
    if pkt.headroom() < grow || pkt.tailroom() < tail || new_len > usize::from(u16::MAX) + 40 {
        return Err(DropReason::TooBig);
    }
    if sa.core.cfg.dst.is_ipv4() && new_len > usize::from(u16::MAX) {
        return Err(DropReason::TooBig);
    }
    let seq = next_seq(sa, params.reserve)?;

    // Inner facts needed for the outer header, read before encryption.
    let inner_len = pkt.len();
    let inner_tos = l3.tos;
    let inner_df = l3.df;

    // Room at both ends; transport mode moves the IP header to the new front.
    pkt.prepend(grow).expect("headroom checked");
    pkt.append(tail).expect("tailroom checked");
    let d = pkt.data_mut();
    if sa.core.cfg.mode == Mode::Transport {
        d.copy_within(grow..grow + keep, 0);
    }
    let esp_at = outer_len + udp_len;
    let ct_start = esp_at + esp::HEADER_LEN + iv_len;
    let ct_end = ct_start + payload_len + pad + esp::TRAILER_LEN;

    // RFC 4303 §2.4–2.6: padding 1, 2, 3, …, pad length, next header.
    esp::fill_padding(&mut d[ct_start + payload_len..ct_end - 2]);
    d[ct_end - 2] = pad as u8;
    d[ct_end - 1] = nh;

    // RFC 4303 §2.1–2.2: SPI and the low 32 bits of the sequence number.
    let hdr: &mut [u8; esp::HEADER_LEN] = (&mut d[esp_at..esp_at + esp::HEADER_LEN])
        .try_into()
        .expect("8 octets");
    esp::emit_header(hdr, sa.core.cfg.spi, seq as u32);
    // The IV: unique (counter modes) or unpredictable (CBC); see Transform::make_iv.
    sa.core.transform.make_iv(
        seq,
        sa.core.cfg.iv_mask,
        &mut d[esp_at + esp::HEADER_LEN..ct_start],
    );
    // RFC 4303 §2.2.1: with ESN the high half is authenticated, never sent.
    let hi = sa.core.cfg.flags.esn.then_some((seq >> 32) as u32);
    let (body, icv) = d.split_at_mut(ct_end);
    sa.core
        .transform
        .seal(&mut body[esp_at..], hi, &mut icv[..icv_len]);

    let total = d.len();
    match (sa.core.cfg.mode, sa.core.cfg.src, sa.core.cfg.dst) {
        (Mode::Tunnel, IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut o = ipv4::Packet::new_unchecked(&mut d[..]);
            o.set_version_header_len(ipv4::HEADER_LEN);
            // DSCP copied (RFC 2983 uniform model); ECN per RFC 6040 §4.1.
            o.set_tos((inner_tos & 0xfc) | ecn::encap(inner_tos, sa.core.cfg.flags.noecn));
            o.set_total_len(total as u16);
            sa.ip_id = sa.ip_id.wrapping_add(1);
            o.set_ident(sa.ip_id);
            // DF: copied from an IPv4 inner header. For IPv6 inside IPv4,
            // RFC 4213 §3.2: set above 1280 octets (PMTU discovery works for
            // those), clear at or below, so the minimum IPv6 MTU always gets
            // through by outer fragmentation. Never with `flag nopmtudisc`.
            let df = !sa.core.cfg.flags.nopmtudisc
                && if l3.version == 6 {
                    inner_len > 1280
                } else {
                    inner_df
                };
            o.set_flags_frag(if df { ipv4::FLAG_DF } else { 0 });
            o.set_ttl(OUTER_TTL);
            o.set_protocol(proto::ESP);
            o.set_src_addr(src);
            o.set_dst_addr(dst);
            o.fill_checksum();
        }
        (Mode::Tunnel, IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut o = ipv6::Packet::new_unchecked(&mut d[..]);
            let tc = (inner_tos & 0xfc) | ecn::encap(inner_tos, sa.core.cfg.flags.noecn);
            o.set_ver_tc_flow(tc, params.flow_label);
            o.set_payload_len((total - ipv6::HEADER_LEN) as u16);
            o.set_next_header(proto::ESP);
            o.set_hop_limit(OUTER_TTL);
            o.set_src_addr(src);
            o.set_dst_addr(dst);
        }
        (Mode::Tunnel, _, _) => unreachable!("Sa::new refuses mixed-family endpoints"),
        (Mode::Transport, _, _) => {
            if l3.version == 4 {
                let mut o = ipv4::Packet::new_unchecked(&mut d[..]);
                o.set_protocol(proto::ESP);
                o.set_total_len(total as u16);
                o.fill_checksum();
            } else {
                d[l3.esp_nh_at] = proto::ESP;
                let mut o = ipv6::Packet::new_unchecked(&mut d[..]);
                o.set_payload_len((total - ipv6::HEADER_LEN) as u16);
            }
        }
    }
    if let Some(e) = sa.core.cfg.encap {
        udp_encap(d, outer_len, e.sport, e.dport);
    }
    sa.counters.packets += 1;
    sa.counters.bytes += payload_len as u64;
    sa.dirty = true;
    Ok(())
}

/// RFC 3948 §2.1: writes the UDP header at `at` (after the IP header and its
/// extension headers) and makes the IP header name UDP. The checksum is zero
/// over IPv4 (§3.1.1) and computed over IPv6, where zero is not allowed for
/// ordinary UDP (RFC 8200 §8.1).
fn udp_encap(d: &mut [u8], at: usize, sport: u16, dport: u16) {
    let total = d.len();
    udp::emit(&mut d[at..], sport, dport, (total - at) as u16);
    if d[0] >> 4 == 4 {
        let mut o = ipv4::Packet::new_unchecked(&mut d[..]);
        o.set_protocol(proto::UDP);
        o.fill_checksum();
    } else {
        // The octet naming ESP is the last next-header field before `at`.
        if let Ok(c) = ipv6::Packet::new_checked(&d[..]).and_then(|p| p.walk()) {
            d[c.upper_nh_at] = proto::UDP;
        }
        let (hdr, dgram) = d.split_at_mut(at);
        let c = udp::checksum_v6(&hdr[8..24], &hdr[24..40], dgram);
        dgram[6..8].copy_from_slice(&c.to_be_bytes());
    }
}
