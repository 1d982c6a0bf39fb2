"""Fail closed: what a PROTECT policy selects never crosses in plaintext, in
any state of espd (issue: "Fail closed"), on the gateway topology of
scripts/topo.sh:

    host A ─ gw1 (espd) ═ wire (bridge br0, captured) ═ gw2 (espd) ─ host B
    198.18.1.0/24                                          198.18.2.0/24
    2001:db8:1::/64                                        2001:db8:2::/64

- forged plaintext sent from the wire to a gateway (ICMP, UDP, TCP SYN, IPv4
  and IPv6, non-first fragments, an ICMP error quoting a protected packet) is
  never delivered and is counted once under its reason; traffic to the
  gateway itself (IKE on UDP 500, ping) is still answered; BYPASS traffic is
  still forwarded;
- for SIGTERM, SIGKILL, a panicking worker and a failed attach, hosts
  sending v4 and v6 at 50 pps put 0 plaintext frames of the protected
  subnets on the wire, before, during and after; `espd down` lifts the guard
  (and then plaintext does cross, so the test can tell the guard from a
  broken topology);
- kill -9 during a numbered UDP stream and restart: the stream resumes within
  1 s, the peer counts 0 Replay drops, nothing is delivered twice;
- a reflected copy of gw1's own ESP is dropped by XDP before any crypto.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from espd_oracle import ESPD
from test_gateway import PY, drops, net, sh  # noqa: F401 (net: the shared fixture)


def mac(net, gw, dev):
    return net.ns(gw, "cat", f"/sys/class/net/{dev}/address").stdout.strip()


def send_from_wire(net, tmp_path, script, *args):
    """Runs a scapy script in the wire namespace (it sends on br0)."""
    f = tmp_path / "wire_send.py"
    f.write_text("import sys\nfrom scapy.all import *\nconf.verb = 0\n" + script)
    net.ns("wire", PY, str(f), *args)


def capture(net, ns, dev, path, filt="ip or ip6"):
    # Immediate mode: without it the packets of the last, partly filled ring
    # block are lost when tcpdump stops, which could hide a leak.
    p = net.popen(ns, "tcpdump", "--immediate-mode", "-ni", dev, "-U", "-w", str(path), filt,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    return p


def stop_capture(p):
    p.send_signal(signal.SIGINT)
    p.wait(timeout=10)


def count(path, filt):
    r = sh("tcpdump", "-nr", str(path), filt, check=False)
    return len([l for l in r.stdout.splitlines() if l.strip()])


# Plaintext of the protected subnets, either direction (ESP between the
# gateways has outer addresses 198.18.0.x / 2001:db8::x and never matches).
PLAIN = ("(ip and net 198.18.1.0/24 and net 198.18.2.0/24) or "
         "(ip6 and net 2001:db8:1::/64 and net 2001:db8:2::/64)")

FORGE = r"""
gw_mac, tag = sys.argv[1], sys.argv[2]
E = lambda: Ether(dst=gw_mac)
a4, b4, a6, b6 = "198.18.1.10", "198.18.2.20", "2001:db8:1::10", "2001:db8:2::20"
if tag == "gw2":  # the same, forged towards site B
    a4, b4, a6, b6 = b4, a4, b6, a6
