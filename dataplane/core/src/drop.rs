//! Why a packet was dropped: one list defines the enum, its name (what
//! `espd`/`espctl` print and what `--stats-json` keys on) and its description,
//! as VPP's `foreach_esp_decrypt_error` does. Every drop bumps a counter.

macro_rules! drop_reasons {
    ($( $(#[$m:meta])* $name:ident => $desc:literal, )*) => {
        /// A named reason for dropping a packet (RFC terms where there are some).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum DropReason { $( $(#[$m])* $name, )* }

        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name),*];
            pub const COUNT: usize = Self::ALL.len();
            /// The stable name, e.g. `"IcvMismatch"`.
            pub fn name(self) -> &'static str {
                match self { $(DropReason::$name => stringify!($name),)* }
            }
            /// One line for operators.
            pub fn describe(self) -> &'static str {
                match self { $(DropReason::$name => $desc,)* }
            }
        }
    };
}

drop_reasons! {
    /// Shorter than its headers or than the ESP minimum.
    Runt => "packet shorter than its headers",
    /// A header field is invalid (IP version, lengths, extension-header chain, misaligned ESP payload).
    BadHeader => "malformed header",
    /// The IPv4 header checksum is wrong.
    BadChecksum => "bad IPv4 header checksum",
    /// An IP fragment that cannot be processed here: an ESP fragment the caller did not reassemble first (RFC 4303 §3.4.1: the gateway reassembles raw ESP; `espd pcap` does not), or a fragment selected for transport mode (RFC 4301 §7).
    Fragment => "IP fragment (not reassembled)",
    /// ESP to one of our addresses with an SPI no SA has (RFC 4303 §3.4.2).
    NoSa => "no SA for destination and SPI",
    /// ESP (raw or in UDP) of one of our own outbound SAs, not addressed to us: a reflected or looped copy of what we sent (RFC 4301 §4.4.2: inbound SAs are looked up for our addresses only). No crypto is spent on it.
    OwnEsp => "our own outbound ESP came back (reflected)",
    /// Outer reassembly: a fragment overlapping another of its datagram, or past the end its last fragment declared; the whole datagram is discarded (RFC 5722).
    FragOverlap => "overlapping fragments (datagram discarded)",
    /// Outer reassembly: an exact copy of a fragment already held (dropped alone).
    FragDuplicate => "duplicate fragment",
    /// Outer reassembly: the datagram did not complete in time (its fragments are dropped).
    FragTimeout => "fragments did not complete in time",
    /// Outer reassembly: the table is full (entries, bytes, or datagrams from this source).
    FragTableFull => "reassembly table full",
    /// Outer reassembly: the datagram would exceed what espd reassembles.
    FragTooBig => "reassembled datagram too big",
    /// ESP with SPI 0, which is reserved (RFC 4303 §2.1).
    SpiZero => "SPI 0 is reserved",
    /// A sequence number already received, or 0 (RFC 4303 §3.4.3).
    Replay => "replayed sequence number",
    /// A sequence number left of the anti-replay window (RFC 4303 §3.4.3).
    TooOld => "sequence number left of the replay window",
    /// The integrity check failed (RFC 4303 §3.4.4).
    IcvMismatch => "ICV mismatch",
    /// Decrypted padding is not 1, 2, 3, … or the pad length overruns the payload (RFC 4303 §2.4).
    BadPadding => "bad ESP padding or pad length",
    /// The decrypted packet is not what the SA's mode says (tunnel mode carries IPv4 or IPv6), or the inner header is malformed.
    BadInner => "malformed or unexpected inner packet",
    /// RFC 6040 §4.2: a Not-ECT inner packet arrived with CE in the outer header.
    EcnDrop => "CE on outer header of a Not-ECT inner packet",
    /// The outbound sequence number would cycle: the SA is exhausted (RFC 4303 §3.3.3).
    SeqCycled => "outbound sequence number space exhausted",
    /// A PROTECT policy matched but no usable SA exists for its template.
    NoOutSa => "no outbound SA for the policy template",
    /// Decapsulated traffic does not match the SA's selector or an in/fwd policy naming the SA (RFC 4301 §5.2 step 4).
    PolicyMismatch => "traffic does not match the policy for its SA",
    /// Plaintext arrived that an in/fwd PROTECT policy says must arrive protected (RFC 4301 §5.2 step 3a, §4.4.1), or an unprotected ICMP error about a protected flow (§6.1.1).
    UnprotectedInbound => "unprotected packet where policy demands IPsec",
    /// No policy matched and the direction's default is block; or tunnel-mode traffic came through an SA no policy covers.
    NoPolicy => "no matching policy",
    /// A DISCARD policy (`action block`) matched.
    Discard => "discarded by policy",
    /// ESP arrived UDP-encapsulated for an SA without `encap`, or raw for one with it (RFC 3948).
    EncapMismatch => "UDP encapsulation does not match the SA",
    /// Too big for the path MTU after encapsulation, and it may not be fragmented (IPv4 DF, or IPv6): an ICMP error goes back when the rate limit allows (RFC 4301 §8.2.1).
    PacketTooBig => "too big for the path MTU after encapsulation (DF or IPv6)",
    /// The packet would not fit its buffer after encapsulation.
    TooBig => "packet too big for the buffer after encapsulation",
    /// The SA reached its hard lifetime (time, bytes, packets) or the end of its sequence space (RFC 4301 §4.4.2.1): it carries nothing more and the gateway deletes it.
    SaExpired => "SA hard lifetime reached",
    /// Router mode: the TTL / hop limit would reach 0 when forwarded (RFC 1812 §5.3.1, RFC 8200 §3); an ICMP time exceeded goes back for plaintext from the inside.
    TtlExceeded => "TTL or hop limit exceeded in forwarding",
    /// Gateway: a packet of an SA another worker owns that cannot be handed to it: an inner SA of a bundle, or another worker claimed the SA at the same first packet (see docs/architecture.md).
    ForeignQueue => "SA owned by another worker, and the packet could not be handed over",
    /// Gateway: the kernel has no route for the destination, or it leads out of an interface espd does not run on.
    NoRoute => "no route through espd's interfaces",
    /// Gateway: the next hop's link-layer address is not resolved yet (the kernel was asked to resolve it).
    NoNeighbour => "next hop not resolved yet",
    /// Gateway: a decapsulated packet is addressed to this host; a gateway without `--host` forwards only (see docs/operations.md).
    LocalDelivery => "decapsulated packet for this host (not delivered)",
    /// Gateway: no free UMEM frame for a frame espd made itself (an inner fragment).
    TxRingFull => "no free frame for a frame espd made",
    /// Gateway: the kernel refused a frame sent through the AF_PACKET socket of a side the worker has no AF_XDP socket on (uneven queue counts).
    TxFailed => "transmit through AF_PACKET refused",
    /// Gateway (XDP): a frame to steer arrived on a queue with no AF_XDP socket and went to the kernel, which drops protected traffic (the guard) and forwards the rest.
    NoSocket => "no AF_XDP socket on the receiving queue",
    /// Gateway (kernel): a steered frame found the AF_XDP RX ring full (the socket's `rx_ring_full`).
    XskRingFull => "AF_XDP RX ring full (kernel)",
    /// Gateway (kernel): a steered frame was dropped for another reason, mostly no free frame in the fill ring (the socket's `rx_dropped`).
    XskDropped => "AF_XDP receive dropped by the kernel (no fill-ring frame)",
    /// Gateway: the SA's owner is behind — its hand-over queue is full, or it has no free frame for a handed-over packet (an overload drop, like a full ring).
    HandoffFull => "owner worker's hand-over queue full",
    /// Gateway: a packet of another worker's SA larger than a hand-over slot.
    HandoffTooBig => "packet too big to hand over to the owner worker",
    /// Host mode (`espd run --host`): a decapsulated or bypassed packet from the outside not addressed to this host; a host delivers, it does not forward.
    HostForward => "packet from the outside for another host (host mode does not forward)",
}

/// One counter per [`DropReason`], indexed by it (`c[r as usize]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropCounts(pub [u64; DropReason::COUNT]);

impl Default for DropCounts {
    fn default() -> Self {
        DropCounts([0; DropReason::COUNT])
    }
}

impl core::ops::Deref for DropCounts {
    type Target = [u64; DropReason::COUNT];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl core::ops::DerefMut for DropCounts {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a DropCounts {
    type Item = &'a u64;
    type IntoIter = core::slice::Iter<'a, u64>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_indexed() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(!r.describe().is_empty());
        }
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
        assert_eq!(DropReason::IcvMismatch.name(), "IcvMismatch");
    }
}
