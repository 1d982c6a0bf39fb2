"""Host mode (`espd run --host`): espd protects the traffic its own host sends
and receives (issue "espd as the host's own IPsec"), on the namespaces of
scripts/topo.sh, with gw1 and gw2 as the two hosts:

    gw1 (198.18.0.1, 2001:db8::1) ═ wire (bridge br0, captured) ═ gw2 (198.18.0.2, 2001:db8::2)

Each runs `espd run --host --outside oN` with transport-mode AES-GCM SAs to
the other for IPv4 and IPv6. Checked:
- ping, TCP and UDP both ways over both families, the wire carrying only ESP,
  tshark decrypting every ESP packet with the configured keys, ICVs good;
- the kernel side: host table 4303 with the pair routes (and the policy's own
  address as their source) over `prohibit` routes, the rule, and the guard's
  entries bound to the outside device (out) and letting marked packets by (in);
- forged plaintext from the wire (ICMP echo, UDP, v4 and v6, source the peer's
  address) is never delivered, with espd running and killed;
- SIGKILL and SIGTERM during 50 pps pings of both families: 0 plaintext
  frames on the wire; after SIGTERM the host's sends fail (EACCES) instead of
  leaking; after a restart the pings flow again; `espd down` removes the pair,
  table and rule (and plaintext then crosses: the guard was what held it);
- policy changes through espctl move the host routes (removed, added back);
- the MTU: the pair routes carry it (DF up to it, EMSGSIZE beyond); 3000 and
  8000 octet pings without DF, fragmented by the kernel, go as whole
  datagrams in ESP fragmented after encapsulation, both families; a probe
  past the route MTU gets espd's ICMP at the socket; 1485/1505 octet
  datagrams in fragmented ESP from the wire are delivered;
- the nested case: gw1 as a host with a tunnel to the gateway gw2 and a
  transport-mode SA to host B behind it (espd --host there too): the wire
  between gw1 and gw2 carries ESP whose decryption (tunnel key) is ESP again
  (the transport SA's SPI), and the link between gw2 and B (a second bridge)
  carries that transport SA alone, which B decapsulates.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from espd_oracle import ESPD, ROOT
from test_failclosed import capture as fc_capture, stop_capture
from test_gateway import IN_CI, PY, Net, esp_uat, need, sh
import test_ike as T

ESPCTL = str(ROOT / "target" / "release" / "espctl")
GCM = "aead 'rfc4106(gcm(aes))'"
ADDR = {"gw1": ("198.18.0.1", "2001:db8::1"), "gw2": ("198.18.0.2", "2001:db8::2")}


def key():
    return "0x" + os.urandom(20).hex()


def host_confs(tmp):
    """Transport-mode SA pairs gw1 ⇄ gw2 for both families; (src, dst, spi, key) of each."""
    (a4, a6), (b4, b6) = ADDR["gw1"], ADDR["gw2"]
    sas = [(a4, b4, 0x1001, key()), (b4, a4, 0x2001, key()),
           (a6, b6, 0x1006, key()), (b6, a6, 0x2006, key())]
    states = "\n".join(f"state add src {s} dst {d} proto esp spi {spi:#x} reqid {spi & 0xff} "
                       f"mode transport {GCM} {k} 128" for s, d, spi, k in sas)
    for gw, (me4, me6), (peer4, peer6) in (("gw1", ADDR["gw1"], ADDR["gw2"]),
                                           ("gw2", ADDR["gw2"], ADDR["gw1"])):
        lines = [states]
        for me, peer in ((me4, peer4), (me6, peer6)):
            out = next(s for s in sas if s[0] == me)[2] & 0xff
            inn = next(s for s in sas if s[1] == me and s[0] == peer)[2] & 0xff
            lines.append(f"policy add src {me} dst {peer} dir out tmpl proto esp reqid {out} mode transport")
            lines.append(f"policy add src {peer} dst {me} dir in tmpl proto esp reqid {inn} mode transport")
        p = tmp / f"{gw}.conf"
        p.write_text("\n".join(lines) + "\n")
        p.chmod(0o600)
    return sas


class Hosts(Net):
    def start_host(self, ns, outside, conf, sock=None, core="0", args=()):
        sock = sock or str(self.tmp / f"{ns}.sock")
        p = self.popen(ns, str(ESPD), "run", "--host", "-c", str(conf), "--outside", outside,
                       "--cores", core, "--stats-json", str(self.tmp / f"{ns}.json"),
                       "--control", sock, "--seq-file", str(self.tmp / f"{ns}.seq"), "-q", *args,
                       stderr=subprocess.PIPE, text=True)
        self.procs[ns] = p
        lines = [p.stderr.readline()]
        while "host mode:" not in lines[-1]:
            assert lines[-1], "".join(lines) + p.stderr.read()
            lines.append(p.stderr.readline())
        time.sleep(0.3)
        return p

    def start(self, gw, args=(), **_):
        core = "0" if gw == "gw1" else str(1 % os.cpu_count())
        return self.start_host(gw, {"gw1": "o1", "gw2": "o2"}[gw], self.tmp / f"{gw}.conf",
                               sock=self.sock(gw), core=core, args=args)

    def kill(self, gw, sig=signal.SIGKILL):
        p = self.procs.pop(gw)
        p.send_signal(sig)
        err = p.communicate(timeout=30)[1]
        return p.returncode, err


@pytest.fixture
def hosts(tmp_path):
    need("iperf3", "ping")
    n = Hosts(tmp_path)
    n.sas = host_confs(tmp_path)
    try:
        yield n
    finally:
        n.close()


def capture(net, path, bridge="br0"):
    """tcpdump on a wire bridge (immediate mode, so nothing is lost at the stop)."""
    return fc_capture(net, "wire", bridge, path)


stop = stop_capture


def plaintext(pcap):
    """Frames on the wire that are not ESP, apart from neighbour discovery, MLD and IGMP."""
    r = sh("tcpdump", "-nr", str(pcap), "not esp and not icmp6 and not igmp and not (ip6 and ip6[6] = 0)")
    return r.stdout.strip()


def tshark_rows(pcap, sas):
    tshark = shutil.which("tshark")
    if tshark is None:
        if IN_CI:
            pytest.fail("tshark missing in CI")
        pytest.skip("needs tshark")
    uat = esp_uat(sas)
    r = sh(tshark, "-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE",
           "-o", "esp.enable_authentication_check:TRUE", *uat, "-Y", "esp",
           "-T", "fields", "-e", "esp.spi", "-e", "esp.icv_good", "-e", "esp.icv_bad",
           "-e", "ip.proto", "-e", "ipv6.nxt", timeout=300)
    return [line.split("\t") for line in r.stdout.splitlines() if line.strip()]


def iperf(net, client, server, dst, *extra, secs=1):
    srv = net.popen(server, "iperf3", "-s", "-1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        r = net.ns(client, "iperf3", "-c", dst, "-t", str(secs), *extra, timeout=60)
    finally:
        srv.wait(timeout=30)
    return r.stdout


def ping(net, ns, dst, n=5):
    return net.ns(ns, "ping", "-c", str(n), "-i", "0.05", "-W", "2", dst, check=False)


def test_host_to_host_transport_mode_v4_v6_only_esp_on_the_wire(hosts, tmp_path):
    net = hosts
    net.start("gw1")
    net.start("gw2")
    # The kernel side of host mode.
    t4 = net.ns("gw1", "ip", "route", "show", "table", "4303").stdout
    t6 = net.ns("gw1", "ip", "-6", "route", "show", "table", "4303").stdout
    assert "198.18.0.2 dev espd0" in t4 and "src 198.18.0.1" in t4 and "prohibit 198.18.0.2" in t4, t4
    assert "2001:db8::2 dev espd0" in t6 and "src 2001:db8::1" in t6 and "prohibit 2001:db8::2" in t6, t6
    rules = net.ns("gw1", "ip", "rule").stdout
    assert "4303:\tnot from all fwmark 0x100000/0x100000 lookup 4303" in rules, rules
    xp = net.ns("gw1", "ip", "xfrm", "policy").stdout
    assert xp.count("dev o1") == 2 and xp.count("mark 0/0x100000") == 2, xp
    pcap = tmp_path / "wire.pcap"
    dump = capture(net, pcap)
    try:
        for src, dst in (("gw1", "198.18.0.2"), ("gw2", "198.18.0.1"),
                         ("gw1", "2001:db8::2"), ("gw2", "2001:db8::1")):
            r = ping(net, src, dst)
            assert " 0% packet loss" in r.stdout, r.stdout
            # A host sends its own packets: no hop is counted.
            assert "ttl=64" in r.stdout, r.stdout
        out = iperf(net, "gw1", "gw2", "198.18.0.2")
        assert "receiver" in out, out
        out = iperf(net, "gw2", "gw1", "2001:db8::1")
        assert "receiver" in out, out
        out = iperf(net, "gw1", "gw2", "2001:db8::2", "-u", "-b", "8M", "-l", "1000", "-J")
        j = json.loads(out)["end"]["sum"]
        assert j["packets"] > 500 and j["lost_packets"] == 0, j
    finally:
        stop(dump)
    assert plaintext(pcap) == "", "plaintext on the wire:\n" + plaintext(pcap)[:2000]
    rows = tshark_rows(pcap, net.sas)
    esp = int(sh("bash", "-c", f"tcpdump -nr {pcap} esp 2>/dev/null | wc -l").stdout)
    assert len(rows) == esp > 1000, (len(rows), esp)
    bad = [x for x in rows if x[1] != "1" or x[2] == "1"]
    assert not bad, f"{len(bad)} of {len(rows)} ESP packets not verified: {bad[:5]}"
    assert {x[0] for x in rows} == {f"0x{s[2]:08x}" for s in net.sas}
    # Decrypted: ICMP, TCP and UDP inside transport-mode ESP (the inner
    # protocol is the ESP trailer's next header, shown as the IP protocol).
    _, err = net.kill("gw1", signal.SIGTERM)
    assert "detached from espd0-x and o1" in err, err


def forge(net, tmp_path, dst4, dst6, src4, src6, mac):
    f = tmp_path / "forge.py"
    f.write_text(f"""
