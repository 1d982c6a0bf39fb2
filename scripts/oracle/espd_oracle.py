"""Helpers for the oracle tests: configs, running `espd pcap`, and an
independent RFC 4303/4106 ESP builder on the `cryptography` package's AES-GCM
(used where scapy cannot go: 8/12-octet ICVs and deliberately bad packets)."""

import json
import os
import struct
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from scapy.all import IP, IPv6, Ether, rdpcap, wrpcap  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
ESPD = Path(os.environ.get("ESPD", ROOT / "target" / "release" / "espd"))

# Test addresses: 198.18.0.0/15 and 2001:db8::/32 only.
GW = {4: ("198.18.0.1", "198.18.0.2"), 6: ("2001:db8:ff::1", "2001:db8:ff::2")}
SITE = {
    4: ("198.18.1.0/24", "198.18.2.0/24", "198.18.1.10", "198.18.2.20"),
    6: ("2001:db8:1::/64", "2001:db8:2::/64", "2001:db8:1::10", "2001:db8:2::20"),
}
SPI_OUT, SPI_IN = 0x1000, 0x2000
MAC_GW1, MAC_PEER = "02:00:00:00:00:01", "02:00:00:00:00:02"


def keymat(bits, tag=0):
    """Key ‖ 4-octet salt, distinct per (bits, tag)."""
    key = bytes((i * 7 + bits + tag * 13) % 256 for i in range(bits // 8))
    salt = bytes((0xA0 + i + tag) % 256 for i in range(4))
    return key + salt


def ip_cls(v):
    return IP if v == 4 else IPv6


def state_line(src, dst, spi, reqid, mode, km, icv_bits=128, extra=""):
    """`km` is key material for AES-GCM, or an already written algorithm clause."""
    alg = km if isinstance(km, str) else f"aead 'rfc4106(gcm(aes))' 0x{km.hex()} {icv_bits}"
    return (
        f"state add src {src} dst {dst} proto esp spi {spi:#x} reqid {reqid} mode {mode} "
        f"{extra} {alg}"
    )


def gw_config(mode, inner, outer, km_out, km_in, icv_bits=128, out_extra="", in_extra=""):
    """espd as gw1: protect site A → site B (tunnel) or gw1 → gw2 (transport)."""
    g1, g2 = GW[outer]
    lines = [
        state_line(g1, g2, SPI_OUT, 1, mode, km_out, icv_bits, out_extra),
        state_line(g2, g1, SPI_IN, 2, mode, km_in, icv_bits, in_extra),
    ]
    if mode == "tunnel":
        a, b = SITE[inner][0], SITE[inner][1]
        lines += [
            f"policy add src {a} dst {b} dir out tmpl src {g1} dst {g2} proto esp reqid 1 mode tunnel",
            f"policy add src {b} dst {a} dir fwd tmpl src {g2} dst {g1} proto esp reqid 2 mode tunnel",
        ]
    else:
        lines += [
            f"policy add src {g1} dst {g2} dir out tmpl proto esp reqid 1 mode transport",
            f"policy add src {g2} dst {g1} dir in tmpl proto esp reqid 2 mode transport",
        ]
    return "\n".join(lines) + "\n"


def run_espd(tmp, conf, frames, name="t", extra_args=()):
    """Writes `frames` to a pcap, runs espd pcap, returns (output frames, stats)."""
    tmp = Path(tmp)
    (tmp / f"{name}.conf").write_text(conf)
    wrpcap(str(tmp / f"{name}.in.pcap"), frames)
    out, stats = tmp / f"{name}.out.pcap", tmp / f"{name}.stats.json"
    r = subprocess.run(
        [str(ESPD), "pcap", "-q", "--config", str(tmp / f"{name}.conf"),
         "--in", str(tmp / f"{name}.in.pcap"), "--out", str(out),
         "--stats-json", str(stats), *extra_args],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, f"espd failed: {r.stderr}"
    assert "espd pcap:" in r.stderr
    pkts = list(rdpcap(str(out))) if out.stat().st_size > 24 else []
    return pkts, json.loads(stats.read_text())


def eth(pkt, src=MAC_PEER, dst=MAC_GW1):
    return Ether(src=src, dst=dst) / pkt


def l3_bytes(frame):
    return bytes(frame)[14:]


# ---- an independent ESP (RFC 4303) with AES-GCM (RFC 4106) ----

def esp_gcm(km, spi, seq, payload, nh, icv_len=16, esn=False, iv=None,
            pad=None, pad_bytes=None, tfc=b""):
    """ESP header ‖ IV ‖ ciphertext ‖ ICV. `seq` is the full (64-bit) number.
    `pad`/`pad_bytes` override the padding to build malformed packets."""
    key, salt = km[:-4], km[-4:]
    iv = iv if iv is not None else struct.pack("!Q", seq ^ 0x5A5A)
    body = payload + tfc
    if pad is None:
        pad = (4 - (len(body) + 2) % 4) % 4
    padding = pad_bytes if pad_bytes is not None else bytes(range(1, pad + 1))
    pt = body + padding + bytes([pad, nh])
    lo = seq & 0xFFFFFFFF
    aad = struct.pack("!LLL", spi, seq >> 32, lo) if esn else struct.pack("!LL", spi, lo)
    ct = AESGCM(key).encrypt(salt + iv, pt, aad)
    ct, tag = ct[:-16], ct[-16:][:icv_len]
    return struct.pack("!LL", spi, lo) + iv + ct + tag


def esp_open(km, esp, icv_len=16, esn_hi=None):
    """Decrypts ESP made by anyone; returns (seq_lo, payload, nh)."""
    key, salt = km[:-4], km[-4:]
    spi, lo = struct.unpack("!LL", esp[:8])
    iv, ct, tag = esp[8:16], esp[16:-icv_len], esp[-icv_len:]
    aad = struct.pack("!LLL", spi, esn_hi, lo) if esn_hi is not None else esp[:8]
    import cryptography.hazmat.primitives.ciphers as c
    from cryptography.hazmat.primitives.ciphers import algorithms, modes
    # CTR decryption from inc32(J0) and GHASH via a full-tag AESGCM check:
    j0 = salt + iv + b"\x00\x00\x00\x02"
    dec = c.Cipher(algorithms.AES(key), modes.CTR(j0)).decryptor()
    pt = dec.update(ct) + dec.finalize()
    # With the plaintext, recompute the full tag and check its prefix.
    want = AESGCM(key).encrypt(salt + iv, pt, aad)[-16:][:icv_len]
    assert want == tag, "ICV does not verify"
    pad, nh = pt[-2], pt[-1]
    assert pt[-2 - pad:-2] == bytes(range(1, pad + 1)), "bad padding"
    return lo, pt[: -2 - pad], nh


# ---- the RFC 8221 algorithm set: espd's config clause and scapy's SA arguments ----

class Alg:
    """One algorithm with its keys: `clause` for espd, `scapy` kwargs for scapy."""

    def __init__(self, name, clause, scapy, tshark=None):
        self.name, self.clause, self.scapy, self.tshark = name, clause, scapy, tshark


def alg(name, tag):
    """Key material differs per `tag` so the two directions never share keys."""
    k16, k32 = keymat(128, tag)[:16], keymat(256, tag)[:32]
    a32 = keymat(256, tag + 50)[:32]
    if name == "cbc128" or name == "cbc256":
        k = k16 if name == "cbc128" else k32
        return Alg(name, f"enc 'cbc(aes)' 0x{k.hex()} auth-trunc 'hmac(sha256)' 0x{a32.hex()} 128",
                   dict(crypt_algo="AES-CBC", crypt_key=k, auth_algo="SHA2-256-128", auth_key=a32),
                   ("AES-CBC [RFC3602]", k, "HMAC-SHA-256-128 [RFC4868]", a32))
    if name == "chacha":
        km = keymat(256, tag)
        return Alg(name, f"aead 'rfc7539esp(chacha20,poly1305)' 0x{km.hex()} 128",
                   dict(crypt_algo="CHACHA20-POLY1305", crypt_key=km))
    if name == "gmac128" or name == "gmac256":
        km = keymat(128 if name == "gmac128" else 256, tag)
        return Alg(name, f"aead 'rfc4543(gcm(aes))' 0x{km.hex()} 128",
                   dict(crypt_algo="AES-NULL-GMAC", crypt_key=km))
    if name == "null":
        return Alg(name, f"enc 'ecb(cipher_null)' \"\" auth-trunc 'hmac(sha256)' 0x{a32.hex()} 128",
                   dict(crypt_algo="NULL", crypt_key=None, auth_algo="SHA2-256-128", auth_key=a32),
                   ("NULL", b"", "HMAC-SHA-256-128 [RFC4868]", a32))
    raise ValueError(name)


ALGS = ["cbc128", "cbc256", "chacha", "gmac128", "gmac256", "null"]
