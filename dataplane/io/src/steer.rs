//! espd's XDP programs: load, attach to the outside and inside interfaces,
//! keep their maps in step with the SAs and policies, read their counters,
//! detach (also on drop, so an error path never leaves a program attached).

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{Xdp, XdpMode};
use aya::Ebpf;
use espd_common::{
    Counter, MAP_COUNTERS, MAP_ENCAP_PORTS, MAP_IN_SEL_V4, MAP_IN_SEL_V6, MAP_LOCAL_V4,
    MAP_LOCAL_V6, MAP_SEL_V4, MAP_SEL_V6, MAP_SPIS, MAP_XSKS, MAP_XSKS_HOST, MAP_XSKS_INSIDE,
    PROG_HOST, PROG_INSIDE, PROG_OUTSIDE,
};
use std::net::IpAddr;

#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("loading the XDP program: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("XDP map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("the XDP object lacks {0}")]
    Missing(&'static str),
}

impl SteerError {
    /// True when the kernel refused for lack of privileges (CAP_BPF,
    /// CAP_NET_ADMIN, memlock).
    pub fn is_permission(&self) -> bool {
        let s = format!("{self:?}");
        s.contains("EPERM")
            || s.contains("Operation not permitted")
            || s.contains("PermissionDenied")
    }
}

/// Which interface a program or socket is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Where ESP arrives and leaves.
    Outside,
    /// Where the protected networks are.
    Inside,
    /// espd's end of the host pair of a gateway that protects its own
    /// traffic too (the inside's rules, its own sockets).
    Host,
}

impl Side {
    fn prog(self) -> &'static str {
        match self {
            Side::Outside => PROG_OUTSIDE,
            Side::Inside => PROG_INSIDE,
            Side::Host => PROG_HOST,
        }
    }
    fn xsks(self) -> &'static str {
        match self {
            Side::Outside => MAP_XSKS,
            Side::Inside => MAP_XSKS_INSIDE,
            Side::Host => MAP_XSKS_HOST,
        }
    }
    /// The destination-prefix tries (IPv4, IPv6) of this side's program:
    /// outbound policies' inside, `in`/`fwd` policies' outside.
    fn tries(self) -> (&'static str, &'static str) {
        match self {
            Side::Inside | Side::Host => (MAP_SEL_V4, MAP_SEL_V6),
            Side::Outside => (MAP_IN_SEL_V4, MAP_IN_SEL_V6),
        }
    }
}

/// What a selector prefix does in a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelAction {
    /// To espd, which makes the exact SPD decision.
    Steer,
    /// Dropped in XDP (inside: a DISCARD policy no other policy overlaps;
    /// outside: plaintext only PROTECT/DISCARD policies select).
    Drop,
}

/// The mark of packets espd delivers to this host (`espd run --host`).
pub const HOST_MARK: u32 = espd_common::HOST_MARK;

/// How an SPI is ours (both, when an inbound and an outbound SA share it).
pub const SPI_IN: u8 = espd_common::SPI_IN;
pub const SPI_OUT: u8 = espd_common::SPI_OUT;

/// The loaded programs and their attachments. Dropping it detaches them.
pub struct Steering {
    ebpf: Ebpf,
    links: Vec<(Side, String, XdpLinkId)>,
}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/espd-xdp"));

impl Steering {
    /// Loads the object (its XDP programs, not attached yet).
    pub fn load() -> Result<Self, SteerError> {
        let mut ebpf = Ebpf::load(OBJECT)?;
        for p in [PROG_OUTSIDE, PROG_INSIDE, PROG_HOST] {
            let prog: &mut Xdp = ebpf
                .program_mut(p)
                .ok_or(SteerError::Missing(p))?
                .try_into()?;
            prog.load()?;
        }
        Ok(Steering {
            ebpf,
            links: Vec::new(),
        })
    }

