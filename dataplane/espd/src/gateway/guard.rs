//! The fail-closed guard: espd's SPD mirrored into the kernel's XFRM policy
//! table, so that what a PROTECT policy selects is dropped by Linux — never
//! forwarded in clear, never accepted in clear — whenever espd is not there
//! to handle it: while it starts, after SIGTERM, SIGKILL, a crash or a failed
//! attach (RFC 4301 §4.4.1: the SPD is consulted for all traffic crossing
//! the boundary, and §5: a packet with no usable SA is discarded).
//!
//! Why XFRM policies (docs/architecture.md, "The guard"): they are the
//! kernel's own SPD, they outlive the process without a pinned program or a
//! helper, `ip xfrm policy` shows them, and with no SA installed a template
//! makes the kernel drop exactly what the policy selects, in both
//! directions — how strongSwan's trap policies fail closed. While espd runs,
//! XDP takes the selected traffic before the kernel sees it, so the guard
//! costs nothing on the data path.
//!
//! It changes make-before-break with the configuration: entries that
//! protect or block go in before the workers run on a change, entries that
//! loosen (BYPASS, a deleted policy) only after. Only `espd down` lifts it.
//!
//! A change touches only the kernel entries of the policies it adds,
//! updates or deletes ([`Guard::stage`]): each kernel key keeps the espd
//! policies that map to it, and the first by priority is what the kernel
//! holds — the cost of a change does not grow with the number of policies.

