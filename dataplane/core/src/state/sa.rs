//! A security association: its configuration (what `ip xfrm state add` says)
//! and its runtime state (transform, counters, replay window).

use super::replay::ReplayWindow;
use super::selector::Selector;
use crate::crypto::{gcm::AesGcm, KeyLenError, Transform};
use crate::drop::DropReason;
use core::net::IpAddr;
use zeroize::Zeroizing;

/// Index of an SA in the SAD.
pub type SaId = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Transport,
    Tunnel,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Transport => "transport",
            Mode::Tunnel => "tunnel",
        }
    }
}

/// The AEAD named on an `aead` line. Only the algorithm name, ICV length and
/// key are kept; the key is zeroized when this is dropped.
#[derive(Clone)]
pub struct Aead {
    /// The Linux crypto API name, e.g. `rfc4106(gcm(aes))`.
    pub name: String,
    pub key: Zeroizing<Vec<u8>>,
    pub icv_bits: u32,
}

impl core::fmt::Debug for Aead {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} <{}-octet key> {}",
            self.name,
            self.key.len(),
            self.icv_bits
        )
    }
}

/// Flags from `flag …` (XFRM state flags) that change packet processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SaFlags {
    /// RFC 4303 ESN: 64-bit sequence numbers, 32 low bits on the wire.
    pub esn: bool,
    /// No ECN propagation (RFC 6040 compatibility mode instead of normal mode).
    pub noecn: bool,
    /// On decap, copy the outer DSCP into the inner header.
    pub decap_dscp: bool,
    /// Never set DF on the outer IPv4 header.
    pub nopmtudisc: bool,
}

/// What an `ip xfrm state add` line configures.
#[derive(Debug, Clone)]
pub struct SaConfig {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub spi: u32,
    pub reqid: u32,
    pub mode: Mode,
    pub replay_window: u32,
    pub flags: SaFlags,
    /// Inbound: the highest sequence number already received (`replay-seq`, `-hi`).
    pub replay_seq: u64,
    /// Outbound: the last sequence number sent (`replay-oseq`, `-hi`); the next is +1.
    pub replay_oseq: u64,
    pub aead: Aead,
    /// The SA's own selector (`sel …`): decapsulated traffic must match it
    /// and only matching traffic is sent through it.
    pub sel: Option<Selector>,
    /// XORed into the 64-bit sequence number to make the explicit IV, as
    /// Linux's `seqiv` does: unique per packet (a bijection of a counter that
    /// never cycles) without exposing the counter. The loader picks it at random.
    pub iv_mask: u64,
}

impl SaConfig {
    /// Expands the keys: fails if the algorithm or key does not fit.
    pub fn transform(&self) -> Result<Transform, SaError> {
        if self.src.is_ipv4() != self.dst.is_ipv4() {
            return Err(SaError::Family);
        }
        match self.aead.name.as_str() {
            "rfc4106(gcm(aes))" => {
                let icv = self.aead.icv_bits as usize / 8;
                if !matches!(self.aead.icv_bits, 64 | 96 | 128) {
                    return Err(SaError::IcvLength);
                }
                AesGcm::new(&self.aead.key, icv)
                    .map(Transform::Gcm)
                    .map_err(|KeyLenError| SaError::KeyLength)
            }
            _ => Err(SaError::Algorithm),
        }
    }
}

/// Why an SA cannot be installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaError {
    Algorithm,
    KeyLength,
    IcvLength,
    /// `src` and `dst` of different address families.
    Family,
}

impl core::fmt::Display for SaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            SaError::Algorithm => "unsupported AEAD: expected 'rfc4106(gcm(aes))'",
            SaError::KeyLength => {
                "key must be 20 or 36 octets for rfc4106(gcm(aes)): a 16- or 32-octet AES key followed by a 4-octet salt"
            }
            SaError::IcvLength => "ICV length must be 64, 96 or 128 bits",
            SaError::Family => "src and dst must be of one address family",
        })
    }
}

/// Per-SA counters. Drops here are the ones attributable to this SA.
#[derive(Debug, Clone, Default)]
pub struct SaCounters {
    pub packets: u64,
    pub bytes: u64,
    pub drops: [u64; DropReason::COUNT],
}

/// The runtime SA: everything the hot path touches.
pub struct Sa {
    pub cfg: SaConfig,
    pub transform: Transform,
    /// Last outbound sequence number used (the next one is `oseq + 1`).
    pub oseq: u64,
    pub replay: ReplayWindow,
    /// Set when the outbound sequence space is exhausted: the SA sends nothing more.
    pub exhausted: bool,
    /// IPv4 identification for outer headers (tunnel mode).
    pub ip_id: u16,
    pub counters: SaCounters,
}

impl Sa {
    pub fn new(cfg: SaConfig) -> Result<Self, SaError> {
        let transform = cfg.transform()?;
        let replay = ReplayWindow::new(cfg.replay_window, cfg.replay_seq);
        // A per-SA start for the IPv4 ID so two tunnels do not march in step.
        let ip_id = (cfg.spi ^ (cfg.spi >> 16)) as u16;
        Ok(Sa {
            oseq: cfg.replay_oseq,
            transform,
            replay,
            exhausted: false,
            ip_id,
            counters: SaCounters::default(),
            cfg,
        })
    }

    /// The highest outbound sequence number this SA may use:
    /// RFC 4303 §3.3.3, the counter must not cycle.
    pub fn seq_limit(&self) -> u64 {
        if self.cfg.flags.esn {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        }
    }

    pub fn count_drop(&mut self, r: DropReason) {
        self.counters.drops[r as usize] += 1;
    }
}
