//! The security association database (RFC 4301 §4.4.2). Inbound lookup is by
//! destination address and SPI, as in Linux XFRM; outbound lookup by the
//! policy template (reqid, mode, addresses).
//!
//! Persistent (structurally shared) maps: a copy costs O(1) and each
//! change O(log n) — the control plane changes a copy and publishes it to
//! the workers (see [`super::tables`]), whatever the number of SAs. An SA's
//! id stays its own while it exists (a freed id is reused later; the
//! tables' change log tells engines which ids changed).

use super::sa::{Mode, SaCore, SaId};
use super::selector::Flow;
use super::spd::Template;
use super::PMap;
use core::net::IpAddr;
use std::sync::Arc;

#[derive(Default, Clone)]
pub struct Sad {
    cores: imbl::Vector<Option<Arc<SaCore>>>,
    /// Ids freed by deletes, reused by later inserts.
    free: imbl::Vector<SaId>,
    by_dst_spi: PMap<(IpAddr, u32), SaId>,
    /// (reqid, lineage) → SA: a reqid's SAs in install order (the newest
    /// last, an updated SA keeping its place).
    by_reqid: imbl::OrdMap<(u32, u64), SaId>,
    /// (src, dst, lineage) → SA, for templates without a reqid: both
    /// endpoints are always known (tunnel templates name them, transport
    /// uses the flow's). Ordered maps, not a list per key: a peer with tens
    /// of thousands of CHILD_SAs between the same two addresses (a
    /// carrier's IKE peer, a load generator) costs O(log n) a change, not a
    /// copy of its whole list.
    by_pair: imbl::OrdMap<(IpAddr, IpAddr, u64), SaId>,
    len: usize,
    lineages: u64,
    /// Changes so far (see [`Sad::version`]).
    version: u64,
}

/// `state add` for a (dst, SPI) that exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exists;

/// `state update` or `delete` of a (dst, SPI) that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotFound;

impl Sad {
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs an SA under a free id.
    pub fn insert(&mut self, mut core: SaCore) -> Result<SaId, Exists> {
        let key = (core.cfg.dst, core.cfg.spi);
        if self.by_dst_spi.contains_key(&key) {
            return Err(Exists);
        }
        self.lineages += 1;
        core.lineage = self.lineages;
        let id = match self.free.pop_back() {
            Some(id) => id,
            None => {
                self.cores.push_back(None);
                self.cores.len() - 1
            }
        };
        let core = Arc::new(core);
        self.cores.set(id, Some(core.clone()));
        self.index(id, &core);
        self.len += 1;
        self.version += 1;
        Ok(id)
    }

    /// Indexes `id` (its core already in `cores`).
    fn index(&mut self, id: SaId, core: &SaCore) {
        let c = &core.cfg;
        self.by_dst_spi.insert((c.dst, c.spi), id);
        self.by_reqid.insert((c.reqid, core.lineage), id);
        self.by_pair.insert((c.src, c.dst, core.lineage), id);
    }

    fn unindex(&mut self, core: &SaCore) {
        let c = &core.cfg;
        self.by_dst_spi.remove(&(c.dst, c.spi));
        self.by_reqid.remove(&(c.reqid, core.lineage));
        self.by_pair.remove(&(c.src, c.dst, core.lineage));
    }

    /// `state update`: replaces the SA with the same (dst, SPI), keeping
    /// what its traffic depends on — the IV mask (the sequence goes on, so
    /// a new mask could repeat an IV), the shared sequence counter and
    /// owner, the install time and the lineage (so every engine keeps the
    /// SA's replay window, sequence number and counters). The replaced
    /// core, and its keys, are returned to be dropped.
    pub fn update(&mut self, mut core: SaCore) -> Result<(SaId, Arc<SaCore>), NotFound> {
        let key = (core.cfg.dst, core.cfg.spi);
        let id = *self.by_dst_spi.get(&key).ok_or(NotFound)?;
        let old = self.cores[id].clone().ok_or(NotFound)?;
        core.cfg.iv_mask = old.cfg.iv_mask;
        core.share = old.share.clone();
        core.lineage = old.lineage;
        core.added = old.added;
        let reindex = (old.cfg.reqid, old.cfg.src) != (core.cfg.reqid, core.cfg.src);
        if reindex {
            self.unindex(&old);
        }
        let core = Arc::new(core);
        self.cores.set(id, Some(core.clone()));
        if reindex {
            self.index(id, &core);
        }
        self.version += 1;
        Ok((id, old))
    }

    /// `state delete`: the SA's id, and its core to be dropped.
    pub fn remove(&mut self, dst: IpAddr, spi: u32) -> Option<(SaId, Arc<SaCore>)> {
        let id = *self.by_dst_spi.get(&(dst, spi))?;
        let old = self.cores.set(id, None)?;
        self.unindex(&old);
        self.free.push_back(id);
        self.len -= 1;
        self.version += 1;
        Some((id, old))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// One more than the highest id in use or freed: engines size their
    /// runtime tables by it.
    pub fn id_bound(&self) -> usize {
        self.cores.len()
    }

    /// Grows with every change: decisions cached under one version are
    /// void under the next (the engine's flow caches).
    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The SA `id` (which must exist: ids come from this table's lookups).
    pub fn get(&self, id: SaId) -> &SaCore {
        self.cores[id].as_deref().expect("an SA id from this table")
    }

    /// The SA `id`, if one has it.
    pub fn core(&self, id: SaId) -> Option<&Arc<SaCore>> {
        self.cores.get(id).and_then(Option::as_ref)
    }

    /// The SAs in id order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<SaCore>> {
        self.cores.iter().flatten()
    }

    /// The SAs with their ids.
    pub fn iter_ids(&self) -> impl Iterator<Item = (SaId, &Arc<SaCore>)> {
        self.cores
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
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
            let c = &self.get(*id).cfg;
            c.mode == t.mode
                && (t.reqid == 0 || c.reqid == t.reqid)
                && t.spi.is_none_or(|s| s == c.spi)
                && src.is_none_or(|a| a == c.src)
                && dst.is_none_or(|a| a == c.dst)
                && c.sel.as_ref().is_none_or(|s| s.matches(flow))
        };
        // An index lookup either way, never a scan of the whole SAD: the
        // key's SAs, the newest first.
        match (t.reqid, src, dst) {
            (0, Some(s), Some(d)) => self
                .by_pair
                .range((s, d, 0)..=(s, d, u64::MAX))
                .rev()
                .map(|(_, id)| *id)
                .find(ok),
            (0, _, _) => None, // a tunnel template always names both ends
            (r, _, _) => self
                .by_reqid
                .range((r, 0)..=(r, u64::MAX))
                .rev()
                .map(|(_, id)| *id)
                .find(ok),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Algs, Level, SaConfig, SaFlags};
    use crate::wire::l4::Ports;

    fn sa(src: &str, dst: &str, spi: u32, reqid: u32, mode: Mode) -> SaCore {
        SaCore::new(SaConfig {
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
