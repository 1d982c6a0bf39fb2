//! The IKEv2 protocol engine, sans-IO (RFC 7296): datagrams and time go
//! in ([`Endpoint::handle`], [`Endpoint::handle_timeout`], [`Endpoint::initiate`]);
//! datagrams to send, CHILD_SAs to install or remove and log lines come
//! out, in the order they must happen ([`Endpoint::poll_output`]). The
//! daemon (main.rs) owns the sockets and espd's control connection; tests
//! put two endpoints in one process with a simulated network.

use crate::cert;
use crate::conf::{self, Child, CloseAction, Config, Conn, DpdAction, IdConf, Mode, StartAction};
use crate::crypto::{self, IkeKeys, KeyShare, Secret};
use crate::pool::Leases;
use crate::proposal::{self, Chosen};
use crate::ts;
use crate::wire::{self, exchange, flags, notify, Header, Id, Payload, Proposal, Ts, HDR_LEN};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// RFC 7296 §2.23: IKE moves to this port when a NAT is detected.
pub const NATT_PORT: u16 = 4500;
/// Retransmission: the first after this long, doubling (RFC 7296 §2.1).
pub const RETRANSMIT_BASE: Duration = Duration::from_millis(1000);
/// Retransmissions before giving up on the peer.
pub const RETRANSMIT_TRIES: u32 = 6;
/// A responder's half-open IKE SA waits this long for IKE_AUTH.
pub const HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Above this many half-open SAs, IKE_SA_INIT needs a COOKIE (RFC 7296 §2.6).
pub const COOKIE_THRESHOLD: usize = 1000;
/// Half-open SAs one peer address may hold.
pub const HALF_OPEN_PER_PEER: usize = 100;
/// COOKIE / INVALID_KE_PAYLOAD retries an initiator makes.
const INIT_RETRIES: u32 = 3;
/// Our nonce length (RFC 7296 §2.10: at least half the PRF's key size; 32 covers SHA-512's 256 bits).
const NONCE_LEN: usize = 32;

/// The responder's pick: child config, algorithms, the peer's SPI, the
/// proposal number, narrowed TSi and TSr, transport mode.
type ChildChoice = (Child, Chosen, u32, u8, Vec<Ts>, Vec<Ts>, bool);

/// A CHILD_SA for espd: both directions' SPIs, keys and selectors.
#[derive(Clone)]
pub struct ChildSa {
    /// The IKE SA (our SPI) that owns it.
    pub ike: u64,
    pub conn: String,
    pub name: String,
    pub reqid: u32,
    pub mode: Mode,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// UDP encapsulation (RFC 3948): NAT detected or `encap = yes`.
    pub encap: bool,
    pub spi_in: u32,
    pub spi_out: u32,
    pub alg: Chosen,
    pub key_in: Secret,
    pub key_out: Secret,
    pub ts_local: Vec<Ts>,
    pub ts_remote: Vec<Ts>,
    pub replay_window: u32,
    pub life_time: Duration,
    pub rekey_time: Duration,
    /// The child's `rand_time` (None: 10 % of `rekey_time`).
    pub rand_time: Option<Duration>,
    /// Volume lifetimes for espd (0 none): rekey and life bytes, rekey and
    /// life packets.
    pub volume: [u64; 4],
    /// Policies installed at load for `start_action = trap`.
    pub trap: bool,
    /// The peer did not send ESP_TFC_PADDING_NOT_SUPPORTED (RFC 7296
    /// §3.10.1). espd never pads outbound ESP, so either way nothing it
    /// sends carries TFC padding; kept for `espctl ike sas`.
    pub peer_takes_tfc: bool,
    pub installed_at: Instant,
}

impl std::fmt::Debug for ChildSa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ChildSa {{ {} in {:08x} out {:08x} {} keys <redacted> }}",
            self.name,
            self.spi_in,
            self.spi_out,
            self.alg.describe()
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    In,
    Out,
}

/// What the endpoint asks of the world, in order.
#[derive(Debug)]
pub enum Output {
    Send {
        local: SocketAddr,
        remote: SocketAddr,
        data: Vec<u8>,
    },
    /// Install one direction of a CHILD_SA (its SA and the policies of
    /// that direction). The inbound half always comes first.
    Install {
        child: Box<ChildSa>,
        dir: Dir,
    },
    /// Remove a CHILD_SA (both directions).
    Remove {
        child: Box<ChildSa>,
        why: String,
    },
    Log(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Initiator: IKE_SA_INIT sent.
    InitSent,
    /// Responder: IKE_SA_INIT answered, waiting for IKE_AUTH (half-open).
    InitDone,
    /// Initiator: IKE_AUTH sent.
    AuthSent,
    Established,
    /// We sent a DELETE for the IKE SA.
    Deleting,
}

/// A request we sent and wait an answer for (window size 1, RFC 7296 §2.3).
enum ReqKind {
    Init,
    Auth {
        child: Option<PendingChild>,
    },
    CreateChild(PendingChild),
    DeleteIke,
    DeleteChild(u32),
    Liveness,
    /// RFC 7296 §2.18: our new SPI, nonce and key share for the new IKE SA.
    RekeyIke {
        spi: u64,
        nonce: Vec<u8>,
        ks: KeyShare,
    },
}

struct PendingChild {
    name: String,
    /// The inbound SPI of the child this one replaces (REKEY_SA).
    rekey: Option<u32>,
    spi_in: u32,
    ts_i: Vec<Ts>,
    ts_r: Vec<Ts>,
    nonce: Vec<u8>,
    ke: Option<KeyShare>,
    /// RFC 7296 §2.8.1: the peer rekeyed the same child while this rekey
    /// was out — the inbound SPI of the child its exchange made, and that
    /// exchange's two nonces (its Ni, our Nr).
    collision: Option<(u32, Vec<u8>, Vec<u8>)>,
}

struct Pending {
    msg_id: u32,
    /// The datagrams of the request (several when fragmented).
    data: Vec<Vec<u8>>,
    kind: ReqKind,
    tries: u32,
    next: Instant,
}

/// Requests waiting for the window.
enum Queued {
    Child {
        name: String,
        packet: Option<(Ts, Ts)>,
    },
    DeleteIke,
    DeleteChild(u32),
    /// Rekey the CHILD_SA with this inbound SPI (RFC 7296 §2.8).
    Rekey(u32),
    /// Rekey the IKE SA (RFC 7296 §2.18), with this group if the peer
    /// asked for another (INVALID_KE_PAYLOAD).
    RekeyIke(Option<u16>),
}

/// RFC 7383 reassembly bounds: fragments of one message, and its octets.
const MAX_FRAGMENTS: usize = 32;
const MAX_REASSEMBLY: usize = 64 * 1024;

/// An IKE message arriving in fragments (RFC 7383 §2.6).
struct Reasm {
    msg_id: u32,
    response: bool,
    first: u8,
    bytes: usize,
    parts: Vec<Option<Secret>>,
}

/// How long a failed rekey waits before it is tried again.
const REKEY_RETRY: Duration = Duration::from_secs(30);

/// How long a rekeyed IKE SA waits for the peer's DELETE before we send
/// our own (RFC 7296 §2.18: the rekey's initiator deletes the old SA).
const SUPERSEDED_WAIT: Duration = Duration::from_secs(30);

/// A child's rekey hold while it is being rekeyed or has been replaced:
/// lifted only when the child goes.
const UNTIL_REPLACED: Duration = Duration::from_secs(86400 * 365);

/// RFC 7296 §2.8.1 (and §2.8.2 for IKE SAs): whether our rekey exchange
/// (nonces `our_ni`, `their_nr`) holds the lowest of the four nonces of two
/// crossing rekeys of one SA — its new SA is then the redundant one, closed
/// by us. "Lowest"
/// is octet by octet, a nonce that ends first being the lower: the order
/// of byte slices.
fn rekey_lost(our_ni: &[u8], their_nr: &[u8], their_ni: &[u8], our_nr: &[u8]) -> bool {
    our_ni.min(their_nr) < their_ni.min(our_nr)
}

/// When we rekey a child: `rekey_time` less a jitter of up to `rand_time`
/// (10 % of `rekey_time` by default; at most the margin to `life_time`),
/// different per SA, so that the two ends and many tunnels do not all
/// rekey at once (strongSwan's `rand_time`). RFC 7296 §2.8.1 makes
/// collisions rare, not impossible: [`Endpoint`] resolves them.
fn rekey_due(c: &ChildSa) -> Instant {
    let span = c
        .rand_time
        .unwrap_or(c.rekey_time / 10)
        .min(c.life_time.saturating_sub(c.rekey_time));
    let jitter = span.mul_f64((c.spi_in % 1024) as f64 / 1024.0);
    c.installed_at + c.rekey_time.saturating_sub(jitter)
}

struct IkeSa {
    conn: String,
    initiator: bool,
    spi_i: u64,
    spi_r: u64,
    local: SocketAddr,
    remote: SocketAddr,
    state: State,
    nonce_i: Vec<u8>,
    nonce_r: Vec<u8>,
    keyshare: Option<KeyShare>,
    chosen: Option<Chosen>,
    keys: Option<IkeKeys>,
    /// RFC 7296 §2.15 RealMessage1/2: the IKE_SA_INIT request and response.
    init_req: Vec<u8>,
    init_resp: Vec<u8>,
    /// UDP-encapsulate (NAT seen, or forced by `encap = yes`).
    nat: bool,
    next_req_id: u32,
    expect_req_id: u32,
    pending: Option<Pending>,
    queue: VecDeque<Queued>,
    last_resp: Option<(u32, Vec<Vec<u8>>)>,
    /// RFC 7383: the peer announced IKE fragmentation (and we did).
    peer_frag: bool,
    /// RFC 7427 §4: the peer announced SIGNATURE_HASH_ALGORITHMS.
    peer_hashes: bool,
    children: Vec<ChildSa>,
    /// Children (inbound SPI) not to rekey before the instant: being
    /// rekeyed, rekeyed by the peer, or waiting to retry.
    rekey_hold: HashMap<u32, Instant>,
    /// Set up again by `dpd_action = restart`: if the peer still does not
    /// answer, it is tried again.
    restart: bool,
    reasm: Option<Reasm>,
    /// Initiator: the child to set up in IKE_AUTH (name, trap packet).
    first_child: Option<(String, Option<(Ts, Ts)>)>,
    init_retries: u32,
    cookie: Option<Vec<u8>>,
    created: Instant,
    established: Option<Instant>,
    last_heard: Instant,
    local_id: Option<Id>,
    remote_id: Option<Id>,
    /// When to rekey this IKE SA (RFC 7296 §2.18): `rekey_time` less a
    /// jitter of up to 10 %; None while a rekey runs or when never.
    rekey_at: Option<Instant>,
    /// `rekey_time` + `over_time` after it was established: if it has not
    /// been rekeyed by then, it is deleted with its children.
    expire_at: Option<Instant>,
    /// Rekeyed: its children live in the new IKE SA; this one only waits
    /// for its DELETE (ours, or the peer's for at most [`SUPERSEDED_WAIT`]).
    superseded: Option<Instant>,
    /// Responder: the virtual addresses this peer got from our pools
    /// (RFC 7296 §3.15); its `dynamic` selectors are these.
    vips_remote: Vec<IpAddr>,
    /// Initiator: the virtual addresses the peer gave us (`vips`).
    vips_local: Vec<IpAddr>,
    /// Initiator: the DNS servers the peer's CFG_REPLY named.
    dns_local: Vec<IpAddr>,
    /// RFC 7296 §2.8.2: the peer rekeyed this IKE SA while our rekey of it
    /// was out; which new SA survives is decided when our answer comes.
    crossing: Option<Crossing>,
    dead: bool,
}

/// The peer's new IKE SA of a crossing rekey: our SPI of it and the
/// nonces of its exchange.
struct Crossing {
    spi: u64,
    ni: Vec<u8>,
    nr: Vec<u8>,
}

impl IkeSa {
    /// Queues a rekey of the child with inbound SPI `spi` (RFC 7296 §2.8),
    /// held from rekeying again until it is replaced.
    fn queue_rekey(&mut self, spi: u32, now: Instant) {
        self.rekey_hold.insert(spi, now + UNTIL_REPLACED);
        self.queue.push_back(Queued::Rekey(spi));
    }

    /// An IKE SA with nothing negotiated yet.
    #[allow(clippy::too_many_arguments)]
    fn new(
        conn: String,
        initiator: bool,
        spi_i: u64,
        spi_r: u64,
        local: SocketAddr,
        remote: SocketAddr,
        state: State,
        now: Instant,
    ) -> Box<IkeSa> {
        Box::new(IkeSa {
            conn,
            initiator,
            spi_i,
            spi_r,
            local,
            remote,
            state,
            nonce_i: Vec::new(),
            nonce_r: Vec::new(),
            keyshare: None,
            chosen: None,
            keys: None,
            init_req: Vec::new(),
            init_resp: Vec::new(),
            nat: false,
            next_req_id: 0,
            expect_req_id: 0,
            pending: None,
            queue: VecDeque::new(),
            last_resp: None,
            peer_frag: false,
            peer_hashes: false,
            children: Vec::new(),
            rekey_hold: HashMap::new(),
            restart: false,
            reasm: None,
            first_child: None,
            init_retries: 0,
            cookie: None,
            created: now,
            established: None,
            last_heard: now,
            local_id: None,
            remote_id: None,
            rekey_at: None,
            expire_at: None,
            superseded: None,
            vips_remote: Vec::new(),
            vips_local: Vec::new(),
            dns_local: Vec::new(),
            crossing: None,
            dead: false,
        })
    }

    fn our_spi(&self) -> u64 {
        if self.initiator {
            self.spi_i
        } else {
            self.spi_r
        }
    }

    fn label(&self) -> String {
        format!(
            "{}[{:016x}] {}",
            self.conn,
            self.our_spi(),
            self.remote.ip()
        )
    }

    fn hdr(&self, exch: u8, response: bool, msg_id: u32) -> Header {
        let mut f = if self.initiator { flags::INITIATOR } else { 0 };
        if response {
            f |= flags::RESPONSE;
        }
        Header {
            spi_i: self.spi_i,
            spi_r: self.spi_r,
            next: 0,
            exchange: exch,
            flags: f,
            msg_id,
            length: 0,
        }
    }
}

/// A summary for `espctl ike sas`.
#[derive(Debug, Clone)]
pub struct SaInfo {
    pub conn: String,
    pub spi_i: u64,
    pub spi_r: u64,
    pub initiator: bool,
    pub state: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub local_id: String,
    pub remote_id: String,
    pub alg: String,
    pub nat: bool,
    pub established_secs: Option<u64>,
    /// Virtual addresses: ours (given by the peer), the peer's (from our pools).
    pub local_vips: Vec<IpAddr>,
    pub remote_vips: Vec<IpAddr>,
    /// DNS servers the peer gave us with our virtual address.
    pub local_dns: Vec<IpAddr>,
    pub children: Vec<ChildInfo>,
}

#[derive(Debug, Clone)]
pub struct ChildInfo {
    pub name: String,
    pub reqid: u32,
    pub mode: &'static str,
    pub spi_in: u32,
    pub spi_out: u32,
    pub alg: String,
    pub encap: bool,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
    pub installed_secs: u64,
    /// The peer takes TFC padding (no ESP_TFC_PADDING_NOT_SUPPORTED).
    pub peer_takes_tfc: bool,
}

pub struct Endpoint {
    cfg: Arc<Config>,
    sas: SaTable,
    /// Inbound SPIs our children hold (or are being negotiated with): a
    /// new one is checked against this, not against every IKE SA's children.
    spis_in: HashSet<u32>,
    /// Responder: (peer, SPIi) → our SPI, to answer a retransmitted IKE_SA_INIT.
    by_init: HashMap<(SocketAddr, u64), u64>,
    half_open: usize,
    half_open_by_peer: HashMap<IpAddr, usize>,
    cookie_secret: [u8; 32],
    pub cookie_threshold: usize,
    /// RFC 7383: the largest IP datagram of an IKE message we send; larger
    /// protected messages go in fragments if the peer takes them
    /// (strongSwan's `fragment_size`, 1280 by default).
    pub fragment_size: usize,
    /// The first retransmission after this long, doubling (RFC 7296 §2.1;
    /// strongSwan's `retransmit_timeout`), [`RETRANSMIT_BASE`] by default.
    pub retransmit_base: Duration,
    /// Retransmissions before the peer is given up ([`RETRANSMIT_TRIES`]).
    pub retransmit_tries: u32,
    out: VecDeque<Output>,
    /// Children to negotiate again (`dpd_action = restart`), one list per
    /// IKE_SA whose peer stopped answering; taken after the timers ran.
    restarts: Vec<Vec<String>>,
    /// Children the peer closed whose `close_action` is `start`.
    reopen: Vec<String>,
    /// Virtual addresses handed out (`pools`), and which IKE_SA (our SPI)
    /// holds which: released once that IKE_SA is gone (swept with the timers).
    leases: Leases,
    lease_of: HashMap<u64, Vec<(String, IpAddr)>>,
    reqids: Reqids,
    stats: BTreeMap<&'static str, u64>,
}

/// The key of [`SaTable`]'s peer index.
fn peer_hash(conn: &str, id: &Id) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (conn, id).hash(&mut h);
    h.finish()
}

/// The IKE SAs by our SPI, with each one's next deadline in order. Any
/// insertion or mutable access marks the SA for its deadline to be worked
/// out again ([`SaTable::refresh`]), so no change can leave a stale one.
#[derive(Default)]
struct SaTable {
    /// Boxed: an IkeSa is about 1.5 KiB, and a hash table holds up to
    /// twice its entries' size in free buckets; events take an SA out and
    /// put it back, which moves a pointer, not the SA.
    map: HashMap<u64, Box<IkeSa>>,
    /// SPIs by connection name, as of each SA's last insertion (a
    /// connection's SAs without a walk over all of them).
    by_conn: HashMap<String, std::collections::HashSet<u64>>,
    /// (hash of connection and the peer's identity, SPI), as of each SA's
    /// last insertion: INITIAL_CONTACT finds a peer's other SAs at once
    /// (about 30 octets an SA; the hash only narrows, callers compare).
    by_peer: std::collections::BTreeSet<(u64, u64)>,
    at: HashMap<u64, Instant>,
    by_time: std::collections::BTreeSet<(Instant, u64)>,
    dirty: std::collections::HashSet<u64>,
}

impl SaTable {
    fn insert(&mut self, k: u64, v: Box<IkeSa>) -> Option<Box<IkeSa>> {
        self.dirty.insert(k);
        self.by_conn.entry(v.conn.clone()).or_default().insert(k);
        if let Some(id) = &v.remote_id {
            self.by_peer.insert((peer_hash(&v.conn, id), k));
        }
        let old = self.map.insert(k, v);
        if let Some(o) = &old {
            let new = &self.map[&k];
            let (conn_moved, peer_moved) = (
                o.conn != new.conn,
                o.conn != new.conn || o.remote_id != new.remote_id,
            );
            if conn_moved {
                self.unconn(&o.conn.clone(), k);
            }
            if peer_moved {
                if let Some(id) = &o.remote_id {
                    self.by_peer.remove(&(peer_hash(&o.conn, id), k));
                }
            }
        }
        old
    }