from scapy.all import *
conf.verb = 0
e = Ether(dst="{mac}")
for p in (IP(src="{src4}", dst="{dst4}")/ICMP(id=77, seq=1),
          IP(src="{src4}", dst="{dst4}")/UDP(sport=4000, dport=5555)/b"forged-v4",
          IPv6(src="{src6}", dst="{dst6}")/ICMPv6EchoRequest(id=77, seq=1),
          IPv6(src="{src6}", dst="{dst6}")/UDP(sport=4000, dport=5555)/b"forged-v6"):
    sendp(e/p, iface="br0", count=3, inter=0.05)
""")
    net.ns("wire", PY, str(f))


def test_plaintext_from_the_wire_is_never_delivered_to_the_host(hosts, tmp_path):
    net = hosts
    net.start("gw1")
    mac = net.ns("gw1", "cat", "/sys/class/net/o1/address").stdout.strip()
    got = tmp_path / "udp.txt"
    listen = tmp_path / "listen.py"
    listen.write_text(f"""
import socket, sys, time
out = open("{got}", "w")
socks = []
for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, 5555)); s.setblocking(False); socks.append(s)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    for s in socks:
        try:
            out.write(repr(s.recvfrom(100)) + "\\n"); out.flush()
        except BlockingIOError:
            pass
    time.sleep(0.01)
