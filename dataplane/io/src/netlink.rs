//! The kernel's routing and neighbour tables over rtnetlink (the namespace
//! espd runs in), so that ordinary `ip route` / `ip neigh` set-ups steer
//! espd's output: `RTM_GETROUTE` for one destination (what `ip route get`
//! does), `RTM_GETNEIGH` for one neighbour, and `RTM_NEWNEIGH` with
//! `NTF_USE` (`ip neigh replace ADDR dev DEV use`) to have the kernel resolve
//! or refresh an entry — espd never guesses a link-layer address.
//!
//! Messages are built and parsed here by hand (a few fixed layouts from
//! `linux/rtnetlink.h` and `linux/neighbour.h`); the socket is nix's (one
//! `unsafe` opens the XFRM socket nix does not name).

use nix::sys::socket::{
    bind, recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};

const NLMSG_ERROR: u16 = 2;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTA_MARK: u16 = 16;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const RTN_UNICAST: u8 = 1;
const RTN_LOCAL: u8 = 2;
const NTF_USE: u8 = 0x01;
const NUD_INCOMPLETE: u16 = 0x01;
const NUD_FAILED: u16 = 0x20;
const NUD_NONE: u16 = 0x00;
const NUD_NOARP: u16 = 0x40;
const NUD_PERMANENT: u16 = 0x80;

/// Where the kernel would send a packet for a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Out of interface `oif` to the neighbour `via` (the gateway, or the
    /// destination itself when it is on link); `src` is the preferred source.
    Unicast {
        oif: u32,
        via: IpAddr,
        src: Option<IpAddr>,
    },
    /// Addressed to this host.
    Local,
    /// No route, or one that is not unicast (unreachable, blackhole,
    /// prohibit, broadcast, multicast).
    None,
}

/// One netlink socket (rtnetlink, or XFRM for [`crate::xfrm`]). Requests
/// are answered in order; one at a time.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP: u16 = 0x300;

fn family(a: IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn octets(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn ip_from(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?))),
        _ => None,
    }
}

/// Appends one attribute (`struct rtattr`, 4-aligned).
pub(crate) fn attr(m: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    m.extend_from_slice(&(len as u16).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(data);
    m.resize(m.len().next_multiple_of(4), 0);
}

/// The attributes after a fixed header: (type, payload) pairs.
pub(crate) fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let data = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((ty, data))
    })
}

