//! espd's XDP programs.
//!
//! Outside interface (`espd_outside`): ESP (IP protocol 50) and RFC 3948
//! UDP-encapsulated ESP with a non-zero SPI that espd knows goes to the AF_XDP
//! socket of the receiving queue; IKE (the zero non-ESP marker), NAT
//! keepalives, ARP, ICMP, fragments and everything else is `XDP_PASS`, so the
//! kernel keeps what is not ours.
//!
//! Inside interface (`espd_inside`): IP traffic whose destination falls in a
//! prefix of an outbound PROTECT policy goes to espd's AF_XDP socket (the
//! engine then makes the exact RFC 4301 SPD decision); a DISCARD prefix that
//! no other policy overlaps is dropped here; traffic to this box, multicast,
//! broadcast, link-local and everything no policy selects is `XDP_PASS`, and
//! the kernel forwards bypass traffic as usual.
//!
//! Every frame bumps one per-action counter.
#![no_std]
#![no_main]

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{HashMap, LpmTrie, PerCpuArray, XskMap};
use aya_ebpf::programs::XdpContext;
use espd_common::{
    Counter, MAX_ENCAP_PORTS, MAX_LOCAL, MAX_QUEUES, MAX_SELECTORS, MAX_SPIS, SEL_DROP, SEL_STEER,
};

#[map]
static ESP_SPIS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_SPIS, 0);
#[map]
static ENCAP_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_ENCAP_PORTS, 0);
#[map]
static XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
#[map]
static XSKS_IN: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);
#[map]
static SEL_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_SELECTORS, 0);
#[map]
static SEL_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_SELECTORS, 0);
#[map]
static LOCAL_V4: HashMap<[u8; 4], u8> = HashMap::with_max_entries(MAX_LOCAL, 0);
#[map]
static LOCAL_V6: HashMap<[u8; 16], u8> = HashMap::with_max_entries(MAX_LOCAL, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ESP: u8 = 50;

#[xdp]
pub fn espd_outside(ctx: XdpContext) -> u32 {
    let (counter, action) = classify(&ctx).unwrap_or((Counter::Malformed, xdp_action::XDP_PASS));
    count(counter);
    action
}

#[xdp]
pub fn espd_inside(ctx: XdpContext) -> u32 {
    let (counter, action) =
        classify_inside(&ctx).unwrap_or((Counter::Malformed, xdp_action::XDP_PASS));
    count(counter);
    action
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU array slot: only this CPU writes it, and the
        // pointer from the map lookup is valid for the program's run.
        unsafe { *c += 1 };
    }
}

/// The inside interface: steer what PROTECT policies select, drop what a
/// DISCARD policy alone selects, pass the rest.
#[inline(always)]
fn classify_inside(ctx: &XdpContext) -> Result<(Counter, u32), ()> {
    let pass = xdp_action::XDP_PASS;
    let (ty, l3) = ethertype(ctx)?;
    let sel = match ty {
        ETH_P_IP => {
            let dst = bytes::<4>(ctx, l3 + 16)?;
            // Multicast (224/4), limited broadcast: the kernel's.
            // SAFETY: a hash map lookup by value; the reference is only tested.
            if dst[0] >= 224 || unsafe { LOCAL_V4.get(&dst) }.is_some() {
                return Ok((Counter::InsideLocal, pass));
            }
            SEL_V4.get(Key::new(32, dst)).copied()
        }
        ETH_P_IPV6 => {
            let dst = bytes::<16>(ctx, l3 + 24)?;
            // Multicast (ff00::/8: ND, MLD) and link-local (fe80::/10).
            if dst[0] == 0xff
                || (dst[0] == 0xfe && dst[1] & 0xc0 == 0x80)
                // SAFETY: a hash map lookup by value; the reference is only tested.
                || unsafe { LOCAL_V6.get(&dst) }.is_some()
            {
                return Ok((Counter::InsideLocal, pass));
            }
            SEL_V6.get(Key::new(128, dst)).copied()
        }
        _ => return Ok((Counter::NotIp, pass)),
    };
    match sel {
        Some(SEL_DROP) => Ok((Counter::InsideDiscard, xdp_action::XDP_DROP)),
        Some(SEL_STEER) => {
            let q = ctx.rx_queue_index();
            if XSKS_IN.get(q).is_none() {
                return Ok((Counter::InsideNoSocket, pass));
            }
            match XSKS_IN.redirect(q, u64::from(pass)) {
                Ok(a) if a == xdp_action::XDP_REDIRECT => Ok((Counter::InsideSteered, a)),
                Ok(a) | Err(a) => Ok((Counter::InsideNoSocket, a)),
            }
        }
        _ => Ok((Counter::InsidePass, pass)),
    }
}

