//! The host path (`espd run --host`): this host's own traffic through the
//! engine (docs/architecture.md, "The host path").
//!
//! ```text
//!  sockets ──► route (table HOST_TABLE, rule `not fwmark HOST_MARK`) ──► espd0 ═veth═ espd0-x
//!                                                XDP espd_inside ──► AF_XDP ──► worker ──► outside
//!  sockets ◄── local delivery ◄── tc mark ◄── espd0 ═veth═ espd0-x ◄── TX ◄── worker ◄── ESP
//! ```
//! A veth pair stands where a gateway has its inside interface: the kernel
//! routes what the outbound PROTECT policies select into its end (`espd0`),
//! espd's XDP program on the other end (`espd0-x`) steers it into the
//! workers' AF_XDP sockets, and a decapsulated packet for this host is sent
//! back through the pair, marked on arrival by a tc program so the guard's
//! inbound XFRM entries (`mark 0/HOST_MARK`) let it by while plaintext from
//! the wire stays dropped. So every part of the gateway path — steering,
//! the burst engine, PMTU and ICMP, the inbound policy check, the sequence
//! store — serves the host unchanged.
//!
//! Fail closed (RFC 4301 §4.4.1, §5): each protected destination prefix has
//! two routes in the host table: through the pair, and `prohibit` under it
//! (a higher metric). The `prohibit` route goes in before the workers run on
//! a new policy, the pair route after, and at stop the pair routes go (the
//! `prohibit` ones stay, so applications get EACCES, not a leak). If espd
//! dies, the pair routes stay, but no program takes frames off espd0-x: its
//! kernel side drops them (addressed to espd0's own MAC, NOARP, so
//! PACKET_OTHERHOST). The guard's outbound entries match packets routed out
//! of the outside interface, so a host table emptied by hand still drops
//! IPv4 in the kernel (IPv6 sets the flow's output device only for bound
//! sockets: there the host table is the guard; docs/operations.md).

use anyhow::{bail, Context, Result};
use espd_core::state::{Action, Direction, Policy, Prefix};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

/// The routing table of protected destinations (RFC 4303's number).
pub const HOST_TABLE: u32 = 4303;
/// The priority of the rule that sends unmarked traffic to [`HOST_TABLE`]
/// (before `main`, 32766).
pub const HOST_RULE_PREF: u32 = 4303;
/// The metric of the pair routes (IPv6 reads 0 as 1024).
const PAIR_METRIC: u32 = 1;
/// The metric of the `prohibit` route under each pair route.
const PROHIBIT_METRIC: u32 = 4_294_967_295;
/// Room below the outside MTU for the outer headers: outer IPv6 (40),
/// UDP (8), ESP header and IV (16), padding, trailer and ICV (up to 33):
/// the pair routes carry the outside MTU less this (`mtu` on the route),
/// so the kernel sizes its TCP segments and fragments so that the ESP fits.
pub const OVERHEAD: usize = 100;
/// The pair's own MTU, on both ends: what the kernel sends is bounded by
/// the routes' MTU, but a decapsulated packet may be as large as the
/// peer's inside MTU (its ESP fragmented on the way, RFC 4301 §8.1), and a
/// veth drops a frame above its MTU. The largest a veth takes while its
/// peer (espd's end) has a single-buffer XDP program: a 4 KiB page less
/// the XDP headroom (256) and `skb_shared_info` (320), less the Ethernet
/// header; a UMEM frame (4 KiB) holds it.
pub const PAIR_MTU: usize = 3506;

/// The pair's espd end: `NAME-x` (15 characters at most, IFNAMSIZ).
pub fn espd_end(name: &str) -> String {
    format!("{name}-x")
}

/// Runs `ip [-4|-6] -batch -` with these lines (`force`: on past errors,
/// for removals). Route lines need no family (the prefix has one).
fn ip_batch(lines: &[String], force: bool) -> Result<()> {
    ip_batch_fam(None, lines, force)
}