m = lambda k: Raw(b"forged-" + k.encode() + b"-" + b"x" * 40)
quoted = bytes(IP(src=a4, dst=b4) / UDP(sport=5000, dport=5001) / (b"q" * 8))[:28]
frames = [
    E() / IP(src=b4, dst=a4) / ICMP() / m("icmp4"),
    E() / IP(src=b4, dst=a4) / UDP(sport=5000, dport=5001) / m("udp4"),
    E() / IP(src=b4, dst=a4) / TCP(sport=5000, dport=22, flags="S") / m("tcp4"),
    # A non-first fragment of a protected flow (no ports to match on).
    E() / IP(src=b4, dst=a4, proto=17, frag=100, id=7) / m("frag4"),
    # An ICMP error from a wire address about an A->B packet (RFC 4301 §6.1.1).
    E() / IP(src="198.18.0.99", dst=a4) / ICMP(type=3, code=1) / Raw(quoted) / m("icmperr4"),
    E() / IPv6(src=b6, dst=a6) / ICMPv6EchoRequest() / m("icmp6"),
    E() / IPv6(src=b6, dst=a6) / UDP(sport=5000, dport=5001) / m("udp6"),
    E() / IPv6(src=b6, dst=a6) / TCP(sport=5000, dport=22, flags="S") / m("tcp6"),
    E() / IPv6(src=b6, dst=a6) / IPv6ExtHdrFragment(offset=100, m=0, id=7, nh=17) / m("frag6"),
]
sendp(frames, iface="br0")
if tag == "gw1":
    # BYPASS (a policy of gw1's config lets this one through in clear).
    sendp(E() / IP(src=b4, dst="198.18.1.99") / UDP(sport=5000, dport=5001) / Raw(b"bypass-ok"),
          iface="br0")
