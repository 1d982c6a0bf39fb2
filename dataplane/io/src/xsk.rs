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
        let (umem, descs) = new_umem(frames)?;
        let mode = if copy { BindMode::Copy } else { BindMode::Auto };
        let (tx, rx, mut fq, cq) = open_socket(&umem, iface, queue, mode)?;
        let err = |msg: String| XskError::Socket {
            iface: iface.to_string(),
            queue,
            msg,
        };
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

/// A UMEM of `frames` default-sized frames (4 KiB) and their descriptors.
fn new_umem(frames: u32) -> Result<(Umem, Vec<FrameDesc>), XskError> {
    let count = frames
        .try_into()
        .map_err(|e| XskError::Umem(format!("{e:?}")))?;
    Umem::new(UmemConfig::default(), count, false).map_err(|e| XskError::Umem(e.to_string()))
}

/// An AF_XDP socket on (`iface`, `queue`) over `umem`, with the fill and
/// completion rings of that pair. libxdp's own XDP program is never loaded
/// (ours redirects); need-wakeup is on.
fn open_socket(
    umem: &Umem,
    iface: &str,
    queue: u32,
    mode: BindMode,
) -> Result<(TxQueue, RxQueue, FillQueue, CompQueue), XskError> {
    let mut flags = BindFlags::XDP_USE_NEED_WAKEUP;
    match mode {
        BindMode::Auto => {}
        BindMode::Copy => flags |= BindFlags::XDP_COPY,
        BindMode::ZeroCopy => flags |= BindFlags::XDP_ZEROCOPY,
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
    // SAFETY: xsk-rs keeps its own handle on the UMEM inside every queue it
    // returns, so the memory outlives the socket whatever the caller drops
    // first; libxdp's program is inhibited (XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD),
    // which is what Socket::new requires when a UMEM is shared by several
    // (interface, queue) pairs, so no program is detached twice.
    let (tx, rx, rings) =
        unsafe { Socket::new(cfg, umem, &name, queue) }.map_err(|e| err(e.to_string()))?;
    let (fq, cq) = rings.ok_or_else(|| err("no fill/completion rings for this pair".into()))?;
    Ok((tx, rx, fq, cq))
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

/// A UMEM frame owned by user space. Not `Copy` or `Clone`: a frame is in
/// exactly one place — a ring (the kernel's), the free list, or a TX batch —
/// and moves between them by value, so it cannot leak or be handed out twice.
struct Frame(FrameDesc);

/// One side of a worker: the AF_XDP socket bound to (interface, queue) with
/// its RX/TX rings and the fill/completion rings of that pair.
struct Side {
    rx: RxQueue,
    tx: TxQueue,
    fq: FillQueue,
    cq: CompQueue,
    /// Frames this side's fill ring holds (the kernel's until received).
    in_fill: usize,
    /// Frames submitted to TX and not yet completed.
    in_tx: usize,
    /// Frames waiting for the next flush, in order.
    pending: Vec<Frame>,
}

/// How the sockets bind: the kernel's choice (zero-copy where the driver
/// supports it, else copy), copy forced, or zero-copy required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindMode {
    Auto,
    Copy,
    ZeroCopy,
}

/// What a worker does with a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// Transmit the first `len` octets of the frame on side `s`
    /// ([`INSIDE`], [`OUTSIDE`] or [`HOST`]).
    Tx { side: usize, len: usize },
    /// Give the frame back.
    Drop,
    /// Keep the frame aside (its packet at `at..at + len`) until
    /// [`WorkerPorts::release_held`] decides: e.g. while a next hop resolves.
    /// `tag` is the caller's, given back with the frame.
    Hold { at: usize, len: usize, tag: u8 },
}

/// Frames held at most per worker; more are dropped by the caller's choice.
pub const MAX_HELD: usize = 256;

struct Held {
    frame: Frame,
    at: usize,
    len: usize,
    tag: u8,
    since: std::time::Instant,
}