fn ip_batch_fam(fam: Option<&str>, lines: &[String], force: bool) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    cmd.args(fam);
    if force {
        cmd.arg("-force");
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip (iproute2)")?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(lines.join("\n").as_bytes())?;
        i.write_all(b"\n")?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() && !force {
        bail!(
            "ip -batch: {}",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', "; ")
        );
    }
    Ok(())
}

fn sysctl(path: &str, v: &str) -> Result<()> {
    std::fs::write(path, v).with_context(|| format!("writing {path}"))
}

/// Creates the pair afresh (an old one, from an espd that died, goes: its
/// routes with it, the `prohibit` routes under them stay), `queues` queues
/// each way on both ends, [`PAIR_MTU`] on both, and the rule to the host
/// table.
pub fn create_pair(name: &str, queues: u32) -> Result<()> {
    let mtu = PAIR_MTU;
    if name.len() + 2 > 15 {
        bail!("--host-dev {name}: at most 13 characters (the pair's other end is {name}-x)");
    }
    let x = espd_end(name);
    if std::path::Path::new(&format!("/sys/class/net/{name}")).exists() {
        ip_batch(&[format!("link del {name}")], false)
            .with_context(|| format!("removing the old host pair {name}"))?;
    }
    // Queue counts on both ends (iproute2 applies them to one end only in
    // some word orders; checked below).
    ip_batch(
        &[
            format!(
                "link add {name} numtxqueues {queues} numrxqueues {queues} type veth peer name {x} numtxqueues {queues} numrxqueues {queues}"
            ),
            // NOARP: the kernel addresses frames to espd0's own MAC, so with
            // espd gone its other end drops them (PACKET_OTHERHOST).
            format!("link set {name} mtu {mtu} arp off"),
            format!("link set {x} mtu {mtu} arp off"),
        ],
        false,
    )
    .with_context(|| format!("creating the host pair {name} / {x}"))?;
    for end in [name, x.as_str()] {
        let n = std::fs::read_dir(format!("/sys/class/net/{end}/queues"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                    .count()
            })
            .unwrap_or(0);
        if n != queues as usize {
            bail!("host pair: {end} has {n} RX queues, {queues} were asked for");
        }
    }
    // espd's end carries no addresses and sends nothing of its own.
    sysctl(&format!("/proc/sys/net/ipv6/conf/{x}/disable_ipv6"), "1")?;
    // The pair's traffic is checked by espd's SPD, not by source routes:
    // the reverse path of a decapsulated packet is the pair itself, but a
    // strict check of a marked packet would look in `main`.
    sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"), "0")?;
    // espd's ICMP errors about the host's own packets ("fragmentation
    // needed", RFC 4301 §8.2.1) come from the host's address: IPv4 drops
    // a packet with a local source as a martian unless the device accepts
    // it (IPv6 has no such check). Only espd writes into the pair, and
    // what it writes passed its inbound policy check or is its own ICMP.
    sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/accept_local"), "1")?;
    sysctl(&format!("/proc/sys/net/ipv6/conf/{name}/accept_ra"), "0")?;
    ip_batch(
        &[format!("link set {x} up"), format!("link set {name} up")],
        false,
    )?;
    let m = espd_io::steer::HOST_MARK;
    for fam in ["-4", "-6"] {
        ip_batch_fam(
            Some(fam),
            &[format!("rule del pref {HOST_RULE_PREF}")],
            true,
        )?;
        ip_batch_fam(
            Some(fam),
            &[format!(
                "rule add pref {HOST_RULE_PREF} not fwmark {m:#x}/{m:#x} lookup {HOST_TABLE}"
            )],
            false,
        )
        .context("adding the host route rule")?;
    }
    Ok(())
}

/// `espd down`: the pair, the host table and its rule go.
pub fn remove(name: &str) -> Result<usize> {
    let mut n = 0;
    if std::path::Path::new(&format!("/sys/class/net/{name}")).exists() {
        ip_batch(&[format!("link del {name}")], false)?;
        n += 1;
    }
    for fam in ["-4", "-6"] {
        ip_batch_fam(
            Some(fam),
            &[
                format!("route flush table {HOST_TABLE}"),
                format!("rule del pref {HOST_RULE_PREF}"),
            ],
            true,
        )?;
    }
    Ok(n)
}

