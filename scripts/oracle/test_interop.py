"""scapy ⇄ espd for every mode × family × key size, with and without ESN
(the ESN runs cross 2^32), compared byte for byte on the inner packet."""

import pytest
from scapy.all import ICMP, IP, TCP, UDP, IPv6, ICMPv6EchoRequest, Raw
from scapy.layers.ipsec import ESP, SecurityAssociation

from espd_oracle import (ALGS, GW, SITE, SPI_IN, SPI_OUT, alg, eth, gw_config,
                         ip_cls, keymat, l3_bytes, run_espd)

# (mode, inner family, outer family)
SHAPES = [
    ("tunnel", 4, 4), ("tunnel", 6, 6), ("tunnel", 4, 6), ("tunnel", 6, 4),
    ("transport", 4, 4), ("transport", 6, 6),
]
ESN_START = (1 << 32) - 3  # first sequence numbers straddle 2^32


def shape_id(s):
    return f"{s[0]}-{s[1]}in{s[2]}" if s[0] == "tunnel" else f"transport-v{s[1]}"


def inner_packets(mode, inner, outer, reverse=False):
    """Plaintext of varied sizes (every padding length), protocols and TOS."""
    if mode == "tunnel":
        a, b = SITE[inner][2], SITE[inner][3]
    else:
        a, b = GW[outer]
    if reverse:
        a, b = b, a
    L = ip_cls(inner)
    hdr = (lambda: L(src=a, dst=b, tos=0x28)) if inner == 4 else (lambda: L(src=a, dst=b, tc=0x28, fl=0x12345))
    icmp = ICMP() if inner == 4 else ICMPv6EchoRequest()
    pkts = [hdr() / UDP(sport=1000 + n, dport=5000) / Raw(b"u" * n) for n in range(0, 9)]
    pkts += [hdr() / TCP(sport=40000, dport=443, flags="S"), hdr() / icmp / Raw(b"ping" * 5),
             hdr() / UDP(sport=7, dport=7) / Raw(bytes(range(256)) * 5 + b"tail")]
    return [L(bytes(p)) for p in pkts]


def seqs(n, esn):
    start = ESN_START if esn else 1
    return [start + i for i in range(n)]


def scapy_sa(spi, km, mode, outer, src, dst, esn, algo=None):
    """An AES-GCM SA for key material `km`, or one of `algo`'s (an espd_oracle.Alg)."""
    tunnel = ip_cls(outer)(src=src, dst=dst) if mode == "tunnel" else None
    kw = algo.scapy if algo else dict(crypt_algo="AES-GCM", crypt_key=km)
    return SecurityAssociation(ESP, spi=spi, tunnel_header=tunnel, esn_en=esn, **kw)