/// The sides of a worker, by index: the inside interface (a gateway's
/// protected networks, or a host's pair in host mode alone), the outside
/// interface, and the host pair of a gateway that protects its own traffic
/// too (`espd run --inside IF --host`).
pub const INSIDE: usize = 0;
pub const OUTSIDE: usize = 1;
pub const HOST: usize = 2;
/// How many sides a worker may have.
pub const SIDES: usize = 3;

/// Ring and frame counters of one worker's ports, by side.
#[derive(Debug, Clone, Copy, Default)]
pub struct PortStats {
    pub rx: [u64; SIDES],
    pub tx: [u64; SIDES],
    /// Times the TX ring was full at a flush (frames wait, none is dropped).
    pub tx_full: [u64; SIDES],
    /// Frames in each fill ring now, and idle in the free list.
    pub in_fill: [usize; SIDES],
    pub free: usize,
    /// The kernel's own counts for each socket (XDP_STATISTICS): frames it
    /// dropped before they reached us (`rx_dropped`: no room, e.g. the
    /// fill ring empty or the RX ring full), and the two causes it reports.
    pub kernel_rx_dropped: [u64; SIDES],
    pub kernel_rx_ring_full: [u64; SIDES],
    pub kernel_fill_empty: [u64; SIDES],
    pub kernel_tx_invalid: [u64; SIDES],
    /// Frames the AF_PACKET fallback could not send (a side without an
    /// AF_XDP socket).
    pub tx_dropped: [u64; SIDES],
}

/// A worker's AF_XDP ports: one UMEM shared by a socket on (inside, queue)
/// and one on (outside, queue) — and one on (host pair, queue) for a
/// gateway that protects its own traffic too — (`XDP_SHARED_UMEM`), so a
/// frame received on one interface is transmitted on another without a
/// copy between UMEMs.
///
/// With uneven queue counts (a 1-queue inside, a 2-queue outside) a worker
/// serves queue q of only the interfaces that have it; for the other side
/// it has no AF_XDP socket (that queue is another worker's) and sends
/// through an AF_PACKET socket instead — one copy per frame, the kernel's
/// transmit path, no RX ([`PacketTx`]).
pub struct WorkerPorts {
    // Field order is drop order: sockets (inside `sides`) before the UMEM.
    sides: [Option<Side>; SIDES],
    fallback: [Option<PacketTx>; SIDES],
    free: Vec<Frame>,
    held: std::collections::VecDeque<Held>,
    scratch: Vec<FrameDesc>,
    umem: Umem,
    fill_target: usize,
    total: usize,
    pub stats: PortStats,
    pub queue: u32,
}

/// Frames per worker: 4096 × 4 KiB = 16 MiB of UMEM.
pub const WORKER_FRAMES: u32 = 4096;
/// Frames kept in each fill ring.
const FILL_TARGET: usize = 1024;

/// Transmit-only AF_PACKET socket on an interface: for the side of a worker
/// that has no AF_XDP socket there (see [`WorkerPorts`]).
pub struct PacketTx {
    fd: std::os::fd::OwnedFd,
    ifindex: i32,
}