use espd_config::Config;
use espd_core::state::PMap;
use espd_core::state::{Action, Direction, Level, Mode, Policy, PortRange};
use espd_io::xfrm::{self, Dir, KPolicy, KSelector, KTmpl, Xfrm};
#[cfg(test)]
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Kernel policies one espd policy may become (port ranges split into
/// aligned blocks); past that a PROTECT or DISCARD policy is widened to any
/// port of its protocol (stricter, never looser) and a BYPASS is left out.
const MAX_SPLIT: usize = 16;

/// A kernel key: direction and selector.
pub type Key = (Dir, KSelector);

/// An espd policy's identity: its direction and selector.
type PolicyId = (u8, espd_core::state::Selector);
/// A contribution's rank among those to one key: (priority, order).
type Rank = (u32, u64);

/// One policy change, as [`Contrib::stage`] takes it.
#[derive(Clone, Copy)]
pub enum Step<'a> {
    Add(&'a Arc<Policy>),
    Remove(&'a Arc<Policy>),
    /// `policy update`: the old policy and the new, same direction and
    /// selector. The SPD keeps an updated policy's place among equal
    /// priorities ([`espd_core::state::Spd::update`]), and so does the
    /// guard: otherwise, where two policies of one priority map to one
    /// kernel key, an update of the first would hand the kernel entry to
    /// the second while the engine still obeys the first.
    Update(&'a Arc<Policy>, &'a Arc<Policy>),
}

/// How the guard's entries are shaped when espd serves this host's own
/// traffic (`espd run --host`, docs/architecture.md "The host path"):
/// locally sent packets are routed into the host device and must not meet
/// an outbound entry on the way (it would drop them before espd sees them),
/// and packets espd delivers through it must pass the inbound entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostShape {
    /// The outside interface's index: outbound entries match only packets
    /// routed out of it (IPv4 sets the flow's output device from the route
    /// before the XFRM lookup; IPv6 leaves it 0 unless the socket is bound,
    /// so for IPv6 the host routes' `prohibit` entries are the guard).
    pub outside: u32,
}

/// The espd policies that map to kernel keys (persistent: a copy is O(1),
/// so a change is staged on a copy and kept only if it goes through).
///
/// It holds the policies themselves (`Arc`s shared with the SPD), not the
/// kernel entries they make: an entry is worked out again from its policy
/// when it is put, which is rare beside holding 100 000 of them (this took
/// the guard's part of a tunnel from about 0.6 KiB to a third of it;
/// docs/performance.md).
#[derive(Clone, Default)]
pub struct Contrib {
    /// Key → the espd policies that map to it, by (priority, order). The
    /// only map: a policy is taken out through the keys it makes (the
    /// policy a change removes is the one staged, the SPD's own `Arc`).
    by_key: PMap<Key, Ranked>,
    next: u64,
    host: Option<HostShape>,
}

/// The policies that map to one key, first by rank: almost always one,
/// kept inline.
#[derive(Clone)]
enum Ranked {
    One(Rank, Arc<Policy>),
    Many(Arc<[(Rank, Arc<Policy>)]>),
}

impl Ranked {
    fn first(&self) -> &Arc<Policy> {
        match self {
            Ranked::One(_, p) => p,
            Ranked::Many(v) => &v[0].1,
        }
    }

    fn to_vec(&self) -> Vec<(Rank, Arc<Policy>)> {
        match self {
            Ranked::One(r, p) => vec![(*r, Arc::clone(p))],
            Ranked::Many(v) => v.to_vec(),
        }
    }

    /// `v` (sorted by rank) as a `Ranked`, or nothing if it is empty.
    fn of(mut v: Vec<(Rank, Arc<Policy>)>) -> Option<Ranked> {
        match v.len() {
            0 => None,
            1 => v.pop().map(|(r, p)| Ranked::One(r, p)),
            _ => Some(Ranked::Many(v.into())),
        }
    }
}

impl Contrib {
    /// What the kernel must hold at `key`: the entry the first policy by
    /// priority makes there.
    #[cfg(test)]
    fn want(&self, key: &Key) -> Option<KPolicy> {
        self.want_from(key).map(|(k, ..)| k)
    }

    /// What the kernel must hold at `key`, with the policy that makes it:
    /// the entry the first policy by priority makes there.
    fn want_from(&self, key: &Key) -> Option<(KPolicy, u16, &Arc<Policy>)> {
        let p = self.by_key.get(key)?.first();
        let (ord, k) = entry(p, self.host, key)?;
        Some((k, ord, p))
    }

    fn pid(p: &Policy) -> PolicyId {
        (p.dir as u8, p.sel)
    }

    /// Takes out the contributions of the policy with `p`'s direction and
    /// selector, from the keys `p` makes: `p` is the policy staged before
    /// (a change removes the SPD's own `Arc`, the one it added), so they
    /// are the keys it went in under.
    fn remove(&mut self, p: &Policy, touched: &mut BTreeSet<Key>) {
        let pid = Self::pid(p);
        for k in kernel(p, self.host) {
            let k = (k.dir, k.sel);
            let Some(m) = self.by_key.get(&k) else {
                continue;
            };
            let v = m.to_vec();
            if !v.iter().any(|(_, q)| Self::pid(q) == pid) {
                continue;
            }
            let rest: Vec<(Rank, Arc<Policy>)> =
                v.into_iter().filter(|(_, q)| Self::pid(q) != pid).collect();
            match Ranked::of(rest) {
                Some(r) => self.by_key.insert(k, r),
                None => self.by_key.remove(&k),
            };
            touched.insert(k);
        }
    }

    fn add(&mut self, p: &Arc<Policy>, touched: &mut BTreeSet<Key>) {
        self.remove(p, touched);
        self.next += 1;
        self.put(p, (p.priority, self.next), touched);
    }

    /// `old` replaced by `new` at its order among equal priorities (see
    /// [`Step::Update`]). A policy that made no kernel entry (a BYPASS
    /// whose ports split too finely) left no order behind: `new` ranks as
    /// added then.
    fn update(&mut self, old: &Policy, new: &Arc<Policy>, touched: &mut BTreeSet<Key>) {
        let pid = Self::pid(old);
        let order = kernel(old, self.host).into_iter().find_map(|k| {
            let m = self.by_key.get(&(k.dir, k.sel))?;
            m.to_vec()
                .into_iter()
                .find(|(_, q)| Self::pid(q) == pid)
                .map(|(r, _)| r.1)
        });
        self.remove(old, touched);
        let order = order.unwrap_or_else(|| {
            self.next += 1;
            self.next
        });
        self.put(new, (new.priority, order), touched);
    }

    /// `p`'s contributions at `rank`, under every key it makes.
    fn put(&mut self, p: &Arc<Policy>, rank: Rank, touched: &mut BTreeSet<Key>) {
        for k in kernel(p, self.host) {
            let key = (k.dir, k.sel);
            let m = match self.by_key.get(&key) {
                None => Ranked::One(rank, Arc::clone(p)),
                Some(m) => {
                    let mut v = m.to_vec();
                    let at = v.partition_point(|(r, _)| *r < rank);
                    v.insert(at, (rank, Arc::clone(p)));
                    Ranked::of(v).expect("not empty")
                }
            };
            self.by_key.insert(key, m);
            touched.insert(key);
        }
    }

    /// Stages a change: policies added, removed and updated, in batch
    /// order; the kernel keys it touches.
    pub fn stage<'a>(&mut self, changes: impl IntoIterator<Item = Step<'a>>) -> BTreeSet<Key> {
        let mut touched = BTreeSet::new();
        for s in changes {
            match s {
                Step::Add(p) => self.add(p, &mut touched),
                Step::Remove(p) => self.remove(p, &mut touched),
                Step::Update(old, new) => self.update(old, new, &mut touched),
            }
        }
        touched
    }

    /// Every policy of `cfg`, in priority order (as [`desired`]).
    pub fn of(cfg: &Config, host: Option<HostShape>) -> Contrib {
        let mut pols: Vec<&Arc<Policy>> = Direction::ALL
            .iter()
            .flat_map(|d| cfg.spd.policy_arcs(*d))
            .collect();
        pols.sort_by_key(|p| p.priority);
        let mut c = Contrib {
            host,
            ..Contrib::default()
        };
        c.stage(pols.into_iter().map(Step::Add));
        c
    }

    /// Kernel keys with a contribution.
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.by_key.len()
    }
}

