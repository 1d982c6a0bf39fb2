//! ESP processing, grouped by direction: [`outbound`] encapsulates
//! (RFC 4303 §3.3), [`inbound`] decapsulates (RFC 4303 §3.4).

pub mod ecn;
pub mod inbound;
pub mod outbound;

/// The L3 facts the engine learned while checking a packet's headers.
#[derive(Debug, Clone, Copy)]
pub struct L3 {
    /// 4 or 6.
    pub version: u8,
    /// The upper-layer protocol after any IPv6 extension headers.
    pub proto: u8,
    /// Offset of the upper-layer header (ESP header, for ESP).
    pub upper_at: usize,
    /// Offset of the octet that names `proto` (IPv4: 9).
    pub upper_nh_at: usize,
    /// IPv6 transport mode: where ESP is inserted and the octet naming it.
    pub esp_at: usize,
    pub esp_nh_at: usize,
    /// Any fragment; `later_fragment`: not the first one.
    pub fragment: bool,
    pub later_fragment: bool,
    /// IPv4 TOS / IPv6 traffic class.
    pub tos: u8,
    /// IPv4 DF (IPv6: false).
    pub df: bool,
    /// The ESP at `upper_at` came inside UDP (RFC 3948); the UDP header is
    /// the 8 octets before it.
    pub udp_encap: bool,
}
