//! espd-ike's own control socket (`espctl ike …`): a Unix stream socket,
//! 0600 in a 0700 directory, root only (SO_PEERCRED), one JSON request
//! line and one JSON answer line per connection, each connection on its
//! own thread so that a client that sends nothing holds up no one.

use crate::Ev;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{self, Sender};
use std::time::Duration;

/// A request must arrive whole within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request line.
const MAX_REQUEST: u64 = 1 << 20;

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    Ok(espd_proto::bind_socket(
        path,
        "espd-ike (use --socket PATH for another instance)",
    )?)
}

pub fn serve(l: UnixListener, tx: Sender<Ev>) {
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        let tx = tx.clone();
        let _ = std::thread::Builder::new()
            .name("ike-ctl".into())
            .spawn(move || {
                let _ = connection(s, tx);
            });
    }
}

fn answer(s: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())
}

fn connection(mut s: UnixStream, tx: Sender<Ev>) -> std::io::Result<()> {
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    s.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let uid = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.uid())
        .ok();
    if uid != Some(0) {
        return answer(
            &mut s,
            &json!({"ok": false, "error": format!(
                "permission denied: espd-ike's control socket serves root only (peer uid {})",
                uid.map_or("unknown".into(), |u| u.to_string()))}),
        );
    }
    let mut line = String::new();
    let n = BufReader::new((&s).take(MAX_REQUEST + 1)).read_line(&mut line);
    let err = match n {
        Ok(_) if line.len() as u64 > MAX_REQUEST => Some("request larger than 1 MiB".to_string()),
        Ok(0) => return Ok(()),
        Ok(_) if !line.ends_with('\n') => Some("request incomplete within 5 s".into()),
        Ok(_) => None,
        Err(e) => Some(format!("no request within 5 s ({e})")),
    };
    if let Some(e) = err {
        return answer(&mut s, &json!({"ok": false, "error": e}));
    }
    let req: Value = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(e) => {
            return answer(
                &mut s,
                &json!({"ok": false, "error": format!("request is not JSON: {e}")}),
            )
        }
    };
    let (rtx, rrx) = mpsc::channel();
    if tx.send(Ev::Ctl(req, rtx)).is_err() {
        return answer(
            &mut s,
            &json!({"ok": false, "error": "espd-ike is stopping"}),
        );
    }
    match rrx.recv_timeout(Duration::from_secs(30)) {
        Ok(v) => answer(&mut s, &v),
        Err(_) => answer(
            &mut s,
            &json!({"ok": false, "error": "espd-ike did not answer"}),
        ),
    }
}
