//! Next hops from the kernel's routing and neighbour tables.
//!
//! One resolver thread owns an rtnetlink socket. Workers look destinations
//! up in their own cache; a miss asks the shared table, and a destination
//! nobody asked for before is queued to the resolver while its packet is
//! dropped as `NoNeighbour` (as a router drops while ARP/ND runs; Linux
//! queues a few, espd does not). The resolver answers in well under a
//! millisecond on a LAN, re-checks every known destination once a second
//! (so `ip route` / `ip neigh` changes take effect within a second) and tells
//! the kernel the neighbours in use (`NTF_USE`), so their entries stay fresh
//! although the kernel never sees the traffic. Any change bumps an epoch and
//! the workers drop their caches at the next burst.

use espd_io::netlink::{Route, Rtnl};
use rustc_hash::FxHashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where a packet for a destination goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// Out of a side (`xsk::INSIDE`, `OUTSIDE`, `HOST`) to this MAC.
    Hop { side: usize, mac: [u8; 6] },
    /// The kernel has no unicast route through espd's interfaces.
    NoRoute,
    /// Addressed to this host.
    Local,
    /// The neighbour is being resolved.
    Pending,
}

/// Destinations remembered at most.
const MAX_DESTINATIONS: usize = 65_536;

/// The shared table.
pub struct Table {
    map: Mutex<FxHashMap<IpAddr, Resolved>>,
    epoch: AtomicU64,
    ask: Mutex<Sender<IpAddr>>,
}

impl Table {
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The shared answer for `dst`, asking the resolver on first sight.
    pub fn lookup(&self, dst: IpAddr) -> Resolved {
        let mut m = self.map.lock().expect("nexthop table lock");
        if let Some(r) = m.get(&dst) {
            return *r;
        }
        if m.len() >= MAX_DESTINATIONS {
            // A bound on memory whatever the traffic: start over (the
            // resolver refills what is in use), like a route cache flush.
            m.clear();
            self.epoch.fetch_add(1, Ordering::Release);
        }
        m.insert(dst, Resolved::Pending);
        drop(m);
        let _ = self.ask.lock().expect("ask lock").send(dst);
        Resolved::Pending
    }
}

/// A worker's cache in front of the table.
pub struct Cache {
    table: Arc<Table>,
    local: FxHashMap<IpAddr, Resolved>,
    epoch: u64,
}

impl Cache {
    pub fn new(table: Arc<Table>) -> Self {
        Cache {
            epoch: table.epoch(),
            table,
            local: FxHashMap::default(),
        }
    }

    /// Once per burst: forget everything if the table changed (and say so).
    pub fn sync(&mut self) -> bool {
        let e = self.table.epoch();
        if e != self.epoch {
            self.epoch = e;
            self.local.clear();
            return true;
        }
        false
    }

    pub fn get(&mut self, dst: IpAddr) -> Resolved {
        if let Some(r) = self.local.get(&dst) {
            return *r;
        }
        let r = self.table.lookup(dst);
        // Pending answers are not cached: the next packet asks again.
        if r != Resolved::Pending {
            self.local.insert(dst, r);
        }
        r
    }
}

/// espd's interfaces, by ifindex.
#[derive(Clone, Copy)]
pub struct Links {
    pub inside: u32,
    pub outside: u32,
    /// Host mode: where packets for this host go. Lookups then carry the
    /// host mark so the host route rule does not send them into the pair.
    pub host: Option<HostLink>,
}

/// The host pair as the workers reach it.
#[derive(Clone, Copy)]
pub struct HostLink {
    /// The MAC of the kernel's end of the pair.
    pub mac: [u8; 6],
    /// The workers' side of espd's end: `xsk::INSIDE` in host mode alone
    /// (the pair is the inside), `xsk::HOST` beside an inside interface.
    pub side: usize,
}

impl Links {
    fn mark(&self) -> u32 {
        if self.host.is_some() {
            espd_io::steer::HOST_MARK
        } else {
            0
        }
    }
}

