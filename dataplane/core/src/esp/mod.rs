//! ESP processing, grouped by direction: [`outbound`] encapsulates
//! (RFC 4303 §3.3), [`inbound`] decapsulates (RFC 4303 §3.4).

pub mod ecn;
pub mod inbound;
pub mod outbound;

/// The L3 facts the engine learned while checking a packet's headers: the
/// checked headers ([`crate::wire::ip::Repr`], read through `Deref`) and
/// whether the ESP at `upper_at` came inside UDP (RFC 3948; the UDP header
/// is the 8 octets before it).
#[derive(Debug, Clone, Copy)]
pub struct L3 {
    pub ip: crate::wire::ip::Repr,
    pub udp_encap: bool,
}

impl core::ops::Deref for L3 {
    type Target = crate::wire::ip::Repr;
    fn deref(&self) -> &Self::Target {
        &self.ip
    }
}
