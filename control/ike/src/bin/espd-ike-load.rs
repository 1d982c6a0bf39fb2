//! espd-ike-load: a load generator for IKE responders (espd-ike, charon).
//!
//! Brings up `--tunnels N` IKE_SAs, each with one CHILD_SA, against one
//! responder from one address (or `--sources N` consecutive ones), at most
//! `--window W` being set up at once,
//! then deletes them all; prints one JSON line with the timings. Each
//! tunnel has its own identity (`load-N`, so no INITIAL_CONTACT clears
//! another) and its own /32 selector (198.19.0.0/16, so each CHILD_SA has
//! its own policies at the responder). It is espd-ike's own IKE engine as
//! the initiator, with PSK — or with a certificate (`--cert`, `--key`,
//! `--ca`: every tunnel authenticates with the same certificate and its
//! identity, `--id`, as many clients of one organisation would, and checks
//! the responder's against the CA); nothing is installed anywhere.
//!
//! ```text
//! espd-ike-load --local 198.18.0.2 --peer 198.18.0.1 --tunnels 10000 --psk SECRET
//! espd-ike-load --local 198.18.0.2 --peer 198.18.0.1 --tunnels 10000 \
//!     --cert gen.pem --key gen.key --ca ca.pem --id gen.example.net --peer-id gw1.example.net
//! ```
//!
//! The responder's file needs a connection such as:
//!
//! ```text
//! connections { load { local_addrs = 198.18.0.1
//!   local { auth = psk  id = gw }  remote { auth = psk }
//!   children { load { local_ts = 198.18.1.0/24  remote_ts = 198.19.0.0/16 } } } }
//! secrets { ike-load { id = gw  secret = SECRET } }
//! ```

use clap::Parser;
use espd_ike::conf;
use espd_ike::ike::{Dir, Endpoint, Output};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Bring up and tear down many IKE_SAs against one responder")]
struct Args {
    #[arg(long)]
    local: IpAddr,
    /// Use this many consecutive local addresses from `--local` on (each
    /// must be on an interface), tunnel i from the (i mod N)-th: many
    /// clients come from many addresses, and a responder limits the
    /// half-open IKE_SAs of one address (espd-ike: 100), which would cap
    /// `--window`.
    #[arg(long, default_value_t = 1)]
    sources: u32,
    #[arg(long)]
    peer: IpAddr,
    #[arg(long, default_value_t = 1000)]
    tunnels: u32,
    /// The number of the first tunnel (its identity `load-N` and /32), so
    /// that two generators against one responder do not share identities.
    #[arg(long, default_value_t = 0)]
    first: u32,
    /// Set-ups in flight at once.
    #[arg(long, default_value_t = 64)]
    window: u32,
    /// The pre-shared key (PSK authentication).
    #[arg(long, required_unless_present = "cert")]
    psk: Option<String>,
    /// Certificate authentication: this generator's certificate (PEM) …
    #[arg(long, requires_all = ["key", "ca", "id"], conflicts_with = "psk")]
    cert: Option<std::path::PathBuf>,
    /// … its private key (PEM) …
    #[arg(long)]
    key: Option<std::path::PathBuf>,
    /// … the CA the responder's certificate must chain to …
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// … and the identity the certificate names (its subjectAltName).
    #[arg(long)]
    id: Option<String>,
    /// The responder's identity.
    #[arg(long, default_value = "gw")]
    peer_id: String,
    #[arg(long, default_value = "aes128gcm16-prfsha256-x25519")]
    proposals: String,
    #[arg(long, default_value = "aes128gcm16")]
    esp: String,
    /// Hold the tunnels this many seconds once all are up (`up N` on
    /// stderr), so the responder's memory can be read, then delete them.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

fn config(a: &Args) -> anyhow::Result<Arc<conf::Config>> {
    use std::fmt::Write;
    let abs = |p: &Option<std::path::PathBuf>| -> anyhow::Result<String> {
        let p = p
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("a path is missing"))?;
        Ok(std::fs::canonicalize(p)?.display().to_string())
    };
    let mut t = String::from("connections {\n");
    for i in 0..a.tunnels {
        let n = a.first + i;
        let (hi, lo) = (n / 256, n % 256);
        // One identity for every tunnel with a certificate: no INITIAL_CONTACT,
        // or each new IKE_SA would clear the others at the responder.
        let unique = if a.cert.is_some() {
            "unique = never\n "
        } else {
            ""
        };
        let (local, remote) = match &a.cert {
            None => (
                format!("auth = psk\n id = load-{n}"),
                format!("auth = psk\n id = {}", a.peer_id),
            ),
            Some(_) => (
                format!(
                    "auth = pubkey\n certs = {}\n id = {}",
                    abs(&a.cert)?,
                    a.id.as_deref().unwrap_or_default()
                ),
                format!(
                    "auth = pubkey\n id = {}\n cacerts = {}",
                    a.peer_id,
                    abs(&a.ca)?
                ),
            ),
        };
        writeln!(
            t,
            "t{i} {{ local_addrs = {}\n remote_addrs = {}\n proposals = {}\n rekey_time = 0\n {unique}\
             local {{ {local} }}\n remote {{ {remote} }}\n \
             children {{ c{i} {{ local_ts = 198.19.{hi}.{lo}/32\n remote_ts = 198.18.1.0/24\n \
             esp_proposals = {} }} }} }}",
            source(a, n), a.peer, a.proposals, a.esp
        )?;
    }
    match &a.psk {
        Some(psk) => writeln!(
            t,
            "}}\nsecrets {{ ike-load {{ id = {}\n secret = \"{psk}\" }} }}",
            a.peer_id
        )?,
        // The key goes in private/ beside the file (swanctl's layout).
        None => writeln!(t, "}}")?,
    }
    let dir = std::env::temp_dir().join(format!("espd-ike-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let p = dir.join("swanctl.conf");
    std::fs::write(&p, t)?;
    if let Some(key) = &a.key {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir.join("private"))?;
        let k = dir.join("private").join("load.key");
        std::fs::copy(key, &k)?;
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600))?;
    }
    let c = conf::load(&p).map_err(|e| anyhow::anyhow!(e.join("\n")))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Arc::new(c))
}

