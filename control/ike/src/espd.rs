//! What espd-ike asks of espd, sans-IO: a CHILD_SA as `state add` lines
//! and its policies as `policy add` lines (docs/config.md), batches the
//! daemon sends over espd's control socket (docs/control.md).
//!
//! Policies are reference-counted by (selector, direction): a rekeyed
//! CHILD_SA (same reqid, same selectors) and a `start_action = trap`
//! child share them, and a policy goes only when its last user does.
//! RFC 4301 §4.4.1: the SPD entry names the reqid, not the SPI, so a
//! rekey changes no policy; of several SAs of a reqid espd uses the newest.

use crate::conf::{Child, Conn, Mode};
use crate::ike::{ChildSa, Dir};
use crate::proposal::{Chosen, Encr, Integ};
use crate::ts::{self, TsConf};
use crate::wire::Ts;
use std::collections::HashMap;
use std::fmt::Write;
use std::net::IpAddr;
use zeroize::Zeroizing;

/// Trap policies are looked at after negotiated ones (lower first).
const TRAP_PRIORITY: u32 = 1000;

/// One policy: the words that delete it, the line that adds it, its users.
struct Policy {
    add: String,
    users: usize,
    /// In espd from an espd-ike that ended without removing it (killed):
    /// kept, so what it protects stays blocked, until a child of ours
    /// replaces it (`policy update`) or [`Installer::drop_adopted`].
    adopted: bool,
}

/// A CHILD_SA espd holds for us.
struct Installed {
    /// `state delete …` for each direction put.
    states: Vec<String>,
    /// Keys of the policies it holds a reference on.
    policies: Vec<String>,
    /// The batches that put it (re-applied when espd restarted).
    batches: Vec<Zeroizing<String>>,
}

/// The batches a change needs: each is applied all or nothing.
#[derive(Default)]
pub struct Batches {
    pub apply: Vec<Zeroizing<String>>,
    /// Lines removed one by one (an SA espd already expired is no error).
    pub delete: Vec<String>,
}

#[derive(Default)]
pub struct Installer {
    policies: HashMap<String, Policy>,
    children: HashMap<u32, Installed>,
    /// Trap policies by `conn/child`.
    traps: HashMap<String, Vec<String>>,
}

/// ` 0xHEX` of key material, written in place: no string of the key is
/// made on the way (it would be freed unwiped).
fn push_hex(s: &mut String, b: &[u8]) {
    s.push_str(" 0x");
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
}

fn integ_name(i: Integ) -> &'static str {
    match i {
        Integ::Sha256 => "hmac(sha256)",
        Integ::Sha384 => "hmac(sha384)",
        Integ::Sha512 => "hmac(sha512)",
    }
}

/// The ALGORITHMS words of `state add` for KEYMAT `key` (the encryption
/// key, an AEAD's salt included, then the integrity key: RFC 7296 §2.17).
pub fn alg_words(alg: &Chosen, key: &[u8]) -> Zeroizing<String> {
    let ek = alg.encr.key_len();
    let (e, a) = key.split_at(ek.min(key.len()));
    // At its final size from the start: a growing string would leave
    // copies of the keys in the buffers it outgrew.
    let mut s = Zeroizing::new(String::with_capacity(ALG_WORDS + 2 * key.len()));
    let cap = s.capacity();
    match alg.encr {
        Encr::AesGcm(_, icv) => {
            s.push_str("aead 'rfc4106(gcm(aes))'");
            push_hex(&mut s, e);
            let _ = write!(s, " {}", icv as u32 * 8);
        }
        Encr::ChaCha => {
            s.push_str("aead 'rfc7539esp(chacha20,poly1305)'");
            push_hex(&mut s, e);
            s.push_str(" 128");
        }
        Encr::Gmac(_) => {
            s.push_str("aead 'rfc4543(gcm(aes))'");
            push_hex(&mut s, e);
            s.push_str(" 128");
        }
        Encr::AesCbc(_) | Encr::Null => {
            if matches!(alg.encr, Encr::Null) {
                s.push_str("enc 'ecb(cipher_null)' \"\"");
            } else {
                s.push_str("enc 'cbc(aes)'");
                push_hex(&mut s, e);
            }
            if let Some(i) = alg.integ {
                let _ = write!(s, " auth-trunc '{}'", integ_name(i));
                push_hex(&mut s, a);
                let _ = write!(s, " {}", i.icv_len() * 8);
            }
        }
    }
    debug_assert_eq!(s.capacity(), cap, "alg_words outgrew its capacity");
    s
}

