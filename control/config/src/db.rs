//! The running configuration as `espctl` changes it: the `add` lines of the
//! states and policies that exist now, keyed as the SAD and SPD key them
//! (a state by destination and SPI, a policy by direction and selector),
//! plus the `setdefault` lines. Changes come as `ip xfrm` words —
//! `state add|update|delete|flush`, `policy add|update|delete|flush|setdefault`
//! — in batches applied all or nothing: every line is checked, then the
//! whole result is parsed as one configuration; any error changes nothing.
//! The lines hold keys: they are zeroized when dropped.

use crate::parse::{parse_line, parse_words, Item};
use crate::{lex, Config, ConfigError, ConfigErrors};
use espd_core::state::{Action, CMap as PMap, Direction, Policy, SaCore, Selector};
use std::net::IpAddr;
use std::sync::Arc;
use zeroize::Zeroizing;

/// The lines are persistent maps: a copy is O(1), so a batch is applied to
/// a copy and the copy kept only if every line was good — all or nothing
/// at a cost that depends on the batch, not on the number of states.
/// A state's line and its insertion order.
type StateLine = (u64, Arc<Zeroizing<String>>);

#[derive(Default, Clone)]
pub struct Db {
    states: PMap<(IpAddr, u32), StateLine>,
    policies: PMap<(Direction, Selector), (u64, Arc<String>)>,
    defaults: Vec<String>,
    /// Insertion order of the lines (listings keep it).
    next: u64,
}

/// One change a batch makes, in batch order, checked: what the running
/// tables apply ([`espd_core::state::Tables`]). An SA comes with its keys
/// expanded (once, here).
#[derive(Debug)]
pub enum Op {
    AddSa(Box<SaCore>),
    UpdateSa(Box<SaCore>),
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

impl Db {
    /// The configuration these lines make.
    pub fn config(&self) -> Result<Config, ConfigErrors> {
        Config::parse("running", &self.text())
    }

    fn state_list(&self) -> Vec<&Arc<Zeroizing<String>>> {
        let mut v: Vec<_> = self.states.values().collect();
        v.sort_by_key(|(o, _)| *o);
        v.into_iter().map(|(_, l)| l).collect()
    }

    fn policy_list(&self) -> Vec<&Arc<String>> {
        let mut v: Vec<_> = self.policies.values().collect();
        v.sort_by_key(|(o, _)| *o);
        v.into_iter().map(|(_, l)| l).collect()
    }

    /// The lines, as a configuration file would hold them.
    pub fn text(&self) -> Zeroizing<String> {
        let mut t = Zeroizing::new(String::new());
        for l in self.state_list() {
            t.push_str(l);
            t.push('\n');
        }
        for l in &self.defaults {
            t.push_str(l);
            t.push('\n');
        }
        for l in self.policy_list() {
            t.push_str(l);
            t.push('\n');
        }
        t
    }

    /// The states as `state add` lines; key words replaced by `<redacted>`
    /// unless `keys` (the `ip xfrm state list nokeys` spirit, by default).
    pub fn state_lines(&self, keys: bool) -> Vec<Zeroizing<String>> {
        self.state_list()
            .into_iter()
            .map(|l| {
                if keys {
                    return Zeroizing::new(l.to_string());
                }
                let Ok(w) = lex::words(l) else {
                    return Zeroizing::new("<unprintable>".into());
                };
                let mut out = Vec::with_capacity(w.len());
                let mut i = 0;
                while i < w.len() {
                    let x: &str = &w[i];
                    out.push(quote(x));
                    // `aead NAME KEY ICV`, `enc NAME KEY`, `auth(-trunc) NAME KEY …`
                    if matches!(x, "aead" | "enc" | "auth" | "auth-trunc" | "comp")
                        && i + 2 < w.len()
                    {
                        out.push(quote(&w[i + 1]));
                        out.push("<redacted>".into());
                        i += 3;
                        continue;
                    }
                    i += 1;
                }
                Zeroizing::new(out.join(" "))
            })
            .collect()
    }

    /// The policies and defaults as lines.
    pub fn policy_lines(&self) -> Vec<String> {
        self.defaults
            .iter()
            .cloned()
            .chain(self.policy_list().into_iter().map(|l| l.to_string()))
            .collect()
    }

    /// The (destination, SPI) of every state.
    pub fn state_keys(&self) -> Vec<(IpAddr, u32)> {
        self.states.keys().copied().collect()
    }

    pub fn states(&self) -> usize {
        self.states.len()
    }

    pub fn policies(&self) -> usize {
        self.policies.len()
    }

