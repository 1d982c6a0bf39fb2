//! AF_XDP ports (xsk-rs over libxdp): a UMEM and one socket bound to an
//! (interface, RX queue), fed by our own XDP program (libxdp's default
//! program is never loaded). Copy mode is asked for explicitly on veth;
//! otherwise the kernel picks zero-copy where the driver supports it.
//!
//! Frame ownership: every frame descriptor is either in the fill ring (the
//! kernel's) or in `descs[..n]` after a receive (ours) — and what we receive
//! goes back to the fill ring before the next receive, so none can leak or be
//! handed out twice.

use std::os::fd::AsRawFd;
use xsk_rs::config::{BindFlags, LibxdpFlags, SocketConfig, UmemConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("UMEM: {0}")]
    Umem(String),
    #[error("AF_XDP socket on {iface} queue {queue}: {msg}")]
    Socket {
        iface: String,
        queue: u32,
        msg: String,
    },
    #[error("AF_XDP poll: {0}")]
    Io(#[from] std::io::Error),
}

/// Frames per port: the default fill-ring size (libxdp's
/// XSK_RING_PROD__DEFAULT_NUM_DESCS), so that every frame fits in the fill
/// ring at start (xsk-rs hands descriptors over all or nothing).
pub const DEFAULT_FRAMES: u32 = 2048;

pub struct XskPort {
    umem: Umem,
    descs: Vec<FrameDesc>,
    rx: RxQueue,
    #[allow(dead_code)] // the TX side is the gateway's (next step)
    tx: TxQueue,
    fq: FillQueue,
    #[allow(dead_code)]
    cq: CompQueue,
    pub queue: u32,
}

impl XskPort {
    /// A UMEM of `frames` frames and a socket on (`iface`, `queue`), its fill
    /// ring topped up. `copy` forces copy mode (veth has no zero-copy).
    pub fn bind(iface: &str, queue: u32, frames: u32, copy: bool) -> Result<Self, XskError> {
        let count = frames
            .try_into()
            .map_err(|e| XskError::Umem(format!("{e:?}")))?;
        let (umem, descs) = Umem::new(UmemConfig::default(), count, false)
            .map_err(|e| XskError::Umem(e.to_string()))?;
        let mut flags = BindFlags::XDP_USE_NEED_WAKEUP;
        if copy {
            flags |= BindFlags::XDP_COPY;
        }
        let cfg = SocketConfig::builder()
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(flags)
            .build();
        let err = |msg: String| XskError::Socket {
            iface: iface.to_string(),
            queue,
            msg,
        };
        let name = iface
            .parse()
            .map_err(|e| err(format!("bad interface name: {e:?}")))?;
        // SAFETY: the UMEM is owned by this port together with the socket and
        // outlives it (fields drop in declaration order after the rings are
        // gone); we inhibit libxdp's program, so no double detach can occur.
        let (tx, rx, rings) =
            unsafe { Socket::new(cfg, &umem, &name, queue) }.map_err(|e| err(e.to_string()))?;
        let (mut fq, cq) =
            rings.ok_or_else(|| err("no fill/completion rings for a fresh UMEM".into()))?;
        // SAFETY: the descriptors come from this UMEM and none is in any ring yet.
        let n = unsafe { fq.produce(&descs) };
        if n != descs.len() {
            return Err(err(format!("fill ring took {n} of {} frames", descs.len())));
        }
        Ok(XskPort {
            umem,
            descs,
            rx,
            tx,
            fq,
            cq,
            queue,
        })
    }

    /// The socket, for registering in the XDP program's XSKMAP.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.rx.fd().as_raw_fd()
    }

    /// Waits up to `timeout_ms` for frames, hands each one's bytes to `f`, and
    /// returns the frames to the fill ring. Returns how many were received.
    pub fn recv(&mut self, timeout_ms: i32, mut f: impl FnMut(&[u8])) -> Result<usize, XskError> {
        // SAFETY: `descs` are this UMEM's descriptors and not in any ring
        // (all received frames were given back below, before this call).
        let n = unsafe { self.rx.poll_and_consume(&mut self.descs, timeout_ms) }?;
        for d in &self.descs[..n] {
            // SAFETY: `d` was just consumed from the RX ring, so the kernel
            // has finished writing its frame and will not touch it until we
            // return it to the fill ring.
            let data = unsafe { self.umem.data(d) };
            f(data.contents());
        }
        // SAFETY: the same descriptors, back to the kernel exactly once.
        let back = unsafe { self.fq.produce(&self.descs[..n]) };
        debug_assert_eq!(
            back, n,
            "fill ring has room for every frame we took from it"
        );
        Ok(n)
    }
}

/// The RX queues of an interface (from sysfs), at least one.
pub fn rx_queues(iface: &str) -> u32 {
    std::fs::read_dir(format!("/sys/class/net/{iface}/queues"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count() as u32
        })
        .unwrap_or(1)
        .max(1)
}