""")
    def mismatches():
        stat = net.ns("gw1", "cat", "/proc/net/xfrm_stat").stdout
        return int(stat.split("XfrmInTmplMismatch")[1].split()[0])

    for phase in ("running", "killed"):
        before = mismatches()
        lst = net.popen("gw1", PY, str(listen), "4")
        pcap = tmp_path / f"forged-{phase}.pcap"
        dump = capture(net, pcap)
        try:
            forge(net, tmp_path, "198.18.0.1", "2001:db8::1", "198.18.0.2", "2001:db8::2", mac)
            time.sleep(0.5)
        finally:
            stop(dump)
            lst.wait(timeout=30)
        # No echo reply left gw1, and no forged datagram reached its socket.
        replies = sh("tcpdump", "-nr", str(pcap), "src 198.18.0.1 or src 2001:db8::1").stdout
        assert "ICMP" not in replies, f"{phase}: gw1 answered forged plaintext:\n{replies}"
        assert got.read_text() == "", f"{phase}: delivered: {got.read_text()}"
        # Each of the 12 forged packets was dropped by the guard's inbound
        # entries (the kernel's count), not lost on the way.
        assert mismatches() - before >= 12, (phase, before, mismatches())
        if phase == "running":
            net.kill("gw1")


def pingers(net, ns, dsts, seconds):
    return [net.popen(ns, "ping", "-i", "0.02", "-w", str(seconds), d,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for d in dsts]


def test_kill_and_stop_leak_nothing_and_restart_resumes(hosts, tmp_path):
    net = hosts
    net.start("gw1")
    net.start("gw2")
    pcap = tmp_path / "kill.pcap"
    dump = capture(net, pcap)
    ps = []
    try:
        ps = pingers(net, "gw1", ["198.18.0.2", "2001:db8::2"], 9)
        time.sleep(2)
        net.kill("gw1")
        time.sleep(2)
        # Restarted over the pair the dead one left (it is made afresh).
        net.start("gw1")
        time.sleep(2)
        code, err = net.kill("gw1", signal.SIGTERM)
        assert code == 0, err
        outs = [p.communicate(timeout=30)[0] for p in ps]
        ps = []
        # After the stop the sends fail at once: the prohibit routes (EACCES,
        # which iputils words as "check your local firewall rules").
        r = net.ns("gw1", "ping", "-c", "1", "-W", "1", "198.18.0.2", check=False)
        for dst in ("198.18.0.2", "2001:db8::2"):
            r = net.ns("gw1", "ping", "-c", "1", "-W", "1", dst, check=False)
            said = (r.stdout + r.stderr).lower()
            assert r.returncode != 0 and ("denied" in said or "prohibited" in said
                                          or "not permitted" in said or "firewall" in said), said
    finally:
        for p in ps:
            p.kill()
        stop(dump)
    assert plaintext(pcap) == "", "plaintext on the wire:\n" + plaintext(pcap)[:2000]
    # Both families came back after the restart (replies in its 2 s window).
    for o in outs:
        assert "bytes from" in o, o
        got = int(o.split(" received")[0].split(", ")[-1])
        assert got > 100, o
    # `espd down`: the pair, the host table and its rule go with the guard,
    # and then (only then) plaintext crosses.
    r = net.ns("gw1", str(ESPD), "down", "--control", net.sock("gw1"))
    assert "removed the host pair espd0" in r.stderr, r.stderr
    assert net.ns("gw1", "ip", "link", "show", "espd0", check=False).returncode != 0
    assert "4303" not in net.ns("gw1", "ip", "rule").stdout
    assert net.ns("gw1", "ip", "route", "show", "table", "4303", check=False).stdout.strip() == ""
    pcap2 = tmp_path / "down.pcap"
    dump = capture(net, pcap2)
    try:
        ping(net, "gw1", "198.18.0.2", n=3)
    finally:
        stop(dump)
    assert "198.18.0.1 > 198.18.0.2: ICMP echo request" in sh("tcpdump", "-nr", str(pcap2)).stdout


def test_policy_changes_move_the_host_routes(hosts, tmp_path):
    net = hosts
    net.start("gw1")
    ctl = lambda f: subprocess.run([ESPCTL, "-s", net.sock("gw1"), "-b", str(f)],  # noqa: E731
                                   capture_output=True, text=True, timeout=30)
    off = tmp_path / "off.txt"
    off.write_text("policy delete src 2001:db8::1 dst 2001:db8::2 dir out\n")
    r = ctl(off)
    assert r.returncode == 0, r.stderr
    t6 = net.ns("gw1", "ip", "-6", "route", "show", "table", "4303").stdout
    assert "2001:db8::2" not in t6, t6
    on = tmp_path / "on.txt"
    on.write_text("policy add src 2001:db8::1 dst 2001:db8::2 dir out tmpl proto esp reqid 6 mode transport\n"
                  "policy add src 2001:db8::1 dst 2001:db8:77::/64 dir out action block\n")
    r = ctl(on)
    assert r.returncode == 0, r.stderr
    t6 = net.ns("gw1", "ip", "-6", "route", "show", "table", "4303").stdout
    assert "2001:db8::2 dev espd0" in t6 and "prohibit 2001:db8::2" in t6, t6
    # A DISCARD prefix is routed into espd too (the engine drops and counts it).
    assert "2001:db8:77::/64 dev espd0" in t6, t6
    r = net.ns("gw1", "ping", "-c", "2", "-i", "0.1", "-W", "1", "2001:db8:77::1", check=False)
    assert r.returncode != 0
    # The v4 routes were never touched.
    assert "198.18.0.2 dev espd0" in net.ns("gw1", "ip", "route", "show", "table", "4303").stdout


BIG = r"""
import sys
from scapy.all import *
from scapy.layers.ipsec import SecurityAssociation, ESP
conf.verb = 0
mac, k4, k6 = sys.argv[1], bytes.fromhex(sys.argv[2][2:]), bytes.fromhex(sys.argv[3][2:])
# gw2's transport SAs to gw1, sequence numbers far above what gw2 sent.
sa4 = SecurityAssociation(ESP, spi=0x2001, crypt_algo="AES-GCM", crypt_key=k4)
sa6 = SecurityAssociation(ESP, spi=0x2006, crypt_algo="AES-GCM", crypt_key=k6)
out = []
for n in range(3):
    sa4.seq_num = sa6.seq_num = 100000 + n
    p4 = sa4.encrypt(IP(src="198.18.0.2", dst="198.18.0.1") / UDP(sport=7000, dport=5556)
                     / Raw(b"big4-%d-" % n + b"x" * 1450))
    p6 = sa6.encrypt(IPv6(src="2001:db8::2", dst="2001:db8::1") / UDP(sport=7000, dport=5556)
                     / Raw(b"big6-%d-" % n + b"x" * 1450))
    p4 = IP(bytes(p4)); p4.id = 500 + n; del p4.chksum
    # Over the wire's 1500 octets: the outer datagram is fragmented, as a
    # sender's IPsec stack does after encapsulation (RFC 4301 §8.1).
    out += fragment(IP(bytes(p4)), fragsize=1000)
    out += fragment6(IPv6(src="2001:db8::2", dst="2001:db8::1") / IPv6ExtHdrFragment(id=900 + n, nh=50)
                     / Raw(bytes(p6)[40:]), 1000)