impl Rtnl {
    pub fn open() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        Self::with_fd(fd)
    }

    /// A socket of netlink protocol `proto` that nix does not name
    /// (`NETLINK_XFRM`).
    pub(crate) fn open_raw(proto: libc::c_int) -> io::Result<Self> {
        // SAFETY: socket(2) takes no pointers; the result is checked before use.
        let fd =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor this process owns and nothing else holds.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Self::with_fd(fd)
    }

    fn with_fd(fd: OwnedFd) -> io::Result<Self> {
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(Rtnl {
            fd,
            seq: 1,
            buf: vec![0u8; 32 * 1024],
        })
    }

    fn send(&mut self, ty: u16, flags: u16, body: &[u8]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut m = Vec::with_capacity(16 + body.len());
        m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        sendto(
            self.fd.as_raw_fd(),
            &m,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        Ok(seq)
    }

    /// Receives the answers to request `seq` (stale answers to earlier
    /// requests are skipped), giving each message's type and payload to `f`
    /// until it returns a result.
    fn answers<R>(
        &mut self,
        seq: u32,
        mut f: impl FnMut(u16, &[u8]) -> Option<io::Result<R>>,
    ) -> io::Result<R> {
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())?;
            let mut b = &self.buf[..n];
            while b.len() >= 16 {
                let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let mty = u16::from_ne_bytes([b[4], b[5]]);
                let mseq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
                if len < 16 || len > b.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "bad netlink message",
                    ));
                }
                let payload = &b[16..len];
                b = &b[len.next_multiple_of(4).min(b.len())..];
                if mseq != seq {
                    continue;
                }
                if let Some(r) = f(mty, payload) {
                    return r;
                }
            }
        }
    }

    /// A dump request: the payloads of every answer of type `want`, until
    /// the kernel says it is done.
    pub(crate) fn dump(&mut self, ty: u16, body: &[u8], want: u16) -> io::Result<Vec<Vec<u8>>> {
        let seq = self.send(ty, NLM_F_DUMP, body)?;
        let mut out = Vec::new();
        self.answers(seq, |mty, payload| match mty {
            NLMSG_DONE => Some(Ok(())),
            NLMSG_ERROR => Some(error_of(payload)),
            t if t == want => {
                out.push(payload.to_vec());
                None
            }
            _ => None,
        })?;
        Ok(out)
    }

    /// Sends one request (header added here) and returns the payload of the
    /// answer of type `want` (`None` for an ACK), or the kernel's error.
    pub(crate) fn request(
        &mut self,
        ty: u16,
        flags: u16,
        body: &[u8],
        want: Option<u16>,
    ) -> io::Result<Option<Vec<u8>>> {
        let seq = self.send(ty, flags, body)?;
        self.answers(seq, |mty, payload| match mty {
            NLMSG_ERROR => Some(error_of(payload).map(|()| None)),
            t if Some(t) == want => Some(Ok(Some(payload.to_vec()))),
            _ => None,
        })
    }

    /// `ip route get DST mark MARK` (0: unmarked): the kernel's choice for
    /// a packet to `dst` (espd's lookups carry the host mark, so the host
    /// route rule, `not fwmark`, does not send them into the host device).
    pub fn route_get(&mut self, dst: IpAddr, mark: u32) -> io::Result<Route> {
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        let mut body = vec![family(dst), if dst.is_ipv4() { 32 } else { 128 }];
        body.extend_from_slice(&[0; 6]);
        body.extend_from_slice(&0u32.to_ne_bytes());
        attr(&mut body, RTA_DST, &octets(&dst));
        if mark != 0 {
            attr(&mut body, RTA_MARK, &mark.to_ne_bytes());
        }
        let r = match self.request(RTM_GETROUTE, 0, &body, Some(RTM_NEWROUTE)) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(Route::None),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EINVAL | libc::EACCES)
                ) =>
            {
                return Ok(Route::None)
            }
            Err(e) => return Err(e),
        };
        if r.len() < 12 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "short rtmsg"));
        }
        match r[7] {
            RTN_LOCAL => return Ok(Route::Local),
            RTN_UNICAST => {}
            _ => return Ok(Route::None),
        }
        let (mut oif, mut via, mut src) = (None, None, None);
        for (ty, d) in attrs(&r[12..]) {
            match ty {
                RTA_OIF if d.len() >= 4 => oif = Some(u32::from_ne_bytes([d[0], d[1], d[2], d[3]])),
                RTA_GATEWAY => via = ip_from(d),
                RTA_PREFSRC => src = ip_from(d),
                _ => {}
            }
        }
        Ok(match oif {
            Some(oif) => Route::Unicast {
                oif,
                via: via.unwrap_or(dst),
                src,
            },
            None => Route::None,
        })
    }

    fn ndmsg(addr: IpAddr, ifindex: u32, state: u16, flags: u8) -> Vec<u8> {
        // struct ndmsg: family, pad1, pad2, ifindex, state, flags, type.
        let mut body = vec![family(addr), 0, 0, 0];
        body.extend_from_slice(&(ifindex as i32).to_ne_bytes());
        body.extend_from_slice(&state.to_ne_bytes());
        body.extend_from_slice(&[flags, 0]);
        attr(&mut body, NDA_DST, &octets(&addr));
        body
    }

    /// The kernel's entry for neighbour `addr` on `ifindex`: its NUD state
    /// and link-layer address, `None` if there is none.
    pub fn neigh_entry(
        &mut self,
        ifindex: u32,
        addr: IpAddr,
    ) -> io::Result<Option<(u16, Option<[u8; 6]>)>> {
        let body = Self::ndmsg(addr, ifindex, 0, 0);
        let r = match self.request(RTM_GETNEIGH, 0, &body, Some(RTM_NEWNEIGH)) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        if r.len() < 12 {
            return Ok(None);
        }
        let state = u16::from_ne_bytes([r[8], r[9]]);
        let mac = attrs(&r[12..])
            .find(|(t, d)| *t == NDA_LLADDR && d.len() == 6)
            .and_then(|(_, d)| <[u8; 6]>::try_from(d).ok());
        Ok(Some((state, mac)))
    }

    /// The link-layer address of neighbour `addr` on `ifindex`, if the kernel
    /// has a usable one (any state but incomplete/failed/none).
    pub fn neigh_get(&mut self, ifindex: u32, addr: IpAddr) -> io::Result<Option<[u8; 6]>> {
        Ok(match self.neigh_entry(ifindex, addr)? {
            Some((state, mac)) if usable(state) => mac,
            _ => None,
        })
    }

    /// Asks the kernel to resolve neighbour `addr` (no entry yet) or to
    /// re-confirm it (a dynamic entry espd's traffic uses, which the kernel
    /// never sees in use): `NTF_USE` on the entry, what `ip neigh replace
    /// ADDR dev IF use` sends. An entry the operator set — `permanent` or
    /// `noarp` — is used as it is and never touched: replacing it would turn
    /// it into a dynamic one (seen on Linux 6.x: it went INCOMPLETE). Returns
    /// whether a request was sent.
    pub fn neigh_use(&mut self, ifindex: u32, addr: IpAddr) -> io::Result<bool> {
        let state = self.neigh_entry(ifindex, addr)?.map(|e| e.0);
        if state.is_some_and(operator_set) {
            return Ok(false);
        }
        // The state is not applied with NTF_USE (the kernel only kicks the
        // entry's resolution); NUD_NONE keeps a new entry dynamic.
        let body = Self::ndmsg(addr, ifindex, NUD_NONE, NTF_USE);
        let flags = if state.is_some() {
            NLM_F_ACK
        } else {
            NLM_F_ACK | NLM_F_CREATE
        };
        self.request(RTM_NEWNEIGH, flags, &body, None).map(|_| true)
    }
}

