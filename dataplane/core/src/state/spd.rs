//! The security policy database (RFC 4301 §4.4.1) with Linux XFRM semantics:
//! per direction, policies ordered by priority (lower value first, then the
//! order they were added); `action allow` with templates is PROTECT, without
//! templates BYPASS; `action block` is DISCARD. What no policy matches gets the
//! direction's default (`policy setdefault`, allow unless configured).

use super::sa::Mode;
use super::selector::{Flow, Prefix, Selector};
use super::PMap;
use core::net::IpAddr;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic to this host (checked after decapsulation, and on plaintext).
    In,
    /// Traffic this host sends or forwards: selects what to protect.
    Out,
    /// Traffic forwarded through this host (checked like `in`).
    Fwd,
}

impl Direction {
    pub const ALL: [Direction; 3] = [Direction::In, Direction::Out, Direction::Fwd];
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
            Direction::Fwd => "fwd",
        }
    }
    fn idx(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Block,
}

/// `level required` (default) or `level use` (protection optional inbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Required,
    Use,
}

/// One `tmpl …`: which SA protects the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Template {
    /// Tunnel endpoints; `None` (or omitted) means "any" / "the flow's own".
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub spi: Option<u32>,
    /// 0 = any.
    pub reqid: u32,
    pub mode: Mode,
    pub level: Level,
}

impl Template {
    /// Inbound: does an SA with these properties satisfy this template?
    pub fn accepts(&self, mode: Mode, reqid: u32, spi: u32, src: IpAddr, dst: IpAddr) -> bool {
        self.mode == mode
            && (self.reqid == 0 || self.reqid == reqid)
            && self.spi.is_none_or(|s| s == spi)
            && (mode == Mode::Transport
                || (self.src.is_none_or(|a| a == src) && self.dst.is_none_or(|a| a == dst)))
    }
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub sel: Selector,
    pub dir: Direction,
    pub priority: u32,
    pub action: Action,
    /// At its size: a policy is kept as long as it runs (100 000 of them at
    /// the carrier edge), and a `Vec` grown by push keeps room for four
    /// templates (160 octets more for the usual one); a box is also 8
    /// octets smaller, which puts a policy's `Arc` in a smaller size class.
    pub tmpls: Box<[Template]>,
}

impl Policy {
    /// True for `allow` with at least one required template: PROTECT.
    pub fn requires_protection(&self) -> bool {
        self.action == Action::Allow && self.tmpls.iter().any(|t| t.level == Level::Required)
    }
}

/// Adding a policy whose selector and direction exist already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exists;

/// One direction's policies, indexed for lookup by tuple-space search (as
/// Open vSwitch classifies flows): one hash table per (family, source prefix
/// length, destination prefix length) shape, keyed by the masked addresses.
/// A lookup probes each shape once, so its cost grows with the number of
/// distinct shapes, not with the number of policies. The maps are
/// persistent (a copy is O(1), a change O(log n)), so the control plane
/// changes a copy while the workers read the published one.
///
/// The shape maps are the only index: a policy is found by its selector
/// through its shape and masked addresses too (a selector's prefixes are
/// kept masked), so no second map by selector holds every policy again.
#[derive(Default, Clone)]
struct Table {
    shapes: Vec<Shape>,
    /// Policies in all shapes.
    len: usize,
    /// The next insertion order (ties between equal priorities go to the
    /// earlier policy, as in XFRM).
    next_order: u64,
}

#[derive(Clone)]
struct Shape {
    v4: bool,
    src_len: u8,
    dst_len: u8,
    /// The lowest priority value in this shape: shapes are probed in this order
    /// and the search stops once no shape can beat the best match.
    min_priority: u32,
    /// Priority → policies of this shape with it (for `min_priority` after a delete).
    prios: std::collections::BTreeMap<u32, u32>,
    /// Masked (src, dst) → the policies with that key, by (priority, order).
    map: PMap<(IpAddr, IpAddr), Bucket>,
}

/// What a lookup needs of a policy, and the policy.
#[derive(Clone)]
struct Entry {
    priority: u32,
    order: u64,
    /// No protocol or ports in the selector: the address key decides the match.
    by_key: bool,
    policy: Arc<Policy>,
}

/// Most keys have one policy: keep it inline (no pointer chase).
#[derive(Clone)]
enum Bucket {
    One(Entry),
    Many(Arc<[Entry]>),
}

impl Bucket {
    fn entries(&self) -> &[Entry] {
        match self {
            Bucket::One(e) => core::slice::from_ref(e),
            Bucket::Many(v) => v,
        }
    }
    fn with(&self, e: Entry) -> Bucket {
        let mut v = self.entries().to_vec();
        let pos = v.partition_point(|x| (x.priority, x.order) <= (e.priority, e.order));
        v.insert(pos, e);
        Bucket::Many(v.into())
    }
    fn without(&self, order: u64) -> Option<Bucket> {
        let v: Vec<Entry> = self
            .entries()
            .iter()
            .filter(|x| x.order != order)
            .cloned()
            .collect();
        match v.len() {
            0 => None,
            1 => v.into_iter().next().map(Bucket::One),
            _ => Some(Bucket::Many(v.into())),
        }
    }
}