/// Everything of [`alg_words`] but the hex of the keys, at most.
const ALG_WORDS: usize = 128;
/// Everything of a `state add` line but its algorithm words, at most:
/// the words, two addresses, numbers and lifetimes.
const STATE_WORDS: usize = 512;

fn mode_word(m: Mode) -> &'static str {
    match m {
        Mode::Tunnel => "tunnel",
        Mode::Transport => "transport",
    }
}

/// The template: a tunnel's endpoints, or a transport SA's reqid alone.
fn tmpl(src: IpAddr, dst: IpAddr, reqid: u32, mode: Mode) -> String {
    match mode {
        Mode::Tunnel => format!("tmpl src {src} dst {dst} proto esp reqid {reqid} mode tunnel"),
        Mode::Transport => format!("tmpl proto esp reqid {reqid} mode transport"),
    }
}

/// Policy lines (key, add line) for traffic `src` → `dst` in `dir`.
fn policy_lines(
    src: &[Ts],
    dst: &[Ts],
    dir: &str,
    priority: Option<u32>,
    tmpl: &str,
) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for s in src {
        for d in dst
            .iter()
            .filter(|d| d.start.is_ipv4() == s.start.is_ipv4())
        {
            for sp in ts::prefixes(s) {
                for dp in ts::prefixes(d) {
                    let sel = ts::selector_words(s, sp, d, dp);
                    let key = format!("{sel} dir {dir}");
                    let prio = priority.map_or(String::new(), |p| format!(" priority {p}"));
                    v.push((key.clone(), format!("policy add {key}{prio} {tmpl}")));
                }
            }
        }
    }
    v
}

/// The policies of one direction of a child: out, or in and (tunnel) fwd.
#[allow(clippy::too_many_arguments)]
fn child_policies(
    mode: Mode,
    local: IpAddr,
    remote: IpAddr,
    reqid: u32,
    ts_local: &[Ts],
    ts_remote: &[Ts],
    dir: Dir,
    priority: Option<u32>,
) -> Vec<(String, String)> {
    match dir {
        Dir::Out => policy_lines(
            ts_local,
            ts_remote,
            "out",
            priority,
            &tmpl(local, remote, reqid, mode),
        ),
        Dir::In => {
            let t = tmpl(remote, local, reqid, mode);
            let mut v = policy_lines(ts_remote, ts_local, "in", priority, &t);
            if mode == Mode::Tunnel {
                // RFC 4301 §5.2: what a gateway forwards out of the tunnel
                // is checked against the SPD too (XFRM's fwd direction).
                v.extend(policy_lines(ts_remote, ts_local, "fwd", priority, &t));
            }
            v
        }
    }
}

impl Installer {
    pub fn new() -> Installer {
        Installer::default()
    }

    /// Takes a reference on each policy; the lines of those that are new.
    fn take(&mut self, lines: Vec<(String, String)>, held: &mut Vec<String>, out: &mut String) {
        for (key, add) in lines {
            if held.contains(&key) {
                continue;
            }
            let p = self.policies.entry(key.clone()).or_insert(Policy {
                add: add.clone(),
                users: 0,
                adopted: false,
            });
            p.users += 1;
            if p.adopted {
                // Replaced in place: never a moment without the policy.
                p.adopted = false;
                p.add = add;
                out.push_str(&p.add.replacen("policy add", "policy update", 1));
                out.push('\n');
            } else if p.users == 1 {
                out.push_str(&p.add);
                out.push('\n');
            }
            held.push(key);
        }
    }

    /// Drops references; the delete lines of policies nobody holds now.
    fn release(&mut self, keys: Vec<String>, out: &mut Vec<String>) {
        for key in keys {
            if let Some(p) = self.policies.get_mut(&key) {
                p.users -= 1;
                if p.users == 0 {
                    self.policies.remove(&key);
                    out.push(format!("policy delete {key}"));
                }
            }
        }
    }

