//! The security association database (RFC 4301 §4.4.2). Inbound lookup is by
//! destination address and SPI, as in Linux XFRM; outbound lookup by the
//! policy template (reqid, mode, addresses).

use super::sa::{Mode, Sa, SaId};
use super::selector::Flow;
use super::spd::Template;
use core::net::IpAddr;
use rustc_hash::FxHashMap as HashMap;
// Fx: keys are installed from configuration only; packets merely look up.

#[derive(Default)]
pub struct Sad {
    sas: Vec<Sa>,
    by_dst_spi: HashMap<(IpAddr, u32), SaId>,
    by_reqid: HashMap<u32, Vec<SaId>>,
    /// (src, dst) → SAs, for templates without a reqid: both endpoints are
    /// always known (tunnel templates name them, transport uses the flow's).
    by_pair: HashMap<(IpAddr, IpAddr), Vec<SaId>>,
    /// SAs installed so far (see [`Sad::version`]).
    version: u64,
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
        self.version += 1;
        self.by_dst_spi.insert(key, id);
        self.by_reqid.entry(sa.cfg.reqid).or_default().push(id);
        self.by_pair
            .entry((sa.cfg.src, sa.cfg.dst))
            .or_default()
            .push(id);
        self.sas.push(sa);
        Ok(id)
    }

    pub fn len(&self) -> usize {
        self.sas.len()
    }

    /// Grows with every SA installed: decisions cached under one version
    /// are void under the next (the engine's flow caches). An installed
    /// SA's selector, mode, reqid and addresses never change (the control
    /// plane replaces an SA by building a new engine).
    pub fn version(&self) -> u64 {
        self.version
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

    /// Outbound: the SA a template resolves to for `flow`. Of several, the most
    /// recently installed wins (so a rekeyed SA takes over, as in XFRM).
    pub fn lookup_out(&self, t: &Template, flow: &Flow) -> Option<SaId> {
        let (src, dst) = match t.mode {
            Mode::Tunnel => (t.src, t.dst),
            // Transport mode protects the flow's own addresses.
            Mode::Transport => (
                Some(t.src.unwrap_or(flow.src)),
                Some(t.dst.unwrap_or(flow.dst)),
            ),
        };
        let ok = |id: &SaId| {
            let c = &self.sas[*id].cfg;
            c.mode == t.mode
                && (t.reqid == 0 || c.reqid == t.reqid)
                && t.spi.is_none_or(|s| s == c.spi)
                && src.is_none_or(|a| a == c.src)
                && dst.is_none_or(|a| a == c.dst)
                && c.sel.as_ref().is_none_or(|s| s.matches(flow))
        };
        // An index lookup either way, never a scan of the whole SAD.
        let candidates = match (t.reqid, src, dst) {
            (0, Some(s), Some(d)) => self.by_pair.get(&(s, d))?,
            (0, _, _) => return None, // a tunnel template always names both ends
            (r, _, _) => self.by_reqid.get(&r)?,
        };
        candidates.iter().rev().copied().find(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Algs, Level, SaConfig, SaFlags};
    use crate::wire::l4::Ports;

    fn sa(src: &str, dst: &str, spi: u32, reqid: u32, mode: Mode) -> Sa {
        Sa::new(SaConfig {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            spi,
            reqid,
            mode,
            replay_window: 64,
            flags: SaFlags::default(),
            replay_seq: 0,
            replay_oseq: 0,
            algs: Algs::aead("rfc4106(gcm(aes))", vec![1; 20], 128),
            sel: None,
            encap: None,
            iv_mask: 0,
            lifetime: Default::default(),
        })
        .unwrap()
    }

    fn tmpl(mode: Mode, reqid: u32, ends: Option<(&str, &str)>) -> Template {
        Template {
            src: ends.map(|e| e.0.parse().unwrap()),
            dst: ends.map(|e| e.1.parse().unwrap()),
            spi: None,
            reqid,
            mode,
            level: Level::Required,
        }
    }

    fn flow(src: &str, dst: &str) -> Flow {
        Flow {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: 17,
            ports: Some(Ports::default()),
        }
    }

    /// Templates without a reqid resolve through the (src, dst) index, the
    /// newest SA winning; with a reqid through the reqid index.
    #[test]
    fn outbound_lookup_by_pair_and_by_reqid() {
        let mut sad = Sad::new();
        for i in 0..1000u32 {
            // Many transport SAs to other hosts: the index must pick the right one.
            let dst = format!("198.19.{}.{}", i / 250, i % 250 + 1);
            sad.insert(sa("198.18.0.1", &dst, 0x1000 + i, 0, Mode::Transport))
                .unwrap();
        }
        let old = sad
            .insert(sa("198.18.0.1", "198.18.0.2", 0x9000, 0, Mode::Transport))
            .unwrap();
        let new = sad
            .insert(sa("198.18.0.1", "198.18.0.2", 0x9001, 0, Mode::Transport))
            .unwrap();
        let tun = sad
            .insert(sa("198.18.0.1", "198.18.0.3", 0x9002, 7, Mode::Tunnel))
            .unwrap();
        let f = flow("198.18.0.1", "198.18.0.2");
        assert_eq!(
            sad.lookup_out(&tmpl(Mode::Transport, 0, None), &f),
            Some(new)
        );
        assert_ne!(Some(old), Some(new));
        let far = flow("198.18.0.1", "198.19.3.200");
        assert_eq!(
            sad.get(
                sad.lookup_out(&tmpl(Mode::Transport, 0, None), &far)
                    .unwrap()
            )
            .cfg
            .spi,
            0x1000 + 949
        );
        assert_eq!(
            sad.lookup_out(
                &tmpl(Mode::Transport, 0, None),
                &flow("198.18.0.1", "198.18.9.9")
            ),
            None
        );
        let t = tmpl(Mode::Tunnel, 0, Some(("198.18.0.1", "198.18.0.3")));
        assert_eq!(sad.lookup_out(&t, &f), Some(tun));
        assert_eq!(
            sad.lookup_out(
                &tmpl(Mode::Tunnel, 7, Some(("198.18.0.1", "198.18.0.3"))),
                &f
            ),
            Some(tun)
        );
        assert_eq!(
            sad.lookup_out(
                &tmpl(Mode::Tunnel, 8, Some(("198.18.0.1", "198.18.0.3"))),
                &f
            ),
            None
        );
        // A tunnel template must name its endpoints (the config refuses it otherwise).
        assert_eq!(sad.lookup_out(&tmpl(Mode::Tunnel, 0, None), &f), None);
    }
}
