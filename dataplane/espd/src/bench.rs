//! `espd bench`: ESP encapsulation and decapsulation through the same engine
//! the gateway uses, in memory, one pinned worker per core (each with its own
//! pair of engines and SAs: one owner per SA, nothing shared). Each worker
//! alternates, in 20 ms slices, the pipeline with the raw seal+open of the
//! same transform on the same sizes, so the two figures come from one run on
//! one machine under the same conditions.

use anyhow::{bail, Context, Result};
use espd_config::Config;
use espd_core::engine::{Engine, Verdict};
use espd_core::PacketBuf;
use hdrhistogram::Histogram;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Worker threads, each pinned to its own core (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Inner IP packet size in octets, or `imix` (64:576:1500 in 7:4:1).
    #[arg(long, default_value = "1420")]
    pub size: String,
    /// Seconds for the pipeline phase; the raw-cipher phase takes as long
    /// again, interleaved with it.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// gcm128, gcm256, chacha, cbc128, cbc256, gmac128, null.
    #[arg(long, default_value = "gcm128")]
    pub aead: String,
    /// Packets per engine burst (1: one at a time, no batching); the
    /// gateway's workers use 64.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub burst: u16,
    /// Other tunnels (an SA and a policy each) in the sending engine's
    /// tables, as on a carrier-edge gateway.
    #[arg(long, default_value_t = 0)]
    pub tunnels: u32,
    /// Changes a second to those other tunnels (an SA deleted and added
    /// again with a new key), each published to the worker as the control
    /// side publishes them: what the hot path costs while the control plane
    /// works (docs/performance.md). Needs --tunnels.
    #[arg(long, default_value_t = 0)]
    pub changes_per_second: u32,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
}

/// The other tunnels' SA and policy lines (198.19.0.0/16 inside, peers in 198.18.200.0/21).
fn other_tunnel(i: u32, gen: u32) -> String {
    let peer = format!("198.18.{}.{}", 200 + (i >> 8) % 50, (i & 255).max(1));
    let key = format!("0x{:08x}{}", gen, "77".repeat(16));
    format!(
        "state add src 198.18.0.1 dst {peer} proto esp spi {:#x} reqid {} mode tunnel aead 'rfc4106(gcm(aes))' {key} 128\n\
         policy add src 198.19.{}.0/30 dst 198.19.{}.{}/30 dir out tmpl src 198.18.0.1 dst {peer} proto esp reqid {} mode tunnel\n",
        0x2000_0000 + i,
        i + 100,
        128 + ((i >> 14) & 127),
        (i >> 6) & 255,
        (i & 63) << 2,
        i + 100
    )
}

fn alg_clause(name: &str) -> Result<String> {
    let k = |n: usize| format!("0x{}", "5a".repeat(n));
    Ok(match name {
        "gcm128" => format!("aead 'rfc4106(gcm(aes))' {} 128", k(20)),
        "gcm256" => format!("aead 'rfc4106(gcm(aes))' {} 128", k(36)),
        "chacha" => format!("aead 'rfc7539esp(chacha20,poly1305)' {} 128", k(36)),
        "gmac128" => format!("aead 'rfc4543(gcm(aes))' {} 128", k(20)),
        "cbc128" => format!(
            "enc 'cbc(aes)' {} auth-trunc 'hmac(sha256)' {} 128",
            k(16),
            k(32)
        ),
        "cbc256" => format!(
            "enc 'cbc(aes)' {} auth-trunc 'hmac(sha256)' {} 128",
            k(32),
            k(32)
        ),
        "null" => format!(
            "enc 'ecb(cipher_null)' '' auth-trunc 'hmac(sha256)' {} 128",
            k(32)
        ),
        o => {
            bail!("unknown --aead {o}: use gcm128, gcm256, chacha, gmac128, cbc128, cbc256 or null")
        }
    })
}

fn sizes(s: &str) -> Result<Vec<usize>> {
    if s == "imix" {
        let mut v = vec![64; 7];
        v.extend([576; 4]);
        v.push(1500);
        return Ok(v);
    }
    let n: usize = s
        .parse()
        .with_context(|| format!("--size {s}: a number of octets or `imix`"))?;
    if !(28..=9000).contains(&n) {
        bail!("--size must be 28..=9000 octets");
    }
    Ok(vec![n])
}

/// An IPv4/UDP packet of `n` octets from site A to site B.
fn packet(n: usize, i: usize) -> Vec<u8> {
    let mut p = vec![0u8; n];
    p[..20].copy_from_slice(&[
        0x45,
        0,
        (n >> 8) as u8,
        n as u8,
        0,
        1,
        0x40,
        0,
        64,
        17,
        0,
        0,
        198,
        18,
        1,
        10,
        198,
        18,
        2,
        20,
    ]);
    p[20..22].copy_from_slice(&(1000 + i as u16).to_be_bytes());
    p[22..24].copy_from_slice(&9u16.to_be_bytes());
    p[24..26].copy_from_slice(&((n - 20) as u16).to_be_bytes());
    espd_core::wire::ipv4::Packet::new_unchecked(&mut p[..]).fill_checksum();
    p
}

