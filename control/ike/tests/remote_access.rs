//! Remote access in the sans-IO core: a gateway with `pools` and clients
//! with `vips` (RFC 7296 §2.19, §3.15) on a simulated network where both
//! clients share one address (as behind one NAT) and differ by port.

use espd_ike::conf;
use espd_ike::ike::{ChildSa, Dir, Endpoint, Output};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GW: &str = "198.18.0.1";
const CLIENTS: &str = "198.18.0.50";
const PSK: &str = "road-warrior-secret";

fn config(text: &str) -> Arc<conf::Config> {
    let d = std::env::temp_dir().join(format!(
        "espd-ike-ra-{}-{}",
        std::process::id(),
        espd_ike::crypto::random_u64()
    ));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("swanctl.conf");
    std::fs::write(&p, text).unwrap();
    Arc::new(conf::load(&p).unwrap_or_else(|e| panic!("{e:#?}")))
}

fn gateway(v4_pool: &str, extra: &str) -> Arc<conf::Config> {
    config(&format!(
        r#"pools {{
  rw4 {{ addrs = {v4_pool}
         dns = 198.18.1.53 }}
  rw6 {{ addrs = 2001:db8:100::/126 }}
}}
connections {{
  rw {{
    local_addrs = {GW}
    pools = rw4, rw6
    {extra}
    local {{ auth = psk
            id = gw }}
    remote {{ auth = psk }}
    children {{
      rw {{ local_ts = 198.18.1.0/24, 2001:db8:1::/64
            {extra_child} }}
    }}
  }}
}}
secrets {{
  ike-rw {{ id = gw
           secret = "{PSK}" }}
}}
"#,
        extra_child = if extra.is_empty() {
            ""
        } else {
            "rekey_time = 30s\n            rand_time = 0"
        }
    ))
}

fn client(id: &str, port: u16, vips: &str) -> Arc<conf::Config> {
    config(&format!(
        r#"connections {{
  home {{
    local_addrs = {CLIENTS}
    local_port = {port}
    remote_addrs = {GW}
    vips = {vips}
    local {{ auth = psk
            id = {id} }}
    remote {{ auth = psk
             id = gw }}
    children {{
      home {{ remote_ts = 198.18.1.0/24, 2001:db8:1::/64 }}
    }}
  }}
}}
secrets {{
  ike-1 {{ id-1 = gw
          id-2 = {id}
          secret = "{PSK}" }}
}}
"#
    ))
}

/// Endpoints by their UDP address; datagrams go to whoever owns the
/// destination (a client's replies come back to its own port).
struct Star {
    eps: Vec<(Vec<SocketAddr>, Endpoint)>,
    now: Instant,
    installs: Vec<Vec<(Dir, ChildSa)>>,
    removes: Vec<Vec<ChildSa>>,
    logs: Vec<Vec<String>>,
}

impl Star {
    fn new() -> Star {
        Star {
            eps: vec![],
            now: Instant::now(),
            installs: vec![],
            removes: vec![],
            logs: vec![],
        }
    }

    fn add(&mut self, addrs: &[SocketAddr], cfg: Arc<conf::Config>) -> usize {
        self.eps.push((addrs.to_vec(), Endpoint::new(cfg)));
        self.installs.push(vec![]);
        self.removes.push(vec![]);
        self.logs.push(vec![]);
        self.eps.len() - 1
    }

    fn run(&mut self, for_: Duration) {
        let end = self.now + for_;
        loop {
            let mut moved = false;
            for i in 0..self.eps.len() {
                while let Some(o) = self.eps[i].1.poll_output() {
                    moved = true;
                    match o {
                        Output::Send {
                            local,
                            remote,
                            data,
                        } => {
                            let now = self.now;
                            if let Some((_, e)) = self.eps.iter_mut().find(|(a, _)| {
                                a.iter()
                                    .any(|a| a.ip() == remote.ip() && a.port() == remote.port())
                            }) {
                                e.handle(now, remote, local, &data);
                            }
                        }
                        Output::Install { child, dir } => self.installs[i].push((dir, *child)),
                        Output::Remove { child, .. } => self.removes[i].push(*child),
                        Output::Log(l) => self.logs[i].push(l),
                    }
                }
            }
            if !moved {
                let t = self
                    .eps
                    .iter_mut()
                    .filter_map(|(_, e)| e.poll_timeout())
                    .min();
                match t {
                    Some(t) if t <= end => {
                        self.now = self.now.max(t);
                        for (_, e) in &mut self.eps {
                            e.handle_timeout(self.now);
                        }
                    }
                    _ => break,
                }
            }
        }
    }

