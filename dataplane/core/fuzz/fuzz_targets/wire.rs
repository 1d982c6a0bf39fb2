//! Every parser of untrusted bytes in `wire`: after `new_checked` nothing may
//! panic, whatever the accessor.
#![no_main]
use espd_core::wire::{esp, ethernet, frag, ipv4, ipv6, l4, udp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = ethernet::Frame::new_checked(data) {
        let _ = (f.ethertype(), f.header_len(), f.payload().len(), f.src_addr(), f.dst_addr());
    }
    if let Ok(p) = ipv4::Packet::new_checked(data) {
        let _ = (p.tos(), p.ident(), p.is_fragment(), p.ttl(), p.src_addr(), p.dst_addr());
        let _ = (p.verify_checksum(), p.payload().len());
        let _ = l4::ports(p.protocol(), p.payload());
        let mut scratch = [0u8; 2048];
        let mtu = 68 + usize::from(data.first().copied().unwrap_or(0)) * 4;
        let _ = frag::ipv4(data, mtu, &mut scratch, |f| assert!(f.len() <= mtu));
    }
    if let Ok(p) = ipv6::Packet::new_checked(data) {
        let _ = (p.traffic_class(), p.flow_label(), p.hop_limit(), p.src_addr(), p.dst_addr());
        if let Ok(c) = p.walk() {
            assert!(c.upper_at <= p.total_len() && c.esp_at <= c.upper_at);
            let _ = l4::ports(c.upper, &p.packet()[c.upper_at..]);
            let mut scratch = [0u8; 2048];
            let mtu = 1280 + usize::from(data[7]);
            let _ = frag::ipv6(data, mtu, 1, &mut scratch, |f| assert!(f.len() <= mtu));
        }
    }
    if let Ok(u) = udp::Packet::new_checked(data) {
        let _ = (u.src_port(), u.dst_port(), u.checksum(), u.payload().len());
    }
    if let Ok(e) = esp::Packet::new_checked(data) {
        let _ = (e.spi(), e.seq(), e.payload().len());
    }
    if let Ok((n, _)) = esp::parse_trailer(data) {
        assert!(n <= data.len());
    }
});