/// The guard's kernel entries, by direction and selector.
pub struct Guard {
    nl: Xfrm,
    /// What the kernel holds at each key: its index and what it is.
    installed: Installed,
    next: [u32; 3],
    /// What the running configuration contributes to each key.
    pub contrib: Contrib,
    host: Option<HostShape>,
}

fn dir(d: Direction) -> Dir {
    match d {
        Direction::In => Dir::In,
        Direction::Out => Dir::Out,
        Direction::Fwd => Dir::Fwd,
    }
}

fn blocks(r: Option<PortRange>) -> Vec<(u16, u16)> {
    match r {
        None => vec![(0, 0)],
        Some(r) => xfrm::port_blocks(r.lo, r.hi),
    }
}

/// The kernel policies for one espd policy.
fn kernel(p: &Policy, host: Option<HostShape>) -> Vec<KPolicy> {
    let s = &p.sel;
    let tmpls: Vec<KTmpl> = p
        .tmpls
        .iter()
        .map(|t| KTmpl {
            src: t.src,
            dst: t.dst,
            spi: t.spi.unwrap_or(0),
            reqid: t.reqid,
            tunnel: t.mode == Mode::Tunnel,
            optional: t.level == Level::Use,
        })
        .collect();
    let strict = p.action == Action::Block || p.requires_protection();
    let (mut sp, mut dp) = (blocks(s.sport), blocks(s.dport));
    if sp.len() * dp.len() > MAX_SPLIT {
        if !strict {
            return Vec::new();
        }
        (sp, dp) = (vec![(0, 0)], vec![(0, 0)]);
    }
    let mut out = Vec::with_capacity(sp.len() * dp.len());
    for &(sport, sport_mask) in &sp {
        for &(dport, dport_mask) in &dp {
            out.push(KPolicy {
                dir: dir(p.dir),
                sel: KSelector {
                    src: s.src.addr,
                    src_len: s.src.len,
                    dst: s.dst.addr,
                    dst_len: s.dst.len,
                    proto: s.proto.unwrap_or(0),
                    sport,
                    sport_mask,
                    dport,
                    dport_mask,
                    ifindex: match (host, p.dir) {
                        (Some(h), Direction::Out) => h.outside,
                        _ => 0,
                    },
                    // RFC 4301 §5.2: plaintext from the wire stays dropped;
                    // what espd decapsulated and checked comes marked.
                    mark: 0,
                    mark_mask: match (host, p.dir) {
                        (Some(_), Direction::In) => espd_io::steer::HOST_MARK,
                        _ => 0,
                    },
                },
                priority: p.priority,
                block: p.action == Action::Block,
                tmpls: tmpls.clone(),
            });
        }
    }
    out
}

/// An entry the kernel holds.
#[derive(Clone)]
enum Have {
    /// Put from this espd policy (the entry is worked out again from it:
    /// the policy is shared with the SPD, the entry would be a copy).
    Made(Arc<Policy>),
    /// Found in the kernel at the start (an earlier espd put it).
    Found(Box<KPolicy>),
}

/// One entry the kernel holds: its index, and where it comes from.
#[derive(Clone)]
struct Slot {
    index: u32,
    /// For [`Have::Made`]: which of the policy's kernel entries
    /// ([`kernel`]'s order) it is, so its key can be worked out again.
    ord: u16,
    have: Have,
}

/// What the kernel holds, by a hash of each entry's key: a carrier edge's
/// 100 000 entries at 32 octets each, not the 88 of a (key, entry) pair
/// (docs/performance.md). An entry's key is worked out again from what
/// made it (its policy and ordinal, or the entry found at the start), so
/// every lookup compares whole keys; a key whose hash another key already
/// has goes to a small ordered map (never seen in practice, kept exact all
/// the same).
struct Installed {
    by_hash: PMap<u64, Slot>,
    collided: std::collections::BTreeMap<Key, Slot>,
    hasher: std::hash::RandomState,
    host: Option<HostShape>,
    /// ANDed into every hash: all ones, except in a test that forces
    /// collisions.
    mask: u64,
}

