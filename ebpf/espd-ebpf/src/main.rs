//! espd's XDP programs.
//!
//! Outside interface (`espd_outside`): ESP (IP protocol 50) and RFC 3948
//! UDP-encapsulated ESP addressed to this box with the SPI of one of espd's
//! inbound SAs goes to the AF_XDP socket of the receiving queue; ESP of one
//! of our outbound SAs not addressed to us (a reflected copy) is dropped
//! (RFC 4301 §4.4.2). Plaintext that is not for this box and whose
//! destination lies in a prefix of an `in`/`fwd` PROTECT or DISCARD policy
//! goes to espd's inbound policy check, or is dropped here when nothing but
//! such policies of any source, protocol and port select it (RFC 4301 §5.2
//! step 3a) — fragments included, so a non-first fragment of a protected
//! flow cannot slip past. IKE (the zero non-ESP marker), NAT keepalives,
//! ARP, ND, ICMP and everything else for this box, and traffic no policy
//! selects, is `XDP_PASS`: the kernel keeps what is not ours.
//!
//! Inside interface (`espd_inside`): IP traffic whose destination falls in a
//! prefix of an outbound PROTECT policy goes to espd's AF_XDP socket (the
//! engine then makes the exact RFC 4301 SPD decision); a DISCARD prefix that
//! no other policy overlaps is dropped here; traffic to this box, multicast,
//! broadcast, link-local and everything no policy selects is `XDP_PASS`, and
//! the kernel forwards bypass traffic as usual.
//!
//! Every frame bumps one per-action counter.
//!
//! Host device (`espd_host_mark`, tc ingress of the kernel's end of the
//! host pair, `espd run --host`): every packet espd delivers to this host is
//! marked with `HOST_MARK`, which the guard's inbound XFRM policies let
//! through (they drop unmarked plaintext from the wire).
#![no_std]
#![no_main]

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::macros::{classifier, map, xdp};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, XskMap};
use aya_ebpf::programs::{TcContext, XdpContext};
use espd_common::{
    Counter, HOST_MARK, MAX_ENCAP_PORTS, MAX_LOCAL, MAX_QUEUES, MAX_SELECTORS, MAX_SPIS, SEL_DROP,
    SEL_STEER, SPI_IN, SPI_OUT,
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
static XSKS_HOST: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);
#[map]
static SEL_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_SELECTORS, 0);
#[map]
static SEL_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_SELECTORS, 0);
#[map]
static IN_SEL_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_SELECTORS, 0);
#[map]
static IN_SEL_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_SELECTORS, 0);
/// Datagrams whose first fragment was ESP in UDP for us: (source,
/// destination, identification) → 1, so their later fragments, which carry
/// no UDP header, are steered too. LRU: old entries make room by themselves.
#[map]
static FRAG_UDP_ESP: LruHashMap<[u8; 36], u8> = LruHashMap::with_max_entries(4096, 0);
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
const IPPROTO_FRAGMENT: u8 = 44;

#[xdp]
pub fn espd_outside(ctx: XdpContext) -> u32 {
    let (counter, action) = classify(&ctx).unwrap_or((Counter::Malformed, xdp_action::XDP_PASS));
    count(counter);
    action
}

#[xdp]
pub fn espd_inside(ctx: XdpContext) -> u32 {
    let (counter, action) =
        classify_inside(&ctx, &XSKS_IN).unwrap_or((Counter::Malformed, xdp_action::XDP_PASS));
    count(counter);
    action
}

/// espd's end of the host pair when a gateway protects its own traffic too:
/// what the host routes into the pair, steered like the inside's traffic
/// to the workers' host-pair sockets.
#[xdp]
pub fn espd_host(ctx: XdpContext) -> u32 {
    let (counter, action) =
        classify_inside(&ctx, &XSKS_HOST).unwrap_or((Counter::Malformed, xdp_action::XDP_PASS));
    count(counter);
    action
}

/// Only frames espd transmits arrive on the kernel's end of the host pair
/// (its other end is espd's AF_XDP socket), so every one is marked.
#[classifier]
pub fn espd_host_mark(ctx: TcContext) -> i32 {
    ctx.set_mark(HOST_MARK);
    aya_ebpf::bindings::TC_ACT_OK as i32
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
fn classify_inside(ctx: &XdpContext, xsks: &XskMap) -> Result<(Counter, u32), ()> {
    let pass = xdp_action::XDP_PASS;
    let (ty, l3) = match ethertype(ctx) {
        Ok(x) => x,
        Err(Some(r)) => return Ok(r),
        Err(None) => return Err(()),
    };
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
        Some(SEL_STEER) => Ok(redirect(
            ctx,
            xsks,
            Counter::InsideSteered,
            Counter::InsideNoSocket,
        )),
        _ => Ok((Counter::InsidePass, pass)),
    }
}

