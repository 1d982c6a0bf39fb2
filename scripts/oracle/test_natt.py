"""NAT traversal, RFC 3948: ESP in UDP both ways with scapy (v4 and v6, tunnel
and transport), keepalives, IKE pass-through, encapsulation mismatches, and
keepalive generation after the idle time."""

import pytest
from scapy.all import UDP, Raw
from scapy.layers.ipsec import ESP

from espd_oracle import GW, SPI_IN, SPI_OUT, eth, gw_config, ip_cls, keymat, l3_bytes, run_espd
from test_interop import SHAPES, inner_packets, scapy_sa, shape_id

ENCAP = "encap espinudp 4500 4500 {oa}"


def natt_conf(mode, inner, outer, km_out, km_in, out_encap=True, in_encap=True):
    oa = "0.0.0.0" if outer == 4 else "::"
    return gw_config(mode, inner, outer, km_out, km_in,
                     out_extra=ENCAP.format(oa=oa) if out_encap else "",
                     in_extra=ENCAP.format(oa=oa) if in_encap else "")


def natt_sa(spi, km, mode, outer, src, dst):
    sa = scapy_sa(spi, km, mode, outer, src, dst, False)
    sa.nat_t_header = UDP(sport=4500, dport=4500)
    return sa


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_natt_espd_to_scapy(tmp_path, shape):
    mode, inner, outer = shape
    km_out, km_in = keymat(128, 60), keymat(128, 61)
    plain = inner_packets(mode, inner, outer)
    out, st = run_espd(tmp_path, natt_conf(mode, inner, outer, km_out, km_in), [eth(p) for p in plain])
    assert st["verdicts"]["encapsulated"] == len(plain)
    g1, g2 = GW[outer]
    sa = natt_sa(SPI_OUT, km_out, mode, outer, g1, g2)
    L = ip_cls(outer)
    for f, want in zip(out, plain):
        pkt = L(l3_bytes(f))
        u = pkt[UDP]
        assert (u.sport, u.dport) == (4500, 4500)
        if outer == 4:
            assert u.chksum == 0  # RFC 3948 §3.1.1
        else:
            fixed = L(l3_bytes(f))
            del fixed[UDP].chksum
            assert L(bytes(fixed))[UDP].chksum == u.chksum != 0  # a real checksum over IPv6
        assert bytes(u.payload)[:4] == SPI_OUT.to_bytes(4, "big")
        assert bytes(sa.decrypt(pkt)) == bytes(want)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_natt_scapy_to_espd(tmp_path, shape):
    mode, inner, outer = shape
    km_out, km_in = keymat(256, 62), keymat(256, 63)
    g1, g2 = GW[outer]
    L = ip_cls(outer)
    sa = natt_sa(SPI_IN, km_in, mode, outer, g2, g1)
    plain = inner_packets(mode, inner, outer, reverse=True)
    frames = []
    for i, p in enumerate(plain):
        sa.seq_num = i + 1
        e = L(bytes(sa.encrypt(p)))
        if i == 2:
            e[UDP].chksum = 0x1234  # any checksum is accepted on receive (§3.1.2)
            e = L(bytes(e))
        frames.append(eth(e))
    keepalive = eth(L(src=g2, dst=g1) / UDP(sport=4500, dport=4500) / Raw(b"\xff"))
    ike = eth(L(src=g2, dst=g1) / UDP(sport=4500, dport=4500) / Raw(b"\x00\x00\x00\x00" + b"IKE_SA_INIT..."))
    out, st = run_espd(tmp_path, natt_conf(mode, inner, outer, keymat(256, 64), km_in),
                       frames + [keepalive, ike])
    got = [l3_bytes(f) for f in out]
    assert got[:len(plain)] == [bytes(p) for p in plain]
    assert got[len(plain):] == [l3_bytes(ike)], "IKE passes to the host unchanged; keepalives are consumed"
    v = st["verdicts"]
    assert (v["decapsulated"], v["keepalive"], v["ike"], v["dropped"]) == (len(plain), 1, 1, 0)


@pytest.mark.parametrize("outer", [4, 6])
def test_encapsulation_must_match_the_sa(tmp_path, outer):
    km_in = keymat(128, 65)
    g1, g2 = GW[outer]
    p = inner_packets("tunnel", outer, outer, reverse=True)[0]
    raw_sa = scapy_sa(SPI_IN, km_in, "tunnel", outer, g2, g1, False)
    udp_sa = natt_sa(SPI_IN, km_in, "tunnel", outer, g2, g1)
    # SA configured with encap, packet arrives as raw ESP; and the reverse.
    _, st = run_espd(tmp_path, natt_conf("tunnel", outer, outer, keymat(128, 66), km_in),
                     [eth(raw_sa.encrypt(p))], name="a")
    assert st["drops"]["EncapMismatch"] == 1
    _, st = run_espd(tmp_path, natt_conf("tunnel", outer, outer, keymat(128, 66), km_in, in_encap=False, out_encap=True),
                     [eth(udp_sa.encrypt(p))], name="b")
    assert st["drops"]["EncapMismatch"] == 1


@pytest.mark.parametrize("outer", [4, 6])
def test_keepalives_after_idle_time(tmp_path, outer):
    """Capture time drives the clock: packets at t = 0 and t = 5 keep the SA
    busy; at t = 40 it has been idle for 35 s > 20 s, so a keepalive goes first."""
    g1, g2 = GW[outer]
    conf = natt_conf("tunnel", outer, outer, keymat(128, 67), keymat(128, 68))
    p = inner_packets("tunnel", outer, outer)[0]
    L = ip_cls(outer)
    unrelated = L(src=g2, dst="198.18.9.9" if outer == 4 else "2001:db8:9::9") / UDP(sport=1, dport=2)
    frames = [eth(p), eth(p), eth(unrelated), eth(unrelated)]
    for f, t in zip(frames, [1_700_000_000, 1_700_000_005, 1_700_000_040, 1_700_000_041]):
        f.time = t
    out, st = run_espd(tmp_path, conf, frames)
    kinds = []
    for f in out:
        q = L(l3_bytes(f))
        if UDP in q and bytes(q[UDP].payload) == b"\xff":
            kinds.append("keepalive")
            assert (q.src, q.dst, q[UDP].sport, q[UDP].dport) == (g1, g2, 4500, 4500)
            if outer == 6:
                fixed = L(l3_bytes(f))
                del fixed[UDP].chksum
                assert L(bytes(fixed))[UDP].chksum == q[UDP].chksum
        elif ESP in q or (UDP in q and q[UDP].dport == 4500):
            kinds.append("esp")
        else:
            kinds.append("other")
    assert kinds == ["esp", "esp", "keepalive", "other", "other"]
    assert st["verdicts"]["keepalives_sent"] == 1