    /// One direction of a CHILD_SA: its SA, then its policies (RFC 4301
    /// §4.4: the SA exists before a policy can select it).
    pub fn install(&mut self, c: &ChildSa, dir: Dir) -> Zeroizing<String> {
        let (src, dst, spi, key) = match dir {
            Dir::In => (c.remote, c.local, c.spi_in, &c.key_in),
            Dir::Out => (c.local, c.remote, c.spi_out, &c.key_out),
        };
        // The policies first (no keys in them): the batch is then written
        // at its final size, so no growth leaves a copy of the keys behind.
        let entry = self.children.entry(c.spi_in).or_insert(Installed {
            states: Vec::new(),
            policies: Vec::new(),
            batches: Vec::new(),
        });
        entry.states.push(format!(
            "state delete src {} dst {} proto esp spi 0x{spi:08x}",
            src.ip(),
            dst.ip()
        ));
        let mut held = std::mem::take(&mut entry.policies);
        let lines = child_policies(
            c.mode,
            c.local.ip(),
            c.remote.ip(),
            c.reqid,
            &c.ts_local,
            &c.ts_remote,
            dir,
            None,
        );
        let mut pols = String::new();
        self.take(lines, &mut held, &mut pols);
        let entry = self.children.get_mut(&c.spi_in).expect("just added");
        entry.policies = held;
        let algs = alg_words(&c.alg, key);
        let mut text = Zeroizing::new(String::with_capacity(STATE_WORDS + algs.len() + pols.len()));
        let cap = text.capacity();
        let _ = write!(
            text,
            "state add src {} dst {} proto esp spi 0x{spi:08x} reqid {} mode {}",
            src.ip(),
            dst.ip(),
            c.reqid,
            mode_word(c.mode)
        );
        if dir == Dir::In {
            let _ = write!(text, " replay-window {}", c.replay_window);
        }
        if c.alg.esn {
            text.push_str(" flag esn");
        }
        text.push(' ');
        text.push_str(&algs);
        if c.encap {
            // RFC 3948: ESP in UDP between the IKE SA's ports.
            let oa = if src.is_ipv4() { "0.0.0.0" } else { "::" };
            let _ = write!(text, " encap espinudp {} {} {oa}", src.port(), dst.port());
        }
        let hard = c.life_time.as_secs().max(1);
        let soft = c.rekey_time.as_secs().clamp(1, hard);
        let _ = write!(text, " limit time-soft {soft} time-hard {hard}");
        // Volume lifetimes: espd's soft expiry makes us rekey, its hard one
        // ends the SA (RFC 4301 §4.4.2.1).
        for (word, n) in ["byte-soft", "byte-hard", "packet-soft", "packet-hard"]
            .iter()
            .zip(c.volume)
        {
            if n > 0 {
                let _ = write!(text, " {word} {n}");
            }
        }
        let _ = writeln!(text);
        text.push_str(&pols);
        debug_assert_eq!(text.capacity(), cap, "the batch outgrew its capacity");
        let entry = self.children.get_mut(&c.spi_in).expect("just added");
        entry.batches.push(text.clone());
        text
    }

    /// Forgets a half-installed direction whose batch espd refused.
    pub fn refused(&mut self, c: &ChildSa) -> Batches {
        self.remove(c.spi_in)
    }

    /// Removing a CHILD_SA: its SAs, then the policies no one else holds.
    pub fn remove(&mut self, spi_in: u32) -> Batches {
        let mut b = Batches::default();
        if let Some(i) = self.children.remove(&spi_in) {
            b.delete.extend(i.states);
            self.release(i.policies, &mut b.delete);
        }
        b
    }

    /// `start_action = trap`: the child's policies without an SA, so that
    /// espd drops matching traffic and raises `acquire` (RFC 4301 §5.1).
    pub fn trap(&mut self, conn: &Conn, ch: &Child) -> Result<Zeroizing<String>, String> {
        let name = format!("{}/{}", conn.name, ch.name);
        if self.traps.contains_key(&name) {
            return Ok(Zeroizing::new(String::new()));
        }
        let (local, remote) = match (conn.local_addrs.first(), conn.remote_addrs.first()) {
            (Some(crate::conf::AddrSpec::Addr(l)), Some(crate::conf::AddrSpec::Addr(r))) => {
                (*l, *r)
            }
            _ => {
                return Err(format!(
                    "child `{}`: start_action = trap needs concrete local_addrs and remote_addrs",
                    ch.name
                ))
            }
        };
        let resolve =
            |v: &[TsConf], own: IpAddr| -> Vec<Ts> { v.iter().map(|t| t.resolve(own)).collect() };
        let tl = resolve(&ch.local_ts, local);
        let tr = resolve(&ch.remote_ts, remote);
        let mut held = Vec::new();
        let mut text = Zeroizing::new(String::new());
        for dir in [Dir::In, Dir::Out] {
            let lines = child_policies(
                ch.mode,
                local,
                remote,
                ch.reqid,
                &tl,
                &tr,
                dir,
                Some(TRAP_PRIORITY),
            );
            self.take(lines, &mut held, &mut text);
        }
        self.traps.insert(name, held);
        Ok(text)
    }