    fn remove(&mut self, k: &u64) -> Option<Box<IkeSa>> {
        self.unindex(*k);
        self.dirty.remove(k);
        let v = self.map.remove(k);
        if let Some(v) = &v {
            self.unconn(&v.conn, *k);
            if let Some(id) = &v.remote_id {
                self.by_peer.remove(&(peer_hash(&v.conn, id), *k));
            }
        }
        v
    }

    /// The SAs of connection `conn` whose peer is `id`.
    fn of_peer<'a>(
        &'a self,
        conn: &'a str,
        id: &'a Id,
    ) -> impl Iterator<Item = (&'a u64, &'a IkeSa)> + 'a {
        let h = peer_hash(conn, id);
        self.by_peer
            .range((h, 0)..=(h, u64::MAX))
            .filter_map(|(_, k)| self.map.get_key_value(k))
            .map(|(k, v)| (k, &**v))
            .filter(move |(_, sa)| sa.conn == conn && sa.remote_id.as_ref() == Some(id))
    }

    fn unconn(&mut self, conn: &str, k: u64) {
        if let Some(set) = self.by_conn.get_mut(conn) {
            set.remove(&k);
            if set.is_empty() {
                self.by_conn.remove(conn);
            }
        }
    }

    /// The SAs of connection `conn`.
    fn of_conn<'a>(&'a self, conn: &str) -> impl Iterator<Item = (&'a u64, &'a IkeSa)> + 'a {
        self.by_conn
            .get(conn)
            .into_iter()
            .flatten()
            .filter_map(|k| self.map.get_key_value(k))
            .map(|(k, v)| (k, &**v))
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut IkeSa> {
        self.touch_all();
        self.map.values_mut().map(|b| &mut **b)
    }

    fn touch_all(&mut self) {
        self.dirty.extend(self.map.keys().copied());
    }

    fn get(&self, k: &u64) -> Option<&IkeSa> {
        self.map.get(k).map(|b| &**b)
    }

    fn contains_key(&self, k: &u64) -> bool {
        self.map.contains_key(k)
    }

    fn iter(&self) -> impl Iterator<Item = (&u64, &IkeSa)> {
        self.map.iter().map(|(k, v)| (k, &**v))
    }

    fn values(&self) -> impl Iterator<Item = &IkeSa> {
        self.map.values().map(|b| &**b)
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn unindex(&mut self, k: u64) {
        if let Some(t) = self.at.remove(&k) {
            self.by_time.remove(&(t, k));
        }
    }

    /// Works out the deadline of every SA that changed since.
    fn refresh(&mut self, deadline: impl Fn(&IkeSa) -> Option<Instant>) {
        for k in std::mem::take(&mut self.dirty) {
            self.unindex(k);
            if let Some(t) = self.map.get(&k).and_then(|b| deadline(b)) {
                self.at.insert(k, t);
                self.by_time.insert((t, k));
            }
        }
    }

    fn first(&self) -> Option<Instant> {
        self.by_time.first().map(|(t, _)| *t)
    }

    /// The SAs whose deadline is `now` or earlier.
    fn due(&self, now: Instant) -> Vec<u64> {
        self.by_time
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, k)| *k)
            .collect()
    }
}

/// Reqids of negotiated CHILD_SAs. espd picks the outbound SA of a policy
/// by its template's reqid and tunnel endpoints (docs/config.md), so two
/// CHILD_SAs of one child config with other selectors — two road-warrior
/// clients, or two peers of a responder's `%any` connection, perhaps
/// behind one NAT address — need reqids of their own. The first user of a
/// child config takes its configured reqid (its trap policies name it);
/// others get one from [`conf::DYNAMIC_REQIDS`] up. A rekey has the same
/// key as the SA it replaces, so it keeps the reqid (RFC 4301 §4.4.1: the
/// SPD entry names the reqid, not the SPI).
#[derive(Default)]
struct Reqids {
    by_key: HashMap<ReqidKey, (u32, usize)>,
    /// Users per reqid.
    users: HashMap<u32, usize>,
    next: u32,
}

/// (conn, child, peer address, local selectors, remote selectors).
type ReqidKey = (String, String, IpAddr, Vec<Ts>, Vec<Ts>);

fn reqid_key(c: &ChildSa) -> ReqidKey {
    (
        c.conn.clone(),
        c.name.clone(),
        c.remote.ip(),
        c.ts_local.clone(),
        c.ts_remote.clone(),
    )
}

impl Reqids {
    fn acquire(&mut self, key: ReqidKey, configured: u32) -> u32 {
        if let Some((r, n)) = self.by_key.get_mut(&key) {
            *n += 1;
            let r = *r;
            *self.users.entry(r).or_default() += 1;
            return r;
        }
        let r = if !self.users.contains_key(&configured) {
            configured
        } else {
            loop {
                let r = conf::DYNAMIC_REQIDS + self.next;
                self.next = self.next.wrapping_add(1) % conf::DYNAMIC_REQIDS;
                if !self.users.contains_key(&r) {
                    break r;
                }
            }
        };
        self.by_key.insert(key, (r, 1));
        *self.users.entry(r).or_default() += 1;
        r
    }

    fn release(&mut self, key: &ReqidKey) {
        let Some((r, n)) = self.by_key.get_mut(key) else {
            return;
        };
        *n -= 1;
        let r = *r;
        if *n == 0 {
            self.by_key.remove(key);
        }
        if let Some(u) = self.users.get_mut(&r) {
            *u -= 1;
            if *u == 0 {
                self.users.remove(&r);
            }
        }
    }
}

/// When `sa` next needs [`Endpoint::handle_timeout`]: a retransmission,
/// the half-open limit, the superseded wait, DPD, its rekey or expiry, or
/// a child's rekey.
fn sa_deadline(cfg: &Config, sa: &IkeSa) -> Option<Instant> {
    let mut t: Option<Instant> = None;
    let mut at = |x: Instant| t = Some(t.map_or(x, |y| y.min(x)));
    {
        if let Some(p) = &sa.pending {
            at(p.next);
        }
        if sa.state == State::InitDone {
            at(sa.created + HALF_OPEN_TIMEOUT);
        }
        if let Some(w) = sa.superseded {
            // Rekeyed: only the wait for its DELETE is left.
            at(w + SUPERSEDED_WAIT);
            return t;
        }
        if let (State::Established, Some(d), None) = (
            sa.state,
            cfg.conn(&sa.conn).and_then(|c| c.dpd_delay),
            &sa.pending,
        ) {
            at(sa.last_heard + d);
        }
        if sa.state == State::Established && sa.pending.is_none() {
            if let Some(r) = sa.rekey_at {
                at(r);
            }
            if let Some(r) = sa.expire_at {
                at(r);
            }
            for c in &sa.children {
                let hold = sa.rekey_hold.get(&c.spi_in).copied();
                at(hold.map_or(rekey_due(c), |h| h.max(rekey_due(c))));
            }
        }
    }
    t
}

/// RFC 7296 §2.15: the octets the AUTH payload signs.
fn signed_octets(
    keys: &IkeKeys,
    initiator_side: bool,
    message: &[u8],
    peer_nonce: &[u8],
    id: &Id,
) -> Vec<u8> {
    let k = if initiator_side {
        &keys.sk_pi
    } else {
        &keys.sk_pr
    };
    let maced = crypto::prf(keys.prf, k, &[&id.body()]);
    [message, peer_nonce, &maced].concat()
}

/// RFC 7427 §4: SIGNATURE_HASH_ALGORITHMS, the hashes we take in signatures.
fn signature_hashes() -> Payload {
    Payload::notify(
        notify::SIGNATURE_HASH_ALGORITHMS,
        cert::HASHES.iter().flat_map(|h| h.to_be_bytes()).collect(),
    )
}

/// RFC 7296 §3.8 authentication method 2: Shared Key Message Integrity Code.
const AUTH_PSK: u8 = 2;

fn find_notify(ps: &[Payload], ty: u16) -> Option<&wire::Notify> {
    ps.iter().find_map(|p| match p {
        Payload::Notify(n) if n.ty == ty => Some(n),
        _ => None,
    })
}

fn first_error(ps: &[Payload]) -> Option<u16> {
    ps.iter().find_map(|p| match p {
        Payload::Notify(n) if n.ty < notify::FIRST_STATUS => Some(n.ty),
        _ => None,
    })
}

/// A DN identity with a wildcard value (`CN=*`).
fn is_pattern(id: &Id) -> bool {
    id.ty == wire::idt::DER_ASN1_DN
        && crate::der::dn_rdns(&id.data).is_some_and(|r| r.iter().any(|(_, v)| v == "*"))
}

fn own_id(conf: &IdConf, addr: IpAddr) -> Id {
    match conf {
        IdConf::Id(i) => i.clone(),
        // strongSwan: with no id, the IKE SA's own address.
        IdConf::Any => match addr {
            IpAddr::V4(a) => Id {
                ty: wire::idt::IPV4_ADDR,
                data: a.octets().to_vec(),
            },
            IpAddr::V6(a) => Id {
                ty: wire::idt::IPV6_ADDR,
                data: a.octets().to_vec(),
            },
        },
    }
}

impl Endpoint {
    pub fn new(cfg: Arc<Config>) -> Endpoint {
        let mut cookie_secret = [0u8; 32];
        crypto::random(&mut cookie_secret);
        let mut leases = Leases::default();
        leases.configure(&cfg.pools);
        Endpoint {
            cfg,
            sas: SaTable::default(),
            spis_in: HashSet::new(),
            by_init: HashMap::new(),
            half_open: 0,
            half_open_by_peer: HashMap::new(),
            cookie_secret,
            cookie_threshold: COOKIE_THRESHOLD,
            fragment_size: 1280,
            retransmit_base: RETRANSMIT_BASE,
            retransmit_tries: RETRANSMIT_TRIES,
            out: VecDeque::new(),
            restarts: Vec::new(),
            reopen: Vec::new(),
            leases,
            lease_of: HashMap::new(),
            reqids: Reqids::default(),
            stats: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.cfg
    }

    pub fn set_config(&mut self, cfg: Arc<Config>) {
        self.leases.configure(&cfg.pools);
        // DPD intervals and rekey times may have changed.
        self.sas.touch_all();
        self.cfg = cfg;
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    pub fn stats(&self) -> &BTreeMap<&'static str, u64> {
        &self.stats
    }

    /// IKE_SAs this responder holds that have not finished IKE_AUTH (RFC
    /// 7296 §2.6: past [`Endpoint::cookie_threshold`], COOKIEs are asked).
    pub fn half_open(&self) -> usize {
        self.half_open
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    /// How long after its due time (`rekey_due`) a CHILD_SA rekey we
    /// started was complete (the new pair installed), as counts in decade
    /// buckets and the largest; `late`: after the old SA's `life_time`,
    /// when espd has already removed it (RFC 4301 §4.4.2.1: its hard
    /// lifetime) and the tunnel had no SA. A gateway with tens of thousands
    /// of tunnels shows here whether it keeps up (docs/ike.md, "What the
    /// core does"; docs/operations.md).
    fn rekey_lag(&mut self, lag: Duration, late: bool) {
        let ms = u64::try_from(lag.as_millis()).unwrap_or(u64::MAX);
        let bucket = match ms {
            0..10 => "child-rekey-lag.0-10ms",
            10..100 => "child-rekey-lag.10-100ms",
            100..1000 => "child-rekey-lag.100ms-1s",
            1000..10000 => "child-rekey-lag.1-10s",
            _ => "child-rekey-lag.over-10s",
        };
        self.count(bucket);
        let max = self.stats.entry("child-rekey-lag-max-ms").or_default();
        *max = (*max).max(ms);
        if late {
            self.count("child-rekey-late");
        }
    }

    fn drop_msg(&mut self, why: &'static str) {
        *self.stats.entry("dropped").or_default() += 1;
        let k: &'static str = match why {
            "malformed" => "dropped.malformed",
            "unknown-ike-spi" => "dropped.unknown-ike-spi",
            "bad-icv" => "dropped.bad-icv",
            "bad-message-id" => "dropped.bad-message-id",
            "unexpected-response" => "dropped.unexpected-response",
            "bad-length" => "dropped.bad-length",
            "bad-version" => "dropped.bad-version",
            "half-open-limit" => "dropped.half-open-limit",
            "unexpected-exchange" => "dropped.unexpected-exchange",
            "bad-ke" => "dropped.bad-ke",
            _ => "dropped.other",
        };
        self.count(k);
    }

    fn log(&mut self, s: String) {
        self.out.push_back(Output::Log(s));
    }

    fn send(&mut self, local: SocketAddr, remote: SocketAddr, data: Vec<u8>) {
        self.count("tx");
        self.out.push_back(Output::Send {
            local,
            remote,
            data,
        });
    }

    /// The next time [`handle_timeout`](Self::handle_timeout) wants to run:
    /// the earliest of the IKE SAs' own deadlines, which are kept in order
    /// and worked out again only for SAs that changed (O(log n) per change,
    /// not a walk over every IKE SA per call: 10 000 tunnels).
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let cfg = self.cfg.clone();
        self.sas.refresh(|sa| sa_deadline(&cfg, sa));
        self.sas.first()
    }

    fn dpd(&self, sa: &IkeSa) -> Option<Duration> {
        self.cfg.conn(&sa.conn).and_then(|c| c.dpd_delay)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        // Only the IKE SAs whose deadline has come (see `poll_timeout`).
        let cfg = self.cfg.clone();
        self.sas.refresh(|sa| sa_deadline(&cfg, sa));
        let spis: Vec<u64> = self.sas.due(now);
        for spi in spis {
            let Some(mut sa) = self.sas.remove(&spi) else {
                continue;
            };
            if sa.state == State::InitDone && now >= sa.created + HALF_OPEN_TIMEOUT {
                self.log(format!(
                    "{}: half-open IKE_SA expired (no IKE_AUTH within {} s)",
                    sa.label(),
                    HALF_OPEN_TIMEOUT.as_secs()
                ));
                self.count("half-open-expired");
                self.kill(sa, "half-open timeout");
                continue;
            }
            let label = sa.label();
            if let Some(p) = &mut sa.pending {
                if now >= p.next {
                    if p.tries >= self.retransmit_tries {
                        self.log(format!("{label}: peer does not answer after {} retransmissions: giving up, IKE_SA deleted", p.tries));
                        self.count("retransmit-give-up");
                        let again = self.to_restart(&sa);
                        self.kill(sa, "peer unreachable");
                        if !again.is_empty() {
                            self.restarts.push(again);
                        }
                        continue;
                    }
                    p.tries += 1;
                    p.next = now + self.retransmit_base * (1 << p.tries.min(10));
                    let data = p.data.clone();
                    self.count("retransmits");
                    for d in data {
                        self.send(sa.local, sa.remote, d);
                    }
                }
            } else if let Some(t) = sa.superseded {
                // Rekeyed: nothing but its DELETE is left to do here. The
                // peer should have sent it (RFC 7296 §2.18, §2.8.2); it
                // holds no child, so ours goes once and the SA with it (a
                // peer that abandoned its side of a crossing rekey would
                // never answer).
                if now >= t + SUPERSEDED_WAIT {
                    sa.queue.retain(|q| matches!(q, Queued::DeleteIke));
                    if sa.queue.is_empty() {
                        sa.queue.push_back(Queued::DeleteIke);
                    }
                    self.pump(&mut sa, now);
                    self.log(format!(
                        "{}: replaced IKE_SA not deleted by the peer within {} s: deleted",
                        sa.label(),
                        SUPERSEDED_WAIT.as_secs()
                    ));
                    self.count("superseded-deleted");
                    self.kill(sa, "replaced");
                    continue;
                }
            } else if sa.state == State::Established && sa.expire_at.is_some_and(|t| now >= t) {
                self.log(format!(
                    "{}: IKE_SA not rekeyed within its lifetime (rekey_time + over_time): deleted with its CHILD_SAs",
                    sa.label()
                ));
                self.count("ike-expired");
                self.delete_ike(&mut sa, now);
            } else if sa.state == State::Established {
                // RFC 7296 §2.18: rekey the IKE SA at its rekey time.
                if sa.rekey_at.is_some_and(|t| now >= t) {
                    sa.rekey_at = None;
                    sa.queue.push_back(Queued::RekeyIke(None));
                }
                // RFC 7296 §2.8: rekey each child at its rekey time.
                let live: Vec<u32> = sa.children.iter().map(|c| c.spi_in).collect();
                sa.rekey_hold.retain(|k, _| live.contains(k));
                let due: Vec<u32> = sa
                    .children
                    .iter()
                    .filter(|c| {
                        now >= rekey_due(c)
                            && sa.rekey_hold.get(&c.spi_in).is_none_or(|h| now >= *h)
                    })
                    .map(|c| c.spi_in)
                    .collect();
                for spi in due {
                    sa.queue_rekey(spi, now);
                }
                self.pump(&mut sa, now);
                if let (Some(d), None) = (self.dpd(&sa), &sa.pending) {
                    if now >= sa.last_heard + d {
                        // RFC 7296 §1.4: an empty INFORMATIONAL is the liveness check.
                        self.request(
                            &mut sa,
                            exchange::INFORMATIONAL,
                            vec![],
                            ReqKind::Liveness,
                            now,
                        );
                    }
                }
            }
            self.sas.insert(spi, sa);
        }
        for names in std::mem::take(&mut self.restarts) {
            self.restart(&names, now);
        }
    }

