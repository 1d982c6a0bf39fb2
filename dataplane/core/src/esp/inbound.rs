//! Inbound ESP processing (RFC 4303 §3.4): replay check, ICV verification and
//! decryption in place, replay-window update, trailer checks, then the inner
//! packet (tunnel mode) or the rebuilt IP header (transport mode).

use super::{ecn, L3};
use crate::buf::PacketBuf;
use crate::drop::DropReason;
use crate::state::{Mode, ReplayError, Sa};
use crate::wire::{esp, ipv4, ipv6, proto};

/// What decapsulation produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decap {
    /// `pkt` now holds the inner (tunnel) or restored (transport) IP packet.
    Packet,
    /// RFC 4303 §2.6: next header 59, a dummy packet; it is discarded silently.
    Dummy,
}

impl From<ReplayError> for DropReason {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::Replay => DropReason::Replay,
            ReplayError::TooOld => DropReason::TooOld,
        }
    }
}

/// Decapsulates the ESP packet in `pkt` (its ESP header at `l3.upper_at`).
/// Nothing in the SA changes unless the ICV verified.
pub fn decapsulate(sa: &mut Sa, pkt: &mut PacketBuf<'_>, l3: &L3) -> Result<Decap, DropReason> {
    let iv_len = sa.core.transform.iv_len();
    let icv_len = sa.core.transform.icv_len();
    let esp_at = l3.upper_at;
    let ct_start = esp_at + esp::HEADER_LEN + iv_len;
    let len = pkt.len();
    // Smallest ciphertext: pad length and next header, aligned to the block.
    if len < ct_start + icv_len + sa.core.transform.align().max(4) {
        return Err(DropReason::Runt);
    }
    let ct_end = len - icv_len;
    if !(ct_end - ct_start).is_multiple_of(sa.core.transform.align()) {
        // RFC 4303 §2.4: the trailer must end 4-octet (or block) aligned.
        return Err(DropReason::BadHeader);
    }
    let d = pkt.data_mut();
    let seq_lo = u32::from_be_bytes([d[esp_at + 4], d[esp_at + 5], d[esp_at + 6], d[esp_at + 7]]);
    // RFC 4303 §3.4.3 / Appendix A: the full number, then the cheap check first.
    let seq = if sa.core.cfg.flags.esn {
        sa.replay.infer_esn(seq_lo)
    } else {
        u64::from(seq_lo)
    };
    sa.replay.check(seq)?;
    let hi = sa.core.cfg.flags.esn.then_some((seq >> 32) as u32);
    let (body, icv) = d.split_at_mut(ct_end);
    // RFC 4303 §3.4.4: integrity first; nothing is decrypted unless it verified.
    sa.core
        .transform
        .open(&mut body[esp_at..], hi, icv)
        .map_err(|_| DropReason::IcvMismatch)?;
    // Only an authenticated packet moves the window.
    sa.replay.commit(seq)?;

    let (payload_len, nh) =
        esp::parse_trailer(&d[ct_start..ct_end]).map_err(|_| DropReason::BadPadding)?;
    sa.counters.packets += 1;
    sa.counters.bytes += payload_len as u64;
    sa.dirty = true;
    if nh == proto::NONE {
        return Ok(Decap::Dummy);
    }
    match sa.core.cfg.mode {
        Mode::Tunnel => tunnel(sa, pkt, l3, ct_start, payload_len, nh),
        Mode::Transport => transport(pkt, l3, payload_len, nh, iv_len),
    }
}

fn tunnel(
    sa: &Sa,
    pkt: &mut PacketBuf<'_>,
    l3: &L3,
    ct_start: usize,
    payload_len: usize,
    nh: u8,
) -> Result<Decap, DropReason> {
    let outer_tos = l3.tos;
    let d = pkt.data_mut();
    let inner = &mut d[ct_start..ct_start + payload_len];
    // The inner header's length bounds the packet: what follows it is TFC
    // padding (RFC 4303 §2.7) and is removed.
    let inner_len = match nh {
        proto::IPIP => {
            let mut p =
                ipv4::Packet::new_checked(&mut inner[..]).map_err(|_| DropReason::BadInner)?;
            let old = p.tos();
            let tos = inner_tos(sa, old, outer_tos)?;
            if tos != old {
                p.set_tos(tos);
                p.fill_checksum();
            }
            usize::from(p.total_len())
        }
        proto::IPV6 => {
            let mut p =
                ipv6::Packet::new_checked(&mut inner[..]).map_err(|_| DropReason::BadInner)?;
            let old = p.traffic_class();
            let tc = inner_tos(sa, old, outer_tos)?;
            if tc != old {
                p.set_traffic_class(tc);
            }
            p.total_len()
        }
        // A tunnel-mode SA carries IP packets only.
        _ => return Err(DropReason::BadInner),
    };
    pkt.trim_front(ct_start);
    pkt.truncate(inner_len);
    Ok(Decap::Packet)
}

/// The inner TOS / traffic class after decapsulation: ECN combined per
/// RFC 6040 §4.2 (unless `noecn`), DSCP taken from the outer header with
/// `decap-dscp`.
fn inner_tos(sa: &Sa, inner: u8, outer: u8) -> Result<u8, DropReason> {
    let mut tos = inner;
    if !sa.core.cfg.flags.noecn {
        tos = (tos & 0xfc) | ecn::decap(inner, outer).ok_or(DropReason::EcnDrop)?;
    }
    if sa.core.cfg.flags.decap_dscp {
        tos = (outer & 0xfc) | (tos & 3);
    }
    Ok(tos)
}

fn transport(
    pkt: &mut PacketBuf<'_>,
    l3: &L3,
    payload_len: usize,
    nh: u8,
    iv_len: usize,
) -> Result<Decap, DropReason> {
    // With UDP encapsulation (RFC 3948 §3.1.2) the UDP header goes too.
    let udp_len = if l3.udp_encap {
        crate::wire::udp::HEADER_LEN
    } else {
        0
    };
    let hdr_len = l3.upper_at - udp_len;
    let shift = udp_len + esp::HEADER_LEN + iv_len;
    let d = pkt.data_mut();
    // Move the IP header (and IPv6 extension headers before ESP) up to the payload.
    d.copy_within(0..hdr_len, shift);
    let new_len = hdr_len + payload_len;
    let h = &mut d[shift..shift + new_len];
    if l3.version == 4 {
        let mut p = ipv4::Packet::new_unchecked(&mut h[..]);
        p.set_protocol(nh);
        p.set_total_len(new_len as u16);
        p.fill_checksum();
    } else {
        h[l3.upper_nh_at] = nh;
        let mut p = ipv6::Packet::new_unchecked(&mut h[..]);
        p.set_payload_len((new_len - ipv6::HEADER_LEN) as u16);
    }
    pkt.trim_front(shift);
    pkt.truncate(new_len);
    Ok(Decap::Packet)
}