impl PacketTx {
    fn open(iface: &str) -> Result<Self, XskError> {
        let ifindex: i32 = std::fs::read_to_string(format!("/sys/class/net/{iface}/ifindex"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| XskError::Umem(format!("{iface}: no such interface")))?;
        // SAFETY: socket(2) takes no pointers. Protocol 0: this socket
        // receives nothing, it only sends.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: a new descriptor that this process owns and nothing else holds.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: a c_int option value of the right size; failure is harmless
        // (the frames then go through the qdisc).
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        Ok(PacketTx { fd, ifindex })
    }

    /// Sends one whole Ethernet frame; false if the kernel refused it.
    fn send(&self, frame: &[u8]) -> bool {
        if frame.len() < 14 {
            return false;
        }
        // SAFETY: sockaddr_ll is plain data; zero is a valid value for every field.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = self.ifindex;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `sa` are valid for the call's duration and their
        // lengths are the ones passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        n == frame.len() as isize
    }
}

impl WorkerPorts {
    /// Binds sockets on `queue` of the interfaces of `ifaces` (by side:
    /// inside, outside and, for a gateway with a host path, the host pair)
    /// — of each side whose `serve` is true; a side not served gets an
    /// AF_PACKET socket to send on. `mode`: copy forced, zero-copy
    /// required, or the kernel's choice.
    pub fn bind(
        ifaces: &[&str],
        queue: u32,
        frames: u32,
        mode: BindMode,
        serve: &[bool],
    ) -> Result<Self, XskError> {
        let (umem, descs) = new_umem(frames)?;
        let mut sides: [Option<Side>; SIDES] = Default::default();
        let mut fallback: [Option<PacketTx>; SIDES] = Default::default();
        for (s, iface) in ifaces.iter().copied().enumerate().take(SIDES) {
            if !serve.get(s).copied().unwrap_or(false) {
                fallback[s] = Some(PacketTx::open(iface)?);
                continue;
            }
            // Both sockets on one UMEM (XDP_SHARED_UMEM), each (interface,
            // queue) pair with its own fill and completion rings.
            let (tx, rx, fq, cq) = open_socket(&umem, iface, queue, mode)?;
            sides[s] = Some(Side {
                rx,
                tx,
                fq,
                cq,
                in_fill: 0,
                in_tx: 0,
                pending: Vec::with_capacity(256),
            });
        }
        let total = descs.len();
        let mut p = WorkerPorts {
            sides,
            fallback,
            free: descs.into_iter().map(Frame).collect(),
            held: std::collections::VecDeque::with_capacity(MAX_HELD),
            scratch: vec![FrameDesc::default(); 256],
            umem,
            // Every side's fill ring, and as many frames again in flight.
            fill_target: FILL_TARGET.min(total / (2 * ifaces.len().clamp(2, SIDES))),
            total,
            stats: PortStats::default(),
            queue,
        };
        p.refill();
        Ok(p)
    }

    /// The AF_XDP socket of side `s`, for the XSKMAP; `None` for a side
    /// this worker does not serve.
    pub fn fd(&self, s: usize) -> Option<std::os::fd::RawFd> {
        self.sides.get(s)?.as_ref().map(|x| x.rx.fd().as_raw_fd())
    }

    /// Reclaims completed TX frames into the free list.
    fn reclaim(&mut self) {
        for s in 0..SIDES {
            while let Some(side) = self.sides[s].as_mut() {
                if side.in_tx == 0 {
                    break;
                }
                // SAFETY: the completion ring hands back descriptors of
                // frames we submitted to TX from this UMEM; each comes back once.
                let n = unsafe { side.cq.consume(&mut self.scratch) };
                if n == 0 {
                    break;
                }
                side.in_tx -= n;
                self.free
                    .extend(self.scratch[..n].iter().map(|d| Frame(*d)));
            }
        }
    }

    /// Tops up every fill ring to the target from the free list.
    fn refill(&mut self) {
        for side in self.sides.iter_mut().flatten() {
            let want = self.fill_target.saturating_sub(side.in_fill);
            let n = want.min(self.free.len()).min(self.scratch.len());
            if n == 0 {
                continue;
            }
            let start = self.free.len() - n;
            for (slot, f) in self.scratch.iter_mut().zip(self.free.drain(start..)) {
                *slot = f.0;
            }
            // SAFETY: these descriptors were in the free list, so no ring
            // and no reference holds their frames.
            let done = unsafe { side.fq.produce(&self.scratch[..n]) };
            side.in_fill += done;
            // What the ring did not take goes back to the free list.
            self.free
                .extend(self.scratch[done..n].iter().map(|d| Frame(*d)));
        }
    }

