"""What must not get through: each bad packet is dropped under its own reason,
counted exactly once, and nothing else in the output changes. Packets are built
with an independent ESP implementation (espd_oracle.esp_gcm on `cryptography`)."""

import pytest
from scapy.all import IP, UDP, IPv6, Raw

from espd_oracle import (GW, SITE, SPI_IN, SPI_OUT, esp_gcm, esp_open, eth,
                         gw_config, keymat, l3_bytes, run_espd)

G1, G2 = GW[4]
A, B = SITE[4][2], SITE[4][3]


def inner(n, src=B, dst=A, tos=0):
    return bytes(IP(src=src, dst=dst, tos=tos) / UDP(sport=4000, dport=5000) / Raw(b"%03d" % n))


def outer(esp, tos=0, flags=0, src=G2, dst=G1):
    return eth(IP(src=src, dst=dst, proto=50, tos=tos, flags=flags) / Raw(esp))


def test_every_bad_packet_has_its_reason(tmp_path):
    km_in = keymat(128, 8)
    conf = gw_config("tunnel", 4, 4, keymat(128, 7), km_in)
    E = lambda seq, payload, **kw: esp_gcm(km_in, SPI_IN, seq, payload, 4, **kw)  # noqa: E731
    good = {}
    frames, expect_out = [], []

    def add(frame, out_inner=None):
        frames.append(frame)
        if out_inner is not None:
            expect_out.append(out_inner)

    good[1] = E(1, inner(1))
    add(outer(good[1]), inner(1))
    bad_ct = bytearray(E(2, inner(2)))
    bad_ct[20] ^= 0x80
    add(outer(bytes(bad_ct)))  # IcvMismatch
    bad_icv = bytearray(E(3, inner(3)))
    bad_icv[-1] ^= 0x01
    add(outer(bytes(bad_icv)))  # IcvMismatch
    add(outer(E(2, inner(2))), inner(2))  # the genuine 2: the window was not moved
    add(outer(E(4, inner(4), pad=3, pad_bytes=b"\x01\x02\x09")))  # BadPadding (bytes)
    add(outer(E(5, inner(5)[:30], pad=200, pad_bytes=b"")))  # BadPadding (length)
    add(outer(E(6, inner(6))[:19]))  # Runt: ESP shorter than header+IV+ICV
    add(outer(good[1]))  # Replay
    add(outer(E(200, inner(200))), inner(200))
    add(outer(E(100, inner(100))))  # TooOld: 200 - 100 >= 64
    add(outer(E(150, inner(150))), inner(150))  # inside the window
    add(outer(esp_gcm(km_in, 0x9999, 7, inner(7), 4)))  # NoSa
    add(outer(esp_gcm(km_in, 0, 8, inner(8), 4)))  # SpiZero
    add(outer(E(201, inner(201)), flags="MF"))  # Fragment
    add(outer(esp_gcm(km_in, SPI_IN, 202, b"", 59)))  # dummy (next header 59): consumed
    add(outer(esp_gcm(km_in, SPI_IN, 203, b"not an ip packet", 17)))  # BadInner
    add(outer(E(204, inner(204, src="198.18.3.3"))))  # NoPolicy: no fwd policy covers it
    add(outer(E(205, inner(205, tos=0)), tos=0x03))  # EcnDrop: CE over Not-ECT
    add(outer(E(206, inner(206, tos=0x02)), tos=0x03), bytes(IP(inner(206, tos=0x03))))  # ECT(0) -> CE
    add(outer(E(207, inner(207) + b"\x00" * 16)), inner(207))  # TFC padding after the inner packet is removed
    bad_sum = bytearray(bytes(outer(E(208, inner(208)))))
    bad_sum[14 + 10] ^= 0xFF
    from scapy.all import Ether
    add(Ether(bytes(bad_sum)))  # BadChecksum
    add(eth(IP(bytes(IP(src=B, dst=A) / UDP(sport=1, dport=2) / Raw(b"clear")))))  # UnprotectedInbound: must arrive protected
    add(eth(IP(src="198.18.9.9", dst="198.18.9.8") / UDP() / Raw(b"bypass")), "bypass")
    add(eth(IPv6(src="2001:db8::9", dst="2001:db8::8") / UDP() / Raw(b"bypass6")), "bypass6")

    out, st = run_espd(tmp_path, conf, frames)
    got = [l3_bytes(f) for f in out]
    assert len(got) == len(expect_out)
    for g, w in zip(got, expect_out):
        if w in ("bypass", "bypass6"):
            assert g.endswith(w.encode())
        else:
            assert g == w
    want_drops = {"IcvMismatch": 2, "BadPadding": 2, "Runt": 1, "Replay": 1, "TooOld": 1,
                  "NoSa": 1, "SpiZero": 1, "Fragment": 1, "BadInner": 1, "NoPolicy": 1,
                  "EcnDrop": 1, "BadChecksum": 1, "UnprotectedInbound": 1}
    nonzero = {k: v for k, v in st["drops"].items() if v}
    assert nonzero == want_drops
    v = st["verdicts"]
    assert v["decapsulated"] == 6 and v["dummy"] == 1 and v["bypass"] == 2
    assert v["dropped"] == sum(want_drops.values())
    assert st["packets_in"] == len(frames)


