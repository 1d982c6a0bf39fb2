//! What the XDP maps hold — SPIs (with their inbound/outbound bits),
//! encapsulation ports, the addresses whose ESP is ours, and the inside and
//! outside selector tries — kept up to date change by change: a batch costs
//! work for what it adds or removes, not for what is installed (40 000
//! tunnels, one rekey: three entries). [`super::control::Mirror::of`]
//! computes the same from scratch; a test holds the two to each other.
//!
//! Every table is persistent (a copy is O(1)): a change is worked out on a
//! copy, which replaces the running one only once the change went through.

use espd_core::state::{Action, CMap as PMap, Direction, Policy, SaCore, Tables};
use espd_io::steer::{SelAction, Side as XdpSide, Steering, SPI_IN, SPI_OUT};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

/// A prefix as an ordered key: (IPv6, length, masked address bits).
type PKey = (bool, u8, u128);

fn pkey(a: IpAddr, len: u8) -> PKey {
    match a {
        IpAddr::V4(v) => (false, len, mask(u128::from(v.to_bits()), len, 32)),
        IpAddr::V6(v) => (true, len, mask(v.to_bits(), len, 128)),
    }
}

fn mask(bits: u128, len: u8, width: u8) -> u128 {
    if len == 0 {
        0
    } else {
        let keep = u32::from(len.min(width));
        let all = if width == 128 {
            u128::MAX
        } else {
            (1u128 << width) - 1
        };
        // A shift by the whole width (an IPv6 /128) keeps every bit; `>>`
        // by 128 would overflow (and wrap to no shift at all in release).
        bits & (all ^ all.checked_shr(keep).unwrap_or(0))
    }
}

fn addr(k: PKey) -> IpAddr {
    if k.0 {
        IpAddr::V6(k.2.into())
    } else {
        IpAddr::V4((k.2 as u32).into())
    }
}

/// One side's selector trie as XDP sees it, and what it is made of.
#[derive(Clone, Default)]
struct Side {
    /// The destination prefix of every policy of the side's directions:
    /// what a DISCARD must not overlap to be dropped in XDP alone.
    all: imbl::OrdMap<PKey, u32>,
    /// Prefixes of picked policies: (steering ones, drop candidates).
    picked: PMap<PKey, (u32, u32)>,
    /// Drop candidates' prefixes (few: DISCARD of any source to a prefix).
    cands: imbl::OrdSet<PKey>,
    /// What the trie holds, and how many IPv4 and IPv6 prefixes.
    installed: PMap<PKey, SelAction>,
    held: [usize; 2],
    default_block: bool,
}

/// What a policy means to a side: not looked at, steered, or a candidate
/// for dropping in XDP (see [`super::inside_selectors`]).
#[derive(Clone, Copy, PartialEq)]
enum Pick {
    No,
    Steer,
    Candidate,
}

fn pick(side: usize, p: &Policy) -> Pick {
    let droppable = match side {
        0 if p.action == Action::Block => true,
        0 if !p.tmpls.is_empty() => false,
        1 if p.action == Action::Block || p.requires_protection() => true,
        _ => return Pick::No,
    };
    let s = &p.sel;
    if droppable && s.src.len == 0 && s.proto.is_none() && s.sport.is_none() && s.dport.is_none() {
        Pick::Candidate
    } else {
        Pick::Steer
    }
}

fn side_of(d: Direction) -> usize {
    if d == Direction::Out {
        0
    } else {
        1
    }
}

fn overlap(a: PKey, b: PKey) -> bool {
    if a.0 != b.0 {
        return false;
    }
    let (w, l) = (if a.0 { 128 } else { 32 }, a.1.min(b.1));
    mask(a.2, l, w) == mask(b.2, l, w)
}

impl Side {
    fn count(&mut self, p: &Policy, d: i64, touched: &mut BTreeSet<PKey>) {
        let k = pkey(p.sel.dst.addr, p.sel.dst.len);
        bump(&mut self.all, k, d);
        touched.insert(k);
        // The candidates this prefix overlaps may change their action.
        touched.extend(self.cands.iter().filter(|c| overlap(**c, k)).copied());
        let (mut s, mut c) = self.picked.get(&k).copied().unwrap_or((0, 0));
        match pick(side_of(p.dir), p) {
            Pick::No => return,
            Pick::Steer => s = (i64::from(s) + d) as u32,
            Pick::Candidate => c = (i64::from(c) + d) as u32,
        }
        if s == 0 && c == 0 {
            self.picked.remove(&k);
        } else {
            self.picked.insert(k, (s, c));
        }
        if c == 0 {
            self.cands.remove(&k);
        } else {
            self.cands.insert(k);
        }
    }

    /// Another policy's prefix overlaps `k` (or a second policy has it).
    fn overlapped(&self, k: PKey) -> bool {
        if self.all.get(&k).copied().unwrap_or(0) > 1 {
            return true;
        }
        let w = if k.0 { 128u8 } else { 32 };
        // A shorter prefix containing k.
        if (0..k.1).any(|l| self.all.contains_key(&(k.0, l, mask(k.2, l, w)))) {
            return true;
        }
        // A longer prefix inside k.
        let host = if k.1 >= w {
            0
        } else {
            (if w == 128 {
                u128::MAX
            } else {
                (1u128 << w) - 1
            }) >> k.1
        };
        (k.1 + 1..=w).any(|l| {
            self.all
                .range((k.0, l, k.2)..=(k.0, l, k.2 | host))
                .next()
                .is_some()
        })
    }