/// The local address of tunnel `n`: `--local` plus (n mod `--sources`).
fn source(a: &Args, n: u32) -> IpAddr {
    let k = n % a.sources.max(1);
    match a.local {
        IpAddr::V4(v) => IpAddr::V4((u32::from(v) + k).into()),
        IpAddr::V6(v) => IpAddr::V6((u128::from(v) + u128::from(k)).into()),
    }
}

/// Hands everything the endpoint wants sent to the socket of its local
/// address; counts CHILD_SAs up (their outbound half) and removed.
fn drain(ep: &mut Endpoint, socks: &[(SocketAddr, UdpSocket)], up: &mut u32, down: &mut u32) {
    while let Some(o) = ep.poll_output() {
        match o {
            Output::Send {
                local,
                remote,
                data,
            } => {
                // By address only: after a move to port 4500 (a NAT
                // detected, RFC 7296 §2.23) a message still leaves from the
                // address's one socket, as before there were several.
                if let Some((_, sock)) = socks.iter().find(|(a, _)| a.ip() == local.ip()) {
                    let _ = sock.send_to(&data, remote);
                }
            }
            Output::Install { dir: Dir::Out, .. } => *up += 1,
            Output::Remove { .. } => *down += 1,
            Output::Install { .. } | Output::Log(_) => {}
        }
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        u64::from(a.first) + u64::from(a.tunnels) <= 65536,
        "--first + --tunnels: at most 65536 (one /32 of 198.19.0.0/16 each)"
    );
    anyhow::ensure!(
        (1..=256).contains(&a.sources),
        "--sources: 1 to 256 addresses"
    );
    let cfg = config(&a)?;
    let mut ep = Endpoint::new(cfg);
    let mut socks = Vec::new();
    for k in 0..a.sources {
        let at = SocketAddr::new(source(&a, k), 500);
        let sock =
            UdpSocket::bind(at).map_err(|e| anyhow::anyhow!("{at}: {e} (is it configured?)"))?;
        // Room for the answers to a window of set-ups (each datagram
        // costs its buffer's true size, a few KiB).
        let _ = nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
        // One address: block in recv (5 ms at most, for the timers); several:
        // each is drained without blocking and the loop naps 100 µs when
        // none had anything.
        if a.sources == 1 {
            sock.set_read_timeout(Some(Duration::from_millis(5)))?;
        } else {
            sock.set_nonblocking(true)?;
        }
        socks.push((at, sock));
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let (mut up, mut down, mut started) = (0u32, 0u32, 0u32);
    let mut buf = vec![0u8; 65536];
    let t0 = Instant::now();
    let socks = &socks;
    let mut pump = |ep: &mut Endpoint, up: &mut u32, down: &mut u32| -> anyhow::Result<()> {
        // Whatever arrived, then the timers.
        let mut got = false;
        for (local, sock) in socks {
            loop {
                match sock.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        got = true;
                        ep.handle(Instant::now(), *local, from, &buf[..n]);
                        drain(ep, socks, up, down);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) =>
                    {
                        break
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if !got && socks.len() > 1 {
            std::thread::sleep(Duration::from_micros(100));
        }
        let now = Instant::now();
        if ep.poll_timeout().is_some_and(|t| t <= now) {
            ep.handle_timeout(now);
        }
        drain(ep, socks, up, down);
        Ok(())
    };
    while up < a.tunnels {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {up} of {} tunnels up in time",
            a.tunnels
        );
        while started < a.tunnels && started - up.min(started) < a.window {
            ep.initiate(&format!("c{started}"), None, Instant::now())
                .map_err(|e| anyhow::anyhow!(e))?;
            started += 1;
        }
        drain(&mut ep, socks, &mut up, &mut down);
        pump(&mut ep, &mut up, &mut down)?;
    }
    let setup = t0.elapsed();
    let stats = ep.stats().clone();
    if a.hold > 0.0 {
        eprintln!("up {up}");
        let until = Instant::now() + Duration::from_secs_f64(a.hold);
        // Keep answering (the responder's liveness checks, if any).
        while Instant::now() < until {
            pump(&mut ep, &mut up, &mut down)?;
        }
    }
    // Deletes at most `--window` at a time too (a burst of 10 000 would
    // overflow the responder's socket buffer and measure retransmissions).
    let t1 = Instant::now();
    let total = ep.sa_count();
    let mut asked = 0usize;
    while ep.sa_count() > 0 && Instant::now() < deadline {
        let done = total - ep.sa_count();
        while asked < a.tunnels as usize && asked - done.min(asked) < a.window as usize {
            ep.terminate(&format!("t{asked}"), Instant::now());
            asked += 1;
        }
        drain(&mut ep, socks, &mut up, &mut down);
        pump(&mut ep, &mut up, &mut down)?;
    }
    let teardown = t1.elapsed();
    println!(
        "{}",
        serde_json::json!({
            "tunnels": a.tunnels,
            "window": a.window,
            "sources": a.sources,
            "setup_secs": setup.as_secs_f64(),
            "setups_per_sec": f64::from(a.tunnels) / setup.as_secs_f64(),
            "teardown_secs": teardown.as_secs_f64(),
            "retransmits": stats.get("retransmits").copied().unwrap_or(0),
            "left": ep.sa_count(),
        })
    );
    Ok(())
}