impl Installed {
    fn new(host: Option<HostShape>) -> Self {
        Installed {
            by_hash: PMap::default(),
            collided: Default::default(),
            hasher: Default::default(),
            host,
            mask: u64::MAX,
        }
    }

    fn hash(&self, key: &Key) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key) & self.mask
    }

    /// The key of the entry `s` (None if its policy no longer makes it:
    /// not reachable, a policy is immutable and `host` fixed).
    fn key_of(&self, s: &Slot) -> Option<Key> {
        match &s.have {
            Have::Made(p) => kernel(p, self.host)
                .into_iter()
                .nth(usize::from(s.ord))
                .map(|k| (k.dir, k.sel)),
            Have::Found(b) => Some((b.dir, b.sel)),
        }
    }

    fn get(&self, key: &Key) -> Option<&Slot> {
        match self.by_hash.get(&self.hash(key)) {
            Some(s) if self.key_of(s).as_ref() == Some(key) => Some(s),
            _ => self.collided.get(key),
        }
    }

    fn insert(&mut self, key: Key, s: Slot) {
        let h = self.hash(&key);
        if let Some(c) = self.collided.get_mut(&key) {
            *c = s;
            return;
        }
        match self.by_hash.get(&h) {
            Some(held) if self.key_of(held).as_ref() != Some(&key) => {
                self.collided.insert(key, s);
            }
            _ => {
                self.by_hash.insert(h, s);
            }
        }
    }

    fn remove(&mut self, key: &Key) -> Option<Slot> {
        let h = self.hash(key);
        match self.by_hash.get(&h) {
            Some(s) if self.key_of(s).as_ref() == Some(key) => self.by_hash.remove(&h),
            _ => self.collided.remove(key),
        }
    }

    fn len(&self) -> usize {
        self.by_hash.len() + self.collided.len()
    }

    /// Every entry: its key and index.
    fn entries(&self) -> Vec<(Key, u32)> {
        let held = self.by_hash.iter().map(|(_, s)| s);
        held.filter_map(|s| Some((self.key_of(s)?, s.index)))
            .chain(self.collided.iter().map(|(k, s)| (*k, s.index)))
            .collect()
    }
}

/// The entry `p` makes at `key`, if it makes one there, and which of its
/// entries it is.
fn entry(p: &Policy, host: Option<HostShape>, key: &Key) -> Option<(u16, KPolicy)> {
    let (ord, k) = kernel(p, host)
        .into_iter()
        .enumerate()
        .find(|(_, k)| (k.dir, k.sel) == *key)?;
    // At most MAX_SPLIT entries a policy.
    Some((ord as u16, k))
}

/// What the kernel must hold for `cfg`: every policy of every direction, in
/// priority order (where two map to one kernel selector, the first wins).
#[cfg(test)]
pub fn desired(cfg: &Config, host: Option<HostShape>) -> BTreeMap<(Dir, KSelector), KPolicy> {
    let mut pols: Vec<&Policy> = Direction::ALL
        .iter()
        .flat_map(|d| cfg.spd.policies(*d))
        .collect();
    pols.sort_by_key(|p| p.priority);
    let mut out = BTreeMap::new();
    for p in pols {
        for k in kernel(p, host) {
            out.entry((k.dir, k.sel)).or_insert(k);
        }
    }
    out
}

/// True if the entry, once in the kernel, drops more than it lets through:
/// it protects (a required template) or blocks.
fn strict(k: &KPolicy) -> bool {
    k.block || k.tmpls.iter().any(|t| !t.optional)
}

impl Guard {
    /// Opens the kernel's table and takes over the entries an earlier espd
    /// left (they are recognised by their index); `host`: the entries are
    /// shaped for the host path from now on (entries of the other shape
    /// are replaced at the first [`Guard::sync`]).
    pub fn open(host: Option<HostShape>) -> std::io::Result<Guard> {
        let mut nl = Xfrm::open()?;
        let mut installed = Installed::new(host);
        let mut next = [0u32; 3];
        for l in nl.list()? {
            if !xfrm::is_ours(l.index) {
                continue;
            }
            let d = l.policy.dir as usize;
            next[d] = next[d].max(((l.index & !xfrm::INDEX_TAG) >> 3) + 1);
            let key = (l.policy.dir, l.policy.sel);
            let slot = Slot {
                index: l.index,
                ord: 0,
                have: Have::Found(Box::new(l.policy)),
            };
            installed.insert(key, slot);
        }
        Ok(Guard {
            nl,
            installed,
            next,
            contrib: Contrib {
                host,
                ..Contrib::default()
            },
            host,
        })
    }