/// An `NLMSG_ERROR` payload: 0 is an ACK, else a negated errno.
fn error_of(payload: &[u8]) -> io::Result<()> {
    let e = payload
        .get(..4)
        .map_or(0, |e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]));
    if e == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-e))
    }
}

/// A state with a link-layer address to use.
fn usable(state: u16) -> bool {
    state != NUD_NONE && state & (NUD_INCOMPLETE | NUD_FAILED) == 0
}

/// An entry the operator set: `nud permanent` or `nud noarp`.
fn operator_set(state: u16) -> bool {
    state & (NUD_PERMANENT | NUD_NOARP) != 0
}

/// An interface's index and MAC address (from sysfs).
pub fn link_info(iface: &str) -> io::Result<(u32, [u8; 6])> {
    let read = |f: &str| std::fs::read_to_string(format!("/sys/class/net/{iface}/{f}"));
    let idx = read("ifindex")?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("ifindex: {e}")))?;
    let mac_s = read("address")?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = mac_s.trim().split(':').collect();
    if parts.len() != 6 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{iface} has no Ethernet address ({})", mac_s.trim()),
        ));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("MAC: {e}")))?;
    }
    Ok((idx, mac))
}

/// Every address of this host (all interfaces of the namespace), and those of `iface`.
pub fn local_addrs(iface: Option<&str>) -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        if iface.is_some_and(|n| n != ifa.interface_name) {
            continue;
        }
        let Some(a) = ifa.address else { continue };
        if let Some(s) = a.as_sockaddr_in() {
            out.push(IpAddr::V4(s.ip()));
        } else if let Some(s) = a.as_sockaddr_in6() {
            out.push(IpAddr::V6(s.ip()));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_and_bad_lengths_stop_the_walk() {
        let mut m = Vec::new();
        attr(&mut m, RTA_DST, &[198, 18, 0, 1]);
        attr(&mut m, RTA_OIF, &7u32.to_ne_bytes());
        attr(&mut m, 99, &[1, 2, 3]); // padded to 8
        let v: Vec<_> = attrs(&m).collect();
        assert_eq!(v.len(), 3);
        assert_eq!(ip_from(v[0].1), Some("198.18.0.1".parse().unwrap()));
        assert_eq!(v[2].1, &[1, 2, 3]);
        let mut bad = m.clone();
        bad[8] = 200; // second attribute's length runs past the end
        assert_eq!(attrs(&bad).count(), 1);
        assert_eq!(attrs(&[1, 0]).count(), 0);
    }

    #[test]
    fn operator_entries_are_never_refreshed_and_only_resolved_ones_used() {
        assert!(operator_set(NUD_PERMANENT) && operator_set(NUD_NOARP));
        // REACHABLE, STALE, DELAY, PROBE, INCOMPLETE, FAILED: the kernel's.
        for s in [0x02, 0x04, 0x08, 0x10, NUD_INCOMPLETE, NUD_FAILED] {
            assert!(!operator_set(s), "{s:#x}");
        }
        assert!(usable(NUD_PERMANENT) && usable(0x02) && usable(0x04));
        assert!(!usable(NUD_NONE) && !usable(NUD_INCOMPLETE) && !usable(NUD_FAILED));
    }

    #[test]
    fn loopback_is_local() {
        let Ok(mut nl) = Rtnl::open() else { return };
        assert_eq!(
            nl.route_get("127.0.0.1".parse().unwrap(), 0).unwrap(),
            Route::Local
        );
    }
}
