//! The SAD and SPD as the workers share them: one copy of every SA (its
//! key schedule included) and every policy, whatever the number of workers.
//!
//! The control plane changes its own [`Tables`] — each change O(log n) on
//! persistent maps, a copy O(1) — and publishes a snapshot (`Arc<Tables>`)
//! that every engine picks up between two bursts (RCU: readers never wait,
//! a snapshot and the SA cores only it holds are freed, keys zeroized, when
//! the last engine lets go of it). What the engine derives from the tables
//! — this host's addresses, where ESP is ours to open, the encapsulation
//! ports — is kept up to date here with reference counts, not recomputed.
//! A bounded log of the SA ids that changed tells an engine which of its
//! per-SA runtime states to renew or drop (see
//! [`crate::engine::Engine::set_tables`]).

use super::sa::{NewSa, SaCore, SaId};
use super::sad::{Exists as SaExists, NotFound, Sad};
use super::spd::{Action, Direction, Exists as PolicyExists, Policy, Spd};
use super::{CMap, Selector};
use core::net::IpAddr;
use std::sync::Arc;

/// How many SA changes the log keeps; an engine further behind renews
/// every runtime state it has (still correct, only slower).
pub const LOG_LEN: usize = 1 << 16;

#[derive(Clone, Default)]
pub struct Tables {
    sad: Sad,
    spd: Spd,
    /// Addresses given by the caller (the gateway's own), sorted.
    extra: Arc<[IpAddr]>,
    /// Addresses the policies imply ([`crate::engine::local_addrs`]), counted.
    policy_addrs: CMap<IpAddr, u32>,
    /// Templates without a reqid in the SPD: while there are any, the SAD
    /// keeps its (src, dst) index for them ([`Sad::keep_pair_index`]).
    reqless: usize,
    /// src → dst → SAs: to move SAs in and out of `nonlocal` when an
    /// address becomes local or stops being local.
    by_src: CMap<IpAddr, CMap<IpAddr, u32>>,
    /// Destinations of SAs whose source is not local (their ESP is ours), counted.
    nonlocal: CMap<IpAddr, u32>,
    /// Encapsulation ports of the SAs, counted.
    ports: CMap<u16, u32>,
    /// The derived sets as the hot path reads them (sorted slices), made
    /// again only when a set's members change.
    local: Arc<[IpAddr]>,
    esp: Arc<[IpAddr]>,
    encap_ports: Arc<[u16]>,
    /// (version, id) of every SA removed or replaced, the last [`LOG_LEN`].
    log: imbl::Vector<(u64, SaId)>,
    /// The version of the last entry dropped from the log (0: none yet).
    log_floor: u64,
    /// Changes so far.
    version: u64,
    /// The clock SAs are installed by (seconds, the engines' clock).
    now: u64,
}

impl Tables {
    /// Tables over existing SAs and policies, `extra` being this host's
    /// own addresses ([`crate::engine::local_addrs`]).
    pub fn new(sad: Sad, spd: Spd, extra: &[IpAddr]) -> Self {
        let mut t = Tables {
            spd: Spd::new(),
            ..Default::default()
        };
        t.set_extra(extra);
        for dir in Direction::ALL {
            t.spd.set_default(dir, spd.default_action(dir));
            for p in spd.policies(dir) {
                let _ = t.insert_policy(p.clone());
            }
        }
        // Same ids as `sad` (callers index by them): adopt it whole.
        for core in sad.iter() {
            t.count_sa(core, 1);
        }
        t.sad = sad;
        t.sad.keep_pair_index(t.reqless > 0);
        t.refresh();
        t
    }

    pub fn sad(&self) -> &Sad {
        &self.sad
    }
    pub fn spd(&self) -> &Spd {
        &self.spd
    }

    /// Grows with every change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// This host's addresses, sorted: `extra` and those the policies imply.
    pub fn local(&self) -> &[IpAddr] {
        &self.local
    }

    /// Where ESP is ours to open ([`crate::engine::esp_addrs`]), sorted.
    pub fn esp_local(&self) -> &[IpAddr] {
        &self.esp
    }

    /// The SAs' UDP encapsulation ports, sorted.
    pub fn encap_ports(&self) -> &[u16] {
        &self.encap_ports
    }

