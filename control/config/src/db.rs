//! Changes to the running configuration as `espctl` makes them: `ip xfrm`
//! words — `state add|update|delete|flush`, `policy
//! add|update|delete|flush|setdefault` — in batches applied all or
//! nothing: every line is checked against the running SAD and SPD (and the
//! batch's own earlier lines), and any error changes nothing. A state is
//! keyed as the SAD keys it (destination and SPI), a policy as the SPD does
//! (direction and selector).
//!
//! No bookkeeping is kept beside the SAD and SPD: what exists is what they
//! hold, and a listing is written from the SAs and policies that run
//! ([`crate::line`]), which hold everything a line said. At 100 000 tunnels
//! the kept lines were about half a kilobyte a tunnel (and a copy of every
//! key), and the maps of what existed another tenth.

use crate::parse::{parse_line, parse_words, Item};
use crate::{lex, ConfigError, ConfigErrors};
use espd_core::state::{Action, Direction, KeyScope, NewSa, Policy, SaCore, Sad, Selector, Spd};
use std::collections::BTreeMap;
use std::net::IpAddr;
use zeroize::Zeroizing;

/// One change a batch makes, in batch order, checked: what the running
/// tables apply ([`espd_core::state::Tables`]). An SA comes with its keys
/// expanded (once, here).
#[derive(Debug)]
pub enum Op {
    AddSa(NewSa),
    UpdateSa(NewSa),
    DelSa(IpAddr, u32),
    AddPolicy(Policy),
    UpdatePolicy(Policy),
    DelPolicy(Direction, Selector),
    Default(Direction, Action),
}

/// What a batch changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub states_added: usize,
    pub states_updated: usize,
    pub states_deleted: usize,
    pub policies_added: usize,
    pub policies_updated: usize,
    pub policies_deleted: usize,
}

/// The states of `sad` as `state add` lines, in the order they were
/// installed (an updated SA keeps its place): key words as `<redacted>`
/// unless `keys` (the `ip xfrm state list nokeys` spirit, by default).
pub fn state_lines(sad: &Sad, keys: bool) -> Vec<Zeroizing<String>> {
    let mut v: Vec<&SaCore> = sad.iter().map(|c| &**c).collect();
    v.sort_unstable_by_key(|c| c.lineage);
    v.into_iter()
        .map(|c| crate::line::state(&c.cfg, keys))
        .collect()
}

/// The defaults that block, then the policies of `spd`, direction by
/// direction in lookup order (priority, then the earlier one): applied to
/// an empty SPD, the same SPD.
pub fn policy_lines(spd: &Spd) -> Vec<String> {
    let blocked: Vec<&str> = Direction::ALL
        .iter()
        .filter(|d| spd.default_action(**d) == Action::Block)
        .map(|d| d.as_str())
        .collect();
    let defaults = (!blocked.is_empty()).then(|| {
        let pairs: Vec<String> = blocked.iter().map(|d| format!("{d} block")).collect();
        format!("policy setdefault {}", pairs.join(" "))
    });
    defaults
        .into_iter()
        .chain(
            Direction::ALL
                .iter()
                .flat_map(|d| spd.policies(*d))
                .map(crate::line::policy),
        )
        .collect()
}

/// Applies every line of `batch` (named `file` in errors) to the running
/// `sad` and `spd`, or none; the changes it makes, in order. O(the batch):
/// the batch's own adds and deletes are kept beside the tables, which are
/// only read.
pub fn apply(
    file: &str,
    batch: &str,
    sad: &Sad,
    spd: &Spd,
) -> Result<(Changes, Vec<Op>), ConfigErrors> {
    let mut ops = Vec::new();
    let ch = apply_each(file, batch, sad, spd, |op| {
        ops.push(op);
        Ok(())
    })?;
    Ok((ch, ops))
}

