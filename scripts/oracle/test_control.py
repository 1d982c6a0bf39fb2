"""Runtime control (`espctl` against `espd run --control`) on the namespace
test network: both gateways start empty and the tunnel comes up through
espctl alone; a bad batch changes nothing and says where; non-root peers are
refused; listing hides keys; and a make-before-break rekey, three times
during a UDP stream of numbered datagrams, loses and duplicates nothing.
"""

import json
import os
import re
import stat
import subprocess
import time

import pytest

from espd_oracle import ROOT
from test_gateway import Net, drops, need, sh

ESPCTL = str(ROOT / "target" / "release" / "espctl")
PY = str(ROOT / ".venv" / "bin" / "python")


@pytest.fixture
def net(tmp_path):
    need("ping")
    n = Net(tmp_path)
    try:
        yield n
    finally:
        n.close()


def ctl(net, gw, *args, check=True):
    r = subprocess.run([ESPCTL, "-s", net.sock(gw), *args], capture_output=True, text=True,
                       timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"espctl {' '.join(args)}: {r.stderr}")
    return r


def test_tunnel_comes_up_through_espctl_alone(net):
    net.start("gw1", config=False)
    net.start("gw2", config=False)
    mode = os.stat(net.sock("gw1")).st_mode
    assert stat.S_IMODE(mode) == 0o600 and os.stat(net.sock("gw1")).st_uid == 0
    r = ctl(net, "gw1", "-b", str(net.tmp / "gw1.conf"))
    assert "4 state(s) added, 4 polic(ies) added" in r.stdout, r.stdout
    ctl(net, "gw2", "-b", str(net.tmp / "gw2.conf"))
    for dst in ("198.18.2.20", "2001:db8:2::20"):
        r = net.ns("a", "ping", "-c", "3", "-i", "0.2", "-W", "2", dst, check=False)
        assert " 0% packet loss" in r.stdout, r.stdout
    # list hides keys unless asked; get finds one state.
    conf = (net.tmp / "gw1.conf").read_text()
    key = re.search(r"spi 0x1001 .*? (0x[0-9a-f]{40}) 128", conf)[1]
    plain = ctl(net, "gw1", "state", "list").stdout
    assert key not in plain and plain.count("<redacted>") == 4, plain
    assert key in ctl(net, "gw1", "state", "list", "--keys").stdout
    got = ctl(net, "gw1", "state", "get", "dst", "198.18.0.2", "spi", "0x1001").stdout
    # Listings write the SPI as `ip xfrm state list` does: eight hex digits.
    assert got.count("state add") == 1 and "spi 0x00001001" in got, got
    assert ctl(net, "gw1", "policy", "list").stdout.count("policy add") == 4
    # stats over the socket agree with the counters espd writes at exit.
    # (workers publish every 100 ms)
    for _ in range(20):
        live = json.loads(ctl(net, "gw1", "stats", "--json").stdout)
        if live["decapsulated"] == 6:
            break
        time.sleep(0.1)
    assert live["encapsulated"] == 6 and live["decapsulated"] == 6, live
    s1, _ = net.stop("gw1")
    assert (s1["encapsulated"], s1["decapsulated"]) == (6, 6)
    assert not os.path.exists(net.sock("gw1")), "socket removed at exit"


def test_a_bad_batch_changes_nothing_and_says_where(net, tmp_path):
    net.start("gw1")
    net.start("gw2")
    before = ctl(net, "gw1", "state", "list").stdout
    bad = tmp_path / "bad.batch"
    bad.write_text("state delete src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001\n"
                   "policy flush\n"
                   "state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x3001 mode tunnel "
                   "aead 'rfc4106(gcm(aes))' 0x1234 128\n")
    r = ctl(net, "gw1", "-b", str(bad), check=False)
    assert r.returncode == 1
    assert f"{bad}:3:" in r.stderr and "20 or 36 octets" in r.stderr, r.stderr
    assert ctl(net, "gw1", "state", "list").stdout == before
    assert ctl(net, "gw1", "policy", "list").stdout.count("policy add") == 4
    r = ctl(net, "gw1", "state", "frobnicate", check=False)
    assert r.returncode == 1 and "expected add, update, delete or flush" in r.stderr, r.stderr
    r = ctl(net, "gw1", "state", "delete", "dst", "198.18.0.2", "spi", "0x9999", check=False)
    assert r.returncode == 1 and "no state for dst 198.18.0.2 spi 0x00009999" in r.stderr
    # Traffic was never disturbed.
    assert net.ns("a", "ping", "-c", "2", "-W", "2", "198.18.2.20", check=False).returncode == 0
    s1, _ = net.stop("gw1")
    assert not drops(s1), drops(s1)