    pub fn is_local(&self, a: IpAddr) -> bool {
        self.local.binary_search(&a).is_ok()
    }

    /// The ids changed at versions after `since`, or `None` if the log no
    /// longer reaches back that far.
    pub fn changed_since(&self, since: u64) -> Option<impl Iterator<Item = SaId> + '_> {
        if since < self.log_floor {
            return None;
        }
        let at = self
            .log
            .binary_search_by(|e| {
                if e.0 <= since {
                    core::cmp::Ordering::Less
                } else {
                    core::cmp::Ordering::Greater
                }
            })
            .unwrap_or_else(|i| i);
        Some(self.log.clone().slice(at..).into_iter().map(|e| e.1))
    }

    /// The clock SAs installed from now on count their time lifetime from.
    pub fn set_clock(&mut self, now: u64) {
        self.now = now;
    }

    /// Sets this host's own addresses.
    pub fn set_extra(&mut self, extra: &[IpAddr]) {
        let mut v = extra.to_vec();
        v.sort();
        v.dedup();
        let before: Vec<IpAddr> = self.local.to_vec();
        self.extra = v.into();
        self.version += 1;
        self.relocalise(&before);
    }

    fn bump(&mut self, id: Option<SaId>) {
        self.version += 1;
        if let Some(id) = id {
            self.log.push_back((self.version, id));
            while self.log.len() > LOG_LEN {
                if let Some((v, _)) = self.log.pop_front() {
                    self.log_floor = v;
                }
            }
        }
    }

    pub fn insert_sa(&mut self, core: impl Into<NewSa>) -> Result<SaId, SaExists> {
        let mut core = core.into();
        core.added = self.now;
        let id = self.sad.insert(core)?;
        let core = self.sad.core(id).cloned().expect("just inserted");
        if self.count_sa(&core, 1) {
            self.refresh();
        }
        // A new SA under a reused id: engines drop what they had for it.
        self.bump(Some(id));
        Ok(id)
    }

    /// `state update` (see [`Sad::update`]): the id, and the replaced core.
    pub fn update_sa(&mut self, core: impl Into<NewSa>) -> Result<(SaId, Arc<SaCore>), NotFound> {
        let (id, old) = self.sad.update(core)?;
        let new = self.sad.core(id).cloned().expect("just updated");
        if self.count_sa(&old, -1) | self.count_sa(&new, 1) {
            self.refresh();
        }
        self.bump(Some(id));
        Ok((id, old))
    }

    pub fn remove_sa(&mut self, dst: IpAddr, spi: u32) -> Option<(SaId, Arc<SaCore>)> {
        let (id, old) = self.sad.remove(dst, spi)?;
        if self.count_sa(&old, -1) {
            self.refresh();
        }
        self.bump(Some(id));
        Some((id, old))
    }

    /// Adds a policy (see [`Spd::insert`]: an `Arc` given is the one kept).
    pub fn insert_policy(&mut self, p: impl Into<Arc<Policy>>) -> Result<(), PolicyExists> {
        let p = p.into();
        let addrs = policy_addrs(&p);
        let reqless = reqless(&p);
        self.spd.insert(p)?;
        self.count_policy(&addrs, 1);
        self.count_reqless(reqless, 0);
        self.bump(None);
        Ok(())
    }

    pub fn update_policy(&mut self, p: impl Into<Arc<Policy>>) -> Option<Arc<Policy>> {
        let p = p.into();
        let addrs = policy_addrs(&p);
        let reqless_new = reqless(&p);
        let old = self.spd.update(p)?;
        self.count_policy(&addrs, 1);
        self.count_policy(&policy_addrs(&old), -1);
        self.count_reqless(reqless_new, reqless(&old));
        self.bump(None);
        Some(old)
    }

    pub fn remove_policy(&mut self, dir: Direction, sel: &Selector) -> Option<Arc<Policy>> {
        let old = self.spd.remove(dir, sel)?;
        self.count_policy(&policy_addrs(&old), -1);
        self.count_reqless(0, reqless(&old));
        self.bump(None);
        Some(old)
    }

    pub fn set_default(&mut self, dir: Direction, a: Action) {
        self.spd.set_default(dir, a);
        self.bump(None);
    }

    /// Counts an SA in (or out of) the derived sets; true if a set's
    /// members changed.
    fn count_sa(&mut self, core: &SaCore, d: i64) -> bool {
        let c = &core.cfg;
        let mut changed = false;
        // In place: a copy of the inner map would copy its path on every change.
        let m = self.by_src.entry(c.src).or_default();
        add(m, c.dst, d);
        if m.is_empty() {
            self.by_src.remove(&c.src);
        }
        if !self.is_local_now(c.src) {
            changed |= add(&mut self.nonlocal, c.dst, d);
        }
        if let Some(e) = c.encap {
            changed |= add(&mut self.ports, e.sport, d);
            changed |= add(&mut self.ports, e.dport, d);
        }
        changed
    }

    /// Counts templates without a reqid in and out. The SAD's index for
    /// them is built when the first comes (once: O(SAs)), and kept when the
    /// last goes (a policy that comes and goes costs no rebuild each time).
    fn count_reqless(&mut self, added: usize, removed: usize) {
        self.reqless = self.reqless + added - removed;
        if self.reqless > 0 {
            self.sad.keep_pair_index(true);
        }
    }

    fn count_policy(&mut self, addrs: &[IpAddr], d: i64) {
        let before: Vec<IpAddr> = self.local.to_vec();
        for a in addrs {
            add(&mut self.policy_addrs, *a, d);
        }
        self.relocalise(&before);
    }

    /// Local per the counts (the materialised `local` may lag within a change).
    fn is_local_now(&self, a: IpAddr) -> bool {
        self.extra.binary_search(&a).is_ok() || self.policy_addrs.contains_key(&a)
    }

    /// After the local set may have changed from `before`: SAs from an
    /// address that became local (or stopped being) move out of (into)
    /// `nonlocal` — O(SAs from that address), and addresses change rarely.
    fn relocalise(&mut self, before: &[IpAddr]) {
        let mut now: Vec<IpAddr> = self
            .extra
            .iter()
            .copied()
            .chain(self.policy_addrs.keys().copied())
            .collect();
        now.sort();
        now.dedup();
        if now == before {
            return;
        }
        for a in now.iter().filter(|a| before.binary_search(a).is_err()) {
            for (dst, n) in self.by_src.get(a).cloned().unwrap_or_default() {
                add(&mut self.nonlocal, dst, -i64::from(n));
            }
        }
        for a in before.iter().filter(|a| now.binary_search(a).is_err()) {
            for (dst, n) in self.by_src.get(a).cloned().unwrap_or_default() {
                add(&mut self.nonlocal, dst, i64::from(n));
            }
        }
        self.local = now.into();
        self.refresh();
    }

    /// Makes the sorted slices again (their members changed): O(members),
    /// a handful of addresses and ports on a gateway.
    fn refresh(&mut self) {
        let mut esp: Vec<IpAddr> = self
            .local
            .iter()
            .copied()
            .chain(self.nonlocal.keys().copied())
            .collect();
        esp.sort();
        esp.dedup();
        self.esp = esp.into();
        let mut p: Vec<u16> = self.ports.keys().copied().collect();
        p.sort();
        self.encap_ports = p.into();
    }
}

/// A policy's templates without a reqid.
fn reqless(p: &Policy) -> usize {
    p.tmpls.iter().filter(|t| t.reqid == 0).count()
}

/// The addresses a policy makes local: the `tmpl src` of an `out` policy,
/// the `tmpl dst` of an `in`/`fwd` one.
fn policy_addrs(p: &Policy) -> Vec<IpAddr> {
    p.tmpls
        .iter()
        .filter_map(|t| {
            if p.dir == Direction::Out {
                t.src
            } else {
                t.dst
            }
        })
        .filter(|a| !a.is_unspecified())
        .collect()
}

/// Adds `d` to `k`'s count; true if `k` came or went (the key set changed).
fn add<K: Ord + Clone>(m: &mut CMap<K, u32>, k: K, d: i64) -> bool {
    let had = m.get(&k).copied().unwrap_or(0);
    let n = i64::from(had) + d;
    if n <= 0 {
        m.remove(&k);
        had > 0
    } else {
        m.insert(k, n as u32);
        had == 0
    }
}
