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
    // The stack the batch's key expansions used is wiped once, when this
    // goes (after the loop, or on an early return).
    let keys = KeyScope::new();
    for (i, raw) in batch.lines().enumerate() {
        if let Err(msg) = v.apply_line(raw, &mut ch, &mut ops, &keys) {
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
    Ok((ch, ops))
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
    fn has_state(&self, k: StateKey) -> bool {
        self.states
            .get(&k)
            .copied()
            .unwrap_or_else(|| !self.states_flushed && self.sad.lookup_in(k.0, k.1).is_some())
    }

    fn has_policy(&self, k: &PolicyKey) -> bool {
        self.policies
            .get(k)
            .copied()
            .unwrap_or_else(|| !self.policies_flushed && self.spd.get(k.0, &k.1).is_some())
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

    fn apply_line(
        &mut self,
        raw: &str,
        ch: &mut Changes,
        ops: &mut Vec<Op>,
        keys: &KeyScope,
    ) -> Result<(), String> {
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
                let key = (cfg.dst, cfg.spi);
                // The SA must be buildable (key lengths, algorithm limits):
                // say so on this line. Its keys are expanded here, once.
                let core = NewSa::in_scope(*cfg, keys).map_err(|e| e.to_string())?;
                match (verb, self.has_state(key)) {
                    ("add", true) => Err(format!(
                        "a state for dst {} spi 0x{:08x} exists already (use `state update`)",
                        key.0, key.1
                    )),
                    ("update", false) => Err(format!(
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
            ("state", "delete") => {
                let (dst, spi) = state_id(&w[2..])?;
                if !self.has_state((dst, spi)) {
                    return Err(format!("no state for dst {dst} spi 0x{spi:08x}"));
                }
                self.states.insert((dst, spi), false);
                ch.states_deleted += 1;
                ops.push(Op::DelSa(dst, spi));
                Ok(())
            }
            ("state", "flush") => {
                let all = self.state_keys();
                ch.states_deleted += all.len();
                ops.extend(all.into_iter().map(|(d, s)| Op::DelSa(d, s)));
                self.states.clear();
                self.states_flushed = true;
                Ok(())
            }
            ("policy", "add" | "update" | "delete") => {
                let Some(Item::Policy(p)) = parse_words(&add_words())? else {
                    return Err("expected a policy".into());
                };
                let key = (p.dir, p.sel);
                let at = self.has_policy(&key);
                let name = || {
                    format!(
                        "dir {} policy for src {} dst {}",
                        key.0.as_str(),
                        key.1.src,
                        key.1.dst
                    )
                };
                match (verb, at) {
                    ("add", true) => {
                        Err(format!("a {} exists already (use `policy update`)", name()))
                    }
                    ("update" | "delete", false) => Err(format!("no {}", name())),
                    ("delete", true) => {
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
            ("policy", "flush") => {
                let all = self.policy_keys();
                ch.policies_deleted += all.len();
                ops.extend(all.into_iter().map(|(d, s)| Op::DelPolicy(d, s)));
                self.policies.clear();
                self.policies_flushed = true;
                Ok(())
            }
            ("policy", "setdefault") => {
                if let Some(Item::Default(d)) = parse_line(raw)? {
                    ops.extend(d.into_iter().map(|(dir, a)| Op::Default(dir, a)));
                }
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
