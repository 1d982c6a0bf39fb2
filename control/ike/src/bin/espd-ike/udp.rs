//! IKE's UDP sockets: one per port and address family, bound to the
//! wildcard address, with IP_PKTINFO / IPV6_RECVPKTINFO so that each
//! datagram's destination address is known and answers leave from it
//! (RFC 7296 §2.11: a response goes from the address the request came to).
//!
//! Port 4500 carries IKE behind a four-octet non-ESP marker (RFC 3948 §2.2);
//! a one-octet 0xff datagram is a NAT keepalive (§2.3). ESP in UDP is
//! espd's, which takes it in XDP before the kernel: what reaches this
//! socket is counted and dropped.

use anyhow::Context;
use nix::libc;
use nix::sys::socket::{
    bind, recvmsg, sendmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
};
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::mpsc::Sender;

use crate::Ev;

/// RFC 3948 §2.2: IKE on the NAT-T port starts with four zero octets.
const NON_ESP_MARKER: [u8; 4] = [0; 4];

pub struct Sock {
    pub port: u16,
    pub v6: bool,
    pub udp: UdpSocket,
}

/// What a socket's reader thread passes on.
pub enum Rx {
    Ike {
        local: SocketAddr,
        remote: SocketAddr,
        data: Vec<u8>,
    },
    /// Not IKE: a keepalive, or ESP that espd did not take.
    Dropped(&'static str),
}

/// espd's host mark (`espd_common::HOST_MARK`; espd-ike does not link the
/// XDP crates).
pub const HOST_MARK: u32 = 0x0010_0000;

/// Binds the wildcard address of one family on `port`.
pub fn open(port: u16, v6: bool) -> anyhow::Result<Sock> {
    let fam = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(fam, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .with_context(|| format!("creating a UDP socket for port {port}"))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    // Room for a burst (thousands of peers coming back at once after a
    // restart or a link flap; a half-open flood): 4 MiB asked, the kernel
    // caps it at net.core.rmem_max. A datagram costs its buffer's true
    // size (a few KiB), so the default 208 KiB holds only about a hundred.
    if let Err(e) = setsockopt(&fd, sockopt::RcvBuf, &(4 << 20)) {
        eprintln!("espd-ike: SO_RCVBUF on port {port}: {e} (the default stays)");
    }
    // espd's host mark: on an `espd run --host` host, IKE to a peer whose
    // address is a protected destination is routed by `main`, not into
    // espd's host pair (docs/operations.md, "Host mode"); without host
    // mode it changes nothing. Refused without CAP_NET_ADMIN: then unmarked.
    if let Err(e) = setsockopt(&fd, sockopt::Mark, &HOST_MARK) {
        eprintln!("espd-ike: SO_MARK {HOST_MARK:#x} on port {port}: {e} (host mode needs it)");
    }
    if v6 {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
        setsockopt(&fd, sockopt::Ipv6RecvPacketInfo, &true)?;
        let a = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
        bind(fd.as_raw_fd(), &a).with_context(|| format!("binding [::]:{port}"))?;
    } else {
        setsockopt(&fd, sockopt::Ipv4PacketInfo, &true)?;
        let a = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
        bind(fd.as_raw_fd(), &a).with_context(|| format!("binding 0.0.0.0:{port}"))?;
    }
    Ok(Sock {
        port,
        v6,
        udp: UdpSocket::from(fd),
    })
}

impl Sock {
    /// Reads datagrams until the socket fails; each IKE one goes to `tx`.
    pub fn run(&self, tx: Sender<Ev>) {
        let mut buf = vec![0u8; 65536];
        let natt = self.port == espd_ike::ike::NATT_PORT;
        loop {
            let mut space = if self.v6 {
                nix::cmsg_space!(libc::in6_pktinfo)
            } else {
                nix::cmsg_space!(libc::in_pktinfo)
            };
            let (n, from, to) = {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let r = match recvmsg::<SockaddrStorage>(
                    self.udp.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::empty(),
                ) {
                    Ok(r) => r,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        eprintln!("espd-ike: UDP port {} stopped: {e}", self.port);
                        return;
                    }
                };
                let mut to: Option<IpAddr> = None;
                if let Ok(cm) = r.cmsgs() {
                    for c in cm {
                        match c {
                            ControlMessageOwned::Ipv4PacketInfo(pi) => {
                                to = Some(Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr)).into())
                            }
                            ControlMessageOwned::Ipv6PacketInfo(pi) => {
                                to = Some(Ipv6Addr::from(pi.ipi6_addr.s6_addr).into())
                            }
                            _ => {}
                        }
                    }
                }
                let from = r.address.and_then(|a| {
                    a.as_sockaddr_in()
                        .map(|s| SocketAddr::V4(SocketAddrV4::from(*s)))
                        .or_else(|| {
                            a.as_sockaddr_in6()
                                .map(|s| SocketAddr::V6(SocketAddrV6::from(*s)))
                        })
                });
                (r.bytes, from, to)
            };
            let (Some(remote), Some(to)) = (from, to) else {
                continue;
            };
            let data = &buf[..n];
            let rx = if natt {
                if n == 1 && data[0] == 0xff {
                    Rx::Dropped("natt-keepalive")
                } else if n >= 4 && data[..4] == NON_ESP_MARKER {
                    Rx::Ike {
                        local: SocketAddr::new(to, self.port),
                        remote,
                        data: data[4..].to_vec(),
                    }
                } else {
                    Rx::Dropped("esp-in-udp")
                }
            } else {
                Rx::Ike {
                    local: SocketAddr::new(to, self.port),
                    remote,
                    data: data.to_vec(),
                }
            };
            if tx.send(Ev::Udp(rx)).is_err() {
                return;
            }
        }
    }

    /// Sends one IKE message from `local` (its address chosen with
    /// IP_PKTINFO; the wildcard lets the kernel choose).
    pub fn send(&self, local: IpAddr, remote: SocketAddr, data: &[u8]) -> std::io::Result<()> {
        let marker: &[u8] = if self.port == espd_ike::ike::NATT_PORT {
            &NON_ESP_MARKER
        } else {
            &[]
        };
        let iov = [IoSlice::new(marker), IoSlice::new(data)];
        let fd = self.udp.as_raw_fd();
        let r = match (remote, local) {
            (SocketAddr::V4(r), IpAddr::V4(l)) => {
                let pi = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(l).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                let cm = [ControlMessage::Ipv4PacketInfo(&pi)];
                let cms: &[ControlMessage] = if l.is_unspecified() { &[] } else { &cm };
                sendmsg(fd, &iov, cms, MsgFlags::empty(), Some(&SockaddrIn::from(r)))
            }
            (SocketAddr::V6(r), IpAddr::V6(l)) => {
                let pi = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: l.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                let cm = [ControlMessage::Ipv6PacketInfo(&pi)];
                let cms: &[ControlMessage] = if l.is_unspecified() { &[] } else { &cm };
                sendmsg(
                    fd,
                    &iov,
                    cms,
                    MsgFlags::empty(),
                    Some(&SockaddrIn6::from(r)),
                )
            }
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "local and remote address families differ",
                ))
            }
        };
        r.map(|_| ()).map_err(std::io::Error::from)
    }
}
