//! Virtual-address leases for remote-access clients, sans-IO: the
//! addresses of `pools { NAME { addrs = … } }` handed out in CFG_REPLY
//! (RFC 7296 §2.19, §3.15).
//!
//! A lease belongs to one IKE_SA while it is online. When the IKE_SA ends
//! it goes offline but stays bound to the client's identity, so a client
//! that reconnects gets its address back (its peers' caches and its
//! sockets stay right); when a pool has never-used addresses no more, the
//! longest-offline lease is taken over. Two IKE_SAs of one identity at
//! once (one certificate on two devices) get two addresses. Nothing here
//! grows with the pool's size: a /64 costs what a /30 does.

use crate::conf::Pool;
use crate::ts::{addr_of, u128_of};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

/// One pool's addresses and who holds them, by offset from `first`.
struct PoolState {
    range: (IpAddr, IpAddr),
    /// Addresses in the range.
    size: u128,
    /// Offsets below this have been handed out at least once.
    next: u128,
    /// Online leases: offset → identity.
    online: HashMap<u128, Vec<u8>>,
    /// Offline leases: identity → offset, and offset → identity.
    offline_by_id: HashMap<Vec<u8>, u128>,
    offline: HashMap<u128, Vec<u8>>,
    /// Offline offsets, oldest first (stale entries are skipped).
    order: VecDeque<u128>,
}

impl PoolState {
    fn new(p: &Pool) -> PoolState {
        PoolState {
            range: (p.first, p.last),
            size: u128_of(p.last) - u128_of(p.first) + 1,
            next: 0,
            online: HashMap::new(),
            offline_by_id: HashMap::new(),
            offline: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn addr(&self, off: u128) -> IpAddr {
        addr_of(self.range.0.is_ipv4(), u128_of(self.range.0) + off)
    }

    fn offset(&self, a: IpAddr) -> Option<u128> {
        let (f, l) = (u128_of(self.range.0), u128_of(self.range.1));
        let x = u128_of(a);
        (a.is_ipv4() == self.range.0.is_ipv4() && f <= x && x <= l).then(|| x - f)
    }

    fn take_offline(&mut self, off: u128) {
        if let Some(id) = self.offline.remove(&off) {
            self.offline_by_id.remove(&id);
        }
    }

    fn acquire(&mut self, id: &[u8], want: Option<IpAddr>) -> Option<IpAddr> {
        // The address the client asks for, if it is free or its own (an
        // offline lease with no owner is free for anyone).
        if let Some(off) = want.and_then(|a| self.offset(a)) {
            let free = !self.online.contains_key(&off)
                && match self.offline.get(&off) {
                    Some(owner) => owner == id || owner.is_empty(),
                    None => off >= self.next,
                };
            if free {
                // One handed out ahead of the counter is skipped by it later.
                self.take_offline(off);
                self.online.insert(off, id.to_vec());
                return Some(self.addr(off));
            }
        }
        // Its own offline lease.
        if let Some(off) = self.offline_by_id.get(id).copied() {
            self.take_offline(off);
            self.online.insert(off, id.to_vec());
            return Some(self.addr(off));
        }
        // A never-used address.
        while self.next < self.size {
            let off = self.next;
            self.next += 1;
            if let std::collections::hash_map::Entry::Vacant(e) = self.online.entry(off) {
                e.insert(id.to_vec());
                return Some(self.addr(off));
            }
        }
        // The longest-offline lease.
        while let Some(off) = self.order.pop_front() {
            if self.offline.contains_key(&off) {
                self.take_offline(off);
                self.online.insert(off, id.to_vec());
                return Some(self.addr(off));
            }
        }
        None
    }

    fn release(&mut self, a: IpAddr) -> bool {
        let Some(off) = self.offset(a) else {
            return false;
        };
        let Some(id) = self.online.remove(&off) else {
            return false;
        };
        // One offline lease per identity: an older one is free for anyone.
        if let Some(old) = self.offline_by_id.insert(id.clone(), off) {
            self.offline.remove(&old);
            self.order.push_front(old);
            self.offline.insert(old, Vec::new());
        }
        self.offline.insert(off, id);
        self.order.push_back(off);
        true
    }
}

/// Every pool's leases.
#[derive(Default)]
pub struct Leases {
    pools: HashMap<String, PoolState>,
}

/// A pool's use, for `espctl ike stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUse {
    pub name: String,
    pub size: u128,
    pub online: usize,
    pub offline: usize,
}

impl Leases {
    /// Takes a new configuration: a pool whose range is unchanged keeps its
    /// leases; a changed or removed one starts afresh (addresses still
    /// held by live IKE_SAs are released into nothing).
    pub fn configure(&mut self, pools: &[Pool]) {
        let mut old = std::mem::take(&mut self.pools);
        for p in pools {
            let st = match old.remove(&p.name) {
                Some(st) if st.range == (p.first, p.last) => st,
                _ => PoolState::new(p),
            };
            self.pools.insert(p.name.clone(), st);
        }
    }