/// [`apply`], handing each change to `sink` as soon as its line is checked
/// rather than collecting them: a caller that applies them to a copy of
/// the tables does so while the line's SA, its keys and the index entries
/// its check read are still in cache (one pass over the batch, not two).
/// An error `sink` returns is the line's error. After the first error
/// `sink` is given nothing more (the batch fails, and the caller throws its
/// copy away), but every line is still checked, so that every bad line is
/// named.
pub fn apply_each(
    file: &str,
    batch: &str,
    sad: &Sad,
    spd: &Spd,
    sink: impl FnMut(Op) -> Result<(), String>,
) -> Result<Changes, ConfigErrors> {
    let ahead = batch.len() >= PARALLEL_MIN && second_core();
    check_batch(file, batch, sad, spd, sink, ahead)
}

/// [`apply_each`], its lines parsed on a helper thread or not (`ahead`).
fn check_batch(
    file: &str,
    batch: &str,
    sad: &Sad,
    spd: &Spd,
    mut sink: impl FnMut(Op) -> Result<(), String>,
    ahead: bool,
) -> Result<Changes, ConfigErrors> {
    let mut v = View {
        sad,
        spd,
        states: BTreeMap::new(),
        states_flushed: false,
        policies: BTreeMap::new(),
        policies_flushed: false,
    };
    let mut ch = Changes::default();
    let mut ops = Vec::new();
    let mut errs = Vec::new();
    let mut each = |i: usize, line: Parsed| {
        let mut r = line.0.and_then(|l| v.check(l, &mut ch, &mut ops));
        if r.is_ok() && errs.is_empty() {
            r = ops.drain(..).try_for_each(&mut sink);
        }
        ops.clear();
        if let Err(msg) = r {
            errs.push(ConfigError {
                file: file.to_string(),
                line: i + 1,
                msg,
            });
        }
    };
    // The stack the batch's key expansions (and `sink`'s, below this
    // frame) used is wiped once, when this goes (after the loop, or on an
    // early return).
    let keys = KeyScope::new();
    if ahead {
        // Two stages: a helper thread lexes, parses and expands keys
        // (about 2 µs a state line), this one checks each line against
        // the tables and hands on its change as soon as it arrives, in
        // order: most of the batch's work, overlapped.
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Parsed>>(16);
            let helper = std::thread::Builder::new()
                .name("espd-parse".into())
                .spawn_scoped(s, move || {
                    parse_chunks(batch, sad, spd, |c| tx.send(c).is_ok())
                });
            if helper.is_err() {
                // No thread to be had: this one parses as well.
                let mut i = 0;
                parse_chunks(batch, sad, spd, |c| {
                    for line in c {
                        each(i, line);
                        i += 1;
                    }
                    true
                });
                return;
            }
            for (i, line) in rx.into_iter().flatten().enumerate() {
                each(i, line);
            }
        });
    } else {
        for (i, raw) in batch.lines().enumerate() {
            each(i, Parsed(parse(raw, &keys, sad, spd)));
        }
    }
    drop(keys);
    if !errs.is_empty() {
        return Err(ConfigErrors(errs));
    }
    Ok(ch)
}

/// Octets from which a batch is parsed on a helper thread: about a hundred
/// state lines (a scoped thread and its channel cost about 70 µs, spawned
/// and joined, on the 2-vCPU build machine; a state line about 2 µs to
/// parse and expand).
pub const PARALLEL_MIN: usize = 16 * 1024;

/// Whether this process may run on more than one CPU (asked once: the
/// answer reads cgroup files).
fn second_core() -> bool {
    static MANY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MANY.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}

type StateKey = (IpAddr, u32);
type PolicyKey = (Direction, Selector);

/// What exists while a batch is checked: the running tables, with what the
/// batch's earlier lines added (true) or deleted (false) over them.
struct View<'a> {
    sad: &'a Sad,
    spd: &'a Spd,
    states: BTreeMap<StateKey, bool>,
    /// A `state flush` earlier in the batch: nothing of `sad` exists.
    states_flushed: bool,
    policies: BTreeMap<PolicyKey, bool>,
    policies_flushed: bool,
}