    fn want(&self, k: PKey) -> Option<SelAction> {
        if self.default_block && k.1 == 0 {
            return Some(SelAction::Steer);
        }
        match self.picked.get(&k).copied() {
            None => None,
            Some((s, _)) if s > 0 => Some(SelAction::Steer),
            Some(_) if self.overlapped(k) => Some(SelAction::Steer),
            Some(_) => Some(SelAction::Drop),
        }
    }
}

fn bump<K: Ord + Clone>(m: &mut imbl::OrdMap<K, u32>, k: K, d: i64) {
    let n = i64::from(m.get(&k).copied().unwrap_or(0)) + d;
    if n <= 0 {
        m.remove(&k);
    } else {
        m.insert(k, n as u32);
    }
}

/// The XDP maps' contents, changed incrementally, as counts. Only the
/// control side reads them: B-trees ([`espd_core::state::CMap`]), denser
/// than a hash trie's nodes.
#[derive(Clone, Default)]
pub struct Maps {
    /// SPI → how many SAs have it inbound, outbound. (What an SA counted
    /// is worked out again from its core when it goes: its SPI and ports
    /// are its own, its bit is its destination's side of `local` as it
    /// was counted. A map of SAs beside the tables' cost a B-tree insert
    /// an SA, a tenth of an install.)
    spis: PMap<u32, (u32, u32)>,
    ports: PMap<u16, u32>,
    local: Arc<[IpAddr]>,
    sides: [Side; 2],
}

/// What one change does to the maps: written before the workers switch,
/// removed after.
#[derive(Default, Debug)]
pub struct Plan {
    pub spis: Vec<(u32, u8)>,
    pub ports: Vec<u16>,
    pub sels: [Vec<(IpAddr, u8, SelAction)>; 2],
    pub local: Vec<IpAddr>,
    pub stale_spis: Vec<u32>,
    pub stale_ports: Vec<u16>,
    pub stale_sels: [Vec<(IpAddr, u8)>; 2],
    pub stale_local: Vec<IpAddr>,
}

impl Plan {
    /// A change's first half : what is new or changed.
    pub fn add(&self, steer: &mut Steering) -> anyhow::Result<()> {
        steer.add_local(self.local.iter().copied())?;
        steer.add_spis(self.spis.iter().copied())?;
        steer.add_encap_ports(self.ports.iter().copied())?;
        steer.add_selectors(XdpSide::Inside, self.sels[0].iter().copied())?;
        steer.add_selectors(XdpSide::Outside, self.sels[1].iter().copied())?;
        Ok(())
    }

    /// Its second half, once the workers run on the change: what went.
    pub fn remove(&self, steer: &mut Steering) -> anyhow::Result<()> {
        steer.remove_spis(self.stale_spis.iter().copied())?;
        steer.remove_encap_ports(self.stale_ports.iter().copied())?;
        steer.remove_selectors(XdpSide::Inside, self.stale_sels[0].iter().copied())?;
        steer.remove_selectors(XdpSide::Outside, self.stale_sels[1].iter().copied())?;
        steer.remove_local(self.stale_local.iter().copied())?;
        Ok(())
    }
}

/// One change a batch made to the tables (an update is a removal and an
/// addition), in batch order.
pub enum Change {
    SaAdded(Arc<SaCore>),
    SaRemoved(Arc<SaCore>),
    PolicyAdded(Arc<Policy>),
    PolicyRemoved(Arc<Policy>),
    /// `policy update`: the old and the new (the guard keeps its rank).
    PolicyUpdated(Arc<Policy>, Arc<Policy>),
}

/// What a batch does to the outbound sequence store, once it went through.
pub enum SeqOp {
    /// A new outbound SA (and whether it continued a record).
    Record(super::seqstore::NewRecord, bool),
    Updated(super::seqstore::NewRecord),
    Forget(IpAddr, u32),
}

/// The changes a batch made, as the maps, the guard and the sequence
/// store need them.
#[derive(Default)]
pub struct Delta {
    pub changes: Vec<Change>,
    pub seqs: Vec<SeqOp>,
}

impl Delta {
    /// The policies removed and added, in order (an update is the old
    /// one removed, then the new added).
    pub fn policies(&self) -> impl Iterator<Item = (bool, &Arc<Policy>)> {
        self.changes
            .iter()
            .flat_map(|c| match c {
                Change::PolicyAdded(p) => [Some((true, p)), None],
                Change::PolicyRemoved(p) => [Some((false, p)), None],
                Change::PolicyUpdated(old, new) => [Some((false, old)), Some((true, new))],
                _ => [None, None],
            })
            .flatten()
    }

    /// The policy changes as the guard stages them (updates as such).
    pub fn policy_steps(&self) -> impl Iterator<Item = super::guard::Step<'_>> {
        use super::guard::Step;
        self.changes.iter().filter_map(|c| match c {
            Change::PolicyAdded(p) => Some(Step::Add(p)),
            Change::PolicyRemoved(p) => Some(Step::Remove(p)),
            Change::PolicyUpdated(old, new) => Some(Step::Update(old, new)),
            _ => None,
        })
    }
}