"""
N_FORGED = 9


def test_forged_plaintext_from_the_wire_is_dropped_and_counted(net, tmp_path):
    # Host A also answers 198.18.1.99, which a BYPASS policy of gw1 exempts.
    net.ns("a", "ip", "addr", "add", "198.18.1.99/24", "dev", "a0")
    conf = tmp_path / "gw1.conf"
    conf.write_text(conf.read_text().replace("dir fwd tmpl src 198.18.0.2", "dir fwd priority 100 tmpl src 198.18.0.2"))
    net.start("gw1", "policy add src 198.18.2.0/24 dst 198.18.1.99/32 dir fwd priority 10\n")
    net.start("gw2")
    pa, pb = tmp_path / "a.pcap", tmp_path / "b.pcap"
    da, db = capture(net, "a", "a0", pa), capture(net, "b", "b0", pb)
    send_from_wire(net, tmp_path, FORGE, mac(net, "gw1", "o1"), "gw1")
    send_from_wire(net, tmp_path, FORGE, mac(net, "gw2", "o2"), "gw2")
    # Traffic to the gateway itself still works: ping its outside address,
    # and IKE to UDP 500 reaches a socket there.
    assert net.ns("gw2", "ping", "-c", "1", "-W", "2", "198.18.0.1", check=False).returncode == 0
    assert net.ns("gw2", "ping", "-6", "-c", "1", "-W", "2", "2001:db8::1", check=False).returncode == 0
    ike = net.popen("gw1", PY, "-c", "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                    "s.bind(('198.18.0.1', 500)); s.settimeout(10); print(s.recvfrom(100)[0].decode())",
                    stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    net.ns("gw2", PY, "-c", "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
           "s.bind(('198.18.0.2', 500)); s.sendto(b'ike-sa-init', ('198.18.0.1', 500))")
    assert ike.communicate(timeout=15)[0].strip() == "ike-sa-init"
    time.sleep(0.5)
    stop_capture(da)
    stop_capture(db)
    for p in (pa, pb):
        got = sh("tcpdump", "-nAr", str(p), check=False).stdout
        assert "forged-" not in got, f"forged plaintext delivered on {p.name}:\n{got[:2000]}"
    assert "bypass-ok" in sh("tcpdump", "-nAr", str(pa), check=False).stdout, "BYPASS not forwarded"
    s1, _ = net.stop("gw1")
    s2, _ = net.stop("gw2")
    # Each forged packet counted once: steered by XDP to the inbound policy
    # check (the selectors name a source, so XDP alone cannot decide) and
    # dropped there; the bypass one steered and forwarded.
    assert drops(s1) == {"UnprotectedInbound": N_FORGED}, drops(s1)
    assert drops(s2) == {"UnprotectedInbound": N_FORGED}, drops(s2)
    assert s1["xdp"]["plain_steered"] == N_FORGED + 1
    assert s2["xdp"]["plain_steered"] == N_FORGED
    assert s1["workers"][0]["bypass"] == 1


def test_a_prefix_only_protect_policies_select_is_dropped_in_xdp(net, tmp_path):
    """Where the selectors allow (any source, protocol and port, nothing
    overlapping), XDP drops the plaintext itself."""
    conf = tmp_path / "gw1.conf"
    conf.write_text(conf.read_text().replace(
        "policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir fwd",
        "policy add src 0.0.0.0/0 dst 198.18.1.0/24 dir fwd"))
    net.start("gw1")
    pa = tmp_path / "a.pcap"
    da = capture(net, "a", "a0", pa)
    send_from_wire(net, tmp_path, FORGE, mac(net, "gw1", "o1"), "gw1")
    time.sleep(0.5)
    stop_capture(da)
    assert "forged-" not in sh("tcpdump", "-nAr", str(pa), check=False).stdout
    s1, _ = net.stop("gw1")
    # The five IPv4 packets to site A and the one to 198.18.1.99 (no bypass
    # here); the IPv6 ones still go through the engine (its fwd policy names
    # a source).
    assert s1["xdp"]["unprotected_inbound"] == 6, s1["xdp"]
    # The summary counts both places; the worker only the engine's.
    assert drops(s1) == {"UnprotectedInbound": 10}, drops(s1)
    assert s1["workers"][0]["drops"] == {"UnprotectedInbound": 4}


def pingers(net):
    """v4 and v6 at 50 pps from both hosts."""
    out = []
    for src, dst in (("a", "198.18.2.20"), ("a", "2001:db8:2::20"),
                     ("b", "198.18.1.10"), ("b", "2001:db8:1::10")):
        out.append(net.popen(src, "ping", "-i", "0.02", "-W", "1", dst,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return out


@pytest.mark.parametrize("how", ["sigterm", "sigkill", "panic", "attach"])
def test_no_plaintext_on_the_wire_whatever_happens_to_espd(net, tmp_path, how):
    net.start("gw2")
    # The guard exists from espd's first start on; before it the host is a
    # plain router. So: espd runs, then the hosts start sending.
    net.start("gw1")
    wire = tmp_path / "wire.pcap"
    dump = capture(net, "wire", "br0", wire)
    pings = pingers(net)
    try:
        time.sleep(1.5)  # running: the tunnel carries the pings
        if how in ("sigterm", "sigkill"):
            p = net.procs.pop("gw1")
            p.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
            err = p.communicate(timeout=30)[1]
            if how == "sigterm":
                assert p.returncode == 0 and "the guard stays" in err, err
        else:
            net.stop("gw1")
            # A worker that panics on its first packet; an attach that fails.
            fault = {"panic": "worker-panic", "attach": "attach"}[how]
            conf = tmp_path / "gw1.conf"
            seq = tmp_path / "gw1.seq"
            p = net.popen("gw1", "env", f"ESPD_FAULT={fault}", str(ESPD), "run", "-c", str(conf),
                          "--inside", "i1", "--outside", "o1", "--control", net.sock("gw1"),
                          "--seq-file", str(seq), "-q", stderr=subprocess.PIPE, text=True)
            err = p.communicate(timeout=30)[1]
            assert p.returncode != 0, err
            assert ("panicked" in err) if how == "panic" else ("injected failure" in err), err
        assert net.xdp_attached("gw1") == [], "XDP left attached"
        time.sleep(2)  # espd gone: the guard alone
        # Starting again: the tunnel comes back.
        net.start("gw1")
        time.sleep(1.5)
        assert net.ns("a", "ping", "-c", "2", "-W", "2", "198.18.2.20", check=False).returncode == 0
        net.stop("gw1")
        time.sleep(1)  # stopped cleanly: still guarded
        # The kernel's XFRM policies are espd's guard, and `ip xfrm` shows them.
        assert net.ns("gw1", "ip", "xfrm", "policy").stdout.count("proto esp") == 4
        time.sleep(0.5)
        stop_capture(dump)
        guarded = count(wire, PLAIN)
        # Lifting the guard: now the kernel forwards A's traffic in clear.
        dump = capture(net, "wire", "br0", tmp_path / "after.pcap")
        r = net.ns("gw1", str(ESPD), "down", "--control", net.sock("gw1"))
        assert "removed 4 kernel XFRM policies" in r.stderr, r.stderr
        assert net.ns("gw1", "ip", "xfrm", "policy").stdout.strip() == ""
        time.sleep(1.5)
    finally:
        for p in pings:
            p.kill()
            p.wait()
    stop_capture(dump)
    assert guarded == 0, (f"{guarded} plaintext frames of the protected subnets on the wire ({how}):\n"
                          + sh("tcpdump", "-tttnner", str(wire), PLAIN, check=False).stdout[:3000])
    assert count(wire, "esp") > 100, "the tunnel carried nothing: the test saw no traffic at all"
    lifted = count(tmp_path / "after.pcap", PLAIN)
    assert lifted > 20, f"after espd down, only {lifted} plaintext frames: the topology is broken"


def test_espd_down_is_refused_while_espd_runs(net):
    net.start("gw1")
    r = net.ns("gw1", str(ESPD), "down", "--control", net.sock("gw1"), check=False)
    assert r.returncode != 0 and "espd is running here" in r.stderr, r.stderr
    assert net.ns("gw1", "ip", "xfrm", "policy").stdout.count("proto esp") == 4


STREAM_SEND = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n, rate = int(sys.argv[1]), float(sys.argv[2])
t0 = time.monotonic()
for i in range(n):
    s.sendto(b"%d" % i, ("198.18.2.20", 9000))
    time.sleep(max(0, t0 + (i + 1) / rate - time.monotonic()))
"""

