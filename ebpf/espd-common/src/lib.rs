//! What the XDP program and the user-space loader agree on: map names,
//! sizes and the per-action counter indexes.
#![no_std]

/// Map: SPI (host order) → [`SPI_IN`] | [`SPI_OUT`]: the SPIs of our SAs.
/// ESP with an `SPI_IN` SPI addressed to one of this box's addresses is
/// steered; ESP with an `SPI_OUT` SPI not addressed to us is our own
/// outbound traffic come back, dropped (RFC 4301 §4.4.2).
pub const MAP_SPIS: &str = "ESP_SPIS";
/// An inbound SA has this SPI (its destination is ours).
pub const SPI_IN: u8 = 1;
/// An outbound SA has this SPI (we send with it).
pub const SPI_OUT: u8 = 2;
/// Map: UDP port (host order) → 1, for RFC 3948 encapsulation ports.
pub const MAP_ENCAP_PORTS: &str = "ENCAP_PORTS";
/// XSKMAP: RX queue index → AF_XDP socket.
pub const MAP_XSKS: &str = "XSKS";
/// Per-CPU array of u64 counters indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// The program attached to the outside interface.
pub const PROG_OUTSIDE: &str = "espd_outside";
/// The program attached to the inside interface.
pub const PROG_INSIDE: &str = "espd_inside";
/// The tc ingress program of a host-mode device (`espd run --host`): marks
/// every packet espd delivers to this host's sockets with [`HOST_MARK`].
pub const PROG_HOST_MARK: &str = "espd_host_mark";
/// The mark (one bit) on packets espd delivers through the host device:
/// the guard's inbound XFRM policies (`mark 0/HOST_MARK`) let them pass,
/// plaintext from the wire (unmarked) stays dropped, and the host route
/// rule (`not fwmark HOST_MARK`) sends them to the main table. espd's own
/// next-hop lookups and espd-ike's sockets carry it too (docs/operations.md).
pub const HOST_MARK: u32 = 0x0010_0000;
/// XSKMAP of the inside interface: RX queue index → AF_XDP socket.
pub const MAP_XSKS_INSIDE: &str = "XSKS_IN";
/// The program on espd's end of the host pair of a gateway that protects
/// its own traffic too (`espd run --inside IF --host`): the inside
/// program's rules with its own sockets.
pub const PROG_HOST: &str = "espd_host";
/// XSKMAP of that host pair: RX queue index → AF_XDP socket.
pub const MAP_XSKS_HOST: &str = "XSKS_HOST";
/// LPM tries (key: prefix length, address in network order) → [`SEL_STEER`]
/// or [`SEL_DROP`]: the destination prefixes of outbound PROTECT / DISCARD
/// policies, mirrored by the control side.
pub const MAP_SEL_V4: &str = "SEL_V4";
pub const MAP_SEL_V6: &str = "SEL_V6";
/// LPM tries for the outside program, like [`MAP_SEL_V4`]: the destination
/// prefixes of `in`/`fwd` PROTECT and DISCARD policies. Plaintext arriving
/// from the outside to such a prefix is steered to espd's inbound policy
/// check ([`SEL_STEER`]) or dropped here ([`SEL_DROP`]: nothing but PROTECT
/// and DISCARD policies of any source, protocol and port select it).
pub const MAP_IN_SEL_V4: &str = "IN_SEL_V4";
pub const MAP_IN_SEL_V6: &str = "IN_SEL_V6";
/// Hash maps of this box's addresses (network order) → 1: never steered.
pub const MAP_LOCAL_V4: &str = "LOCAL_V4";
pub const MAP_LOCAL_V6: &str = "LOCAL_V6";
/// Selector actions in the tries.
pub const SEL_STEER: u8 = 1;
pub const SEL_DROP: u8 = 2;
/// Prefixes per trie (each side, each family): a policy of its own per
/// tunnel at the carrier edge (LPM tries allocate as entries come).
pub const MAX_SELECTORS: u32 = 262_144;
pub const MAX_LOCAL: u32 = 1024;

/// SPIs (an inbound and an outbound SA per tunnel: 131 072 tunnels). The
/// hash map is preallocated: about 17 MiB of kernel memory.
pub const MAX_SPIS: u32 = 262_144;
pub const MAX_ENCAP_PORTS: u32 = 16;
pub const MAX_QUEUES: u32 = 256;

/// What the XDP programs did with a frame. Outside, the `*Steered` kinds go
/// to espd, `OwnEsp` and `UnprotectedInbound` are dropped, and the rest is
/// `XDP_PASS`: the kernel keeps ARP, ND, IKE, ICMP to the box and anything
/// not ours.
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
    /// ESP (raw or in UDP) to this box with an SPI that is not ours: passed.
    UnknownSpi = 6,
    /// Known SPI but no AF_XDP socket on this queue: passed.
    NoSocket = 7,
    /// IP fragments addressed to this box, or to no protected prefix: passed (the kernel reassembles what is its own).
    Fragment = 8,
    /// Other IP traffic to this box or to no protected prefix (ICMP, TCP, other UDP, transit ESP): passed.
    Other = 9,
    /// Truncated headers: passed (the kernel decides).
    Malformed = 10,
    /// Inside: selected by a PROTECT (or mixed) policy: redirected to espd.
    InsideSteered = 11,
    /// Inside: selected by a DISCARD policy that nothing else overlaps: dropped.
    InsideDiscard = 12,
    /// Inside: addressed to this box, multicast, broadcast or link-local: passed.
    InsideLocal = 13,
    /// Inside: no policy selects it: passed (the kernel forwards bypass traffic).
    InsidePass = 14,
    /// Inside: selected but no AF_XDP socket on this queue: passed.
    InsideNoSocket = 15,
    /// Outside: ESP of one of our outbound SAs not addressed to us (reflected): dropped.
    OwnEsp = 16,
    /// Outside: plaintext to a prefix only PROTECT/DISCARD in/fwd policies select: dropped.
    UnprotectedInbound = 17,
    /// Outside: plaintext to a prefix an in/fwd PROTECT/DISCARD policy selects: to espd's policy check.
    PlainSteered = 18,
    /// 802.1Q / 802.1ad tagged frames: passed (never steered; run espd on the
    /// VLAN's own interface, see docs/operations.md).
    VlanTagged = 19,
    /// Outside: a fragment of raw ESP addressed to this box: to espd, which
    /// reassembles before ESP (RFC 4303 §3.4.1).
    FragSteered = 20,
}

impl Counter {
    pub const COUNT: u32 = 21;
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
        Counter::InsideSteered,
        Counter::InsideDiscard,
        Counter::InsideLocal,
        Counter::InsidePass,
        Counter::InsideNoSocket,
        Counter::OwnEsp,
        Counter::UnprotectedInbound,
        Counter::PlainSteered,
        Counter::VlanTagged,
        Counter::FragSteered,
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
            Counter::InsideSteered => "inside_steered",
            Counter::InsideDiscard => "inside_discard",
            Counter::InsideLocal => "inside_local",
            Counter::InsidePass => "inside_pass",
            Counter::InsideNoSocket => "inside_no_socket",
            Counter::OwnEsp => "own_esp",
            Counter::UnprotectedInbound => "unprotected_inbound",
            Counter::PlainSteered => "plain_steered",
            Counter::VlanTagged => "vlan_tagged",
            Counter::FragSteered => "frag_steered",
        }
    }
}