/// The ethertype after up to two VLAN tags, and where the L3 header starts.
#[inline(always)]
fn ethertype(ctx: &XdpContext) -> Result<(u16, usize), ()> {
    let mut l3 = ETH_HLEN;
    let mut ty = be16(ctx, 12)?;
    if ty == ETH_P_8021Q || ty == ETH_P_8021AD {
        ty = be16(ctx, l3 + 2)?;
        l3 += 4;
        if ty == ETH_P_8021Q || ty == ETH_P_8021AD {
            ty = be16(ctx, l3 + 2)?;
            l3 += 4;
        }
    }
    Ok((ty, l3))
}

/// The bytes at `off..off + N` of the frame, bounds-checked for the verifier.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, off: usize) -> Result<[u8; N], ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + N > end {
        return Err(());
    }
    // SAFETY: `start + off .. start + off + N` was checked to lie inside the
    // packet (`data..data_end`) just above.
    Ok(unsafe { *((start + off) as *const [u8; N]) })
}

#[inline(always)]
fn be16(ctx: &XdpContext, off: usize) -> Result<u16, ()> {
    Ok(u16::from_be_bytes(bytes::<2>(ctx, off)?))
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Result<(Counter, u32), ()> {
    let pass = xdp_action::XDP_PASS;
    let (ty, l3) = ethertype(ctx)?;
    let (proto, l4) = match ty {
        ETH_P_IP => {
            let h = bytes::<20>(ctx, l3)?;
            if h[0] >> 4 != 4 {
                return Ok((Counter::Malformed, pass));
            }
            let frag = u16::from_be_bytes([h[6], h[7]]);
            if frag & 0x3fff != 0 {
                return Ok((Counter::Fragment, pass));
            }
            (h[9], l3 + usize::from(h[0] & 0x0f) * 4)
        }
        // Extension headers are left to the kernel path (counted as Other).
        ETH_P_IPV6 => (bytes::<8>(ctx, l3)?[6], l3 + 40),
        ETH_P_ARP => return Ok((Counter::Arp, pass)),
        _ => return Ok((Counter::NotIp, pass)),
    };
    match proto {
        IPPROTO_ESP => {
            let spi = u32::from_be_bytes(bytes::<4>(ctx, l4)?);
            Ok(steer(ctx, spi, Counter::EspSteered))
        }
        IPPROTO_UDP => {
            let udp = bytes::<8>(ctx, l4)?;
            let dport = u16::from_be_bytes([udp[2], udp[3]]);
            // SAFETY: a hash map lookup by value; the reference is only tested.
            if unsafe { ENCAP_PORTS.get(&dport) }.is_none() {
                return Ok((Counter::Other, pass));
            }
            let ulen = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
            if ulen == 9 && bytes::<1>(ctx, l4 + 8)?[0] == 0xff {
                return Ok((Counter::Keepalive, pass));
            }
            let marker = u32::from_be_bytes(bytes::<4>(ctx, l4 + 8)?);
            if marker == 0 {
                return Ok((Counter::Ike, pass));
            }
            Ok(steer(ctx, marker, Counter::NattSteered))
        }
        _ => Ok((Counter::Other, pass)),
    }
}

/// To the AF_XDP socket of this RX queue if the SPI is ours and a socket is
/// bound; otherwise the kernel gets it.
#[inline(always)]
fn steer(ctx: &XdpContext, spi: u32, kind: Counter) -> (Counter, u32) {
    let pass = xdp_action::XDP_PASS;
    // SAFETY: a hash map lookup by value; the reference is only tested.
    if spi == 0 || unsafe { ESP_SPIS.get(&spi) }.is_none() {
        return (Counter::UnknownSpi, pass);
    }
    let q = ctx.rx_queue_index();
    if XSKS.get(q).is_none() {
        return (Counter::NoSocket, pass);
    }
    // The lower bits of the flags are the action if the lookup fails after all.
    match XSKS.redirect(q, u64::from(pass)) {
        Ok(a) if a == xdp_action::XDP_REDIRECT => (kind, a),
        Ok(a) | Err(a) => (Counter::NoSocket, a),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