STREAM_RECV = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.18.2.20", 9000))
s.settimeout(3)
out = open(sys.argv[1], "w")
try:
    while True:
        d, _ = s.recvfrom(100)
        out.write("%s %.6f\n" % (d.decode(), time.time()))
        out.flush()
except socket.timeout:
    pass
"""


def test_restart_after_kill_resumes_within_a_second_without_replay(net, tmp_path):
    net.start("gw1")
    net.start("gw2")
    (tmp_path / "send.py").write_text(STREAM_SEND)
    (tmp_path / "recv.py").write_text(STREAM_RECV)
    got = tmp_path / "got.txt"
    recv = net.popen("b", PY, str(tmp_path / "recv.py"), str(got))
    time.sleep(0.5)
    rate = 200
    send = net.popen("a", PY, str(tmp_path / "send.py"), str(rate * 8), str(rate))
    time.sleep(3)
    p = net.procs.pop("gw1")
    p.kill()
    p.wait()
    net.start("gw1")
    restarted = time.time()
    send.wait(timeout=60)
    recv.wait(timeout=60)
    rows = [l.split() for l in got.read_text().splitlines()]
    seqs = [int(r[0]) for r in rows]
    assert len(seqs) == len(set(seqs)), "a datagram was delivered twice"
    after = [float(r[1]) for r in rows if float(r[1]) > restarted]
    assert after, "nothing arrived after the restart"
    assert after[0] - restarted < 1.0, f"the stream resumed {after[0] - restarted:.2f} s after the restart"
    # The stream ran to its end, with only the outage missing.
    assert seqs[-1] == rate * 8 - 1
    assert len(seqs) > rate * 6, len(seqs)
    s2, _ = net.stop("gw2")
    assert "Replay" not in drops(s2) and "TooOld" not in drops(s2), drops(s2)
    s1, _ = net.stop("gw1")
    # gw1 continued its sequence numbers past what it had recorded.
    out = {x["spi"]: x for x in s1["sas"]}["0x00001001"]
    assert out["oseq"] > 1 << 22, out
    seq = (tmp_path / "gw1.seq").read_text()
    assert seq.startswith("espd-oseq v2 clean"), seq
    assert oct(os.stat(tmp_path / "gw1.seq").st_mode & 0o777) == "0o600"


REFLECT = r"""
from scapy.all import rdpcap
gw_mac = sys.argv[2]
esp = [p for p in rdpcap(sys.argv[1]) if ESP in p and p[Ether].dst != gw_mac][:4]
for p in esp:  # gw1's own ESP to gw2, sent back to gw1
    p[Ether].dst = gw_mac