/// `kick`: ask the kernel to (re)resolve a missing neighbour; pending
/// destinations are re-checked often but kicked once a second, as the
/// kernel's own probes are paced.
fn resolve(nl: &mut Rtnl, links: Links, dst: IpAddr, kick: bool) -> Resolved {
    match nl.route_get(dst, links.mark()) {
        // Host mode: delivered through the pair, to the kernel's end.
        Ok(Route::Local) => match links.host {
            Some(h) => Resolved::Hop {
                side: h.side,
                mac: h.mac,
            },
            None => Resolved::Local,
        },
        Ok(Route::Unicast { oif, via, .. }) => {
            let side = if oif == links.inside {
                espd_io::xsk::INSIDE
            } else if oif == links.outside {
                espd_io::xsk::OUTSIDE
            } else {
                return Resolved::NoRoute;
            };
            match nl.neigh_get(oif, via) {
                Ok(Some(mac)) => Resolved::Hop { side, mac },
                _ => {
                    if kick {
                        let _ = nl.neigh_use(oif, via);
                    }
                    Resolved::Pending
                }
            }
        }
        Ok(Route::None) | Err(_) => Resolved::NoRoute,
    }
}

/// Starts the resolver; `warm` are destinations to resolve before traffic
/// (the SAs' peers). It stops when `stop` is set.
pub fn start(
    links: Links,
    warm: Vec<IpAddr>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<(Arc<Table>, std::thread::JoinHandle<()>)> {
    let mut nl = Rtnl::open()?;
    let (tx, rx) = channel();
    let table = Arc::new(Table {
        map: Mutex::new(FxHashMap::default()),
        epoch: AtomicU64::new(0),
        ask: Mutex::new(tx),
    });
    for d in warm {
        table.lookup(d);
    }
    let t = Arc::clone(&table);
    let h = std::thread::Builder::new()
        .name("espd-nexthop".into())
        .spawn(move || run(&mut nl, links, &t, &rx, &stop))?;
    Ok((table, h))
}

fn run(nl: &mut Rtnl, links: Links, t: &Table, rx: &Receiver<IpAddr>, stop: &AtomicBool) {
    let mut last_full = Instant::now();
    let mut last_use = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // New destinations first; pending ones are retried every 10 ms.
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(d) => update(nl, links, t, &[d], true),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let pending: Vec<IpAddr> = {
            let m = t.map.lock().expect("nexthop table lock");
            m.iter()
                .filter(|(_, r)| **r == Resolved::Pending)
                .map(|(d, _)| *d)
                .collect()
        };
        if !pending.is_empty() {
            update(nl, links, t, &pending, false);
        }
        if last_full.elapsed() >= Duration::from_secs(1) {
            last_full = Instant::now();
            let all: Vec<IpAddr> = t.map.lock().expect("lock").keys().copied().collect();
            update(nl, links, t, &all, true);
        }
        if last_use.elapsed() >= Duration::from_secs(5) {
            last_use = Instant::now();
            // Keep the kernel's entries for our next hops fresh.
            let all: Vec<IpAddr> = t.map.lock().expect("lock").keys().copied().collect();
            for d in all {
                if let Ok(Route::Unicast { oif, via, .. }) = nl.route_get(d, links.mark()) {
                    let _ = nl.neigh_use(oif, via);
                }
            }
        }
    }
}

/// Resolves `dsts` and publishes any change.
fn update(nl: &mut Rtnl, links: Links, t: &Table, dsts: &[IpAddr], kick: bool) {
    let fresh: Vec<(IpAddr, Resolved)> = dsts
        .iter()
        .map(|d| (*d, resolve(nl, links, *d, kick)))
        .collect();
    let mut m = t.map.lock().expect("nexthop table lock");
    let mut changed = false;
    for (d, r) in fresh {
        if m.insert(d, r) != Some(r) {
            changed = true;
        }
    }
    drop(m);
    if changed {
        t.epoch.fetch_add(1, Ordering::Release);
    }
}
