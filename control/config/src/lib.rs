//! espd's configuration: lines of `ip xfrm state add …` and `ip xfrm policy
//! add …` arguments (the leading `ip xfrm` optional), `#` comments and blank
//! lines, with Linux XFRM's meaning (`man ip-xfrm`). Every accepted word is in
//! `docs/config.md`; any other word is an error.
//!
//! Loading is all-or-nothing: every line is checked, every error is reported
//! as `file:line: what was expected`, and nothing is installed if any failed.
//! Errors never contain key material.
#![forbid(unsafe_code)]

pub mod db;
mod lex;
pub mod line;
mod parse;

pub use parse::{parse_line, Item};

use espd_core::state::{Action, Direction, NewSa, Policy, SaConfig, Sad, Spd};
use std::fmt;
use std::path::Path;

/// One configuration error, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.msg)
    }
}

/// All the errors of one load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A checked configuration, ready to become an engine.
#[derive(Clone)]
pub struct Config {
    pub sad: Sad,
    pub spd: Spd,
}

impl Config {
    /// The shared tables for this configuration, `extra` being the host's
    /// own addresses (see [`espd_core::state::Tables`]).
    pub fn tables(&self, extra: &[std::net::IpAddr]) -> espd_core::state::Tables {
        espd_core::state::Tables::new(self.sad.clone(), self.spd.clone(), extra)
    }

    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let name = path.display().to_string();
        // The file holds keys: wipe our copy of it when done.
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: name.clone(),
                line: 0,
                msg: format!("cannot read: {e}"),
            }])
        })?);
        Self::parse(&name, &text)
    }

    /// Checks text as if read from `file`.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigErrors> {
        let mut errs = Vec::new();
        let mut sad = Sad::new();
        let mut spd = Spd::new();
        let err = |line: usize, msg: String| ConfigError {
            file: file.to_string(),
            line,
            msg,
        };
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            match parse_line(raw) {
                Ok(None) => {}
                Ok(Some(Item::State(cfg))) => {
                    if let Err(m) = install_state(&mut sad, *cfg) {
                        errs.push(err(line, m));
                    }
                }
                Ok(Some(Item::Policy(p))) => {
                    if let Err(m) = install_policy(&mut spd, p) {
                        errs.push(err(line, m));
                    }
                }
                Ok(Some(Item::Default(d))) => {
                    for (dir, a) in d {
                        spd.set_default(dir, a);
                    }
                }
                Err(m) => errs.push(err(line, m)),
            }
        }
        if errs.is_empty() {
            Ok(Config { sad, spd })
        } else {
            Err(ConfigErrors(errs))
        }
    }
}

fn install_state(sad: &mut Sad, cfg: SaConfig) -> Result<(), String> {
    let (dst, spi) = (cfg.dst, cfg.spi);
    let sa = NewSa::new(cfg).map_err(|e| e.to_string())?;
    sad.insert(sa).map_err(|_| {
        format!("a state for dst {dst} spi 0x{spi:08x} exists already (states are keyed by dst and SPI)")
    })?;
    Ok(())
}

fn install_policy(spd: &mut Spd, p: Policy) -> Result<(), String> {
    let (dir, sel) = (p.dir, p.sel);
    spd.insert(p).map_err(|_| {
        format!(
            "a dir {} policy for src {} dst {} exists already",
            dir.as_str(),
            sel.src,
            sel.dst
        )
    })
}

/// Human summary of a checked config, for `espctl check` (never keys).
pub fn summary(c: &Config) -> String {
    let mut s = format!("{} states, {} policies", c.sad.len(), c.spd.len());
    for d in Direction::ALL {
        if c.spd.default_action(d) == Action::Block {
            s.push_str(&format!(", default {} block", d.as_str()));
        }
    }
    s
}

#[cfg(test)]
mod tests;
