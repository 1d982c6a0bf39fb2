//! The control protocol between `espctl` and `espd run` (docs/control.md).
//!
//! A Unix stream socket (default [`DEFAULT_SOCKET`], mode 0600, root only:
//! espd checks the peer's credentials). Version 1: one request per
//! connection, one JSON object on one line, answered by one JSON object on
//! one line. Version 2 ([`VERSION_2`]): the connection stays open, requests
//! carry an `"id"` their answer echoes and may be pipelined (answered in
//! order), and `"subscribe"` adds events to the connection. Limits: a
//! request must arrive whole within 5 s and be at most 16 MiB.
//!
//! Request:  `{"v": 1, "op": OP, ...}` with OP one of
//! - `"apply"`, `"text"`: lines of `ip xfrm` words (`state add|update|delete|flush`,
//!   `policy add|update|delete|flush|setdefault`), applied all or nothing;
//!   `"name"`: what errors call the batch (a file name for `espctl -b`).
//! - `"states"`, `"keys"`: bool — the states as `state add` lines; keys are
//!   replaced by `<redacted>` unless `keys` is true.
//! - `"policies"` — the policies as `policy add` lines.
//! - `"stats"` — the counters (the same object as `espd run --stats-json`).
//! - `"monitor"` — the connection stays open: after `{"ok": true}`, one JSON
//!   object per line per event: `{"event": "sa-added"|"sa-removed"|"soft-expire"|
//!   "hard-expire"|"unknown-spi"|"acquire", "dst", "spi", "why", …}`
//!   (docs/control.md lists each event's fields). `"subscribe"` is the same
//!   on a version 2 connection that goes on taking requests.
//!
//! Response: `{"v": 1, "ok": true, ...}` with `"changes"` (apply), `"text"`
//! (states, policies) or `"stats"`; or `{"v": 1, "ok": false, "error": "..."}`
//! where the error names the batch line (`NAME:LINE: what was expected`).
//! A request with another `v` is refused with an error naming ours.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use zeroize::Zeroizing;

pub const VERSION: u64 = 1;
/// Version 2: a kept connection with pipelined requests (each with an
/// `"id"` echoed in its answer) and `"subscribe"` for events on it.
pub const VERSION_2: u64 = 2;
pub const DEFAULT_SOCKET: &str = "/run/espd/espd.sock";
/// espd-ike's control socket (`espctl ike …`, docs/ike.md).
pub const IKE_SOCKET: &str = "/run/espd/ike.sock";

/// An `apply` request for `text` (a batch, which may hold keys), as the
/// line to send: see [`request_line`].
pub fn apply_line(name: &str, text: &str) -> Zeroizing<String> {
    request_line(
        &json!({"v": VERSION, "op": "apply", "name": name}),
        Some(text),
    )
}

// A batch's text may hold keys. Its two halves — written into a request
// line by the clients (espctl, espd-ike), read out of it by espd — are
// here together, each at its final size in one allocation, so that no
// growing buffer or intermediate `Value` leaves a copy of a key in freed
// memory; the test below checks one against the other and both against
// serde_json.

/// One request line: `req` (an object without keys) with `text` added as
/// its `"text"` member, escaped as JSON strings are (RFC 8259 §7), and a
/// newline — in one allocation of the exact size (serde_json would copy the
/// text into a `Value` and grow the line as it writes).
pub fn request_line(req: &Value, text: Option<&str>) -> Zeroizing<String> {
    let head = req.to_string();
    let Some(text) = text else {
        return Zeroizing::new(head + "\n");
    };
    let body = head.strip_suffix('}').unwrap_or(&head);
    let sep = if body.len() > 1 { "," } else { "" };
    let escaped: usize = text.chars().map(escaped_len).sum();
    let size = body.len() + sep.len() + r#""text":"#.len() + escaped + 2 + "}\n".len();
    let mut line = Zeroizing::new(String::with_capacity(size));
    line.push_str(body);
    line.push_str(sep);
    line.push_str(r#""text":""#);
    for c in text.chars() {
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let h = b"0123456789abcdef";
                line.push_str("\\u00");
                line.push(char::from(h[(c as usize) >> 4]));
                line.push(char::from(h[(c as usize) & 15]));
            }
            c => line.push(c),
        }
    }
    line.push_str("\"}\n");
    debug_assert_eq!(line.len(), size, "the size computed is the size written");
    line
}

/// The octets `c` takes in a JSON string, as [`request_line`] writes it.
fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// A JSON string literal as serde_json checked it (quotes included)
/// unescaped into a string allocated once at its final size (RFC 8259 §7);
/// `None` if `raw` is not a string or an escape is malformed (a lone
/// surrogate), and what was unescaped so far is wiped.
pub fn unescape(raw: &str) -> Option<String> {
    let body = raw.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = Zeroizing::new(String::with_capacity(body.len()));
    let mut chars = body.chars();
    let hex4 = |chars: &mut std::str::Chars| -> Option<u32> {
        let mut v = 0;
        for _ in 0..4 {
            v = v * 16 + chars.next()?.to_digit(16)?;
        }
        Some(v)
    };
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next()? {
            '"' => '"',
            '\\' => '\\',
            '/' => '/',
            'b' => '\u{8}',
            'f' => '\u{c}',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'u' => {
                let mut u = hex4(&mut chars)?;
                if (0xd800..0xdc00).contains(&u) {
                    // A surrogate pair: the low half must follow.
                    if (chars.next()?, chars.next()?) != ('\\', 'u') {
                        return None;
                    }
                    let lo = hex4(&mut chars)?;
                    if !(0xdc00..0xe000).contains(&lo) {
                        return None;
                    }
                    u = 0x10000 + ((u - 0xd800) << 10) + (lo - 0xdc00);
                }
                char::from_u32(u)?
            }
            _ => return None,
        });
    }
    Some(std::mem::take(&mut *out))
}

