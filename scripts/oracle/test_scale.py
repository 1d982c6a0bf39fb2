"""The carrier-edge control plane on the namespace topology (scripts/topo.sh):

    host A ─ gw1 (espd) ═ wire (bridge) ═ gw2 (espd) ─ host B

- hung clients (silent, half a line, a reader that never reads) hold up no
  one: 100 espctl calls, reads and changes, answered in a median under
  100 ms and each within 1 s (far from the 5 s limits), and
  each hung client gets an error naming the limit it hit;
- a request over the size limit is answered, not cut off;
- protocol v2: pipelined requests answered in order with their ids, events
  on the same connection; v1 answers unchanged;
- an acquire event reaches a subscriber within 10 ms of the first packet
  that matches a PROTECT policy with no SA, once a second per policy;
- with 10 000 tunnels installed on both gateways, three make-before-break
  rekeys during a numbered UDP stream lose and duplicate nothing.
"""

import json
import shlex
import socket
import subprocess
import time

from ctlbench import Conn, tunnel
from test_control import ESPCTL, PY, ctl, net, rekeys_under_stream  # noqa: F401 (net: the fixture)
from test_gateway import drops


def raw(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def answer(s, timeout=10):
    s.settimeout(timeout)
    buf = b""
    while not buf.endswith(b"\n"):
        d = s.recv(65536)
        if not d:
            break
        buf += d
    return json.loads(buf) if buf else None


def test_hung_clients_hold_up_no_one(net, tmp_path):
    net.start("gw1")
    sock = net.sock("gw1")
    silent = raw(sock)
    half = raw(sock)
    half.sendall(b'{"v": 1, "op": "sta')
    # A v2 client that sends requests and never reads the answers.
    deaf = raw(sock)
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.sendall(b"".join(json.dumps({"v": 2, "id": i, "op": "states"}).encode() + b"\n"
                          for i in range(200)))
    # A stopped espctl (Ctrl-Z) holding a monitor connection.
    stopped = subprocess.Popen([ESPCTL, "-s", sock, "monitor"], stdout=subprocess.PIPE)
    time.sleep(0.2)
    stopped.send_signal(19)  # SIGSTOP
    extra = ("state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x7777 reqid 77 mode tunnel "
             "aead 'rfc4106(gcm(aes))' 0x" + "33" * 20 + " 128")
    took = []
    try:
        for i in range(100):
            if i % 4 == 0:
                args = ["stats", "--json"]
            elif i % 4 == 1:
                args = ["state", "list"]
            elif i % 4 == 2:
                args = shlex.split(extra)
            else:
                args = ["state", "delete", "dst", "198.18.0.2", "spi", "0x7777"]
            t = time.perf_counter()
            ctl(net, "gw1", *args)
            took.append(time.perf_counter() - t)
        # Held up would mean waiting for a hung client's 5 s limit; a call
        # is a process start through `ip netns exec`, so its time also has
        # the machine's scheduling in it (one of 100 took 115 ms on a busy
        # CI runner): the typical call, and no call near the limit.
        took.sort()
        median, worst = took[len(took) // 2], took[-1]
        assert median < 0.1, f"the median espctl call took {median * 1e3:.0f} ms"
        assert worst < 1.0, f"the slowest espctl call took {worst * 1e3:.0f} ms"
        # The hung ones are told what they missed once their time is up.
        a = answer(silent)
        assert a and not a["ok"] and "no request within 5 s" in a["error"], a
        a = answer(half)
        assert a and not a["ok"] and "incomplete within 5 s" in a["error"], a
    finally:
        stopped.send_signal(18)  # SIGCONT
        stopped.kill()
        stopped.wait()
        for s in (silent, half, deaf):
            s.close()
    # And espd still answers, with the changes applied exactly.
    assert "0x00007777" not in ctl(net, "gw1", "state", "list").stdout


def test_a_request_over_the_limit_is_answered(net):
    net.start("gw1")
    s = raw(net.sock("gw1"))
    big = b'{"v": 1, "op": "apply", "text": "' + b"#" * (17 << 20)
    try:
        s.sendall(big)
    except (BrokenPipeError, ConnectionResetError):
        pass
    a = answer(s)
    assert a and not a["ok"] and "16 MiB" in a["error"], a
    s.close()
    assert ctl(net, "gw1", "state", "list").stdout.count("state add") == 4


def test_v2_pipelines_and_delivers_events_on_the_connection(net):
    net.start("gw1")
    sock = net.sock("gw1")
    c = Conn(sock)
    sub = c.call("subscribe")
    assert sub["ok"] and sub["v"] == 2
    # Twenty requests in one write; answers in order, each with its id.
    reqs = []
    for i in range(20):
        op = ["stats", "states", "policies"][i % 3]
        reqs.append({"v": 2, "id": f"r{i}", "op": op})
    c.s.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in reqs))
    got = []
    while len(got) < 20:
        a = json.loads(c.f.readline())
        if "event" in a:
            continue
        got.append(a)
    assert [a["id"] for a in got] == [f"r{i}" for i in range(20)]
    assert all(a["ok"] and a["v"] == 2 for a in got)
    # A change from another client: the event arrives on this connection.
    sa, _, _ = tunnel(1)
    other = Conn(sock)
    assert other.call("apply", name="t", text=sa)["ok"]
    deadline = time.time() + 5
    ev = None
    while time.time() < deadline:
        a = json.loads(c.f.readline())
        if a.get("event") == "sa-added":
            ev = a
            break
    assert ev and ev["spi"] == "0x10000001", ev
    # v1 is answered as before; an unknown version is refused naming ours.
    s = raw(sock)
    s.sendall(b'{"v": 1, "op": "stats"}\n')
    a = answer(s)
    assert a["ok"] and a["v"] == 1 and "id" not in a
    s = raw(sock)
    s.sendall(b'{"v": 3, "op": "stats"}\n')
    a = answer(s)
    assert not a["ok"] and "versions 1 and 2" in a["error"]


