//! Reassembly of outer IP fragments before ESP (RFC 4303 §3.4.1: ESP is
//! applied only to whole IP datagrams; a receiver that accepts fragments
//! reassembles them first). A peer fragments what it encapsulated when the
//! path is narrower than the packet (Linux XFRM for DF-clear traffic, DPDK's
//! `--reassemble` peer, a router on the way).
//!
//! Bounded, because fragments are a memory-exhaustion target: at most
//! [`Limits::entries`] datagrams in progress, [`Limits::bytes`] octets held,
//! [`Limits::per_source`] datagrams per source address, each at most
//! [`Limits::datagram`] octets, each for at most [`Limits::timeout_ms`].
//! Overlapping fragments discard the whole datagram (RFC 5722 for IPv6, and
//! for IPv4 too: legitimate senders never overlap, and overlaps are how
//! filters are evaded); an exact duplicate of a fragment already held is
//! dropped alone. Sans-IO: the caller gives the time.

use crate::drop::DropReason;
use crate::wire::checksum;
use core::net::IpAddr;
use rustc_hash::FxHashMap as HashMap;

/// The bounds of a reassembly table.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub entries: usize,
    pub bytes: usize,
    pub per_source: usize,
    /// The largest reassembled datagram (what fits the caller's buffer).
    pub datagram: usize,
    pub timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            entries: 1024,
            bytes: 4 << 20,
            per_source: 64,
            datagram: 3072,
            // Linux waits 30 s (ipfrag_time); an ESP peer's fragments come
            // back to back, so a few seconds bound the state held for a flood.
            timeout_ms: 5_000,
        }
    }
}

/// (source, destination, identification, protocol; 0 for IPv6).
type Key = (IpAddr, IpAddr, u32, u8);

struct Entry {
    /// The first fragment's header (IPv4 header, or IPv6 header and the
    /// unfragmentable part), once it arrived; and the next header to put
    /// in place of IPv6's Fragment header.
    header: Option<(Vec<u8>, u8)>,
    data: Vec<u8>,
    /// Octet ranges held, sorted, disjoint.
    have: Vec<(usize, usize)>,
    /// The payload length, once the last fragment arrived.
    total: Option<usize>,
    since: u64,
    /// What this entry counts against [`Limits::bytes`].
    charged: usize,
}

/// One fragment's facts, from the caller's header parse.
#[derive(Debug, Clone, Copy)]
pub struct Fragment<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub id: u32,
    /// IPv4: the protocol; IPv6: 0 (the key is source, destination, id).
    pub proto: u8,
    /// Offset of this fragment's payload in the datagram, in octets.
    pub offset: usize,
    pub more: bool,
    /// What precedes the fragmentable part (IPv4: the header; IPv6: the
    /// fixed header and the extension headers before the Fragment header).
    pub header: &'a [u8],
    /// IPv6: the Fragment header's next header (what the datagram carries).
    pub next: u8,
    pub payload: &'a [u8],
}

/// What adding a fragment did.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    /// Held; the datagram is not complete yet.
    Held,
    /// The datagram is complete: its length in `out`.
    Complete(usize),
}

/// A reassembly table and its counters.
pub struct Reassembler {
    limits: Limits,
    map: HashMap<Key, Entry>,
    per_source: HashMap<IpAddr, usize>,
    bytes: usize,
    pub reassembled: u64,
    /// The most datagrams ever in progress at once.
    pub peak: usize,
}

impl Reassembler {
    pub fn new(limits: Limits) -> Self {
        Reassembler {
            limits,
            map: HashMap::default(),
            per_source: HashMap::default(),
            bytes: 0,
            reassembled: 0,
            peak: 0,
        }
    }