impl Maps {
    /// Applies `d` (the tables are `t` after it); the plan to carry out.
    pub fn apply(&mut self, d: &Delta, t: &Tables) -> Plan {
        let mut plan = Plan::default();
        // Where ESP is ours: when that changes, every SA's bit may (rare:
        // an address of the gateway's comes or goes).
        let esp = t.esp_local();
        let relabel = *esp != *self.local;
        if relabel {
            let (old, new): (BTreeSet<IpAddr>, BTreeSet<IpAddr>) = (
                self.local.iter().copied().collect(),
                esp.iter().copied().collect(),
            );
            plan.local = new.difference(&old).copied().collect();
            plan.stale_local = old.difference(&new).copied().collect();
        }
        // Where ESP was ours when the SAs there before this change were
        // counted (those it adds are counted by where it is ours after it).
        let before = std::mem::replace(&mut self.local, esp.into());
        // With `local` changed, the SAs this change adds (by identity): the
        // others were counted by `before`.
        let added: std::collections::HashSet<*const SaCore> = if relabel {
            d.changes
                .iter()
                .filter_map(|c| match c {
                    Change::SaAdded(c) => Some(Arc::as_ptr(c)),
                    _ => None,
                })
                .collect()
        } else {
            Default::default()
        };
        let counted = |c: &Arc<SaCore>| {
            if relabel && !added.contains(&Arc::as_ptr(c)) {
                &before[..]
            } else {
                esp
            }
        };
        // Each SPI touched, with its counts after the change (kept as they
        // are counted: no second walk of the map for the plan).
        let mut spis_touched = BTreeMap::new();
        let mut ports_touched = BTreeSet::new();
        let bit_of = |c: &SaCore, esp: &[IpAddr]| {
            if esp.binary_search(&c.cfg.dst).is_ok() {
                SPI_IN
            } else {
                SPI_OUT
            }
        };
        let mut touched: [BTreeSet<PKey>; 2] = Default::default();
        for ch in &d.changes {
            match ch {
                Change::SaRemoved(c) => {
                    let (spi, bit) = (c.cfg.spi, bit_of(c, counted(c)));
                    spis_touched.insert(spi, self.count_spi(spi, bit, -1));
                    if let Some(e) = c.cfg.encap {
                        for p in [e.sport, e.dport] {
                            self.count_port(p, -1);
                            ports_touched.insert(p);
                        }
                    }
                }
                Change::SaAdded(c) => {
                    let bit = bit_of(c, esp);
                    let ports = c.cfg.encap.map(|e| (e.sport, e.dport));
                    spis_touched.insert(c.cfg.spi, self.count_spi(c.cfg.spi, bit, 1));
                    if let Some((a, b)) = ports {
                        for p in [a, b] {
                            self.count_port(p, 1);
                            ports_touched.insert(p);
                        }
                    }
                }
                Change::PolicyRemoved(p) => {
                    let s = side_of(p.dir);
                    self.sides[s].count(p, -1, &mut touched[s]);
                }
                Change::PolicyAdded(p) => {
                    let s = side_of(p.dir);
                    self.sides[s].count(p, 1, &mut touched[s]);
                }
                Change::PolicyUpdated(old, new) => {
                    let s = side_of(new.dir);
                    self.sides[s].count(old, -1, &mut touched[s]);
                    self.sides[s].count(new, 1, &mut touched[s]);
                }
            }
        }
        if relabel {
            // Every SA counted by `before` whose side changed moves.
            for c in t.sad().iter() {
                let (old, bit) = (bit_of(c, counted(c)), bit_of(c, esp));
                if old != bit {
                    let spi = c.cfg.spi;
                    self.count_spi(spi, old, -1);
                    spis_touched.insert(spi, self.count_spi(spi, bit, 1));
                }
            }
        }
        for (spi, (i, o)) in spis_touched {
            if i == 0 && o == 0 {
                plan.stale_spis.push(spi);
            } else {
                plan.spis.push((
                    spi,
                    if i > 0 { SPI_IN } else { 0 } | if o > 0 { SPI_OUT } else { 0 },
                ));
            }
        }
        for p in ports_touched {
            if self.ports.contains_key(&p) {
                plan.ports.push(p);
            } else {
                plan.stale_ports.push(p);
            }
        }
        // Selectors.
        let defaults = [
            t.spd().default_action(Direction::Out) == Action::Block,
            [Direction::In, Direction::Fwd]
                .iter()
                .any(|d| t.spd().default_action(*d) == Action::Block),
        ];
        for s in 0..2 {
            if defaults[s] != self.sides[s].default_block {
                self.sides[s].default_block = defaults[s];
                touched[s].insert((false, 0, 0));
                touched[s].insert((true, 0, 0));
            }
            for &k in &touched[s] {
                let side = &mut self.sides[s];
                let want = side.want(k);
                let have = side.installed.get(&k).copied();
                match (want, have) {
                    (Some(w), h) if h != Some(w) => {
                        side.installed.insert(k, w);
                        side.held[usize::from(k.0)] += usize::from(h.is_none());
                        plan.sels[s].push((addr(k), k.1, w));
                    }
                    (None, Some(_)) => {
                        side.installed.remove(&k);
                        side.held[usize::from(k.0)] -= 1;
                        plan.stale_sels[s].push((addr(k), k.1));
                    }
                    _ => {}
                }
            }
        }
        plan
    }