    /// An address from `pool` for the client `id` (its identity's
    /// octets), `want` if it asked for a specific one that is free to it.
    pub fn acquire(&mut self, pool: &str, id: &[u8], want: Option<IpAddr>) -> Option<IpAddr> {
        self.pools.get_mut(pool)?.acquire(id, want)
    }

    /// The IKE_SA holding `addr` of `pool` is gone.
    pub fn release(&mut self, pool: &str, addr: IpAddr) -> bool {
        self.pools.get_mut(pool).is_some_and(|p| p.release(addr))
    }

    pub fn usage(&self) -> Vec<PoolUse> {
        let mut v: Vec<PoolUse> = self
            .pools
            .iter()
            .map(|(n, p)| PoolUse {
                name: n.clone(),
                size: p.size,
                online: p.online.len(),
                offline: p.offline_by_id.len(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, first: &str, last: &str) -> Pool {
        Pool {
            name: name.into(),
            first: first.parse().unwrap(),
            last: last.parse().unwrap(),
            dns: vec![],
            at: "t:1".into(),
        }
    }

    fn a(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn a_client_gets_its_address_back_and_two_get_two() {
        let mut l = Leases::default();
        l.configure(&[pool("rw", "198.18.100.1", "198.18.100.3")]);
        assert_eq!(l.acquire("rw", b"c1", None), a("198.18.100.1"));
        assert_eq!(l.acquire("rw", b"c2", None), a("198.18.100.2"));
        // The same identity twice at once: a second address.
        assert_eq!(l.acquire("rw", b"c1", None), a("198.18.100.3"));
        assert_eq!(l.acquire("rw", b"c3", None), None, "exhausted");
        assert!(l.release("rw", "198.18.100.1".parse().unwrap()));
        assert!(!l.release("rw", "198.18.100.1".parse().unwrap()), "twice");
        // c1's offline lease is still c1's while c3 is refused nothing else...
        assert_eq!(l.acquire("rw", b"c1", None), a("198.18.100.1"));
        assert!(l.release("rw", "198.18.100.2".parse().unwrap()));
        // ...but the longest-offline lease goes to a newcomer when nothing else is left.
        assert_eq!(l.acquire("rw", b"c3", None), a("198.18.100.2"));
        assert_eq!(l.acquire("rw", b"c2", None), None);
        let u = &l.usage()[0];
        assert_eq!((u.size, u.online, u.offline), (3, 3, 0));
    }

    #[test]
    fn a_requested_address_is_given_only_when_free_to_that_client() {
        let mut l = Leases::default();
        l.configure(&[pool("rw", "198.18.100.1", "198.18.100.9")]);
        assert_eq!(l.acquire("rw", b"c1", a("198.18.100.5")), a("198.18.100.5"));
        // Taken: c2 asking for it gets another one; the counter skips .5 later.
        assert_eq!(l.acquire("rw", b"c2", a("198.18.100.5")), a("198.18.100.1"));
        for i in 2..=4 {
            assert_eq!(l.acquire("rw", b"x", None), a(&format!("198.18.100.{i}")));
        }
        assert_eq!(l.acquire("rw", b"x", None), a("198.18.100.6"));
        // Outside the pool or of the other family: ignored.
        assert_eq!(l.acquire("rw", b"c3", a("2001:db8::1")), a("198.18.100.7"));
        l.release("rw", "198.18.100.5".parse().unwrap());
        // c1's offline .5 is not c4's to ask for while a never-used one is left.
        assert_eq!(l.acquire("rw", b"c4", a("198.18.100.5")), a("198.18.100.8"));
        assert_eq!(l.acquire("rw", b"c1", a("198.18.100.5")), a("198.18.100.5"));
    }

    #[test]
    fn a_huge_ipv6_pool_costs_nothing_and_a_reload_keeps_unchanged_pools() {
        let mut l = Leases::default();
        let v6 = pool("v6", "2001:db8:100::1", "2001:db8:100::ffff:ffff:ffff:ffff");
        l.configure(&[v6.clone(), pool("v4", "198.18.100.1", "198.18.100.2")]);
        assert_eq!(l.acquire("v6", b"c1", None), a("2001:db8:100::1"));
        assert_eq!(l.acquire("v4", b"c1", None), a("198.18.100.1"));
        l.configure(&[v6, pool("v4", "198.18.100.1", "198.18.100.3")]);
        // v6 unchanged: c1's lease is still online there; v4 changed: afresh.
        assert_eq!(l.acquire("v6", b"c2", None), a("2001:db8:100::2"));
        assert_eq!(l.acquire("v4", b"c2", None), a("198.18.100.1"));
        assert!(!l.release("v4", "198.18.100.2".parse().unwrap()));
        assert_eq!(l.acquire("gone", b"c1", None), None);
    }
}
