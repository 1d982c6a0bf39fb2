"""espd against DPDK 22.11's ipsec-secgw, an ESP implementation we did not
write, as the far gateway (issue: "real networks"; ../shared/PEERS.md):

    host A ─ gw1 (espd) ═ wire (bridge br0, captured) ═ gw2 (ipsec-secgw) ─ host B

ipsec-secgw runs on gw2 with af_packet vdevs on o2 (port 0, unprotected) and
i2 (port 1) and the aesni_mb crypto device; it answers no ARP, so gw2's IPv4
addresses sit on lo with forwarding off and the kernel answers for them (IPv6
ND is answered only for addresses on the link, so those stay on o2/i2).
Frames through af_packet are at most 1518 octets: the hosts' links get an MTU
of 1400. Host B's veth leaves TCP checksums partial and ipsec-secgw does not
complete them, so B's checksum offload is off.

- ping both ways (IPv4, IPv6) and iperf3 TCP both ways; the wire carries
  only ESP;
- ESN across 2^32 (espd's outbound sequence number starts just below it).

Not here: ipsec-secgw's outer fragmentation (`--reassemble`) needs
multi-segment RX (scatter), which its af_packet PMD lacks ("port 0 required
RX offloads: 0x2000, available: 0x1"); espd's reassembly of outer fragments is
proven against scapy's fragments instead (test_realnet.py).
"""

import os
import shutil
import signal
import subprocess
import time

import pytest

from espd_oracle import ROOT
from test_gateway import IN_CI, PY, Net, drops, iperf, need, sh

MK = r'''
import ipaddress, re, sys
conf, out, mac_o, mac_b = sys.argv[1:5]
esn = " esn" if len(sys.argv) > 5 else ""
keys = {}
for m in re.finditer(r"state add src (\S+) dst (\S+) proto esp spi (0x[0-9a-f]+) .*? (0x[0-9a-f]+) 128",
                     open(conf).read()):
    keys[int(m[3], 16)] = (m[1], m[2], m[4][2:])
col = lambda h: ":".join(h[i:i + 2] for i in range(0, len(h), 2))
v6 = lambda a: ipaddress.IPv6Address(a).exploded
L = ["sp ipv4 in esp protect 4097 pri 1 dst 198.18.2.0/24 sport 0:65535 dport 0:65535",
     "sp ipv4 out esp protect 8193 pri 1 dst 198.18.1.0/24 sport 0:65535 dport 0:65535",
     f"sp ipv6 in esp protect 4102 pri 1 dst {v6('2001:db8:2::')}/64 sport 0:65535 dport 0:65535",
     f"sp ipv6 out esp protect 8198 pri 1 dst {v6('2001:db8:1::')}/64 sport 0:65535 dport 0:65535"]
for spi, d, mode, f in ((0x1001, "in", "ipv4-tunnel", str), (0x2001, "out", "ipv4-tunnel", str),
                        (0x1006, "in", "ipv6-tunnel", v6), (0x2006, "out", "ipv6-tunnel", v6)):
    s, t, k = keys[spi]
    L.append(f"sa {d} {spi} aead_algo aes-128-gcm aead_key {col(k)} mode {mode} src {f(s)} dst {f(t)}")
L += ["rt ipv4 dst 198.18.0.1/32 port 0", "rt ipv4 dst 198.18.2.0/24 port 1",
      f"rt ipv6 dst {v6('2001:db8::1')}/128 port 0", f"rt ipv6 dst {v6('2001:db8:2::')}/64 port 1",
      f"neigh port 0 {mac_o}", f"neigh port 1 {mac_b}"]
open(out, "w").write("\n".join(L) + "\n")
'''


def secgw():
    if shutil.which("pkg-config") is None or not os.path.isdir("/usr/share/dpdk/examples/ipsec-secgw"):
        if IN_CI:
            pytest.fail("DPDK's ipsec-secgw sources missing in CI (scripts/deps.sh installs dpdk-doc)")
        pytest.skip("needs libdpdk-dev and dpdk-doc (scripts/deps.sh)")
    r = sh("bash", str(ROOT / "scripts" / "dpdk-secgw.sh"), timeout=300)
    return str(ROOT / r.stdout.strip().splitlines()[-1])


