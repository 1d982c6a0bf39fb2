//! The IP header checks the engine runs once per packet, and the partial
//! checksum completion for virtual links.

use super::*;

pub(super) fn map_wire(e: wire::Error) -> DropReason {
    match e {
        wire::Error::Truncated => DropReason::Runt,
        wire::Error::Malformed => DropReason::BadHeader,
        wire::Error::Checksum => DropReason::BadChecksum,
    }
}

/// Checks the headers of an IP packet, trims link-layer padding and returns
/// what processing needs.
// Inlined: its result is large, and built in place it is not copied.
#[inline(always)]
pub(super) fn parse(pkt: &mut PacketBuf<'_>) -> Result<(L3, Flow), DropReason> {
    let (l3, flow, len) = parse_inner(pkt.data())?;
    pkt.truncate(len);
    Ok((l3, flow))
}

// Inlined: its result is large, and built in place it is not copied.
#[inline(always)]
pub(super) fn parse_ro(d: &[u8]) -> Result<(L3, Flow), DropReason> {
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

/// The engine's view of [`wire::ip::Repr`]: the checked headers, the
/// selector fields, and the length.
#[inline(always)]
pub(super) fn parse_inner(d: &[u8]) -> Result<(L3, Flow, usize), DropReason> {
    let r = wire::ip::Repr::parse(d).map_err(map_wire)?;
    let flow = Flow {
        src: r.src,
        dst: r.dst,
        proto: r.proto,
        ports: r.ports,
    };
    Ok((
        L3 {
            ip: r,
            udp_encap: false,
        },
        flow,
        r.len,
    ))
}
