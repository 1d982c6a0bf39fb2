//! `espd run --metrics ADDR:PORT`: the counters as Prometheus text
//! (exposition format 0.0.4) over plain HTTP, for any GET. Off by default;
//! a bare port listens on loopback only. The same figures as `espctl stats`.

use super::control::Control;
use serde_json::Value;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `PORT` → 127.0.0.1:PORT; `ADDR:PORT` and `[V6]:PORT` as given.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("--metrics: expected PORT or ADDR:PORT, found `{s}`"))
}

pub fn serve(l: TcpListener, c: Arc<Control>, stop: Arc<AtomicBool>) {
    let _ = l.set_nonblocking(true);
    // A scrape builds every SA's stats: given back once scrapes pause.
    let mut idle = super::heap::Idle::default();
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                let _ = one(&c, s);
                idle.worked();
            }
            Err(_) => {
                idle.tick();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn one(c: &Control, mut s: TcpStream) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut req = [0u8; 2048];
    let n = s.read(&mut req)?;
    let body = if req[..n].starts_with(b"GET ") {
        render(&c.counters())
    } else {
        let msg = "HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n";
        return s.write_all(msg.as_bytes());
    };
    let head = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The stats as Prometheus families; the per-SA ones written as the rows
/// are read (no JSON value of 100 000 SAs' rows on each scrape).
pub fn render(st: &super::Stats) -> String {
    let mut o = String::new();
    let null = Value::Null;
    let g = |k: &str| st.head.get(k).unwrap_or(&null);
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut o,
        "espd_packets_total",
        "counter",
        "Frames received (rx) and sent (tx) per worker and interface side.",
    );
    for w in g("workers").as_array().into_iter().flatten() {
        for (dir, side, key) in [
            ("rx", "inside", "rx_inside"),
            ("rx", "outside", "rx_outside"),
            ("tx", "inside", "tx_inside"),
            ("tx", "outside", "tx_outside"),
        ] {
            let _ = writeln!(
                o,
                "espd_packets_total{{worker=\"{}\",direction=\"{dir}\",side=\"{side}\"}} {}",
                w["worker"],
                n(&w[key])
            );
        }
    }
    family(
        &mut o,
        "espd_esp_total",
        "counter",
        "Packets encapsulated and decapsulated.",
    );
    for k in ["encapsulated", "decapsulated"] {
        let _ = writeln!(o, "espd_esp_total{{operation=\"{k}\"}} {}", n(g(k)));
    }
    family(
        &mut o,
        "espd_drops_total",
        "counter",
        "Dropped packets by reason (docs/architecture.md).",
    );
    for (r, v) in g("drops").as_object().into_iter().flatten() {
        let _ = writeln!(o, "espd_drops_total{{reason=\"{}\"}} {}", esc(r), n(v));
    }
    for (name, key, help) in [
        (
            "espd_sa_packets_total",
            "packets",
            "Packets through each SA.",
        ),
        (
            "espd_sa_bytes_total",
            "bytes",
            "Inner octets through each SA.",
        ),
    ] {
        family(&mut o, name, "counter", help);
        for sa in st.sas.rows() {
            let _ = writeln!(
                o,
                "{name}{{spi=\"{}\",src=\"{}\",dst=\"{}\"}} {}",
                esc(&sa.spi),
                sa.src,
                sa.dst,
                if key == "packets" {
                    sa.packets
                } else {
                    sa.bytes
                }
            );
        }
    }
    family(
        &mut o,
        "espd_worker_busy_ratio",
        "gauge",
        "Share of a worker's loop turns that found work (its load).",
    );
    for w in g("workers").as_array().into_iter().flatten() {
        let turns = n(&w["turns"]).max(1) as f64;
        let _ = writeln!(
            o,
            "espd_worker_busy_ratio{{worker=\"{}\"}} {:.4}",
            w["worker"],
            n(&w["busy_turns"]) as f64 / turns
        );
    }
    family(
        &mut o,
        "espd_fill_ring_frames",
        "gauge",
        "Frames in each AF_XDP fill ring.",
    );
    for w in g("workers").as_array().into_iter().flatten() {
        for (side, key) in [("inside", "fill_inside"), ("outside", "fill_outside")] {
            let _ = writeln!(
                o,
                "espd_fill_ring_frames{{worker=\"{}\",side=\"{side}\"}} {}",
                w["worker"],
                n(&w[key])
            );
        }
    }
    family(
        &mut o,
        "espd_free_frames",
        "gauge",
        "Idle UMEM frames per worker.",
    );
    for w in g("workers").as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "espd_free_frames{{worker=\"{}\"}} {}",
            w["worker"],
            n(&w["free_frames"])
        );
    }
    family(
        &mut o,
        "espd_kernel_rx_dropped_total",
        "counter",
        "Frames the kernel dropped before AF_XDP (ring full, fill ring empty).",
    );
    for w in g("workers").as_array().into_iter().flatten() {
        for (side, key) in [
            ("inside", "kernel_rx_dropped_inside"),
            ("outside", "kernel_rx_dropped_outside"),
        ] {
            let _ = writeln!(
                o,
                "espd_kernel_rx_dropped_total{{worker=\"{}\",side=\"{side}\"}} {}",
                w["worker"],
                n(&w[key])
            );
        }
    }
    family(
        &mut o,
        "espd_xdp_actions_total",
        "counter",
        "What the XDP programs did with each frame.",
    );
    for (k, v) in g("xdp").as_object().into_iter().flatten() {
        let _ = writeln!(
            o,
            "espd_xdp_actions_total{{action=\"{}\"}} {}",
            esc(k),
            n(v)
        );
    }
    o
}
