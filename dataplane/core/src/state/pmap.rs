//! A persistent hash map for the two lookups every packet makes: the SAD's
//! (destination, SPI) and the SPD's masked address pairs, one map per
//! shape (see [`super::spd`]).
//!
//! A hash trie, like imbl's, but dense where imbl's is sparse: a branch is
//! a plain array of [`FAN`] children picked by five bits of the hash, and a
//! leaf is one exactly sized array of up to [`LEAF_MAX`] entries in hash
//! order. imbl keeps every node as a fixed-capacity chunk, about 230–270
//! octets an entry at 100 000 entries (measured, docs/performance.md); this
//! one costs the entry and a few octets of branch and leaf header. The
//! hashes are not stored: a lookup compares the keys of one small leaf,
//! and a change works out the few hashes it needs again (8 octets an entry
//! less, in every map of the tables).
//!
//! Persistent as before: a copy is one reference count, and a change copies
//! only the path to its leaf (at most 13 nodes, a leaf of at most
//! [`LEAF_MAX`] entries and up to 12 branches of [`FAN`] children), so it
//! costs the same at 10 entries or 100 000 — the control plane changes a
//! copy while the workers read the published one. A branch that a batch
//! has copied already is changed in place (`Arc::make_mut`).
//!
//! The hasher is Fx by default, not SipHash: the maps hold only configured
//! keys (packets look up, never insert), so there is no hash-flooding
//! exposure; Fx's output is mixed once more so that its high bits, which
//! pick the branches, are uniform.

use core::hash::{BuildHasher, BuildHasherDefault, Hash};
use std::sync::Arc;

const BITS: u32 = 5;
/// Children of a branch.
pub const FAN: usize = 1 << BITS;
/// Entries a leaf holds before it splits into a branch.
pub const LEAF_MAX: usize = 16;
/// A branch whose leaves hold no more than this between them, after a
/// remove, folds back into one leaf (so a map that shrinks gives its
/// branches back).
const MERGE_MAX: usize = LEAF_MAX / 2;
/// Branch levels the hash's 64 bits pay for; a leaf at this depth holds
/// whatever collides in all of them, however many.
const MAX_DEPTH: u32 = 64 / BITS;

type Entry<K, V> = (K, V);

enum Node<K, V> {
    Empty,
    /// In hash order; at most [`LEAF_MAX`] entries above [`MAX_DEPTH`].
    Leaf(Arc<[Entry<K, V>]>),
    Branch(Arc<[Node<K, V>; FAN]>),
}

impl<K, V> Clone for Node<K, V> {
    fn clone(&self) -> Self {
        match self {
            Node::Empty => Node::Empty,
            Node::Leaf(l) => Node::Leaf(l.clone()),
            Node::Branch(b) => Node::Branch(b.clone()),
        }
    }
}

/// A persistent hash map: see the module documentation.
pub struct PMap<K, V, S = BuildHasherDefault<rustc_hash::FxHasher>> {
    root: Node<K, V>,
    len: usize,
    hasher: S,
}

impl<K, V, S: Default> Default for PMap<K, V, S> {
    fn default() -> Self {
        Self {
            root: Node::Empty,
            len: 0,
            hasher: S::default(),
        }
    }
}

impl<K, V, S: Clone> Clone for PMap<K, V, S> {
    fn clone(&self) -> Self {
        Self {
            root: self.root.clone(),
            len: self.len,
            hasher: self.hasher.clone(),
        }
    }
}

/// Equal when both hold the same entries, whatever their shape.
impl<K: Hash + Eq + Clone, V: Clone + PartialEq, S: BuildHasher> PartialEq for PMap<K, V, S> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl<K: Hash + Eq + Clone + core::fmt::Debug, V: Clone + core::fmt::Debug, S: BuildHasher>
    core::fmt::Debug for PMap<K, V, S>
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// The child of a branch at `depth` that hash `h` goes to: the hash's bits
/// from the top, five a level, so a leaf's entries in hash order split
/// into contiguous runs, one per child.
fn slot(h: u64, depth: u32) -> usize {
    ((h >> (64 - BITS * (depth + 1))) as usize) & (FAN - 1)
}

/// A leaf of `entries` (already in hash order), or nothing.
fn leaf<K, V>(entries: Vec<Entry<K, V>>) -> Node<K, V> {
    if entries.is_empty() {
        Node::Empty
    } else {
        Node::Leaf(entries.into())
    }
}

