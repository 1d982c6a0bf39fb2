"""SA bundles (RFC 4301 §4.5: nested SAs; `ip xfrm policy … tmpl … tmpl …`):
transport mode end to end A ⇄ B inside a tunnel A ⇄ gateway G. espd is host A;
scapy builds and unwraps both layers."""

import pytest
from scapy.all import UDP, Raw
from scapy.layers.ipsec import ESP, SecurityAssociation

from espd_oracle import eth, ip_cls, keymat, l3_bytes, run_espd

HOSTS = {4: ("198.18.1.10", "198.18.2.20", "198.18.0.2"),
         6: ("2001:db8:1::10", "2001:db8:2::20", "2001:db8:ff::2")}


def conf(v):
    a, b, g = HOSTS[v]
    k = {i: keymat(128 if i % 2 else 256, 40 + i).hex() for i in range(4)}
    gcm = "aead 'rfc4106(gcm(aes))'"
    return "\n".join([
        f"state add src {a} dst {b} proto esp spi 0x3001 reqid 31 mode transport {gcm} 0x{k[0]} 128",
        f"state add src {b} dst {a} proto esp spi 0x3002 reqid 32 mode transport {gcm} 0x{k[1]} 128",
        f"state add src {a} dst {g} proto esp spi 0x3003 reqid 33 mode tunnel {gcm} 0x{k[2]} 128",
        f"state add src {g} dst {a} proto esp spi 0x3004 reqid 34 mode tunnel {gcm} 0x{k[3]} 128",
        f"policy add src {a} dst {b} dir out tmpl proto esp reqid 31 mode transport tmpl src {a} dst {g} proto esp reqid 33 mode tunnel",
        f"policy add src {b} dst {a} dir in tmpl proto esp reqid 32 mode transport tmpl src {g} dst {a} proto esp reqid 34 mode tunnel",
    ]) + "\n", k


def sas(v, k):
    a, b, g = HOSTS[v]
    L = ip_cls(v)
    mk = lambda spi, key, tun=None: SecurityAssociation(  # noqa: E731
        ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=bytes.fromhex(key), tunnel_header=tun)
    return {
        "a2b": mk(0x3001, k[0]), "b2a": mk(0x3002, k[1]),
        "a2g": mk(0x3003, k[2], L(src=a, dst=g)), "g2a": mk(0x3004, k[3], L(src=g, dst=a)),
    }


@pytest.mark.parametrize("v", [4, 6])
def test_bundle_outbound(tmp_path, v):
    a, b, g = HOSTS[v]
    text, k = conf(v)
    s = sas(v, k)
    plain = [ip_cls(v)(bytes(ip_cls(v)(src=a, dst=b) / UDP(sport=7, dport=9) / Raw(b"n" * i))) for i in range(6)]
    out, st = run_espd(tmp_path, text, [eth(p) for p in plain])
    assert st["verdicts"]["encapsulated"] == len(plain)
    for f, want in zip(out, plain):
        outer = ip_cls(v)(l3_bytes(f))
        assert (outer.src, outer.dst, outer[ESP].spi) == (a, g, 0x3003)
        mid = s["a2g"].decrypt(outer)
        assert (mid.src, mid.dst, mid[ESP].spi) == (a, b, 0x3001)  # transport ESP inside
        assert bytes(s["a2b"].decrypt(mid)) == bytes(want)


@pytest.mark.parametrize("v", [4, 6])
def test_bundle_inbound_and_incomplete_paths(tmp_path, v):
    a, b, g = HOSTS[v]
    text, k = conf(v)
    s = sas(v, k)
    L = ip_cls(v)
    plain = [L(bytes(L(src=b, dst=a) / UDP(sport=9, dport=7) / Raw(b"m" * i))) for i in range(6)]
    frames = []
    for i, p in enumerate(plain):
        s["b2a"].seq_num, s["g2a"].seq_num = i + 1, i + 1
        frames.append(eth(s["g2a"].encrypt(s["b2a"].encrypt(p))))
    # Incomplete paths: through the tunnel only, and through the transport SA only.
    s["g2a"].seq_num = 100
    frames.append(eth(s["g2a"].encrypt(plain[0])))
    s["b2a"].seq_num = 100
    frames.append(eth(s["b2a"].encrypt(plain[0])))
    out, st = run_espd(tmp_path, text, frames)
    assert [l3_bytes(f) for f in out] == [bytes(p) for p in plain]
    assert st["verdicts"]["decapsulated"] == len(plain)
    assert {k_: n for k_, n in st["drops"].items() if n} == {"PolicyMismatch": 2}