pub fn states(keys: bool) -> Value {
    json!({"v": VERSION, "op": "states", "keys": keys})
}

pub fn policies() -> Value {
    json!({"v": VERSION, "op": "policies"})
}

pub fn monitor() -> Value {
    json!({"v": VERSION, "op": "monitor"})
}

pub fn stats() -> Value {
    json!({"v": VERSION, "op": "stats"})
}

pub fn ok(mut fields: Value) -> Value {
    fields["v"] = json!(VERSION);
    fields["ok"] = json!(true);
    fields
}

pub fn error(msg: impl Into<String>) -> Value {
    json!({"v": VERSION, "ok": false, "error": msg.into()})
}

/// Checks a request's version; the error response if it is not ours.
pub fn check_version(req: &Value) -> Result<(), Value> {
    match req.get("v").and_then(Value::as_u64) {
        Some(VERSION | VERSION_2) => Ok(()),
        other => Err(error(format!(
            "protocol version {} not supported: this espd speaks versions {VERSION} and {VERSION_2}",
            other.map_or("(none)".to_string(), |v| v.to_string())
        ))),
    }
}

/// The version a request asks for (answers carry the same); 1 if none.
pub fn version_of(req: &Value) -> u64 {
    match req.get("v").and_then(Value::as_u64) {
        Some(VERSION_2) => VERSION_2,
        _ => VERSION,
    }
}

/// Binds a root-only control socket: its directory created 0700 if
/// missing, the socket 0600; a stale socket file is replaced, one a live
/// daemon answers on is refused (`who` names the daemon and its option for
/// another path, for the error).
pub fn bind_socket(path: &Path, who: &str) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running {who}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Subscribes to events: calls `f` with each one until the connection ends
/// or `f` returns false.
pub fn subscribe(socket: &Path, mut f: impl FnMut(&Value) -> bool) -> Result<(), String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    let mut line = monitor().to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    let r = BufReader::new(s);
    let mut first = true;
    for l in r.lines() {
        let l = l.map_err(|e| e.to_string())?;
        let v: Value =
            serde_json::from_str(&l).map_err(|e| format!("bad event line ({e}): {l}"))?;
        if first {
            first = false;
            if v.get("ok").and_then(Value::as_bool) != Some(true) {
                return Err(v
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("refused")
                    .to_string());
            }
            continue;
        }
        if !f(&v) {
            break;
        }
    }
    Ok(())
}

/// Sends one request and reads the answer (client side).
pub fn call(socket: &Path, req: &Value) -> Result<Value, String> {
    call_to(socket, req, "espd run --control")
}

/// [`call`] for another daemon's socket; `who` is the command line that
/// serves it, for the error when nothing does.
pub fn call_to(socket: &Path, req: &Value, who: &str) -> Result<Value, String> {
    let mut line = req.to_string();
    line.push('\n');
    call_line(socket, &line, who)
}

/// Sends one request line (built by [`request_line`], newline included)
/// and reads the answer.
pub fn call_line(socket: &Path, line: &str, who: &str) -> Result<Value, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot connect to {}: {e} (is `{who} {}` running, and are you root?)",
            socket.display(),
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .map_err(|e| format!("reading espd's answer: {e}"))?;
    serde_json::from_str(&answer).map_err(|e| format!("espd's answer is not JSON ({e}): {answer}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_checked() {
        let apply: Value = serde_json::from_str(&apply_line("b", "state flush")).unwrap();
        assert!(check_version(&apply).is_ok());
        assert!(check_version(&json!({"v": 2, "op": "stats"})).is_ok());
        let e = check_version(&json!({"v": 3, "op": "stats"})).unwrap_err();
        assert_eq!(e["ok"], false);
        assert!(e["error"].as_str().unwrap().contains("versions 1 and 2"));
        assert!(check_version(&json!({"op": "stats"})).is_err());
    }

    /// The line is what serde_json would have written, built in one
    /// allocation, and [`unescape`] (what espd reads it with) gives the
    /// text back.
    #[test]
    fn request_lines_read_back_as_the_text_given() {
        let alphabet: Vec<char> = "a0 \"\\/\n\t\r\u{1}\u{1f}\u{7f}é€😀".chars().collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for case in 0..20_000u64 {
            let mut text = String::new();
            for _ in 0..(case % 50) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                text.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            let req = json!({"op": "apply", "name": "child", "v": 2, "id": case});
            let line = request_line(&req, Some(&text));
            assert_eq!(line.capacity(), line.len(), "built in one allocation");
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            let back: Value = serde_json::from_str(&line).unwrap();
            let mut want = req.clone();
            want["text"] = json!(text);
            assert_eq!(back, want);
            // The other half: the text member as written, unescaped.
            let raw: std::collections::BTreeMap<String, &serde_json::value::RawValue> =
                serde_json::from_str(&line).unwrap();
            assert_eq!(unescape(raw["text"].get()).as_deref(), Some(text.as_str()));
        }
        assert_eq!(&*request_line(&json!({}), Some("a")), "{\"text\":\"a\"}\n");
        assert_eq!(
            &*request_line(&json!({"op": "x"}), None),
            "{\"op\":\"x\"}\n"
        );
        assert_eq!(unescape("\"\\ud800\""), None, "a lone surrogate");
        assert_eq!(unescape("5"), None, "not a string");
    }
}