sendp([Ether(dst=mac) / x for x in out], iface="br0")
"""


PROBE = r"""
import socket, struct, sys, time, select
dst = sys.argv[1]
v6 = ":" in dst
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
if v6:
    s.setsockopt(socket.IPPROTO_IPV6, 23, 3)  # IPV6_MTU_DISCOVER = IPV6_PMTUDISC_PROBE
    s.setsockopt(socket.IPPROTO_IPV6, 25, 1)  # IPV6_RECVERR
else:
    s.setsockopt(socket.IPPROTO_IP, 10, 3)    # IP_MTU_DISCOVER = IP_PMTUDISC_PROBE
    s.setsockopt(socket.IPPROTO_IP, 11, 1)    # IP_RECVERR
s.connect((dst, 9))
for _ in range(20):
    try:
        s.send(b"p" * 1450)
    except OSError:
        pass
    r, _, x = select.select([], [], [s], 0.2)
    try:
        _, anc, _, _ = s.recvmsg(2048, 512, socket.MSG_ERRQUEUE)
    except BlockingIOError:
        continue
    for lvl, typ, data in anc:
        e, origin, t, c, _, info = struct.unpack("=IBBBBI", data[:12])
        print(e, origin, t, c, info)
        sys.exit(0)
sys.exit("no ICMP error reached the socket")
"""


def test_host_path_mtu_fragments_and_icmp(hosts, tmp_path):
    """The MTU on the host path: the kernel sizes what it sends by the pair
    routes' MTU (the outside's less the ESP overhead: EMSGSIZE beyond it
    with DF, fragments without); a packet that would not fit after ESP gets
    an ICMP "fragmentation needed" / "packet too big" from espd that the
    host's stack takes (RFC 4301 §8.2.1; ping reports the MTU and the
    kernel caches it); and a decapsulated packet larger than that MTU (a
    peer whose inside MTU is larger, its ESP fragmented) is still
    delivered."""
    net = hosts
    net.start("gw1")
    net.start("gw2")
    dev = net.ns("gw1", "ip", "-o", "link", "show", "espd0").stdout
    table = net.ns("gw1", "ip", "route", "show", "table", "4303").stdout
    table6 = net.ns("gw1", "ip", "-6", "route", "show", "table", "4303").stdout
    assert "mtu 1400" in [l for l in table.splitlines() if "dev espd0" in l][0], table
    assert "mtu 1400" in [l for l in table6.splitlines() if "dev espd0" in l][0], table6
    pcap = tmp_path / "mtu.pcap"
    dump = capture(net, pcap)
    try:
        for dst in ("198.18.0.2", "2001:db8::2"):
            # DF: up to the route's MTU, and EMSGSIZE naming it beyond.
            hdr = 28 if "." in dst else 48
            r = net.ns("gw1", "ping", "-c", "2", "-i", "0.1", "-W", "2", "-M", "do", "-s",
                       str(1400 - hdr), dst, check=False)
            assert " 0% packet loss" in r.stdout, r.stdout + r.stderr
            r = net.ns("gw1", "ping", "-c", "1", "-W", "2", "-M", "do", "-s", str(1401 - hdr), dst,
                       check=False)
            assert r.returncode != 0 and "1400" in r.stdout + r.stderr, r.stdout + r.stderr
            # No DF: the kernel fragments to the route's MTU; espd carries
            # the whole datagram (transport mode carries no fragments, RFC
            # 4301 §7) and fragments the ESP packet after it; the peer's espd
            # reassembles it, decapsulates and hands it to its host (larger
            # than a frame: in fragments its stack reassembles).
            for size in (3000, 8000):
                r = net.ns("gw1", "ping", "-c", "3", "-i", "0.1", "-W", "2", "-M", "dont", "-s", str(size),
                           dst, check=False)
                assert " 0% packet loss" in r.stdout, r.stdout + r.stderr
            # Probing past the route's MTU (IP_PMTUDISC_PROBE: up to the
            # device's): espd answers with ICMP carrying the MTU left after
            # ESP, which reaches the sending socket (its error queue).
            r = net.ns("gw1", PY, "-c", PROBE, dst, check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            errno_, origin, typ, code, mtu = (int(x) for x in r.stdout.split())
            v6 = hdr == 48
            assert (errno_, origin, typ, code) == ((90, 3, 2, 0) if v6 else (90, 2, 3, 4)), r.stdout
            assert 1400 < mtu < 1480, r.stdout
        # Inbound: datagrams of 1478 / 1498 octets inside fragmented ESP.
        got = tmp_path / "big.txt"
        lst = net.popen("gw1", PY, "-c", f"""