    /// Receives up to `max` frames on side `s` and hands each one to `f`
    /// with the frame's whole writable area and the received length; `f`
    /// says where it goes. Returns how many were received.
    pub fn rx_burst(
        &mut self,
        s: usize,
        max: usize,
        mut f: impl FnMut(&mut [u8], usize) -> Out,
    ) -> usize {
        let max = max.min(self.scratch.len());
        let Some(side) = self.sides.get_mut(s).and_then(Option::as_mut) else {
            return 0;
        };
        // SAFETY: the RX ring hands over frames the kernel has finished
        // writing; they are ours until given to a ring again.
        let n = unsafe { side.rx.consume(&mut self.scratch[..max]) };
        side.in_fill -= n;
        self.stats.rx[s] += n as u64;
        for i in 0..n {
            let mut desc = self.scratch[i];
            let len = desc.lengths().data();
            // SAFETY: `desc` was just received, so no ring and no other
            // reference covers its frame while `f` runs.
            let mut data = unsafe { self.umem.data_mut(&mut desc) };
            let mut cur = data.cursor();
            let cap = cur.buf_len();
            cur.set_pos(cap);
            let out = f(data.contents_mut(), len);
            self.place(Frame(desc), out, cap);
        }
        n
    }

    /// Puts a processed frame where `out` says.
    fn place(&mut self, mut frame: Frame, out: Out, cap: usize) {
        match out {
            Out::Tx { side, len } if side < SIDES && len > 0 && len <= cap => {
                // SAFETY: the frame is ours (in no ring); only its length is set.
                let mut data = unsafe { self.umem.data_mut(&mut frame.0) };
                data.cursor().set_pos(len);
                if let Some(sd) = self.sides[side].as_mut() {
                    sd.pending.push(frame);
                    return;
                }
                // No AF_XDP socket on that side: one copy through AF_PACKET.
                let sent = self.fallback[side]
                    .as_ref()
                    .is_some_and(|p| p.send(&data.contents()[..len]));
                if sent {
                    self.stats.tx[side] += 1;
                } else {
                    self.stats.tx_dropped[side] += 1;
                }
                self.free.push(frame);
            }
            Out::Hold { at, len, tag } if self.held.len() < MAX_HELD && at + len <= cap => {
                self.held.push_back(Held {
                    frame,
                    at,
                    len,
                    tag,
                    since: std::time::Instant::now(),
                })
            }
            _ => self.free.push(frame),
        }
    }

    /// Takes a free frame, lets `f` write a packet into its whole writable
    /// area and say where it goes (as for a received frame). For packets
    /// that arrive from elsewhere than an RX ring (another worker's
    /// handoff). False when no frame is free.
    pub fn inject(&mut self, f: impl FnOnce(&mut [u8]) -> Out) -> bool {
        let Some(mut frame) = self.free.pop() else {
            return false;
        };
        // SAFETY: a frame from the free list is in no ring and referenced nowhere.
        let mut data = unsafe { self.umem.data_mut(&mut frame.0) };
        let mut cur = data.cursor();
        let cap = cur.buf_len();
        cur.set_pos(cap);
        let out = f(data.contents_mut());
        self.place(frame, out, cap);
        true
    }

    /// Refreshes the kernel's socket statistics in `stats` (a getsockopt
    /// per socket: call it a few times a second, not per burst).
    pub fn kernel_stats(&mut self) {
        for s in 0..SIDES {
            let Some(side) = self.sides[s].as_ref() else {
                continue;
            };
            if let Ok(k) = side.rx.fd().xdp_statistics() {
                self.stats.kernel_rx_dropped[s] = k.rx_dropped();
                self.stats.kernel_rx_ring_full[s] = k.rx_ring_full();
                self.stats.kernel_fill_empty[s] = k.rx_fill_ring_empty_descs();
                self.stats.kernel_tx_invalid[s] = k.tx_invalid_descs();
            }
        }
    }