/// `k`'s hash under `s`, mixed once more: splitmix64's finaliser (Fx
/// leaves its best bits in the middle, and the top ones pick branches).
fn hash_with<K: Hash, S: BuildHasher>(s: &S, k: &K) -> u64 {
    let mut h = s.hash_one(k);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl<K: Hash + Eq + Clone, V: Clone, S: BuildHasher> PMap<K, V, S> {
    fn hash(&self, k: &K) -> u64 {
        hash_with(&self.hasher, k)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, k: &K) -> Option<&V> {
        let h = self.hash(k);
        let mut node = &self.root;
        let mut depth = 0;
        loop {
            match node {
                Node::Empty => return None,
                Node::Leaf(es) => return es.iter().find(|e| e.0 == *k).map(|e| &e.1),
                Node::Branch(b) => {
                    node = &b[slot(h, depth)];
                    depth += 1;
                }
            }
        }
    }

    pub fn contains_key(&self, k: &K) -> bool {
        self.get(k).is_some()
    }

    /// Inserts or replaces; the value replaced.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.upsert(k, |_| v)
    }

    /// Sets `k` to what `f` makes of its value (`None`: it has none), in
    /// one walk where a `get` and an `insert` take two; the value replaced.
    pub fn upsert(&mut self, k: K, f: impl FnOnce(Option<&V>) -> V) -> Option<V> {
        let h = self.hash(&k);
        let hasher = &self.hasher;
        let old = insert(&mut self.root, h, k, f, 0, &|k: &K| hash_with(hasher, k));
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// The value removed.
    pub fn remove(&mut self, k: &K) -> Option<V> {
        // Look before copying: a remove of what is not there copies
        // nothing.
        if !self.contains_key(k) {
            return None;
        }
        let h = self.hash(k);
        let old = remove(&mut self.root, h, k, 0);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        Iter {
            stack: vec![&self.root],
            leaf: [].iter(),
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }
}

/// Puts key `k`, of hash `h`, under `node` at `depth`, with the value `f`
/// makes of the one it has (or of nothing); the value replaced. `hash`
/// works out the hashes of the entries already there that the change needs.
///
/// A leaf this version owns alone (one a batch has changed already) is
/// changed in place; any other is copied once, into a block of its new
/// size (one allocation: the slices' iterators have an exact length).
fn insert<K: Eq + Clone, V: Clone, H: Fn(&K) -> u64>(
    node: &mut Node<K, V>,
    h: u64,
    k: K,
    f: impl FnOnce(Option<&V>) -> V,
    depth: u32,
    hash: &H,
) -> Option<V> {
    match node {
        Node::Empty => {
            *node = Node::Leaf(Arc::new([(k, f(None))]));
            None
        }
        Node::Branch(b) => insert(
            &mut Arc::make_mut(b)[slot(h, depth)],
            h,
            k,
            f,
            depth + 1,
            hash,
        ),
        Node::Leaf(es) => {
            if let Some(i) = es.iter().position(|x| x.0 == k) {
                let v = f(Some(&es[i].1));
                if let Some(own) = Arc::get_mut(es) {
                    return Some(core::mem::replace(&mut own[i].1, v));
                }
                let old = es[i].1.clone();
                let new: Arc<[Entry<K, V>]> = es[..i]
                    .iter()
                    .cloned()
                    .chain(core::iter::once((k, v)))
                    .chain(es[i + 1..].iter().cloned())
                    .collect();
                *es = new;
                return Some(old);
            }
            let e = (k, f(None));
            let at = es.partition_point(|x| hash(&x.0) < h);
            let with = es[..at]
                .iter()
                .cloned()
                .chain(core::iter::once(e))
                .chain(es[at..].iter().cloned());
            if es.len() < LEAF_MAX || depth >= MAX_DEPTH {
                let new: Arc<[Entry<K, V>]> = with.collect();
                *es = new;
            } else {
                let hashed: Vec<(u64, Entry<K, V>)> = with.map(|e| (hash(&e.0), e)).collect();
                *node = split(&hashed, depth);
            }
            None
        }
    }
}

/// A branch at `depth` for a leaf that outgrew [`LEAF_MAX`]: its entries,
/// in hash order and with their hashes beside them, fall into one run per
/// child.
fn split<K: Clone, V: Clone>(v: &[(u64, Entry<K, V>)], depth: u32) -> Node<K, V> {
    let mut kids: [Node<K, V>; FAN] = core::array::from_fn(|_| Node::Empty);
    let mut rest = v;
    while let Some(first) = rest.first() {
        let s = slot(first.0, depth);
        let n = rest.partition_point(|x| slot(x.0, depth) == s);
        // Entries that share the next five bits as well split again.
        kids[s] = if n > LEAF_MAX && depth + 1 < MAX_DEPTH {
            split(&rest[..n], depth + 1)
        } else {
            leaf(rest[..n].iter().map(|x| x.1.clone()).collect())
        };
        rest = &rest[n..];
    }
    Node::Branch(Arc::new(kids))
}

fn remove<K: Eq + Clone, V: Clone>(node: &mut Node<K, V>, h: u64, k: &K, depth: u32) -> Option<V> {
    match node {
        Node::Empty => None,
        Node::Leaf(es) => {
            let i = es.iter().position(|x| x.0 == *k)?;
            let old = es[i].1.clone();
            let mut v = Vec::with_capacity(es.len() - 1);
            v.extend_from_slice(&es[..i]);
            v.extend_from_slice(&es[i + 1..]);
            *node = leaf(v);
            Some(old)
        }
        Node::Branch(b) => {
            let s = slot(h, depth);
            let kids = Arc::make_mut(b);
            let old = remove(&mut kids[s], h, k, depth + 1)?;
            if let Some(n) = leaves_len(kids) {
                if n <= MERGE_MAX {
                    // Children run in hash order, so their entries joined
                    // are in hash order too.
                    let mut v = Vec::with_capacity(n);
                    for kid in kids.iter() {
                        if let Node::Leaf(es) = kid {
                            v.extend_from_slice(es);
                        }
                    }
                    *node = leaf(v);
                }
            }
            Some(old)
        }
    }
}

/// The entries of a branch's children if none is a branch.
fn leaves_len<K, V>(kids: &[Node<K, V>; FAN]) -> Option<usize> {
    kids.iter().try_fold(0, |n, k| match k {
        Node::Empty => Some(n),
        Node::Leaf(es) => Some(n + es.len()),
        Node::Branch(_) => None,
    })
}

pub struct Iter<'a, K, V> {
    stack: Vec<&'a Node<K, V>>,
    leaf: core::slice::Iter<'a, Entry<K, V>>,
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.leaf.next() {
                return Some((&e.0, &e.1));
            }
            match self.stack.pop()? {
                Node::Empty => {}
                Node::Leaf(es) => self.leaf = es.iter(),
                Node::Branch(b) => self.stack.extend(b.iter()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Every hash the same: everything collides, down to the deepest leaf.
    #[derive(Default, Clone)]
    struct Flat;
    struct FlatHasher;
    impl core::hash::Hasher for FlatHasher {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }
    impl BuildHasher for Flat {
        type Hasher = FlatHasher;
        fn build_hasher(&self) -> FlatHasher {
            FlatHasher
        }
    }

    /// Checks the map's shape: leaves in hash order, in the child their
    /// hashes pick, no larger than allowed, and the count right.
    fn check<K: Hash + Eq + Clone, V: Clone, S: BuildHasher>(m: &PMap<K, V, S>) {
        fn walk<K, V>(n: &Node<K, V>, depth: u32, path: u64, hash: &dyn Fn(&K) -> u64) -> usize {
            match n {
                Node::Empty => 0,
                Node::Leaf(es) => {
                    assert!(!es.is_empty(), "an empty leaf is Empty");
                    assert!(depth >= MAX_DEPTH || es.len() <= LEAF_MAX, "leaf too big");
                    let hs: Vec<u64> = es.iter().map(|e| hash(&e.0)).collect();
                    assert!(hs.windows(2).all(|w| w[0] <= w[1]), "out of order");
                    if depth > 0 {
                        let shift = 64 - BITS * depth;
                        assert!(hs.iter().all(|h| h >> shift == path), "misplaced");
                    }
                    es.len()
                }
                Node::Branch(b) => {
                    assert!(depth < MAX_DEPTH);
                    b.iter()
                        .enumerate()
                        .map(|(i, k)| walk(k, depth + 1, (path << BITS) | i as u64, hash))
                        .sum()
                }
            }
        }
        assert_eq!(walk(&m.root, 0, 0, &|k| m.hash(k)), m.len());
        assert_eq!(m.iter().count(), m.len());
    }

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// Random inserts, replaces, upserts and removes against std's HashMap, with
    /// copies taken along the way that must not change afterwards.
    fn model<S: BuildHasher + Default + Clone>(seed: u64, steps: usize, keys: u64) {
        let mut s = seed;
        let mut m: PMap<u64, u64, S> = PMap::default();
        let mut want: HashMap<u64, u64> = HashMap::new();
        let mut snaps = Vec::new();
        for step in 0..steps {
            let r = xorshift(&mut s);
            let k = r % keys;
            match (r >> 32) % 8 {
                0..=2 => assert_eq!(m.insert(k, r), want.insert(k, r), "seed {seed} step {step}"),
                3 => {
                    // A value made of the one there (changed in place when
                    // this version owns its leaf, copied when a snapshot shares it).
                    let w = want.get(&k).map_or(r, |v| v ^ r);
                    let got = m.upsert(k, |v| v.map_or(r, |v| v ^ r));
                    assert_eq!(got, want.insert(k, w), "seed {seed} step {step}");
                }
                4..=5 => assert_eq!(m.remove(&k), want.remove(&k), "seed {seed} step {step}"),
                6 => assert_eq!(m.get(&k), want.get(&k), "seed {seed} step {step}"),
                _ => {
                    if snaps.len() < 8 {
                        snaps.push((m.clone(), want.clone()));
                    }
                }
            }
            assert_eq!(m.len(), want.len(), "seed {seed} step {step}");
            if step % 97 == 0 {
                check(&m);
            }
        }
        check(&m);
        let got: HashMap<u64, u64> = m.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(got, want, "seed {seed}");
        // Equal to the same entries put in another order, and not to less.
        let mut fresh: PMap<u64, u64, S> = PMap::default();
        for (k, v) in &want {
            fresh.insert(*k, *v);
        }
        assert!(m == fresh, "seed {seed}");
        if let Some(k) = want.keys().next() {
            fresh.remove(k);
            assert!(m != fresh, "seed {seed}");
        }
        for (snap, was) in &snaps {
            check(snap);
            let got: HashMap<u64, u64> = snap.iter().map(|(k, v)| (*k, *v)).collect();
            assert_eq!(&got, was, "seed {seed}: a copy changed");
        }
        // Emptied, the map gives its branches back.
        for k in want.keys() {
            m.remove(k);
        }
        assert!(m.is_empty());
        assert!(matches!(m.root, Node::Empty), "seed {seed}");
    }

    #[test]
    fn matches_a_hash_map_and_copies_stay_as_they_were() {
        for seed in 1..=40u64 {
            let seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            // Few keys (many replaces), then many (deep tries).
            model::<BuildHasherDefault<rustc_hash::FxHasher>>(seed, 3_000, 64);
            model::<BuildHasherDefault<rustc_hash::FxHasher>>(seed, 6_000, 5_000);
        }
    }

    #[test]
    fn keys_that_collide_in_every_bit_share_the_deepest_leaf() {
        for seed in 1..=5u64 {
            model::<Flat>(seed * 0x2545_f491_4f6c_dd1d, 2_000, 100);
        }
    }

    #[test]
    fn a_remove_of_what_is_not_there_copies_nothing() {
        let mut m: PMap<u32, u32> = PMap::default();
        for i in 0..10_000 {
            m.insert(i, i);
        }
        let copy = m.clone();
        for i in 10_000..20_000 {
            assert_eq!(m.remove(&i), None);
        }
        let (Node::Branch(a), Node::Branch(b)) = (&m.root, &copy.root) else {
            panic!("10 000 entries make a branch");
        };
        assert!(Arc::ptr_eq(a, b));
    }

    /// Octets an entry at 100 000 entries, against imbl's hash trie (run
    /// by hand: `cargo test --release -p espd-core pmap_density --
    /// --ignored --nocapture`); the lookup time beside it.
    #[test]
    #[ignore]
    fn pmap_density() {
        use std::net::{IpAddr, Ipv4Addr};
        use std::time::Instant;
        fn rss() -> i64 {
            let s = std::fs::read_to_string("/proc/self/statm").unwrap();
            let pages: i64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
            pages * 4096
        }
        let n = 100_000u32;
        let key = |i: u32| {
            (
                IpAddr::V4(Ipv4Addr::from(0xc612_c800 + (i & 0x3fff))),
                0x1000_0000 + i,
            )
        };
        type Fx = BuildHasherDefault<rustc_hash::FxHasher>;
        let r0 = rss();
        let mut a: PMap<(IpAddr, u32), usize> = PMap::default();
        for i in 0..n {
            a.insert(key(i), i as usize);
        }
        let r1 = rss();
        let mut b: imbl::GenericHashMap<
            (IpAddr, u32),
            usize,
            Fx,
            imbl::shared_ptr::DefaultSharedPtr,
        > = Default::default();
        for i in 0..n {
            b.insert(key(i), i as usize);
        }
        let r2 = rss();
        // Alternating rounds, the median of each (the first warms up).
        let mut hit = 0usize;
        let mut time = |get: &dyn Fn(&(IpAddr, u32)) -> Option<usize>, r: u32| {
            let t = Instant::now();
            for i in 0..n {
                hit += get(&key(i.wrapping_mul(2_654_435_761).wrapping_add(r) % n)).unwrap_or(0);
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        };
        let (mut ta, mut tb) = (Vec::new(), Vec::new());
        for r in 0..9 {
            ta.push(time(&|k| a.get(k).copied(), r));
            tb.push(time(&|k| b.get(k).copied(), r));
        }
        ta.sort_by(f64::total_cmp);
        tb.sort_by(f64::total_cmp);
        let (ta, tb) = (ta[4], tb[4]);
        eprintln!(
            "octets an entry: pmap {:.0}, imbl {:.0}; lookup ns: pmap {ta:.1}, imbl {tb:.1} ({hit})",
            (r1 - r0) as f64 / f64::from(n),
            (r2 - r1) as f64 / f64::from(n),
        );
    }
}