import socket, select, time
out = open("{got}", "w")
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s4.bind(("0.0.0.0", 5556))
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); s6.bind(("::", 5556))
end = time.time() + 8
while time.time() < end:
    for s in select.select([s4, s6], [], [], 0.1)[0]:
        d = s.recv(4000); out.write("%s %d\\n" % (d[:7].decode(), len(d))); out.flush()
""")
        time.sleep(0.5)
        f = tmp_path / "big.py"
        f.write_text(BIG)
        mac = net.ns("gw1", "cat", "/sys/class/net/o1/address").stdout.strip()
        km = {spi: k for _, _, spi, k in net.sas}
        net.ns("wire", PY, str(f), mac, km[0x2001], km[0x2006])
        lst.wait(timeout=30)
    finally:
        stop(dump)
    lines = sorted(got.read_text().split("\n")[:-1])
    assert lines == sorted([f"big{v}-{n}- 1457" for v in (4, 6) for n in range(3)]), lines
    assert plaintext(pcap) == "", plaintext(pcap)[:2000]
    # Every ESP packet decrypts with the configured keys and a good ICV,
    # the big ones after tshark's own reassembly of the outer fragments.
    rows = tshark_rows(pcap, net.sas)
    # Per family 2 + 3 + 3 echoes each way, and the 3 injected datagrams.
    assert len(rows) >= 38 and all(r[1] == "1" for r in rows), rows
    for gw in ("gw1", "gw2"):
        code, err = net.kill(gw, signal.SIGTERM)
        assert code == 0, err
    s1, s2 = (json.loads((tmp_path / f"{g}.json").read_text()) for g in ("gw1", "gw2"))
    assert s1["decapsulated"] >= 6, s1
    for s in (s1, s2):
        w = s["workers"][0]
        # Both families' 3000 and 8000 octet echoes (requests on gw1, replies on gw2).
        assert w["own_reassembled"] >= 12 and w["fragmented"] >= 12, w
        assert set(k for k, v in s["drops"].items() if v) <= {"PacketTooBig"}, s["drops"]


NEST = {4: ("198.18.0.1", "198.18.0.2", "198.18.2.20", "198.18.2.0/24"),
        6: ("2001:db8::1", "2001:db8::2", "2001:db8:2::20", "2001:db8:2::/64")}


def nested_confs(tmp):
    """gw1: a host with a tunnel to the gateway gw2 and a transport SA to B
    inside it (an SA bundle, RFC 4301 §4.5); gw2: the site's gateway; B: the
    server, a host with the transport SA. The SAs, by family."""
    sas, conf = {}, {"gw1": [], "gw2": [], "b": []}
    for v, (c, g, s, site) in NEST.items():
        base = 0x3000 + v * 0x100
        ks = [key() for _ in range(4)]
        sas[v] = {"c2s": (c, s, base + 1, ks[0]), "s2c": (s, c, base + 2, ks[1]),
                  "c2g": (c, g, base + 3, ks[2]), "g2c": (g, c, base + 4, ks[3])}

        def st(name, mode):
            a, b, spi, k = sas[v][name]
            return f"state add src {a} dst {b} proto esp spi {spi:#x} reqid {spi & 0xfff} mode {mode} {GCM} {k} 128"

        r = {n: sas[v][n][2] & 0xfff for n in sas[v]}
        conf["gw1"] += [st("c2s", "transport"), st("s2c", "transport"), st("c2g", "tunnel"), st("g2c", "tunnel"),
                        f"policy add src {c} dst {s} dir out tmpl proto esp reqid {r['c2s']} mode transport "
                        f"tmpl src {c} dst {g} proto esp reqid {r['c2g']} mode tunnel",
                        f"policy add src {s} dst {c} dir in tmpl proto esp reqid {r['s2c']} mode transport "
                        f"tmpl src {g} dst {c} proto esp reqid {r['g2c']} mode tunnel"]
        conf["gw2"] += [st("c2g", "tunnel"), st("g2c", "tunnel"),
                        f"policy add src {c} dst {site} dir fwd tmpl src {c} dst {g} proto esp reqid {r['c2g']} mode tunnel",
                        f"policy add src {site} dst {c} dir out tmpl src {g} dst {c} proto esp reqid {r['g2c']} mode tunnel"]
        conf["b"] += [st("c2s", "transport"), st("s2c", "transport"),
                      f"policy add src {s} dst {c} dir out tmpl proto esp reqid {r['s2c']} mode transport",
                      f"policy add src {c} dst {s} dir in tmpl proto esp reqid {r['c2s']} mode transport"]
    for n, lines in conf.items():
        p = tmp / f"{n}.conf"
        p.write_text("\n".join(lines) + "\n")
        p.chmod(0o600)
    return sas


def test_host_with_a_tunnel_to_a_gateway_and_transport_to_a_server_behind_it(tmp_path):
    need("ping")
    # The site link gw2 ─ B through a bridge too: both its ends are AF_XDP
    # sockets, which tcpdump on either interface would not see.
    net = Hosts(tmp_path, site_bridge=True)
    try:
        sas = nested_confs(tmp_path)
        # (Its workers never sleep: --busy-poll.)
        net.start_host("gw1", "o1", tmp_path / "gw1.conf", sock=net.sock("gw1"), core="0",
                       args=("--busy-poll",))
        Net.start(net, "gw2")
        net.start_host("b", "b0", tmp_path / "b.conf", core=str(1 % os.cpu_count()))
        pcap, spcap = tmp_path / "nested.pcap", tmp_path / "site.pcap"
        dump, sdump = capture(net, pcap), capture(net, spcap, "br1")
        try:
            for v in (4, 6):
                r = net.ns("gw1", "ping", "-c", "20", "-i", "0.05", "-W", "2", NEST[v][2], check=False)
                assert " 0% packet loss" in r.stdout, r.stdout
            r = net.ns("b", "ping", "-c", "5", "-i", "0.05", "-W", "2", NEST[4][0], check=False)
            assert " 0% packet loss" in r.stdout, r.stdout
        finally:
            stop(dump)
            stop(sdump)
        assert plaintext(pcap) == "", "plaintext on the wire:\n" + plaintext(pcap)[:2000]
        # The wire between the host and the gateway: ESP (the tunnel SA)
        # whose decryption is ESP again (the transport SA to B).
        every = [sa for v in sas.values() for sa in v.values()]
        rows = tshark_rows(pcap, every)
        esp = int(sh("bash", "-c", f"tcpdump -nr {pcap} esp 2>/dev/null | wc -l").stdout)
        assert len(rows) == esp >= 90, (len(rows), esp, sh("tcpdump", "-nr", str(pcap)).stdout[-3000:])
        pairs = set()
        for spi, good, bad, *_ in rows:
            spis = spi.split(",")
            assert len(spis) == 2, f"not ESP in ESP: {spi}"
            assert good.split(",") == ["1", "1"] and "1" not in bad.split(","), (spi, good, bad)
            pairs.add(tuple(int(x, 16) for x in spis))
        want = set()
        for v in sas.values():
            want.add((v["c2g"][2], v["c2s"][2]))
            want.add((v["g2c"][2], v["s2c"][2]))
        assert pairs == want, (pairs, want)
        # The server's link: ESP in transport mode (one layer, the transport
        # SAs' SPIs, between the client's and the server's own addresses),
        # each packet decrypted by tshark with a good ICV; nothing in clear.
        assert plaintext(spcap) == "", "plaintext on the site link:\n" + plaintext(spcap)[:2000]
        srows = tshark_rows(spcap, every)
        sesp = int(sh("bash", "-c", f"tcpdump -nr {spcap} esp 2>/dev/null | wc -l").stdout)
        assert len(srows) == sesp >= 90, (len(srows), sesp)
        spis = set()
        for spi, good, bad, proto, nxt in srows:
            assert "," not in spi and good == "1" and bad != "1", (spi, good, bad)
            # The decrypted payload is ICMP / ICMPv6 itself (transport mode),
            # not an inner IP header (tunnel mode: 4 or 41).
            assert (proto or nxt).split(",")[-1] not in ("4", "41"), (spi, proto, nxt)
            spis.add(int(spi, 16))
        assert spis == {v[n][2] for v in sas.values() for n in ("c2s", "s2c")}, spis
        # B decapsulated the transport SA itself (its inside is its own stack).
        code, err = net.kill("b", signal.SIGTERM)
        assert code == 0, err
        sb = json.loads((tmp_path / "b.json").read_text())
        assert sb["decapsulated"] >= 45 and sb["encapsulated"] >= 45, sb
    finally:
        net.close()


def rw_gateway_conf():
    """charon on gw2: the site's remote-access gateway, with address pools."""
    return f"""# gw2: remote-access gateway for site B
pools {{
  rw4 {{
    addrs = 198.18.100.0/28
    dns = 198.18.2.53
  }}
  rw6 {{
    addrs = 2001:db8:100::/120
    dns = 2001:db8:2::53
  }}
}}
connections {{
  rw {{
    version = 2
    local_addrs = 198.18.0.2
    pools = rw4, rw6
    proposals = aes128gcm16-prfsha256-x25519
    encap = yes
    local {{
      auth = psk
      id = gw2
    }}
    remote {{
      auth = psk
    }}
    children {{
      rw {{
        local_ts = 198.18.2.0/24, 2001:db8:2::/64
        esp_proposals = aes128gcm16
      }}
    }}
  }}
}}
secrets {{
  ike-rw {{
    id = gw2
    secret = "{T.PSK}"
  }}
}}
"""