    /// Loads and attaches the outside program to `iface` (`XdpMode::Driver`
    /// for native XDP, which veth supports; `Skb` for generic XDP).
    pub fn attach(iface: &str, mode: XdpMode) -> Result<Self, SteerError> {
        let mut s = Self::load()?;
        s.attach_side(Side::Outside, iface, mode)?;
        Ok(s)
    }

    /// Attaches the program of `side` to `iface`.
    pub fn attach_side(
        &mut self,
        side: Side,
        iface: &str,
        mode: XdpMode,
    ) -> Result<(), SteerError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(side.prog())
            .ok_or(SteerError::Missing(side.prog()))?
            .try_into()?;
        let link = prog.attach(iface, mode)?;
        self.links.push((side, iface.to_string(), link));
        Ok(())
    }

    /// Attaches the host-mode mark program to the tc ingress of `iface` (the
    /// kernel's end of the host pair): every packet espd delivers there is
    /// marked [`espd_common::HOST_MARK`]. Detached with the rest on drop
    /// (a TCX link on kernels from 6.6, a clsact filter before them).
    pub fn attach_host_mark(&mut self, iface: &str) -> Result<(), SteerError> {
        use aya::programs::{tc, SchedClassifier, TcAttachType};
        let name = espd_common::PROG_HOST_MARK;
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(SteerError::Missing(name))?
            .try_into()?;
        prog.load()?;
        if aya::util::KernelVersion::current()
            .is_ok_and(|v| v < aya::util::KernelVersion::new(6, 6, 0))
        {
            // Before TCX the filter hangs off a clsact qdisc (one may exist).
            let _ = tc::qdisc_add_clsact(iface);
        }
        prog.attach(iface, TcAttachType::Ingress)?;
        Ok(())
    }

    /// The interface the outside program is attached to.
    pub fn iface(&self) -> &str {
        self.links
            .iter()
            .find(|l| l.0 == Side::Outside)
            .map_or("", |l| l.1.as_str())
    }

    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, SteerError> {
        self.ebpf.map_mut(name).ok_or(SteerError::Missing(name))
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, SteerError> {
        Ok(HashMap::try_from(
            self.ebpf.map_mut(name).ok_or(SteerError::Missing(name))?,
        )?)
    }

    fn trie<K: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<LpmTrie<&mut MapData, K, u8>, SteerError> {
        Ok(LpmTrie::try_from(
            self.ebpf.map_mut(name).ok_or(SteerError::Missing(name))?,
        )?)
    }

    /// Adds (or changes) SPIs with how they are ours ([`SPI_IN`], [`SPI_OUT`]):
    /// inbound ones addressed to us are steered, outbound ones coming back dropped.
    pub fn add_spis(
        &mut self,
        spis: impl IntoIterator<Item = (u32, u8)>,
    ) -> Result<(), SteerError> {
        let (keys, values): (Vec<u32>, Vec<u8>) = spis.into_iter().unzip();
        crate::mapbatch::update(self.map(MAP_SPIS)?, &keys, &values)?;
        Ok(())
    }

    /// Adds RFC 3948 encapsulation ports (UDP destination ports carrying ESP).
    pub fn add_encap_ports(
        &mut self,
        ports: impl IntoIterator<Item = u16>,
    ) -> Result<(), SteerError> {
        let mut m: HashMap<&mut MapData, u16, u8> = self.hash(MAP_ENCAP_PORTS)?;
        for p in ports {
            m.insert(p, 1, 0)?;
        }
        Ok(())
    }

    /// Adds destination prefixes for the program of `side`.
    pub fn add_selectors(
        &mut self,
        side: Side,
        sels: impl IntoIterator<Item = (IpAddr, u8, SelAction)>,
    ) -> Result<(), SteerError> {
        let (t4, t6) = side.tries();
        for (addr, len, action) in sels {
            let v = match action {
                SelAction::Steer => espd_common::SEL_STEER,
                SelAction::Drop => espd_common::SEL_DROP,
            };
            match addr {
                IpAddr::V4(a) => {
                    let mut t: LpmTrie<&mut MapData, [u8; 4], u8> = self.trie(t4)?;
                    t.insert(&Key::new(u32::from(len), a.octets()), v, 0)?;
                }
                IpAddr::V6(a) => {
                    let mut t: LpmTrie<&mut MapData, [u8; 16], u8> = self.trie(t6)?;
                    t.insert(&Key::new(u32::from(len), a.octets()), v, 0)?;
                }
            }
        }
        Ok(())
    }

    /// Removes SPIs (absent ones are ignored).
    pub fn remove_spis(&mut self, spis: impl IntoIterator<Item = u32>) -> Result<(), SteerError> {
        let keys: Vec<u32> = spis.into_iter().collect();
        crate::mapbatch::remove::<u32, u8>(self.map(MAP_SPIS)?, &keys)?;
        Ok(())
    }

    /// Removes encapsulation ports (absent ones are ignored).
    pub fn remove_encap_ports(
        &mut self,
        ports: impl IntoIterator<Item = u16>,
    ) -> Result<(), SteerError> {
        let mut m: HashMap<&mut MapData, u16, u8> = self.hash(MAP_ENCAP_PORTS)?;
        for p in ports {
            let _ = m.remove(&p);
        }
        Ok(())
    }

    /// Removes destination prefixes from the program of `side` (absent ones are ignored).
    pub fn remove_selectors(
        &mut self,
        side: Side,
        sels: impl IntoIterator<Item = (IpAddr, u8)>,
    ) -> Result<(), SteerError> {
        let (t4, t6) = side.tries();
        for (addr, len) in sels {
            match addr {
                IpAddr::V4(a) => {
                    let mut t: LpmTrie<&mut MapData, [u8; 4], u8> = self.trie(t4)?;
                    let _ = t.remove(&Key::new(u32::from(len), a.octets()));
                }
                IpAddr::V6(a) => {
                    let mut t: LpmTrie<&mut MapData, [u8; 16], u8> = self.trie(t6)?;
                    let _ = t.remove(&Key::new(u32::from(len), a.octets()));
                }
            }
        }
        Ok(())
    }

    /// Adds addresses of this box: the inside program never steers traffic to
    /// them, the outside program steers ESP only to them.
    pub fn add_local(&mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Result<(), SteerError> {
        for a in addrs {
            match a {
                IpAddr::V4(a) => {
                    let mut m: HashMap<&mut MapData, [u8; 4], u8> = self.hash(MAP_LOCAL_V4)?;
                    m.insert(a.octets(), 1, 0)?;
                }
                IpAddr::V6(a) => {
                    let mut m: HashMap<&mut MapData, [u8; 16], u8> = self.hash(MAP_LOCAL_V6)?;
                    m.insert(a.octets(), 1, 0)?;
                }
            }
        }
        Ok(())
    }

    /// Removes addresses added by [`Steering::add_local`] (absent ones are ignored).
    pub fn remove_local(
        &mut self,
        addrs: impl IntoIterator<Item = IpAddr>,
    ) -> Result<(), SteerError> {
        for a in addrs {
            match a {
                IpAddr::V4(a) => {
                    let mut m: HashMap<&mut MapData, [u8; 4], u8> = self.hash(MAP_LOCAL_V4)?;
                    let _ = m.remove(&a.octets());
                }
                IpAddr::V6(a) => {
                    let mut m: HashMap<&mut MapData, [u8; 16], u8> = self.hash(MAP_LOCAL_V6)?;
                    let _ = m.remove(&a.octets());
                }
            }
        }
        Ok(())
    }

    /// Registers an AF_XDP socket for RX queue `queue` of the outside
    /// interface, so steered frames arriving on that queue go to it.
    pub fn set_socket(
        &mut self,
        queue: u32,
        fd: impl std::os::fd::AsRawFd,
    ) -> Result<(), SteerError> {
        self.set_socket_side(Side::Outside, queue, fd)
    }

    /// Registers an AF_XDP socket for RX queue `queue` of `side`'s interface.
    pub fn set_socket_side(
        &mut self,
        side: Side,
        queue: u32,
        fd: impl std::os::fd::AsRawFd,
    ) -> Result<(), SteerError> {
        let mut m: aya::maps::XskMap<&mut MapData> = aya::maps::XskMap::try_from(
            self.ebpf
                .map_mut(side.xsks())
                .ok_or(SteerError::Missing("XSKMAP"))?,
        )?;
        m.set(queue, fd, 0)?;
        Ok(())
    }

    /// The per-action counters, summed over CPUs, indexed by [`Counter`].
    pub fn counters(&self) -> Result<[u64; Counter::COUNT as usize], SteerError> {
        let m: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(MAP_COUNTERS)
                .ok_or(SteerError::Missing(MAP_COUNTERS))?,
        )?;
        let mut out = [0u64; Counter::COUNT as usize];
        for (i, c) in out.iter_mut().enumerate() {
            *c = m.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    /// Detaches the programs now (dropping does the same, ignoring errors).
    pub fn detach(mut self) -> Result<(), SteerError> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<(), SteerError> {
        let mut first_err = None;
        while let Some((side, _, link)) = self.links.pop() {
            let r = (|| -> Result<(), SteerError> {
                let prog: &mut Xdp = self
                    .ebpf
                    .program_mut(side.prog())
                    .ok_or(SteerError::Missing(side.prog()))?
                    .try_into()?;
                prog.detach(link)?;
                Ok(())
            })();
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        let _ = self.detach_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The XDP object loaded, or why not: skipped with a printed reason
    /// where loading BPF is not allowed, and a failure in CI (root there).
    fn loaded() -> Option<Steering> {
        match Steering::load() {
            Ok(s) => Some(s),
            Err(e) if e.is_permission() && std::env::var_os("CI").is_none() => {
                eprintln!("skipped: loading BPF needs root (CAP_BPF): {e}");
                None
            }
            Err(e) => panic!("loading the XDP object: {e}"),
        }
    }

    fn spis(s: &mut Steering) -> std::collections::BTreeMap<u32, u8> {
        let m: HashMap<&mut MapData, u32, u8> = s.hash(MAP_SPIS).unwrap();
        m.iter().map(|r| r.unwrap()).collect()
    }

    /// SPIs go in and out in batches (more than one call's worth, with
    /// absent ones among those removed), and the map holds exactly what
    /// one-at-a-time changes would have left.
    #[test]
    fn spis_change_in_batches_as_one_at_a_time() {
        let Some(mut s) = loaded() else { return };
        let mut want = std::collections::BTreeMap::new();
        let first: Vec<(u32, u8)> = (0..10_000u32)
            .map(|i| (0x1000 + i * 7, 1 + (i % 2) as u8))
            .collect();
        s.add_spis(first.iter().copied()).unwrap();
        want.extend(first.iter().copied());
        assert_eq!(spis(&mut s), want);
        // Changed values, and new keys, in one batch.
        let second: Vec<(u32, u8)> = (5_000..12_000u32).map(|i| (0x1000 + i * 7, 3)).collect();
        s.add_spis(second.iter().copied()).unwrap();
        want.extend(second.iter().copied());
        assert_eq!(spis(&mut s), want);
        // Removed: every third key, and as many that were never there.
        let gone: Vec<u32> = (0..12_000u32)
            .step_by(3)
            .flat_map(|i| [0x1000 + i * 7, 0x1000 + i * 7 + 1])
            .collect();
        s.remove_spis(gone.iter().copied()).unwrap();
        for k in &gone {
            want.remove(k);
        }
        assert_eq!(spis(&mut s), want);
        // Nothing to do is nothing done.
        s.add_spis([]).unwrap();
        s.remove_spis([]).unwrap();
        assert_eq!(spis(&mut s), want);
    }
}