    /// Refuses what the XDP maps cannot hold, before anything is written.
    pub fn check_limits(&self) -> Result<(), String> {
        use espd_io::{MAX_ENCAP_PORTS, MAX_LOCAL, MAX_SELECTORS, MAX_SPIS};
        if self.spis.len() > MAX_SPIS as usize {
            return Err(format!(
                "the change needs {} SPIs in XDP, which holds at most {MAX_SPIS}",
                self.spis.len()
            ));
        }
        if self.ports.len() > MAX_ENCAP_PORTS as usize {
            return Err(format!(
                "the change needs {} encapsulation ports, XDP holds at most {MAX_ENCAP_PORTS}",
                self.ports.len()
            ));
        }
        if self.local.len() > MAX_LOCAL as usize {
            return Err(format!("more than {MAX_LOCAL} local addresses"));
        }
        for (s, name) in self.sides.iter().zip(["inside", "outside"]) {
            for v6 in [false, true] {
                let n = s.held[usize::from(v6)];
                if n > MAX_SELECTORS as usize {
                    return Err(format!(
                        "the change needs {n} {name} IPv{} prefixes in XDP, which holds at most {MAX_SELECTORS}",
                        if v6 { 6 } else { 4 }
                    ));
                }
            }
        }
        Ok(())
    }

    /// Counts an SA with `spi` in (`d` 1) or out (-1); its counts after.
    fn count_spi(&mut self, spi: u32, bit: u8, d: i64) -> (u32, u32) {
        let (mut i, mut o) = self.spis.get(&spi).copied().unwrap_or((0, 0));
        let f = |x: u32| (i64::from(x) + d).max(0) as u32;
        if bit == SPI_IN {
            i = f(i);
        } else {
            o = f(o);
        }
        if i == 0 && o == 0 {
            self.spis.remove(&spi);
        } else {
            self.spis.insert(spi, (i, o));
        }
        (i, o)
    }

    fn count_port(&mut self, p: u16, d: i64) {
        let n = i64::from(self.ports.get(&p).copied().unwrap_or(0)) + d;
        if n <= 0 {
            self.ports.remove(&p);
        } else {
            self.ports.insert(p, n as u32);
        }
    }

    /// The maps' contents as [`Mirror`] has them.
    #[cfg(test)]
    pub fn as_mirror(&self) -> Mirror {
        let mut m = Mirror::default();
        for (spi, (i, o)) in self.spis.iter() {
            m.spis.insert(
                *spi,
                if *i > 0 { SPI_IN } else { 0 } | if *o > 0 { SPI_OUT } else { 0 },
            );
        }
        m.ports = self.ports.keys().copied().collect();
        let sels = |s: &Side| {
            let mut v: Vec<(IpAddr, u8, SelAction)> = s
                .installed
                .iter()
                .map(|(k, a)| (addr(*k), k.1, *a))
                .collect();
            v.sort_by_key(|(a, l, act)| (*a, *l, *act == SelAction::Drop));
            v
        };
        m.sels = sels(&self.sides[0]);
        m.in_sels = sels(&self.sides[1]);
        m.local = self.local.iter().copied().collect();
        m
    }
}

/// Applies one checked change to the tables `t`, and records it in `d`
/// for the maps and the guard; the SA's id for an SA added or updated.
pub fn apply_op(
    t: &mut Tables,
    op: espd_config::db::Op,
    d: &mut Delta,
) -> Result<Option<espd_core::state::SaId>, String> {
    use espd_config::db::Op;
    match op {
        Op::AddSa(core) => {
            let (dst, spi) = (core.cfg.dst, core.cfg.spi);
            let id = t
                .insert_sa(core)
                .map_err(|_| format!("state dst {dst} spi 0x{spi:08x} exists already"))?;
            d.changes
                .push(Change::SaAdded(t.sad().core(id).expect("added").clone()));
            Ok(Some(id))
        }
        Op::UpdateSa(core) => {
            let (dst, spi) = (core.cfg.dst, core.cfg.spi);
            let (id, old) = t
                .update_sa(core)
                .map_err(|_| format!("no state dst {dst} spi 0x{spi:08x}"))?;
            d.changes.push(Change::SaRemoved(old));
            d.changes
                .push(Change::SaAdded(t.sad().core(id).expect("updated").clone()));
            Ok(Some(id))
        }
        Op::DelSa(dst, spi) => {
            let (_, old) = t
                .remove_sa(dst, spi)
                .ok_or_else(|| format!("no state dst {dst} spi 0x{spi:08x}"))?;
            d.changes.push(Change::SaRemoved(old));
            Ok(None)
        }
        Op::AddPolicy(p) => {
            let p = Arc::new(p);
            // The SPD keeps this Arc, and the guard the same one.
            t.insert_policy(Arc::clone(&p))
                .map_err(|_| "a policy exists already".to_string())?;
            d.changes.push(Change::PolicyAdded(p));
            Ok(None)
        }
        Op::UpdatePolicy(p) => {
            let p = Arc::new(p);
            let old = t.update_policy(Arc::clone(&p)).ok_or("no such policy")?;
            d.changes.push(Change::PolicyUpdated(old, p));
            Ok(None)
        }
        Op::DelPolicy(dir, sel) => {
            let old = t.remove_policy(dir, &sel).ok_or("no such policy")?;
            d.changes.push(Change::PolicyRemoved(old));
            Ok(None)
        }
        Op::Default(dir, a) => {
            t.set_default(dir, a);
            Ok(None)
        }
    }
}