/// The host table's routes: one pair route and one `prohibit` route per
/// destination prefix of an outbound PROTECT or DISCARD policy, counted
/// by the policies that want it. A change costs what it touches (but for
/// the copy a change is staged on: a host holds few policies).
#[derive(Clone)]
pub struct Routes {
    dev: String,
    /// The pair routes' MTU (the outside's less [`OVERHEAD`]).
    mtu: usize,
    /// Prefix → (policies, the source selector of the first that has one:
    /// where the pair route's preferred source is picked from).
    by_prefix: BTreeMap<Prefix, (usize, Option<Prefix>)>,
    /// Prefixes whose pair route is in the table.
    live: BTreeSet<Prefix>,
}

/// Prefixes a change adds (first policy) and removes (last policy).
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Staged {
    pub added: Vec<Prefix>,
    pub removed: Vec<Prefix>,
}

/// Whether the host table takes this policy's destination: outbound
/// traffic it protects (a template) or blocks goes through espd.
fn routed(p: &Policy) -> bool {
    p.dir == Direction::Out && (p.action == Action::Block || !p.tmpls.is_empty())
}

impl Routes {
    pub fn new(dev: &str, mtu: usize) -> Routes {
        Routes {
            dev: dev.to_string(),
            mtu,
            by_prefix: BTreeMap::new(),
            live: BTreeSet::new(),
        }
    }

