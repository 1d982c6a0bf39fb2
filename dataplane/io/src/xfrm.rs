//! The kernel's XFRM policy table over netlink (`NETLINK_XFRM`): what
//! `ip xfrm policy add|update|delete|list` does, for espd's fail-closed guard
//! (docs/architecture.md, "The guard").
//!
//! A policy with an ESP template and no state makes Linux drop what it
//! selects: outbound and forwarded packets find no SA (`XfrmOutNoStates`,
//! with `net.core.xfrm_larval_drop=1`, the default), and inbound or
//! forwarded plaintext lacks the secpath the template asks for
//! (`XfrmInTmplMismatch`). espd mirrors its SPD into the kernel this way;
//! while espd runs, the traffic the policies select never reaches the
//! kernel's forwarding path (XDP steers it into espd), and when espd is gone
//! the kernel drops it instead of forwarding it in clear.
//!
//! espd's policies are recognised by their index: the kernel lets the
//! creator choose it (`index & 7` is the direction) and lists it, so
//! [`is_ours`] needs no state file, and `ip -s xfrm policy` shows it.
//! Messages are built and parsed by hand, as in [`crate::netlink`]
//! (`linux/xfrm.h`: `xfrm_userpolicy_info`, `xfrm_user_tmpl`,
//! `xfrm_userpolicy_id`); no `unsafe` here.

use crate::netlink::{attr, attrs, Rtnl, NLM_F_ACK};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const XFRM_MSG_NEWPOLICY: u16 = 19;
const XFRM_MSG_DELPOLICY: u16 = 20;
const XFRM_MSG_GETPOLICY: u16 = 21;
const XFRM_MSG_UPDPOLICY: u16 = 25;
const XFRMA_TMPL: u16 = 5;
const XFRMA_MARK: u16 = 21;
const XFRM_INF: u64 = u64::MAX;
const IPPROTO_ESP: u8 = 50;
/// `sizeof(struct xfrm_selector)`, `xfrm_userpolicy_info`, `xfrm_user_tmpl`, `xfrm_userpolicy_id`.
const SEL_LEN: usize = 56;
const INFO_LEN: usize = 168;
const TMPL_LEN: usize = 64;
const ID_LEN: usize = 64;

/// The top octet of every index espd gives its kernel policies.
pub const INDEX_TAG: u32 = 0xE5 << 24;
/// Kernel policies espd can number per direction.
pub const MAX_INDEX: u32 = 1 << 21;

/// True for a policy index espd chose ([`index`]).
pub fn is_ours(index: u32) -> bool {
    index & 0xFF00_0000 == INDEX_TAG
}

/// The index of espd's `n`-th kernel policy of direction `dir` (`n` < [`MAX_INDEX`]).
pub fn index(n: u32, dir: Dir) -> u32 {
    INDEX_TAG | ((n % MAX_INDEX) << 3) | dir as u32
}

/// XFRM_POLICY_IN / OUT / FWD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dir {
    In = 0,
    Out = 1,
    Fwd = 2,
}

/// What a kernel XFRM selector matches: prefixes, protocol (0 = any), and
/// port (or ICMP type / code) with a mask (0 = any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KSelector {
    pub src: IpAddr,
    pub src_len: u8,
    pub dst: IpAddr,
    pub dst_len: u8,
    pub proto: u8,
    pub sport: u16,
    pub sport_mask: u16,
    pub dport: u16,
    pub dport_mask: u16,
    /// The device (0 = any): for `out`, the route's output device of a
    /// locally sent IPv4 packet; for `in` of IPv6, the input device.
    pub ifindex: u32,
    /// The policy matches packets whose `mark & mark_mask == mark`
    /// (`XFRMA_MARK`; a zero mask matches every packet).
    pub mark: u32,
    pub mark_mask: u32,
}

/// One `tmpl`: an ESP SA the traffic must go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KTmpl {
    /// Tunnel endpoints (`None`: any / the flow's own, for transport mode).
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub spi: u32,
    pub reqid: u32,
    pub tunnel: bool,
    /// `level use`: protection optional.
    pub optional: bool,
}