    /// Kernel entries in place now.
    pub fn len(&self) -> usize {
        self.installed.len()
    }

    /// Puts `k`, which policy `from` makes as its `ord`th entry, unless the
    /// kernel holds it.
    fn put(&mut self, k: &KPolicy, ord: u16, from: &Arc<Policy>) -> std::io::Result<()> {
        let key = (k.dir, k.sel);
        let made = |index| Slot {
            index,
            ord,
            have: Have::Made(Arc::clone(from)),
        };
        let index = match self.installed.get(&key) {
            Some(s) => {
                let same = match &s.have {
                    Have::Made(p) => entry(p, self.host, &key).is_some_and(|(_, e)| e == *k),
                    Have::Found(b) => **b == *k,
                };
                let i = s.index;
                if same {
                    // Held as its policy from now on (a smaller record).
                    self.installed.insert(key, made(i));
                    return Ok(());
                }
                i
            }
            None => {
                let d = k.dir as usize;
                self.next[d] += 1;
                xfrm::index(self.next[d] - 1, k.dir)
            }
        };
        self.nl.put(k, index)?;
        self.installed.insert(key, made(index));
        Ok(())
    }

    /// Both halves at once (at start, before anything is attached): every
    /// entry `cfg`'s policies make is in the kernel, and no other.
    pub fn sync(&mut self, cfg: &Config) -> std::io::Result<()> {
        let c = Contrib::of(cfg, self.host);
        let keys: BTreeSet<Key> = c.by_key.keys().copied().collect();
        self.tighten_keys(&c, &keys)?;
        let stale: Vec<Key> = self
            .installed
            .entries()
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| !keys.contains(k))
            .collect();
        self.loosen_keys(c, &keys)?;
        for key in stale {
            if let Some(s) = self.installed.remove(&key) {
                self.nl.delete(key.0, &key.1, s.index)?;
            }
        }
        Ok(())
    }

    /// First half of a staged change (`c`, with the keys it touches):
    /// what protects or blocks goes in.
    pub fn tighten_keys(&mut self, c: &Contrib, keys: &BTreeSet<Key>) -> std::io::Result<()> {
        for k in keys {
            if let Some((w, ord, p)) = c.want_from(k).filter(|(w, ..)| strict(w)) {
                self.put(&w, ord, p)?;
            }
        }
        Ok(())
    }

    /// Second half, once espd runs on the change: BYPASS entries put,
    /// entries no policy wants removed; `c` becomes the running contribution.
    pub fn loosen_keys(&mut self, c: Contrib, keys: &BTreeSet<Key>) -> std::io::Result<()> {
        self.contrib = c;
        for k in keys {
            let want = self
                .contrib
                .want_from(k)
                .map(|(w, ord, p)| (w, ord, Arc::clone(p)));
            match want {
                Some((w, ord, p)) if !strict(&w) => self.put(&w, ord, &p)?,
                Some(_) => {}
                None => {
                    if let Some(s) = self.installed.remove(k) {
                        self.nl.delete(k.0, &k.1, s.index)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// `espd down`: removes every entry espd put in this namespace's kernel.
    pub fn lift(&mut self) -> std::io::Result<usize> {
        let all = self.installed.entries();
        for ((d, sel), index) in &all {
            self.nl.delete(*d, sel, *index)?;
        }
        self.installed = Installed::new(self.host);
        Ok(all.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(text: &str) -> BTreeMap<(Dir, KSelector), KPolicy> {
        desired(&Config::parse("t.conf", text).unwrap(), None)
    }

    #[test]
    fn host_shape_binds_outbound_entries_to_the_outside_and_lets_marked_inbound_by() {
        let cfg = Config::parse(
            "t.conf",
            "policy add src 198.18.0.1 dst 198.18.0.2 dir out tmpl proto esp reqid 1 mode transport
policy add src 198.18.0.2 dst 198.18.0.1 dir in tmpl proto esp reqid 1 mode transport
policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir fwd tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
",
        )
        .unwrap();
        let host = Some(HostShape { outside: 7 });
        let w = desired(&cfg, host);
        let by = |d: Dir| w.values().find(|k| k.dir == d).unwrap().sel;
        assert_eq!((by(Dir::Out).ifindex, by(Dir::Out).mark_mask), (7, 0));
        let inb = by(Dir::In);
        assert_eq!(
            (inb.ifindex, inb.mark, inb.mark_mask),
            (0, 0, espd_io::steer::HOST_MARK)
        );
        assert_eq!((by(Dir::Fwd).ifindex, by(Dir::Fwd).mark_mask), (0, 0));
        // Staged changes shape their entries the same way.
        let c = Contrib::of(&cfg, host);
        for k in w.keys() {
            assert_eq!(c.want(k).as_ref(), w.get(k));
        }
        // A gateway's entries are the plain ones: a switch replaces every key.
        let plain = desired(&cfg, None);
        assert!(plain
            .keys()
            .filter(|k| k.0 != Dir::Fwd)
            .all(|k| !w.contains_key(k)));
    }

    #[test]
    fn every_policy_becomes_a_kernel_entry_with_its_templates() {
        let w = want(
            "policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out priority 100 tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel
policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir fwd tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto udp dport 53 dir out priority 10
policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto tcp dport 23 dir out priority 10 action block
policy add src 198.18.1.0/24 dst 198.18.4.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.9 proto esp reqid 9 mode tunnel level use
",
        );
        assert_eq!(w.len(), 5);
        let protect: Vec<&KPolicy> = w.values().filter(|k| strict(k)).collect();
        // The tunnel both ways and the block; the bypass and the optional
        // (`level use`) template are not strict.
        assert_eq!(protect.len(), 3);
        let out = w
            .values()
            .find(|k| k.dir == Dir::Out && k.priority == 100)
            .unwrap();
        assert_eq!(out.tmpls[0].reqid, 1);
        assert!(out.tmpls[0].tunnel && !out.tmpls[0].optional);
        let dns = w.values().find(|k| k.sel.dport == 53).unwrap();
        assert!(dns.tmpls.is_empty() && !dns.block && dns.sel.dport_mask == 0xffff);
        assert_eq!(dns.sel.proto, 17);
    }

    /// Staging changes one by one gives what `desired` computes from the
    /// whole configuration.
    #[test]
    fn staged_changes_give_the_desired_entries() {
        let lines = [
            "policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out priority 100 tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel",
            "policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto tcp dport 1000-1003 dir out priority 5 action block",
            "policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto tcp dport 1000-1001 dir out priority 9",
            "policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir fwd tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel",
        ];
        let mut c = Contrib::default();
        let mut text = String::new();
        for (i, l) in lines.iter().enumerate() {
            text.push_str(l);
            text.push('\n');
            let cfg = Config::parse("t.conf", &text).unwrap();
            let p = cfg
                .spd
                .policies(Direction::ALL[[1, 1, 1, 2][i]])
                .into_iter()
                .find(|p| {
                    format!("{:?}", p.sel)
                        == format!(
                            "{:?}",
                            Config::parse("x", l).unwrap().spd.policies(p.dir)[0].sel
                        )
                })
                .unwrap()
                .clone();
            c.stage([Step::Add(&Arc::new(p))]);
            let want = desired(&cfg, None);
            for (k, w) in &want {
                assert_eq!(c.want(k).as_ref(), Some(w), "after line {}", i + 1);
            }
            assert_eq!(c.keys(), want.len());
        }
        // Removing the block uncovers the bypass under it.
        let cfg = Config::parse("t.conf", &text).unwrap();
        let block = cfg
            .spd
            .policies(Direction::Out)
            .into_iter()
            .find(|p| p.priority == 5)
            .unwrap()
            .clone();
        let touched = c.stage([Step::Remove(&Arc::new(block))]);
        assert!(!touched.is_empty());
        let rest: String = lines
            .iter()
            .filter(|l| !l.contains("action block"))
            .map(|l| format!("{l}\n"))
            .collect();
        let want = desired(&Config::parse("t.conf", &rest).unwrap(), None);
        for k in &touched {
            assert_eq!(c.want(k).as_ref(), want.get(k), "{k:?}");
        }
    }

    /// Random adds, updates and deletes staged as the gateway stages them
    /// (a removal is the policy staged before, the same `Arc`) give, after
    /// every step, what `desired` computes from the whole configuration:
    /// on every key either holds, and the count of keys.
    #[test]
    fn random_changes_staged_give_the_desired_entries() {
        let sels = [
            "src 198.18.1.0/24 dst 198.18.2.0/24",
            "src 198.18.1.0/24 dst 198.18.2.0/24 proto tcp dport 1000-1003",
            "src 198.18.1.0/24 dst 198.18.2.0/24 proto tcp dport 1000-1001",
            "src 198.18.1.0/24 dst 198.18.2.0/24 proto udp dport 1-40000",
            "src 198.18.1.0/24 dst 198.18.2.0/24 proto tcp dport 1000-1005",
            "src 198.18.1.0/24 dst 198.18.2.0/24 proto udp dport 5000-5010",
            "src 198.18.1.0/25 dst 198.18.2.0/24",
            "src 2001:db8:1::/48 dst 2001:db8:2::/48",
        ];
        let actions = [
            "tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel",
            "action block",
            "",
            "tmpl proto esp reqid 3 mode transport level use",
        ];
        let dirs = ["out", "in", "fwd"];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |m: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % m as u64) as usize
        };
        // (selector, direction, line, the policy staged), in the SPD's
        // order: the configuration `desired` is given lists them so, as
        // ties between equal priorities go to the earlier policy and an
        // update keeps its place (`Spd::update`).
        let mut have: Vec<((usize, usize), String, Arc<Policy>)> = Vec::new();
        let mut c = Contrib::default();
        for step in 0..600 {
            let (si, di) = (next(sels.len()), next(dirs.len()));
            let tmpl = actions[next(actions.len())];
            let line = format!(
                "policy add {} dir {} priority {} {}",
                sels[si],
                dirs[di],
                next(4) * 10,
                // IPv6 selectors with IPv4 tunnel templates do not parse.
                if si == sels.len() - 1 && tmpl.contains("198.18") {
                    ""
                } else {
                    tmpl
                }
            );
            let parsed = || {
                let cfg = Config::parse("x", &line).unwrap();
                let p = Direction::ALL
                    .iter()
                    .flat_map(|d| cfg.spd.policies(*d))
                    .next();
                Arc::new(p.expect("one policy").clone())
            };
            let at = have.iter().position(|h| h.0 == (si, di));
            match (at, next(3)) {
                (None, _) => {
                    let p = parsed();
                    c.stage([Step::Add(&p)]);
                    have.push(((si, di), line.clone(), p));
                }
                (Some(i), 0) => {
                    let (_, _, old) = have.remove(i);
                    c.stage([Step::Remove(&old)]);
                }
                (Some(i), _) => {
                    let p = parsed();
                    c.stage([Step::Update(&have[i].2, &p)]);
                    have[i] = ((si, di), line.clone(), p);
                }
            }
            let text: String = have.iter().map(|h| format!("{}\n", h.1)).collect();
            let want = desired(&Config::parse("t.conf", &text).unwrap(), None);
            for (k, w) in &want {
                assert_eq!(c.want(k).as_ref(), Some(w), "step {step}: {line}");
            }
            assert_eq!(c.keys(), want.len(), "step {step}: {line}");
        }
    }

    /// Two policies of one priority whose port ranges widen to one kernel
    /// entry: the first is the entry, before and after an update of it —
    /// as the SPD keeps the updated one first (what the engine obeys).
    #[test]
    fn an_update_keeps_its_place_among_equal_priorities() {
        let line = |ports: &str, then: &str| {
            format!("policy add src 198.18.1.0/24 dst 198.18.2.0/24 proto udp dport {ports} dir out priority 10 {then}")
        };
        let first = line(
            "1-40000",
            "tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel",
        );
        let second = line("2-39999", "action block");
        let updated = first.replace("reqid 1", "reqid 2");
        let policy = |l: &str| {
            let cfg = Config::parse("x", l).unwrap();
            Arc::new(cfg.spd.policies(Direction::Out)[0].clone())
        };
        let (a, b, a2) = (policy(&first), policy(&second), policy(&updated));
        let mut c = Contrib::default();
        let touched = c.stage([Step::Add(&a), Step::Add(&b)]);
        assert_eq!(touched.len(), 1, "both widen to one entry");
        let key = *touched.iter().next().unwrap();
        let reqid = |c: &Contrib| {
            c.want(&key)
                .map(|k| (k.block, k.tmpls.first().map(|t| t.reqid)))
        };
        assert_eq!(reqid(&c), Some((false, Some(1))));
        c.stage([Step::Update(&a, &a2)]);
        assert_eq!(
            reqid(&c),
            Some((false, Some(2))),
            "the updated first policy, not the block"
        );
        // The SPD agrees: the update kept its place.
        let mut spd = espd_core::state::Spd::new();
        spd.insert(Arc::clone(&a)).unwrap();
        spd.insert(Arc::clone(&b)).unwrap();
        spd.update(Arc::clone(&a2)).unwrap();
        assert_eq!(spd.policies(Direction::Out)[0].sel, a2.sel);
        // And the entries worked out from the configuration afterwards.
        let cfg = Config {
            sad: espd_core::state::Sad::new(),
            spd,
        };
        assert_eq!(desired(&cfg, None).get(&key), c.want(&key).as_ref());
    }

    #[test]
    fn port_ranges_split_and_wide_ones_fail_closed() {
        // 1000-1003: one aligned block of four ports.
        let w = want("policy add src 0.0.0.0/0 dst 198.18.2.0/24 proto tcp dport 1000-1003 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel\n");
        assert_eq!(w.len(), 1);
        assert_eq!(w.values().next().unwrap().sel.dport_mask, 0xfffc);
        // Too many blocks: PROTECT widens to every port, BYPASS is left out.
        let ragged = "sport 1-9999 dport 3-9997";
        let w = want(&format!("policy add src 0.0.0.0/0 dst 198.18.2.0/24 proto tcp {ragged} dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel\n"));
        assert_eq!(w.len(), 1);
        assert_eq!(w.values().next().unwrap().sel.dport_mask, 0);
        let w = want(&format!(
            "policy add src 0.0.0.0/0 dst 198.18.2.0/24 proto tcp {ragged} dir out\n"
        ));
        assert!(w.is_empty());
    }

    /// The installed entries keyed by hash answer as a map keyed by the
    /// whole key would, also when hashes collide (a 2-bit mask here makes
    /// most of them collide): random puts and removes of entries found at
    /// the start and entries made by a policy (several a policy, by port
    /// block), checked against a BTreeMap after every step.
    #[test]
    fn installed_entries_keyed_by_hash_answer_as_a_map() {
        let cfg = Config::parse(
            "t.conf",
            "policy add src 0.0.0.0/0 dst 198.18.2.0/24 proto tcp dport 1001-1010 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel
policy add src 198.18.3.0/24 dst 198.18.4.0/24 dir in tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
",
        )
        .unwrap();
        let pols: Vec<Arc<Policy>> = Direction::ALL
            .iter()
            .flat_map(|d| {
                cfg.spd
                    .policy_arcs(*d)
                    .into_iter()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        // Every (key, how it is held) an entry can be: made by a policy
        // (its ordinal), or found.
        let mut made: Vec<(Key, u16, Arc<Policy>)> = Vec::new();
        for p in &pols {
            for (ord, k) in kernel(p, None).into_iter().enumerate() {
                made.push(((k.dir, k.sel), ord as u16, Arc::clone(p)));
            }
        }
        assert!(made.len() >= 4, "the port range splits: {}", made.len());
        let found: Vec<KPolicy> = (0..12u8)
            .map(|i| {
                let mut k = kernel(&pols[0], None).remove(0);
                k.sel.dst = core::net::IpAddr::from([198, 19, 0, i]);
                k
            })
            .collect();
        for mask in [u64::MAX, 0x3] {
            let mut inst = Installed::new(None);
            inst.mask = mask;
            let mut model: BTreeMap<Key, u32> = BTreeMap::new();
            let mut seed = 0x2545_f491_4f6c_dd1du64;
            for step in 0..4000u32 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let n = (seed >> 8) as usize;
                let (key, slot) = if n.is_multiple_of(2) {
                    let (key, ord, p) = &made[n / 2 % made.len()];
                    let have = Have::Made(Arc::clone(p));
                    (
                        *key,
                        Slot {
                            index: step,
                            ord: *ord,
                            have,
                        },
                    )
                } else {
                    let k = &found[n / 2 % found.len()];
                    let have = Have::Found(Box::new(k.clone()));
                    (
                        (k.dir, k.sel),
                        Slot {
                            index: step,
                            ord: 0,
                            have,
                        },
                    )
                };
                if (seed >> 40).is_multiple_of(3) {
                    assert_eq!(
                        inst.remove(&key).map(|s| s.index),
                        model.remove(&key),
                        "mask {mask:x} step {step}"
                    );
                } else {
                    inst.insert(key, slot);
                    model.insert(key, step);
                }
                assert_eq!(inst.len(), model.len(), "mask {mask:x} step {step}");
                for k in made
                    .iter()
                    .map(|m| m.0)
                    .chain(found.iter().map(|f| (f.dir, f.sel)))
                {
                    assert_eq!(
                        inst.get(&k).map(|s| s.index),
                        model.get(&k).copied(),
                        "mask {mask:x} step {step}"
                    );
                }
                let mut all = inst.entries();
                all.sort();
                let want: Vec<(Key, u32)> = model.iter().map(|(k, i)| (*k, *i)).collect();
                assert_eq!(all, want, "mask {mask:x} step {step}");
            }
            if mask != u64::MAX {
                assert!(
                    !inst.collided.is_empty() || model.len() < 5,
                    "collisions were exercised"
                );
            }
        }
    }
}
