"""The XDP steering program on a real interface (native XDP on veth), in its
own network namespaces:

    ns A (sender)                      ns B (espd steer --outside vb)
    va 198.18.0.1/24  <── veth ──>  vb 198.18.0.2/24   [XDP: espd_outside]

Every kind of frame is sent a known number of times from A with scapy, and
the program's per-action counters must match exactly; ping must still work
(everything not ours is XDP_PASS); SIGINT must leave no XDP program attached,
and the next start must work. IPv6 is disabled and the neighbour entry is
static in the namespaces so that no ND/ARP chatter disturbs the counts.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from espd_oracle import ESPD, ROOT

IN_CI = os.environ.get("CI") == "true"
PY = str(ROOT / ".venv" / "bin" / "python")


def need_root():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        if IN_CI:
            pytest.fail("CI runs as root with iproute2: the netns tests must run there")
        pytest.skip("needs root and iproute2 (network namespaces)")


def sh(*args, check=True):
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


@pytest.fixture
def netns(tmp_path):
    need_root()
    a, b = f"espd{os.getpid()}a", f"espd{os.getpid()}b"
    try:
        for ns in (a, b):
            sh("ip", "netns", "add", ns)
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "link", "add", "va", "netns", a, "type", "veth", "peer", "name", "vb", "netns", b)
        sh("ip", "-n", a, "addr", "add", "198.18.0.1/24", "dev", "va")
        sh("ip", "-n", b, "addr", "add", "198.18.0.2/24", "dev", "vb")
        for ns, dev in ((a, "va"), (b, "vb")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        mac_b = json.loads(sh("ip", "-n", b, "-j", "link", "show", "vb").stdout)[0]["address"]
        mac_a = json.loads(sh("ip", "-n", a, "-j", "link", "show", "va").stdout)[0]["address"]
        sh("ip", "-n", a, "neigh", "replace", "198.18.0.2", "lladdr", mac_b, "dev", "va", "nud", "permanent")
        sh("ip", "-n", b, "neigh", "replace", "198.18.0.1", "lladdr", mac_a, "dev", "vb", "nud", "permanent")
        yield a, b, mac_b
    finally:
        for ns in (a, b):
            sh("ip", "netns", "del", ns, check=False)


CONF = """
state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x2000 mode tunnel aead 'rfc4106(gcm(aes))' 0x0102030405060708090a0b0c0d0e0f1011121314 128
state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x2001 mode tunnel encap espinudp 4500 4500 0.0.0.0 aead 'rfc4106(gcm(aes))' 0x0102030405060708090a0b0c0d0e0f1011121314 128
state add src 2001:db8::1 dst 2001:db8::2 proto esp spi 0x2002 mode tunnel aead 'rfc4106(gcm(aes))' 0x0102030405060708090a0b0c0d0e0f1011121314 128
"""

SEND = r"""
import sys
from scapy.all import *
conf.verb = 0
dst = sys.argv[1]
E = lambda **k: Ether(dst=dst, **k)
ip = lambda **k: IP(src="198.18.0.1", dst="198.18.0.2", **k)
esp = lambda spi: struct.pack("!LL", spi, 1) + b"\x00" * 40
frames = (
    [E() / ip(proto=50) / esp(0x2000)] * 3                                  # no_socket (known, no AF_XDP socket yet)
    + [E() / ip(proto=50) / esp(0x9999)] * 2                                # unknown_spi
    + [E() / ip(proto=50) / esp(0)]                                         # unknown_spi (SPI 0)
    + [E() / ip() / UDP(sport=4500, dport=4500) / (b"\x00" * 4 + b"IKE")]   # ike
    + [E() / ip() / UDP(sport=4500, dport=4500) / b"\xff"]                  # keepalive
    + [E() / ip() / UDP(sport=4500, dport=4500) / esp(0x2001)] * 2          # no_socket
    + [E() / ip() / UDP(sport=4500, dport=4500) / esp(0x7777)]              # unknown_spi
    + [E() / ip(proto=50, flags="MF") / esp(0x2000)]                        # ESP fragment for us: steered for reassembly
    + [E() / ip() / UDP(sport=1, dport=53) / b"dns"]                        # other
    + [E() / IPv6(src="2001:db8::1", dst="2001:db8::2", nh=50) / esp(0x2002)]  # no_socket
    + [E() / ARP(psrc="198.18.0.1", pdst="198.18.0.9")]                     # arp
    + [E() / Dot1Q(vlan=20) / ip(proto=50) / esp(0x2000)]                   # vlan_tagged (the VLAN's own interface steers it)
    + [E(type=0x88cc) / (b"\x02\x07" + b"\x00" * 40)]                       # not_ip
    + [Ether(bytes(E() / ip())[:24])]                                       # malformed (cut IPv4 header)
)
sendp(frames, iface="va")
"""


def start(b, tmp_path, *extra):
    conf = tmp_path / "c.conf"
    conf.write_text(CONF)
    stats = tmp_path / "s.json"
    p = subprocess.Popen(["ip", "netns", "exec", b, str(ESPD), "steer", "-c", str(conf), "--outside", "vb",
                          "--stats-json", str(stats), *extra], stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        if "xdp" in sh("ip", "-n", b, "link", "show", "vb").stdout:
            return p, stats
        if p.poll() is not None:
            pytest.fail(f"espd steer exited: {p.stderr.read()}")
        time.sleep(0.05)
    p.kill()
    pytest.fail("XDP program never attached")


def test_steering_counts_every_kind_exactly_and_detaches(netns, tmp_path):
    a, b, mac_b = netns
    p, stats = start(b, tmp_path)
    try:
        ping = sh("ip", "netns", "exec", a, "ping", "-c", "3", "-i", "0.2", "-W", "2", "198.18.0.2", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr  # XDP_PASS keeps the kernel path working
        (tmp_path / "send.py").write_text(SEND)
        sh("ip", "netns", "exec", a, PY, str(tmp_path / "send.py"), mac_b)
        time.sleep(0.3)
    finally:
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=20)[1]
    assert p.returncode == 0, err
    assert "detached from vb" in err
    assert "xdp" not in sh("ip", "-n", b, "link", "show", "vb").stdout, "XDP left attached"
    c = json.loads(stats.read_text())
    assert c == {
        "not_ip": 1, "arp": 1, "ike": 1, "keepalive": 1, "esp_steered": 0, "natt_steered": 0,
        "unknown_spi": 4, "no_socket": 7, "fragment": 0, "other": 4, "malformed": 1,
        **NO_INSIDE, "vlan_tagged": 1,
    }, c  # other = 3 ICMP echo requests + 1 DNS

    # The next start works (nothing stale left behind), and --seconds ends it.
    p = subprocess.run(["ip", "netns", "exec", b, str(ESPD), "steer", "-c", str(tmp_path / "c.conf"),
                        "--outside", "vb", "--seconds", "1"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert "xdp" not in sh("ip", "-n", b, "link", "show", "vb").stdout


# The inside program is not attached by `espd steer`: its counters stay 0.
NO_INSIDE = {k: 0 for k in ("inside_steered", "inside_discard", "inside_local", "inside_pass",
                            "inside_no_socket", "own_esp", "unprotected_inbound", "plain_steered",
                            "vlan_tagged", "frag_steered")}


def test_af_xdp_sockets_receive_exactly_the_steered_frames(netns, tmp_path):
    """With AF_XDP sockets bound (copy mode on veth), ESP for our SPIs is
    redirected to user space — and nothing else is."""
    a, b, mac_b = netns
    p, stats = start(b, tmp_path, "--xsk")
    try:
        time.sleep(0.3)  # sockets bound after attach
        ping = sh("ip", "netns", "exec", a, "ping", "-c", "3", "-i", "0.2", "-W", "2", "198.18.0.2", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        (tmp_path / "send.py").write_text(SEND)
        sh("ip", "netns", "exec", a, PY, str(tmp_path / "send.py"), mac_b)
        time.sleep(0.5)
    finally:
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=20)[1]
    assert p.returncode == 0, err
    assert "xdp" not in sh("ip", "-n", b, "link", "show", "vb").stdout, "XDP left attached"
    c = json.loads(stats.read_text())
    assert c == {
        "not_ip": 1, "arp": 1, "ike": 1, "keepalive": 1, "esp_steered": 4, "natt_steered": 2,
        "unknown_spi": 4, "no_socket": 0, "fragment": 0, "other": 4, "malformed": 1,
        "xsk_received": 7, "xsk_unexpected": 0, **NO_INSIDE, "vlan_tagged": 1, "frag_steered": 1,
    }, c


def test_unprivileged_attach_is_refused_clearly(netns, tmp_path):
    a, b, _ = netns
    # A world-readable copy: the test's tmp dir is private to root.
    import tempfile
    d = tempfile.mkdtemp(prefix="espd-unpriv-")
    os.chmod(d, 0o755)
    conf = os.path.join(d, "c.conf")
    with open(conf, "w") as f:
        f.write(CONF)
    os.chmod(conf, 0o644)
    nobody = shutil.which("setpriv")
    if nobody is None:
        pytest.skip("setpriv (util-linux) missing")
    r = subprocess.run(["ip", "netns", "exec", b, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "--inh-caps=-all", "--bounding-set=-all", str(ESPD), "steer", "-c", str(conf),
                        "--outside", "vb", "--seconds", "1"], capture_output=True, text=True, timeout=30)
    shutil.rmtree(d)
    assert r.returncode == 1
    assert "needs CAP_BPF, CAP_NET_ADMIN and CAP_NET_RAW" in r.stderr, r.stderr