    /// Datagrams in progress.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn remove(&mut self, k: &Key) {
        if let Some(e) = self.map.remove(k) {
            self.bytes -= e.charged;
            if let Some(n) = self.per_source.get_mut(&k.0) {
                *n -= 1;
                if *n == 0 {
                    self.per_source.remove(&k.0);
                }
            }
        }
    }

    /// Drops datagrams older than the timeout; returns how many (each one
    /// a `FragTimeout` for the caller to count).
    pub fn expire(&mut self, now_ms: u64) -> u64 {
        let old: Vec<Key> = self
            .map
            .iter()
            .filter(|(_, e)| now_ms.saturating_sub(e.since) >= self.limits.timeout_ms)
            .map(|(k, _)| *k)
            .collect();
        for k in &old {
            self.remove(k);
        }
        old.len() as u64
    }

    /// Adds one fragment; when it completes its datagram, writes the whole
    /// IP packet to `out` (an IPv4 header without fragment fields and with
    /// its checksum redone, or the IPv6 headers without the Fragment header).
    pub fn add(
        &mut self,
        f: &Fragment<'_>,
        now_ms: u64,
        out: &mut [u8],
    ) -> Result<Added, DropReason> {
        let end = f.offset + f.payload.len();
        // RFC 791 / 8200: every fragment but the last carries a multiple of 8.
        if f.more && (f.payload.is_empty() || !f.payload.len().is_multiple_of(8)) {
            return Err(DropReason::BadHeader);
        }
        let max = self.limits.datagram.min(out.len());
        if end + f.header.len() > max {
            return Err(DropReason::FragTooBig);
        }
        let key = (f.src, f.dst, f.id, f.proto);
        if !self.map.contains_key(&key) {
            if self.map.len() >= self.limits.entries
                || self.bytes + max > self.limits.bytes
                || self.per_source.get(&f.src).copied().unwrap_or(0) >= self.limits.per_source
            {
                return Err(DropReason::FragTableFull);
            }
            self.map.insert(
                key,
                Entry {
                    header: None,
                    data: Vec::with_capacity(max),
                    have: Vec::new(),
                    total: None,
                    since: now_ms,
                    charged: max,
                },
            );
            self.bytes += max;
            *self.per_source.entry(f.src).or_insert(0) += 1;
            self.peak = self.peak.max(self.map.len());
        }
        let e = self.map.get_mut(&key).expect("just inserted");
        // An exact duplicate changes nothing; any other overlap ends it all.
        if e.have.contains(&(f.offset, end)) {
            let same = e.data.get(f.offset..end) == Some(f.payload);
            if same {
                return Err(DropReason::FragDuplicate);
            }
        }
        let overlaps = e.have.iter().any(|&(a, b)| f.offset < b && a < end);
        let bad_last = match (e.total, f.more) {
            (Some(t), _) if end > t => true,
            (Some(t), false) if end != t => true,
            (None, false) if e.have.iter().any(|&(_, b)| b > end) => true,
            _ => false,
        };
        if overlaps || bad_last {
            self.remove(&key);
            return Err(DropReason::FragOverlap);
        }
        if e.data.len() < end {
            e.data.resize(end, 0);
        }
        e.data[f.offset..end].copy_from_slice(f.payload);
        let at = e.have.partition_point(|&(a, _)| a < f.offset);
        e.have.insert(at, (f.offset, end));
        if !f.more {
            e.total = Some(end);
        }
        if f.offset == 0 {
            e.header = Some((f.header.to_vec(), f.next));
        }
        let complete = match (e.total, &e.header) {
            (Some(t), Some(_)) => {
                let mut next = 0;
                e.have.iter().all(|&(a, b)| {
                    let ok = a == next;
                    next = b;
                    ok
                }) && next == t
            }
            _ => false,
        };
        if !complete {
            return Ok(Added::Held);
        }
        let e = self.map.get(&key).expect("present");
        let (h, nh) = e.header.as_ref().expect("complete");
        let t = e.total.expect("complete");
        let n = h.len() + t;
        out[..h.len()].copy_from_slice(h);
        out[h.len()..n].copy_from_slice(&e.data[..t]);
        let nh = *nh;
        self.remove(&key);
        finish_header(&mut out[..n], nh);
        self.reassembled += 1;
        Ok(Added::Complete(n))
    }
}

