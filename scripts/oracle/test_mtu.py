"""Path MTU (RFC 4301 §8): what does not fit after encapsulation is answered
with ICMP "fragmentation needed" / ICMPv6 "packet too big" carrying the MTU
left after the IPsec overhead (rate limited), or — when the inner packet
allows it — encapsulated and sent as outer fragments, which scapy reassembles
and decrypts."""

from scapy.all import ICMP, IP, UDP, ICMPv6PacketTooBig, IPv6, Raw, defragment, defragment6
from scapy.layers.ipsec import ESP

from espd_oracle import GW, SITE, SPI_OUT, eth, gw_config, keymat, l3_bytes, run_espd
from test_interop import scapy_sa

KM = keymat(128, 70)
A4, B4 = SITE[4][2], SITE[4][3]
A6, B6 = SITE[6][2], SITE[6][3]


def conf(v):
    return gw_config("tunnel", v, v, KM, keymat(128, 71))


def udp4(size, df):
    p = IP(src=A4, dst=B4, flags="DF" if df else 0) / UDP(sport=5, dport=9)
    return IP(bytes(p / Raw(b"x" * (size - 28))))


def udp6(size):
    return IPv6(bytes(IPv6(src=A6, dst=B6) / UDP(sport=5, dport=9) / Raw(b"y" * (size - 48))))


def test_icmp_frag_needed_reports_the_exact_mtu(tmp_path):
    # 1400 - 20 (outer) - 8 (ESP) - 8 (IV) - 16 (ICV) = 1348 for payload+pad+2,
    # a multiple of 4: the largest inner packet is 1346.
    fits, over = udp4(1346, True), udp4(1347, True)
    out, st = run_espd(tmp_path, conf(4), [eth(fits), eth(over)], extra_args=["--mtu", "1400"])
    assert len(out) == 2
    esp = IP(l3_bytes(out[0]))
    assert ESP in esp and len(l3_bytes(out[0])) <= 1400
    icmp = IP(l3_bytes(out[1]))
    assert (icmp.src, icmp.dst) == (GW[4][0], A4)
    assert (icmp[ICMP].type, icmp[ICMP].code, icmp[ICMP].nexthopmtu) == (3, 4, 1346)
    assert len(l3_bytes(out[1])) <= 576
    assert bytes(icmp[ICMP].payload)[:28] == bytes(over)[:28]  # the offending header and more
    # Checksums as a stack would verify them.
    fixed = IP(l3_bytes(out[1]))
    del fixed.chksum
    del fixed[ICMP].chksum
    assert bytes(IP(bytes(fixed))) == l3_bytes(out[1])
    assert out[1].dst == "02:00:00:00:00:02"  # back towards the sender
    assert st["drops"]["PacketTooBig"] == 1 and st["verdicts"]["icmp_sent"] == 1


def test_packet_too_big_v6(tmp_path):
    # 1400 - 40 - 8 - 8 - 16 = 1328 → 1326.
    fits, over = udp6(1326), udp6(1327)
    out, st = run_espd(tmp_path, conf(6), [eth(fits), eth(over)], extra_args=["--mtu", "1400"])
    assert ESP in IPv6(l3_bytes(out[0]))
    ptb = IPv6(l3_bytes(out[1]))
    assert (ptb.src, ptb.dst) == (GW[6][0], A6)
    assert ptb[ICMPv6PacketTooBig].mtu == 1326
    fixed = IPv6(l3_bytes(out[1]))
    del fixed[ICMPv6PacketTooBig].cksum
    assert bytes(IPv6(bytes(fixed))) == l3_bytes(out[1])


def test_df_clear_is_encapsulated_then_fragmented(tmp_path):
    plain = udp4(3000, False)
    out, st = run_espd(tmp_path, conf(4), [eth(plain)], extra_args=["--mtu", "1400"])
    frags = [IP(l3_bytes(f)) for f in out]
    assert len(frags) == 3 and all(len(bytes(f)) <= 1400 for f in frags)
    assert all(f.proto == 50 and f.src == GW[4][0] for f in frags)
    whole = defragment(frags)
    assert len(whole) == 1
    sa = scapy_sa(SPI_OUT, KM, "tunnel", 4, GW[4][0], GW[4][1], False)
    assert bytes(sa.decrypt(IP(bytes(whole[0])))) == bytes(plain)
    assert st["verdicts"]["fragmented"] == 1 and st["verdicts"]["fragments"] == 3


def test_small_ipv6_gets_through_a_narrow_tunnel_by_outer_fragments(tmp_path):
    """RFC 8200 §5: a 1280-octet IPv6 packet must pass; with a 1300-octet
    tunnel MTU it cannot without fragmenting the outer packet."""
    plain = udp6(1280)
    out, st = run_espd(tmp_path, conf(6), [eth(plain)], extra_args=["--mtu", "1300"])
    frags = [IPv6(l3_bytes(f)) for f in out]
    assert len(frags) == 2 and all(len(bytes(f)) <= 1300 for f in frags)
    whole = defragment6(frags)
    sa = scapy_sa(SPI_OUT, KM, "tunnel", 6, GW[6][0], GW[6][1], False)
    assert bytes(sa.decrypt(IPv6(bytes(whole)))) == bytes(plain)


def test_icmp_is_rate_limited(tmp_path):
    frames = [eth(udp4(1500, True)) for _ in range(150)]
    for f in frames:
        f.time = 1_700_000_000
    out, st = run_espd(tmp_path, conf(4), frames, extra_args=["--mtu", "1400"])
    assert len(out) == 100
    assert st["drops"]["PacketTooBig"] == 150 and st["verdicts"]["icmp_sent"] == 100


def test_ipv6_in_ipv4_df_follows_rfc_4213(tmp_path):
    """RFC 4213 §3.2: outer DF set for inner IPv6 above 1280 octets, clear at
    or below (so a narrow IPv4 path fragments the outer packet)."""
    conf = gw_config("tunnel", 6, 4, KM, keymat(128, 71))
    small, big = udp6(1280), udp6(1281)
    out, _ = run_espd(tmp_path, conf, [eth(small), eth(big)])
    assert [IP(l3_bytes(f)).flags.DF for f in out] == [False, True]
    # Through a 1300-octet IPv4 path the 1280-octet packet arrives in fragments.
    out, _ = run_espd(tmp_path, conf, [eth(small)], name="narrow", extra_args=["--mtu", "1300"])
    frags = [IP(l3_bytes(f)) for f in out]
    assert len(frags) == 2
    sa = scapy_sa(SPI_OUT, KM, "tunnel", 4, GW[4][0], GW[4][1], False)
    assert bytes(sa.decrypt(IP(bytes(defragment(frags)[0])))) == bytes(small)
