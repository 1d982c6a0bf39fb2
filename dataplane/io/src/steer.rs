//! The XDP steering program on the outside interface: load, attach, keep its
//! maps in step with the SAs, read its counters, detach.

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{Xdp, XdpMode};
use aya::Ebpf;
use espd_common::{Counter, MAP_COUNTERS, MAP_ENCAP_PORTS, MAP_SPIS, PROG_OUTSIDE};

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

/// The attached program. Dropping it detaches it.
pub struct Steering {
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    iface: String,
}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/espd-xdp"));

impl Steering {
    /// Loads the program and attaches it to `iface` (`XdpMode::Driver` for
    /// native XDP, which veth supports; `Skb` for generic XDP).
    pub fn attach(iface: &str, mode: XdpMode) -> Result<Self, SteerError> {
        let mut ebpf = Ebpf::load(OBJECT)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROG_OUTSIDE)
            .ok_or(SteerError::Missing(PROG_OUTSIDE))?
            .try_into()?;
        prog.load()?;
        let link = prog.attach(iface, mode)?;
        Ok(Steering {
            ebpf,
            link: Some(link),
            iface: iface.to_string(),
        })
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Adds SPIs whose ESP is steered to the AF_XDP sockets.
    pub fn add_spis(&mut self, spis: impl IntoIterator<Item = u32>) -> Result<(), SteerError> {
        let mut m: HashMap<&mut MapData, u32, u8> = HashMap::try_from(
            self.ebpf
                .map_mut(MAP_SPIS)
                .ok_or(SteerError::Missing(MAP_SPIS))?,
        )?;
        for s in spis {
            m.insert(s, 1, 0)?;
        }
        Ok(())
    }

    /// Adds RFC 3948 encapsulation ports (UDP destination ports carrying ESP).
    pub fn add_encap_ports(
        &mut self,
        ports: impl IntoIterator<Item = u16>,
    ) -> Result<(), SteerError> {
        let mut m: HashMap<&mut MapData, u16, u8> = HashMap::try_from(
            self.ebpf
                .map_mut(MAP_ENCAP_PORTS)
                .ok_or(SteerError::Missing(MAP_ENCAP_PORTS))?,
        )?;
        for p in ports {
            m.insert(p, 1, 0)?;
        }
        Ok(())
    }

    /// Registers an AF_XDP socket for RX queue `queue` in the program's XSKMAP,
    /// so steered frames arriving on that queue go to it.
    pub fn set_socket(
        &mut self,
        queue: u32,
        fd: impl std::os::fd::AsRawFd,
    ) -> Result<(), SteerError> {
        let mut m: aya::maps::XskMap<&mut MapData> = aya::maps::XskMap::try_from(
            self.ebpf
                .map_mut(espd_common::MAP_XSKS)
                .ok_or(SteerError::Missing("XSKS"))?,
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

    /// Detaches the program now (dropping does the same, ignoring errors).
    pub fn detach(mut self) -> Result<(), SteerError> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<(), SteerError> {
        if let Some(link) = self.link.take() {
            let prog: &mut Xdp = self
                .ebpf
                .program_mut(PROG_OUTSIDE)
                .ok_or(SteerError::Missing(PROG_OUTSIDE))?
                .try_into()?;
            prog.detach(link)?;
        }
        Ok(())
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        let _ = self.detach_inner();
    }
}
