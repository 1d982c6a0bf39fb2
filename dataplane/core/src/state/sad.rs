//! The security association database (RFC 4301 §4.4.2). Inbound lookup is by
//! destination address and SPI, as in Linux XFRM; outbound lookup by the
//! policy template (reqid, mode, addresses).
//!
//! Persistent (structurally shared) maps: a copy costs O(1) and each
//! change O(log n) — the control plane changes a copy and publishes it to
//! the workers (see [`super::tables`]), whatever the number of SAs. An SA's
//! id stays its own while it exists (a freed id is reused later; the
//! tables' change log tells engines which ids changed).

use super::sa::{Mode, NewSa, SaCore, SaId};
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
    /// reqid → its SAs in install order (the newest last, an updated SA
    /// keeping its place).
    by_reqid: PMap<u32, Lineages>,
    /// (src, dst) → its SAs in install order, for templates without a
    /// reqid: both endpoints are always known (tunnel templates name them,
    /// transport uses the flow's). Kept only while `paired`.
    by_pair: PMap<(IpAddr, IpAddr), Lineages>,
    /// `by_pair` is kept: some template without a reqid may ask it. Not by
    /// default: an IKE daemon gives every CHILD_SA and its policies a
    /// reqid, and the index's upkeep was a fifth of an SA's install at
    /// 100 000 SAs (docs/performance.md); see [`Sad::keep_pair_index`].
    paired: bool,
    len: usize,
    lineages: u64,
    /// Changes so far (see [`Sad::version`]).
    version: u64,
}

/// The SAs under one index key, by lineage (install order). Most keys have
/// one or a few: kept inline, or as one exact slice. Past [`FEW`] they go
/// in a persistent ordered map, so a peer with tens of thousands of
/// CHILD_SAs between the same two addresses (a carrier's IKE peer, a load
/// generator) costs O(log n) a change, not a copy of its whole list. (Two
/// ordered maps keyed by (key, lineage) held this before: B-trees filled
/// in install order stayed half full, about 65 and 75 octets an SA at
/// 100 000; see docs/performance.md.)
#[derive(Clone)]
enum Lineages {
    One((u64, SaId)),
    Few(Arc<[(u64, SaId)]>),
    Many(imbl::OrdMap<u64, SaId>),
}

/// Entries a [`Lineages::Few`] holds at most.
const FEW: usize = 16;

impl Lineages {
    /// Puts SA `id` of lineage `l` under `key` in `m`.
    fn put<K: core::hash::Hash + Eq + Clone>(m: &mut PMap<K, Lineages>, key: K, l: u64, id: SaId) {
        m.upsert(key, |old| Lineages::with(old, l, id));
    }

    /// Takes lineage `l` out from under `key` in `m`.
    fn take<K: core::hash::Hash + Eq + Clone>(m: &mut PMap<K, Lineages>, key: K, l: u64) {
        match m.get(&key).map(|v| v.without(l)) {
            Some(Some(v)) => {
                m.insert(key, v);
            }
            Some(None) => {
                m.remove(&key);
            }
            None => {}
        }
    }

    /// These and SA `id` of lineage `l`.
    fn with(this: Option<&Lineages>, l: u64, id: SaId) -> Lineages {
        match this {
            None => Lineages::One((l, id)),
            Some(Lineages::Many(m)) => {
                let mut m = m.clone();
                m.insert(l, id);
                Lineages::Many(m)
            }
            Some(few) => {
                let es = few.entries();
                let at = es.partition_point(|e| e.0 < l);
                let with = es[..at]
                    .iter()
                    .copied()
                    .chain(core::iter::once((l, id)))
                    .chain(es[at..].iter().copied());
                if es.len() >= FEW {
                    Lineages::Many(with.collect())
                } else {
                    // One block at its size (the iterator's length is exact).
                    Lineages::Few(with.collect())
                }
            }
        }
    }

    /// These without lineage `l`; `None` if none are left.
    fn without(&self, l: u64) -> Option<Lineages> {
        let v: Vec<(u64, SaId)> = match self {
            Lineages::Many(m) if m.len() > FEW / 2 + 1 => {
                let mut m = m.clone();
                m.remove(&l);
                return Some(Lineages::Many(m));
            }
            Lineages::Many(m) => m
                .iter()
                .filter(|e| *e.0 != l)
                .map(|(a, b)| (*a, *b))
                .collect(),
            few => few.entries().iter().filter(|e| e.0 != l).copied().collect(),
        };
        match v[..] {
            [] => None,
            [one] => Some(Lineages::One(one)),
            _ => Some(Lineages::Few(v.into())),
        }
    }