@pytest.mark.parametrize("icv", [64, 96, 128])
@pytest.mark.parametrize("bits", [128, 256])
def test_truncated_icv_both_ways_rfc_arithmetic(tmp_path, bits, icv):
    """RFC 4106 §6 8/12-octet ICVs: scapy cannot, so the oracle is the RFC
    arithmetic on `cryptography`'s AES-GCM (the ICV is the tag's prefix)."""
    km_out, km_in = keymat(bits, 9), keymat(bits, 10)
    conf = gw_config("tunnel", 4, 4, km_out, km_in, icv_bits=icv)
    n = icv // 8
    ins = [inner(i) for i in range(1, 6)]
    frames = [outer(esp_gcm(km_in, SPI_IN, i + 1, p, 4, icv_len=n)) for i, p in enumerate(ins)]
    plain_out = [eth(IP(src=A, dst=B) / UDP(sport=9, dport=9) / Raw(b"o" * i)) for i in range(5)]
    out, st = run_espd(tmp_path, conf, frames + plain_out)
    assert st["verdicts"]["decapsulated"] == 5 and st["verdicts"]["encapsulated"] == 5
    assert [l3_bytes(f) for f in out[:5]] == ins
    for i, f in enumerate(out[5:]):
        esp = l3_bytes(f)[20:]
        seq, payload, nh = esp_open(km_out, esp, icv_len=n)
        assert (seq, nh) == (i + 1, 4)
        assert payload == l3_bytes(plain_out[i])
    # A wrong ICV of the short length is refused too.
    bad = bytearray(esp_gcm(km_in, SPI_IN, 50, inner(50), 4, icv_len=n))
    bad[-1] ^= 1
    _, st = run_espd(tmp_path, conf, [outer(bytes(bad))], name="bad")
    assert st["drops"]["IcvMismatch"] == 1


def test_sequence_number_never_cycles(tmp_path):
    """RFC 4303 §3.3.3: 32-bit counter at 2^32 - 2 sends two more, then the SA
    is exhausted (SeqCycled) — it never wraps to 0."""
    km = keymat(128, 11)
    conf = gw_config("tunnel", 4, 4, km, keymat(128, 12), out_extra="replay-oseq 0xfffffffd")
    plain = [eth(IP(src=A, dst=B) / UDP() / Raw(b"%d" % i)) for i in range(4)]
    out, st = run_espd(tmp_path, conf, plain)
    assert len(out) == 2
    assert [esp_open(km, l3_bytes(f)[20:])[0] for f in out] == [0xFFFFFFFE, 0xFFFFFFFF]
    assert st["drops"]["SeqCycled"] == 2
    sa = next(s for s in st["sas"] if s["spi"] == f"0x{SPI_OUT:08x}")
    assert sa["exhausted"] is True and sa["oseq"] == 0xFFFFFFFF


def test_esn_sequence_continues_past_2_32(tmp_path):
    km = keymat(256, 13)
    conf = gw_config("tunnel", 4, 4, km, keymat(256, 14),
                     out_extra="flag esn replay-oseq 0xfffffffd replay-oseq-hi 0")
    plain = [eth(IP(src=A, dst=B) / UDP() / Raw(b"%d" % i)) for i in range(4)]
    out, st = run_espd(tmp_path, conf, plain)
    assert len(out) == 4 and st["drops"]["SeqCycled"] == 0
    his = [0, 0, 1, 1]
    los = [0xFFFFFFFE, 0xFFFFFFFF, 0, 1]
    for f, hi, lo in zip(out, his, los):
        seq, payload, nh = esp_open(km, l3_bytes(f)[20:], esn_hi=hi)
        assert seq == lo


def test_both_directions_of_a_capture_our_own_esp_is_not_opened(tmp_path):
    """A capture of both directions: the ESP this gateway sent (to G2) comes
    through again. It is counted as OwnEsp and never decrypted (RFC 4301
    §4.4.2: inbound SAs are looked up for our own addresses only), while the
    peer's ESP to us is decapsulated as usual."""
    km_in = keymat(128, 8)
    conf = gw_config("tunnel", 4, 4, keymat(128, 7), km_in)
    plain = [eth(IP(bytes(IP(src=A, dst=B) / UDP(sport=4000, dport=5000) / Raw(b"%03d" % i))))
             for i in range(3)]
    sent, st = run_espd(tmp_path, conf, plain, name="out")
    assert st["verdicts"]["encapsulated"] == 3
    peer = [outer(esp_gcm(km_in, SPI_IN, i + 1, inner(i), 4)) for i in range(2)]
    out, st = run_espd(tmp_path, conf, sent + peer, name="both")
    assert [l3_bytes(f) for f in out] == [inner(0), inner(1)]
    assert {k: n for k, n in st["drops"].items() if n} == {"OwnEsp": 3}