    /// Frames free for [`WorkerPorts::inject`].
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// How many frames are held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Offers every held frame to `f` (its writable area, where its packet
    /// is, how long it has waited, its tag): `Tx` sends it, `Hold` keeps it
    /// (at the new place), `Drop` frees it.
    pub fn release_held(
        &mut self,
        mut f: impl FnMut(&mut [u8], usize, usize, std::time::Duration, u8) -> Out,
    ) {
        for _ in 0..self.held.len() {
            let Some(mut h) = self.held.pop_front() else {
                break;
            };
            // SAFETY: a held frame is in no ring and referenced nowhere else.
            let mut data = unsafe { self.umem.data_mut(&mut h.frame.0) };
            let mut cur = data.cursor();
            let cap = cur.buf_len();
            cur.set_pos(cap);
            match f(data.contents_mut(), h.at, h.len, h.since.elapsed(), h.tag) {
                Out::Hold { at, len, tag } if at + len <= cap => {
                    h.at = at;
                    h.len = len;
                    h.tag = tag;
                    self.held.push_back(h);
                }
                out => self.place(h.frame, out, cap),
            }
        }
    }

    /// Submits the pending frames of every side to their TX rings and kicks
    /// the kernel; frames the rings cannot take are dropped (counted).
    /// Reclaims completions and refills the fill rings.
    pub fn flush(&mut self) {
        for s in 0..SIDES {
            let Some(side) = self.sides[s].as_mut() else {
                continue;
            };
            // Submit in order as much as the TX ring takes; what it cannot
            // take yet stays pending for the next flush (back-pressure: the
            // frames are not dropped, and while they wait fewer frames refill
            // the RX side, so the kernel holds back or counts its drops).
            let mut sent = 0;
            while sent < side.pending.len() {
                let n = (side.pending.len() - sent).min(self.scratch.len());
                for (slot, f) in self.scratch.iter_mut().zip(&side.pending[sent..sent + n]) {
                    *slot = f.0;
                }
                // SAFETY: the pending frames are ours (received, processed,
                // not in any ring); each is submitted once, and removed from
                // `pending` below exactly when the ring took it.
                let done = unsafe { side.tx.produce(&self.scratch[..n]) };
                side.in_tx += done;
                self.stats.tx[s] += done as u64;
                sent += done;
                if done < n {
                    self.stats.tx_full[s] += 1; // times the ring was full
                    break;
                }
            }
            // The submitted frames are the ring's now: drop our handles to them.
            side.pending.drain(..sent);
            // Copy mode sends in batches per kick; kick while anything is in flight.
            if side.in_tx > 0 && side.tx.needs_wakeup() {
                let _ = side.tx.wakeup();
            }
        }
        self.reclaim();
        self.refill();
        for s in 0..SIDES {
            self.stats.in_fill[s] = self.sides[s].as_ref().map_or(0, |x| x.in_fill);
        }
        self.stats.free = self.free.len();
        debug_assert!(
            self.free.len()
                + self.held.len()
                + self
                    .sides
                    .iter()
                    .flatten()
                    .map(|s| s.in_fill + s.in_tx + s.pending.len())
                    .sum::<usize>()
                == self.total,
            "every frame is in exactly one place"
        );
    }

    /// Waits up to `timeout_ms` for frames on any side (the idle path;
    /// busy workers never call it). Also lets the kernel fill rings that
    /// asked for a wakeup.
    pub fn wait(&mut self, timeout_ms: i32) -> Result<(), XskError> {
        let mut fds = [libc::pollfd {
            fd: -1,
            events: libc::POLLIN,
            revents: 0,
        }; SIDES];
        let mut n = 0;
        for s in 0..SIDES {
            if let Some(fd) = self.fd(s) {
                fds[n].fd = fd;
                n += 1;
            }
        }
        // SAFETY: `fds` holds `n` valid pollfd for the call's duration.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, timeout_ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
        Ok(())
    }
}
