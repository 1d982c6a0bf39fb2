"""tshark (Wireshark 4.0) decrypts espd's output with the configured keys and
finds every ICV good — for 16-, 12- and 8-octet ICVs, all modes and families.
(tshark cannot do ESN, so these SAs use 32-bit sequence numbers.)"""

import subprocess

import pytest
from scapy.all import UDP, wrpcap

from espd_oracle import GW, SPI_OUT, eth, gw_config, keymat, run_espd
from test_interop import SHAPES, inner_packets, shape_id

ICV_NAME = {128: "AES-GCM with 16 octet ICV [RFC4106]",
            96: "AES-GCM with 12 octet ICV [RFC4106]",
            64: "AES-GCM with 8 octet ICV [RFC4106]"}


def tshark_esp(tshark, pcap, outer, src, dst, spi, km, icv_bits, algs=None):
    """`algs` = (encryption name, key, authentication name, key) for non-GCM SAs."""
    fam = "IPv4" if outer == 4 else "IPv6"
    if algs:
        e, ek, a, ak = algs
        ekey = f"0x{ek.hex()}" if ek else ""
        uat = f'"{fam}","{src}","{dst}","0x{spi:08x}","{e}","{ekey}","{a}","0x{ak.hex()}"'
    else:
        uat = f'"{fam}","{src}","{dst}","0x{spi:08x}","{ICV_NAME[icv_bits]}","0x{km.hex()}","NULL",""'
    r = subprocess.run(
        [tshark, "-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE",
         "-o", "esp.enable_authentication_check:TRUE", "-o", f"uat:esp_sa:{uat}",
         "-Y", "esp", "-T", "fields", "-e", "esp.sequence", "-e", "esp.icv_good",
         "-e", "esp.icv_bad", "-e", "esp.decrypted_data"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return [line.split("\t") for line in r.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("icv", [128, 96, 64])
@pytest.mark.parametrize("bits", [128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_tshark_decrypts_espd_output(tmp_path, tshark, shape, bits, icv):
    mode, inner, outer = shape
    km_out, km_in = keymat(bits, 5), keymat(bits, 6)
    conf = gw_config(mode, inner, outer, km_out, km_in, icv_bits=icv)
    # UDP 9 → 9: a port no tshark dissector claims, so none can throw and
    # abort the frame before the ESP dissector records its ICV verdict.
    plain = [p for p in inner_packets(mode, inner, outer)]
    for p in plain:
        if UDP in p:
            p[UDP].sport = p[UDP].dport = 9
            del p[UDP].chksum
    plain = [p.__class__(bytes(p)) for p in plain]
    out, st = run_espd(tmp_path, conf, [eth(p) for p in plain])
    assert st["verdicts"]["encapsulated"] == len(plain)
    pcap = tmp_path / "t.out.pcap"
    g1, g2 = GW[outer]
    rows = tshark_esp(tshark, pcap, outer, g1, g2, SPI_OUT, km_out, icv)
    assert len(rows) == len(plain)
    for i, (seq, good, bad, dec) in enumerate(rows):
        assert int(seq) == i + 1
        assert (good, bad) == ("1", "0"), f"packet {i + 1}: tshark says ICV good={good} bad={bad}"
        assert dec, "tshark decrypted nothing"

    # Control: tshark does check — a flipped ciphertext bit is reported bad.
    frames = list(out)
    raw = bytearray(bytes(frames[0]))
    raw[-(icv // 8) - 3] ^= 0x01
    from scapy.all import Ether
    frames[0] = Ether(bytes(raw))
    wrpcap(str(tmp_path / "bad.pcap"), frames)
    rows = tshark_esp(tshark, tmp_path / "bad.pcap", outer, g1, g2, SPI_OUT, km_out, icv)
    assert (rows[0][1], rows[0][2]) == ("0", "1")
    assert all((r[1], r[2]) == ("1", "0") for r in rows[1:])


@pytest.mark.parametrize("name", ["cbc128", "cbc256", "null"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_tshark_checks_cbc_and_null_hmac(tmp_path, tshark, shape, name):
    """AES-CBC and NULL with HMAC-SHA-256-128 (tshark cannot do ChaCha20 or GMAC)."""
    from espd_oracle import alg
    mode, inner, outer = shape
    a_out, a_in = alg(name, 31), alg(name, 32)
    conf = gw_config(mode, inner, outer, a_out.clause, a_in.clause)
    plain = []
    for p in inner_packets(mode, inner, outer):
        if UDP in p:
            p[UDP].sport = p[UDP].dport = 9
            del p[UDP].chksum
        plain.append(p.__class__(bytes(p)))
    out, st = run_espd(tmp_path, conf, [eth(p) for p in plain])
    assert st["verdicts"]["encapsulated"] == len(plain)
    g1, g2 = GW[outer]
    rows = tshark_esp(tshark, tmp_path / "t.out.pcap", outer, g1, g2, SPI_OUT, None, 0, a_out.tshark)
    assert len(rows) == len(plain)
    for i, (seq, good, bad, dec) in enumerate(rows):
        assert int(seq) == i + 1
        assert (good, bad) == ("1", "0"), f"packet {i + 1}: good={good} bad={bad}"
