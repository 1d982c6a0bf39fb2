//! `espctl`: the control client of espd. It speaks to a running `espd run`
//! over its control socket (docs/control.md) with the words of `ip xfrm`,
//! and checks configuration files offline.

use clap::{Parser, Subcommand};
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "espctl",
    version,
    about = "Control a running espd (ip xfrm words) or check a configuration"
)]
struct Cli {
    /// The control socket of the espd to talk to.
    #[arg(short = 's', long, global = true, default_value = espd_proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Apply every line of FILE (state/policy add|update|delete|flush, policy
    /// setdefault) as one batch: all of them or, on any error, none.
    #[arg(short = 'b', long, value_name = "FILE")]
    batch: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// SAs: add|update|delete|flush change them (as `ip xfrm state`), list
    /// prints them without keys (`--keys` to include them), get prints one.
    State {
        verb: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Policies: add|update|delete|flush|setdefault change them, list prints them.
    Policy {
        verb: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Counters: per worker, per drop reason, per SA, XDP.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Print events as they happen, one JSON object per line: SA added and
    /// removed, soft and hard expiry, unknown SPIs (at most one a second),
    /// acquires (a PROTECT policy matched with no SA; once a second a policy).
    Monitor {
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Check a configuration file (ip xfrm syntax): every error as FILE:LINE: why.
    Check { file: PathBuf },
    /// espd-ike, the IKEv2 daemon (docs/ike.md): `sas [--json]`, `initiate
    /// CHILD`, `terminate NAME` (an IKE_SA's connection or a CHILD_SA),
    /// `reload` (the changed configuration file), `stats`.
    Ike {
        /// espd-ike's control socket.
        #[arg(long = "ike-socket", default_value = espd_proto::IKE_SOCKET)]
        ike_socket: PathBuf,
        verb: String,
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn quote(w: &str) -> String {
    if w.is_empty() || w.contains(char::is_whitespace) || w.contains('(') || w.contains('\'') {
        format!("\"{w}\"")
    } else {
        w.to_string()
    }
}

fn call(socket: &std::path::Path, req: &Value) -> Result<Value, String> {
    answer(espd_proto::call(socket, req)?)
}

/// Applies a batch (it may hold keys): sent as a request line built at
/// its final size and wiped once sent (no `Value` copy of the text).
fn apply(socket: &std::path::Path, name: &str, text: &str) -> Result<Value, String> {
    let line = espd_proto::apply_line(name, text);
    answer(espd_proto::call_line(socket, &line, "espd run --control")?)
}

fn answer(r: Value) -> Result<Value, String> {
    if r.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok(r)
    } else {
        Err(r
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("espd answered with an error")
            .to_string())
    }
}

fn changes(r: &Value) -> String {
    let c = &r["changes"];
    let mut parts = Vec::new();
    for (k, what) in [
        ("states_added", "state(s) added"),
        ("states_updated", "state(s) updated"),
        ("states_deleted", "state(s) deleted"),
        ("policies_added", "polic(ies) added"),
        ("policies_updated", "polic(ies) updated"),
        ("policies_deleted", "polic(ies) deleted"),
    ] {
        if let Some(n) = c.get(k).and_then(Value::as_u64).filter(|n| *n > 0) {
            parts.push(format!("{n} {what}"));
        }
    }
    if parts.is_empty() {
        "ok: no change".into()
    } else {
        format!("ok: {}", parts.join(", "))
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let s = &cli.socket;
    if let Some(f) = &cli.batch {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?,
        );
        let r = apply(s, &f.display().to_string(), &text)?;
        println!("{}", changes(&r));
        return Ok(());
    }
    let Some(cmd) = cli.cmd else {
        return Err("nothing to do: give a command or -b FILE (see --help)".into());
    };
    match cmd {
        Cmd::Ike {
            ike_socket,
            verb,
            name,
            json,
        } => {
            let req = match (verb.as_str(), &name) {
                ("sas" | "reload" | "stats", None) => serde_json::json!({"op": verb}),
                ("initiate" | "terminate", Some(n)) => serde_json::json!({"op": verb, "name": n}),
                ("initiate" | "terminate", None) => {
                    return Err(format!("espctl ike {verb} needs a name"))
                }
                _ => {
                    return Err(format!(
                        "espctl ike {verb}: expected sas [--json], initiate CHILD, terminate NAME, reload or stats"
                    ))
                }
            };
            let r = espd_proto::call_to(&ike_socket, &req, "espd-ike --socket")?;
            if r.get("ok").and_then(Value::as_bool) != Some(true) {
                return Err(r
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("espd-ike answered with an error")
                    .to_string());
            }
            if verb == "stats" || json {
                let v = if verb == "sas" {
                    &r["sas"]
                } else {
                    &r["stats"]
                };
                println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
            } else {
                print!("{}", r["text"].as_str().unwrap_or(""));
            }
            Ok(())
        }
        Cmd::Check { file } => match espd_config::Config::load(&file) {
            Ok(c) => {
                println!("{}: ok: {}", file.display(), espd_config::summary(&c));
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
        Cmd::Stats { json } => {
            let r = call(s, &espd_proto::stats())?;
            let st = &r["stats"];
            if json {
                println!("{}", serde_json::to_string_pretty(st).unwrap_or_default());
                return Ok(());
            }
            println!(
                "rx {} tx {} encapsulated {} decapsulated {}",
                st["rx"], st["tx"], st["encapsulated"], st["decapsulated"]
            );
            if let Some(d) = st["drops"].as_object() {
                let nz: Vec<String> = d
                    .iter()
                    .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                if !nz.is_empty() {
                    println!("drops: {}", nz.join(", "));
                }
            }
            for w in st["workers"].as_array().into_iter().flatten() {
                println!(
                    "worker {} (core {}): rx {}/{} tx {}/{} (inside/outside), handed off {}",
                    w["worker"],
                    w["core"],
                    w["rx_inside"],
                    w["rx_outside"],
                    w["tx_inside"],
                    w["tx_outside"],
                    w["handed_off"]
                );
            }
            for sa in st["sas"].as_array().into_iter().flatten() {
                println!(
                    "sa spi {} {} -> {}: {} packets, {} bytes, oseq {}{}",
                    sa["spi"].as_str().unwrap_or("?"),
                    sa["src"].as_str().unwrap_or("?"),
                    sa["dst"].as_str().unwrap_or("?"),
                    sa["packets"],
                    sa["bytes"],
                    sa["oseq"],
                    sa["drops"]
                        .as_object()
                        .filter(|d| !d.is_empty())
                        .map(|d| format!(", drops {}", Value::Object(d.clone())))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        Cmd::State { verb, args } if verb == "list" || verb == "get" => {
            let keys = args.iter().any(|a| a == "--keys" || a == "keys");
            let r = call(s, &espd_proto::states(keys))?;
            let text = r["text"].as_str().unwrap_or("");
            let want: Vec<&String> = args
                .iter()
                .filter(|a| !a.starts_with("--") && *a != "keys")
                .collect();
            for line in text.lines() {
                // get: the lines that contain every `key value` pair given.
                let words: Vec<&str> = line.split_whitespace().collect();
                let ok = verb == "list"
                    || want.chunks(2).all(|kv| {
                        kv.len() == 2
                            && words.windows(2).any(|w| {
                                w[0] == kv[0]
                                    && (w[1] == kv[1] || (kv[0] == "spi" && spi_eq(w[1], kv[1])))
                            })
                    });
                if ok {
                    println!("{line}");
                }
            }
            Ok(())
        }
        Cmd::Monitor { count } => {
            use std::io::Write;
            let mut n = 0u64;
            espd_proto::subscribe(s, |ev| {
                println!("{ev}");
                let _ = std::io::stdout().flush();
                n += 1;
                count.is_none_or(|c| n < c)
            })
        }
        Cmd::Policy { verb, .. } if verb == "list" => {
            let r = call(s, &espd_proto::policies())?;
            let t = r["text"].as_str().unwrap_or("");
            if !t.is_empty() {
                println!("{t}");
            }
            Ok(())
        }
        Cmd::State { verb, args } => apply_words(s, "state", &verb, &args),
        Cmd::Policy { verb, args } => apply_words(s, "policy", &verb, &args),
    }
}

fn spi_eq(a: &str, b: &str) -> bool {
    let n = |x: &str| {
        x.strip_prefix("0x")
            .map_or_else(|| x.parse().ok(), |h| u32::from_str_radix(h, 16).ok())
    };
    n(a).is_some() && n(a) == n(b)
}

fn apply_words(s: &std::path::Path, obj: &str, verb: &str, args: &[String]) -> Result<(), String> {
    let mut line = zeroize::Zeroizing::new(format!("{obj} {verb}"));
    for a in args {
        line.push(' ');
        line.push_str(&quote(a));
    }
    let r = apply(s, "espctl", &line)?;
    println!("{}", changes(&r));
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("espctl: {e}");
            ExitCode::FAILURE
        }
    }
}