/// One kernel policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KPolicy {
    pub dir: Dir,
    pub sel: KSelector,
    pub priority: u32,
    /// `action block` (else allow: bypass without templates, protect with them).
    pub block: bool,
    pub tmpls: Vec<KTmpl>,
}

fn family(a: IpAddr) -> u16 {
    match a {
        IpAddr::V4(_) => libc::AF_INET as u16,
        IpAddr::V6(_) => libc::AF_INET6 as u16,
    }
}

/// `xfrm_address_t`: 16 octets, IPv4 in the first four.
fn put_addr(m: &mut Vec<u8>, a: Option<IpAddr>) {
    let mut b = [0u8; 16];
    match a {
        Some(IpAddr::V4(a)) => b[..4].copy_from_slice(&a.octets()),
        Some(IpAddr::V6(a)) => b = a.octets(),
        None => {}
    }
    m.extend_from_slice(&b);
}

fn get_addr(b: &[u8], fam: u16) -> IpAddr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    if fam == libc::AF_INET as u16 {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

fn put_selector(m: &mut Vec<u8>, s: &KSelector) {
    let start = m.len();
    put_addr(m, Some(s.dst));
    put_addr(m, Some(s.src));
    for v in [s.dport, s.dport_mask, s.sport, s.sport_mask] {
        m.extend_from_slice(&v.to_be_bytes());
    }
    m.extend_from_slice(&family(s.dst).to_ne_bytes());
    m.extend_from_slice(&[s.dst_len, s.src_len, s.proto, 0, 0, 0]);
    m.extend_from_slice(&s.ifindex.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // user
    debug_assert_eq!(m.len() - start, SEL_LEN);
}

fn get_selector(b: &[u8]) -> KSelector {
    let be = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
    let fam = u16::from_ne_bytes([b[40], b[41]]);
    KSelector {
        dst: get_addr(&b[0..], fam),
        src: get_addr(&b[16..], fam),
        dport: be(32),
        dport_mask: be(34),
        sport: be(36),
        sport_mask: be(38),
        dst_len: b[42],
        src_len: b[43],
        proto: b[44],
        ifindex: u32::from_ne_bytes([b[48], b[49], b[50], b[51]]),
        mark: 0,
        mark_mask: 0,
    }
}

/// `struct xfrm_mark { v, m }` of a selector's mark, if it has one.
fn put_mark(m: &mut Vec<u8>, s: &KSelector) {
    if s.mark_mask != 0 {
        let mut v = s.mark.to_ne_bytes().to_vec();
        v.extend_from_slice(&s.mark_mask.to_ne_bytes());
        attr(m, XFRMA_MARK, &v);
    }
}

/// The body of an add/update: `xfrm_userpolicy_info` and one `XFRMA_TMPL`.
fn policy_msg(p: &KPolicy, index: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(INFO_LEN + 4 + TMPL_LEN * p.tmpls.len());
    put_selector(&mut m, &p.sel);
    // xfrm_lifetime_cfg: no byte or packet limits, no expiry; then a zero
    // xfrm_lifetime_cur.
    for v in [XFRM_INF, XFRM_INF, XFRM_INF, XFRM_INF, 0, 0, 0, 0] {
        m.extend_from_slice(&v.to_ne_bytes());
    }
    m.extend_from_slice(&[0u8; 32]);
    m.extend_from_slice(&p.priority.to_ne_bytes());
    m.extend_from_slice(&index.to_ne_bytes());
    // dir, action (0 allow, 1 block), flags, share; padding to 8.
    m.extend_from_slice(&[p.dir as u8, u8::from(p.block), 0, 0, 0, 0, 0, 0]);
    debug_assert_eq!(m.len(), INFO_LEN);
    if !p.tmpls.is_empty() {
        let mut t = Vec::with_capacity(TMPL_LEN * p.tmpls.len());
        for k in &p.tmpls {
            let fam = k.dst.or(k.src).map_or(family(p.sel.dst), family);
            put_addr(&mut t, k.dst);
            t.extend_from_slice(&k.spi.to_be_bytes());
            t.extend_from_slice(&[IPPROTO_ESP, 0, 0, 0]);
            t.extend_from_slice(&fam.to_ne_bytes());
            t.extend_from_slice(&[0, 0]);
            put_addr(&mut t, k.src);
            t.extend_from_slice(&k.reqid.to_ne_bytes());
            t.extend_from_slice(&[u8::from(k.tunnel), 0, u8::from(k.optional), 0]);
            // Any authentication, encryption and compression algorithm.
            for _ in 0..3 {
                t.extend_from_slice(&u32::MAX.to_ne_bytes());
            }
        }
        attr(&mut m, XFRMA_TMPL, &t);
    }
    put_mark(&mut m, &p.sel);
    m
}

/// One kernel policy as listed: its index and what espd reads of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub index: u32,
    pub policy: KPolicy,
}

fn parse_policy(b: &[u8]) -> Option<Listed> {
    if b.len() < INFO_LEN {
        return None;
    }
    let mut sel = get_selector(&b[..SEL_LEN]);
    let priority = u32::from_ne_bytes(b[152..156].try_into().ok()?);
    let index = u32::from_ne_bytes(b[156..160].try_into().ok()?);
    let dir = match b[160] {
        0 => Dir::In,
        1 => Dir::Out,
        2 => Dir::Fwd,
        _ => return None,
    };
    let mut tmpls = Vec::new();
    for (ty, d) in attrs(&b[INFO_LEN..]) {
        if ty == XFRMA_MARK && d.len() >= 8 {
            sel.mark = u32::from_ne_bytes(d[0..4].try_into().ok()?);
            sel.mark_mask = u32::from_ne_bytes(d[4..8].try_into().ok()?);
            continue;
        }
        if ty != XFRMA_TMPL {
            continue;
        }
        for t in d.chunks_exact(TMPL_LEN) {
            let fam = u16::from_ne_bytes([t[24], t[25]]);
            let addr = |o: usize| Some(get_addr(&t[o..], fam)).filter(|a| !a.is_unspecified());
            tmpls.push(KTmpl {
                dst: addr(0),
                spi: u32::from_be_bytes(t[16..20].try_into().ok()?),
                src: addr(28),
                reqid: u32::from_ne_bytes(t[44..48].try_into().ok()?),
                tunnel: t[48] == 1,
                optional: t[50] != 0,
            });
        }
    }
    Some(Listed {
        index,
        policy: KPolicy {
            dir,
            sel,
            priority,
            block: b[161] == 1,
            tmpls,
        },
    })
}

/// An XFRM netlink socket.
pub struct Xfrm(Rtnl);

impl Xfrm {
    pub fn open() -> io::Result<Self> {
        Ok(Xfrm(Rtnl::open_raw(libc::NETLINK_XFRM)?))
    }

    /// `ip xfrm policy update … index INDEX`: adds the policy, or replaces
    /// the one with the same selector and direction (which keeps its index).
    pub fn put(&mut self, p: &KPolicy, index: u32) -> io::Result<()> {
        self.0
            .request(XFRM_MSG_UPDPOLICY, NLM_F_ACK, &policy_msg(p, index), None)
            .map(|_| ())
    }

    /// `ip xfrm policy delete index INDEX dir DIR [mark M mask K]` (the
    /// kernel finds a marked policy by its index only with its mark, `sel`'s);
    /// a policy already gone is fine.
    pub fn delete(&mut self, dir: Dir, sel: &KSelector, index: u32) -> io::Result<()> {
        let mut m = vec![0u8; SEL_LEN];
        m.extend_from_slice(&index.to_ne_bytes());
        m.push(dir as u8);
        m.resize(ID_LEN, 0);
        put_mark(&mut m, sel);
        match self.0.request(XFRM_MSG_DELPOLICY, NLM_F_ACK, &m, None) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// `ip xfrm policy list`: every main-type policy of this namespace.
    pub fn list(&mut self) -> io::Result<Vec<Listed>> {
        let answers = self
            .0
            .dump(XFRM_MSG_GETPOLICY, &[0u8; ID_LEN], XFRM_MSG_NEWPOLICY)?;
        Ok(answers.iter().filter_map(|b| parse_policy(b)).collect())
    }
}

/// Splits the port range `lo..=hi` into (value, mask) blocks as XFRM
/// selectors match them (`(port ^ value) & mask == 0`); `(0, 0)` is any.
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u16)> {
    if lo == 0 && hi == u16::MAX {
        return vec![(0, 0)];
    }
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    let mut out = Vec::new();
    while lo <= hi {
        // The largest aligned block starting at lo that stays within hi.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, (!(size - 1) & 0xffff) as u16));
        lo += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> KPolicy {
        KPolicy {
            dir: Dir::Fwd,
            sel: KSelector {
                src: "198.18.2.0".parse().unwrap(),
                src_len: 24,
                dst: "198.18.1.0".parse().unwrap(),
                dst_len: 24,
                proto: 17,
                sport: 0,
                sport_mask: 0,
                dport: 53,
                dport_mask: 0xffff,
                ifindex: 0,
                mark: 0,
                mark_mask: 0,
            },
            priority: 100,
            block: false,
            tmpls: vec![KTmpl {
                src: Some("198.18.0.2".parse().unwrap()),
                dst: Some("198.18.0.1".parse().unwrap()),
                spi: 0,
                reqid: 2,
                tunnel: true,
                optional: false,
            }],
        }
    }

    #[test]
    fn a_policy_message_parses_back_to_itself() {
        let p = sample();
        let idx = index(7, Dir::Fwd);
        assert!(is_ours(idx) && idx & 7 == 2);
        let m = policy_msg(&p, idx);
        assert_eq!(m.len(), INFO_LEN + 4 + TMPL_LEN);
        let l = parse_policy(&m).unwrap();
        assert_eq!(l.index, idx);
        assert_eq!(l.policy, p);
        let mut v6 = sample();
        v6.sel.src = "2001:db8:2::".parse().unwrap();
        v6.sel.dst = "2001:db8:1::".parse().unwrap();
        v6.tmpls[0].src = Some("2001:db8::2".parse().unwrap());
        v6.tmpls[0].dst = Some("2001:db8::1".parse().unwrap());
        v6.tmpls.push(KTmpl {
            src: None,
            dst: None,
            spi: 0x1234,
            reqid: 0,
            tunnel: false,
            optional: true,
        });
        v6.block = true;
        assert_eq!(parse_policy(&policy_msg(&v6, idx)).unwrap().policy, v6);
        // Host mode: an outbound entry bound to a device, an inbound one
        // that lets marked packets by (XFRMA_MARK).
        let mut host = sample();
        host.sel.ifindex = 7;
        host.sel.mark_mask = 0x0010_0000;
        let m = policy_msg(&host, idx);
        assert_eq!(m.len(), INFO_LEN + 4 + TMPL_LEN + 4 + 8);
        assert_eq!(parse_policy(&m).unwrap().policy, host);
        assert!(parse_policy(&m[..100]).is_none());
    }

    #[test]
    fn port_ranges_split_into_exact_aligned_blocks() {
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(port_blocks(53, 53), vec![(53, 0xffff)]);
        assert_eq!(port_blocks(1024, 2047), vec![(1024, 0xfc00)]);
        for (lo, hi) in [(1, 1000), (5000, 5100), (0, 1), (65000, 65535), (0, 65534)] {
            let b = port_blocks(lo, hi);
            for port in 0..=65535u16 {
                let hit = b.iter().any(|(v, m)| (port ^ v) & m == 0);
                assert_eq!(hit, (lo..=hi).contains(&port), "{lo}-{hi} port {port}");
            }
            assert!(b.len() <= 32, "{lo}-{hi}: {}", b.len());
        }
    }
}