def rw_client_conf():
    """espd-ike on gw1: a road warrior asking for an address of each family."""
    return f"""# gw1: a road warrior to site B
connections {{
  home {{
    version = 2
    local_addrs = 198.18.0.1
    remote_addrs = 198.18.0.2
    vips = 0.0.0.0, ::
    proposals = aes128gcm16-prfsha256-x25519
    encap = yes
    local {{
      auth = psk
      id = gw1
    }}
    remote {{
      auth = psk
      id = gw2
    }}
    children {{
      home {{
        remote_ts = 198.18.2.0/24, 2001:db8:2::/64
        esp_proposals = aes128gcm16
        start_action = start
      }}
    }}
  }}
}}
secrets {{
  ike-1 {{
    id-1 = gw1
    id-2 = gw2
    secret = "{T.PSK}"
  }}
}}
"""


def test_espd_ike_road_warrior_client_on_a_host_gets_addresses_from_charon(tmp_path):
    T.need_charon()
    net = Hosts(tmp_path)
    charon = ike = None
    try:
        empty = tmp_path / "empty.conf"
        empty.write_text("")
        empty.chmod(0o600)
        net.start_host("gw1", "o1", empty, sock=net.sock("gw1"))
        charon = T.Charon(net, rw_gateway_conf(), gw="gw2")
        dns = tmp_path / "resolv.conf"
        pcap = tmp_path / "rw.pcap"
        dump = capture(net, pcap)
        try:
            ike = T.Ike(net, rw_client_conf(), args=("--vip-dev", "espd0", "--dns-file", str(dns)))
            for _ in range(100):
                sas = ike.sas()
                if sas and sas[0]["children"]:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(ike.log() + charon.sas())
            vips = sas[0]["local_vips"]
            assert len(vips) == 2 and vips[0].startswith("198.18.100.") and vips[1].startswith("2001:db8:100::"), sas
            assert sas[0]["local_dns"] == ["198.18.2.53", "2001:db8:2::53"], sas
            assert dns.read_text().splitlines()[1:] == ["nameserver 198.18.2.53", "nameserver 2001:db8:2::53"]
            addrs = net.ns("gw1", "ip", "addr", "show", "dev", "espd0").stdout
            assert all(v in addrs for v in vips), addrs
            # The site's prefixes are routed into the tunnel, from the virtual address.
            t4 = net.ns("gw1", "ip", "route", "show", "table", "4303").stdout
            assert f"198.18.2.0/24 dev espd0 scope link src {vips[0]}" in t4, t4
            for dst in ("198.18.2.20", "2001:db8:2::20"):
                r = net.ns("gw1", "ping", "-c", "10", "-i", "0.05", "-W", "2", dst, check=False)
                assert " 0% packet loss" in r.stdout, r.stdout + ike.log()
            # Host B saw the client's virtual address (it answers it).
            r = net.ns("b", "ping", "-c", "3", "-i", "0.1", "-W", "2", vips[0], check=False)
            assert " 0% packet loss" in r.stdout, r.stdout
            assert "198.18.100." in charon.sas()
        finally:
            stop(dump)
        # Only IKE and ESP in UDP between the client and the gateway.
        rest = sh("tcpdump", "-nr", str(pcap),
                  "not (udp port 500 or udp port 4500) and not icmp6 and not igmp and not (ip6 and ip6[6] = 0)").stdout
        assert rest.strip() == "", rest[:2000]
        assert "UDP-encap" in sh("tcpdump", "-nr", str(pcap), "udp port 4500").stdout
        # Stopping espd-ike takes the addresses off the host.
        assert ike.stop() == 0
        addrs = net.ns("gw1", "ip", "addr", "show", "dev", "espd0").stdout
        assert not any(v in addrs for v in vips), addrs
        ike = None
    finally:
        if ike:
            ike.stop()
        if charon:
            charon.stop()
        net.close()