/// How long each phase runs before the other takes a turn.
const SLICE: Duration = Duration::from_millis(20);

struct Result1 {
    packets: u64,
    bytes: u64,
    failed: u64,
    elapsed: f64,
    raw_ops: u64,
    raw_bytes: u64,
    raw_elapsed: f64,
    hist: Histogram<u64>,
    /// Time of each burst with the table switch before it (ns): a stall shows here.
    bursts: Histogram<u64>,
    /// Time of each table switch alone (ns).
    switch: Histogram<u64>,
    switches: u64,
    changes: u64,
}

/// The other tunnels and the changes made to them while a worker runs.
#[derive(Clone, Copy)]
struct Load {
    tunnels: u32,
    per_second: u32,
    /// Where the changer runs (a core no worker has, when there is one).
    core: Option<core_affinity::CoreId>,
}

fn worker(
    alg: &str,
    sizes: &[usize],
    secs: f64,
    burst: usize,
    live: &AtomicU64,
    load: Load,
) -> Result<Result1> {
    let Load {
        tunnels,
        per_second: cps,
        core: ctl_core,
    } = load;
    let clause = alg_clause(alg)?;
    let sa = format!("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 reqid 1 mode tunnel replay-window 4096 flag esn {clause}\n");
    let g1 = Config::parse("bench-gw1", &format!("{sa}policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel\n"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let g2 = Config::parse("bench-gw2", &format!("{sa}policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir fwd tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel\n"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let transform = g1
        .sad
        .get(0)
        .cfg
        .transform()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // The sending side's tables with the other tunnels, shared with a
    // changer thread as the gateway's control side shares them.
    let mut t1 = espd_core::state::Tables::new(g1.sad, g1.spd, &[]);
    let others: String = (0..tunnels).map(|i| other_tunnel(i, 0)).collect();
    if tunnels > 0 {
        let c = Config::parse("bench-others", &others).map_err(|e| anyhow::anyhow!("{e}"))?;
        for sa in c.sad.iter() {
            let core =
                espd_core::state::NewSa::new(sa.cfg.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
            t1.insert_sa(core)
                .map_err(|_| anyhow::anyhow!("duplicate SA"))?;
        }
        for p in c.spd.policies(espd_core::state::Direction::Out) {
            t1.insert_policy(p.clone())
                .map_err(|_| anyhow::anyhow!("duplicate policy"))?;
        }
    }
    let shared = Arc::new(arc_swap::ArcSwap::from_pointee(t1.clone()));
    let mut gw1 = Engine::with_tables(shared.load_full());
    let mut gw2 = Engine::new(g2.sad, g2.spd, &[]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (retire_tx, retire_rx) = std::sync::mpsc::sync_channel::<(
        Arc<espd_core::state::Tables>,
        Vec<espd_core::state::Sa>,
    )>(1024);
    let changer = (cps > 0 && tunnels > 0).then(|| {
        let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
        std::thread::spawn(move || {
            // The control side on a core of its own when there is one (as an
            // operator keeps `--cores` for the workers): what is measured is
            // the worker's cost of taking changes, not a shared core.
            if let Some(c) = ctl_core {
                core_affinity::set_for_current(c);
            }
            let mut t = t1;
            let mut n = 0u64;
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                // One change at a time, paced: an SA of another tunnel goes
                // and comes back with a new key (a rekey's two halves).
                let i = (n / 2) as u32 % tunnels;
                let text = other_tunnel(i, (n / 2) as u32 + 1);
                let line = text.lines().next().unwrap_or_default();
                if n.is_multiple_of(2) {
                    let spi = 0x2000_0000 + i;
                    let dst = line
                        .split(" dst ")
                        .nth(1)
                        .and_then(|r| r.split(' ').next())
                        .unwrap_or_default();
                    if let Ok(d) = dst.parse() {
                        let _ = t.remove_sa(d, spi);
                    }
                } else if let Ok(Some(espd_config::Item::State(cfg))) =
                    espd_config::parse_line(line)
                {
                    if let Ok(core) = espd_core::state::NewSa::new(*cfg) {
                        let _ = t.insert_sa(core);
                    }
                }
                shared.store(Arc::new(t.clone()));
                n += 1;
                while let Ok(r) = retire_rx.try_recv() {
                    drop(r);
                }
                let due = start + Duration::from_secs_f64(n as f64 / f64::from(cps));
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            n
        })
    });
    let pkts: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| packet(n, i))
        .collect();
    let mut buf = vec![0u8; 256 + 9000 + 256];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)?;
    let mut bursts = Histogram::<u64>::new_with_bounds(1, 100_000_000, 3)?;
    let mut switches = 0u64;
    let mut switch = Histogram::<u64>::new_with_bounds(1, 100_000_000, 3)?;
    let (mut packets, mut bytes, mut failed) = (0u64, 0u64, 0u64);

    // The same transform alone: seal then open each size.
    let mut region: Vec<Vec<u8>> = pkts
        .iter()
        .map(|p| {
            let pad = espd_core::wire::esp::pad_len(p.len(), transform.align());
            let mut r = vec![0u8; 8 + transform.iv_len() + p.len() + pad + 2];
            r[..4].copy_from_slice(&0x1000u32.to_be_bytes());
            r
        })
        .collect();
    let mut icv = [0u8; 16];
    let icv_len = transform.icv_len();
    let (mut raw_ops, mut raw_bytes, mut seq) = (0u64, 0u64, 0u64);

    // The two phases alternate in slices of SLICE, so that both see the
    // same machine (turbo, other tenants of a VM): the ratio compares like
    // with like. Each phase gets `secs` in total.
    let (mut elapsed, mut raw_elapsed) = (Duration::ZERO, Duration::ZERO);
    let total = Duration::from_secs_f64(secs);
    let mut next = pkts.iter().cycle();
    while elapsed < total {
        let start = Instant::now();
        loop {
            // New tables between bursts, as a gateway worker takes them
            // (the old ones freed on the changer's thread).
            let tb = Instant::now();
            let cur = shared.load();
            if !Arc::ptr_eq(&cur, gw1.tables()) {
                let old = gw1.set_tables(arc_swap::Guard::into_inner(cur));
                let _ = retire_tx.try_send((old, gw1.take_retired()));
                switches += 1;
                let _ = switch.record(tb.elapsed().as_nanos() as u64);
            }
            // Bursts as the gateway's workers take them from their rings.
            let (mut b1, mut b2) = (gw1.burst(burst), gw2.burst(burst));
            for p in next.by_ref().take(burst) {
                // Every 61st packet: a prime, so all positions in a burst get sampled.
                let t = packets.is_multiple_of(61).then(Instant::now);
                buf[256..256 + p.len()].copy_from_slice(p);
                let mut b = PacketBuf::new(&mut buf, 256, p.len());
                let ok = matches!(b1.process(&mut b), Verdict::Encapsulated(_))
                    && matches!(b2.process(&mut b), Verdict::Decapsulated(_));
                if let Some(t) = t {
                    let _ = hist.record(t.elapsed().as_nanos() as u64);
                }
                if !ok {
                    failed += 1;
                }
                packets += 1;
                bytes += p.len() as u64;
            }
            drop((b1, b2));
            let _ = bursts.record(tb.elapsed().as_nanos() as u64);
            if packets % 1024 < burst as u64 && start.elapsed() >= SLICE {
                break;
            }
        }
        elapsed += start.elapsed();
        live.store(packets, Ordering::Relaxed);

        let start = Instant::now();
        loop {
            for (r, p) in region.iter_mut().zip(&pkts) {
                seq += 1;
                let iv_end = 8 + transform.iv_len();
                transform.make_iv(seq, 0, &mut r[8..iv_end]);
                r[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
                transform.seal(r, Some((seq >> 32) as u32), &mut icv[..icv_len]);
                if transform
                    .open(r, Some((seq >> 32) as u32), &icv[..icv_len])
                    .is_err()
                {
                    bail!("raw open failed");
                }
                raw_ops += 1;
                raw_bytes += p.len() as u64;
            }
            if raw_ops & 1023 < pkts.len() as u64 && start.elapsed() >= SLICE {
                break;
            }
        }
        raw_elapsed += start.elapsed();
    }
    stop.store(true, Ordering::Relaxed);
    let changes = changer.map_or(0, |h| h.join().unwrap_or(0));
    Ok(Result1 {
        bursts,
        switch,
        switches,
        changes,
        packets,
        bytes,
        failed,
        elapsed: elapsed.as_secs_f64(),
        raw_ops,
        raw_bytes,
        raw_elapsed: raw_elapsed.as_secs_f64(),
        hist,
    })
}

pub fn run(a: &Args) -> Result<()> {
    let sizes = sizes(&a.size)?;
    alg_clause(&a.aead)?;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let n = a.workers.unwrap_or(cores.len().max(1)).max(1);
    let lives: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut handles = Vec::new();
    for (i, live) in lives.iter().enumerate() {
        let (tunnels, cps) = (a.tunnels, a.changes_per_second);
        // A core no worker runs on, for the changer threads.
        let ctl_core = (n < cores.len()).then(|| cores[cores.len() - 1]);
        let (alg, sizes, secs, burst, live, core) = (
            a.aead.clone(),
            sizes.clone(),
            a.seconds,
            a.burst,
            Arc::clone(live),
            cores.get(i % cores.len().max(1)).copied(),
        );
        handles.push(std::thread::spawn(move || {
            // One worker per core, pinned: no migration, no sharing.
            if let Some(c) = core {
                core_affinity::set_for_current(c);
            }
            let load = Load {
                tunnels,
                per_second: cps,
                core: ctl_core,
            };
            worker(&alg, &sizes, secs, usize::from(burst), &live, load)
        }));
    }
    let start = Instant::now();
    if !a.json {
        while handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(250));
            let total: u64 = lives.iter().map(|l| l.load(Ordering::Relaxed)).sum();
            // Half of the time goes to the raw phase.
            let t = (start.elapsed().as_secs_f64() / 2.0).max(1e-9);
            eprint!(
                "\r{:>6.1} s  {:>12} packets  {:>8.3} Mpps",
                start.elapsed().as_secs_f64(),
                total,
                total as f64 / t / 1e6
            );
        }
        eprintln!();
    }
    let mut results = Vec::new();
    for h in handles {
        results.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("a worker panicked"))??,
        );
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)?;
    let mut bursts = Histogram::<u64>::new_with_bounds(1, 100_000_000, 3)?;
    let mut switch = Histogram::<u64>::new_with_bounds(1, 100_000_000, 3)?;
    for r in &results {
        hist.add(&r.hist)?;
        bursts.add(&r.bursts)?;
        switch.add(&r.switch)?;
    }
    let switches: u64 = results.iter().map(|r| r.switches).sum();
    let changes: u64 = results.iter().map(|r| r.changes).sum();
    let pps: f64 = results.iter().map(|r| r.packets as f64 / r.elapsed).sum();
    let bps: f64 = results
        .iter()
        .map(|r| r.bytes as f64 * 8.0 / r.elapsed)
        .sum();
    let raw_pps: f64 = results
        .iter()
        .map(|r| r.raw_ops as f64 / r.raw_elapsed)
        .sum();
    let raw_bps: f64 = results
        .iter()
        .map(|r| r.raw_bytes as f64 * 8.0 / r.raw_elapsed)
        .sum();
    let failed: u64 = results.iter().map(|r| r.failed).sum();
    let per_worker: Vec<_> = results
        .iter()
        .map(|r| json!({"pps": r.packets as f64 / r.elapsed, "raw_pps": r.raw_ops as f64 / r.raw_elapsed}))
        .collect();
    let out = json!({
        "workers": n,
        "size": a.size,
        "aead": a.aead,
        "seconds": a.seconds,
        "burst": a.burst,
        "packets": results.iter().map(|r| r.packets).sum::<u64>(),
        "failed": failed,
        "pps": pps,
        "gbps": bps / 1e9,
        "latency_ns": {
            "p50": hist.value_at_quantile(0.5), "p90": hist.value_at_quantile(0.9),
            "p99": hist.value_at_quantile(0.99), "p999": hist.value_at_quantile(0.999), "max": hist.max(),
        },
        "raw_aead": {"pps": raw_pps, "gbps": raw_bps / 1e9},
        "tunnels": a.tunnels,
        "changes": changes,
        "table_switches": switches,
        "switch_ns": {
            "p50": switch.value_at_quantile(0.5), "p99": switch.value_at_quantile(0.99),
            "max": switch.max(),
        },
        "burst_ns": {
            "p50": bursts.value_at_quantile(0.5), "p99": bursts.value_at_quantile(0.99),
            "p999": bursts.value_at_quantile(0.999), "max": bursts.max(),
        },
        "ratio": pps / raw_pps,
        "per_worker": per_worker,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "espd bench: {} worker(s), {} B, {}, bursts of {}: {:.3} Mpps, {:.2} Gbit/s (encap+decap, inner bytes); \
             latency p50 {} ns p99 {} ns p99.9 {} ns; raw seal+open {:.3} Mpps, {:.2} Gbit/s; ratio {:.2}; \
             {} other tunnels, {} changes, bursts p99 {} ns max {} ns{}",
            n, a.size, a.aead, a.burst, pps / 1e6, bps / 1e9,
            hist.value_at_quantile(0.5), hist.value_at_quantile(0.99), hist.value_at_quantile(0.999),
            raw_pps / 1e6, raw_bps / 1e9, pps / raw_pps, a.tunnels, changes,
            bursts.value_at_quantile(0.99), bursts.max(),
            if failed > 0 { format!("; {failed} FAILED") } else { String::new() }
        );
    }
    if failed > 0 {
        bail!("{failed} packets did not make the round trip");
    }
    Ok(())
}