    /// Counts a change's policies (added `true`, removed `false`).
    pub fn stage<'a>(&mut self, changes: impl IntoIterator<Item = (bool, &'a Policy)>) -> Staged {
        let mut s = Staged::default();
        for (added, p) in changes {
            if !routed(p) {
                continue;
            }
            let k = p.sel.dst;
            if added {
                let (n, src) = self.by_prefix.entry(k).or_insert((0, None));
                *n += 1;
                if src.is_none() && p.sel.src.len > 0 {
                    *src = Some(p.sel.src);
                }
                if *n == 1 {
                    // Removed earlier in this change: it simply stays.
                    match s.removed.iter().position(|x| *x == k) {
                        Some(i) => {
                            s.removed.remove(i);
                        }
                        None => s.added.push(k),
                    }
                }
            } else if let Some((n, _)) = self.by_prefix.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.by_prefix.remove(&k);
                    match s.added.iter().position(|x| *x == k) {
                        Some(i) => {
                            s.added.remove(i);
                        }
                        None => s.removed.push(k),
                    }
                }
            }
        }
        s
    }

    /// Before the workers run on the change: new prefixes are prohibited.
    pub fn tighten(&mut self, s: &Staged) -> Result<()> {
        let lines: Vec<String> = s
            .added
            .iter()
            .map(|p| {
                format!("route replace prohibit {p} table {HOST_TABLE} metric {PROHIBIT_METRIC}")
            })
            .collect();
        ip_batch(&lines, false).context("host routes (prohibit)")
    }

    /// Once the workers run on it: new prefixes routed into the pair, and
    /// prefixes no policy wants any more removed (both routes).
    pub fn loosen(&mut self, s: &Staged) -> Result<()> {
        let mut lines = Vec::new();
        let local = espd_io::netlink::local_addrs(None).unwrap_or_default();
        let mut nl = espd_io::netlink::Rtnl::open().ok();
        for p in &s.added {
            // The source the host's sockets take (a route through a device
            // without addresses would get any of the host's): the policy's
            // own address, else an address of this host in the policy's
            // source prefix (a gateway's inside address, so that its own
            // traffic to the remote site is the tunnel's, as strongSwan's
            // routes do), else the one the host uses to reach the prefix
            // without espd (`ip route get DST mark HOST_MARK`).
            let hint = self.by_prefix.get(p).and_then(|e| e.1).and_then(|sel| {
                local
                    .iter()
                    .copied()
                    .filter(|a| !a.is_loopback() && sel.contains(*a))
                    .min_by_key(|a| *a != sel.addr)
            });
            let src =
                hint.or_else(
                    || match nl.as_mut()?.route_get(p.addr, espd_io::steer::HOST_MARK) {
                        Ok(espd_io::netlink::Route::Unicast { src, .. }) => src,
                        _ => None,
                    },
                );
            let src = src.map_or(String::new(), |a| format!(" src {a}"));
            // IPv6 needs 1280 on every link (RFC 8200 §5).
            let mtu = if p.is_ipv4() {
                self.mtu
            } else {
                self.mtu.max(1280)
            };
            lines.push(format!(
                "route replace {p} dev {} table {HOST_TABLE} metric {PAIR_METRIC}{src} mtu {mtu}",
                self.dev
            ));
        }
        ip_batch(&lines, false).context("host routes (through the pair)")?;
        for p in &s.added {
            self.live.insert(*p);
        }
        let mut gone = Vec::new();
        for p in &s.removed {
            gone.push(format!(
                "route del {p} dev {} table {HOST_TABLE} metric {PAIR_METRIC}",
                self.dev
            ));
            gone.push(format!(
                "route del prohibit {p} table {HOST_TABLE} metric {PROHIBIT_METRIC}"
            ));
            self.live.remove(p);
        }
        ip_batch(&gone, true)
    }

    /// At stop: the pair routes go, the `prohibit` routes stay.
    pub fn withdraw(&mut self) -> Result<()> {
        let lines: Vec<String> = self
            .live
            .iter()
            .map(|p| {
                format!(
                    "route del {p} dev {} table {HOST_TABLE} metric {PAIR_METRIC}",
                    self.dev
                )
            })
            .collect();
        self.live.clear();
        ip_batch(&lines, true)
    }

    /// Prefixes routed now.
    pub fn len(&self) -> usize {
        self.by_prefix.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use espd_config::Config;

    fn pols(text: &str) -> Vec<Policy> {
        let cfg = Config::parse("t.conf", text).unwrap();
        Direction::ALL
            .iter()
            .flat_map(|d| cfg.spd.policies(*d))
            .cloned()
            .collect()
    }

    #[test]
    fn routes_follow_outbound_protect_and_discard_prefixes_by_count() {
        let a = pols(
            "policy add src 198.18.0.1 dst 198.18.0.2 dir out tmpl proto esp reqid 1 mode transport
policy add src 198.18.0.2 dst 198.18.0.1 dir in tmpl proto esp reqid 1 mode transport
policy add src 198.18.0.1 dst 198.18.0.2 proto tcp dport 22 dir out priority 10 action block
policy add src 198.18.0.1 dst 198.18.9.0/24 dir out priority 10
policy add src 2001:db8::1 dst 2001:db8::2 dir out tmpl proto esp reqid 2 mode transport
",
        );
        let mut r = Routes::new("espd0", 1400);
        let s = r.stage(a.iter().map(|p| (true, p)));
        // The in policy and the bypass are not routed; two policies share
        // 198.18.0.2/32, which is routed once.
        let v4 = Prefix::host("198.18.0.2".parse().unwrap());
        let v6 = Prefix::host("2001:db8::2".parse().unwrap());
        assert_eq!(s.added, vec![v4, v6]);
        assert!(s.removed.is_empty());
        assert_eq!(r.len(), 2);
        // Removing one of the two keeps the route; the second removes it.
        let to = |d: Prefix, block: bool| {
            a.iter()
                .find(|p| {
                    p.dir == Direction::Out
                        && p.sel.dst == d
                        && (p.action == Action::Block) == block
                })
                .unwrap()
        };
        let s = r.stage([(false, to(v4, false))]);
        assert_eq!(s, Staged::default());
        let s = r.stage([(false, to(v4, true))]);
        assert_eq!(s.removed, vec![v4]);
        // Removed and added back in one change: nothing to do.
        let s = r.stage([(false, to(v6, false)), (true, to(v6, false))]);
        assert_eq!(s, Staged::default());
        assert_eq!(r.len(), 1);
    }
}