impl View<'_> {
    /// Whether state `k` exists now; `running`: whether the tables hold
    /// it (looked up as the line was parsed).
    fn has_state(&self, k: StateKey, running: bool) -> bool {
        self.states
            .get(&k)
            .copied()
            .unwrap_or(!self.states_flushed && running)
    }

    fn has_policy(&self, k: &PolicyKey, running: bool) -> bool {
        self.policies
            .get(k)
            .copied()
            .unwrap_or(!self.policies_flushed && running)
    }

    /// Every state that exists now: the tables' (in install order), then
    /// the batch's.
    fn state_keys(&self) -> Vec<StateKey> {
        let mut v = Vec::new();
        if !self.states_flushed {
            let mut base: Vec<&SaCore> = self.sad.iter().map(|c| &**c).collect();
            base.sort_unstable_by_key(|c| c.lineage);
            v.extend(
                base.into_iter()
                    .map(|c| (c.cfg.dst, c.cfg.spi))
                    .filter(|k| self.states.get(k) != Some(&false)),
            );
        }
        v.extend(self.states.iter().filter_map(|(k, &on)| {
            (on && (self.states_flushed || self.sad.lookup_in(k.0, k.1).is_none())).then_some(*k)
        }));
        v
    }

    fn policy_keys(&self) -> Vec<PolicyKey> {
        let mut v = Vec::new();
        if !self.policies_flushed {
            for d in Direction::ALL {
                v.extend(
                    self.spd
                        .policies(d)
                        .into_iter()
                        .map(|p| (d, p.sel))
                        .filter(|k| self.policies.get(k) != Some(&false)),
                );
            }
        }
        v.extend(self.policies.iter().filter_map(|(k, &on)| {
            (on && (self.policies_flushed || self.spd.get(k.0, &k.1).is_none())).then_some(*k)
        }));
        v
    }

    /// Checks one parsed line against what exists (the tables and the
    /// batch's earlier lines); its changes go to `ops`.
    fn check(&mut self, line: Line, ch: &mut Changes, ops: &mut Vec<Op>) -> Result<(), String> {
        match line {
            Line::Blank => Ok(()),
            Line::State {
                update,
                core,
                running,
            } => {
                let key = (core.cfg.dst, core.cfg.spi);
                match (update, self.has_state(key, running)) {
                    (false, true) => Err(format!(
                        "a state for dst {} spi 0x{:08x} exists already (use `state update`)",
                        key.0, key.1
                    )),
                    (true, false) => Err(format!(
                        "no state for dst {} spi 0x{:08x} to update",
                        key.0, key.1
                    )),
                    (_, true) => {
                        ch.states_updated += 1;
                        ops.push(Op::UpdateSa(core));
                        Ok(())
                    }
                    (_, false) => {
                        self.states.insert(key, true);
                        ch.states_added += 1;
                        ops.push(Op::AddSa(core));
                        Ok(())
                    }
                }
            }
            Line::StateDelete(dst, spi, running) => {
                if !self.has_state((dst, spi), running) {
                    return Err(format!("no state for dst {dst} spi 0x{spi:08x}"));
                }
                self.states.insert((dst, spi), false);
                ch.states_deleted += 1;
                ops.push(Op::DelSa(dst, spi));
                Ok(())
            }
            Line::StateFlush => {
                let all = self.state_keys();
                ch.states_deleted += all.len();
                ops.extend(all.into_iter().map(|(d, s)| Op::DelSa(d, s)));
                self.states.clear();
                self.states_flushed = true;
                Ok(())
            }
            Line::Policy { verb, p, running } => {
                let key = (p.dir, p.sel);
                let at = self.has_policy(&key, running);
                let name = || {
                    format!(
                        "dir {} policy for src {} dst {}",
                        key.0.as_str(),
                        key.1.src,
                        key.1.dst
                    )
                };
                match (verb, at) {
                    (Verb::Add, true) => {
                        Err(format!("a {} exists already (use `policy update`)", name()))
                    }
                    (Verb::Update | Verb::Delete, false) => Err(format!("no {}", name())),
                    (Verb::Delete, true) => {
                        self.policies.insert(key, false);
                        ch.policies_deleted += 1;
                        ops.push(Op::DelPolicy(key.0, key.1));
                        Ok(())
                    }
                    (_, true) => {
                        ch.policies_updated += 1;
                        ops.push(Op::UpdatePolicy(p));
                        Ok(())
                    }
                    (_, false) => {
                        self.policies.insert(key, true);
                        ch.policies_added += 1;
                        ops.push(Op::AddPolicy(p));
                        Ok(())
                    }
                }
            }
            Line::PolicyFlush => {
                let all = self.policy_keys();
                ch.policies_deleted += all.len();
                ops.extend(all.into_iter().map(|(d, s)| Op::DelPolicy(d, s)));
                self.policies.clear();
                self.policies_flushed = true;
                Ok(())
            }
            Line::Default(d) => {
                ops.extend(d.into_iter().map(|(dir, a)| Op::Default(dir, a)));
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Add,
    Update,
    Delete,
}

/// One line lexed and parsed, a state's keys expanded, and whether the
/// running tables hold what it names (`running`; they do not change while
/// a batch is checked): what checking it against the batch's earlier lines
/// ([`View::check`]) needs, and all of a line's work that does not depend
/// on them.
#[derive(Debug)]
enum Line {
    Blank,
    State {
        update: bool,
        core: NewSa,
        running: bool,
    },
    StateDelete(IpAddr, u32, bool),
    StateFlush,
    Policy {
        verb: Verb,
        p: Policy,
        running: bool,
    },
    PolicyFlush,
    Default(Vec<(Direction, Action)>),
}

/// A line of a batch as [`parse_chunks`] hands it on: parsed, or why not.
#[derive(Debug)]
pub struct Parsed(Result<Line, String>);

/// Lexes and parses one line, expands a state's keys (within `keys`) and
/// looks up what it names in the running `sad` and `spd`.
fn parse(raw: &str, keys: &KeyScope, sad: &Sad, spd: &Spd) -> Result<Line, String> {
    let words = lex::words(raw)?;
    let mut w: Vec<&str> = words.strs();
    if w.first() == Some(&"ip") {
        if w.get(1) != Some(&"xfrm") {
            return Err("expected `xfrm` after `ip`".into());
        }
        w.drain(..2);
    }
    let (obj, verb) = match (w.first(), w.get(1)) {
        (None, _) => return Ok(Line::Blank),
        (Some(o), Some(v)) => (*o, *v),
        (Some(o), None) => return Err(format!("expected a command after `{o}`")),
    };
    // The `add` form of this line's words, for the parser.
    let add_words = || {
        let mut v = Vec::with_capacity(w.len());
        v.extend([obj, "add"]);
        v.extend_from_slice(&w[2..]);
        v
    };
    match (obj, verb) {
        ("state", "add" | "update") => {
            let Some(Item::State(cfg)) = parse_words(&add_words())? else {
                return Err("expected a state".into());
            };
            // The SA must be buildable (key lengths, algorithm limits):
            // say so on this line. Its keys are expanded here, once.
            let core = NewSa::in_scope(*cfg, keys).map_err(|e| e.to_string())?;
            let running = sad.lookup_in(core.cfg.dst, core.cfg.spi).is_some();
            Ok(Line::State {
                update: verb == "update",
                core,
                running,
            })
        }
        ("state", "delete") => {
            let (dst, spi) = state_id(&w[2..])?;
            Ok(Line::StateDelete(
                dst,
                spi,
                sad.lookup_in(dst, spi).is_some(),
            ))
        }
        ("state", "flush") => Ok(Line::StateFlush),
        ("policy", "add" | "update" | "delete") => {
            let Some(Item::Policy(p)) = parse_words(&add_words())? else {
                return Err("expected a policy".into());
            };
            let verb = match verb {
                "add" => Verb::Add,
                "update" => Verb::Update,
                _ => Verb::Delete,
            };
            let running = spd.get(p.dir, &p.sel).is_some();
            Ok(Line::Policy { verb, p, running })
        }
        ("policy", "flush") => Ok(Line::PolicyFlush),
        ("policy", "setdefault") => match parse_line(raw)? {
            Some(Item::Default(d)) => Ok(Line::Default(d)),
            _ => Ok(Line::Default(Vec::new())),
        },
        ("state", v) => Err(format!(
            "expected add, update, delete or flush after `state`, found `{v}`"
        )),
        ("policy", v) => Err(format!(
            "expected add, update, delete, flush or setdefault after `policy`, found `{v}`"
        )),
        (o, _) => Err(format!("expected `state` or `policy`, found `{o}`")),
    }
}

/// Lines a helper thread parses ahead at a time.
const CHUNK: usize = 64;

/// Parses every line of `batch` ([`parse`], against the running `sad` and
/// `spd`), handing them to `out` in
/// order, [`CHUNK`] at a time, until it returns false: the work of a large
/// batch's helper thread. The stack its key expansions used is wiped when
/// it returns (its own [`KeyScope`]: the thread's stack is kept for the
/// next thread, keys and all, if nothing wipes it).
pub fn parse_chunks(batch: &str, sad: &Sad, spd: &Spd, mut out: impl FnMut(Vec<Parsed>) -> bool) {
    let keys = KeyScope::new();
    let mut chunk = Vec::with_capacity(CHUNK);
    for raw in batch.lines() {
        chunk.push(Parsed(parse(raw, &keys, sad, spd)));
        if chunk.len() == CHUNK && !out(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK))) {
            return;
        }
    }
    if !chunk.is_empty() {
        out(chunk);
    }
}

