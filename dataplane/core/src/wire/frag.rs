//! Fragmentation of outgoing packets (RFC 791 §3.2, RFC 8200 §4.5), sans-IO:
//! fragments are built in a caller-owned scratch buffer and handed to `emit`.
//! Used for the outer packet of a tunnel when the inner packet allowed
//! fragmentation (IPv4 without DF), as Linux does.

use super::{ipv4, ipv6, proto, Error, Result};

/// Splits the IPv4 packet `pkt` into fragments of at most `mtu` octets.
/// Later fragments carry only the options whose "copied" flag is set.
/// Refuses packets with DF set, and an `mtu` too small for 8 data octets.
pub fn ipv4(
    pkt: &[u8],
    mtu: usize,
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<usize> {
    let p = ipv4::Packet::new_checked(pkt)?;
    if p.dont_frag() {
        return Err(Error::Malformed);
    }
    let hl = p.header_len();
    let total = usize::from(p.total_len());
    // The options later fragments keep (RFC 791 §3.1: copied flag 0x80).
    let mut later_hdr = [0u8; 60];
    later_hdr[..20].copy_from_slice(&pkt[..20]);
    let mut ll = 20;
    let mut i = 20;
    while i < hl {
        let ty = pkt[i];
        let len = match ty {
            0 => break,
            1 => 1,
            _ => usize::from(*pkt.get(i + 1).ok_or(Error::Malformed)?).max(2),
        };
        if i + len > hl {
            return Err(Error::Malformed);
        }
        if ty & 0x80 != 0 {
            later_hdr[ll..ll + len].copy_from_slice(&pkt[i..i + len]);
            ll += len;
        }
        i += len;
    }
    let ll = ll.div_ceil(4) * 4; // pad with End-of-Options (zeros)
    let base_off = usize::from(p.flags_frag() & ipv4::OFFSET_MASK) * 8;
    let orig_mf = p.flags_frag() & ipv4::FLAG_MF != 0;
    let data = &pkt[hl..total];
    let mut at = 0;
    let mut n = 0;
    while at < data.len() {
        let h = if at == 0 { hl } else { ll };
        let room = mtu
            .checked_sub(h)
            .map(|r| r / 8 * 8)
            .filter(|r| *r >= 8)
            .ok_or(Error::Malformed)?;
        let take = room.min(data.len() - at);
        let last = at + take == data.len();
        let out = &mut scratch[..h + take];
        if at == 0 {
            out[..hl].copy_from_slice(&pkt[..hl]);
        } else {
            out[..ll].copy_from_slice(&later_hdr[..ll]);
        }
        out[h..].copy_from_slice(&data[at..at + take]);
        let mut f = ipv4::Packet::new_unchecked(&mut out[..]);
        f.set_version_header_len(h);
        f.set_total_len((h + take) as u16);
        let mf = if !last || orig_mf { ipv4::FLAG_MF } else { 0 };
        f.set_flags_frag(mf | (((base_off + at) / 8) as u16 & ipv4::OFFSET_MASK));
        f.fill_checksum();
        emit(out);
        at += take;
        n += 1;
    }
    Ok(n)
}

/// Splits the IPv6 packet `pkt` into fragments of at most `mtu` octets with
/// a Fragment header (RFC 8200 §4.5) carrying `id`, after the unfragmentable
/// part (IPv6 header, hop-by-hop, routing). Refuses packets that already
/// have a Fragment header.
pub fn ipv6(
    pkt: &[u8],
    mtu: usize,
    id: u32,
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<usize> {
    let p = ipv6::Packet::new_checked(pkt)?;
    let c = p.walk()?;
    if c.fragment.is_some() {
        return Err(Error::Malformed);
    }
    let total = p.total_len();
    let unfrag = c.esp_at;
    let first_nh = pkt[c.esp_nh_at];
    let data = &pkt[unfrag..total];
    let h = unfrag + 8;
    let room = mtu
        .checked_sub(h)
        .map(|r| r / 8 * 8)
        .filter(|r| *r >= 8)
        .ok_or(Error::Malformed)?;
    let mut at = 0;
    let mut n = 0;
    while at < data.len() {
        let take = room.min(data.len() - at);
        let last = at + take == data.len();
        let out = &mut scratch[..h + take];
        out[..unfrag].copy_from_slice(&pkt[..unfrag]);
        out[c.esp_nh_at] = proto::FRAGMENT;
        let fh = &mut out[unfrag..h];
        fh[0] = first_nh;
        fh[1] = 0;
        fh[2..4].copy_from_slice(&((at as u16) | u16::from(!last)).to_be_bytes());
        fh[4..8].copy_from_slice(&id.to_be_bytes());
        out[h..].copy_from_slice(&data[at..at + take]);
        let mut f = ipv6::Packet::new_unchecked(&mut out[..]);
        f.set_payload_len((h + take - ipv6::HEADER_LEN) as u16);
        emit(out);
        at += take;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_packet(len: usize, options: &[u8]) -> Vec<u8> {
        let hl = 20 + options.len();
        let mut b = vec![0u8; len];
        for (i, x) in b[hl..].iter_mut().enumerate() {
            *x = i as u8;
        }
        b[20..hl].copy_from_slice(options);
        let mut p = ipv4::Packet::new_unchecked(&mut b[..]);
        p.set_version_header_len(hl);
        p.set_total_len(len as u16);
        p.set_ttl(64);
        p.set_protocol(50);
        p.set_ident(0x1234);
        p.fill_checksum();
        b
    }

    #[test]
    fn ipv4_fragments_reassemble() {
        // Options: one copied (0x83, LSRR-like, len 4), one not (0x07, len 4).
        let pkt = v4_packet(3000, &[0x83, 4, 0, 0, 0x07, 4, 0, 0]);
        let mut scratch = [0u8; 2048];
        let mut frags = Vec::new();
        let n = ipv4(&pkt, 1500, &mut scratch, |f| frags.push(f.to_vec())).unwrap();
        assert_eq!(n, 3);
        let mut data = Vec::new();
        for (i, f) in frags.iter().enumerate() {
            assert!(f.len() <= 1500);
            let p = ipv4::Packet::new_checked(&f[..]).unwrap();
            assert!(p.verify_checksum());
            assert_eq!(p.ident(), 0x1234);
            assert_eq!(p.header_len(), if i == 0 { 28 } else { 24 });
            assert_eq!(
                usize::from(p.flags_frag() & ipv4::OFFSET_MASK) * 8,
                data.len()
            );
            assert_eq!(p.flags_frag() & ipv4::FLAG_MF != 0, i < 2);
            data.extend_from_slice(p.payload());
        }
        assert_eq!(data, pkt[28..]);
        // DF packets and tiny MTUs are refused.
        let mut df = pkt.clone();
        df[6] |= 0x40;
        assert!(ipv4(&df, 1500, &mut scratch, |_| {}).is_err());
        assert!(ipv4(&pkt, 30, &mut scratch, |_| {}).is_err());
    }

    #[test]
    fn ipv6_fragments_reassemble() {
        let mut pkt = vec![0u8; 40 + 2960];
        pkt[0] = 0x60;
        pkt[4..6].copy_from_slice(&2960u16.to_be_bytes());
        pkt[6] = 50;
        pkt[7] = 64;
        for (i, x) in pkt[40..].iter_mut().enumerate() {
            *x = (i * 7) as u8;
        }
        let mut scratch = [0u8; 2048];
        let mut frags = Vec::new();
        let n = ipv6(&pkt, 1280, 77, &mut scratch, |f| frags.push(f.to_vec())).unwrap();
        assert_eq!(n, 3);
        let mut data = Vec::new();
        for (i, f) in frags.iter().enumerate() {
            assert!(f.len() <= 1280);
            let p = ipv6::Packet::new_checked(&f[..]).unwrap();
            let c = p.walk().unwrap();
            assert_eq!(c.fragment, Some(((data.len() / 8) as u16, i < 2)));
            assert_eq!(c.upper, 50);
            assert_eq!(u32::from_be_bytes(f[44..48].try_into().unwrap()), 77);
            data.extend_from_slice(&f[48..]);
        }
        assert_eq!(data, pkt[40..]);
    }
}
