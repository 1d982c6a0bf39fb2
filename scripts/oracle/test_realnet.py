"""The live gateway on less tidy networks (issue: "real networks"), on the
topology of scripts/topo.sh:

    host A ─ gw1 (espd) ═ wire (bridge br0) ═ gw2 (espd) ─ host B

- a neighbour entry the operator made permanent stays exactly as it was
  while espd uses it (espd refreshes dynamic entries only), and traffic flows;
- a 1/2 and a 2/1 queue split serve every queue; a flood that overruns a
  worker loses exactly what the drops summary says; outer fragments of ESP
  (raw and in UDP) are reassembled before ESP in a bounded table.
"""

import re
import subprocess
import time

import pytest

from espd_oracle import ESPD
from test_gateway import Net, need, net  # noqa: F401 (net: the shared fixture)


def test_a_permanent_neighbour_entry_is_used_and_left_alone(net):
    peer_mac = net.ns("gw2", "cat", "/sys/class/net/o2/address").stdout.strip()
    net.ns("gw1", "ip", "neigh", "replace", "198.18.0.2", "lladdr", peer_mac, "dev", "o1",
           "nud", "permanent")
    before = net.ns("gw1", "ip", "neigh", "show", "198.18.0.2", "dev", "o1").stdout.strip()
    assert "PERMANENT" in before, before
    net.start("gw1")
    net.start("gw2")
    # A minute of traffic through the tunnel: twelve of espd's 5-second
    # refresh rounds.
    r = net.ns("a", "ping", "-c", "300", "-i", "0.2", "-W", "2", "198.18.2.20", check=False,
               timeout=120)
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout
    after = net.ns("gw1", "ip", "neigh", "show", "198.18.0.2", "dev", "o1").stdout.strip()
    assert after == before, (before, after)
    net.stop("gw1")
    net.stop("gw2")


def udp_rcvbuf_errors(net, ns):
    """The host's UDP receive-buffer drops (its own loss, not the tunnel's)."""
    rows = [l.split() for l in net.ns(ns, "cat", "/proc/net/snmp").stdout.splitlines()
            if l.startswith("Udp:")]
    head, vals = rows[0], rows[1]
    return int(vals[head.index("RcvbufErrors")])


FLOOD_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[1])):
    s.sendto(b"%08d" % i + b"f" * 1000, ("198.18.2.20", 9001))
"""

FLOOD_RECV = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
s.bind(("198.18.2.20", 9001))
s.settimeout(3)
got = set()
try:
    while True:
        got.add(s.recv(2000)[:8])
except socket.timeout:
    pass
print(len(got))
"""