class DpdkNet(Net):
    def __init__(self, tmp):
        super().__init__(tmp)
        g = f"{self.p}-gw2"
        for a in ("198.18.0.2/24", "198.18.2.1/24"):
            dev = "o2" if a.startswith("198.18.0") else "i2"
            sh("ip", "-n", g, "addr", "del", a, "dev", dev)
            sh("ip", "-n", g, "addr", "add", a.split("/")[0] + "/32", "dev", "lo")
        sh("ip", "-n", g, "route", "add", "198.18.0.0/24", "dev", "o2")
        sh("ip", "-n", g, "route", "add", "198.18.2.0/24", "dev", "i2")
        self.ns("gw2", "sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0")
        for ns, dev in (("a", "a0"), ("gw1", "i1"), ("gw2", "i2"), ("b", "b0")):
            sh("ip", "-n", f"{self.p}-{ns}", "link", "set", dev, "mtu", "1400")
        self.ns("b", "ethtool", "-K", "b0", "tx", "off")
        self.dpdk = None

    def start_dpdk(self, binary, *extra, esn=False, mtu=1500):
        mac_o = self.ns("gw1", "cat", "/sys/class/net/o1/address").stdout.strip()
        mac_b = self.ns("b", "cat", "/sys/class/net/b0/address").stdout.strip()
        cfg = self.tmp / "secgw.cfg"
        (self.tmp / "mk.py").write_text(MK)
        sh(PY, str(self.tmp / "mk.py"), str(self.tmp / "gw2.conf"), str(cfg), mac_o, mac_b)
        log = open(self.tmp / "secgw.log", "w")
        args = ["-p", "0x3", "-u", "0x1", "-P", "-l", "-w", "64", "--mtu", str(mtu),
                "--config=(0,0,1),(1,0,1)", "-f", str(cfg), *(["-e"] if esn else []), *extra]
        self.dpdk = self.popen("gw2", binary, "-l", str(1 % os.cpu_count()), "-n", "1", "--no-huge",
                               "-m", "512", "--no-shconf", "--no-telemetry", "--file-prefix", self.p,
                               "--no-pci", "--vdev", "net_af_packet0,iface=o2",
                               "--vdev", "net_af_packet1,iface=i2", "--vdev", "crypto_aesni_mb0",
                               "--", *args, stdout=log, stderr=subprocess.STDOUT)
        for _ in range(100):
            if "entering main loop" in (self.tmp / "secgw.log").read_text():
                return
            assert self.dpdk.poll() is None, (self.tmp / "secgw.log").read_text()
            time.sleep(0.1)
        raise AssertionError("ipsec-secgw did not start:\n" + (self.tmp / "secgw.log").read_text())

    def close(self):
        if self.dpdk is not None:
            self.dpdk.send_signal(signal.SIGINT)
            try:
                self.dpdk.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.dpdk.kill()
                self.dpdk.wait()
        super().close()


@pytest.fixture
def dnet(tmp_path):
    need("iperf3", "ping")
    binary = secgw()
    n = DpdkNet(tmp_path)
    n.binary = binary
    try:
        yield n
    finally:
        n.close()


PLAIN = ("(ip and net 198.18.1.0/24 and net 198.18.2.0/24) or "
         "(ip6 and net 2001:db8:1::/64 and net 2001:db8:2::/64)")


def test_ping_and_tcp_both_ways_with_dpdk_ipsec_secgw(dnet, tmp_path):
    dnet.start_dpdk(dnet.binary)
    dnet.start("gw1")
    wire = tmp_path / "wire.pcap"
    dump = dnet.popen("wire", "tcpdump", "--immediate-mode", "-ni", "br0", "-U", "-w", str(wire), "ip or ip6",
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    for src, dst in (("a", "198.18.2.20"), ("b", "198.18.1.10"),
                     ("a", "2001:db8:2::20"), ("b", "2001:db8:1::10")):
        r = dnet.ns(src, "ping", "-c", "5", "-i", "0.2", "-W", "2", dst, check=False)
        assert r.returncode == 0 and " 0% packet loss" in r.stdout, (src, dst, r.stdout)
    rates = {}
    for client, server, dst in (("a", "b", "198.18.2.20"), ("b", "a", "198.18.1.10")):
        t = iperf(dnet, client, server, dst)
        rates[f"{client}>{server}"] = t["end"]["sum_received"]["bits_per_second"]
    assert all(v > 5e6 for v in rates.values()), rates
    dump.send_signal(signal.SIGINT)
    dump.wait(timeout=10)
    s1, _ = dnet.stop("gw1")
    r = sh("tcpdump", "-nr", str(wire), PLAIN, check=False)
    assert r.stdout.strip() == "", "plaintext on the wire:\n" + r.stdout[:2000]
    assert int(sh("bash", "-c", f"tcpdump -nr {wire} esp 2>/dev/null | wc -l").stdout) > 1000
    assert s1["encapsulated"] > 500 and s1["decapsulated"] > 500, s1
    # IPv6 neighbour discovery towards a DPDK port may take a probe or two.
    assert set(drops(s1)) <= {"PacketTooBig", "NoNeighbour", "XskDropped", "XskRingFull"}, drops(s1)
    print(rates)


def test_esn_across_2_32_with_dpdk_ipsec_secgw(dnet, tmp_path):
    conf = tmp_path / "gw1.conf"
    text = conf.read_text().replace("replay-window 1024", "replay-window 1024 flag esn")
    # espd's outbound IPv4 SA starts 20 packets below 2^32.
    text = text.replace("spi 0x1001 reqid 1 mode tunnel", "spi 0x1001 reqid 1 mode tunnel replay-oseq 0xffffffec")
    conf.write_text(text)
    dnet.start_dpdk(dnet.binary, esn=True)
    dnet.start("gw1")
    r = dnet.ns("a", "ping", "-c", "40", "-i", "0.05", "-W", "2", "198.18.2.20", check=False)
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout
    s1, _ = dnet.stop("gw1")
    out = {x["spi"]: x for x in s1["sas"]}["0x00001001"]
    assert out["oseq"] > 1 << 32, out  # the ESN high half moved to 1
    assert not drops(s1), drops(s1)