def test_non_root_peers_are_refused(net):
    import tempfile
    d = tempfile.mkdtemp(prefix="espd-ctl-")  # traversable by others, unlike pytest's tmp
    os.chmod(d, 0o755)
    net.sock = lambda gw: os.path.join(d, f"{gw}.sock")
    net.start("gw1")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    r = subprocess.run(nobody + [ESPCTL, "-s", net.sock("gw1"), "stats"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1 and "Permission denied" in r.stderr, r.stderr
    # Even if the file mode were opened up, espd checks the peer (SO_PEERCRED).
    os.chmod(net.sock("gw1"), 0o666)
    r = subprocess.run(nobody + [ESPCTL, "-s", net.sock("gw1"), "state", "flush"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "root only" in r.stderr, r.stderr
    assert ctl(net, "gw1", "state", "list").stdout.count("state add") == 4


RECEIVER = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
s.settimeout(3)
seen = []
try:
    while True:
        d, _ = s.recvfrom(2048)
        seen.append(int.from_bytes(d[:8], "big"))
except socket.timeout:
    pass
json.dump(seen, open(sys.argv[1], "w"))
"""

SENDER = r"""
import socket, sys, time
n, rate = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t0 = time.monotonic()
for i in range(n):
    while time.monotonic() < t0 + i / rate:
        pass
    s.sendto(i.to_bytes(8, "big") + b"x" * 200, ("198.18.2.20", 9999))
"""


def rekey(net, tmp, i):
    """Make-before-break for the A→B SA (reqid 1): the new inbound SA at gw2,
    then the new outbound SA at gw1 (the newest SA of a reqid is used), then,
    once in-flight packets have arrived, the old ones go on both sides."""
    key = "0x" + os.urandom(20).hex()
    old, new = (0x1001 if i == 0 else 0x5000 + i - 1), 0x5000 + i
    line = (f"state add src 198.18.0.1 dst 198.18.0.2 proto esp spi {new:#x} reqid 1 mode tunnel "
            f"replay-window 1024 aead 'rfc4106(gcm(aes))' {key} 128\n")
    b = tmp / f"rekey{i}.batch"
    b.write_text(line)
    ctl(net, "gw2", "-b", str(b))
    ctl(net, "gw1", "-b", str(b))
    time.sleep(0.3)
    for gw in ("gw1", "gw2"):
        ctl(net, gw, "state", "delete", "src", "198.18.0.1", "dst", "198.18.0.2", "proto", "esp",
            "spi", hex(old))
    return new


def rekeys_under_stream(net, tmp_path, n, rate, gap):
    """Three make-before-break rekeys `gap` seconds apart during a stream of `n`
    numbered datagrams from A to B at `rate` a second: every datagram must
    arrive exactly once. Returns the SPIs the rekeys made."""
    # Warm the path (neighbours resolved) before the measured stream.
    net.ns("a", "ping", "-c", "2", "-W", "2", "198.18.2.20")
    (tmp_path / "rx.py").write_text(RECEIVER)
    (tmp_path / "tx.py").write_text(SENDER)
    out = tmp_path / "seen.json"
    rx = net.popen("b", PY, str(tmp_path / "rx.py"), str(out))
    time.sleep(0.5)
    tx = net.popen("a", PY, str(tmp_path / "tx.py"), str(n), str(rate))
    spis = []
    for i in range(3):
        time.sleep(gap)
        spis.append(rekey(net, tmp_path, i))
    assert tx.wait(timeout=60) == 0
    assert rx.wait(timeout=60) == 0
    seen = json.loads(out.read_text())
    missing = sorted(set(range(n)) - set(seen))
    dups = len(seen) - len(set(seen))
    assert not missing and not dups, f"{len(missing)} lost (first {missing[:10]}), {dups} duplicated"
    return spis


def test_three_rekeys_under_load_lose_and_duplicate_nothing(net, tmp_path):
    net.start("gw1")
    net.start("gw2")
    # Six seconds at a fixed rate: the three rekeys (four changes each) end well before it.
    spis = rekeys_under_stream(net, tmp_path, 9000, 1500.0, 0.8)
    s1, _ = net.stop("gw1")
    s2, _ = net.stop("gw2")
    assert not drops(s1) and not drops(s2), (drops(s1), drops(s2))
    # Only the last SA of the chain is left, and it carried traffic.
    last = {x["spi"]: x for x in s1["sas"]}
    assert f"0x{spis[-1]:08x}" in last and "0x00001001" not in last, list(last)
    assert last[f"0x{spis[-1]:08x}"]["packets"] > 0


SCRAPE = r"""
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=5).read().decode()
out = {}
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        out.setdefault(s.name, []).append([s.labels, s.value])
json.dump(out, sys.stdout)
"""


def test_metrics_scrape_parses_and_matches_espctl_stats(net, tmp_path):
    net.start("gw1", args=("--metrics", "9464"))
    net.start("gw2")
    net.ns("a", "ping", "-c", "4", "-i", "0.1", "198.18.2.20")
    # A replayed packet would be a drop; here, an unknown SPI counted by XDP is enough:
    time.sleep(0.3)  # workers publish every 100 ms
    (tmp_path / "scrape.py").write_text(SCRAPE)
    m = json.loads(net.ns("gw1", PY, str(tmp_path / "scrape.py")).stdout)
    st = json.loads(ctl(net, "gw1", "stats", "--json").stdout)
    esp = {l["operation"]: v for l, v in m["espd_esp_total"]}
    assert esp == {"encapsulated": st["encapsulated"], "decapsulated": st["decapsulated"]} \
        == {"encapsulated": 4, "decapsulated": 4}, (esp, st)
    sa = {l["spi"]: v for l, v in m["espd_sa_packets_total"]}
    assert sa["0x00001001"] == 4 and sa["0x00002001"] == 4, sa
    reasons = {l["reason"]: v for l, v in m["espd_drops_total"]}
    assert reasons == {k: float(v) for k, v in st["drops"].items()}
    rx = {(l["direction"], l["side"]): v for l, v in m["espd_packets_total"]}
    assert rx[("rx", "inside")] == 4 and rx[("tx", "outside")] == 4, rx
    assert 0 <= m["espd_worker_busy_ratio"][0][1] <= 1
    # Loopback only when given a bare port: not reachable on the outside address.
    r = net.ns("gw2", PY, "-c", "import urllib.request as u; u.urlopen('http://198.18.0.1:9464/', timeout=2)",
               check=False)
    assert r.returncode != 0


def test_lifetimes_and_monitor(net, tmp_path):
    net.start("gw1")
    net.start("gw2")
    mon = subprocess.Popen([ESPCTL, "-s", net.sock("gw1"), "monitor", "--count", "4"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    # A new outbound SA for A→B with a packet limit: soft at 3, hard at 5.
    key = "0x" + os.urandom(20).hex()
    line = (f"state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x6000 reqid 1 mode tunnel "
            f"aead 'rfc4106(gcm(aes))' {key} 128 limit packet-soft 3 packet-hard 5\n")
    b = tmp_path / "l.batch"
    b.write_text(line.replace("limit packet-soft 3 packet-hard 5", ""))
    ctl(net, "gw2", "-b", str(b))
    b.write_text(line)
    ctl(net, "gw1", "-b", str(b))
    # 0.5 s apart: the deletion after the hard expiry lands between two pings.
    r = net.ns("a", "ping", "-c", "8", "-i", "0.5", "-W", "1", "198.18.2.20", check=False)
    # 5 go through the new SA; the 6th hits the hard limit, the SA is deleted,
    # and the older SA of reqid 1 (0x1001) carries the rest.
    time.sleep(0.5)
    # The 6th finds the SA expired and is dropped (as Linux does); the
    # deletion follows within a worker's publish interval.
    assert r.stdout.count("bytes from") == 7 and "icmp_seq=6 " not in r.stdout, r.stdout
    # Without an older SA to fall back to, the hard limit stops the traffic.
    b.write_text(line.replace("0x6000", "0x6001").replace("packet-soft 3 packet-hard 5",
                                                          "packet-hard 2"))
    ctl(net, "gw2", "-b", str(b))
    ctl(net, "gw1", "-b", str(b))
    ctl(net, "gw1", "state", "delete", "dst", "198.18.0.2", "spi", "0x1001")
    r2 = net.ns("a", "ping", "-c", "4", "-i", "0.2", "-W", "1", "198.18.2.20", check=False)
    assert r2.stdout.count("bytes from") == 2, r2.stdout
    time.sleep(0.3)
    ctl(net, "gw1", "state", "get", "dst", "198.18.0.2", "spi", "0x6000")
    assert "spi 0x00006000" not in ctl(net, "gw1", "state", "list").stdout
    try:
        out, _ = mon.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        mon.kill()
        out, _ = mon.communicate()
        raise AssertionError("events so far:\n" + out)
    ev = [json.loads(l) for l in out.splitlines()]
    kinds = [(e["event"], e.get("spi"), e.get("why")) for e in ev]
    assert kinds[0] == ("sa-added", "0x00006000", None), kinds
    assert ("soft-expire", "0x00006000", "packets") in kinds, kinds
    assert ("hard-expire", "0x00006000", "packets") in kinds, kinds
    assert ("sa-removed", "0x00006000", None) in kinds, kinds
    s1, _ = net.stop("gw1")
    assert s1["drops"]["SaExpired"] >= 2, drops(s1)
    assert s1["drops"]["NoOutSa"] >= 1, drops(s1)  # after 0x6001 was deleted


UNKNOWN = r"""
import sys
from scapy.all import IP, ESP, Ether, sendp
sendp(Ether(dst=sys.argv[1]) / IP(src="198.18.0.2", dst="198.18.0.1") / ESP(spi=0xdead, seq=1) / (b"x" * 40),
      iface="o2", count=3, verbose=False)
"""


def test_monitor_reports_unknown_spis(net, tmp_path):
    net.start("gw1")
    mon = subprocess.Popen([ESPCTL, "-s", net.sock("gw1"), "monitor", "--count", "1"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    mac = json.loads(net.ns("gw1", "ip", "-j", "link", "show", "o1").stdout)[0]["address"]
    (tmp_path / "u.py").write_text(UNKNOWN)
    net.ns("gw2", PY, str(tmp_path / "u.py"), mac)
    try:
        out, _ = mon.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        mon.kill()
        raise
    ev = json.loads(out.splitlines()[0])
    assert ev["event"] == "unknown-spi" and ev["count"] == 3, ev