    /// Removes a trap (the child left the configuration, or at exit).
    pub fn untrap(&mut self, conn: &str, child: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(held) = self.traps.remove(&format!("{conn}/{child}")) {
            self.release(held, &mut out);
        }
        out
    }

    pub fn trapped(&self) -> Vec<String> {
        let mut v: Vec<String> = self.traps.keys().cloned().collect();
        v.sort();
        v
    }

    /// Policies a previous espd-ike left in espd (`policy add` lines as
    /// espd lists them, already chosen as ours by their reqid): each is
    /// held as adopted unless we hold it already. The keys espd has, for
    /// [`Installer::reinstall`].
    pub fn adopt(&mut self, lines: &[&str]) -> std::collections::HashSet<String> {
        let mut have = std::collections::HashSet::new();
        for l in lines {
            let w: Vec<&str> = l.split_whitespace().collect();
            let Some(d) = w.iter().position(|x| *x == "dir") else {
                continue;
            };
            if w.len() < d + 2 || w.get(..2) != Some(&["policy", "add"][..]) {
                continue;
            }
            let key = w[2..d + 2].join(" ");
            self.policies.entry(key.clone()).or_insert(Policy {
                add: w.join(" "),
                users: 0,
                adopted: true,
            });
            have.insert(key);
        }
        have
    }

    /// Adopted policies no child of ours took over: their delete lines.
    pub fn drop_adopted(&mut self) -> Vec<String> {
        let gone: Vec<String> = self
            .policies
            .iter()
            .filter(|(_, p)| p.adopted)
            .map(|(k, _)| k.clone())
            .collect();
        gone.into_iter()
            .map(|k| {
                self.policies.remove(&k);
                format!("policy delete {k}")
            })
            .collect()
    }

    /// Everything, for an espd that restarted (or, `in_espd`, one that holds
    /// some of these policies already: those are updated in place): every
    /// policy, then every SA batch's state lines (policies first is fine:
    /// they only name reqids).
    pub fn reinstall(&self, in_espd: &std::collections::HashSet<String>) -> Vec<Zeroizing<String>> {
        let mut v = Vec::new();
        let mut pol = String::new();
        for (k, p) in self.policies.iter().filter(|(_, p)| !p.adopted) {
            if in_espd.contains(k) {
                pol.push_str(&p.add.replacen("policy add", "policy update", 1));
            } else {
                pol.push_str(&p.add);
            }
            pol.push('\n');
        }
        if !pol.is_empty() {
            v.push(Zeroizing::new(pol));
        }
        for i in self.children.values() {
            for b in &i.batches {
                let states: String = b
                    .lines()
                    .filter(|l| l.starts_with("state add"))
                    .map(|l| format!("{l}\n"))
                    .collect();
                v.push(Zeroizing::new(states));
            }
        }
        v
    }

    /// Everything we put, as delete lines (at exit): SAs, then policies,
    /// except trap policies when `keep_traps` (fail closed while we are away).
    pub fn remove_all(&mut self, keep_traps: bool) -> Vec<String> {
        let spis: Vec<u32> = self.children.keys().copied().collect();
        let mut out = Vec::new();
        for s in spis {
            out.extend(self.remove(s).delete);
        }
        if !keep_traps {
            let names: Vec<String> = self.traps.keys().cloned().collect();
            for n in names {
                if let Some(held) = self.traps.remove(&n) {
                    self.release(held, &mut out);
                }
            }
        }
        out
    }

    pub fn child_count(&self) -> usize {
        self.children.len()
    }

    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn ts(a: &str, b: &str) -> Ts {
        Ts {
            proto: 0,
            start_port: 0,
            end_port: 65535,
            start: a.parse().unwrap(),
            end: b.parse().unwrap(),
        }
    }