def tunnel_sas(conf):
    """(src, dst, spi, key) of the AES-GCM states a topo.sh configuration holds."""
    out = []
    for line in conf.read_text().splitlines():
        w = line.split()
        if w[:2] == ["state", "add"] and "aead" in w:
            out.append((w[w.index("src") + 1], w[w.index("dst") + 1], int(w[w.index("spi") + 1], 16),
                        w[w.index("aead") + 2]))
    return out


def test_a_gateway_protects_its_own_traffic_beside_the_sites_both_paths_at_once(tmp_path):
    """`espd run --inside iN --outside oN --host` on both gateways: the sites'
    tunnel (A ⇄ B, forwarded) and the gateways' own traffic at once — to each
    other in transport mode (their management or BGP session) and from gw1
    to host B through the tunnel (the pair route's source is gw1's inside
    address, in the tunnel's selector). Only ESP on the wire, tshark verifying
    every packet of every SA; forwarded packets count a hop, the gateways'
    own none; after SIGKILL neither kind leaves in plaintext."""
    need("iperf3", "ping")
    net = Net(tmp_path)
    try:
        sas = tunnel_sas(tmp_path / "gw1.conf")
        own = [("198.18.0.1", "198.18.0.2", 0x3001, key()), ("198.18.0.2", "198.18.0.1", 0x4001, key()),
               ("2001:db8::1", "2001:db8::2", 0x3006, key()), ("2001:db8::2", "2001:db8::1", 0x4006, key())]
        for gw, me in (("gw1", ADDR["gw1"]), ("gw2", ADDR["gw2"])):
            lines = [f"state add src {s} dst {d} proto esp spi {spi:#x} reqid {spi & 0xff} "
                     f"mode transport {GCM} {k} 128" for s, d, spi, k in own]
            for s, d, spi, _ in own:
                way = "out" if s in me else "in"
                lines.append(f"policy add src {s} dst {d} dir {way} tmpl proto esp "
                             f"reqid {spi & 0xff} mode transport")
            # The remote site may reach the gateway itself through the tunnel:
            # an `in` policy beside the `fwd` one, as strongSwan installs
            # (what is decapsulated for this host meets the `in` policies).
            lines += {
                "gw1": ["policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir in tmpl src 198.18.0.2 "
                        "dst 198.18.0.1 proto esp reqid 2 mode tunnel",
                        "policy add src 2001:db8:2::/64 dst 2001:db8:1::/64 dir in tmpl src 2001:db8::2 "
                        "dst 2001:db8::1 proto esp reqid 4 mode tunnel"],
                "gw2": ["policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir in tmpl src 198.18.0.1 "
                        "dst 198.18.0.2 proto esp reqid 1 mode tunnel",
                        "policy add src 2001:db8:1::/64 dst 2001:db8:2::/64 dir in tmpl src 2001:db8::1 "
                        "dst 2001:db8::2 proto esp reqid 3 mode tunnel"],
            }[gw]
            conf = tmp_path / f"{gw}.conf"
            conf.write_text(conf.read_text() + "\n".join(lines) + "\n")
        for gw in ("gw1", "gw2"):
            net.start(gw, args=("--host",))
        # The host routes go in once the workers run (just after the banner).
        for _ in range(50):
            t4 = net.ns("gw1", "ip", "route", "show", "table", "4303").stdout
            if "198.18.2.0/24 dev espd0" in t4 and "198.18.0.2 dev espd0" in t4:
                break
            time.sleep(0.1)
        # The site's prefix is reached from gw1's inside address (in the
        # tunnel's selector), the peer from its outside one (the transport SA's).
        t6 = net.ns("gw1", "ip", "-6", "route", "show", "table", "4303").stdout

        def route(table, prefix):
            return next((x for x in table.splitlines() if x.startswith(f"{prefix} dev espd0")), "")
        assert "src 198.18.1.1 " in route(t4, "198.18.2.0/24"), t4
        assert "src 198.18.0.1 " in route(t4, "198.18.0.2"), t4
        assert "src 2001:db8:1::1 " in route(t6, "2001:db8:2::/64"), t6
        assert "src 2001:db8::1 " in route(t6, "2001:db8::2"), t6
        pcap = tmp_path / "wire.pcap"
        dump = capture(net, pcap)
        try:
            # (from, to, the TTL the reply arrives with): forwarded traffic
            # counts the gateways as hops, the gateways' own does not.
            for src, dst, ttl in (("a", "198.18.2.20", 62), ("b", "198.18.1.10", 62),
                                  ("a", "2001:db8:2::20", 62), ("b", "2001:db8:1::10", 62),
                                  ("gw1", "198.18.0.2", 64), ("gw2", "198.18.0.1", 64),
                                  ("gw1", "2001:db8::2", 64), ("gw2", "2001:db8::1", 64),
                                  ("gw1", "198.18.2.20", 63), ("gw1", "2001:db8:2::20", 63),
                                  ("b", "198.18.1.1", 63)):
                r = ping(net, src, dst)
                assert " 0% packet loss" in r.stdout, (src, dst, r.stdout)
                # (iputils prints the IPv6 hop limit as ttl= too.)
                assert f"ttl={ttl} " in r.stdout, (src, dst, r.stdout)
            # Paced: tshark reads every packet of the capture.
            assert "receiver" in iperf(net, "a", "b", "198.18.2.20", "-b", "20M")
            assert "receiver" in iperf(net, "gw1", "gw2", "198.18.0.2", "-b", "20M")
            assert "receiver" in iperf(net, "gw2", "gw1", "2001:db8::1", "-b", "20M")
        finally:
            stop(dump)
        assert plaintext(pcap) == "", "plaintext on the wire:\n" + plaintext(pcap)[:2000]
        rows = tshark_rows(pcap, sas + own)
        esp = int(sh("bash", "-c", f"tcpdump -nr {pcap} esp 2>/dev/null | wc -l").stdout)
        assert len(rows) == esp > 500, (len(rows), esp)
        bad = [x for x in rows if x[1] != "1" or x[2] == "1"]
        assert not bad, f"{len(bad)} of {len(rows)} ESP packets not verified: {bad[:5]}"
        assert {x[0] for x in rows} == {f"0x{s[2]:08x}" for s in sas + own}
        # The pair is a third side of gw1's worker: its own traffic came and
        # went there, the sites' through the inside.
        stats, err = net.stop("gw1")
        w = stats["workers"][0]
        assert w["rx_host"] > 100 and w["tx_host"] > 100, w
        assert w["rx_inside"] > 100 and w["tx_inside"] > 100, w
        assert "host pair espd0-x" in "".join(net.banner), net.banner

        # Killed: neither the sites' traffic nor gw1's own leaves in plaintext.
        net.start("gw1", args=("--host",))
        time.sleep(0.5)
        pcap = tmp_path / "killed.pcap"
        dump = capture(net, pcap)
        try:
            net.procs.pop("gw1").kill()
            time.sleep(0.3)
            for src, dst in (("a", "198.18.2.20"), ("gw1", "198.18.0.2"), ("gw1", "198.18.2.20"),
                             ("a", "2001:db8:2::20"), ("gw1", "2001:db8::2")):
                r = ping(net, src, dst, n=3)
                assert " 100% packet loss" in r.stdout, (src, dst, r.stdout)
        finally:
            stop(dump)
        assert plaintext(pcap) == "", "plaintext on the wire after SIGKILL:\n" + plaintext(pcap)[:2000]
    finally:
        net.close()