    /// The children to negotiate again when `sa` is given up: those whose
    /// `dpd_action` is `restart`; for an IKE_SA that a restart set up and
    /// that never came up, its first child again (as strongSwan's
    /// `keyingtries = 0`: until the peer answers).
    fn to_restart(&self, sa: &IkeSa) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        // One we were deleting (terminate, lifetime) is not brought back.
        if sa.state == State::Deleting {
            return v;
        }
        if sa.state != State::Established {
            if let (true, Some((name, _))) = (sa.restart, &sa.first_child) {
                v.push(name.clone());
            }
            return v;
        }
        for c in &sa.children {
            let again = self
                .cfg
                .child(&c.name)
                .is_some_and(|(_, ch)| ch.dpd_action == DpdAction::Restart);
            if again && !v.contains(&c.name) {
                v.push(c.name.clone());
            }
        }
        v
    }

    fn close_action(&self, child: &str) -> CloseAction {
        self.cfg
            .child(child)
            .map_or(CloseAction::Clear, |(_, ch)| ch.close_action)
    }

    /// `close_action = start`: the children the peer closed are negotiated
    /// again (on a live IKE_SA of their connection, else a new one).
    fn reopen_closed(&mut self, now: Instant) {
        for name in std::mem::take(&mut self.reopen) {
            self.count("close-action-starts");
            match self.initiate(&name, None, now) {
                Ok(()) => self.log(format!(
                    "close_action = start: the peer closed {name}: negotiating it again"
                )),
                Err(e) => self.log(format!("close_action = start of {name}: {e}")),
            }
        }
    }

    /// `dpd_action = restart`: a new IKE_SA for the first child, the others
    /// queued on it (CREATE_CHILD_SA once it is up).
    fn restart(&mut self, names: &[String], now: Instant) {
        let Some((first, rest)) = names.split_first() else {
            return;
        };
        self.count("dpd-restarts");
        if let Err(e) = self.initiate(first, None, now) {
            return self.log(format!("dpd_action = restart of {first}: {e}"));
        }
        let fresh = self.sas.values_mut().find(|sa| {
            sa.state != State::Established
                && !sa.restart
                && sa.first_child.as_ref().is_some_and(|f| &f.0 == first)
        });
        match fresh {
            // A new IKE_SA: the other children follow it by CREATE_CHILD_SA.
            Some(sa) => {
                sa.restart = true;
                for r in rest {
                    sa.queue.push_back(Queued::Child {
                        name: r.clone(),
                        packet: None,
                    });
                }
                let label = sa.label();
                self.log(format!(
                    "{label}: dpd_action = restart: negotiating {} again",
                    names.join(", ")
                ));
            }
            // Queued on an IKE_SA of the connection that is still up: so
            // are the others.
            None => {
                for r in rest {
                    if let Err(e) = self.initiate(r, None, now) {
                        self.log(format!("dpd_action = restart of {r}: {e}"));
                    }
                }
                self.log(format!(
                    "dpd_action = restart: negotiating {} again",
                    names.join(", ")
                ));
            }
        }
    }

    /// Ends an IKE SA here: its children are removed, nothing is sent.
    fn kill(&mut self, mut sa: Box<IkeSa>, why: &str) {
        self.release_vips(&sa);
        for c in sa.children.drain(..) {
            self.remove_child(c, why);
        }
        if sa.state == State::InitDone {
            self.release_half_open(&sa);
        }
        if !sa.initiator {
            self.by_init.remove(&(sa.remote, sa.spi_i));
        }
        sa.dead = true;
    }

    fn release_half_open(&mut self, sa: &IkeSa) {
        self.half_open = self.half_open.saturating_sub(1);
        if let Some(n) = self.half_open_by_peer.get_mut(&sa.remote.ip()) {
            *n -= 1;
            if *n == 0 {
                self.half_open_by_peer.remove(&sa.remote.ip());
            }
        }
    }

    /// Sends a request on `sa` (window 1: queued callers check `pending`).
    fn request(
        &mut self,
        sa: &mut IkeSa,
        exch: u8,
        payloads: Vec<Payload>,
        kind: ReqKind,
        now: Instant,
    ) {
        let id = sa.next_req_id;
        sa.next_req_id += 1;
        let hdr = sa.hdr(exch, false, id);
        let data = seal(sa, hdr, &payloads, self.fragment_size);
        if data.len() > 1 {
            self.count("ike-fragments-sent");
        }
        sa.pending = Some(Pending {
            msg_id: id,
            data: data.clone(),
            kind,
            tries: 0,
            next: now + self.retransmit_base,
        });
        for d in data {
            self.send(sa.local, sa.remote, d);
        }
    }

    fn respond(&mut self, sa: &mut IkeSa, exch: u8, msg_id: u32, payloads: Vec<Payload>) {
        let hdr = sa.hdr(exch, true, msg_id);
        let data = seal(sa, hdr, &payloads, self.fragment_size);
        if data.len() > 1 {
            self.count("ike-fragments-sent");
        }
        sa.last_resp = Some((msg_id, data.clone()));
        sa.expect_req_id = msg_id + 1;
        for d in data {
            self.send(sa.local, sa.remote, d);
        }
    }

    /// Every IKE SA and its children.
    pub fn list(&self, now: Instant) -> Vec<SaInfo> {
        let mut v: Vec<SaInfo> = self
            .sas
            .values()
            .map(|sa| SaInfo {
                conn: sa.conn.clone(),
                spi_i: sa.spi_i,
                spi_r: sa.spi_r,
                initiator: sa.initiator,
                state: if sa.superseded.is_some() {
                    "REKEYED".into()
                } else {
                    format!("{:?}", sa.state).to_uppercase()
                },
                local: sa.local,
                remote: sa.remote,
                local_id: sa.local_id.as_ref().map_or("".into(), |i| i.to_string()),
                remote_id: sa.remote_id.as_ref().map_or("".into(), |i| i.to_string()),
                alg: sa.chosen.map_or("".into(), |c| c.describe()),
                nat: sa.nat,
                established_secs: sa
                    .established
                    .map(|e| now.saturating_duration_since(e).as_secs()),
                local_vips: sa.vips_local.clone(),
                remote_vips: sa.vips_remote.clone(),
                local_dns: sa.dns_local.clone(),
                children: sa
                    .children
                    .iter()
                    .map(|c| ChildInfo {
                        name: c.name.clone(),
                        reqid: c.reqid,
                        mode: if c.mode == Mode::Tunnel {
                            "TUNNEL"
                        } else {
                            "TRANSPORT"
                        },
                        spi_in: c.spi_in,
                        spi_out: c.spi_out,
                        alg: c.alg.describe(),
                        encap: c.encap,
                        local_ts: c.ts_local.iter().map(ts::describe).collect(),
                        remote_ts: c.ts_remote.iter().map(ts::describe).collect(),
                        installed_secs: now.saturating_duration_since(c.installed_at).as_secs(),
                        peer_takes_tfc: c.peer_takes_tfc,
                    })
                    .collect(),
            })
            .collect();
        v.sort_by(|a, b| (&a.conn, a.spi_i).cmp(&(&b.conn, b.spi_i)));
        v
    }

    /// Brings up child `name` (`espctl ike initiate`, `start_action = start`,
    /// or espd's acquire for `trap` with the packet's selectors): on its
    /// connection's established IKE SA with CREATE_CHILD_SA, else with a new
    /// IKE SA.
    pub fn initiate(
        &mut self,
        child: &str,
        packet: Option<(Ts, Ts)>,
        now: Instant,
    ) -> Result<(), String> {
        let cfg = self.cfg.clone();
        let (conn, ch) = cfg
            .child(child)
            .ok_or_else(|| format!("no child `{child}` in the configuration"))?;
        // Already up, or being set up?
        for (_, sa) in self.sas.of_conn(&conn.name) {
            {
                if sa.children.iter().any(|c| c.name == ch.name) {
                    return Err(format!("child `{child}` is already up"));
                }
                if sa.first_child.as_ref().is_some_and(|f| f.0 == ch.name)
                    && sa.state != State::Established
                {
                    return Err(format!("child `{child}` is being set up"));
                }
                if let Some(Pending {
                    kind: ReqKind::CreateChild(p),
                    ..
                }) = &sa.pending
                {
                    if p.name == ch.name {
                        return Err(format!("child `{child}` is being set up"));
                    }
                }
            }
        }
        let live = self
            .sas
            .of_conn(&conn.name)
            .find(|(_, s)| s.state == State::Established)
            .map(|(k, _)| *k);
        if let Some(spi) = live {
            let mut sa = self.sas.remove(&spi).expect("present");
            sa.queue.push_back(Queued::Child {
                name: ch.name.clone(),
                packet,
            });
            self.pump(&mut sa, now);
            self.sas.insert(spi, sa);
            return Ok(());
        }
        let local = match conn.local_addrs.first() {
            Some(crate::conf::AddrSpec::Addr(a)) => *a,
            _ => {
                return Err(format!(
                    "connection `{}` needs a concrete local_addrs to initiate",
                    conn.name
                ))
            }
        };
        let remote = match conn.remote_addrs.first() {
            Some(crate::conf::AddrSpec::Addr(a)) => *a,
            _ => {
                return Err(format!(
                    "connection `{}` needs a concrete remote_addrs to initiate",
                    conn.name
                ))
            }
        };
        let dh = conn.proposals[0].dh[0];
        let mut nonce = vec![0u8; NONCE_LEN];
        crypto::random(&mut nonce);
        let spi_i = self.new_ike_spi();
        let mut sa = IkeSa::new(
            conn.name.clone(),
            true,
            spi_i,
            0,
            SocketAddr::new(local, conn.local_port),
            SocketAddr::new(remote, conn.remote_port),
            State::InitSent,
            now,
        );
        sa.nonce_i = nonce;
        sa.keyshare = Some(KeyShare::new(dh));
        sa.first_child = Some((ch.name.clone(), packet));
        self.log(format!(
            "{}: initiating IKE_SA for child {}",
            sa.label(),
            ch.name
        ));
        self.send_init(&mut sa, conn, now);
        self.sas.insert(spi_i, sa);
        Ok(())
    }

    fn send_init(&mut self, sa: &mut IkeSa, conn: &Conn, now: Instant) {
        let ks = sa.keyshare.as_ref().expect("initiator has a key share");
        let props = ike_proposals(conn, vec![]);
        // RFC 7296 §2.6: the COOKIE notify comes first.
        let mut ps = Vec::new();
        if let Some(c) = &sa.cookie {
            ps.push(Payload::notify(notify::COOKIE, c.clone()));
        }
        ps.push(Payload::Sa(props));
        ps.push(Payload::Ke {
            group: ks.group.id(),
            data: ks.public().to_vec(),
        });
        ps.push(Payload::Nonce(sa.nonce_i.clone()));
        ps.extend(nat_notifies(sa.spi_i, 0, sa.local, sa.remote, conn.encap));
        ps.push(signature_hashes());
        if conn.fragmentation {
            ps.push(Payload::notify(
                notify::IKEV2_FRAGMENTATION_SUPPORTED,
                vec![],
            ));
        }
        let hdr = sa.hdr(exchange::IKE_SA_INIT, false, 0);
        let data = wire::emit_plain(hdr, &ps);
        sa.init_req = data.clone();
        sa.next_req_id = 1;
        sa.pending = Some(Pending {
            msg_id: 0,
            data: vec![data.clone()],
            kind: ReqKind::Init,
            tries: 0,
            next: now + self.retransmit_base,
        });
        self.send(sa.local, sa.remote, data);
    }

    /// Deletes the IKE SAs of connection `name` (and their children).
    pub fn terminate(&mut self, name: &str, now: Instant) -> usize {
        let spis: Vec<u64> = self.sas.of_conn(name).map(|(k, _)| *k).collect();
        for spi in &spis {
            let mut sa = self.sas.remove(spi).expect("present");
            self.delete_ike(&mut sa, now);
            if !sa.dead {
                self.sas.insert(*spi, sa);
            }
        }
        spis.len()
    }

    /// The IKE SA (our SPI) and inbound SPI of the child one of whose SAs
    /// espd names by destination and SPI (either direction).
    fn child_with_sa(&self, dst: IpAddr, spi: u32) -> Option<(u64, u32)> {
        self.sas.iter().find_map(|(k, sa)| {
            sa.children
                .iter()
                .find(|c| {
                    (c.spi_in == spi && c.local.ip() == dst)
                        || (c.spi_out == spi && c.remote.ip() == dst)
                })
                .map(|c| (*k, c.spi_in))
        })
    }

    /// espd's soft expiry of one SA (a volume or time lifetime, the SA
    /// named by its destination and SPI, either direction): the child it
    /// belongs to is rekeyed now (RFC 7296 §2.8), unless it is being
    /// rekeyed or was replaced already. False when no child of ours has it.
    pub fn soft_expired(&mut self, dst: IpAddr, spi: u32, now: Instant) -> bool {
        let Some((key, spi_in)) = self.child_with_sa(dst, spi) else {
            return false;
        };
        let mut sa = self.sas.remove(&key).expect("present");
        let held = sa.rekey_hold.get(&spi_in).is_some_and(|h| now < *h);
        let queued = sa
            .queue
            .iter()
            .any(|q| matches!(q, Queued::Rekey(x) | Queued::DeleteChild(x) if *x == spi_in));
        if !held && !queued && sa.state == State::Established {
            self.count("child-soft-expired");
            self.log(format!(
                "{}: espd's soft lifetime of SPI {spi:08x} reached: rekeying its CHILD_SA",
                sa.label()
            ));
            sa.queue_rekey(spi_in, now);
            self.pump(&mut sa, now);
        }
        self.sas.insert(key, sa);
        true
    }

    /// espd's hard expiry of one SA (RFC 4301 §4.4.2.1: the SA is gone
    /// there, its rekey having failed or come too late): the CHILD_SA it
    /// belongs to is deleted with the peer (RFC 7296 §1.4.1), so neither end
    /// keeps half a child. Nothing happens for a child already being
    /// deleted, or an SA no child of ours has (false).
    pub fn hard_expired(&mut self, dst: IpAddr, spi: u32, now: Instant) -> bool {
        let Some((key, spi_in)) = self.child_with_sa(dst, spi) else {
            return false;
        };
        let mut sa = self.sas.remove(&key).expect("present");
        let deleting = sa
            .queue
            .iter()
            .any(|q| matches!(q, Queued::DeleteChild(x) if *x == spi_in))
            || sa
                .pending
                .as_ref()
                .is_some_and(|p| matches!(p.kind, ReqKind::DeleteChild(x) if x == spi_in));
        if !deleting && sa.state == State::Established {
            self.count("child-hard-expired");
            self.log(format!(
                "{}: espd's hard lifetime of SPI {spi:08x} reached: deleting its CHILD_SA with the peer",
                sa.label()
            ));
            // Not rekeyed any more: it is going.
            sa.rekey_hold.insert(spi_in, now + UNTIL_REPLACED);
            sa.queue
                .retain(|q| !matches!(q, Queued::Rekey(x) if *x == spi_in));
            sa.queue.push_back(Queued::DeleteChild(spi_in));
            self.pump(&mut sa, now);
        }
        self.sas.insert(key, sa);
        true
    }

    /// Deletes the CHILD_SAs named `child` with an INFORMATIONAL DELETE
    /// (RFC 7296 §1.4.1); the SA is removed from espd when the peer answers
    /// (or the IKE SA ends).
    pub fn terminate_child(&mut self, child: &str, now: Instant) -> usize {
        let spis: Vec<u64> = self
            .sas
            .iter()
            .filter(|(_, s)| s.children.iter().any(|c| c.name == child))
            .map(|(k, _)| *k)
            .collect();
        let mut n = 0;
        for spi in spis {
            let mut sa = self.sas.remove(&spi).expect("present");
            for c in sa.children.iter().filter(|c| c.name == child) {
                sa.queue.push_back(Queued::DeleteChild(c.spi_in));
                n += 1;
            }
            self.pump(&mut sa, now);
            self.sas.insert(spi, sa);
        }
        n
    }

    /// Every IKE SA (at exit).
    pub fn terminate_all(&mut self, now: Instant) {
        let names: Vec<String> = self.sas.values().map(|s| s.conn.clone()).collect();
        for n in names {
            self.terminate(&n, now);
        }
    }

    /// Each pool's size and leases (online, offline).
    pub fn pool_usage(&self) -> Vec<crate::pool::PoolUse> {
        self.leases.usage()
    }

    pub fn sa_count(&self) -> usize {
        self.sas.len()
    }

    fn delete_ike(&mut self, sa: &mut IkeSa, now: Instant) {
        for c in sa.children.drain(..) {
            self.remove_child(c, "IKE_SA deleted here");
        }
        if sa.keys.is_some() && matches!(sa.state, State::Established | State::AuthSent) {
            sa.state = State::Deleting;
            sa.queue.clear();
            // Window 1: the DELETE goes when the outstanding request is answered.
            sa.queue.push_back(Queued::DeleteIke);
            self.pump(sa, now);
            self.log(format!("{}: deleting IKE_SA", sa.label()));
        } else {
            let label = sa.label();
            self.log(format!("{label}: IKE_SA dropped before it was established"));
            if sa.state == State::InitDone {
                self.release_half_open(sa);
            }
            sa.dead = true;
        }
    }

    /// CREATE_CHILD_SA for a new child, or to rekey `rekey` (RFC 7296 §1.3.1, §1.3.3).
    fn send_create_child(
        &mut self,
        sa: &mut IkeSa,
        ch: &Child,
        packet: Option<(Ts, Ts)>,
        rekey: Option<u32>,
        now: Instant,
    ) {
        let spi_in = self.new_spi();
        let mut nonce = vec![0u8; NONCE_LEN];
        crypto::random(&mut nonce);
        // PFS: the first group of the child's proposals, if any.
        let ke = ch
            .esp
            .iter()
            .find_map(|a| a.dh.first())
            .map(|g| KeyShare::new(*g));
        // A rekey keeps the old child's (narrowed) selectors, RFC 7296 §2.8.
        let (ts_i, ts_r) = match rekey.and_then(|r| sa.children.iter().find(|c| c.spi_in == r)) {
            Some(old) => (old.ts_local.clone(), old.ts_remote.clone()),
            None => child_ts(ch, sa, &[], packet),
        };
        let props = child_proposals(ch, spi_in, ke.is_some());
        let mut ps = Vec::new();
        if let Some(old) = rekey {
            // RFC 7296 §1.3.3: REKEY_SA names the SA being replaced by the
            // SPI we expect in inbound ESP.
            ps.push(Payload::Notify(wire::Notify {
                proto: wire::proto::ESP,
                spi: old.to_be_bytes().to_vec(),
                ty: notify::REKEY_SA,
                data: vec![],
            }));
            self.log(format!(
                "{}: rekeying CHILD_SA {} (SPI {old:08x})",
                sa.label(),
                ch.name
            ));
            self.count("child-rekeys-started");
        }
        ps.push(Payload::Sa(props));
        ps.push(Payload::Nonce(nonce.clone()));
        if let Some(k) = &ke {
            ps.push(Payload::Ke {
                group: k.group.id(),
                data: k.public().to_vec(),
            });
        }
        ps.push(Payload::TsI(ts_i.clone()));
        ps.push(Payload::TsR(ts_r.clone()));
        if ch.mode == Mode::Transport {
            ps.push(Payload::notify(notify::USE_TRANSPORT_MODE, vec![]));
            // RFC 7296 §3.10.1: espd strips TFC padding only after a tunnel's
            // inner IP header, so a transport-mode SA takes none.
            ps.push(Payload::notify(
                notify::ESP_TFC_PADDING_NOT_SUPPORTED,
                vec![],
            ));
        }
        let pc = PendingChild {
            name: ch.name.clone(),
            rekey,
            spi_in,
            ts_i,
            ts_r,
            nonce,
            ke,
            collision: None,
        };
        self.request(
            sa,
            exchange::CREATE_CHILD_SA,
            ps,
            ReqKind::CreateChild(pc),
            now,
        );
    }

    /// Starts what waits for the window.
    fn pump(&mut self, sa: &mut IkeSa, now: Instant) {
        if sa.pending.is_some() || sa.state != State::Established && sa.state != State::Deleting {
            return;
        }
        let Some(q) = sa.queue.pop_front() else {
            return;
        };
        match q {
            Queued::Child { name, packet } => {
                let cfg = self.cfg.clone();
                if let Some((_, ch)) = cfg.child(&name) {
                    self.send_create_child(sa, ch, packet, None, now);
                }
            }
            Queued::Rekey(old) => {
                let cfg = self.cfg.clone();
                let name = sa
                    .children
                    .iter()
                    .find(|c| c.spi_in == old)
                    .map(|c| c.name.clone());
                match name.as_deref().and_then(|n| cfg.child(n)) {
                    Some((_, ch)) => self.send_create_child(sa, ch, None, Some(old), now),
                    // Gone meanwhile, or no longer configured: nothing to rekey.
                    None => self.pump(sa, now),
                }
            }
            Queued::RekeyIke(group) => self.send_rekey_ike(sa, group, now),
            Queued::DeleteIke => {
                self.request(
                    sa,
                    exchange::INFORMATIONAL,
                    vec![Payload::Delete {
                        proto: wire::proto::IKE,
                        spi_size: 0,
                        spis: vec![],
                    }],
                    ReqKind::DeleteIke,
                    now,
                );
            }
            Queued::DeleteChild(spi_in) if !sa.children.iter().any(|c| c.spi_in == spi_in) => {
                // Gone meanwhile (the peer deleted it, RFC 7296 §2.25.1): nothing to say.
                self.pump(sa, now);
            }
            Queued::DeleteChild(spi_in) => {
                self.request(
                    sa,
                    exchange::INFORMATIONAL,
                    vec![Payload::Delete {
                        proto: wire::proto::ESP,
                        spi_size: 4,
                        spis: vec![spi_in.to_be_bytes().to_vec()],
                    }],
                    ReqKind::DeleteChild(spi_in),
                    now,
                );
            }
        }
    }

    /// A fresh IKE SPI of ours: non-zero and unused (RFC 7296 §2.6).
    fn new_ike_spi(&self) -> u64 {
        loop {
            let s = crypto::random_u64();
            if s != 0 && !self.sas.contains_key(&s) {
                return s;
            }
        }
    }

    fn new_spi(&mut self) -> u32 {
        loop {
            let s = crypto::random_u32();
            // RFC 4303 §2.1: 1-255 reserved; and unique among ours (those of
            // the IKE SA being worked on too, which is out of the table).
            // A negotiation that fails keeps its SPI reserved: four octets.
            if s >= 256 && self.spis_in.insert(s) {
                return s;
            }
        }
    }

    /// One IKE datagram (the non-ESP marker already removed) that arrived at
    /// `local` from `remote`.
    pub fn handle(&mut self, now: Instant, local: SocketAddr, remote: SocketAddr, data: &[u8]) {
        self.count("rx");
        let hdr = match Header::parse(data) {
            Ok(h) => h,
            Err(e) => return self.drop_msg(e.reason()),
        };
        if hdr.length as usize != data.len() {
            return self.drop_msg("bad-length");
        }
        if hdr.exchange == exchange::IKE_SA_INIT && !hdr.is_response() && hdr.spi_r == 0 {
            if hdr.from_initiator() && hdr.msg_id == 0 {
                return self.responder_init(now, local, remote, &hdr, data);
            }
            return self.drop_msg("malformed");
        }
        let ours = if hdr.from_initiator() {
            hdr.spi_r
        } else {
            hdr.spi_i
        };
        let Some(mut sa) = self.sas.remove(&ours) else {
            return self.drop_msg("unknown-ike-spi");
        };
        // The SA's other SPI must match too (RFC 7296 §2.21.4: else unknown).
        let matches = if sa.initiator {
            !hdr.from_initiator() && (sa.spi_r == 0 || sa.spi_r == hdr.spi_r)
        } else {
            hdr.from_initiator() && sa.spi_i == hdr.spi_i
        };
        if !matches {
            self.sas.insert(ours, sa);
            return self.drop_msg("unknown-ike-spi");
        }
        self.on_message(&mut sa, now, local, remote, &hdr, data);
        if !sa.dead {
            self.sas.insert(ours, sa);
        }
        if !self.reopen.is_empty() {
            self.reopen_closed(now);
        }
    }

    /// One Encrypted Fragment (RFC 7383 §2.5): checked and decrypted on its
    /// own, gathered by message ID; the whole inner chain once every
    /// fragment is in. Bounded: at most [`MAX_FRAGMENTS`] fragments and
    /// [`MAX_REASSEMBLY`] octets; a new message ID or count starts afresh.
    fn fragment(&mut self, sa: &mut IkeSa, hdr: &Header, data: &[u8]) -> Option<(u8, Secret)> {
        if data.len() < HDR_LEN + 8 {
            self.drop_msg("truncated");
            return None;
        }
        let g = &data[HDR_LEN..];
        let len = u16::from_be_bytes([g[2], g[3]]) as usize;
        let num = u16::from_be_bytes([g[4], g[5]]) as usize;
        let total = u16::from_be_bytes([g[6], g[7]]) as usize;
        if len != g.len() || num == 0 || num > total || total > MAX_FRAGMENTS {
            self.drop_msg("bad-fragment");
            return None;
        }
        let chunk = match sa.keys.as_ref()?.sk.open_at(data, HDR_LEN, 4) {
            Ok(p) => p,
            Err(_) => {
                self.drop_msg("bad-icv");
                return None;
            }
        };
        self.count("ike-fragments");
        let fresh = sa.reasm.as_ref().is_none_or(|r| {
            r.msg_id != hdr.msg_id || r.response != hdr.is_response() || r.parts.len() != total
        });
        if fresh {
            sa.reasm = Some(Reasm {
                msg_id: hdr.msg_id,
                response: hdr.is_response(),
                first: 0,
                bytes: 0,
                parts: vec![None; total],
            });
        }
        let r = sa.reasm.as_mut().expect("set");
        if num == 1 {
            // RFC 7383 §2.5: the first fragment names the first inner payload.
            r.first = g[0];
        }
        if r.parts[num - 1].is_none() {
            r.bytes += chunk.len();
            if r.bytes > MAX_REASSEMBLY {
                sa.reasm = None;
                self.drop_msg("reassembly-too-large");
                return None;
            }
            r.parts[num - 1] = Some(chunk);
        }
        if r.parts.iter().any(Option::is_none) {
            return None;
        }
        let r = sa.reasm.take().expect("set");
        let mut plain = Zeroizing::new(Vec::with_capacity(r.bytes));
        for p in r.parts.into_iter().flatten() {
            plain.extend_from_slice(&p);
        }
        self.count("ike-fragments-reassembled");
        Some((r.first, plain))
    }

    fn on_message(
        &mut self,
        sa: &mut IkeSa,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
        hdr: &Header,
        data: &[u8],
    ) {
        if hdr.exchange == exchange::IKE_SA_INIT {
            if hdr.is_response() && sa.state == State::InitSent && hdr.msg_id == 0 {
                return self.initiator_init_response(sa, now, hdr, data);
            }
            return self.drop_msg("unexpected-exchange");
        }
        if sa.keys.is_none() {
            return self.drop_msg("unexpected-exchange");
        }
        // Message IDs before decryption work (RFC 7296 §2.3), the retransmit
        // answer only after the ICV checked out.
        if hdr.is_response() {
            if sa.pending.as_ref().is_none_or(|p| p.msg_id != hdr.msg_id) {
                return self.drop_msg("unexpected-response");
            }
        } else if hdr.msg_id != sa.expect_req_id
            && !(hdr.msg_id + 1 == sa.expect_req_id && sa.last_resp.is_some())
        {
            return self.drop_msg("bad-message-id");
        }
        let (first, plain) = if hdr.next == wire::pt::SKF {
            if !self.cfg.conn(&sa.conn).is_some_and(|c| c.fragmentation) {
                return self.drop_msg("fragment-not-negotiated");
            }
            match self.fragment(sa, hdr, data) {
                Some(x) => x,
                None => return,
            }
        } else {
            let keys = sa.keys.as_ref().expect("checked");
            let chain = match wire::parse_chain(hdr.next, &data[HDR_LEN..], HDR_LEN) {
                Ok(c) => c,
                Err(e) => return self.drop_msg(e.reason()),
            };
            let Some((sk_at, first)) = chain.sk else {
                // RFC 7296 §3.14: after IKE_SA_INIT everything is encrypted.
                return self.drop_msg("malformed");
            };
            match keys.sk.open(data, sk_at) {
                Ok(p) => (first, p),
                Err(_) => return self.drop_msg("bad-icv"),
            }
        };
        let inner = match wire::parse_chain(first, &plain, 0) {
            Ok(c) if c.sk.is_none() => c.payloads,
            Ok(_) => return self.drop_msg("malformed"),
            Err(e) => {
                // RFC 7296 §2.5/§3.10.1: a request we cannot read is answered
                // with the error (the reply is protected: it is authentic).
                if !hdr.is_response() {
                    if let wire::Error::UnsupportedCritical(t) = e {
                        self.respond(
                            sa,
                            hdr.exchange,
                            hdr.msg_id,
                            vec![Payload::notify(
                                notify::UNSUPPORTED_CRITICAL_PAYLOAD,
                                vec![t],
                            )],
                        );
                    } else {
                        self.respond(
                            sa,
                            hdr.exchange,
                            hdr.msg_id,
                            vec![Payload::notify(notify::INVALID_SYNTAX, vec![])],
                        );
                    }
                }
                return self.drop_msg(e.reason());
            }
        };
        sa.last_heard = now;
        // RFC 7296 §2.23: an authenticated message from a new address/port
        // (the float to 4500, or a NAT rebinding) moves the IKE SA.
        if (sa.local, sa.remote) != (local, remote) && (sa.nat || remote.port() == NATT_PORT) {
            sa.local = local;
            sa.remote = remote;
        }
        if hdr.is_response() {
            let p = sa.pending.take().expect("checked above");
            self.on_response(sa, now, hdr, p, inner);
            self.pump(sa, now);
            return;
        }
        if hdr.msg_id + 1 == sa.expect_req_id {
            if let Some((_, d)) = &sa.last_resp {
                let d = d.clone();
                self.count("retransmitted-requests");
                // A retransmitted request (whole, or all its fragments again)
                // gets the cached answer (all its fragments).
                for x in d {
                    self.send(sa.local, sa.remote, x);
                }
            }
            return;
        }
        match hdr.exchange {
            exchange::IKE_AUTH if sa.state == State::InitDone => {
                self.responder_auth(sa, now, hdr, inner)
            }
            exchange::CREATE_CHILD_SA if sa.state == State::Established => {
                self.responder_create_child(sa, now, hdr, inner)
            }
            exchange::INFORMATIONAL
                if sa.state == State::Established || sa.state == State::Deleting =>
            {
                self.responder_informational(sa, now, hdr, inner)
            }
            _ => {
                self.drop_msg("unexpected-exchange");
            }
        }
        self.pump(sa, now);
    }

    fn responder_init(
        &mut self,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
        hdr: &Header,
        data: &[u8],
    ) {
        // A retransmitted request: the same answer (RFC 7296 §2.1).
        if let Some(spi) = self.by_init.get(&(remote, hdr.spi_i)) {
            if let Some(sa) = self.sas.get(spi) {
                if sa.state == State::InitDone && !sa.init_resp.is_empty() {
                    if sa.init_req == data {
                        let (l, r, d) = (sa.local, sa.remote, sa.init_resp.clone());
                        self.count("retransmitted-requests");
                        return self.send(l, r, d);
                    }
                    return self.drop_msg("malformed");
                }
            }
        }
        let chain = match wire::parse_chain(hdr.next, &data[HDR_LEN..], HDR_LEN) {
            Ok(c) if c.sk.is_none() => c.payloads,
            Ok(_) => return self.drop_msg("malformed"),
            Err(wire::Error::UnsupportedCritical(t)) => {
                let h = Header {
                    spi_r: 0,
                    flags: flags::RESPONSE,
                    ..*hdr
                };
                self.send(
                    local,
                    remote,
                    wire::emit_plain(
                        h,
                        &[Payload::notify(
                            notify::UNSUPPORTED_CRITICAL_PAYLOAD,
                            vec![t],
                        )],
                    ),
                );
                return self.drop_msg("unsupported-critical-payload");
            }
            Err(e) => return self.drop_msg(e.reason()),
        };
        let Some((props, group, ke_data, ni)) = init_payloads(&chain) else {
            return self.drop_msg("malformed");
        };
        let reply = |me: &mut Endpoint, n: u16, d: Vec<u8>| {
            // RFC 7296 §1.2/§2.6: an unprotected answer with SPIr zero.
            let h = Header {
                spi_i: hdr.spi_i,
                spi_r: 0,
                next: 0,
                exchange: exchange::IKE_SA_INIT,
                flags: flags::RESPONSE,
                msg_id: 0,
                length: 0,
            };
            me.send(local, remote, wire::emit_plain(h, &[Payload::notify(n, d)]));
        };
        // RFC 7296 §2.6: past the threshold, only an initiator that returns
        // our COOKIE gets state. The cookie binds Ni, the address and SPIi.
        if self.half_open >= self.cookie_threshold {
            let ip = match remote.ip() {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            let mut want = vec![0u8]; // version of our cookie format
            want.extend_from_slice(
                &crypto::sha256(&[&self.cookie_secret, ni, &ip, &hdr.spi_i.to_be_bytes()])[..16],
            );
            let got = match chain.first() {
                Some(Payload::Notify(n)) if n.ty == notify::COOKIE => Some(&n.data),
                _ => None,
            };
            if got.is_none_or(|g| !crypto::ct_eq(g, &want)) {
                self.count("cookies-sent");
                return reply(self, notify::COOKIE, want);
            }
        }
        if self
            .half_open_by_peer
            .get(&remote.ip())
            .copied()
            .unwrap_or(0)
            >= HALF_OPEN_PER_PEER
        {
            return self.drop_msg("half-open-limit");
        }
        // The connection: addresses first, then the proposals.
        let cfg = self.cfg.clone();
        let candidates: Vec<&Conn> = cfg
            .connections
            .iter()
            .filter(|c| {
                c.local_addrs.iter().any(|a| a.matches(local.ip()))
                    && c.remote_addrs.iter().any(|a| a.matches(remote.ip()))
            })
            .collect();
        let Some((conn, (num, chosen, _))) = candidates.iter().find_map(|c| {
            proposal::select(&c.proposals, props, wire::proto::IKE, true).map(|x| (*c, x))
        }) else {
            self.log(format!(
                "{remote}: IKE_SA_INIT refused: {}",
                if candidates.is_empty() {
                    "no connection for these addresses"
                } else {
                    "no proposal in common (NO_PROPOSAL_CHOSEN)"
                }
            ));
            self.count("no-proposal-chosen");
            return reply(self, notify::NO_PROPOSAL_CHOSEN, vec![]);
        };
        let dh = chosen.dh.expect("IKE proposals have a group");
        if group != dh.id() {
            // RFC 7296 §1.3: ask for the group we chose (from their proposal).
            self.count("invalid-ke-sent");
            return reply(
                self,
                notify::INVALID_KE_PAYLOAD,
                dh.id().to_be_bytes().to_vec(),
            );
        }
        let ks = KeyShare::new(dh);
        let public = ks.public().to_vec();
        let Ok(shared) = ks.agree(ke_data) else {
            self.log(format!(
                "{remote}: IKE_SA_INIT with an invalid key exchange value for {}",
                dh.name()
            ));
            return self.drop_msg("bad-ke");
        };
        let spi_r = self.new_ike_spi();
        let mut nr = vec![0u8; NONCE_LEN];
        crypto::random(&mut nr);
        let keys = crypto::derive_ike(
            chosen.prf.expect("IKE has a PRF"),
            chosen.encr,
            chosen.integ,
            ni,
            &nr,
            &shared,
            hdr.spi_i,
            spi_r,
        );
        let nat_d = nat_detect(&chain, hdr.spi_i, 0, local, remote);
        let mut resp = vec![
            Payload::Sa(vec![chosen.proposal(num, wire::proto::IKE, vec![])]),
            Payload::Ke {
                group: dh.id(),
                data: public,
            },
            Payload::Nonce(nr.clone()),
        ];
        if nat_d.is_some() {
            resp.extend(nat_notifies(hdr.spi_i, spi_r, local, remote, conn.encap));
        }
        // RFC 7296 §3.7: ask the initiator for its certificate (charon sends
        // one only when asked), and RFC 7427 §4: the hashes we verify.
        if let Some(t) = &conn.remote_trust {
            resp.push(Payload::CertReq {
                encoding: cert::CERT_X509,
                data: t.certreq(),
            });
        }
        resp.push(signature_hashes());
        // RFC 7383 §2.3: announced in the answer only if the request had it.
        if conn.fragmentation
            && find_notify(&chain, notify::IKEV2_FRAGMENTATION_SUPPORTED).is_some()
        {
            resp.push(Payload::notify(
                notify::IKEV2_FRAGMENTATION_SUPPORTED,
                vec![],
            ));
        }
        let h = Header {
            spi_i: hdr.spi_i,
            spi_r,
            next: 0,
            exchange: exchange::IKE_SA_INIT,
            flags: flags::RESPONSE,
            msg_id: 0,
            length: 0,
        };
        let out = wire::emit_plain(h, &resp);
        let nat = conn.encap || nat_d.is_some_and(|(a, b)| a || b);
        let mut sa = IkeSa::new(
            conn.name.clone(),
            false,
            hdr.spi_i,
            spi_r,
            local,
            remote,
            State::InitDone,
            now,
        );
        sa.nonce_i = ni.clone();
        sa.nonce_r = nr;
        sa.chosen = Some(chosen);
        sa.keys = Some(keys);
        sa.init_req = data.to_vec();
        sa.init_resp = out.clone();
        sa.nat = nat;
        sa.peer_frag = conn.fragmentation
            && find_notify(&chain, notify::IKEV2_FRAGMENTATION_SUPPORTED).is_some();
        sa.peer_hashes = find_notify(&chain, notify::SIGNATURE_HASH_ALGORITHMS).is_some();
        sa.expect_req_id = 1;
        self.half_open += 1;
        *self.half_open_by_peer.entry(remote.ip()).or_default() += 1;
        self.by_init.insert((remote, hdr.spi_i), spi_r);
        self.sas.insert(spi_r, sa);
        self.send(local, remote, out);
    }

    fn initiator_init_response(&mut self, sa: &mut IkeSa, now: Instant, hdr: &Header, data: &[u8]) {
        let chain = match wire::parse_chain(hdr.next, &data[HDR_LEN..], HDR_LEN) {
            Ok(c) if c.sk.is_none() => c.payloads,
            _ => return self.drop_msg("malformed"),
        };
        let cfg = self.cfg.clone();
        let Some(conn) = cfg.conn(&sa.conn) else {
            return self.kill_now(sa, "connection removed");
        };
        sa.peer_frag = self.cfg.conn(&sa.conn).is_some_and(|c| c.fragmentation)
            && find_notify(&chain, notify::IKEV2_FRAGMENTATION_SUPPORTED).is_some();
        sa.peer_hashes = find_notify(&chain, notify::SIGNATURE_HASH_ALGORITHMS).is_some();
        if let Some(n) = find_notify(&chain, notify::COOKIE) {
            if sa.init_retries < INIT_RETRIES && (1..=64).contains(&n.data.len()) {
                sa.init_retries += 1;
                sa.cookie = Some(n.data.clone());
                self.count("cookies-returned");
                return self.send_init(sa, conn, now);
            }
        }
        if let Some(n) = find_notify(&chain, notify::INVALID_KE_PAYLOAD) {
            let g = (n.data.len() == 2)
                .then(|| u16::from_be_bytes([n.data[0], n.data[1]]))
                .and_then(proposal::Group::from_id);
            match g {
                Some(g)
                    if sa.init_retries < INIT_RETRIES
                        && conn.proposals.iter().any(|p| p.dh.contains(&g)) =>
                {
                    sa.init_retries += 1;
                    self.log(format!(
                        "{}: peer asks for key exchange group {} (INVALID_KE_PAYLOAD): retrying",
                        sa.label(),
                        g.name()
                    ));
                    sa.keyshare = Some(KeyShare::new(g));
                    self.count("invalid-ke-honoured");
                    return self.send_init(sa, conn, now);
                }
                _ => {
                    return self.kill_now(sa, "the peer asks for a key exchange group we did not offer (INVALID_KE_PAYLOAD)");
                }
            }
        }
        if let Some(e) = first_error(&chain) {
            return self.kill_now(
                sa,
                &format!("IKE_SA_INIT refused by the peer: {}", notify::name(e)),
            );
        }
        let Some((props, group, ke_data, nr)) = init_payloads(&chain) else {
            return self.drop_msg("malformed");
        };
        if hdr.spi_r == 0 {
            return self.drop_msg("malformed");
        }
        let Some((chosen, _)) =
            proposal::accept_answer(&conn.proposals, props, wire::proto::IKE, true)
        else {
            return self.kill_now(sa, "the peer chose a proposal we did not offer");
        };
        let ks = sa.keyshare.take().expect("initiator has a key share");
        if chosen.dh != Some(ks.group) || group != ks.group.id() {
            return self.kill_now(
                sa,
                "the peer's key exchange group does not match its proposal",
            );
        }
        let Ok(shared) = ks.agree(ke_data) else {
            return self.kill_now(sa, "the peer's key exchange value is invalid");
        };
        sa.spi_r = hdr.spi_r;
        sa.nonce_r = nr.clone();
        sa.chosen = Some(chosen);
        sa.keys = Some(crypto::derive_ike(
            chosen.prf.expect("IKE"),
            chosen.encr,
            chosen.integ,
            &sa.nonce_i,
            nr,
            &shared,
            sa.spi_i,
            sa.spi_r,
        ));
        sa.init_resp = data.to_vec();
        sa.pending = None;
        let nat_d = nat_detect(&chain, sa.spi_i, sa.spi_r, sa.local, sa.remote);
        sa.nat = conn.encap || nat_d.is_some_and(|(a, b)| a || b);
        // RFC 7296 §2.23: with a NAT, the initiator moves to port 4500.
        if sa.nat && nat_d.is_some() && sa.local.port() == 500 {
            sa.local.set_port(NATT_PORT);
            if sa.remote.port() == 500 {
                sa.remote.set_port(NATT_PORT);
            }
        }
        self.send_auth(sa, conn, now);
    }

    /// `how`: how the peer authenticated (`PSK`, or its signature).
    fn established(&mut self, sa: &mut IkeSa, peer: &Id, how: &str, now: Instant) {
        sa.state = State::Established;
        // RFC 7296 §2.15: the IKE_SA_INIT messages are signed in IKE_AUTH
        // and never again (a rekey or a new IKE SA signs its own): they go,
        // with the COOKIE, so an established IKE SA holds only what it uses.
        sa.init_req = Vec::new();
        sa.init_resp = Vec::new();
        sa.cookie = None;
        sa.established = Some(now);
        (sa.rekey_at, sa.expire_at) = self.ike_rekey_at(sa, now);
        self.count("ike-established");
        let alg = sa.chosen.map_or(String::new(), |c| c.describe());
        let encap = if sa.nat { ", UDP-encapsulated" } else { "" };
        self.log(format!(
            "{}: IKE_SA established with {peer} ({alg}, {how}{encap})",
            sa.label()
        ));
    }

    fn kill_now(&mut self, sa: &mut IkeSa, why: &str) {
        let label = sa.label();
        self.log(format!("{label}: {why}; IKE_SA deleted"));
        let taken = std::mem::replace(sa, *dead_placeholder(sa));
        self.kill(Box::new(taken), why);
        sa.dead = true;
    }

    /// Our AUTH over `octets` (RFC 7296 §2.15): an RFC 7427 signature with
    /// our certificate before it when `local` authenticates by certificate,
    /// else the pre-shared key's MIC.
    fn make_auth(
        &self,
        conn: &Conn,
        prf: proposal::Prf,
        octets: &[u8],
        me: &Id,
        peer: Option<&Id>,
        peer_hashes: bool,
    ) -> Result<Vec<Payload>, String> {
        if let Some((cert, key)) = &conn.local_cert {
            // RFC 7427 §4: Digital Signature if the peer announced hashes,
            // else a classic method (ECDSA 9–11).
            let (method, data) = match (peer_hashes, key.sign_classic(octets)) {
                (false, Some(c)) => c,
                _ => (
                    cert::AUTH_DIGITAL_SIGNATURE,
                    key.sign(octets, conn.local_rsa_pss)?,
                ),
            };
            return Ok(vec![
                Payload::Cert {
                    encoding: cert::CERT_X509,
                    data: cert.clone(),
                },
                Payload::Auth { method, data },
            ]);
        }
        let psk = self
            .cfg
            .psk(me, peer)
            .ok_or_else(|| format!("no pre-shared key for {me} in secrets"))?;
        Ok(vec![Payload::Auth {
            method: AUTH_PSK,
            data: crypto::psk_auth(prf, psk, &[octets]).to_vec(),
        }])
    }

    /// Checks the peer's AUTH over `octets`: its certificate chain to our
    /// CAs, its identity in the certificate and the signature when `remote`
    /// authenticates by certificate, else the pre-shared key's MIC.
    #[allow(clippy::too_many_arguments)]
    fn check_auth(
        &self,
        conn: &Conn,
        prf: proposal::Prf,
        octets: &[u8],
        me: &Id,
        peer: &Id,
        method: u8,
        auth: &[u8],
        inner: &[Payload],
    ) -> Result<String, String> {
        if let Some(trust) = &conn.remote_trust {
            let chain: Vec<Vec<u8>> = inner
                .iter()
                .filter_map(|p| match p {
                    Payload::Cert { encoding, data } if *encoding == cert::CERT_X509 => {
                        Some(data.clone())
                    }
                    _ => None,
                })
                .collect();
            return trust.verify(
                &chain,
                peer,
                (method, auth),
                octets,
                std::time::SystemTime::now(),
                conn.remote_rsa_pss,
            );
        }
        let psk = self
            .cfg
            .psk(me, Some(peer))
            .ok_or_else(|| format!("no pre-shared key for {me} and {peer}"))?;
        let want = crypto::psk_auth(prf, psk, &[octets]);
        if method != AUTH_PSK || !crypto::ct_eq(&want, auth) {
            return Err("AUTH does not verify with our pre-shared key (wrong secret?)".into());
        }
        Ok("PSK".into())
    }

    fn send_auth(&mut self, sa: &mut IkeSa, conn: &Conn, now: Instant) {
        let idi = own_id(&conn.local_id, sa.local.ip());
        let idr = match &conn.remote_id {
            IdConf::Id(i) => Some(i.clone()),
            IdConf::Any => None,
        };
        let keys = sa.keys.as_ref().expect("derived");
        let octets = signed_octets(keys, true, &sa.init_req, &sa.nonce_r, &idi);
        let prf = keys.prf;
        let auth = match self.make_auth(conn, prf, &octets, &idi, idr.as_ref(), sa.peer_hashes) {
            Ok(a) => a,
            Err(e) => return self.kill_now(sa, &e),
        };
        let mut ps = vec![Payload::IdI(idi.clone())];
        // RFC 7296 §3.7: ask for the peer's certificate, naming our CAs.
        if let Some(t) = &conn.remote_trust {
            ps.push(Payload::CertReq {
                encoding: cert::CERT_X509,
                data: t.certreq(),
            });
        }
        // RFC 7296 §3.5: IDr names the responder we want; a DN with a `*`
        // value is a pattern, not an identity, and is not sent.
        if let Some(r) = idr.as_ref().filter(|r| !is_pattern(r)) {
            ps.push(Payload::IdR(r.clone()));
        }
        ps.extend(auth);
        // RFC 7296 §2.4: INITIAL_CONTACT when this is our only IKE SA with the
        // peer — unless `unique = never` (this identity is shared).
        if !conn.unique_never
            && !self
                .sas
                .of_conn(&sa.conn)
                .any(|(_, o)| o.state == State::Established)
        {
            ps.push(Payload::notify(notify::INITIAL_CONTACT, vec![]));
        }
        if !conn.vips.is_empty() {
            // RFC 7296 §2.19: CFG_REQUEST with the addresses we want; an
            // empty attribute (an unspecified address) asks for any. And
            // (§3.15.1) empty DNS attributes of each family asked for: the
            // servers to reach the site by name.
            let mut attrs: Vec<wire::CfgAttr> = conn
                .vips
                .iter()
                .map(|a| wire::CfgAttr::address(*a))
                .collect();
            for v in &conn.vips {
                let ty = if v.is_ipv4() {
                    wire::cfg::INTERNAL_IP4_DNS
                } else {
                    wire::cfg::INTERNAL_IP6_DNS
                };
                attrs.push(wire::CfgAttr { ty, value: vec![] });
            }
            ps.push(Payload::Cp {
                ty: wire::cfg::REQUEST,
                attrs,
            });
        }
        let mut pending = None;
        let cfg = self.cfg.clone();
        if let Some((name, packet)) = sa.first_child.clone() {
            if let Some((_, ch)) = cfg.child(&name) {
                let spi_in = self.new_spi();
                let (ts_i, ts_r) = child_ts(ch, sa, &conn.vips, packet);
                // RFC 7296 §1.2: no KE in IKE_AUTH: the first child's proposals carry no group.
                ps.push(Payload::Sa(child_proposals(ch, spi_in, false)));
                ps.push(Payload::TsI(ts_i.clone()));
                ps.push(Payload::TsR(ts_r.clone()));
                if ch.mode == Mode::Transport {
                    ps.push(Payload::notify(notify::USE_TRANSPORT_MODE, vec![]));
                    // RFC 7296 §3.10.1: espd strips TFC padding only after a tunnel's
                    // inner IP header, so a transport-mode SA takes none.
                    ps.push(Payload::notify(
                        notify::ESP_TFC_PADDING_NOT_SUPPORTED,
                        vec![],
                    ));
                }
                pending = Some(PendingChild {
                    rekey: None,
                    name,
                    spi_in,
                    ts_i,
                    ts_r,
                    nonce: Vec::new(),
                    ke: None,
                    collision: None,
                });
            }
        }
        sa.local_id = Some(idi);
        sa.state = State::AuthSent;
        self.request(
            sa,
            exchange::IKE_AUTH,
            ps,
            ReqKind::Auth { child: pending },
            now,
        );
    }

    fn on_response(
        &mut self,
        sa: &mut IkeSa,
        now: Instant,
        _hdr: &Header,
        p: Pending,
        inner: Vec<Payload>,
    ) {
        match p.kind {
            ReqKind::Init => self.drop_msg("unexpected-response"),
            ReqKind::Auth { child } => self.initiator_auth_response(sa, now, child, inner),
            ReqKind::CreateChild(pc) => {
                let cfg = self.cfg.clone();
                let rekey = pc.rekey;
                let lost = pc.collision.as_ref().map(|(theirs, ni, nr)| {
                    let our_nr = inner.iter().find_map(|p| match p {
                        Payload::Nonce(n) => Some(&n[..]),
                        _ => None,
                    });
                    (
                        *theirs,
                        rekey_lost(&pc.nonce, our_nr.unwrap_or(&[]), ni, nr),
                    )
                });
                match self.child_from_answer(sa, &cfg, pc, &inner, now, false) {
                    Ok(c) => {
                        let new_in = c.spi_in;
                        self.install_both(sa, c);
                        match (rekey, lost) {
                            (Some(old), Some((theirs, true))) => {
                                // RFC 7296 §2.8.1: both ends rekeyed `old`;
                                // the SA made with the lowest of the four
                                // nonces is closed by its maker — ours. The
                                // peer's child replaces `old`, and the peer
                                // (its rekey's initiator) deletes `old`.
                                self.count("child-rekey-collisions");
                                self.log(format!(
                                    "{}: CHILD_SA rekey collision (RFC 7296 §2.8.1): our new SA {new_in:08x} has the lowest nonce and goes; the peer's {theirs:08x} replaces {old:08x}",
                                    sa.label()
                                ));
                                sa.rekey_hold.insert(old, now + UNTIL_REPLACED);
                                sa.queue.push_front(Queued::DeleteChild(new_in));
                            }
                            (Some(old), won) => {
                                if let Some((theirs, _)) = won {
                                    self.count("child-rekey-collisions");
                                    self.log(format!(
                                        "{}: CHILD_SA rekey collision (RFC 7296 §2.8.1): the peer's new SA {theirs:08x} has the lowest nonce; it closes it, ours {new_in:08x} replaces {old:08x}",
                                        sa.label()
                                    ));
                                }
                                // Make-before-break: the new pair is installed
                                // (the newest SA of a reqid carries the traffic);
                                // now the old one goes (RFC 7296 §2.8).
                                self.count("child-rekeyed");
                                if let Some(c) = sa.children.iter().find(|c| c.spi_in == old) {
                                    let (due, end) = (rekey_due(c), c.installed_at + c.life_time);
                                    self.rekey_lag(now.saturating_duration_since(due), now >= end);
                                }
                                sa.queue.push_front(Queued::DeleteChild(old));
                            }
                            (None, _) => {}
                        }
                    }
                    Err(e) => {
                        self.log(format!("{}: CREATE_CHILD_SA failed: {e}", sa.label()));
                        if let Some(old) = rekey {
                            sa.rekey_hold.insert(old, now + REKEY_RETRY);
                        }
                    }
                }
            }
            ReqKind::DeleteIke => {
                let label = sa.label();
                self.log(format!("{label}: IKE_SA deleted"));
                self.release_vips(sa);
                sa.dead = true;
            }
            ReqKind::DeleteChild(spi) => {
                if let Some(i) = sa.children.iter().position(|c| c.spi_in == spi) {
                    let c = sa.children.remove(i);
                    self.remove_child(c, "deleted");
                }
            }
            ReqKind::Liveness => self.count("liveness-ok"),
            ReqKind::RekeyIke { spi, nonce, ks } => {
                self.rekey_ike_answer(sa, now, spi, nonce, ks, inner)
            }
        }
    }

    /// When an IKE SA established (or rekeyed) at `now` rekeys: its
    /// connection's `rekey_time` less up to 10 % (RFC 7296 §2.8: jitter
    /// so that both ends seldom rekey at once).
    /// And when it expires if not rekeyed by then (`over_time` later).
    fn ike_rekey_at(&self, sa: &IkeSa, now: Instant) -> (Option<Instant>, Option<Instant>) {
        let Some(c) = self.cfg.conn(&sa.conn) else {
            return (None, None);
        };
        let Some(t) = c.ike_rekey_time else {
            return (None, None);
        };
        let span = c.ike_rand_time.unwrap_or(t / 10).min(t);
        let jitter = span.mul_f64((crypto::random_u64() % 1024) as f64 / 1024.0);
        let over = c.ike_over_time.unwrap_or(t / 10);
        (Some(now + t - jitter), Some(now + t + over))
    }

    /// RFC 7296 §2.18 / §1.3.2: CREATE_CHILD_SA with an SA payload for the
    /// IKE protocol (our new SPI in the proposals), Ni and KEi; no TS.
    fn send_rekey_ike(&mut self, sa: &mut IkeSa, group: Option<u16>, now: Instant) {
        let cfg = self.cfg.clone();
        let (Some(conn), Some(chosen)) = (cfg.conn(&sa.conn), sa.chosen) else {
            return self.pump(sa, now);
        };
        // The group the IKE SA has, unless the peer asked for another; a new
        // Diffie-Hellman exchange is mandatory (§2.18).
        let Some(g) = group.and_then(proposal::Group::from_id).or(chosen.dh) else {
            return self.pump(sa, now);
        };
        let spi = self.new_ike_spi();
        let mut nonce = vec![0u8; NONCE_LEN];
        crypto::random(&mut nonce);
        let ks = KeyShare::new(g);
        let props = ike_proposals(conn, spi.to_be_bytes().to_vec());
        let ps = vec![
            Payload::Sa(props),
            Payload::Nonce(nonce.clone()),
            Payload::Ke {
                group: g.id(),
                data: ks.public().to_vec(),
            },
        ];
        self.log(format!("{}: rekeying the IKE_SA", sa.label()));
        self.count("ike-rekeys-started");
        self.request(
            sa,
            exchange::CREATE_CHILD_SA,
            ps,
            ReqKind::RekeyIke { spi, nonce, ks },
            now,
        );
    }

    /// The answer to our IKE SA rekey: the new IKE SA takes over the
    /// children and we delete the old one (§2.18); an error retries later.
    fn rekey_ike_answer(
        &mut self,
        sa: &mut IkeSa,
        now: Instant,
        spi: u64,
        nonce: Vec<u8>,
        ks: KeyShare,
        inner: Vec<Payload>,
    ) {
        let crossing = sa.crossing.take();
        let retry = |me: &mut Self, sa: &mut IkeSa, why: String| {
            me.count("ike-rekey-failed");
            if let Some(x) = &crossing {
                // Ours failed, the peer's crossing rekey stands (§2.8.2):
                // its new SA takes over and the peer deletes this one.
                me.log(format!(
                    "{}: IKE_SA rekey failed: {why}; the peer's crossing rekey takes over",
                    sa.label()
                ));
                if let Some(mut theirs) = me.sas.remove(&x.spi) {
                    me.adopt(&mut theirs, sa, now);
                    me.sas.insert(x.spi, theirs);
                }
                return;
            }
            me.log(format!(
                "{}: IKE_SA rekey failed: {why}; retrying in {} s",
                sa.label(),
                REKEY_RETRY.as_secs()
            ));
            sa.rekey_at = Some(now + REKEY_RETRY);
        };
        if let Some(n) = inner.iter().find_map(|p| match p {
            Payload::Notify(n) if n.ty < 16384 => Some(n.clone()),
            _ => None,
        }) {
            if n.ty == notify::INVALID_KE_PAYLOAD && n.data.len() == 2 && crossing.is_none() {
                let g = u16::from_be_bytes([n.data[0], n.data[1]]);
                self.count("invalid-ke-received");
                sa.queue.push_front(Queued::RekeyIke(Some(g)));
                return;
            }
            return retry(
                self,
                sa,
                format!("the peer answered {}", notify::name(n.ty)),
            );
        }
        let cfg = self.cfg.clone();
        let Some(conn) = cfg.conn(&sa.conn) else {
            return;
        };
        let (mut props, mut nr, mut ke) = (None, None, None);
        for p in &inner {
            match p {
                Payload::Sa(x) => props = Some(x),
                Payload::Nonce(n) => nr = Some(n.clone()),
                Payload::Ke { group, data } => ke = Some((*group, data.clone())),
                _ => {}
            }
        }
        let (Some(props), Some(nr), Some((g, d))) = (props, nr, ke) else {
            return retry(self, sa, "the answer lacks SA, Nonce or KE".into());
        };
        let Some((chosen, peer_spi)) =
            proposal::accept_answer(&conn.proposals, props, wire::proto::IKE, true)
        else {
            return retry(self, sa, "the answer is not one of our proposals".into());
        };
        let peer_spi = match <[u8; 8]>::try_from(&peer_spi[..]) {
            Ok(b) if u64::from_be_bytes(b) != 0 => u64::from_be_bytes(b),
            _ => return retry(self, sa, "the answer's SPI is not 8 non-zero octets".into()),
        };
        if g != ks.group.id() || chosen.dh.map(|x| x.id()) != Some(g) {
            return retry(self, sa, "the answer's KE is not the group we sent".into());
        }
        let Ok(shared) = ks.agree(&d) else {
            return retry(self, sa, "the peer's KE value is invalid".into());
        };
        let old = sa.keys.as_ref().expect("established");
        let keys = crypto::derive_ike_rekey(
            old.prf,
            &old.sk_d,
            chosen.prf.expect("IKE has a PRF"),
            chosen.encr,
            chosen.integ,
            &nonce,
            &nr,
            &shared,
            spi,
            peer_spi,
        );
        let deleting = sa.state == State::Deleting;
        if let Some(x) = crossing {
            if !deleting {
                let mine = self.rekeyed_sa(
                    sa,
                    true,
                    spi,
                    peer_spi,
                    chosen,
                    keys,
                    nonce.clone(),
                    nr.clone(),
                    now,
                );
                return self.resolve_ike_crossing(sa, x, mine, &nonce, &nr, now);
            }
            // Terminated meanwhile: the peer's new SA goes as well.
            if let Some(mut theirs) = self.sas.remove(&x.spi) {
                self.delete_ike(&mut theirs, now);
                if !theirs.dead {
                    self.sas.insert(x.spi, theirs);
                }
            }
        }
        let mut new = self.successor(sa, true, spi, peer_spi, chosen, keys, nonce, nr, now);
        if deleting {
            // Terminated while the rekey ran: the peer has the new SA too,
            // so it is deleted as well.
            self.delete_ike(&mut new, now);
        }
        if !new.dead {
            self.sas.insert(spi, new);
        }
        // RFC 7296 §2.18: the initiator of the rekey deletes the old IKE SA
        // (`successor` left its queue empty).
        sa.queue.push_back(Queued::DeleteIke);
    }

    /// The IKE SA that replaces `old` after a rekey (RFC 7296 §2.18): new
    /// SPIs, keys and message IDs from 0; the children, identities and
    /// what the peer announced move over. `initiator`: we started the rekey
    /// (and are the new SA's original initiator). `old` is left superseded.
    #[allow(clippy::too_many_arguments)]
    fn successor(
        &mut self,
        old: &mut IkeSa,
        initiator: bool,
        spi_i: u64,
        spi_r: u64,
        chosen: Chosen,
        keys: IkeKeys,
        ni: Vec<u8>,
        nr: Vec<u8>,
        now: Instant,
    ) -> Box<IkeSa> {
        let mut n = self.rekeyed_sa(old, initiator, spi_i, spi_r, chosen, keys, ni, nr, now);
        self.adopt(&mut n, old, now);
        n
    }

    /// A new IKE SA from a rekey of `old`, holding nothing yet.
    #[allow(clippy::too_many_arguments)]
    fn rekeyed_sa(
        &mut self,
        old: &IkeSa,
        initiator: bool,
        spi_i: u64,
        spi_r: u64,
        chosen: Chosen,
        keys: IkeKeys,
        ni: Vec<u8>,
        nr: Vec<u8>,
        now: Instant,
    ) -> Box<IkeSa> {
        let mut n = IkeSa::new(
            old.conn.clone(),
            initiator,
            spi_i,
            spi_r,
            old.local,
            old.remote,
            State::Established,
            now,
        );
        n.nonce_i = ni;
        n.nonce_r = nr;
        n.chosen = Some(chosen);
        n.keys = Some(keys);
        n.nat = old.nat;
        n.peer_frag = old.peer_frag;
        n.peer_hashes = old.peer_hashes;
        n.local_id = old.local_id.clone();
        n.remote_id = old.remote_id.clone();
        n.established = Some(now);
        (n.rekey_at, n.expire_at) = self.ike_rekey_at(&n, now);
        n
    }

    /// `n` takes over what `old` held (RFC 7296 §2.18): its children, their
    /// rekey holds, its queued work and the client's virtual addresses
    /// with their leases; `old` is left superseded, waiting for its DELETE.
    fn adopt(&mut self, n: &mut IkeSa, old: &mut IkeSa, now: Instant) {
        n.vips_remote = std::mem::take(&mut old.vips_remote);
        n.vips_local = std::mem::take(&mut old.vips_local);
        n.dns_local = std::mem::take(&mut old.dns_local);
        if let Some(l) = self.lease_of.remove(&old.our_spi()) {
            self.lease_of.insert(n.our_spi(), l);
        }
        let ours = n.our_spi();
        n.children = std::mem::take(&mut old.children);
        for c in &mut n.children {
            c.ike = ours;
        }
        n.rekey_hold = std::mem::take(&mut old.rekey_hold);
        // Work queued on the old SA (new children, rekeys, deletes of
        // children) goes to the new one; the old one keeps only its DELETE.
        n.queue.extend(
            old.queue
                .drain(..)
                .filter(|q| !matches!(q, Queued::DeleteIke | Queued::RekeyIke(_))),
        );
        old.superseded = Some(now);
        old.rekey_at = None;
        self.count("ike-rekeyed");
        self.log(format!(
            "{}: IKE_SA rekeyed ({}): now {}, {} CHILD_SA(s) moved",
            old.label(),
            // A rekeyed SA's original initiator is who started the rekey.
            if n.initiator { "by us" } else { "by the peer" },
            n.label(),
            n.children.len()
        ));
    }

    /// RFC 7296 §2.8.2: our rekey's answer came while the peer's crossing
    /// rekey made a second new IKE SA (`x`). The exchange with the lowest
    /// of the four nonces made the redundant SA, which its initiator
    /// deletes; the other new SA takes the children, and its initiator
    /// deletes the old one. Nothing is removed from espd: the children
    /// only change IKE SA.
    #[allow(clippy::too_many_arguments)]
    fn resolve_ike_crossing(
        &mut self,
        sa: &mut IkeSa,
        x: Crossing,
        mut mine: Box<IkeSa>,
        our_ni: &[u8],
        their_nr: &[u8],
        now: Instant,
    ) {
        self.count("ike-rekey-collisions-resolved");
        let Some(mut theirs) = self.sas.remove(&x.spi) else {
            // The peer's new SA is already gone: ours is the only one.
            self.adopt(&mut mine, sa, now);
            sa.queue.push_back(Queued::DeleteIke);
            self.sas.insert(mine.our_spi(), mine);
            return;
        };
        if rekey_lost(our_ni, their_nr, &x.ni, &x.nr) {
            self.log(format!(
                "{}: crossing IKE_SA rekeys: ours has the lowest nonce, so {} is redundant (RFC 7296 §2.8.2): deleting it, {} takes over",
                sa.label(),
                mine.label(),
                theirs.label()
            ));
            self.adopt(&mut theirs, sa, now);
            mine.rekey_at = None;
            mine.queue.push_back(Queued::DeleteIke);
            self.pump(&mut mine, now);
        } else {
            self.log(format!(
                "{}: crossing IKE_SA rekeys: the peer's has the lowest nonce, so it deletes {}; {} takes over",
                sa.label(),
                theirs.label(),
                mine.label()
            ));
            self.adopt(&mut mine, sa, now);
            // The peer deletes its redundant SA; should it not, we do once
            // the wait for a superseded SA is over.
            theirs.superseded = Some(now);
            theirs.rekey_at = None;
            sa.queue.push_back(Queued::DeleteIke);
        }
        if !mine.dead {
            self.sas.insert(mine.our_spi(), mine);
        }
        self.sas.insert(theirs.our_spi(), theirs);
    }

    /// The responder did not authenticate (RFC 7296 §2.21.2): it has
    /// completed IKE_AUTH, so tell it in an INFORMATIONAL with
    /// AUTHENTICATION_FAILED and delete the IKE SA; nothing is installed here.
    fn peer_auth_failed(&mut self, sa: &mut IkeSa, now: Instant, why: &str) {
        self.count("auth-failed");
        self.log(format!(
            "{}: {why}: AUTHENTICATION_FAILED sent, IKE_SA deleted",
            sa.label()
        ));
        sa.state = State::Deleting;
        sa.queue.clear();
        sa.first_child = None;
        self.request(
            sa,
            exchange::INFORMATIONAL,
            vec![
                Payload::notify(notify::AUTHENTICATION_FAILED, vec![]),
                Payload::Delete {
                    proto: wire::proto::IKE,
                    spi_size: 0,
                    spis: vec![],
                },
            ],
            ReqKind::DeleteIke,
            now,
        );
    }

    fn initiator_auth_response(
        &mut self,
        sa: &mut IkeSa,
        now: Instant,
        child: Option<PendingChild>,
        inner: Vec<Payload>,
    ) {
        let cfg = self.cfg.clone();
        let Some(conn) = cfg.conn(&sa.conn) else {
            return self.kill_now(sa, "connection removed");
        };
        let (mut idr, mut auth) = (None, None);
        for p in &inner {
            match p {
                Payload::IdR(i) => idr = Some(i.clone()),
                Payload::Auth { method, data } => auth = Some((*method, data.clone())),
                _ => {}
            }
        }
        let (Some(idr), Some((method, auth))) = (idr, auth) else {
            let why = first_error(&inner)
                .map_or("no IDr or AUTH in the answer".to_string(), notify::name);
            self.count("auth-failed");
            return self.kill_now(sa, &format!("IKE_AUTH refused by the peer: {why}"));
        };
        if !conn.remote_id.matches(&idr) {
            return self.peer_auth_failed(
                sa,
                now,
                &format!(
                    "the peer identifies as {idr}, which is not remote id \"{}\"",
                    conn.remote_id
                ),
            );
        }
        let idi = sa.local_id.clone().expect("set in send_auth");
        let keys = sa.keys.as_ref().expect("derived");
        let octets = signed_octets(keys, false, &sa.init_resp, &sa.nonce_i, &idr);
        let prf = keys.prf;
        let how = match self.check_auth(conn, prf, &octets, &idi, &idr, method, &auth, &inner) {
            Ok(h) => h,
            Err(e) => {
                return self.peer_auth_failed(sa, now, &format!("the peer's AUTH ({idr}): {e}"))
            }
        };
        sa.remote_id = Some(idr.clone());
        self.established(sa, &idr, &how, now);
        if !conn.vips.is_empty() {
            // RFC 7296 §2.19: the addresses the responder assigned us.
            for p in &inner {
                let Payload::Cp { ty, attrs } = p else {
                    continue;
                };
                if *ty != wire::cfg::REPLY {
                    continue;
                }
                for a in attrs {
                    let v: Option<IpAddr> = match (a.ty, a.value.len()) {
                        (wire::cfg::INTERNAL_IP4_ADDRESS, 4) => {
                            <[u8; 4]>::try_from(&a.value[..]).ok().map(IpAddr::from)
                        }
                        (wire::cfg::INTERNAL_IP6_ADDRESS, 17) => {
                            <[u8; 16]>::try_from(&a.value[..16]).ok().map(IpAddr::from)
                        }
                        _ => None,
                    };
                    if let Some(v) = v.filter(|v| !sa.vips_local.contains(v)) {
                        self.log(format!(
                            "{}: virtual IP {v} assigned by the peer",
                            sa.label()
                        ));
                        sa.vips_local.push(v);
                    }
                    // RFC 7296 §3.15.1: INTERNAL_IP4_DNS (4 octets),
                    // INTERNAL_IP6_DNS (16).
                    let dns: Option<IpAddr> = match (a.ty, a.value.len()) {
                        (wire::cfg::INTERNAL_IP4_DNS, 4) => {
                            <[u8; 4]>::try_from(&a.value[..]).ok().map(IpAddr::from)
                        }
                        (wire::cfg::INTERNAL_IP6_DNS, 16) => {
                            <[u8; 16]>::try_from(&a.value[..]).ok().map(IpAddr::from)
                        }
                        _ => None,
                    };
                    if let Some(d) = dns.filter(|d| !sa.dns_local.contains(d)) {
                        self.log(format!("{}: DNS server {d} named by the peer", sa.label()));
                        sa.dns_local.push(d);
                    }
                }
            }
            if sa.vips_local.is_empty() {
                self.count("vips-failed");
                let why = first_error(&inner).map_or("none in its answer".into(), notify::name);
                self.log(format!(
                    "{}: we asked for a virtual IP and got none ({why}): deleting the IKE_SA",
                    sa.label()
                ));
                sa.first_child = None;
                return self.delete_ike(sa, now);
            }
        }
        if let Some(pc) = child {
            let name = pc.name.clone();
            match self.child_from_answer(sa, &cfg, pc, &inner, now, true) {
                Ok(c) => self.install_both(sa, c),
                Err(e) => self.log(format!("{}: child {name} not set up: {e}", sa.label())),
            }
        }
        sa.first_child = None;
    }

    /// The initiator's view of a CHILD_SA answer (IKE_AUTH or CREATE_CHILD_SA).
    fn child_from_answer(
        &mut self,
        sa: &mut IkeSa,
        cfg: &Config,
        pc: PendingChild,
        inner: &[Payload],
        now: Instant,
        in_auth: bool,
    ) -> Result<ChildSa, String> {
        let Some((_, ch)) = cfg.child(&pc.name) else {
            return Err("child removed from the configuration".into());
        };
        if let Some(e) = first_error(inner) {
            return Err(format!("refused by the peer: {}", notify::name(e)));
        }
        let (mut props, mut tsi, mut tsr, mut nr, mut ke) = (None, None, None, None, None);
        for p in inner {
            match p {
                Payload::Sa(x) => props = Some(x),
                Payload::TsI(t) => tsi = Some(t),
                Payload::TsR(t) => tsr = Some(t),
                Payload::Nonce(n) => nr = Some(n),
                Payload::Ke { group, data } => ke = Some((*group, data)),
                _ => {}
            }
        }
        let (Some(props), Some(tsi), Some(tsr)) = (props, tsi, tsr) else {
            return Err("no SA, TSi or TSr in the answer".into());
        };
        let Some((alg, spi)) = proposal::accept_answer(
            &child_algsets(ch, pc.ke.is_some()),
            props,
            wire::proto::ESP,
            pc.ke.is_some(),
        ) else {
            return Err("the peer chose an ESP proposal we did not offer".into());
        };
        if spi.len() != 4 {
            return Err("the peer's ESP SPI is not 4 octets".into());
        }
        let spi_out = u32::from_be_bytes([spi[0], spi[1], spi[2], spi[3]]);
        if !ts::covered(tsi, &pc.ts_i) || !ts::covered(tsr, &pc.ts_r) {
            return Err(
                "the peer's traffic selectors are wider than we proposed (RFC 7296 §2.9)".into(),
            );
        }
        let transport = find_notify(inner, notify::USE_TRANSPORT_MODE).is_some();
        if ch.mode == Mode::Transport && !transport {
            return Err("the peer refuses transport mode".into());
        }
        let keys = sa.keys.as_ref().expect("established");
        let (ni, nr): (&[u8], Vec<u8>) = if in_auth {
            (&sa.nonce_i, sa.nonce_r.clone())
        } else {
            (&pc.nonce, nr.ok_or("no Nonce in the answer")?.clone())
        };
        let shared = match (pc.ke, ke) {
            (Some(k), Some((g, d))) if g == k.group.id() => {
                Some(k.agree(d).map_err(|_| "the peer's KE value is invalid")?)
            }
            (Some(_), _) => return Err("the peer's answer lacks our PFS group's KE".into()),
            (None, _) => None,
        };
        let len = alg.encr.key_len() + alg.integ.map_or(0, |i| i.key_len());
        let km = crypto::child_keymat(
            keys.prf,
            &keys.sk_d,
            shared.as_deref().map(|s| &s[..]),
            ni,
            &nr,
            2 * len,
        );
        // RFC 7296 §2.17: initiator → responder keys first.
        let (out_k, in_k) = km.split_at(len);
        let mut c = self.make_child(
            sa,
            ch,
            pc.spi_in,
            spi_out,
            alg,
            in_k,
            out_k,
            tsi.clone(),
            tsr.clone(),
            true,
            now,
        );
        c.peer_takes_tfc = find_notify(inner, notify::ESP_TFC_PADDING_NOT_SUPPORTED).is_none();
        Ok(c)
    }

    #[allow(clippy::too_many_arguments)]
    fn make_child(
        &mut self,
        sa: &IkeSa,
        ch: &Child,
        spi_in: u32,
        spi_out: u32,
        alg: Chosen,
        key_in: &[u8],
        key_out: &[u8],
        ts_i: Vec<Ts>,
        ts_r: Vec<Ts>,
        we_initiated: bool,
        now: Instant,
    ) -> ChildSa {
        // TSi is the initiator's side of the exchange that made the child
        // (RFC 7296 §2.9) — in CREATE_CHILD_SA that need not be the IKE
        // SA's initiator.
        let (ts_local, ts_remote) = if we_initiated {
            (ts_i, ts_r)
        } else {
            (ts_r, ts_i)
        };
        let mut c = ChildSa {
            ike: sa.our_spi(),
            conn: sa.conn.clone(),
            name: ch.name.clone(),
            reqid: ch.reqid,
            mode: ch.mode,
            local: sa.local,
            remote: sa.remote,
            encap: sa.nat,
            spi_in,
            spi_out,
            alg,
            key_in: Zeroizing::new(key_in.to_vec()),
            key_out: Zeroizing::new(key_out.to_vec()),
            ts_local,
            ts_remote,
            replay_window: ch.replay_window,
            life_time: ch.life_time,
            rekey_time: ch.rekey_time,
            rand_time: ch.rand_time,
            volume: [
                ch.rekey_bytes,
                ch.life_bytes,
                ch.rekey_packets,
                ch.life_packets,
            ],
            trap: ch.start_action == StartAction::Trap,
            peer_takes_tfc: true,
            installed_at: now,
        };
        c.reqid = self.reqids.acquire(reqid_key(&c), ch.reqid);
        c
    }

    /// The IKE SA `sa` is gone: its virtual addresses go offline (kept for
    /// the same client, RFC 7296 §2.19 does not say; strongSwan does too).
    fn release_vips(&mut self, sa: &IkeSa) {
        for (pool, a) in self.lease_of.remove(&sa.our_spi()).unwrap_or_default() {
            if self.leases.release(&pool, a) {
                self.log(format!(
                    "{}: virtual IP {a} released to pool {pool}",
                    sa.label()
                ));
            }
        }
    }

    /// RFC 7296 §2.19, §3.15.1: a CFG_REQUEST answered from the
    /// connection's pools, one address per family asked for (the one
    /// asked for if it is free to this client). Ok(None) when nothing was
    /// asked or the connection has no pools (the request is ignored);
    /// Err when addresses were asked for and none could be given
    /// (INTERNAL_ADDRESS_FAILURE: no CHILD_SA, §3.10.1).
    fn assign_vips(
        &mut self,
        sa: &mut IkeSa,
        conn: &Conn,
        inner: &[Payload],
        id: &Id,
    ) -> Result<Option<Payload>, String> {
        let Some(attrs) = inner.iter().find_map(|p| match p {
            Payload::Cp { ty, attrs } if *ty == wire::cfg::REQUEST => Some(attrs),
            _ => None,
        }) else {
            return Ok(None);
        };
        if conn.pools.is_empty() {
            self.log(format!(
                "{}: CFG_REQUEST ignored: connection {} has no pools",
                sa.label(),
                conn.name
            ));
            return Ok(None);
        }
        let cfg = self.cfg.clone();
        let mut asked: Vec<(bool, Option<IpAddr>)> = Vec::new();
        for a in attrs {
            let (v4, want) = match (a.ty, a.value.len()) {
                (wire::cfg::INTERNAL_IP4_ADDRESS, 4) => {
                    let b: [u8; 4] = a.value[..].try_into().expect("4");
                    (true, Some(IpAddr::from(b)))
                }
                (wire::cfg::INTERNAL_IP4_ADDRESS, _) => (true, None),
                (wire::cfg::INTERNAL_IP6_ADDRESS, 17) => {
                    let b: [u8; 16] = a.value[..16].try_into().expect("16");
                    (false, Some(IpAddr::from(b)))
                }
                (wire::cfg::INTERNAL_IP6_ADDRESS, _) => (false, None),
                _ => continue,
            };
            if !asked.iter().any(|(f, _)| *f == v4) {
                asked.push((v4, want.filter(|w| !w.is_unspecified())));
            }
        }
        if asked.is_empty() {
            return Ok(None);
        }
        let mut reply = Vec::new();
        let who = id.body();
        for (v4, want) in asked {
            let got = conn.pools.iter().find_map(|name| {
                let p = cfg.pool(name).filter(|p| p.first.is_ipv4() == v4)?;
                self.leases.acquire(name, &who, want).map(|a| (p, a))
            });
            let Some((p, a)) = got else {
                continue;
            };
            self.log(format!(
                "{}: virtual IP {a} assigned to {id} from pool {}",
                sa.label(),
                p.name
            ));
            self.count("vips-assigned");
            sa.vips_remote.push(a);
            self.lease_of
                .entry(sa.our_spi())
                .or_default()
                .push((p.name.clone(), a));
            reply.push(wire::CfgAttr::address(a));
            for d in p.dns.iter().filter(|d| d.is_ipv4() == v4) {
                reply.push(match d {
                    IpAddr::V4(x) => wire::CfgAttr {
                        ty: wire::cfg::INTERNAL_IP4_DNS,
                        value: x.octets().to_vec(),
                    },
                    IpAddr::V6(x) => wire::CfgAttr {
                        ty: wire::cfg::INTERNAL_IP6_DNS,
                        value: x.octets().to_vec(),
                    },
                });
            }
        }
        if sa.vips_remote.is_empty() {
            self.count("vips-failed");
            return Err(format!(
                "no free address for {id} in pools {}",
                conn.pools.join(", ")
            ));
        }
        Ok(Some(Payload::Cp {
            ty: wire::cfg::REPLY,
            attrs: reply,
        }))
    }

    /// A CHILD_SA is gone: espd removes it, its reqid loses a user.
    fn remove_child(&mut self, c: ChildSa, why: impl Into<String>) {
        self.reqids.release(&reqid_key(&c));
        self.spis_in.remove(&c.spi_in);
        self.out.push_back(Output::Remove {
            child: Box::new(c),
            why: why.into(),
        });
    }

    fn install_both(&mut self, sa: &mut IkeSa, c: ChildSa) {
        self.log(child_line(sa, &c, "up"));
        self.count("child-established");
        self.out.push_back(Output::Install {
            child: Box::new(c.clone()),
            dir: Dir::In,
        });
        self.out.push_back(Output::Install {
            child: Box::new(c.clone()),
            dir: Dir::Out,
        });
        sa.children.push(c);
    }

    /// The responder's choice of child config and proposal for a request's
    /// SA/TSi/TSr (RFC 7296 §2.9 narrowing); the notify to refuse with.
    fn responder_child(
        &self,
        sa: &IkeSa,
        conn: &Conn,
        inner: &[Payload],
        with_ke: Option<u16>,
    ) -> Result<ChildChoice, (u16, String)> {
        let (mut props, mut tsi, mut tsr) = (None, None, None);
        for p in inner {
            match p {
                Payload::Sa(x) => props = Some(x),
                Payload::TsI(t) => tsi = Some(t),
                Payload::TsR(t) => tsr = Some(t),
                _ => {}
            }
        }
        let (Some(props), Some(tsi), Some(tsr)) = (props, tsi, tsr) else {
            return Err((
                notify::INVALID_SYNTAX,
                "no SA, TSi or TSr for the child".into(),
            ));
        };
        let transport = find_notify(inner, notify::USE_TRANSPORT_MODE).is_some();
        let mut ts_ok = false;
        for ch in &conn.children {
            let (mine_i, mine_r) = (
                resolve_ts(&ch.remote_ts, sa.remote.ip(), &sa.vips_remote),
                resolve_ts(&ch.local_ts, sa.local.ip(), &sa.vips_local),
            );
            let (ni, nr) = (ts::narrow(tsi, &mine_i), ts::narrow(tsr, &mine_r));
            if ni.is_empty() || nr.is_empty() {
                continue;
            }
            ts_ok = true;
            if ch.mode == Mode::Transport && !transport {
                continue;
            }
            let want_dh = with_ke.is_some();
            let Some((num, alg, spi)) = proposal::select(
                &child_algsets(ch, want_dh),
                props,
                wire::proto::ESP,
                want_dh,
            ) else {
                continue;
            };
            if let (Some(g), Some(d)) = (with_ke, alg.dh) {
                if g != d.id() {
                    return Err((
                        notify::INVALID_KE_PAYLOAD,
                        format!("KE group {g}, we chose {}", d.name()),
                    ));
                }
            }
            if spi.len() != 4 {
                return Err((notify::INVALID_SYNTAX, "ESP SPI not 4 octets".into()));
            }
            let spi_out = u32::from_be_bytes([spi[0], spi[1], spi[2], spi[3]]);
            return Ok((
                ch.clone(),
                alg,
                spi_out,
                num,
                ni,
                nr,
                transport && ch.mode == Mode::Transport,
            ));
        }
        if ts_ok {
            Err((
                notify::NO_PROPOSAL_CHOSEN,
                "no ESP proposal (or mode) in common".into(),
            ))
        } else {
            Err((
                notify::TS_UNACCEPTABLE,
                format!(
                    "traffic selectors {} === {} match no child",
                    tsi.iter().map(ts::describe).collect::<Vec<_>>().join(","),
                    tsr.iter().map(ts::describe).collect::<Vec<_>>().join(",")
                ),
            ))
        }
    }

    fn responder_auth(&mut self, sa: &mut IkeSa, now: Instant, hdr: &Header, inner: Vec<Payload>) {
        let cfg = self.cfg.clone();
        let Some(conn) = cfg.conn(&sa.conn) else {
            return self.kill_now(sa, "connection removed");
        };
        let (mut idi, mut idr_asked, mut auth) = (None, None, None);
        for p in &inner {
            match p {
                Payload::IdI(i) => idi = Some(i.clone()),
                Payload::IdR(i) => idr_asked = Some(i.clone()),
                Payload::Auth { method, data } => auth = Some((*method, data.clone())),
                _ => {}
            }
        }
        let (Some(idi), Some((method, auth))) = (idi, auth) else {
            self.respond(
                sa,
                exchange::IKE_AUTH,
                hdr.msg_id,
                vec![Payload::notify(notify::INVALID_SYNTAX, vec![])],
            );
            return self.kill_now(sa, "IKE_AUTH without IDi or AUTH");
        };
        let idr = own_id(&conn.local_id, sa.local.ip());
        let fail = |me: &mut Endpoint, sa: &mut IkeSa, why: String| {
            me.count("auth-failed");
            // RFC 7296 §2.21.2: AUTHENTICATION_FAILED in the (protected) answer.
            me.respond(
                sa,
                exchange::IKE_AUTH,
                hdr.msg_id,
                vec![Payload::notify(notify::AUTHENTICATION_FAILED, vec![])],
            );
            me.kill_now(
                sa,
                &format!("peer {idi}: {why}: AUTHENTICATION_FAILED sent"),
            );
        };
        if !conn.remote_id.matches(&idi) {
            return fail(
                self,
                sa,
                format!("identity is not remote id \"{}\"", conn.remote_id),
            );
        }
        // RFC 7296 §3.5: the IDr the initiator asked for must be us; a DN
        // compares attribute by attribute (its string types may differ).
        if idr_asked
            .as_ref()
            .is_some_and(|a| !IdConf::Id(a.clone()).matches(&idr))
        {
            return fail(
                self,
                sa,
                format!(
                    "asks for us as {} but we are {idr}",
                    idr_asked.as_ref().expect("some")
                ),
            );
        }
        let keys = sa.keys.as_ref().expect("derived");
        let prf = keys.prf;
        let theirs = signed_octets(keys, true, &sa.init_req, &sa.nonce_r, &idi);
        let mine = signed_octets(keys, false, &sa.init_resp, &sa.nonce_i, &idr);
        let how = match self.check_auth(conn, prf, &theirs, &idr, &idi, method, &auth, &inner) {
            Ok(h) => h,
            Err(e) => return fail(self, sa, e),
        };
        let ours = match self.make_auth(conn, prf, &mine, &idr, Some(&idi), sa.peer_hashes) {
            Ok(a) => a,
            Err(e) => return fail(self, sa, e),
        };
        sa.local_id = Some(idr.clone());
        sa.remote_id = Some(idi.clone());
        if find_notify(&inner, notify::INITIAL_CONTACT).is_some() && !conn.unique_never {
            // RFC 7296 §2.4: the peer has no other IKE SA with us: drop stale
            // ones (not with `unique = never`: the identity may be shared).
            let stale: Vec<u64> = self
                .sas
                .of_peer(&sa.conn, &idi)
                .filter(|(_, o)| {
                    o.remote_id.as_ref() == Some(&idi) && o.state == State::Established
                })
                .map(|(k, _)| *k)
                .collect();
            for s in stale {
                if let Some(o) = self.sas.remove(&s) {
                    self.log(format!(
                        "{}: INITIAL_CONTACT from {idi}: stale IKE_SA removed",
                        o.label()
                    ));
                    self.count("initial-contact-cleared");
                    self.kill(o, "INITIAL_CONTACT");
                }
            }
        }
        self.release_half_open(sa);
        self.by_init.remove(&(sa.remote, sa.spi_i));
        self.established(sa, &idi, &how, now);
        let mut resp = vec![Payload::IdR(idr)];
        resp.extend(ours);
        let has_child = inner.iter().any(|p| matches!(p, Payload::Sa(_)));
        match self.assign_vips(sa, conn, &inner, &idi) {
            Ok(Some(cp)) => resp.push(cp),
            Ok(None) => {}
            Err(why) => {
                // RFC 7296 §3.10.1: the IKE SA stands, no CHILD_SA is made.
                self.log(format!(
                    "{}: {why}: INTERNAL_ADDRESS_FAILURE sent",
                    sa.label()
                ));
                resp.push(Payload::notify(notify::INTERNAL_ADDRESS_FAILURE, vec![]));
                return self.respond(sa, exchange::IKE_AUTH, hdr.msg_id, resp);
            }
        }
        if !has_child {
            return self.respond(sa, exchange::IKE_AUTH, hdr.msg_id, resp);
        }
        match self.responder_child(sa, conn, &inner, None) {
            Ok((ch, alg, spi_out, num, ni, nr, transport)) => {
                let spi_in = self.new_spi();
                let keys = sa.keys.as_ref().expect("derived");
                let len = alg.encr.key_len() + alg.integ.map_or(0, |i| i.key_len());
                let km = crypto::child_keymat(
                    keys.prf,
                    &keys.sk_d,
                    None,
                    &sa.nonce_i,
                    &sa.nonce_r,
                    2 * len,
                );
                let (in_k, out_k) = km.split_at(len);
                let mut c = self.make_child(
                    sa,
                    &ch,
                    spi_in,
                    spi_out,
                    alg,
                    in_k,
                    out_k,
                    ni.clone(),
                    nr.clone(),
                    false,
                    now,
                );
                c.peer_takes_tfc =
                    find_notify(&inner, notify::ESP_TFC_PADDING_NOT_SUPPORTED).is_none();
                resp.push(Payload::Sa(vec![alg.proposal(
                    num,
                    wire::proto::ESP,
                    spi_in.to_be_bytes().to_vec(),
                )]));
                resp.push(Payload::TsI(ni));
                resp.push(Payload::TsR(nr));
                if transport {
                    resp.push(Payload::notify(notify::USE_TRANSPORT_MODE, vec![]));
                    // RFC 7296 §3.10.1: espd strips TFC padding only after a tunnel's
                    // inner IP header, so a transport-mode SA takes none.
                    resp.push(Payload::notify(
                        notify::ESP_TFC_PADDING_NOT_SUPPORTED,
                        vec![],
                    ));
                }
                self.responder_install(sa, c, exchange::IKE_AUTH, hdr.msg_id, resp);
            }
            Err((n, why)) => {
                self.log(format!(
                    "{}: child refused: {why} ({})",
                    sa.label(),
                    notify::name(n)
                ));
                resp.push(Payload::notify(n, vec![]));
                self.respond(sa, exchange::IKE_AUTH, hdr.msg_id, resp);
            }
        }
    }

    /// Inbound first, then the answer, then outbound: the initiator may
    /// send as soon as it has our answer, and our first outbound packet
    /// must not arrive before it knows the SA.
    fn responder_install(
        &mut self,
        sa: &mut IkeSa,
        c: ChildSa,
        exch: u8,
        msg_id: u32,
        resp: Vec<Payload>,
    ) {
        self.log(child_line(sa, &c, "up"));
        self.count("child-established");
        self.out.push_back(Output::Install {
            child: Box::new(c.clone()),
            dir: Dir::In,
        });
        self.respond(sa, exch, msg_id, resp);
        self.out.push_back(Output::Install {
            child: Box::new(c.clone()),
            dir: Dir::Out,
        });
        sa.children.push(c);
    }

    /// A peer's IKE SA rekey (RFC 7296 §2.18): choose a proposal, answer
    /// with our new SPI, Nr and KEr, and move everything to the new IKE SA.
    /// While we rekey this IKE SA ourselves, or it is already rekeyed, the
    /// answer is TEMPORARY_FAILURE (§2.25) and the peer retries later.
    fn responder_rekey_ike(
        &mut self,
        sa: &mut IkeSa,
        conn: &Conn,
        now: Instant,
        hdr: &Header,
        inner: &[Payload],
    ) {
        let refuse = |me: &mut Self, sa: &mut IkeSa, n: u16, data: Vec<u8>, why: &str| {
            me.log(format!(
                "{}: the peer's IKE_SA rekey refused: {why} ({})",
                sa.label(),
                notify::name(n)
            ));
            me.respond(
                sa,
                exchange::CREATE_CHILD_SA,
                hdr.msg_id,
                vec![Payload::notify(n, data)],
            );
        };
        let ours_running = matches!(
            sa.pending.as_ref().map(|p| &p.kind),
            Some(ReqKind::RekeyIke { .. })
        );
        // RFC 7296 §2.25.2: a rekey of an IKE SA we are rekeying too is
        // answered as usual and resolved by nonces (§2.8.2) when our answer
        // comes; one we have already replaced or are closing gets
        // TEMPORARY_FAILURE.
        if sa.superseded.is_some() || sa.state != State::Established || sa.crossing.is_some() {
            self.count("ike-rekey-refused");
            return refuse(
                self,
                sa,
                notify::TEMPORARY_FAILURE,
                vec![],
                "it is being replaced or closed",
            );
        }
        let (mut props, mut ni, mut ke) = (None, None, None);
        for p in inner {
            match p {
                Payload::Sa(x) => props = Some(x),
                Payload::Nonce(n) => ni = Some(n.clone()),
                Payload::Ke { group, data } => ke = Some((*group, data.clone())),
                _ => {}
            }
        }
        let (Some(props), Some(ni)) = (props, ni) else {
            return refuse(self, sa, notify::INVALID_SYNTAX, vec![], "no SA or Nonce");
        };
        // §2.18: a new Diffie-Hellman exchange is mandatory.
        let Some((num, chosen, peer_spi)) =
            proposal::select(&conn.proposals, props, wire::proto::IKE, true)
        else {
            return refuse(
                self,
                sa,
                notify::NO_PROPOSAL_CHOSEN,
                vec![],
                "no proposal in common",
            );
        };
        let dh = chosen.dh.expect("IKE proposals have a group");
        let Some((g, d)) = ke.filter(|(g, _)| *g == dh.id()) else {
            return refuse(
                self,
                sa,
                notify::INVALID_KE_PAYLOAD,
                dh.id().to_be_bytes().to_vec(),
                "another group",
            );
        };
        let peer_spi = match <[u8; 8]>::try_from(&peer_spi[..]) {
            Ok(b) if u64::from_be_bytes(b) != 0 => u64::from_be_bytes(b),
            _ => {
                return refuse(
                    self,
                    sa,
                    notify::INVALID_SYNTAX,
                    vec![],
                    "the SPI is not 8 non-zero octets",
                )
            }
        };
        let ks = KeyShare::new(dh);
        let public = ks.public().to_vec();
        let Ok(shared) = ks.agree(&d) else {
            return refuse(
                self,
                sa,
                notify::INVALID_SYNTAX,
                vec![],
                "an invalid KE value",
            );
        };
        debug_assert_eq!(g, dh.id());
        let spi = self.new_ike_spi();
        let mut nr = vec![0u8; NONCE_LEN];
        crypto::random(&mut nr);
        let old = sa.keys.as_ref().expect("established");
        let keys = crypto::derive_ike_rekey(
            old.prf,
            &old.sk_d,
            chosen.prf.expect("IKE has a PRF"),
            chosen.encr,
            chosen.integ,
            &ni,
            &nr,
            &shared,
            peer_spi,
            spi,
        );
        let resp = vec![
            Payload::Sa(vec![chosen.proposal(
                num,
                wire::proto::IKE,
                spi.to_be_bytes().to_vec(),
            )]),
            Payload::Nonce(nr.clone()),
            Payload::Ke {
                group: dh.id(),
                data: public,
            },
        ];
        // The answer goes on the old SA, then the new one exists: the
        // peer's next request may already come on it.
        self.respond(sa, exchange::CREATE_CHILD_SA, hdr.msg_id, resp);
        if ours_running {
            // §2.8.2: two new IKE SAs; the children stay until our answer
            // says which one survives.
            self.count("ike-rekey-collisions");
            self.log(format!(
                "{}: the peer rekeys the IKE_SA while we do: answered, resolved when our answer comes (RFC 7296 §2.8.2)",
                sa.label()
            ));
            let new = self.rekeyed_sa(
                sa,
                false,
                peer_spi,
                spi,
                chosen,
                keys,
                ni.clone(),
                nr.clone(),
                now,
            );
            sa.crossing = Some(Crossing { spi, ni, nr });
            self.sas.insert(spi, new);
            return;
        }
        let new = self.successor(sa, false, peer_spi, spi, chosen, keys, ni, nr, now);
        self.sas.insert(spi, new);
    }

    fn responder_create_child(
        &mut self,
        sa: &mut IkeSa,
        now: Instant,
        hdr: &Header,
        inner: Vec<Payload>,
    ) {
        let cfg = self.cfg.clone();
        let Some(conn) = cfg.conn(&sa.conn) else {
            return self.kill_now(sa, "connection removed");
        };
        let rekey = find_notify(&inner, notify::REKEY_SA).cloned();
        let is_ike_rekey = inner.iter().any(
            |p| matches!(p, Payload::Sa(ps) if ps.iter().any(|x| x.proto == wire::proto::IKE)),
        );
        if is_ike_rekey {
            return self.responder_rekey_ike(sa, conn, now, hdr, &inner);
        }
        let (mut ni, mut ke) = (None, None);
        for p in &inner {
            match p {
                Payload::Nonce(n) => ni = Some(n.clone()),
                Payload::Ke { group, data } => ke = Some((*group, data.clone())),
                _ => {}
            }
        }
        let Some(ni) = ni else {
            return self.respond(
                sa,
                exchange::CREATE_CHILD_SA,
                hdr.msg_id,
                vec![Payload::notify(notify::INVALID_SYNTAX, vec![])],
            );
        };
        // The child a rekey replaces (REKEY_SA names our outbound SPI, RFC
        // 7296 §1.3.3), and what becomes of the request (§2.25.1).
        let mut collides = false;
        if let Some(r) = &rekey {
            let old = <[u8; 4]>::try_from(&r.spi[..])
                .ok()
                .map(u32::from_be_bytes)
                .and_then(|spi| sa.children.iter().find(|c| c.spi_out == spi))
                .map(|c| c.spi_in);
            let refuse = |me: &mut Self, sa: &mut IkeSa, n: u16, why: &str| {
                me.log(format!(
                    "{}: the peer's CHILD_SA rekey of {} refused: {why} ({})",
                    sa.label(),
                    hex(&r.spi),
                    notify::name(n)
                ));
                me.respond(
                    sa,
                    exchange::CREATE_CHILD_SA,
                    hdr.msg_id,
                    vec![Payload::notify(n, vec![])],
                );
            };
            let Some(old) = old else {
                // §2.25.1: a rekey of a child that does not exist.
                self.count("child-rekey-not-found");
                return refuse(self, sa, notify::CHILD_SA_NOT_FOUND, "no such CHILD_SA");
            };
            let closing = |k: &ReqKind| matches!(k, ReqKind::DeleteChild(x) if *x == old);
            if sa.pending.as_ref().is_some_and(|p| closing(&p.kind))
                || sa
                    .queue
                    .iter()
                    .any(|q| matches!(q, Queued::DeleteChild(x) if *x == old))
            {
                // §2.25.1: one we are closing (or have replaced) is not rekeyed.
                self.count("child-rekey-collisions");
                return refuse(self, sa, notify::TEMPORARY_FAILURE, "we are closing it");
            }
            // §2.25.1: one we are rekeying ourselves is rekeyed as usual;
            // when our answer comes, the lowest nonce decides which new SA
            // stays (§2.8.1). One we were about to rekey is not, now.
            collides = matches!(
                sa.pending.as_ref().map(|p| &p.kind),
                Some(ReqKind::CreateChild(pc)) if pc.rekey == Some(old)
            );
            sa.queue
                .retain(|q| !matches!(q, Queued::Rekey(x) if *x == old));
        }
        match self.responder_child(sa, conn, &inner, ke.as_ref().map(|k| k.0)) {
            Ok((ch, alg, spi_out, num, tsi, tsr, transport)) => {
                let mut nr = vec![0u8; NONCE_LEN];
                crypto::random(&mut nr);
                let mut resp = vec![Payload::Sa(vec![]), Payload::Nonce(nr.clone())];
                let shared = match (&ke, alg.dh) {
                    (Some((_, d)), Some(g)) => {
                        let ks = KeyShare::new(g);
                        resp.push(Payload::Ke {
                            group: g.id(),
                            data: ks.public().to_vec(),
                        });
                        match ks.agree(d) {
                            Ok(s) => Some(s),
                            Err(_) => {
                                self.drop_msg("bad-ke");
                                return self.respond(
                                    sa,
                                    exchange::CREATE_CHILD_SA,
                                    hdr.msg_id,
                                    vec![Payload::notify(notify::INVALID_SYNTAX, vec![])],
                                );
                            }
                        }
                    }
                    _ => None,
                };
                let spi_in = self.new_spi();
                resp[0] = Payload::Sa(vec![alg.proposal(
                    num,
                    wire::proto::ESP,
                    spi_in.to_be_bytes().to_vec(),
                )]);
                resp.push(Payload::TsI(tsi.clone()));
                resp.push(Payload::TsR(tsr.clone()));
                if transport {
                    resp.push(Payload::notify(notify::USE_TRANSPORT_MODE, vec![]));
                    // RFC 7296 §3.10.1: espd strips TFC padding only after a tunnel's
                    // inner IP header, so a transport-mode SA takes none.
                    resp.push(Payload::notify(
                        notify::ESP_TFC_PADDING_NOT_SUPPORTED,
                        vec![],
                    ));
                }
                let keys = sa.keys.as_ref().expect("established");
                let len = alg.encr.key_len() + alg.integ.map_or(0, |i| i.key_len());
                let km = crypto::child_keymat(
                    keys.prf,
                    &keys.sk_d,
                    shared.as_deref().map(|s| &s[..]),
                    &ni,
                    &nr,
                    2 * len,
                );
                let (in_k, out_k) = km.split_at(len);
                let mut c = self.make_child(
                    sa, &ch, spi_in, spi_out, alg, in_k, out_k, tsi, tsr, false, now,
                );
                c.peer_takes_tfc =
                    find_notify(&inner, notify::ESP_TFC_PADDING_NOT_SUPPORTED).is_none();
                if let Some(r) = &rekey {
                    // RFC 7296 §2.8: the new SA replaces the one REKEY_SA names;
                    // the old one stays until the initiator deletes it, and we
                    // do not rekey it ourselves (its SPI is our outbound one).
                    if let Some(o) = sa
                        .children
                        .iter()
                        .find(|c| r.spi.len() == 4 && c.spi_out.to_be_bytes()[..] == r.spi[..])
                    {
                        sa.rekey_hold.insert(o.spi_in, now + UNTIL_REPLACED);
                    }
                    self.log(format!(
                        "{}: CHILD_SA {} rekeyed by the peer (old SPI {})",
                        sa.label(),
                        ch.name,
                        hex(&r.spi)
                    ));
                }
                if collides {
                    if let Some(Pending {
                        kind: ReqKind::CreateChild(pc),
                        ..
                    }) = sa.pending.as_mut()
                    {
                        pc.collision = Some((c.spi_in, ni.clone(), nr.clone()));
                    }
                }
                self.responder_install(sa, c, exchange::CREATE_CHILD_SA, hdr.msg_id, resp);
            }
            Err((n, why)) => {
                self.log(format!(
                    "{}: CREATE_CHILD_SA refused: {why} ({})",
                    sa.label(),
                    notify::name(n)
                ));
                let data = if n == notify::INVALID_KE_PAYLOAD {
                    conn.children
                        .iter()
                        .find_map(|c| c.esp.iter().find_map(|a| a.dh.first()))
                        .map_or(vec![], |g| g.id().to_be_bytes().to_vec())
                } else {
                    vec![]
                };
                self.respond(
                    sa,
                    exchange::CREATE_CHILD_SA,
                    hdr.msg_id,
                    vec![Payload::notify(n, data)],
                );
            }
        }
    }

    fn responder_informational(
        &mut self,
        sa: &mut IkeSa,
        now: Instant,
        hdr: &Header,
        inner: Vec<Payload>,
    ) {
        let mut resp = Vec::new();
        let mut delete_ike = false;
        let mut ours_deleted = Vec::new();
        for p in &inner {
            if let Payload::Delete { proto, spis, .. } = p {
                match *proto {
                    wire::proto::IKE => delete_ike = true,
                    wire::proto::ESP => {
                        for s in spis {
                            if s.len() != 4 {
                                continue;
                            }
                            let spi = u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
                            // RFC 7296 §1.4.1: they name their inbound SPI (our outbound).
                            if let Some(i) = sa.children.iter().position(|c| c.spi_out == spi) {
                                let c = sa.children.remove(i);
                                ours_deleted.push(c.spi_in.to_be_bytes().to_vec());
                                self.log(child_line(sa, &c, "deleted by the peer"));
                                // Closed, not replaced (a rekey leaves its
                                // successor of the same child behind).
                                let replaced = sa.children.iter().any(|o| o.name == c.name);
                                if !replaced && self.close_action(&c.name) == CloseAction::Start {
                                    self.reopen.push(c.name.clone());
                                }
                                self.remove_child(c, "deleted by the peer");
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if delete_ike {
            self.respond(sa, exchange::INFORMATIONAL, hdr.msg_id, vec![]);
            if let Some(x) = sa.crossing.take() {
                // §2.8.2: the peer deletes the old SA once its crossing
                // rekey survived (our answer may still be on its way, or
                // lost): its new SA takes the children.
                if let Some(mut theirs) = self.sas.remove(&x.spi) {
                    self.adopt(&mut theirs, sa, now);
                    self.sas.insert(x.spi, theirs);
                }
            }
            let label = sa.label();
            if sa.superseded.is_some() {
                // RFC 7296 §2.18: the rekey's initiator deletes the old SA.
                self.log(format!(
                    "{label}: old IKE_SA deleted by the peer after the rekey"
                ));
            } else {
                self.log(format!("{label}: IKE_SA deleted by the peer"));
                self.count("ike-deleted-by-peer");
                for c in &sa.children {
                    if self.close_action(&c.name) == CloseAction::Start
                        && !self.reopen.contains(&c.name)
                    {
                        self.reopen.push(c.name.clone());
                    }
                }
            }
            let taken = std::mem::replace(sa, *dead_placeholder(sa));
            self.kill(Box::new(taken), "IKE_SA deleted by the peer");
            sa.dead = true;
            return;
        }
        if !ours_deleted.is_empty() {
            resp.push(Payload::Delete {
                proto: wire::proto::ESP,
                spi_size: 4,
                spis: ours_deleted,
            });
        }
        self.respond(sa, exchange::INFORMATIONAL, hdr.msg_id, resp);
    }
}

/// The SA, KE (group, data) and Nonce of an IKE_SA_INIT message.
type InitPayloads<'a> = (&'a Vec<Proposal>, u16, &'a Vec<u8>, &'a Vec<u8>);

fn init_payloads(ps: &[Payload]) -> Option<InitPayloads<'_>> {
    let (mut sa, mut ke, mut nonce) = (None, None, None);
    for p in ps {
        match p {
            Payload::Sa(x) => sa = Some(x),
            Payload::Ke { group, data } => ke = Some((*group, data)),
            Payload::Nonce(n) => nonce = Some(n),
            _ => {}
        }
    }
    let (g, d) = ke?;
    Some((sa?, g, d, nonce?))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn child_line(sa: &IkeSa, c: &ChildSa, what: &str) -> String {
    format!(
        "{}: CHILD_SA {} {what}: {} SPIs in {:08x} out {:08x} {} reqid {} {} === {}{}",
        sa.label(),
        c.name,
        if c.mode == Mode::Tunnel {
            "tunnel"
        } else {
            "transport"
        },
        c.spi_in,
        c.spi_out,
        c.alg.describe(),
        c.reqid,
        c.ts_local
            .iter()
            .map(ts::describe)
            .collect::<Vec<_>>()
            .join(","),
        c.ts_remote
            .iter()
            .map(ts::describe)
            .collect::<Vec<_>>()
            .join(","),
        if c.encap { " (UDP-encapsulated)" } else { "" }
    )
}

/// An emptied IKE SA left in place of one handed to `kill`.
fn dead_placeholder(sa: &IkeSa) -> Box<IkeSa> {
    let mut d = IkeSa::new(
        sa.conn.clone(),
        sa.initiator,
        sa.spi_i,
        sa.spi_r,
        sa.local,
        sa.remote,
        sa.state,
        sa.created,
    );
    d.nat = sa.nat;
    d.last_heard = sa.last_heard;
    d.dead = true;
    d
}

/// One protected message, or its RFC 7383 fragments when the peer takes
/// them and the whole would make an IP datagram above `fragment_size`.
fn seal(sa: &mut IkeSa, hdr: Header, payloads: &[Payload], fragment_size: usize) -> Vec<Vec<u8>> {
    let mut inner = Zeroizing::new(Vec::new());
    let first = wire::emit_chain(payloads, &mut inner);
    let sk = &mut sa.keys.as_mut().expect("keys").sk;
    // IPv6 + UDP + the non-ESP marker; then the IKE header, SK(F) header, IV,
    // padding and pad length, ICV: at most 28 + 8 + 16 + 17 + 32 (RFC 7383
    // §2.5.1). Decided from the plaintext's size, so nothing is sealed twice.
    let overhead = 40 + 8 + 4 + 101;
    if !sa.peer_frag || inner.len() + overhead <= fragment_size {
        return vec![sk.seal(hdr, first, &inner)];
    }
    let chunk = fragment_size.saturating_sub(overhead).max(128);
    let parts: Vec<&[u8]> = inner.chunks(chunk).collect();
    let total = parts.len().min(u16::MAX as usize) as u16;
    parts
        .iter()
        .enumerate()
        .map(|(i, c)| sk.seal_frag(hdr, first, c, Some((i as u16 + 1, total))))
        .collect()
}

/// RFC 7296 §2.23: our NAT_DETECTION_SOURCE_IP and _DESTINATION_IP. With
/// `encap = yes` the source hash is random, so the peer sees a NAT and both
/// sides encapsulate (strongSwan does the same).
fn nat_notifies(
    spi_i: u64,
    spi_r: u64,
    local: SocketAddr,
    remote: SocketAddr,
    force: bool,
) -> Vec<Payload> {
    let src = if force {
        let mut r = vec![0u8; 20];
        crypto::random(&mut r);
        r
    } else {
        crypto::nat_hash(spi_i, spi_r, local)
    };
    vec![
        Payload::notify(notify::NAT_DETECTION_SOURCE_IP, src),
        Payload::notify(
            notify::NAT_DETECTION_DESTINATION_IP,
            crypto::nat_hash(spi_i, spi_r, remote),
        ),
    ]
}

/// (we are behind a NAT, the peer is behind a NAT); None if the peer sent no NAT_DETECTION notifies.
fn nat_detect(
    ps: &[Payload],
    spi_i: u64,
    spi_r: u64,
    local: SocketAddr,
    remote: SocketAddr,
) -> Option<(bool, bool)> {
    let mut src = Vec::new();
    let mut dst = None;
    for p in ps {
        if let Payload::Notify(n) = p {
            match n.ty {
                notify::NAT_DETECTION_SOURCE_IP => src.push(&n.data),
                notify::NAT_DETECTION_DESTINATION_IP => dst = Some(&n.data),
                _ => {}
            }
        }
    }
    let dst = dst?;
    if src.is_empty() {
        return None;
    }
    let me = *dst != crypto::nat_hash(spi_i, spi_r, local);
    let want = crypto::nat_hash(spi_i, spi_r, remote);
    let peer = !src.iter().any(|s| **s == want);
    Some((me, peer))
}

/// The child's proposals as offered: DH only with PFS (not in IKE_AUTH).
fn child_algsets(ch: &Child, with_dh: bool) -> Vec<proposal::AlgSet> {
    ch.esp
        .iter()
        .map(|a| {
            let mut a = a.clone();
            if !with_dh {
                a.dh.clear();
            }
            a
        })
        .collect()
}

/// The connection's IKE proposals, numbered from 1, with `spi` (empty in
/// IKE_SA_INIT, our new SPI in an IKE SA rekey, RFC 7296 §2.18).
fn ike_proposals(conn: &Conn, spi: Vec<u8>) -> Vec<Proposal> {
    conn.proposals
        .iter()
        .enumerate()
        .map(|(i, a)| a.proposal(i as u8 + 1, wire::proto::IKE, spi.clone(), true))
        .collect()
}

fn child_proposals(ch: &Child, spi_in: u32, with_dh: bool) -> Vec<Proposal> {
    child_algsets(ch, with_dh)
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.proposal(
                i as u8 + 1,
                wire::proto::ESP,
                spi_in.to_be_bytes().to_vec(),
                with_dh,
            )
        })
        .collect()
}

/// `dynamic` selectors made concrete: the virtual addresses of that side
/// if it has any, else its IKE address.
fn resolve_ts(v: &[ts::TsConf], addr: IpAddr, vips: &[IpAddr]) -> Vec<Ts> {
    let mut out = Vec::new();
    for t in v {
        match t {
            ts::TsConf::Dynamic { .. } if !vips.is_empty() => {
                out.extend(vips.iter().map(|a| t.resolve(*a)))
            }
            _ => out.push(t.resolve(addr)),
        }
    }
    out
}

/// What an initiator that asks for virtual addresses proposes for its own
/// `dynamic` side before it has them: each family's whole range, which the
/// responder narrows to the addresses it assigns (RFC 7296 §2.9, §2.19).
fn any_of(vips: &[IpAddr], t: &ts::TsConf) -> Vec<Ts> {
    let ts::TsConf::Dynamic { proto, ports } = *t else {
        return Vec::new();
    };
    let mut out: Vec<Ts> = Vec::new();
    for v4 in [true, false] {
        if vips.iter().any(|a| a.is_ipv4() == v4) {
            let (start, end): (IpAddr, IpAddr) = if v4 {
                ([0u8; 4].into(), [255u8; 4].into())
            } else {
                ([0u8; 16].into(), [255u8; 16].into())
            };
            out.push(Ts {
                proto,
                start_port: ports.0,
                end_port: ports.1,
                start,
                end,
            });
        }
    }
    out
}

/// TSi/TSr for a child; a trap's packet selectors first (RFC 7296 §2.9).
/// `ask_vips`: our virtual addresses are being asked for in this exchange.
fn child_ts(
    ch: &Child,
    sa: &IkeSa,
    ask_vips: &[IpAddr],
    packet: Option<(Ts, Ts)>,
) -> (Vec<Ts>, Vec<Ts>) {
    let mut i: Vec<Ts> = if ask_vips.is_empty() {
        resolve_ts(&ch.local_ts, sa.local.ip(), &sa.vips_local)
    } else {
        ch.local_ts
            .iter()
            .flat_map(|t| match t {
                ts::TsConf::Dynamic { .. } => any_of(ask_vips, t),
                _ => vec![t.resolve(sa.local.ip())],
            })
            .collect()
    };
    let mut r: Vec<Ts> = resolve_ts(&ch.remote_ts, sa.remote.ip(), &sa.vips_remote);
    if let Some((pi, pr)) = packet {
        i.insert(0, pi);
        r.insert(0, pr);
    }
    (i, r)
}