/// `src A dst B proto esp spi N` (src and proto optional): the SAD key.
fn state_id(w: &[&str]) -> Result<(IpAddr, u32), String> {
    let mut dst = None;
    let mut spi = None;
    let mut i = 0;
    while i < w.len() {
        match (w[i], w.get(i + 1)) {
            ("dst", Some(v)) => {
                dst = Some(
                    v.parse::<IpAddr>()
                        .map_err(|_| format!("expected an address after `dst`, found `{v}`"))?,
                )
            }
            ("spi", Some(v)) => {
                let n = if let Some(h) = v.strip_prefix("0x") {
                    u32::from_str_radix(h, 16)
                } else {
                    v.parse()
                };
                spi = Some(n.map_err(|_| format!("expected a 32-bit SPI, found `{v}`"))?)
            }
            ("src" | "proto", Some(_)) => {}
            (x, _) => return Err(format!("expected src, dst, proto or spi, found `{x}`")),
        }
        i += 2;
    }
    match (dst, spi) {
        (Some(d), Some(s)) => Ok((d, s)),
        _ => Err("expected `dst ADDR` and `spi SPI` to name the state".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: &str = "0x0101010101010101010101010101010101010101";

    fn sa(spi: u32) -> String {
        format!("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi {spi:#x} reqid 1 mode tunnel aead 'rfc4106(gcm(aes))' {K} 128")
    }

    /// The SAD and SPD batches make, as espd keeps them.
    #[derive(Default)]
    struct Running {
        sad: Sad,
        spd: Spd,
    }

    impl Running {
        fn apply(&mut self, batch: &str) -> Result<Changes, ConfigErrors> {
            let (ch, ops) = apply("b", batch, &self.sad, &self.spd)?;
            for op in ops {
                match op {
                    Op::AddSa(c) => drop(self.sad.insert(c).unwrap()),
                    Op::UpdateSa(c) => drop(self.sad.update(c).unwrap()),
                    Op::DelSa(d, s) => drop(self.sad.remove(d, s).unwrap()),
                    Op::AddPolicy(p) => self.spd.insert(p).unwrap(),
                    Op::UpdatePolicy(p) => drop(self.spd.update(p).unwrap()),
                    Op::DelPolicy(d, s) => drop(self.spd.remove(d, &s).unwrap()),
                    Op::Default(d, a) => self.spd.set_default(d, a),
                }
            }
            Ok(ch)
        }
        fn states(&self, keys: bool) -> Vec<Zeroizing<String>> {
            state_lines(&self.sad, keys)
        }
        fn policies(&self) -> Vec<String> {
            policy_lines(&self.spd)
        }
    }

    #[test]
    fn batches_apply_whole_or_not_at_all() {
        let mut r = Running::default();
        let pol = "policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel";
        let ch = r.apply(&format!("{}\n{pol}\n", sa(0x100))).unwrap();
        assert_eq!((ch.states_added, ch.policies_added), (1, 1));
        // A bad third line: nothing of the batch happens, and it says where.
        let e = r
            .apply(&format!(
                "{}\nstate delete dst 198.18.0.2 spi 0x100\nstate add bogus\n",
                sa(0x200)
            ))
            .unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!((e.0[0].file.as_str(), e.0[0].line), ("b", 3));
        assert_eq!((r.sad.len(), r.spd.len()), (1, 1));
        // Duplicates and missing ones are errors.
        assert!(r.apply(&sa(0x100)).is_err());
        assert!(r.apply("state delete dst 198.18.0.2 spi 0x999").is_err());
        assert!(r.apply(pol).is_err(), "the same policy twice");
        // update replaces, delete removes, flush empties.
        let ch = r
            .apply(&sa(0x100).replace("state add", "state update"))
            .unwrap();
        assert_eq!(ch.states_updated, 1);
        let ch = r
            .apply("policy delete src 198.18.1.0/24 dst 198.18.2.0/24 dir out\nstate flush")
            .unwrap();
        assert_eq!((ch.policies_deleted, ch.states_deleted), (1, 1));
        assert_eq!((r.sad.len(), r.spd.len()), (0, 0));
        assert!(r.sad.is_empty() && r.spd.is_empty());
        assert!(r.states(true).is_empty() && r.policies().is_empty());
    }

    /// A batch large enough to be parsed on a helper thread
    /// ([`PARALLEL_MIN`]) checks and hands on its changes exactly as one
    /// parsed line by line on the calling thread: the same changes, in
    /// batch order, and every bad line named, with the sink's own error at
    /// its line and nothing handed on after the first error.
    #[test]
    fn a_large_batch_parsed_ahead_checks_as_a_small_one() {
        let mut r = Running::default();
        r.apply(&format!("{}\n{}", sa(0x700), sa(0x800))).unwrap();
        let pol = |i: u32| {
            format!("policy add src 198.18.{i}.0/24 dst 198.19.{i}.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel")
        };
        let mut lines: Vec<String> = Vec::new();
        for i in 0..400u32 {
            lines.push(sa(0x1000 + i));
            if i % 50 == 0 {
                lines.push(pol(i / 50));
                lines.push(format!("state delete dst 198.18.0.2 spi {:#x}", 0x1000 + i));
            }
        }
        lines.push("state delete dst 198.18.0.2 spi 0x700".into());
        lines.push(sa(0x800).replace("state add", "state update"));
        lines.push(sa(0x700));
        let good = lines.join("\n");
        assert!(good.len() >= PARALLEL_MIN, "{} octets", good.len());
        // Handed on in batch order, whichever thread parsed them.
        let key = |op: &Op| match op {
            Op::AddSa(c) => format!("add {:#x}", c.cfg.spi),
            Op::UpdateSa(c) => format!("update {:#x}", c.cfg.spi),
            Op::DelSa(_, s) => format!("delete {s:#x}"),
            Op::AddPolicy(p) => format!("policy {}", p.sel.src),
            other => format!("{other:?}"),
        };
        let run = |batch: &str, ahead: bool, refuse: usize| {
            let mut seen = Vec::new();
            let r = check_batch(
                "b",
                batch,
                &r.sad,
                &r.spd,
                |op| {
                    seen.push(key(&op));
                    if seen.len() == refuse {
                        Err("the sink says no".to_string())
                    } else {
                        Ok(())
                    }
                },
                ahead,
            );
            (r, seen)
        };
        let (ch, seen) = run(&good, true, 0);
        let (ch1, seen1) = run(&good, false, 0);
        let ch = ch.unwrap();
        assert_eq!(ch, ch1.unwrap());
        assert_eq!(seen, seen1);
        assert_eq!(seen.len(), 400 + 8 + 8 + 3);
        assert_eq!(
            seen[..3],
            ["add 0x1000", "policy 198.18.0.0/24", "delete 0x1000"]
        );
        assert_eq!(
            seen[seen.len() - 3..],
            ["delete 0x700", "update 0x800", "add 0x700"]
        );
        assert_eq!(
            (
                ch.states_added,
                ch.states_deleted,
                ch.states_updated,
                ch.policies_added
            ),
            (401, 9, 1, 8)
        );
        // Errors: a line that repeats the running SA 0x800, one that deletes
        // what the batch deleted just before, a line that does not parse,
        // and the sink's refusal of the 100th change (after the first
        // error: never made).
        let mut bad = lines.clone();
        bad[3] = sa(0x800);
        bad[200] = "state add bogus".into();
        let deleted = bad
            .iter()
            .position(|l| l.starts_with("state delete"))
            .unwrap();
        bad.insert(deleted + 1, bad[deleted].clone());
        let bad = bad.join("\n");
        let (e, seen) = run(&bad, true, 100);
        let (e1, seen1) = run(&bad, false, 100);
        let (e, e1) = (e.unwrap_err(), e1.unwrap_err());
        assert_eq!(format!("{e}"), format!("{e1}"));
        assert_eq!(seen, seen1);
        let at: Vec<(usize, &str)> = e.0.iter().map(|e| (e.line, e.msg.as_str())).collect();
        assert_eq!(at.len(), 3, "{at:?}");
        assert_eq!(at[0].0, deleted + 2);
        assert!(at[0].1.starts_with("no state"), "{at:?}");
        assert_eq!(at[1].0, 5);
        assert!(at[1].1.contains("exists already"), "{at:?}");
        assert_eq!(at[2].0, 202);
        // Nothing is handed on after the first error: the three changes
        // before it.
        assert_eq!(seen.len(), 3);
        // The sink's error is its line's.
        let (e, seen) = run(&good, true, 100);
        let e = e.unwrap_err();
        assert_eq!(seen.len(), 100);
        assert_eq!(e.0.len(), 1);
        // (Each line of `good` makes one change.)
        assert_eq!(e.0[0].line, 100);
        assert_eq!(e.0[0].msg, "the sink says no");
        assert_eq!((r.sad.len(), r.spd.len()), (2, 0), "checks change nothing");
    }

    #[test]
    fn listing_hides_keys_unless_asked() {
        let mut r = Running::default();
        r.apply(&sa(0x100)).unwrap();
        let l = r.states(false);
        assert!(!l[0].contains("0101010101"), "{}", *l[0]);
        assert!(
            l[0].contains("'rfc4106(gcm(aes))' <redacted> 128"),
            "{}",
            *l[0]
        );
        assert!(r.states(true)[0].contains(K));
        // What `list` prints can be applied back (with keys).
        let mut again = Running::default();
        again.apply(&r.states(true)[0]).unwrap();
        assert_eq!(again.sad.len(), 1);
    }

    /// Listings keep the order of the `add`s (an update keeps its place), and
    /// a listing applied to an empty espd makes the same listing.
    #[test]
    fn listings_keep_the_order_and_apply_back() {
        let mut r = Running::default();
        let pols: Vec<String> = (0..5)
            .map(|i| format!("policy add src 198.18.{i}.0/24 dst 198.19.{i}.0/24 dir out priority {} tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel", 9 - i))
            .collect();
        for spi in [0x900, 0x300, 0x700, 0x100] {
            r.apply(&sa(spi)).unwrap();
        }
        r.apply(&pols.join("\n")).unwrap();
        r.apply("policy setdefault fwd block").unwrap();
        r.apply(&sa(0x300).replace("state add", "state update"))
            .unwrap();
        let spis: Vec<String> = r
            .states(false)
            .iter()
            .map(|l| l.split(" spi ").nth(1).unwrap()[..10].to_string())
            .collect();
        assert_eq!(
            spis,
            ["0x00000900", "0x00000300", "0x00000700", "0x00000100"]
        );
        // The policies in lookup order: the lowest priority value first.
        let p = r.policies();
        assert_eq!(p[0], "policy setdefault fwd block");
        for (i, l) in p[1..].iter().enumerate() {
            assert!(l.contains(&format!("src 198.18.{}.0/24", 4 - i)), "{l}");
        }
        let mut again = Running::default();
        let all: Vec<String> = r.states(true).iter().map(|l| l.to_string()).collect();
        again.apply(&all.join("\n")).unwrap();
        again.apply(&r.policies().join("\n")).unwrap();
        assert_eq!(again.states(true), r.states(true));
        assert_eq!(again.policies(), r.policies());
    }

    /// A batch sees its own earlier lines over the running tables: random
    /// batches of adds, updates, deletes and flushes of a few states and
    /// policies go through as a whole exactly when they go through line by
    /// line, with the same result.
    #[test]
    fn a_batch_is_its_lines_one_by_one() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut below = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let (mut whole, mut split) = (Running::default(), Running::default());
        let mut went = 0;
        for round in 0..400 {
            let lines: Vec<String> = (0..1 + below(5))
                .map(|_| {
                    let spi = 0x100 + below(4);
                    let pol = format!(
                        "policy {{}} src 198.18.{}.0/24 dst 198.19.0.0/16 dir {}",
                        below(3),
                        ["in", "out"][below(2) as usize]
                    );
                    match below(9) {
                        0 | 1 => sa(spi as u32),
                        2 => sa(spi as u32).replace("state add", "state update"),
                        3 => format!("state delete dst 198.18.0.2 spi {spi:#x}"),
                        4 => pol.replace("{}", "add") + " priority 7",
                        5 => pol.replace("{}", "update") + " action block",
                        6 => pol.replace("{}", "delete"),
                        7 => ["state flush", "policy flush"][below(2) as usize].into(),
                        _ => "policy setdefault in block".into(),
                    }
                })
                .collect();
            let ok = whole.apply(&lines.join("\n")).is_ok();
            let mut each = Running {
                sad: split.sad.clone(),
                spd: split.spd.clone(),
            };
            let each_ok = lines.iter().all(|l| each.apply(l).is_ok());
            assert_eq!(ok, each_ok, "round {round}: {lines:?}");
            if ok {
                split = each;
                went += 1;
            }
            assert_eq!(whole.states(true), split.states(true), "round {round}");
            assert_eq!(whole.policies(), split.policies(), "round {round}");
        }
        assert!(went > 100, "{went} batches went through");
    }

    #[test]
    fn the_result_must_stand_as_a_whole() {
        let mut r = Running::default();
        // Each line is fine alone; two together are not: the same SPI to
        // one dst twice.
        let two = format!("{}\n{}", sa(0x100), sa(0x100));
        assert!(r.apply(&two).is_err());
        assert_eq!(r.sad.len(), 0);
    }
}