def test_a_flood_that_overruns_a_worker_shows_its_loss_where_operators_look(net, tmp_path):
    from test_gateway import PY, drops
    # gw1's worker is made slower than the flood (a test-only knob): its
    # inside ring overruns, as a real worker's would under a bigger flood.
    net.start("gw1", args=("--metrics", "19464"), env={"ESPD_FAULT": "slow-worker"})
    net.start("gw2")
    (tmp_path / "send.py").write_text(FLOOD_SEND)
    (tmp_path / "recv.py").write_text(FLOOD_RECV)
    before = udp_rcvbuf_errors(net, "b")
    recv = net.popen("b", PY, str(tmp_path / "recv.py"), stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    n = 30000
    net.ns("a", PY, str(tmp_path / "send.py"), str(n), timeout=120)
    got = int(recv.communicate(timeout=60)[0])
    lost_at_b = udp_rcvbuf_errors(net, "b") - before
    time.sleep(0.5)  # the workers publish their counters
    scrape = net.ns("gw1", PY, "-c", "import urllib.request; print(urllib.request.urlopen("
                    "'http://127.0.0.1:19464/metrics', timeout=5).read().decode())").stdout
    s1, _ = net.stop("gw1")
    s2, _ = net.stop("gw2")
    d1, d2 = drops(s1), drops(s2)
    lost_by_espd = sum(d1.values()) + sum(d2.values())
    assert lost_by_espd > 1000, ("the flood did not overrun the worker", got, d1)
    # Every loss is named in the summary (none hidden in per-socket counters)...
    for d in (d1, d2):
        assert set(d) <= {"XskDropped", "XskRingFull"}, d
    # ... the live metrics carry the same names ...
    assert re.search(r'espd_drops_total\{reason="Xsk(Dropped|RingFull)"\} [1-9]', scrape), scrape[:3000]
    # ... and what the receiver did not get is exactly what espd counted,
    # plus what host B's own socket buffer dropped.
    assert n - got == lost_by_espd + lost_at_b, (n, got, d1, d2, lost_at_b)


@pytest.mark.parametrize("qin,qout", [(1, 2), (2, 1)])
def test_uneven_queue_counts_serve_every_queue(tmp_path, qin, qout):
    """A 1-queue inside and a 2-queue outside (and the reverse): a worker per
    queue index, each serving the queues that exist; nothing for lack of a
    socket, and 4 TCP streams pass both ways."""
    need("iperf3", "ping")
    from test_gateway import drops, iperf
    net = Net(tmp_path, qin=qin, qout=qout)
    try:
        net.start("gw1")
        net.start("gw2")
        banner = "".join(net.banner)
        assert "worker 1 (core" in banner and "sends through AF_PACKET (no queue 1)" in banner, banner
        for src, dst in (("a", "198.18.2.20"), ("b", "198.18.1.10"),
                         ("a", "2001:db8:2::20"), ("b", "2001:db8:1::10")):
            r = net.ns(src, "ping", "-c", "3", "-i", "0.2", "-W", "2", dst, check=False)
            assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout
        for client, server, dst in (("a", "b", "198.18.2.20"), ("b", "a", "198.18.1.10")):
            t = iperf(net, client, server, dst, "-P", "4")
            assert t["end"]["sum_received"]["bits_per_second"] > 20e6, t["end"]["sum_received"]
        # --queues below what the interfaces have is refused, naming the queue.
        r = net.ns("gw1", str(ESPD), "run", "-c", str(tmp_path / "gw1.conf"), "--inside", "i1",
                   "--outside", "o1", "--queues", "1", "--control", str(tmp_path / "x.sock"),
                   "--seq-file", str(tmp_path / "x.seq"), check=False)
        assert r.returncode != 0 and "unserved" in r.stderr and "ethtool -L" in r.stderr, r.stderr
        s1, _ = net.stop("gw1")
        s2, _ = net.stop("gw2")
    finally:
        net.close()
    for s in (s1, s2):
        assert len(s["workers"]) == 2
        assert s["xdp"]["no_socket"] == 0 and s["xdp"]["inside_no_socket"] == 0, s["xdp"]
        assert set(drops(s)) <= {"PacketTooBig", "XskDropped", "XskRingFull", "HandoffFull"}, drops(s)
    # The second queue was really used and served (a veth receives on the
    # queue its peer's sender hashed a flow to: with 4 flows each way, some
    # land on queue 1 of some link).
    assert any(s["workers"][1]["rx_inside"] + s["workers"][1]["rx_outside"] > 0 for s in (s1, s2)), \
        [s["workers"] for s in (s1, s2)]


FRAGS = r"""
import sys
from scapy.all import *
from scapy.layers.ipsec import SecurityAssociation, ESP
conf.verb = 0
gw_mac, k4, k6 = sys.argv[1], bytes.fromhex(sys.argv[2][2:]), bytes.fromhex(sys.argv[3][2:])
sa4 = SecurityAssociation(ESP, spi=0x2001, crypt_algo="AES-GCM", crypt_key=k4,
                          tunnel_header=IP(src="198.18.0.2", dst="198.18.0.1"))
sa6 = SecurityAssociation(ESP, spi=0x2006, crypt_algo="AES-GCM", crypt_key=k6,
                          tunnel_header=IPv6(src="2001:db8::2", dst="2001:db8::1"))
E = lambda p: Ether(dst=gw_mac) / p
def esp4(n):
    sa4.seq_num = n
    inner = IP(src="198.18.2.20", dst="198.18.1.10") / UDP(sport=7000, dport=7001) / Raw(b"reasm-%d-" % n + bytes(range(256)) * 5)
    p = sa4.encrypt(inner)
    p.id = 100 + n  # one IP id per datagram, as a sender's stack gives them
    del p.chksum
    return IP(bytes(p))
def esp6(n):
    sa6.seq_num = n
    inner = IPv6(src="2001:db8:2::20", dst="2001:db8:1::10") / UDP(sport=7000, dport=7001) / Raw(b"reasm6-%d-" % n + bytes(range(256)) * 5)
    return sa6.encrypt(inner)
out = []
f = fragment(esp4(1), fragsize=512); out += f                     # in order
f = fragment(esp4(2), fragsize=512); out += f[::-1]               # reversed
f = fragment(esp4(3), fragsize=512); out += [f[0], f[1], f[1], f[2]]  # duplicated
f = fragment(esp4(4), fragsize=512)
bad = f[1].copy(); bad[Raw].load = b"\x00" * len(bad[Raw].load); bad.frag += 16  # overlapping
out += [f[0], f[1], bad, f[2]]
f = fragment(esp4(5), fragsize=512); out += f[:-1]                # one missing
F6 = lambda p, i: fragment6(IPv6(src="2001:db8::2", dst="2001:db8::1") / IPv6ExtHdrFragment(id=i, nh=50)
                            / Raw(bytes(p)[40:]), 700)
out += F6(esp6(1), 61)                                             # IPv6, in order
out += F6(esp6(2), 62)[::-1]                                       # IPv6, reversed
sendp([E(x) for x in out], iface="br0")
print(len(out))
if len(sys.argv) > 4:  # a flood of first fragments, one source, distinct ids
    fl = [E(IP(src="198.18.0.2", dst="198.18.0.1", proto=50, id=10000 + i, flags="MF") / Raw(b"\x00" * 512))
          for i in range(int(sys.argv[4]))]
    sendp(fl, iface="br0")
"""


def test_outer_fragments_of_esp_are_reassembled_before_esp(net, tmp_path):
    from test_gateway import PY, drops, keys
    net.start("gw1")
    km = {spi: k for _, _, spi, k in keys(tmp_path / "gw1.conf")}
    pa = tmp_path / "a.pcap"
    dump = net.popen("a", "tcpdump", "--immediate-mode", "-ni", "a0", "-U", "-w", str(pa), "udp port 7001",
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    f = tmp_path / "frags.py"
    f.write_text(FRAGS)
    mac = net.ns("gw1", "cat", "/sys/class/net/o1/address").stdout.strip()
    flood = 2000
    sent = int(net.ns("wire", PY, str(f), mac, km[0x2001], km[0x2006], str(flood)).stdout)
    time.sleep(6.5)  # the incomplete datagrams time out (5 s)
    dump.send_signal(2)
    dump.wait(timeout=10)
    s1, _ = net.stop("gw1")
    from scapy.all import rdpcap, Raw
    got = sorted(bytes(p[Raw].load).split(b"-")[0] + b"-" + bytes(p[Raw].load).split(b"-")[1]
                 for p in rdpcap(str(pa)) if Raw in p)
    # The complete datagrams, byte for byte (the inner payload is checked whole).
    assert got == [b"reasm-1", b"reasm-2", b"reasm-3", b"reasm6-1", b"reasm6-2"], got
    for p in rdpcap(str(pa)):
        tail = bytes(p[Raw].load).split(b"-", 2)[2]
        assert tail == bytes(range(256)) * 5
    d = drops(s1)
    per_source = 64
    # Two datagrams of that source were left incomplete (the one missing a
    # fragment, and the overlapping one's last fragment, which came after its
    # datagram was discarded). Every fragment of the flood was refused
    # (table full for that source) or held until it timed out, and the table
    # never held more than 64 datagrams of one source. (How many of each
    # depends on how fast the flood arrives against the 5 s timeout.)
    assert d["FragDuplicate"] == 1 and d["FragOverlap"] == 1, d
    assert d["FragTableFull"] + d["FragTimeout"] == flood + 2, d
    assert d["FragTableFull"] >= flood - 10 * per_source, d
    assert set(d) == {"FragDuplicate", "FragOverlap", "FragTableFull", "FragTimeout"}, d
    w = s1["workers"][0]
    assert w["reassembled"] == 5 and w["reassembly_peak"] == per_source, w
    assert s1["xdp"]["frag_steered"] == sent + flood, s1["xdp"]


NATT_FRAGS = r"""
import sys
from scapy.all import *
from scapy.layers.ipsec import SecurityAssociation, ESP
conf.verb = 0
gw_mac, k = sys.argv[1], bytes.fromhex(sys.argv[2][2:])
sa = SecurityAssociation(ESP, spi=0x3001, crypt_algo="AES-GCM", crypt_key=k,
                         tunnel_header=IP(src="198.18.0.2", dst="198.18.0.1"),
                         nat_t_header=UDP(sport=4500, dport=4500))
E = lambda p: Ether(dst=gw_mac) / p
def esp(n):
    sa.seq_num = n
    inner = IP(src="198.18.3.3", dst="198.18.1.10") / UDP(sport=7000, dport=7001) / Raw(b"natt-%d-" % n + bytes(range(256)) * 5)
    p = sa.encrypt(inner)
    p.id = 300 + n
    del p.chksum
    del p[UDP].chksum
    return IP(bytes(p))
out = []
f = fragment(esp(1), fragsize=512); out += f                       # in order
f = fragment(esp(2), fragsize=512); out += [f[0]] + f[1:][::-1]    # first first, the rest reversed
# A fragmented IKE message (zero non-ESP marker) is the kernel's.
ike = IP(src="198.18.0.2", dst="198.18.0.1", id=400) / UDP(sport=4500, dport=4500) / (b"\x00" * 4 + b"ike" * 500)
out += fragment(ike, fragsize=512)
sendp([E(x) for x in out], iface="br0")
print(len(out) - len(fragment(ike, fragsize=512)))
"""


def test_fragments_of_esp_in_udp_are_reassembled_and_ike_stays_with_the_kernel(net, tmp_path):
    from test_gateway import PY, drops
    key = "0x" + "5a" * 20
    net.start("gw1", f"state add src 198.18.0.2 dst 198.18.0.1 proto esp spi 0x3001 reqid 5 mode tunnel "
                     f"encap espinudp 4500 4500 0.0.0.0 aead 'rfc4106(gcm(aes))' {key} 128\n"
                     "policy add src 198.18.3.0/24 dst 198.18.1.0/24 dir fwd tmpl src 198.18.0.2 "
                     "dst 198.18.0.1 proto esp reqid 5 mode tunnel\n")
    ike = net.popen("gw1", PY, "-c", "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                    "s.bind(('198.18.0.1', 4500)); s.settimeout(10); print(len(s.recv(4000)))",
                    stdout=subprocess.PIPE, text=True)
    pa = tmp_path / "a.pcap"
    dump = net.popen("a", "tcpdump", "--immediate-mode", "-ni", "a0", "-U", "-w", str(pa), "udp port 7001",
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    f = tmp_path / "natt.py"
    f.write_text(NATT_FRAGS)
    mac = net.ns("gw1", "cat", "/sys/class/net/o1/address").stdout.strip()
    steered = int(net.ns("wire", PY, str(f), mac, key).stdout)
    assert int(ike.communicate(timeout=15)[0]) == 4 + 1500, "the IKE message did not reach its socket whole"
    time.sleep(0.5)
    dump.send_signal(2)
    dump.wait(timeout=10)
    s1, _ = net.stop("gw1")
    from scapy.all import rdpcap, Raw
    got = sorted(bytes(p[Raw].load)[:7] for p in rdpcap(str(pa)) if Raw in p)
    assert got == [b"natt-1-", b"natt-2-"], got
    assert s1["xdp"]["frag_steered"] == steered, s1["xdp"]
    assert not drops(s1), drops(s1)