    fn child(spi_in: u32, encr: Encr, encap: bool) -> ChildSa {
        let integ = if encr.is_aead() {
            None
        } else {
            Some(Integ::Sha256)
        };
        let n = encr.key_len() + integ.map_or(0, |i| i.key_len());
        ChildSa {
            ike: 1,
            conn: "site".into(),
            name: "net".into(),
            reqid: 7,
            mode: Mode::Tunnel,
            local: "198.18.0.1:4500".parse().unwrap(),
            remote: "198.18.0.2:4500".parse().unwrap(),
            encap,
            spi_in,
            spi_out: spi_in + 1,
            alg: Chosen {
                encr,
                integ,
                prf: None,
                dh: None,
                esn: false,
            },
            key_in: Zeroizing::new((0..n as u8).collect()),
            key_out: Zeroizing::new((0..n as u8).map(|x| x ^ 0xff).collect()),
            // 198.18.1.0-198.18.1.255 and a range that needs two prefixes.
            ts_local: vec![ts("198.18.1.0", "198.18.1.255")],
            ts_remote: vec![ts("198.18.2.0", "198.18.4.255")],
            replay_window: 128,
            life_time: Duration::from_secs(3960),
            rekey_time: Duration::from_secs(3600),
            rand_time: None,
            volume: [0; 4],
            trap: false,
            peer_takes_tfc: true,
            installed_at: Instant::now(),
        }
    }

    /// A batch holds keys: it is written at its final size (the debug
    /// assertions in `install` and `alg_words` say so), even with the
    /// longest words — IPv6, SHA-512, the largest numbers.
    #[test]
    fn batches_are_written_at_their_final_size() {
        for (encr, integ) in [
            (Encr::AesCbc(256), Some(Integ::Sha512)),
            (Encr::Null, Some(Integ::Sha384)),
            (Encr::AesGcm(256, 16), None),
        ] {
            let mut c = child(u32::MAX - 1, encr, true);
            c.alg.integ = integ;
            c.alg.esn = true;
            let n = encr.key_len() + integ.map_or(0, |i| i.key_len());
            c.key_in = Zeroizing::new(vec![0xab; n]);
            c.key_out = Zeroizing::new(vec![0xcd; n]);
            c.local = "[2001:db8:ffff:ffff:ffff:ffff:ffff:fffe]:65535"
                .parse()
                .unwrap();
            c.remote = "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
                .parse()
                .unwrap();
            c.mode = Mode::Transport;
            c.reqid = u32::MAX;
            c.replay_window = u32::MAX;
            c.life_time = Duration::from_secs(u64::MAX / 2);
            c.rekey_time = Duration::from_secs(u64::MAX / 4);
            c.volume = [u64::MAX; 4];
            let mut i = Installer::new();
            for d in [Dir::In, Dir::Out] {
                let t = i.install(&c, d);
                assert!(t.starts_with("state add src 2001:db8:"), "{}", *t);
            }
        }
    }

    #[test]
    fn a_child_becomes_espd_lines_that_espd_accepts() {
        let mut i = Installer::new();
        let c = child(0x1234, Encr::AesGcm(128, 16), true);
        let inb = i.install(&c, Dir::In);
        let out = i.install(&c, Dir::Out);
        let first = inb.lines().next().unwrap();
        assert!(first.starts_with(
            "state add src 198.18.0.2 dst 198.18.0.1 proto esp spi 0x00001234 reqid 7 mode tunnel replay-window 128 aead 'rfc4106(gcm(aes))' 0x000102"
        ), "{first}");
        assert!(
            first.ends_with(
                " 128 encap espinudp 4500 4500 0.0.0.0 limit time-soft 3600 time-hard 3960"
            ),
            "{first}"
        );
        // in and fwd for each of the two remote prefixes; out for each.
        assert_eq!(
            inb.lines().filter(|l| l.contains("dir in ")).count(),
            2,
            "{}",
            *inb
        );
        assert_eq!(inb.lines().filter(|l| l.contains("dir fwd ")).count(), 2);
        assert_eq!(out.lines().filter(|l| l.contains("dir out ")).count(), 2);
        assert!(out.contains("policy add src 198.18.1.0/24 dst 198.18.2.0/23 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 7 mode tunnel"), "{}", *out);
        // Every line is one espd's own parser takes.
        let text = format!("{}{}", *inb, *out);
        espd_config::Config::parse("ike", &text).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        for e in [Encr::AesCbc(256), Encr::ChaCha, Encr::Gmac(128), Encr::Null] {
            let mut j = Installer::new();
            let c = child(0x999, e, false);
            let t = format!("{}{}", *j.install(&c, Dir::In), *j.install(&c, Dir::Out));
            espd_config::Config::parse("ike", &t).unwrap_or_else(|e| panic!("{e:?}\n{t}"));
        }
        // Volume lifetimes become espd's byte and packet limits.
        let mut j = Installer::new();
        let mut c = child(0x7700, Encr::AesGcm(128, 16), false);
        c.volume = [1 << 20, 1_153_433, 0, 0];
        let t = j.install(&c, Dir::In);
        assert!(
            t.lines().next().unwrap().ends_with(
                "limit time-soft 3600 time-hard 3960 byte-soft 1048576 byte-hard 1153433"
            ),
            "{}",
            *t
        );
        c.volume = [0, 0, 100, 110];
        let t = (*Installer::new().install(&c, Dir::In)).clone();
        assert!(
            t.lines()
                .next()
                .unwrap()
                .ends_with("time-hard 3960 packet-soft 100 packet-hard 110"),
            "{t}"
        );
        espd_config::Config::parse("ike", &t).unwrap_or_else(|e| panic!("{e:?}\n{t}"));
    }