/// The ethertype and where the L3 header starts. 802.1Q / 802.1ad tagged
/// frames belong to a VLAN: the kernel's VLAN interface gets them (espd
/// runs there if it protects that VLAN), so they are never steered from the
/// interface below: `Err(Some(..))`.
#[inline(always)]
fn ethertype(ctx: &XdpContext) -> Result<(u16, usize), Option<(Counter, u32)>> {
    let ty = be16(ctx, 12).map_err(|_| None)?;
    if ty == ETH_P_8021Q || ty == ETH_P_8021AD {
        return Err(Some((Counter::VlanTagged, xdp_action::XDP_PASS)));
    }
    Ok((ty, ETH_HLEN))
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
    let (ty, l3) = match ethertype(ctx) {
        Ok(x) => x,
        Err(Some(r)) => return Ok(r),
        Err(None) => return Err(()),
    };
    // (protocol, upper-layer offset, fragment, destination in this box's
    // address map, and the destination's trie lookup result); for fragments,
    // the datagram's key and whether this is its first fragment.
    let mut fkey = [0u8; 36];
    let mut first = false;
    let (proto, l4, fragment, local, sel) = match ty {
        ETH_P_IP => {
            let h = bytes::<20>(ctx, l3)?;
            if h[0] >> 4 != 4 {
                return Ok((Counter::Malformed, pass));
            }
            let fo = u16::from_be_bytes([h[6], h[7]]);
            let frag = fo & 0x3fff != 0;
            if frag {
                first = fo & 0x1fff == 0;
                fkey[..4].copy_from_slice(&h[12..16]);
                fkey[16..20].copy_from_slice(&h[16..20]);
                fkey[32..34].copy_from_slice(&h[4..6]);
            }
            let dst = [h[16], h[17], h[18], h[19]];
            // SAFETY: a hash map lookup by value; the reference is only tested.
            let local = dst[0] >= 224 || unsafe { LOCAL_V4.get(&dst) }.is_some();
            let sel = if local {
                None
            } else {
                IN_SEL_V4.get(Key::new(32, dst)).copied()
            };
            (h[9], l3 + usize::from(h[0] & 0x0f) * 4, frag, local, sel)
        }
        ETH_P_IPV6 => {
            let nh = bytes::<8>(ctx, l3)?[6];
            let dst = bytes::<16>(ctx, l3 + 24)?;
            let local = dst[0] == 0xff
                || (dst[0] == 0xfe && dst[1] & 0xc0 == 0x80)
                // SAFETY: a hash map lookup by value; the reference is only tested.
                || unsafe { LOCAL_V6.get(&dst) }.is_some();
            let sel = if local {
                None
            } else {
                IN_SEL_V6.get(Key::new(128, dst)).copied()
            };
            // Extension headers other than a first Fragment header are not
            // walked: such packets for this box go to the kernel, others are
            // checked against the tries.
            let frag = nh == IPPROTO_FRAGMENT;
            if frag {
                let fh = bytes::<8>(ctx, l3 + 40)?;
                first = u16::from_be_bytes([fh[2], fh[3]]) & 0xfff8 == 0;
                fkey[..16].copy_from_slice(&bytes::<16>(ctx, l3 + 8)?);
                fkey[16..32].copy_from_slice(&dst);
                fkey[32..36].copy_from_slice(&fh[4..8]);
            }
            (nh, l3 + 40, frag, local, sel)
        }
        ETH_P_ARP => return Ok((Counter::Arp, pass)),
        _ => return Ok((Counter::NotIp, pass)),
    };
    // Raw ESP in fragments, for us: espd reassembles it before ESP (RFC
    // 4303 §3.4.1). IPv4 names the protocol in every fragment; IPv6 in the
    // Fragment header. (UDP fragments stay with the kernel: IKE's.)
    if fragment && local {
        // The carried protocol and where its header starts (IPv6: after the
        // Fragment header).
        let (carried, at) = if ty == ETH_P_IP {
            (proto, l4)
        } else {
            (bytes::<1>(ctx, l4)?[0], l4 + 8)
        };
        if carried == IPPROTO_ESP {
            return Ok(redirect(
                ctx,
                &XSKS,
                Counter::FragSteered,
                Counter::NoSocket,
            ));
        }
        if carried == IPPROTO_UDP {
            // ESP in UDP: the first fragment says so (an encapsulation port,
            // a non-zero marker: not IKE); later ones are known by their key.
            let ours = if first {
                let udp = bytes::<12>(ctx, at)?;
                let dport = u16::from_be_bytes([udp[2], udp[3]]);
                // SAFETY: a hash map lookup by value; the reference is only tested.
                let esp = unsafe { ENCAP_PORTS.get(&dport) }.is_some() && udp[8..12] != [0; 4];
                if esp {
                    let _ = FRAG_UDP_ESP.insert(&fkey, &1, 0);
                }
                esp
            } else {
                // SAFETY: a hash map lookup by value; the reference is only tested.
                unsafe { FRAG_UDP_ESP.get(&fkey) }.is_some()
            };
            if ours {
                return Ok(redirect(
                    ctx,
                    &XSKS,
                    Counter::FragSteered,
                    Counter::NoSocket,
                ));
            }
        }
    }
    if !fragment {
        match proto {
            IPPROTO_ESP => {
                let spi = u32::from_be_bytes(bytes::<4>(ctx, l4)?);
                if let Some(r) = esp(ctx, spi, local, Counter::EspSteered) {
                    return Ok(r);
                }
            }
            IPPROTO_UDP => {
                let udp = bytes::<8>(ctx, l4)?;
                let dport = u16::from_be_bytes([udp[2], udp[3]]);
                // SAFETY: a hash map lookup by value; the reference is only tested.
                if unsafe { ENCAP_PORTS.get(&dport) }.is_some() {
                    let ulen = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
                    if local && ulen == 9 && bytes::<1>(ctx, l4 + 8)?[0] == 0xff {
                        return Ok((Counter::Keepalive, pass));
                    }
                    let marker = u32::from_be_bytes(bytes::<4>(ctx, l4 + 8).unwrap_or([0; 4]));
                    if local && marker == 0 {
                        return Ok((Counter::Ike, pass));
                    }
                    if marker != 0 {
                        if let Some(r) = esp(ctx, marker, local, Counter::NattSteered) {
                            return Ok(r);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let passed = if fragment {
        Counter::Fragment
    } else {
        Counter::Other
    };
    match sel {
        // RFC 4301 §5.2 step 3a: plaintext a PROTECT or DISCARD policy selects.
        Some(SEL_DROP) => Ok((Counter::UnprotectedInbound, xdp_action::XDP_DROP)),
        Some(SEL_STEER) => Ok(redirect(
            ctx,
            &XSKS,
            Counter::PlainSteered,
            Counter::NoSocket,
        )),
        _ => Ok((passed, pass)),
    }
}

/// ESP (raw or in UDP) with `spi`: to the AF_XDP socket of this RX queue if
/// it is addressed to us and one of our inbound SAs has the SPI; dropped if
/// it is our own outbound ESP not addressed to us; otherwise `None` (the
/// caller decides as for any other packet).
#[inline(always)]
fn esp(ctx: &XdpContext, spi: u32, local: bool, kind: Counter) -> Option<(Counter, u32)> {
    // SAFETY: a hash map lookup by value; the value is copied out at once.
    let bits = if spi == 0 {
        0
    } else {
        unsafe { ESP_SPIS.get(&spi) }.copied().unwrap_or(0)
    };
    if local {
        if bits & SPI_IN != 0 {
            return Some(redirect(ctx, &XSKS, kind, Counter::NoSocket));
        }
        return Some((Counter::UnknownSpi, xdp_action::XDP_PASS));
    }
    if bits & SPI_OUT != 0 {
        return Some((Counter::OwnEsp, xdp_action::XDP_DROP));
    }
    None
}

/// To the AF_XDP socket of this RX queue in `xsks`, counted as `kind`;
/// `XDP_PASS` counted as `none` when the queue has no socket.
#[inline(always)]
fn redirect(ctx: &XdpContext, xsks: &XskMap, kind: Counter, none: Counter) -> (Counter, u32) {
    let pass = xdp_action::XDP_PASS;
    let q = ctx.rx_queue_index();
    if xsks.get(q).is_none() {
        return (none, pass);
    }
    // The lower bits of the flags are the action if the lookup fails after all.
    match xsks.redirect(q, u64::from(pass)) {
        Ok(a) if a == xdp_action::XDP_REDIRECT => (kind, a),
        Ok(a) | Err(a) => (none, a),
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