@pytest.mark.parametrize("esn", [False, True], ids=["seq32", "esn"])
@pytest.mark.parametrize("bits", [128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_scapy_encrypts_espd_decrypts(tmp_path, shape, bits, esn):
    mode, inner, outer = shape
    km_out, km_in = keymat(bits, 1), keymat(bits, 2)
    in_extra = "flag esn replay-seq 0xfffffff0 replay-seq-hi 0" if esn else ""
    conf = gw_config(mode, inner, outer, km_out, km_in, in_extra=in_extra)
    g1, g2 = GW[outer]
    sa = scapy_sa(SPI_IN, km_in, mode, outer, g2, g1, esn)
    plain = inner_packets(mode, inner, outer, reverse=True)
    frames = []
    for p, s in zip(plain, seqs(len(plain), esn)):
        # scapy replaces an explicit 0 by its default (PEERS.md), so set the
        # SA's own counters instead of passing seq_num=0 / esn=0.
        sa.seq_num, sa.esn = s & 0xFFFFFFFF, s >> 32
        e = sa.encrypt(p)
        frames.append(eth(e))
    out, st = run_espd(tmp_path, conf, frames)
    assert st["verdicts"]["decapsulated"] == len(plain), st
    assert st["verdicts"]["dropped"] == 0, st["drops"]
    assert len(out) == len(plain)
    for got, want in zip(out, plain):
        assert l3_bytes(got) == bytes(want)
        assert got.type == (0x0800 if inner == 4 else 0x86DD)
    sa_in = next(s for s in st["sas"] if s["spi"] == f"0x{SPI_IN:08x}")
    assert sa_in["replay_top"] == seqs(len(plain), esn)[-1]


@pytest.mark.parametrize("esn", [False, True], ids=["seq32", "esn"])
@pytest.mark.parametrize("bits", [128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_espd_encrypts_scapy_decrypts(tmp_path, shape, bits, esn):
    mode, inner, outer = shape
    km_out, km_in = keymat(bits, 3), keymat(bits, 4)
    out_extra = "flag esn replay-oseq 0xfffffffc replay-oseq-hi 0" if esn else ""
    conf = gw_config(mode, inner, outer, km_out, km_in, out_extra=out_extra)
    g1, g2 = GW[outer]
    plain = inner_packets(mode, inner, outer)
    out, st = run_espd(tmp_path, conf, [eth(p, src="02:00:00:00:00:0a") for p in plain])
    assert st["verdicts"]["encapsulated"] == len(plain), st
    assert len(out) == len(plain)
    sa = scapy_sa(SPI_OUT, km_out, mode, outer, g1, g2, esn)
    for frame, want, s in zip(out, plain, seqs(len(plain), esn)):
        outer_pkt = frame.payload
        assert frame.type == (0x0800 if outer == 4 else 0x86DD)
        assert frame.src == "02:00:00:00:00:0a"  # Ethernet addresses are kept
        assert outer_pkt[ESP].spi == SPI_OUT
        assert outer_pkt[ESP].seq == s & 0xFFFFFFFF
        sa.esn = s >> 32
        got = sa.decrypt(ip_cls(outer)(bytes(outer_pkt)))
        assert bytes(got) == bytes(want)
        if mode == "tunnel":
            assert outer_pkt.src == g1 and outer_pkt.dst == g2
            if outer == 4:
                assert outer_pkt.ttl == 64 and outer_pkt.tos == 0x28  # DSCP copied
            else:
                assert outer_pkt.hlim == 64 and outer_pkt.tc == 0x28


# ---- the rest of the RFC 8221 set, every shape, both ways, with and without ESN ----

@pytest.mark.parametrize("esn", [False, True], ids=["seq32", "esn"])
@pytest.mark.parametrize("name", ALGS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_algorithms_scapy_to_espd(tmp_path, shape, name, esn):
    mode, inner, outer = shape
    a_out, a_in = alg(name, 21), alg(name, 22)
    in_extra = "flag esn replay-seq 0xfffffff0 replay-seq-hi 0" if esn else ""
    conf = gw_config(mode, inner, outer, a_out.clause, a_in.clause, in_extra=in_extra)
    g1, g2 = GW[outer]
    sa = scapy_sa(SPI_IN, None, mode, outer, g2, g1, esn, algo=a_in)
    plain = inner_packets(mode, inner, outer, reverse=True)
    frames = []
    for p, s in zip(plain, seqs(len(plain), esn)):
        sa.seq_num, sa.esn = s & 0xFFFFFFFF, s >> 32
        frames.append(eth(sa.encrypt(p)))
    out, st = run_espd(tmp_path, conf, frames)
    assert st["verdicts"]["decapsulated"] == len(plain), st["drops"]
    assert [l3_bytes(f) for f in out] == [bytes(p) for p in plain]


@pytest.mark.parametrize("esn", [False, True], ids=["seq32", "esn"])
@pytest.mark.parametrize("name", ALGS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_algorithms_espd_to_scapy(tmp_path, shape, name, esn):
    mode, inner, outer = shape
    a_out, a_in = alg(name, 23), alg(name, 24)
    out_extra = "flag esn replay-oseq 0xfffffffc replay-oseq-hi 0" if esn else ""
    conf = gw_config(mode, inner, outer, a_out.clause, a_in.clause, out_extra=out_extra)
    g1, g2 = GW[outer]
    plain = inner_packets(mode, inner, outer)
    out, st = run_espd(tmp_path, conf, [eth(p) for p in plain])
    assert st["verdicts"]["encapsulated"] == len(plain)
    sa = scapy_sa(SPI_OUT, None, mode, outer, g1, g2, esn, algo=a_out)
    ivs = set()
    for frame, want, s in zip(out, plain, seqs(len(plain), esn)):
        outer_pkt = ip_cls(outer)(bytes(frame.payload))
        esp = outer_pkt[ESP]
        assert esp.seq == s & 0xFFFFFFFF
        if name.startswith("cbc"):
            ivs.add(bytes(esp.data[:16]))
            # RFC 4303 §2.4 with a 16-octet block: IV ‖ ciphertext ‖ ICV sizes.
            assert (len(esp.data) - 16 - 16) % 16 == 0
        if name in ("null", "gmac128", "gmac256"):
            # Integrity only: what ESP carries is visible in the clear (the
            # whole inner packet in tunnel mode, the upper layer in transport).
            carried = bytes(want) if mode == "tunnel" else bytes(want.payload)
            assert carried in bytes(esp.data)
        sa.esn = s >> 32
        got = sa.decrypt(outer_pkt)
        assert bytes(got) == bytes(want)
    if name.startswith("cbc"):
        assert len(ivs) == len(plain), "CBC IVs must not repeat"


def test_transport_keeps_ipv6_extension_headers_and_ipv4_options(tmp_path):
    """RFC 4303 §3.1.1: in transport mode ESP goes after hop-by-hop and routing
    headers, destination options after them are encrypted; IPv4 options stay
    in the header. scapy places them the same way, both directions."""
    from scapy.all import IPOption_RR, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
    km_out, km_in = keymat(128, 80), keymat(128, 81)
    for v in (4, 6):
        g1, g2 = GW[v]
        conf = gw_config("transport", v, v, km_out, km_in)

        def pkt(src, dst, sport, dport):
            if v == 6:
                p = (IPv6(src=src, dst=dst) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=[])
                     / IPv6ExtHdrDestOpt() / UDP(sport=sport, dport=dport) / Raw(b"ext"))
            else:
                p = IP(src=src, dst=dst, options=[IPOption_RR()]) / UDP(sport=sport, dport=dport) / Raw(b"opt")
            return ip_cls(v)(bytes(p))

        out_plain, in_plain = pkt(g1, g2, 5, 9), pkt(g2, g1, 9, 5)
        sa_in = scapy_sa(SPI_IN, km_in, "transport", v, g2, g1, False)
        out, st = run_espd(tmp_path, conf, [eth(out_plain), eth(sa_in.encrypt(in_plain))], name=f"v{v}")
        assert st["verdicts"]["encapsulated"] == 1 and st["verdicts"]["decapsulated"] == 1, st["drops"]
        sa_out = scapy_sa(SPI_OUT, km_out, "transport", v, g1, g2, False)
        assert bytes(sa_out.decrypt(ip_cls(v)(l3_bytes(out[0])))) == bytes(out_plain)
        assert l3_bytes(out[1]) == bytes(in_plain)