/// The delta of a whole configuration (everything added), for the start.
pub fn everything(t: &Tables) -> Delta {
    let mut d = Delta {
        changes: t.sad().iter().cloned().map(Change::SaAdded).collect(),
        seqs: Vec::new(),
    };
    for dir in Direction::ALL {
        d.changes.extend(
            t.spd()
                .policies(dir)
                .into_iter()
                .map(|p| Change::PolicyAdded(Arc::new(p.clone()))),
        );
    }
    d
}

#[cfg(test)]
use super::{inside_selectors, outside_selectors};
#[cfg(test)]
use espd_config::Config;

/// What the XDP maps must hold for a configuration, computed from scratch:
/// the reference the incremental [`Maps`] are tested against.
#[cfg(test)]
#[derive(Default, PartialEq)]
pub struct Mirror {
    /// SPI → [`SPI_IN`] | [`SPI_OUT`].
    pub spis: BTreeMap<u32, u8>,
    pub ports: BTreeSet<u16>,
    /// Inside program: destination prefixes of outbound PROTECT/DISCARD policies.
    pub sels: Vec<(IpAddr, u8, SelAction)>,
    /// Outside program: destination prefixes of in/fwd PROTECT/DISCARD policies.
    pub in_sels: Vec<(IpAddr, u8, SelAction)>,
    /// Addresses whose ESP is ours ([`espd_core::engine::esp_addrs`]): the
    /// host's own and the inbound SAs' destinations.
    pub local: BTreeSet<IpAddr>,
}

