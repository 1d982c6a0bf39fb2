//! What the XDP program and the user-space loader agree on: map names,
//! sizes and the per-action counter indexes.
#![no_std]

/// Map: SPI (host order) → 1, for every SPI whose ESP should be steered.
pub const MAP_SPIS: &str = "ESP_SPIS";
/// Map: UDP port (host order) → 1, for RFC 3948 encapsulation ports.
pub const MAP_ENCAP_PORTS: &str = "ENCAP_PORTS";
/// XSKMAP: RX queue index → AF_XDP socket.
pub const MAP_XSKS: &str = "XSKS";
/// Per-CPU array of u64 counters indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// The program attached to the outside interface.
pub const PROG_OUTSIDE: &str = "espd_outside";

pub const MAX_SPIS: u32 = 65_536;
pub const MAX_ENCAP_PORTS: u32 = 16;
pub const MAX_QUEUES: u32 = 256;

/// What the outside program did with a frame. Everything but the two
/// `*Steered` kinds is `XDP_PASS`: the kernel keeps ARP, ND, IKE, ICMP to
/// the box and anything not ours.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Not IPv4/IPv6 and not ARP (LLDP, …): passed.
    NotIp = 0,
    /// ARP: passed.
    Arp = 1,
    /// IKE on an encapsulation port (zero non-ESP marker): passed.
    Ike = 2,
    /// NAT keepalive (one 0xFF octet): passed.
    Keepalive = 3,
    /// ESP with a known SPI: redirected to the queue's AF_XDP socket.
    EspSteered = 4,
    /// UDP-encapsulated ESP with a known SPI: redirected.
    NattSteered = 5,
    /// ESP (raw or in UDP) with an SPI that is not ours: passed.
    UnknownSpi = 6,
    /// Known SPI but no AF_XDP socket on this queue: passed.
    NoSocket = 7,
    /// IP fragments: passed (ESP is not reassembled; see docs).
    Fragment = 8,
    /// Other IP traffic (ICMP, TCP, other UDP, IPv6 extension headers): passed.
    Other = 9,
    /// Truncated headers: passed (the kernel decides).
    Malformed = 10,
}

impl Counter {
    pub const COUNT: u32 = 11;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::NotIp,
        Counter::Arp,
        Counter::Ike,
        Counter::Keepalive,
        Counter::EspSteered,
        Counter::NattSteered,
        Counter::UnknownSpi,
        Counter::NoSocket,
        Counter::Fragment,
        Counter::Other,
        Counter::Malformed,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Counter::NotIp => "not_ip",
            Counter::Arp => "arp",
            Counter::Ike => "ike",
            Counter::Keepalive => "keepalive",
            Counter::EspSteered => "esp_steered",
            Counter::NattSteered => "natt_steered",
            Counter::UnknownSpi => "unknown_spi",
            Counter::NoSocket => "no_socket",
            Counter::Fragment => "fragment",
            Counter::Other => "other",
            Counter::Malformed => "malformed",
        }
    }
}