/// Makes the header of a reassembled datagram whole: IPv4 total length,
/// fragment fields cleared, checksum; IPv6 payload length and the next
/// header where the Fragment header was (the last header of the
/// unfragmentable part, or the fixed header's).
fn finish_header(p: &mut [u8], nh: u8) {
    let n = p.len();
    if p[0] >> 4 == 4 {
        let ihl = usize::from(p[0] & 0x0f) * 4;
        p[2..4].copy_from_slice(&(n as u16).to_be_bytes());
        p[6..8].copy_from_slice(&[0, 0]);
        p[10..12].copy_from_slice(&[0, 0]);
        let c = !checksum::sum(&p[..ihl]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        p[4..6].copy_from_slice(&((n - 40) as u16).to_be_bytes());
        // The header whose next-header field named the Fragment header: the
        // last of the unfragmentable part (hop-by-hop, routing, destination
        // options before routing), or the fixed header.
        let mut at = 6;
        let mut cur = p[6];
        let mut off = 40;
        while matches!(cur, 0 | 43 | 60) && off + 8 <= n {
            at = off;
            cur = p[off];
            off += (usize::from(p[off + 1]) + 1) * 8;
            if cur == 44 {
                break;
            }
        }
        p[at] = nh;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_header(id: u16) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[4..6].copy_from_slice(&id.to_be_bytes());
        h[8] = 64;
        h[9] = 50;
        h[12..16].copy_from_slice(&[198, 18, 0, 2]);
        h[16..20].copy_from_slice(&[198, 18, 0, 1]);
        h
    }

    fn frag<'a>(
        h: &'a [u8],
        payload: &'a [u8],
        offset: usize,
        more: bool,
        id: u32,
    ) -> Fragment<'a> {
        Fragment {
            src: "198.18.0.2".parse().unwrap(),
            dst: "198.18.0.1".parse().unwrap(),
            id,
            proto: 50,
            offset,
            more,
            header: h,
            next: 0,
            payload,
        }
    }

    fn datagram() -> Vec<u8> {
        (0..1200u32).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn in_any_order_the_datagram_comes_back_whole_with_a_good_header() {
        let d = datagram();
        let h = v4_header(77);
        let parts = [(0, 512, true), (512, 1024, true), (1024, 1200, false)];
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
            let mut r = Reassembler::new(Limits::default());
            let mut out = vec![0u8; 4096];
            let mut done = None;
            for (i, &k) in order.iter().enumerate() {
                let (a, b, m) = parts[k];
                match r.add(&frag(&h, &d[a..b], a, m, 77), 0, &mut out).unwrap() {
                    Added::Held => assert!(i < 2),
                    Added::Complete(n) => done = Some(n),
                }
            }
            let n = done.expect("complete");
            assert_eq!(n, 1220);
            assert_eq!(&out[20..n], &d[..]);
            assert_eq!(u16::from_be_bytes([out[2], out[3]]), 1220);
            assert_eq!(&out[6..8], &[0, 0]);
            assert_eq!(
                checksum::sum(&out[..20]),
                0xffff,
                "header checksum verifies"
            );
            assert!(r.is_empty() && r.reassembled == 1);
        }
    }

    #[test]
    fn duplicates_overlaps_and_lies_about_the_end() {
        let d = datagram();
        let h = v4_header(1);
        let mut out = vec![0u8; 4096];
        let mut r = Reassembler::new(Limits::default());
        r.add(&frag(&h, &d[..512], 0, true, 1), 0, &mut out)
            .unwrap();
        // The same fragment again: dropped alone, the datagram goes on.
        assert_eq!(
            r.add(&frag(&h, &d[..512], 0, true, 1), 0, &mut out),
            Err(DropReason::FragDuplicate)
        );
        assert_eq!(
            r.add(&frag(&h, &d[512..1200], 512, false, 1), 0, &mut out),
            Ok(Added::Complete(1220))
        );
        // Overlapping (RFC 5722): the whole datagram is discarded.
        r.add(&frag(&h, &d[..512], 0, true, 2), 0, &mut out)
            .unwrap();
        assert_eq!(
            r.add(&frag(&h, &d[256..768], 256, true, 2), 0, &mut out),
            Err(DropReason::FragOverlap)
        );
        assert!(r.is_empty());
        // A fragment past the end the last one declared.
        r.add(&frag(&h, &d[1024..1200], 1024, false, 3), 0, &mut out)
            .unwrap();
        assert_eq!(
            r.add(&frag(&h, &d[1104..1200], 1104, true, 3), 0, &mut out)
                .unwrap_err(),
            DropReason::FragOverlap
        );
        // Not a multiple of 8 before the end.
        assert_eq!(
            r.add(&frag(&h, &d[..500], 0, true, 4), 0, &mut out),
            Err(DropReason::BadHeader)
        );
    }

    #[test]
    fn the_table_is_bounded_and_old_datagrams_expire() {
        let d = datagram();
        let h = v4_header(1);
        let mut out = vec![0u8; 4096];
        let lim = Limits {
            per_source: 8,
            ..Limits::default()
        };
        let mut r = Reassembler::new(lim);
        let mut full = 0;
        for id in 0..100 {
            if r.add(&frag(&h, &d[..512], 0, true, id), 0, &mut out)
                == Err(DropReason::FragTableFull)
            {
                full += 1;
            }
        }
        assert_eq!(
            (r.len(), full),
            (8, 92),
            "one source holds at most per_source datagrams"
        );
        assert_eq!(r.expire(lim.timeout_ms - 1), 0);
        assert_eq!(r.expire(lim.timeout_ms), 8);
        assert!(r.is_empty() && r.bytes == 0);
        // Too big for the caller's buffer: refused before anything is held.
        let big = vec![0u8; 4000];
        assert_eq!(
            r.add(&frag(&h, &big[..8], 3992, false, 9), 0, &mut out),
            Err(DropReason::FragTooBig)
        );
        assert!(r.is_empty());
    }

    #[test]
    fn ipv6_loses_its_fragment_header() {
        let d = datagram();
        let mut h = [0u8; 40];
        h[0] = 0x60;
        h[6] = 44; // Fragment header next (it is left out of `header`)
        h[7] = 64;
        let src: IpAddr = "2001:db8::2".parse().unwrap();
        let dst: IpAddr = "2001:db8::1".parse().unwrap();
        let f = |a: usize, b: usize, m| Fragment {
            src,
            dst,
            id: 9,
            proto: 0,
            offset: a,
            more: m,
            header: &h,
            next: 50,
            payload: &d[a..b],
        };
        let mut r = Reassembler::new(Limits::default());
        let mut out = vec![0u8; 4096];
        r.add(&f(512, 1200, false), 0, &mut out).unwrap();
        let n = match r.add(&f(0, 512, true), 0, &mut out).unwrap() {
            Added::Complete(n) => n,
            a => panic!("{a:?}"),
        };
        assert_eq!(n, 1240);
        assert_eq!(out[6], 50, "next header is ESP again");
        assert_eq!(u16::from_be_bytes([out[4], out[5]]), 1200);
        assert_eq!(&out[40..n], &d[..]);
    }
}