    /// The outbound halves installed at endpoint `i` and not removed since.
    fn live(&self, i: usize) -> Vec<&ChildSa> {
        self.installs[i]
            .iter()
            .filter(|(d, c)| {
                *d == Dir::Out && !self.removes[i].iter().any(|r| r.spi_in == c.spi_in)
            })
            .map(|(_, c)| c)
            .collect()
    }
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn star(v4_pool: &str) -> Star {
    star_with(v4_pool, "")
}

fn star_with(v4_pool: &str, extra: &str) -> Star {
    let mut s = Star::new();
    s.add(&[sa(GW, 500), sa(GW, 4500)], gateway(v4_pool, extra));
    s
}

fn vips(s: &Star, i: usize) -> Vec<IpAddr> {
    let l = s.eps[i].1.list(s.now);
    assert_eq!(l.len(), 1, "{:#?}", s.logs[i]);
    l[0].local_vips.clone()
}

#[test]
fn two_clients_behind_one_address_get_their_own_addresses_selectors_and_reqids() {
    let mut s = star("198.18.100.0/29");
    let c1 = s.add(&[sa(CLIENTS, 500)], client("c1", 500, "0.0.0.0, ::"));
    let c2 = s.add(&[sa(CLIENTS, 1500)], client("c2", 1500, "0.0.0.0, ::"));
    s.eps[c1].1.initiate("home", None, s.now).unwrap();
    s.eps[c2].1.initiate("home", None, s.now).unwrap();
    s.run(Duration::from_secs(2));
    // §3.15.1: one address per family asked for; /29 without its network
    // address starts at .1, the /126 at ::1.
    let v1 = vips(&s, c1);
    let v2 = vips(&s, c2);
    assert_eq!(v1.len(), 2, "{v1:?} {:#?}", s.logs[c1]);
    assert_eq!(v2.len(), 2, "{v2:?}");
    let mut all: Vec<String> = v1.iter().chain(&v2).map(|a| a.to_string()).collect();
    all.sort();
    assert_eq!(
        all,
        [
            "198.18.100.1",
            "198.18.100.2",
            "2001:db8:100::1",
            "2001:db8:100::2"
        ]
    );
    // The gateway's children: `dynamic` is each client's virtual addresses,
    // and each has its own reqid (espd picks the SA by reqid and the
    // tunnel's endpoints, and both clients have the same address).
    let gw = s.live(0);
    assert_eq!(gw.len(), 2, "{:#?}", s.logs[0]);
    assert_ne!(gw[0].reqid, gw[1].reqid);
    for c in &gw {
        let client = if c.remote.port() == 500 { &v1 } else { &v2 };
        let remote: Vec<IpAddr> = c.ts_remote.iter().map(|t| t.start).collect();
        assert_eq!(&remote, client, "TS {:?}", c.ts_remote);
        assert!(c.ts_remote.iter().all(|t| t.start == t.end));
        assert_eq!(c.ts_local.len(), 2);
    }
    // The clients' own side is narrowed to what they were given.
    for (i, v) in [(c1, &v1), (c2, &v2)] {
        let c = s.live(i);
        assert_eq!(c.len(), 1);
        let local: Vec<IpAddr> = c[0].ts_local.iter().map(|t| t.start).collect();
        assert_eq!(&local, v);
    }
    let gwl = s.eps[0].1.list(s.now);
    assert!(gwl.iter().all(|x| x.remote_vips.len() == 2));
    let u = s.eps[0].1.pool_usage();
    assert_eq!((u[0].name.as_str(), u[0].online, u[0].size), ("rw4", 2, 6));
    assert_eq!((u[1].name.as_str(), u[1].online, u[1].size), ("rw6", 2, 3));
}

#[test]
fn an_exhausted_pool_refuses_with_internal_address_failure_and_a_returning_client_gets_its_address_back(
) {
    let mut s = star("198.18.100.1-198.18.100.1");
    let c1 = s.add(&[sa(CLIENTS, 500)], client("c1", 500, "0.0.0.0, ::"));
    let c2 = s.add(&[sa(CLIENTS, 1500)], client("c2", 1500, "0.0.0.0, ::"));
    let c3 = s.add(&[sa(CLIENTS, 2500)], client("c3", 2500, "0.0.0.0"));
    s.eps[c1].1.initiate("home", None, s.now).unwrap();
    s.run(Duration::from_secs(2));
    let v1 = vips(&s, c1);
    let four: IpAddr = "198.18.100.1".parse().unwrap();
    assert!(v1.contains(&four), "{v1:?}");
    // The IPv4 pool is empty now, the IPv6 one is not: c2 gets an IPv6
    // address only, and its child covers just that.
    s.eps[c2].1.initiate("home", None, s.now).unwrap();
    s.run(Duration::from_secs(2));
    let v2 = vips(&s, c2);
    assert_eq!(v2.len(), 1, "{v2:?}");
    assert!(v2[0].is_ipv6());
    assert_eq!(s.live(c2)[0].ts_local.len(), 1);
    // c3 asks for IPv4 only: nothing to give, RFC 7296 §3.10.1
    // INTERNAL_ADDRESS_FAILURE, no CHILD_SA; c3 gives the IKE_SA up.
    s.eps[c3].1.initiate("home", None, s.now).unwrap();
    s.run(Duration::from_secs(2));
    assert_eq!(s.eps[c3].1.sa_count(), 0, "{:#?}", s.logs[c3]);
    assert!(s.live(c3).is_empty());
    assert_eq!(s.eps[0].1.stats().get("vips-failed"), Some(&1));
    assert!(
        s.logs[c3]
            .iter()
            .any(|l| l.contains("INTERNAL_ADDRESS_FAILURE")),
        "{:#?}",
        s.logs[c3]
    );
    assert_eq!(s.live(0).len(), 2, "{:#?}", s.logs[0]);
    // c1 leaves: its addresses go offline but stay c1's...
    s.eps[c1].1.terminate("home", s.now);
    s.run(Duration::from_secs(2));
    assert_eq!(s.eps[c1].1.sa_count(), 0);
    assert!(s.logs[0]
        .iter()
        .any(|l| l.contains("virtual IP 198.18.100.1 released")));
    assert_eq!(s.live(0).len(), 1);
    // ...so when it comes back it has the same ones.
    s.eps[c1].1.initiate("home", None, s.now).unwrap();
    s.run(Duration::from_secs(2));
    assert_eq!(vips(&s, c1), v1);
}

#[test]
fn rekeys_keep_the_clients_addresses_leases_and_reqids() {
    // The gateway rekeys each client's IKE_SA every 50 s and its CHILD_SA
    // every 30 s (RFC 7296 §2.18, §2.8).
    let mut s = star_with("198.18.100.0/29", "rekey_time = 50s\n    rand_time = 0");
    let c1 = s.add(&[sa(CLIENTS, 500)], client("c1", 500, "0.0.0.0, ::"));
    let c2 = s.add(&[sa(CLIENTS, 1500)], client("c2", 1500, "0.0.0.0, ::"));
    s.eps[c1].1.initiate("home", None, s.now).unwrap();
    s.eps[c2].1.initiate("home", None, s.now).unwrap();
    s.run(Duration::from_secs(2));
    let (v1, v2) = (vips(&s, c1), vips(&s, c2));
    let reqids: Vec<u32> = s.live(0).iter().map(|c| c.reqid).collect();
    s.run(Duration::from_secs(125));
    let st = s.eps[0].1.stats();
    assert!(st.get("ike-rekeyed").copied().unwrap_or(0) >= 4, "{st:?}");
    assert!(
        st.get("child-rekeyed").copied().unwrap_or(0) >= 6,
        "{st:?} {:#?}",
        s.logs[0]
    );
    assert_eq!((vips(&s, c1), vips(&s, c2)), (v1.clone(), v2.clone()));
    let gw = s.eps[0].1.list(s.now);
    assert_eq!(gw.len(), 2);
    for x in &gw {
        assert_eq!(x.remote_vips.len(), 2);
        assert!(x.remote_vips == v1 || x.remote_vips == v2);
    }
    let u = s.eps[0].1.pool_usage();
    assert_eq!((u[0].online, u[0].offline, u[1].online), (2, 0, 2));
    let live = s.live(0);
    assert_eq!(live.len(), 2, "one CHILD_SA per client after the rekeys");
    let mut now_reqids: Vec<u32> = live.iter().map(|c| c.reqid).collect();
    let mut before = reqids.clone();
    now_reqids.sort();
    before.sort();
    assert_eq!(now_reqids, before, "a rekey keeps its reqid");
}

/// Two clients with one identity (a certificate or PSK identity shared by a
/// group): by default the second one's INITIAL_CONTACT (RFC 7296 §2.4)
/// clears the first at the gateway; `unique = never` on the clients sends
/// none, and on the gateway ignores it — strongSwan's meaning of the word.
#[test]
fn unique_never_sends_and_honours_no_initial_contact() {
    let ikes = |client_extra: &str, gw_extra: &str| {
        let mut s = star_with("198.18.100.0/29", gw_extra);
        let vips = format!("0.0.0.0, ::\n    {client_extra}");
        let c1 = s.add(&[sa(CLIENTS, 500)], client("shared", 500, &vips));
        let c2 = s.add(&[sa(CLIENTS, 1500)], client("shared", 1500, &vips));
        s.eps[c1].1.initiate("home", None, s.now).unwrap();
        s.run(Duration::from_secs(2));
        s.eps[c2].1.initiate("home", None, s.now).unwrap();
        s.run(Duration::from_secs(2));
        let cleared = s.logs[0].iter().any(|l| l.contains("INITIAL_CONTACT from"));
        (s.eps[0].1.list(s.now).len(), cleared)
    };
    assert_eq!(ikes("", ""), (1, true), "the default: the first is cleared");
    assert_eq!(ikes("unique = never", ""), (2, false), "clients send none");
    assert_eq!(
        ikes("", "unique = never"),
        (2, false),
        "the gateway acts on none"
    );
}