    #[test]
    fn policies_are_shared_by_a_rekeyed_child_and_go_with_the_last() {
        let mut i = Installer::new();
        let old = child(0x1000, Encr::AesGcm(128, 16), false);
        let new = child(0x2000, Encr::AesGcm(128, 16), false);
        for d in [Dir::In, Dir::Out] {
            i.install(&old, d);
        }
        assert_eq!(i.policy_count(), 6);
        let t = i.install(&new, Dir::In);
        assert!(!t.contains("policy add"), "shared, not added twice: {}", *t);
        i.install(&new, Dir::Out);
        let gone = i.remove(0x1000);
        assert_eq!(gone.delete.len(), 2, "only the old SAs: {:?}", gone.delete);
        assert!(gone.delete.iter().all(|l| l.starts_with("state delete")));
        let gone = i.remove(0x2000);
        assert_eq!(
            gone.delete
                .iter()
                .filter(|l| l.starts_with("policy delete"))
                .count(),
            6
        );
        assert_eq!(i.policy_count(), 0);
        assert!(i.remove(0x2000).delete.is_empty());
    }

    #[test]
    fn no_key_reaches_a_delete_line_or_the_reinstall_of_policies() {
        let mut i = Installer::new();
        let c = child(0x1000, Encr::AesCbc(128), false);
        i.install(&c, Dir::In);
        i.install(&c, Dir::Out);
        let b = i.reinstall(&Default::default());
        assert_eq!(b.len(), 3);
        assert!(!b[0].contains("0x00010203"), "policies carry no key");
        for l in i.remove_all(false) {
            assert!(!l.contains("0x0001"), "{l}");
        }
    }

    #[test]
    fn policies_a_killed_espd_ike_left_are_updated_in_place_or_dropped() {
        let mut i = Installer::new();
        let c = child(0x1000, Encr::AesCbc(128), false);
        // What espd lists after the last espd-ike was SIGKILLed: this
        // child's out policy (another SPI's template) and one no child of
        // ours wants any more.
        let mut first = Installer::new();
        let old = first.install(&c, Dir::Out);
        let mut lines: Vec<&str> = old
            .lines()
            .filter(|l| l.starts_with("policy add"))
            .collect();
        assert_eq!(lines.len(), 2);
        let stale = "policy add src 198.18.9.0/24 dst 198.18.8.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 7 mode tunnel";
        lines.push(stale);
        lines.push("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1");
        let have = i.adopt(&lines);
        assert_eq!(have.len(), 3);
        // The child comes back: its policy is replaced, never deleted first.
        let text = i.install(&c, Dir::Out);
        assert!(
            text.contains("policy update src 198.18.1.0/24"),
            "{}",
            *text
        );
        assert!(!text.contains("policy add"), "{}", *text);
        assert!(i
            .reinstall(&have)
            .iter()
            .any(|b| b.contains("policy update")));
        // The one nobody took goes when the grace ends; ours stays.
        assert_eq!(
            i.drop_adopted(),
            [format!(
                "policy delete {}",
                &stale["policy add ".len()..stale.find(" tmpl").unwrap()]
            )]
        );
        assert!(i.drop_adopted().is_empty());
        assert_eq!(i.policy_count(), 2);
    }
}
