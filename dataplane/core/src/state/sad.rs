//! The security association database (RFC 4301 §4.4.2). Inbound lookup is by
//! destination address and SPI, as in Linux XFRM; outbound lookup by the
//! policy template (reqid, mode, addresses).

use super::sa::{Mode, Sa, SaId};
use super::selector::Flow;
use super::spd::Template;
use core::net::IpAddr;
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
// Fx: keys are installed from configuration only; packets merely look up.

#[derive(Default)]
pub struct Sad {
    sas: Vec<Sa>,
    by_dst_spi: HashMap<(IpAddr, u32), SaId>,
    by_reqid: HashMap<u32, Vec<SaId>>,
    dsts: HashSet<IpAddr>,
}

/// `state add` for a (dst, SPI) that exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exists;

impl Sad {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, sa: Sa) -> Result<SaId, Exists> {
        let key = (sa.cfg.dst, sa.cfg.spi);
        if self.by_dst_spi.contains_key(&key) {
            return Err(Exists);
        }
        let id = self.sas.len();
        self.by_dst_spi.insert(key, id);
        self.by_reqid.entry(sa.cfg.reqid).or_default().push(id);
        self.dsts.insert(sa.cfg.dst);
        self.sas.push(sa);
        Ok(id)
    }

    pub fn len(&self) -> usize {
        self.sas.len()
    }
    pub fn is_empty(&self) -> bool {
        self.sas.is_empty()
    }
    pub fn get(&self, id: SaId) -> &Sa {
        &self.sas[id]
    }
    pub fn get_mut(&mut self, id: SaId) -> &mut Sa {
        &mut self.sas[id]
    }
    pub fn iter(&self) -> impl Iterator<Item = &Sa> {
        self.sas.iter()
    }

    /// Inbound: the SA for ESP arriving at `dst` with `spi`.
    pub fn lookup_in(&self, dst: IpAddr, spi: u32) -> Option<SaId> {
        self.by_dst_spi.get(&(dst, spi)).copied()
    }

    /// True if some SA terminates at `dst` (so ESP to it is ours to process).
    pub fn has_dst(&self, dst: IpAddr) -> bool {
        self.dsts.contains(&dst)
    }

    /// Outbound: the SA a template resolves to for `flow`. Of several, the most
    /// recently installed wins (so a rekeyed SA takes over, as in XFRM).
    pub fn lookup_out(&self, t: &Template, flow: &Flow) -> Option<SaId> {
        let ok = |id: &SaId| {
            let sa = &self.sas[*id];
            let c = &sa.cfg;
            let (src, dst) = match t.mode {
                Mode::Tunnel => (t.src, t.dst),
                // Transport mode protects the flow's own addresses.
                Mode::Transport => (
                    Some(t.src.unwrap_or(flow.src)),
                    Some(t.dst.unwrap_or(flow.dst)),
                ),
            };
            c.mode == t.mode
                && (t.reqid == 0 || c.reqid == t.reqid)
                && t.spi.is_none_or(|s| s == c.spi)
                && src.is_none_or(|a| a == c.src)
                && dst.is_none_or(|a| a == c.dst)
                && c.sel.as_ref().is_none_or(|s| s.matches(flow))
        };
        if t.reqid != 0 {
            self.by_reqid.get(&t.reqid)?.iter().rev().copied().find(ok)
        } else {
            (0..self.sas.len()).rev().find(ok)
        }
    }
}
