//! espd-ike's kept connection to espd's control socket (protocol version 2,
//! docs/control.md): batches are applied one at a time and answered in
//! order; events (`acquire`, expiry) arrive on the same connection after
//! `subscribe` and go to the main loop.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use crate::Ev;

/// How long an answer from espd may take (a batch at 100 000 tunnels is
/// milliseconds; this is for an espd that hangs).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// From the reader thread to the main loop.
pub enum FromEspd {
    Event(Value),
    /// Connection number N ended (espd stopped or restarted).
    Down(u64),
}

pub struct Link {
    pub path: PathBuf,
    conn: Option<(UnixStream, Receiver<Value>)>,
    next_id: u64,
    events: Sender<Ev>,
    /// Which connection this is (a late `Down` of an old one is ignored).
    pub generation: u64,
}

/// Why a batch did not go through.
pub enum Refusal {
    /// espd is not there (or went away): try again when it is.
    Unreachable(String),
    /// espd refused the batch (its error names the line).
    Refused(String),
}

impl Link {
    pub fn new(path: PathBuf, events: Sender<Ev>) -> Link {
        Link {
            path,
            conn: None,
            next_id: 1,
            events,
            generation: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        self.conn.is_some()
    }

    /// Connects and subscribes; Ok(true) if this made a new connection.
    pub fn connect(&mut self) -> Result<bool, String> {
        if self.conn.is_some() {
            return Ok(false);
        }
        let s = UnixStream::connect(&self.path)
            .map_err(|e| format!("cannot connect to espd at {}: {e}", self.path.display()))?;
        let r = s.try_clone().map_err(|e| e.to_string())?;
        let (atx, arx) = mpsc::channel();
        let events = self.events.clone();
        self.generation += 1;
        let gen = self.generation;
        std::thread::Builder::new()
            .name("espd-link".into())
            .spawn(move || reader(r, atx, events, gen))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(ANSWER_TIMEOUT))
            .map_err(|e| e.to_string())?;
        self.conn = Some((s, arx));
        match self.request(json!({"op": "subscribe"})) {
            Ok(_) => Ok(true),
            Err(Refusal::Unreachable(e) | Refusal::Refused(e)) => {
                self.conn = None;
                Err(format!("espd refused the event subscription: {e}"))
            }
        }
    }

    pub fn lost(&mut self) {
        self.conn = None;
    }

    fn request(&mut self, req: Value) -> Result<Value, Refusal> {
        self.send(req, None)
    }

    /// Sends `req` with `text` (a batch, which may hold keys) as its
    /// `text`, and waits for the answer.
    fn send(&mut self, mut req: Value, text: Option<&str>) -> Result<Value, Refusal> {
        let id = self.next_id;
        self.next_id += 1;
        req["v"] = json!(espd_proto::VERSION_2);
        req["id"] = json!(id);
        let Some((s, answers)) = self.conn.as_mut() else {
            return Err(Refusal::Unreachable("not connected to espd".into()));
        };
        // The line may hold keys: built at its final size, so no growth
        // leaves a copy in freed memory, and wiped once written.
        let line = espd_proto::request_line(&req, text);
        if let Err(e) = s.write_all(line.as_bytes()) {
            self.conn = None;
            return Err(Refusal::Unreachable(format!("writing to espd: {e}")));
        }
        loop {
            match answers.recv_timeout(ANSWER_TIMEOUT) {
                Ok(a) if a.get("id") == Some(&json!(id)) => {
                    return if a.get("ok").and_then(Value::as_bool) == Some(true) {
                        Ok(a)
                    } else {
                        Err(Refusal::Refused(
                            a.get("error")
                                .and_then(Value::as_str)
                                .unwrap_or("refused without a reason")
                                .to_string(),
                        ))
                    };
                }
                Ok(_) => continue,
                Err(_) => {
                    self.conn = None;
                    return Err(Refusal::Unreachable("espd did not answer".into()));
                }
            }
        }
    }

    /// Applies one batch, all or nothing.
    /// A listing (`states` without keys, or `policies`) as espd writes it.
    pub fn listing(&mut self, op: &str) -> Result<String, Refusal> {
        let a = self.request(json!({"op": op, "keys": false}))?;
        Ok(a["text"].as_str().unwrap_or("").to_string())
    }

    pub fn apply(&mut self, name: &str, text: &str) -> Result<(), Refusal> {
        self.send(json!({"op": "apply", "name": name}), Some(text))
            .map(|_| ())
    }
}

fn reader(s: UnixStream, answers: Sender<Value>, events: Sender<Ev>, gen: u64) {
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { break };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v.get("event").is_some() {
            if events.send(Ev::Espd(FromEspd::Event(v))).is_err() {
                return;
            }
        } else if answers.send(v).is_err() {
            return;
        }
    }
    let _ = events.send(Ev::Espd(FromEspd::Down(gen)));
}