    /// Applies every line of `batch` (named `file` in errors) or none; the
    /// changes it makes, in order.
    pub fn apply(&mut self, file: &str, batch: &str) -> Result<(Changes, Vec<Op>), ConfigErrors> {
        let mut next = self.clone();
        let mut ch = Changes::default();
        let mut ops = Vec::new();
        let mut errs = Vec::new();
        for (i, raw) in batch.lines().enumerate() {
            if let Err(msg) = next.apply_line(raw, &mut ch, &mut ops) {
                errs.push(ConfigError {
                    file: file.to_string(),
                    line: i + 1,
                    msg,
                });
            }
        }
        if !errs.is_empty() {
            return Err(ConfigErrors(errs));
        }
        *self = next;
        Ok((ch, ops))
    }

    fn apply_line(&mut self, raw: &str, ch: &mut Changes, ops: &mut Vec<Op>) -> Result<(), String> {
        let words = lex::words(raw)?;
        let mut w: Vec<&str> = words.strs();
        if w.first() == Some(&"ip") {
            if w.get(1) != Some(&"xfrm") {
                return Err("expected `xfrm` after `ip`".into());
            }
            w.drain(..2);
        }
        let (obj, verb) = match (w.first(), w.get(1)) {
            (None, _) => return Ok(()),
            (Some(o), Some(v)) => (*o, *v),
            (Some(o), None) => return Err(format!("expected a command after `{o}`")),
        };
        // The `add` form of this line, for the parser.
        let as_add = || {
            // At its final capacity (a word grows by at most two quotes and
            // a space): no reallocation leaves a copy of a key behind.
            let mut l = String::with_capacity(raw.len() + 3 * w.len() + 8);
            l.push_str(obj);
            l.push_str(" add");
            for x in &w[2..] {
                l.push(' ');
                push_word(&mut l, x);
            }
            Zeroizing::new(l)
        };
        // The same as words, for the parser.
        let add_words = || {
            let mut v = Vec::with_capacity(w.len());
            v.extend([obj, "add"]);
            v.extend_from_slice(&w[2..]);
            v
        };
        match (obj, verb) {
            ("state", "add" | "update") => {
                let line = as_add();
                let Some(Item::State(cfg)) = parse_words(&add_words())? else {
                    return Err("expected a state".into());
                };
                let key = (cfg.dst, cfg.spi);
                // The SA must be buildable (key lengths, algorithm limits):
                // say so on this line. Its keys are expanded here, once.
                let core = Box::new(SaCore::new(*cfg).map_err(|e| e.to_string())?);
                let at = self.states.get(&key).map(|(o, _)| *o);
                match (verb, at) {
                    ("add", Some(_)) => Err(format!(
                        "a state for dst {} spi 0x{:08x} exists already (use `state update`)",
                        key.0, key.1
                    )),
                    ("update", None) => Err(format!(
                        "no state for dst {} spi 0x{:08x} to update",
                        key.0, key.1
                    )),
                    (_, Some(o)) => {
                        self.states.insert(key, (o, exact(line)));
                        ch.states_updated += 1;
                        ops.push(Op::UpdateSa(core));
                        Ok(())
                    }
                    (_, None) => {
                        self.next += 1;
                        self.states.insert(key, (self.next, exact(line)));
                        ch.states_added += 1;
                        ops.push(Op::AddSa(core));
                        Ok(())
                    }
                }
            }
            ("state", "delete") => {
                let (dst, spi) = state_id(&w[2..])?;
                if self.states.remove(&(dst, spi)).is_none() {
                    return Err(format!("no state for dst {dst} spi 0x{spi:08x}"));
                }
                ch.states_deleted += 1;
                ops.push(Op::DelSa(dst, spi));
                Ok(())
            }
            ("state", "flush") => {
                ch.states_deleted += self.states.len();
                ops.extend(self.states.keys().map(|(d, s)| Op::DelSa(*d, *s)));
                self.states = PMap::default();
                Ok(())
            }
            ("policy", "add" | "update" | "delete") => {
                let line = as_add();
                let Some(Item::Policy(p)) = parse_words(&add_words())? else {
                    return Err("expected a policy".into());
                };
                let key = (p.dir, p.sel);
                let at = self.policies.get(&key).map(|(o, _)| *o);
                let name = || {
                    format!(
                        "dir {} policy for src {} dst {}",
                        key.0.as_str(),
                        key.1.src,
                        key.1.dst
                    )
                };
                match (verb, at) {
                    ("add", Some(_)) => {
                        Err(format!("a {} exists already (use `policy update`)", name()))
                    }
                    ("update" | "delete", None) => Err(format!("no {}", name())),
                    ("delete", Some(_)) => {
                        self.policies.remove(&key);
                        ch.policies_deleted += 1;
                        ops.push(Op::DelPolicy(key.0, key.1));
                        Ok(())
                    }
                    (_, Some(o)) => {
                        self.policies.insert(key, (o, Arc::new(line.to_string())));
                        ch.policies_updated += 1;
                        ops.push(Op::UpdatePolicy(p));
                        Ok(())
                    }
                    (_, None) => {
                        self.next += 1;
                        self.policies
                            .insert(key, (self.next, Arc::new(line.to_string())));
                        ch.policies_added += 1;
                        ops.push(Op::AddPolicy(p));
                        Ok(())
                    }
                }
            }
            ("policy", "flush") => {
                ch.policies_deleted += self.policies.len();
                ops.extend(self.policies.keys().map(|(d, s)| Op::DelPolicy(*d, *s)));
                self.policies = PMap::default();
                Ok(())
            }
            ("policy", "setdefault") => {
                if let Some(Item::Default(d)) = parse_line(raw)? {
                    ops.extend(d.into_iter().map(|(dir, a)| Op::Default(dir, a)));
                }
                self.defaults.push(raw.trim().to_string());
                Ok(())
            }
            ("state", v) => Err(format!(
                "expected add, update, delete or flush after `state`, found `{v}`"
            )),
            ("policy", v) => Err(format!(
                "expected add, update, delete, flush or setdefault after `policy`, found `{v}`"
            )),
            (o, _) => Err(format!("expected `state` or `policy`, found `{o}`")),
        }
    }
}

/// A line kept at its own length (a grown buffer is half empty), through a
/// copy: shrinking in place would free the old buffer, key and all,
/// without wiping it.
fn exact(line: Zeroizing<String>) -> Arc<Zeroizing<String>> {
    Arc::new(Zeroizing::new(String::from(line.as_str())))
}

fn quote(x: &str) -> String {
    let mut s = String::new();
    push_word(&mut s, x);
    s
}

/// `x` as a word [`lex::words`] reads back as `x` (the kept lines are
/// parsed again at a restart and applied again from listings).
fn push_word(l: &mut String, x: &str) {
    let q = if x.contains('\'') {
        Some('"')
    } else if x.is_empty() || x.contains(|c: char| c.is_whitespace() || "()#\"".contains(c)) {
        Some('\'')
    } else {
        None
    };
    match q {
        Some(q) => {
            l.push(q);
            l.push_str(x);
            l.push(q);
        }
        None => l.push_str(x),
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

    #[test]
    fn batches_apply_whole_or_not_at_all() {
        let mut db = Db::default();
        let pol = "policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel";
        let (ch, _) = db.apply("b", &format!("{}\n{pol}\n", sa(0x100))).unwrap();
        assert_eq!((ch.states_added, ch.policies_added), (1, 1));
        // A bad third line: nothing of the batch happens, and it says where.
        let e = db
            .apply(
                "b",
                &format!(
                    "{}\nstate delete dst 198.18.0.2 spi 0x100\nstate add bogus\n",
                    sa(0x200)
                ),
            )
            .unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!((e.0[0].file.as_str(), e.0[0].line), ("b", 3));
        assert_eq!((db.states(), db.policies()), (1, 1));
        // Duplicates and missing ones are errors.
        assert!(db.apply("b", &sa(0x100)).is_err());
        assert!(db
            .apply("b", "state delete dst 198.18.0.2 spi 0x999")
            .is_err());
        assert!(db.apply("b", pol).is_err(), "the same policy twice");
        // update replaces, delete removes, flush empties.
        let (ch, _) = db
            .apply("b", &sa(0x100).replace("state add", "state update"))
            .unwrap();
        assert_eq!(ch.states_updated, 1);
        let (ch, _) = db
            .apply(
                "b",
                "policy delete src 198.18.1.0/24 dst 198.18.2.0/24 dir out\nstate flush",
            )
            .unwrap();
        assert_eq!((ch.policies_deleted, ch.states_deleted), (1, 1));
        assert_eq!((db.states(), db.policies()), (0, 0));
        assert!(db.config().unwrap().sad.is_empty());
    }

    #[test]
    fn listing_hides_keys_unless_asked() {
        let mut db = Db::default();
        db.apply("b", &sa(0x100)).unwrap();
        let l = db.state_lines(false);
        assert!(!l[0].contains("0101010101"), "{}", *l[0]);
        assert!(
            l[0].contains("'rfc4106(gcm(aes))' <redacted> 128"),
            "{}",
            *l[0]
        );
        assert!(db.state_lines(true)[0].contains(K));
        // What `list` prints can be applied back (with keys).
        let mut again = Db::default();
        again.apply("b", &db.state_lines(true)[0]).unwrap();
        assert_eq!(again.states(), 1);
    }

    #[test]
    fn kept_lines_read_back_as_the_words_given() {
        for x in [
            "plain",
            "rfc4106(gcm(aes))",
            "a b",
            "a#b",
            "it's",
            "say \"x\"",
            "",
        ] {
            assert_eq!(lex::words(&quote(x)).unwrap().strs(), vec![x], "{x:?}");
        }
    }

    #[test]
    fn the_result_must_stand_as_a_whole() {
        let mut db = Db::default();
        // Each line is fine alone; with `level required`, a template needs no SA
        // at parse time, so use a real conflict: the same SPI to one dst twice.
        let two = format!("{}\n{}", sa(0x100), sa(0x100));
        assert!(db.apply("b", &two).is_err());
        assert_eq!(db.states(), 0);
    }
}