    /// One or a few, as a slice (`Many` is never asked: see `with`).
    fn entries(&self) -> &[(u64, SaId)] {
        match self {
            Lineages::One(e) => core::slice::from_ref(e),
            Lineages::Few(v) => v,
            Lineages::Many(_) => &[],
        }
    }

    /// The newest SA that `ok` accepts.
    fn newest(&self, mut ok: impl FnMut(&SaId) -> bool) -> Option<SaId> {
        match self {
            Lineages::One((_, id)) => ok(id).then_some(*id),
            Lineages::Few(v) => v.iter().rev().map(|e| e.1).find(|id| ok(id)),
            Lineages::Many(m) => m.iter().rev().map(|e| *e.1).find(|id| ok(id)),
        }
    }
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
    pub fn insert(&mut self, core: impl Into<NewSa>) -> Result<SaId, Exists> {
        let mut core = core.into();
        let key = (core.cfg.dst, core.cfg.spi);
        // The id it takes: the last one freed, or a new one at the end.
        let id = self.free.last().copied().unwrap_or(self.cores.len());
        // One walk of the (dst, SPI) index, not a look and then an insert
        // (at 100 000 SAs each walk is a few cache misses): the key is
        // taken if it is free, and one in use keeps its id.
        if self
            .by_dst_spi
            .upsert(key, |had| had.copied().unwrap_or(id))
            .is_some()
        {
            return Err(Exists);
        }
        self.lineages += 1;
        core.lineage = self.lineages;
        if self.free.pop_back().is_none() {
            self.cores.push_back(None);
        }
        let core = core.into_shared();
        self.cores.set(id, Some(core.clone()));
        self.index_lineages(id, &core);
        self.len += 1;
        self.version += 1;
        Ok(id)
    }

    /// Indexes `id` (its core already in `cores`).
    fn index(&mut self, id: SaId, core: &SaCore) {
        let c = &core.cfg;
        self.by_dst_spi.insert((c.dst, c.spi), id);
        self.index_lineages(id, core);
    }

    /// Indexes `id` by reqid and by address pair.
    fn index_lineages(&mut self, id: SaId, core: &SaCore) {
        let c = &core.cfg;
        Lineages::put(&mut self.by_reqid, c.reqid, core.lineage, id);
        if self.paired {
            Lineages::put(&mut self.by_pair, (c.src, c.dst), core.lineage, id);
        }
    }

    fn unindex(&mut self, core: &SaCore) {
        let c = &core.cfg;
        self.by_dst_spi.remove(&(c.dst, c.spi));
        Lineages::take(&mut self.by_reqid, c.reqid, core.lineage);
        if self.paired {
            Lineages::take(&mut self.by_pair, (c.src, c.dst), core.lineage);
        }
    }

    /// Keeps the (src, dst) index of templates without a reqid (`on`:
    /// built now from every SA, O(n log n), if it was not kept), or stops
    /// keeping it. Without it such a template's lookup scans every SA:
    /// [`crate::state::Tables`] keeps it whenever its SPD has such a
    /// template. Not kept by default.
    pub fn keep_pair_index(&mut self, on: bool) {
        match (on, self.paired) {
            (true, false) => {
                self.paired = true;
                let (cores, pairs) = (&self.cores, &mut self.by_pair);
                for (id, c) in cores.iter().enumerate() {
                    if let Some(c) = c {
                        Lineages::put(pairs, (c.cfg.src, c.cfg.dst), c.lineage, id);
                    }
                }
            }
            (false, true) => {
                self.paired = false;
                self.by_pair = PMap::default();
            }
            _ => {}
        }
    }

    /// Whether the (src, dst) index is kept ([`Sad::keep_pair_index`]).
    pub fn pair_index_kept(&self) -> bool {
        self.paired
    }