#[cfg(test)]
impl Mirror {
    /// The maps for `cfg` on a host with addresses `host`. An SPI is
    /// inbound when its SA's destination is one of ours, as the engine
    /// decides it, so XDP and the engine agree on whose ESP is ours.
    pub fn of(cfg: &Config, host: &[IpAddr]) -> Mirror {
        let local = espd_core::engine::local_addrs(&cfg.spd, host);
        let esp = espd_core::engine::esp_addrs(&cfg.sad, &local);
        let mut spis = BTreeMap::new();
        for sa in cfg.sad.iter() {
            let bit = if esp.binary_search(&sa.cfg.dst).is_ok() {
                SPI_IN
            } else {
                SPI_OUT
            };
            *spis.entry(sa.cfg.spi).or_insert(0) |= bit;
        }
        Mirror {
            spis,
            ports: cfg
                .sad
                .iter()
                .filter_map(|sa| sa.cfg.encap)
                .flat_map(|e| [e.sport, e.dport])
                .collect(),
            sels: inside_selectors(cfg),
            in_sels: outside_selectors(cfg),
            local: esp.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use espd_config::Config;

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[test]
    fn prefix_keys_keep_exactly_their_bits() {
        let k = |a: &str, l| addr(pkey(a.parse().unwrap(), l)).to_string();
        // A host route of either family is the host (an IPv6 /128 once
        // became ::/128 here: a road-warrior's IPv6 address went unsteered).
        assert_eq!(k("2001:db8:100::1", 128), "2001:db8:100::1");
        assert_eq!(k("198.18.100.1", 32), "198.18.100.1");
        assert_eq!(k("2001:db8:100::1", 64), "2001:db8:100::");
        assert_eq!(k("2001:db8:100::1", 127), "2001:db8:100::");
        assert_eq!(k("198.18.100.77", 24), "198.18.100.0");
        assert_eq!(k("2001:db8::1", 0), "::");
    }

    /// Random batches applied incrementally give, after every batch, the
    /// maps computed from the whole configuration.
    #[test]
    fn incremental_maps_match_the_whole_configuration() {
        let mut r = Rng(0x5eed_1234_abcd_0001);
        let mut t = Tables::default();
        let mut maps = Maps::default();
        let key = "0x0101010101010101010101010101010101010101";
        let lens = [0u8, 16, 24, 32];
        let (mut applied, mut drops, mut sas) = (0, 0, 0);
        for step in 0..600 {
            // Batches of one to four lines, and sometimes an SA the batch
            // added deleted again in it: what a change counts and uncounts
            // within one batch, around a change of where ESP is ours.
            let mut lines = Vec::new();
            for _ in 0..1 + r.below(4) {
                let line = match r.below(5) {
                    0 | 1 => {
                        let (spi, dst) = (0x100 + r.below(12), r.below(4));
                        let encap = if r.below(3) == 0 {
                            " encap espinudp 4500 4501 0.0.0.0"
                        } else {
                            ""
                        };
                        let (src, dst) = if r.below(2) == 0 {
                            ("198.18.0.1".to_string(), format!("198.18.9.{dst}"))
                        } else {
                            (format!("198.18.9.{dst}"), "198.18.0.1".to_string())
                        };
                        format!("state add src {src} dst {dst} proto esp spi {spi:#x} mode tunnel aead 'rfc4106(gcm(aes))' {key} 128{encap}")
                    }
                    2 => {
                        let dir = ["in", "out", "fwd"][r.below(3) as usize];
                        let act = [
                            "action block",
                            "tmpl src 198.18.0.1 dst 198.18.9.1 proto esp mode tunnel",
                            "",
                        ][r.below(3) as usize];
                        let src = if r.below(2) == 0 {
                            "0.0.0.0/0".to_string()
                        } else {
                            "198.18.4.0/24".to_string()
                        };
                        format!(
                            "policy add src {src} dst 198.19.{}.0/{} dir {dir} {act}",
                            r.below(3),
                            lens[r.below(4) as usize]
                        )
                    }
                    3 => "policy setdefault out block".to_string(),
                    _ => {
                        // Delete something that exists.
                        let states: Vec<_> =
                            t.sad().iter().map(|c| (c.cfg.dst, c.cfg.spi)).collect();
                        if !states.is_empty() && r.below(2) == 0 {
                            let (d, s) = states[r.below(states.len() as u64) as usize];
                            format!("state delete dst {d} spi {s:#x}")
                        } else {
                            let lines = espd_config::db::policy_lines(t.spd());
                            match lines.iter().find(|l| l.starts_with("policy add")) {
                                Some(l) => l
                                    .replacen("policy add", "policy delete", 1)
                                    .split(" tmpl ")
                                    .next()
                                    .unwrap()
                                    .split(" action ")
                                    .next()
                                    .unwrap()
                                    .to_string(),
                                None => continue,
                            }
                        }
                    }
                };
                lines.push(line);
            }
            if r.below(3) == 0 {
                if let Some(add) = lines.iter().find(|l| l.starts_with("state add")) {
                    let w: Vec<&str> = add.split_whitespace().collect();
                    lines.push(format!("state delete dst {} spi {}", w[5], w[9]));
                }
            }
            let line = lines.join("\n");
            let Ok((_, ops)) = espd_config::db::apply("b", &line, t.sad(), t.spd()) else {
                continue;
            };
            applied += 1;
            let mut d = Delta::default();
            for op in ops {
                apply_op(&mut t, op, &mut d).unwrap();
            }
            maps.apply(&d, &t);
            let cfg = Config {
                sad: t.sad().clone(),
                spd: t.spd().clone(),
            };
            let whole = Mirror::of(&cfg, &[]);
            let inc = maps.as_mirror();
            drops += inc
                .sels
                .iter()
                .chain(&inc.in_sels)
                .filter(|s| s.2 == SelAction::Drop)
                .count();
            sas = sas.max(inc.spis.len());
            assert!(inc == whole, "step {step} `{line}`:\n inc spis {:?} sels {:?} in {:?} local {:?}\n all spis {:?} sels {:?} in {:?} local {:?}",
                inc.spis, inc.sels, inc.in_sels, inc.local, whole.spis, whole.sels, whole.in_sels, whole.local);
        }
        // The sequence did what it is for: most lines applied, XDP drops and SPIs seen.
        assert!(
            applied > 150 && drops > 0 && sas > 3,
            "{applied} {drops} {sas}"
        );
    }
}

#[cfg(test)]
mod memory {
    use std::collections::BTreeMap;

    /// Resident memory now, in KiB.
    fn rss() -> i64 {
        let s = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: i64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4
    }

    extern "C" {
        /// mimalloc's main heap (v3; libmimalloc-sys binds it for v2 only).
        fn mi_heap_main() -> *mut libmimalloc_sys::mi_heap_t;
    }

    /// The heap's pages by size class: block size → (blocks in use,
    /// octets committed to its pages), as mimalloc counts them. Blocks in
    /// use, unlike RSS, are blind to pages freed and reused, so the parts
    /// add up and a run repeats to the block; what is committed beyond them
    /// is what RSS holds beyond the live heap.
    fn areas() -> BTreeMap<usize, (usize, usize)> {
        unsafe extern "C" fn visit(
            _heap: *const libmimalloc_sys::mi_heap_t,
            area: *const libmimalloc_sys::mi_heap_area_t,
            _block: *mut core::ffi::c_void,
            _size: usize,
            arg: *mut core::ffi::c_void,
        ) -> bool {
            // SAFETY: `arg` is the map `areas` passes, borrowed mutably
            // for the call; `area` is valid for the visit (mimalloc's
            // contract), and only read.
            let (m, a) = unsafe { (&mut *arg.cast::<BTreeMap<usize, (usize, usize)>>(), &*area) };
            let e = m.entry(a.block_size).or_default();
            e.0 += a.used;
            e.1 += a.committed;
            true
        }
        let mut m = BTreeMap::new();
        // SAFETY: the main heap exists for the process's life, and the
        // visitor only adds to `m`, which outlives the call. (Each of these
        // tests is run alone by name: another thread allocating meanwhile
        // could at worst skew a count.)
        unsafe {
            libmimalloc_sys::mi_heap_visit_blocks(
                mi_heap_main(),
                false,
                Some(visit),
                (&mut m as *mut BTreeMap<usize, (usize, usize)>).cast(),
            );
        }
        m
    }

    /// The heap's live blocks by size class (block size → blocks in use).
    fn live() -> BTreeMap<usize, usize> {
        areas()
            .into_iter()
            .map(|(size, (used, _))| (size, used))
            .collect()
    }

    /// The live heap that came between `a` and `b`, in KiB per tunnel,
    /// printed with the size classes that grew by more than 3 000 blocks.
    fn grew(part: &str, a: &BTreeMap<usize, usize>, b: &BTreeMap<usize, usize>, n: u32) -> f64 {
        let mut octets = 0i64;
        let mut classes = String::new();
        for (size, now) in b {
            let d = *now as i64 - a.get(size).copied().unwrap_or(0) as i64;
            octets += d * *size as i64;
            if d.abs() > 3000 {
                classes += &format!(" {size}×{d}");
            }
        }
        let per = octets as f64 / 1024.0 / f64::from(n);
        eprintln!("  {part}: {per:.2} KiB a tunnel (octets×blocks:{classes})");
        per
    }

    /// What each part of the control side costs per tunnel, as live heap
    /// (run by hand: `cargo test --release -p espd --bin espd
    /// per_tunnel_memory -- --ignored --nocapture`, one test at a time).
    #[test]
    #[ignore]
    fn per_tunnel_memory_by_part() {
        use super::*;
        let n = 100_000u32;
        let key = "0x1111111111111111111111111111111111111111";
        let mut text = String::new();
        for i in 0..n {
            let peer = format!("198.18.{}.{}", 200 + (i >> 8) % 50, (i & 255).max(1));
            let (a, b) = ((i >> 6) & 255, (i & 63) << 2);
            text.push_str(&format!("state add src 198.18.0.1 dst {peer} proto esp spi {:#x} reqid {} mode tunnel aead 'rfc4106(gcm(aes))' {key} 128\n", 0x1000_0000 + i, i + 100));
            text.push_str(&format!("policy add src 198.19.{}.0/30 dst 198.19.{a}.{b}/30 dir out priority 100 tmpl src 198.18.0.1 dst {peer} proto esp reqid {} mode tunnel\n", 128 + ((i >> 14) & 127), i + 100));
        }
        let r0 = rss();
        let l0 = live();
        let mut t = Tables::default();
        t.set_extra(&["198.18.0.1".parse().unwrap()]);
        let (_, ops) = espd_config::db::apply("big", &text, t.sad(), t.spd()).unwrap();
        drop(text);
        let l1 = live();
        let mut d = Delta::default();
        let (sas, pols): (Vec<_>, Vec<_>) = ops
            .into_iter()
            .partition(|o| matches!(o, espd_config::db::Op::AddSa(_)));
        for op in sas {
            apply_op(&mut t, op, &mut d).unwrap();
        }
        let l2 = live();
        for op in pols {
            apply_op(&mut t, op, &mut d).unwrap();
        }
        let l3 = live();
        let mut maps = Maps::default();
        maps.apply(&d, &t);
        let l4 = live();
        let mut c = super::super::guard::Contrib::default();
        c.stage(d.policy_steps());
        let l5 = live();
        drop(d);
        let l6 = live();
        let r6 = rss();
        eprintln!("KiB of live heap per tunnel at {n} tunnels, by part:");
        grew(
            "the SAs (configuration and keys) and policies a batch made",
            &l0,
            &l1,
            n,
        );
        grew("the SAD's indexes", &l1, &l2, n);
        grew("the SPD (the policies' Arcs and indexes)", &l2, &l3, n);
        grew("XDP maps mirror", &l3, &l4, n);
        grew("guard", &l4, &l5, n);
        grew("delta, freed", &l5, &l6, n);
        let total = grew("total", &l0, &l6, n);
        eprintln!(
            "total {total:.2} KiB of live heap, {:.2} KiB of RSS a tunnel",
            (r6 - r0) as f64 / f64::from(n)
        );
    }

    /// The same tunnels installed as the gateway gets them from a client:
    /// in batches of 5 000, each applied to a copy that then replaces the
    /// tables, the old version freed (run by hand, as above).
    #[test]
    #[ignore]
    fn per_tunnel_memory_in_batches() {
        use super::*;
        let n = 100_000u32;
        let key = "0x1111111111111111111111111111111111111111";
        let line = |i: u32| {
            let peer = format!("198.18.{}.{}", 200 + (i >> 8) % 50, (i & 255).max(1));
            let (a, b) = ((i >> 6) & 255, (i & 63) << 2);
            format!("state add src 198.18.0.1 dst {peer} proto esp spi {:#x} reqid {} mode tunnel aead 'rfc4106(gcm(aes))' {key} 128\npolicy add src 198.19.{}.0/30 dst 198.19.{a}.{b}/30 dir out priority 100 tmpl src 198.18.0.1 dst {peer} proto esp reqid {} mode tunnel\n", 0x1000_0000 + i, i + 100, 128 + ((i >> 14) & 127), i + 100)
        };
        let mut t = Tables::default();
        t.set_extra(&["198.18.0.1".parse().unwrap()]);
        let mut maps = Maps::default();
        let mut contrib = super::super::guard::Contrib::default();
        let (r0, l0) = (rss(), live());
        for b in 0..n / 5000 {
            let batch: String = (0..5000).map(|k| line(b * 5000 + k)).collect();
            let mut t2 = t.clone();
            let (_, ops) = espd_config::db::apply("batch", &batch, t2.sad(), t2.spd()).unwrap();
            let mut d = Delta::default();
            for op in ops {
                apply_op(&mut t2, op, &mut d).unwrap();
            }
            let mut maps2 = maps.clone();
            let _plan = maps2.apply(&d, &t2);
            let mut c2 = contrib.clone();
            let _keys = c2.stage(d.policy_steps());
            (t, maps, contrib) = (t2, maps2, c2);
        }
        let (r1, l1) = (rss(), live());
        eprintln!("installed in batches of 5 000:");
        let total = grew("total", &l0, &l1, n);
        eprintln!(
            "total {total:.2} KiB of live heap, {:.2} KiB of RSS a tunnel",
            (r1 - r0) as f64 / f64::from(n)
        );
        let t = std::time::Instant::now();
        super::super::heap::give_back();
        let took = t.elapsed();
        let t = std::time::Instant::now();
        super::super::heap::give_back();
        eprintln!(
            "after a collect (gateway/heap.rs, {took:?}; again: {:?}): {:.2} KiB of RSS a tunnel",
            t.elapsed(),
            (rss() - r0) as f64 / f64::from(n)
        );
        let (mut u, mut c) = (0, 0);
        for (size, (blocks, committed)) in areas() {
            let used = blocks * size;
            u += used;
            c += committed;
            if committed - used > 1 << 20 {
                eprintln!(
                    "  class {size}: {:.1} MiB live, {:.1} MiB committed",
                    used as f64 / 1048576.0,
                    committed as f64 / 1048576.0
                );
            }
        }
        eprintln!(
            "pages: {:.1} MiB live, {:.1} MiB committed",
            u as f64 / 1048576.0,
            c as f64 / 1048576.0
        );
    }

    /// What a batch of 5 000 SAs costs, phase by phase, with 100 000
    /// tunnels installed: the control side of #13's install rate, in one
    /// process (run by hand: `cargo test --release -p espd install_phases
    /// -- --ignored --nocapture`; `ESPD_PHASE_N` sets the tunnels,
    /// `ESPD_PHASE_BATCHES` the batches of 5 000 timed).
    #[test]
    #[ignore]
    fn install_phases() {
        use super::*;
        use std::time::Instant;
        let n: u32 = std::env::var("ESPD_PHASE_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let key = "0x1111111111111111111111111111111111111111";
        let sa = |i: u32| {
            let peer = format!("198.18.{}.{}", 200 + (i >> 8) % 50, (i & 255).max(1));
            format!("state add src 198.18.0.1 dst {peer} proto esp spi {:#x} reqid {} mode tunnel aead 'rfc4106(gcm(aes))' {key} 128\n", 0x1000_0000 + i, i + 100)
        };
        let mut text = String::new();
        for i in 0..n {
            let (a, b) = ((i >> 6) & 255, (i & 63) << 2);
            let peer = format!("198.18.{}.{}", 200 + (i >> 8) % 50, (i & 255).max(1));
            text.push_str(&sa(i));
            text.push_str(&format!("policy add src 198.19.{}.0/30 dst 198.19.{a}.{b}/30 dir out priority 100 tmpl src 198.18.0.1 dst {peer} proto esp reqid {} mode tunnel\n", 128 + ((i >> 14) & 127), i + 100));
        }
        let mut t = Tables::default();
        t.set_extra(&["198.18.0.1".parse().unwrap()]);
        let mut maps = Maps::default();
        let mut contrib = super::super::guard::Contrib::default();
        let (_, ops) = espd_config::db::apply("big", &text, t.sad(), t.spd()).unwrap();
        let mut d = Delta::default();
        for op in ops {
            apply_op(&mut t, op, &mut d).unwrap();
        }
        maps.apply(&d, &t);
        contrib.stage(d.policy_steps());
        let mut totals = [0f64; 4];
        // ESPD_PHASE_BATCHES: more batches, for a profile of the timed part.
        let batches: u32 = std::env::var("ESPD_PHASE_BATCHES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10);
        for b in 0..batches {
            let batch: String = (0..5000).map(|k| sa(2_000_000 + b * 5000 + k)).collect();
            let t0 = Instant::now();
            let mut t2 = t.clone();
            let mut d = Delta::default();
            // As the gateway applies a batch: each line's change as soon as
            // it is checked (db::apply_each), the lines parsed ahead on a
            // helper thread.
            espd_config::db::apply_each("batch", &batch, t.sad(), t.spd(), |op| {
                apply_op(&mut t2, op, &mut d).map(|_| ())
            })
            .unwrap();
            let t1 = Instant::now();
            let mut maps2 = maps.clone();
            let _plan = maps2.apply(&d, &t2);
            let t4 = Instant::now();
            let mut c2 = contrib.clone();
            let _keys = c2.stage(d.policy_steps());
            let t5 = Instant::now();
            (t, maps, contrib) = (t2, maps2, c2);
            drop(d);
            let t6 = Instant::now();
            for (k, (a, z)) in [(t0, t1), (t1, t4), (t4, t5), (t5, t6)]
                .into_iter()
                .enumerate()
            {
                totals[k] += (z - a).as_secs_f64() * 1e6 / 5000.0 / f64::from(batches);
            }
        }
        eprintln!(
            "µs per SA at {n} tunnels: lines checked + keys + tables {:.2}, XDP plan {:.2}, guard {:.2}, old versions dropped {:.2}; total {:.2} ({:.0} SAs/s)",
            totals[0], totals[1], totals[2], totals[3],
            totals.iter().sum::<f64>(),
            1e6 / totals.iter().sum::<f64>()
        );
    }
}