SEND_ONE = r"""
import socket, sys, time
n = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sys.stdin.readline()
t = time.time()
for i in range(n):
    s.sendto(b"x" * 64, ("198.18.3.30", 7777))
    if i == 0:
        print(t, flush=True)
    time.sleep(0.01)
"""


def test_acquire_reaches_a_subscriber_within_10_ms(net, tmp_path):
    # A PROTECT policy whose template (reqid 77) has no SA: strongSwan's trap.
    # (198.18.3.0/24: a site behind gw2 no tunnel covers yet.)
    trap = ("policy add src 198.18.1.0/24 dst 198.18.3.0/24 proto udp dport 7777 dir out "
            "tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 77 mode tunnel\n")
    net.start("gw1", extra_conf=trap)
    net.start("gw2")
    net.ns("a", "ping", "-c", "1", "-W", "2", "198.18.2.20")
    c = Conn(net.sock("gw1"))
    assert c.call("subscribe")["ok"]
    (tmp_path / "one.py").write_text(SEND_ONE)
    p = subprocess.Popen(["ip", "netns", "exec", f"{net.p}-a", PY, str(tmp_path / "one.py"), "150"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    p.stdin.write("go\n")
    p.stdin.flush()
    sent = float(p.stdout.readline())
    events = []
    c.s.settimeout(3)
    t_end = time.time() + 2.5
    while time.time() < t_end:
        try:
            line = c.f.readline()
        except socket.timeout:
            break
        a = json.loads(line)
        if a.get("event") == "acquire":
            events.append((time.time(), a))
    p.wait(timeout=10)
    assert events, "no acquire event"
    first_at, ev = events[0]
    assert first_at - sent < 0.010, f"acquire {1e3 * (first_at - sent):.1f} ms after the first packet"
    assert ev["tmpl"]["reqid"] == 77 and ev["policy"]["dst"] == "198.18.3.0/24", ev
    assert ev["packet"]["dst"] == "198.18.3.30" and ev["packet"]["ports"][1] == 7777, ev
    # 150 packets over 1.5 s: one event a second for the policy, not one a packet.
    assert len(events) <= 3, [e[1] for e in events]
    s1, _ = net.stop("gw1")
    assert s1["drops"]["NoOutSa"] >= 140, s1["drops"]


def install(net, gw, n, base):
    c = Conn(net.sock(gw))
    for start in range(0, n, 2000):
        lines = []
        for i in range(start, min(n, start + 2000)):
            sa, pol, _ = tunnel(base + i)
            lines += [sa, pol]
        c.apply("\n".join(lines))


def test_ten_thousand_tunnels_and_three_rekeys_lose_nothing(net, tmp_path):
    net.start("gw1")
    net.start("gw2")
    for gw in ("gw1", "gw2"):
        install(net, gw, 10_000, 0)
    assert ctl(net, "gw1", "stats", "--json").stdout.count('"spi"') >= 10_004
    rekeys_under_stream(net, tmp_path, 6000, 1500.0, 0.6)
    s1, _ = net.stop("gw1")
    s2, _ = net.stop("gw2")
    assert not drops(s1) and not drops(s2), (drops(s1), drops(s2))
