//! The security policy database (RFC 4301 §4.4.1) with Linux XFRM semantics:
//! per direction, policies ordered by priority (lower value first, then the
//! order they were added); `action allow` with templates is PROTECT, without
//! templates BYPASS; `action block` is DISCARD. What no policy matches gets the
//! direction's default (`policy setdefault`, allow unless configured).

use super::sa::Mode;
use super::selector::{Flow, Selector};
use core::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Traffic to this host (checked after decapsulation, and on plaintext).
    In,
    /// Traffic this host sends or forwards: selects what to protect.
    Out,
    /// Traffic forwarded through this host (checked like `in`).
    Fwd,
}

impl Direction {
    pub const ALL: [Direction; 3] = [Direction::In, Direction::Out, Direction::Fwd];
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
            Direction::Fwd => "fwd",
        }
    }
    fn idx(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Block,
}

/// `level required` (default) or `level use` (protection optional inbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Required,
    Use,
}

/// One `tmpl …`: which SA protects the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Template {
    /// Tunnel endpoints; `None` (or omitted) means "any" / "the flow's own".
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub spi: Option<u32>,
    /// 0 = any.
    pub reqid: u32,
    pub mode: Mode,
    pub level: Level,
}

impl Template {
    /// Inbound: does an SA with these properties satisfy this template?
    pub fn accepts(&self, mode: Mode, reqid: u32, spi: u32, src: IpAddr, dst: IpAddr) -> bool {
        self.mode == mode
            && (self.reqid == 0 || self.reqid == reqid)
            && self.spi.is_none_or(|s| s == spi)
            && (mode == Mode::Transport
                || (self.src.is_none_or(|a| a == src) && self.dst.is_none_or(|a| a == dst)))
    }
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub sel: Selector,
    pub dir: Direction,
    pub priority: u32,
    pub action: Action,
    pub tmpls: Vec<Template>,
}

impl Policy {
    /// True for `allow` with at least one required template: PROTECT.
    pub fn requires_protection(&self) -> bool {
        self.action == Action::Allow && self.tmpls.iter().any(|t| t.level == Level::Required)
    }
}

/// Adding a policy whose selector and direction exist already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exists;

pub struct Spd {
    /// Per direction, sorted by priority, stable in insertion order.
    lists: [Vec<Policy>; 3],
    defaults: [Action; 3],
}

impl Default for Spd {
    fn default() -> Self {
        Spd {
            lists: [Vec::new(), Vec::new(), Vec::new()],
            defaults: [Action::Allow; 3],
        }
    }
}

impl Spd {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, p: Policy) -> Result<(), Exists> {
        let list = &mut self.lists[p.dir.idx()];
        if list.iter().any(|q| q.sel == p.sel) {
            return Err(Exists);
        }
        let at = list.partition_point(|q| q.priority <= p.priority);
        list.insert(at, p);
        Ok(())
    }

    pub fn set_default(&mut self, dir: Direction, a: Action) {
        self.defaults[dir.idx()] = a;
    }
    pub fn default_action(&self, dir: Direction) -> Action {
        self.defaults[dir.idx()]
    }

    pub fn policies(&self, dir: Direction) -> &[Policy] {
        &self.lists[dir.idx()]
    }
    pub fn len(&self) -> usize {
        self.lists.iter().map(Vec::len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first (highest-priority) policy of `dir` that matches `flow`.
    pub fn lookup(&self, dir: Direction, flow: &Flow) -> Option<&Policy> {
        self.lists[dir.idx()].iter().find(|p| p.sel.matches(flow))
    }
}