    /// `state update`: replaces the SA with the same (dst, SPI), keeping
    /// what its traffic depends on — the IV mask (the sequence goes on, so
    /// a new mask could repeat an IV), the shared sequence counter and
    /// owner, the install time and the lineage (so every engine keeps the
    /// SA's replay window, sequence number and counters). The replaced
    /// core, and its keys, are returned to be dropped.
    pub fn update(&mut self, core: impl Into<NewSa>) -> Result<(SaId, Arc<SaCore>), NotFound> {
        let mut core = core.into();
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
        let core = core.into_shared();
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
        // An index lookup either way (a scan of the whole SAD only for a
        // template without a reqid in a SAD that does not keep their index,
        // which the tables never let happen): the key's SAs, the newest first.
        match (t.reqid, src, dst) {
            (0, Some(s), Some(d)) if !self.paired => self
                .iter_ids()
                .filter(|(id, c)| (c.cfg.src, c.cfg.dst) == (s, d) && ok(id))
                .max_by_key(|(_, c)| c.lineage)
                .map(|(id, _)| id),
            (0, Some(s), Some(d)) => self.by_pair.get(&(s, d))?.newest(ok),
            (0, _, _) => None, // a tunnel template always names both ends
            (r, _, _) => self.by_reqid.get(&r)?.newest(ok),
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

    /// Random puts and takes under a few keys, through one, few and many
    /// (both ways), against a B-tree per key: the newest accepted SA is
    /// the same after every step.
    #[test]
    fn lineages_match_an_ordered_map() {
        use std::collections::{BTreeMap, HashMap};
        let mut m: PMap<u32, Lineages> = PMap::default();
        let mut want: HashMap<u32, BTreeMap<u64, SaId>> = HashMap::new();
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut r = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut seen = [0usize; 3];
        for step in 0..20_000 {
            let (x, key) = (r(), (r() % 3) as u32);
            let w = want.entry(key).or_default();
            // Lists grow to a target and shrink to the next, one in four
            // steps the other way: they swing through every form.
            let target = [1, 6, 40][(step / 600) % 3];
            let put = (w.len() < target) != (x % 4 == 0);
            if put {
                let l = r() % 1000;
                if w.insert(l, step).is_none() {
                    Lineages::put(&mut m, key, l, step);
                } else {
                    w.remove(&l);
                    Lineages::take(&mut m, key, l);
                }
            } else if let Some(&l) = w.keys().nth((x % 7) as usize % w.len().max(1)) {
                w.remove(&l);
                Lineages::take(&mut m, key, l);
            }
            let odd = |id: &SaId| id % 2 == 1;
            let got = m.get(&key).and_then(|v| v.newest(odd));
            let exp = w.values().rev().copied().find(|id| odd(id));
            assert_eq!(got, exp, "step {step}");
            assert_eq!(m.get(&key).is_none(), w.is_empty(), "step {step}");
            match m.get(&key) {
                Some(Lineages::One(_)) => seen[0] += 1,
                Some(Lineages::Few(v)) => {
                    seen[1] += 1;
                    assert!(v.len() >= 2 && v.len() <= FEW, "step {step}");
                    assert!(v.windows(2).all(|p| p[0].0 < p[1].0), "step {step}");
                }
                Some(Lineages::Many(_)) => seen[2] += 1,
                None => {}
            }
        }
        assert!(seen.iter().all(|n| *n > 100), "every form, often: {seen:?}");
    }

    /// Templates without a reqid resolve through the (src, dst) index, the
    /// newest SA winning; with a reqid through the reqid index.
    #[test]
    fn outbound_lookup_by_pair_and_by_reqid() {
        // The pair index kept from the start, built after the SAs came,
        // and not kept (a scan): the same answers.
        for how in ["kept", "built late", "scanned"] {
            outbound_lookups(how);
        }
    }

    fn outbound_lookups(how: &str) {
        let mut sad = Sad::new();
        sad.keep_pair_index(how == "kept");
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
        // A deleted SA leaves every index (the one at 198.18.0.4 came and
        // went, before the index was built or after).
        let gone = sa("198.18.0.1", "198.18.0.4", 0x9003, 0, Mode::Transport);
        sad.insert(gone).unwrap();
        sad.remove("198.18.0.4".parse().unwrap(), 0x9003).unwrap();
        if how == "built late" {
            sad.keep_pair_index(true);
        }
        assert_eq!(sad.pair_index_kept(), how != "scanned");
        let f = flow("198.18.0.1", "198.18.0.2");
        assert_eq!(
            sad.lookup_out(&tmpl(Mode::Transport, 0, None), &f),
            Some(new),
            "{how}"
        );
        assert_ne!(Some(old), Some(new));
        assert_eq!(
            sad.lookup_out(
                &tmpl(Mode::Transport, 0, None),
                &flow("198.18.0.1", "198.18.0.4")
            ),
            None,
            "{how}"
        );
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
        // The newest goes: the older one of the pair answers again.
        sad.remove("198.18.0.2".parse().unwrap(), 0x9001).unwrap();
        assert_eq!(
            sad.lookup_out(&tmpl(Mode::Transport, 0, None), &f),
            Some(old),
            "{how}"
        );
    }
}