sendp(esp, iface="br0")
print(len(esp))
"""


def test_our_own_esp_reflected_back_is_dropped_before_any_crypto(net, tmp_path):
    net.start("gw1")
    net.start("gw2")
    pcap = tmp_path / "wire.pcap"
    dump = capture(net, "wire", "br0", pcap, "esp and (src 198.18.0.1 or src 2001:db8::1)")
    for dst in ("198.18.2.20", "2001:db8:2::20"):
        assert net.ns("a", "ping", "-c", "2", "-W", "2", dst, check=False).returncode == 0
    time.sleep(0.5)
    stop_capture(dump)
    net.stop("gw2")
    f = tmp_path / "reflect.py"
    f.write_text("import sys\nfrom scapy.all import *\nconf.verb = 0\n" + REFLECT)
    n = int(net.ns("wire", PY, str(f), str(pcap), mac(net, "gw1", "o1")).stdout)
    v6 = count(pcap, "ip6")
    assert n >= 3 and 0 < v6 < n, (n, v6)  # both families
    time.sleep(0.5)
    s1, _ = net.stop("gw1")
    assert s1["xdp"]["own_esp"] == n, s1["xdp"]
    assert drops(s1) == {"OwnEsp": n}, drops(s1)
    # No worker saw them: nothing decrypted, nothing counted against the SAs.
    assert s1["workers"][0]["drops"] == {}, s1["workers"]
    assert all(not x["drops"] for x in s1["sas"]), s1["sas"]


def kernel_policies(net, gw):
    """`ip xfrm policy` entries as (dir, src, dst, has an ESP template)."""
    out, cur = [], None
    for line in net.ns(gw, "ip", "xfrm", "policy").stdout.splitlines():
        w = line.split()
        if w and w[0] == "src":
            cur = [None, w[1], w[3], False]
            out.append(cur)
        elif w and w[0] == "dir" and cur:
            cur[0] = w[1]
        elif "proto esp" in line and cur:
            cur[3] = True
    return sorted(tuple(x) for x in out)


def test_the_guard_follows_espctl_changes(net, tmp_path):
    from test_control import ctl
    net.start("gw1")
    assert len(kernel_policies(net, "gw1")) == 4
    ctl(net, "gw1", "policy", "add", "src", "198.18.1.0/24", "dst", "198.18.3.0/24", "dir", "out",
        "tmpl", "src", "198.18.0.1", "dst", "198.18.0.3", "proto", "esp", "reqid", "9", "mode", "tunnel")
    assert ("out", "198.18.1.0/24", "198.18.3.0/24", True) in kernel_policies(net, "gw1")
    # PROTECT becomes BYPASS: the kernel entry loses its template.
    ctl(net, "gw1", "policy", "update", "src", "198.18.1.0/24", "dst", "198.18.3.0/24", "dir", "out")
    assert ("out", "198.18.1.0/24", "198.18.3.0/24", False) in kernel_policies(net, "gw1")
    ctl(net, "gw1", "policy", "delete", "src", "198.18.1.0/24", "dst", "198.18.3.0/24", "dir", "out")
    assert len(kernel_policies(net, "gw1")) == 4
    # A bad batch changes nothing, in the kernel either.
    bad = tmp_path / "bad.batch"
    bad.write_text("policy add src 198.18.1.0/24 dst 198.18.4.0/24 dir out tmpl src 198.18.0.1 "
                   "dst 198.18.0.4 proto esp reqid 4 mode tunnel\npolicy add nonsense\n")
    assert ctl(net, "gw1", "-b", str(bad), check=False).returncode != 0
    assert len(kernel_policies(net, "gw1")) == 4
    # The next start with fewer policies removes what the config no longer has.
    net.stop("gw1")
    conf = tmp_path / "gw1.conf"
    conf.write_text("\n".join(l for l in conf.read_text().splitlines() if "2001:db8" not in l) + "\n")
    net.start("gw1")
    assert sorted(x[1] for x in kernel_policies(net, "gw1")) == ["198.18.1.0/24", "198.18.2.0/24"]