impl Table {
    /// The shape a selector's policies go in, if there is one yet.
    fn shape_of(&self, sel: &Selector) -> Option<usize> {
        let (v4, sl, dl) = (sel.src.is_ipv4(), sel.src.len, sel.dst.len);
        self.shapes
            .iter()
            .position(|s| s.v4 == v4 && s.src_len == sl && s.dst_len == dl)
    }

    /// The entry of the policy with selector `sel`.
    fn entry(&self, sel: &Selector) -> Option<&Entry> {
        let shape = &self.shapes[self.shape_of(sel)?];
        shape
            .map
            .get(&(sel.src.addr, sel.dst.addr))?
            .entries()
            .iter()
            .find(|e| e.policy.sel == *sel)
    }

    fn insert(&mut self, p: Arc<Policy>, order: Option<u64>) -> Result<(), Exists> {
        if self.entry(&p.sel).is_some() {
            return Err(Exists);
        }
        let order = order.unwrap_or_else(|| {
            self.next_order += 1;
            self.next_order
        });
        let (v4, sl, dl) = (p.sel.src.is_ipv4(), p.sel.src.len, p.sel.dst.len);
        let key = (p.sel.src.addr, p.sel.dst.addr);
        let prio = p.priority;
        let entry = Entry {
            priority: prio,
            order,
            by_key: p.sel.proto.is_none() && p.sel.sport.is_none() && p.sel.dport.is_none(),
            policy: p,
        };
        let at = match self.shape_of(&entry.policy.sel) {
            Some(i) => i,
            None => {
                self.shapes.push(Shape {
                    v4,
                    src_len: sl,
                    dst_len: dl,
                    min_priority: prio,
                    prios: Default::default(),
                    map: PMap::default(),
                });
                self.shapes.len() - 1
            }
        };
        let shape = &mut self.shapes[at];
        *shape.prios.entry(prio).or_default() += 1;
        shape.min_priority = shape.min_priority.min(prio);
        let b = match shape.map.get(&key) {
            Some(b) => b.with(entry),
            None => Bucket::One(entry),
        };
        shape.map.insert(key, b);
        self.shapes.sort_by_key(|s| s.min_priority);
        self.len += 1;
        Ok(())
    }

    /// Removes the policy with selector `sel`; it and its order.
    fn remove(&mut self, sel: &Selector) -> Option<(Arc<Policy>, u64)> {
        let e = self.entry(sel)?.clone();
        let at = self.shape_of(sel)?;
        let key = (sel.src.addr, sel.dst.addr);
        let shape = &mut self.shapes[at];
        if let Some(b) = shape.map.get(&key).map(|b| b.without(e.order)) {
            match b {
                Some(b) => shape.map.insert(key, b),
                None => shape.map.remove(&key),
            };
        }
        if let Some(n) = shape.prios.get_mut(&e.priority) {
            *n -= 1;
            if *n == 0 {
                shape.prios.remove(&e.priority);
            }
        }
        match shape.prios.keys().next() {
            Some(&m) => shape.min_priority = m,
            None => {
                self.shapes.remove(at);
            }
        }
        self.shapes.sort_by_key(|s| s.min_priority);
        self.len -= 1;
        Some((e.policy, e.order))
    }

    fn lookup(&self, flow: &Flow) -> Option<&Policy> {
        let v4 = flow.src.is_ipv4();
        let mut best: Option<(u32, u64, &Policy)> = None;
        for s in &self.shapes {
            if best.is_some_and(|(bp, _, _)| s.min_priority > bp) {
                break;
            }
            if s.v4 != v4 {
                continue;
            }
            let key = (mask(flow.src, s.src_len), mask(flow.dst, s.dst_len));
            let Some(bucket) = s.map.get(&key) else {
                continue;
            };
            for e in bucket.entries() {
                if best.is_some_and(|(p, o, _)| (e.priority, e.order) >= (p, o)) {
                    break;
                }
                if e.by_key || e.policy.sel.matches(flow) {
                    best = Some((e.priority, e.order, &e.policy));
                    break;
                }
            }
        }
        best.map(|(_, _, p)| p)
    }

    /// Policies in lookup order: priority, then insertion.
    fn sorted(&self) -> Vec<&Arc<Policy>> {
        let mut v: Vec<&Entry> = self
            .shapes
            .iter()
            .flat_map(|s| s.map.values().flat_map(Bucket::entries))
            .collect();
        v.sort_by_key(|e| (e.priority, e.order));
        v.into_iter().map(|e| &e.policy).collect()
    }
}

fn mask(a: IpAddr, len: u8) -> IpAddr {
    Prefix::new(a, len).map_or(a, |p| p.addr)
}

#[derive(Clone)]
pub struct Spd {
    tables: [Table; 3],
    defaults: [Action; 3],
    /// Changes so far (see [`Spd::version`]).
    version: u64,
}

impl Default for Spd {
    fn default() -> Self {
        Spd {
            tables: Default::default(),
            defaults: [Action::Allow; 3],
            version: 0,
        }
    }
}

impl Spd {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a policy: given as an `Arc`, it is the one the SPD keeps (the
    /// gateway's guard holds the same, not a copy).
    pub fn insert(&mut self, p: impl Into<Arc<Policy>>) -> Result<(), Exists> {
        let p = p.into();
        self.version += 1;
        self.tables[p.dir.idx()].insert(p, None)
    }

    /// Removes the `dir` policy with selector `sel`, returning it.
    pub fn remove(&mut self, dir: Direction, sel: &Selector) -> Option<Arc<Policy>> {
        self.version += 1;
        self.tables[dir.idx()].remove(sel).map(|(p, _)| p)
    }

    /// `policy update`: the policy with `p`'s direction and selector
    /// replaced, keeping its place among equal priorities; the old one.
    pub fn update(&mut self, p: impl Into<Arc<Policy>>) -> Option<Arc<Policy>> {
        let p = p.into();
        self.version += 1;
        let t = &mut self.tables[p.dir.idx()];
        let (old, order) = t.remove(&p.sel)?;
        t.insert(p, Some(order)).ok()?;
        Some(old)
    }

    /// The `dir` policy with selector `sel`.
    pub fn get(&self, dir: Direction, sel: &Selector) -> Option<&Policy> {
        self.tables[dir.idx()].entry(sel).map(|e| &*e.policy)
    }

    pub fn set_default(&mut self, dir: Direction, a: Action) {
        self.version += 1;
        self.defaults[dir.idx()] = a;
    }

    /// Grows with every change: decisions cached under one version are
    /// void under the next (the engine's flow caches).
    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn default_action(&self, dir: Direction) -> Action {
        self.defaults[dir.idx()]
    }

    /// The policies of `dir` in lookup order (not for the per-packet path).
    pub fn policies(&self, dir: Direction) -> Vec<&Policy> {
        self.tables[dir.idx()]
            .sorted()
            .into_iter()
            .map(|p| &**p)
            .collect()
    }

    /// The same, as the shared policies (for holders that keep them).
    pub fn policy_arcs(&self, dir: Direction) -> Vec<&Arc<Policy>> {
        self.tables[dir.idx()].sorted()
    }
    pub fn len(&self) -> usize {
        self.tables.iter().map(|t| t.len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first (highest-priority, then earliest) policy of `dir` that matches `flow`.
    pub fn lookup(&self, dir: Direction, flow: &Flow) -> Option<&Policy> {
        self.tables[dir.idx()].lookup(flow)
    }

    /// The same answer by a linear scan: the reference the index is tested against.
    pub fn lookup_linear(&self, dir: Direction, flow: &Flow) -> Option<&Policy> {
        self.tables[dir.idx()]
            .sorted()
            .into_iter()
            .find(|p| p.sel.matches(flow))
            .map(|p| &**p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::selector::PortRange;
    use crate::wire::l4::Ports;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn v4(r: &mut Rng) -> IpAddr {
        // 198.18.0.0/15, few enough values that random flows hit policies.
        IpAddr::V4(
            [
                198,
                18 + (r.next() % 2) as u8,
                (r.next() % 4) as u8,
                (r.next() % 8) as u8,
            ]
            .into(),
        )
    }

    /// The tuple-space index gives exactly the linear scan's answer.
    #[test]
    fn index_matches_linear_scan() {
        let mut r = Rng(0x1234_5678_9abc_def1);
        for round in 0..20 {
            let mut spd = Spd::new();
            for _ in 0..(10 + round * 20) {
                let lens = [0u8, 8, 15, 16, 24, 30, 32];
                let sel = Selector {
                    src: Prefix::new(v4(&mut r), lens[(r.next() % 7) as usize]).unwrap(),
                    dst: Prefix::new(v4(&mut r), lens[(r.next() % 7) as usize]).unwrap(),
                    proto: [None, Some(17), Some(6)][(r.next() % 3) as usize],
                    sport: None,
                    dport: if r.next().is_multiple_of(4) {
                        Some(PortRange { lo: 50, hi: 60 })
                    } else {
                        None
                    },
                };
                let sel = Selector {
                    dport: if sel.proto.is_some() { sel.dport } else { None },
                    ..sel
                };
                let _ = spd.insert(Policy {
                    sel,
                    dir: Direction::Out,
                    priority: (r.next() % 5) as u32,
                    action: Action::Allow,
                    tmpls: Box::default(),
                });
            }
            for _ in 0..2000 {
                let f = Flow {
                    src: v4(&mut r),
                    dst: v4(&mut r),
                    proto: [17u8, 6, 1][(r.next() % 3) as usize],
                    ports: Some(Ports {
                        sport: 1,
                        dport: 45 + (r.next() % 20) as u16,
                    }),
                };
                let a = spd.lookup(Direction::Out, &f).map(|p| p as *const Policy);
                let b = spd
                    .lookup_linear(Direction::Out, &f)
                    .map(|p| p as *const Policy);
                assert_eq!(a, b, "round {round} flow {f:?}");
            }
        }
    }
}
