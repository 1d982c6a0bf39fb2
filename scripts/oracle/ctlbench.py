"""Control-plane benchmark of a live `espd run` (docs/performance.md).

For each tunnel count N: gw1 of the namespace topology (scripts/topo.sh)
gets N tunnels (an outbound SA and its policy each) installed in batches
over one kept v2 connection (the install rate, keys expanded included),
then single changes are timed from request to answer — the answer comes
once every worker runs on the change — over the kept connection (SA add,
SA delete, policy add, policy delete) and through `espctl` (a process per
change), and the gateway's RSS per tunnel (once idle, and 0.3 s after the
install) and its workers' longest turn
(a stall) are read. Prints the table of docs/performance.md.

    python scripts/oracle/ctlbench.py 0 10000 100000      # the full table
    python scripts/oracle/ctlbench.py --smoke              # bounded (tests)
    python scripts/oracle/ctlbench.py --one-peer 100000    # every SA between the same two addresses

Root, namespaces and a release build of espd are needed.
"""

import argparse
import json
import os
import signal
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from espd_oracle import ROOT  # noqa: E402
from test_gateway import Net  # noqa: E402

ESPCTL = ROOT / "target" / "release" / "espctl"
KEY = "0x" + "11" * 20
# Seconds after the install before RSS is read: espd's idle collect (1 s,
# gateway/heap.rs) and a control connection's read timeout (0.25 s) past.
IDLE_S = 1.7


# --one-peer: every tunnel's SA to one peer address (a carrier's IKE peer
# or concentrator with tens of thousands of CHILD_SAs between two addresses).
ONE_PEER = [False]


def tunnel(i, spi_base=0x10000000):
    """An outbound SA to a peer and the policy that uses it (198.19.0.0/16 inside)."""
    peer = "198.18.200.1" if ONE_PEER[0] else f"198.18.{200 + (i >> 8) % 50}.{(i & 255) or 1}"
    src = f"198.19.{128 + ((i >> 14) & 127)}.0"
    dst = f"198.19.{(i >> 6) & 255}.{(i & 63) << 2}"
    spi = spi_base + i
    sa = (f"state add src 198.18.0.1 dst {peer} proto esp spi {spi:#x} reqid {i + 100} "
          f"mode tunnel aead 'rfc4106(gcm(aes))' {KEY} 128")
    pol = (f"policy add src {src}/30 dst {dst}/30 dir out priority 100 "
           f"tmpl src 198.18.0.1 dst {peer} proto esp reqid {i + 100} mode tunnel")
    return sa, pol, peer


class Conn:
    """A kept v2 control connection with pipelined requests."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.f = self.s.makefile("rb")
        self.n = 0

    def call(self, op, **kw):
        self.n += 1
        req = {"v": 2, "id": self.n, "op": op, **kw}
        self.s.sendall(json.dumps(req).encode() + b"\n")
        a = json.loads(self.f.readline())
        assert a.get("id") == self.n, a
        return a

    def apply(self, text):
        a = self.call("apply", name="bench", text=text)
        assert a["ok"], a
        return a

    def encoded(self, texts):
        """Requests applying `texts`, serialised ahead (the clock then
        measures espd, request to answer, not this script's json.dumps)."""
        reqs = []
        for text in texts:
            self.n += 1
            reqs.append((self.n, json.dumps({"v": 2, "id": self.n, "op": "apply",
                                             "name": "bench", "text": text}).encode() + b"\n"))
        return reqs

    def send(self, req):
        n, line = req
        self.s.sendall(line)
        a = json.loads(self.f.readline())
        assert a.get("id") == n and a["ok"], a
        return a


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def espd_pid(net):
    # `ip netns exec` execs espd: the Popen's pid is espd's.
    return net.procs["gw1"].pid


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p / 100))]


def measure(net, n, singles, espctl_calls, batch=2000):
    c = Conn(net.sock("gw1"))
    pid = espd_pid(net)
    base = rss_kib(pid)
    # The batches' text is ready before the clock starts: the rate is
    # espd's (request to answer), not this script's string formatting.
    texts = []
    for start in range(0, n, batch):
        lines = []
        for i in range(start, min(n, start + batch)):
            sa, pol, _ = tunnel(i)
            lines += [sa, pol]
        texts.append("\n".join(lines))
    reqs = c.encoded(texts)
    t0 = time.perf_counter()
    for r in reqs:
        c.send(r)
    install = time.perf_counter() - t0
    del reqs
    del texts
    time.sleep(0.3)
    rss_busy = rss_kib(pid)
    # Idle: espd's control threads give what they freed back to the
    # system once idle for a second (gateway/heap.rs); a gateway's memory
    # is what it holds then.
    time.sleep(IDLE_S)
    rss = rss_kib(pid)
    # SAs alone (what IKE installs most), in batches of 5000.
    # As many as there are tunnels (the target: 100 000 SAs installed in
    # batches), at least one batch.
    sa_only = max(5000, n)
    texts = ["\n".join(tunnel(3_000_000 + i, spi_base=0x50000000)[0]
                       for i in range(start, min(sa_only, start + 5000)))
             for start in range(0, sa_only, 5000)]
    reqs = c.encoded(texts)
    t1 = time.perf_counter()
    for r in reqs:
        c.send(r)
    sa_rate = sa_only / (time.perf_counter() - t1)
    del texts, reqs
    for start in range(0, sa_only, 5000):
        c.apply("\n".join("state delete dst {} spi {}".format(
            tunnel(3_000_000 + i, spi_base=0x50000000)[0].split(" dst ")[1].split()[0],
            hex(0x50000000 + 3_000_000 + i)) for i in range(start, min(sa_only, start + 5000))))
    def turns():
        ws = c.call("stats")["stats"]["workers"]
        return [w["turn_hist"] for w in ws]

    before = turns()
    t_singles = time.perf_counter()
    lat = {"sa add": [], "sa delete": [], "policy add": [], "policy delete": []}
    for k in range(singles):
        sa, pol, _ = tunnel(n + 1_000_000 + k, spi_base=0x70000000)
        dst = sa.split(" dst ")[1].split()[0]
        spi = sa.split(" spi ")[1].split()[0]
        sel = pol.split(" tmpl ")[0].replace("policy add", "policy delete").replace(" priority 100", "")
        for what, text in (("sa add", sa), ("policy add", pol), ("policy delete", sel),
                           ("sa delete", f"state delete dst {dst} spi {spi}")):
            t = time.perf_counter()
            c.apply(text)
            lat[what].append((time.perf_counter() - t) * 1e3)
    t_singles = time.perf_counter() - t_singles
    after = turns()
    # Turns per bucket during the single changes (TURN_BUCKETS: 10, 20, 50,
    # 100, 200, 500 µs, 1, 2, 5 ms, longer).
    during = [[a - b for a, b in zip(wa, wb)] for wa, wb in zip(after, before)]
    bounds = [10, 20, 50, 100, 200, 500, 1000, 2000, 5000, float("inf")]
    over50 = sum(sum(h[3:]) for h in during)
    worst = max((bounds[i] for h in during for i, n in enumerate(h) if n), default=0)
    ctl = []
    for k in range(espctl_calls):
        sa, _, _ = tunnel(n + 2_000_000 + k, spi_base=0x60000000)
        t = time.perf_counter()
        r = subprocess.run(["ip", "netns", "exec", f"{net.p}-gw1", str(ESPCTL), "-s", net.sock("gw1"),
                            *shlex.split(sa)], capture_output=True, text=True)
        ctl.append((time.perf_counter() - t) * 1e3)
        assert r.returncode == 0, r.stderr
    stats = c.call("stats")["stats"]
    stall = max(w.get("max_turn_ns", 0) for w in stats["workers"]) / 1e3
    return {
        "tunnels": n,
        "install_s": install,
        "install_per_s": n / install if n else 0,
        "sa_install_per_s": sa_rate,
        "rss_mib": rss / 1024,
        "kib_per_tunnel": (rss - base) / n if n else 0,
        "kib_per_tunnel_busy": (rss_busy - base) / n if n else 0,
        "lat": {k: (statistics.median(v), pct(v, 99)) for k, v in lat.items()},
        "espctl_ms": (statistics.median(ctl), pct(ctl, 99)) if ctl else (0, 0),
        "max_turn_us": stall,
        "changes_per_s": 4 * singles / t_singles,
        "turns_over_50us": over50,
        "worst_turn_bound_us": worst,
        "turns": sum(sum(h) for h in during),
        "workers": len(stats["workers"]),
    }


def forward(err):
    """espd's log after its banner, to ours when tracing, else dropped.
    Drains to the end whatever becomes of our stderr (a reader that went
    away must not leave espd blocked on a full pipe)."""
    trace = os.environ.get("ESPD_TRACE_APPLY")
    for line in err:
        if trace:
            try:
                sys.stderr.write(line)
            except (BrokenPipeError, OSError):
                trace = None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("counts", nargs="*", type=int, default=[0, 10_000, 100_000])
    ap.add_argument("--smoke", action="store_true", help="0 and 1000 tunnels, few samples")
    ap.add_argument("--queues", type=int, default=2, help="workers (veth queues)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one-peer", action="store_true",
                    help="every SA to one peer address (default: spread over 12 800 peers)")
    ap.add_argument("--espd-arg", action="append", default=[],
                    help="an argument for `espd run` (repeatable), e.g. --espd-arg=--thp")
    a = ap.parse_args()
    # SIGTERM (a `timeout`) unwinds like Ctrl-C: the namespaces and espd
    # go in `finally`, not left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ONE_PEER[0] = a.one_peer
    counts = [0, 1000] if a.smoke else a.counts
    singles = 20 if a.smoke else 200
    calls = 5 if a.smoke else 30
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            net = Net(Path(tmp), queues=a.queues)
            try:
                p = net.start("gw1", args=a.espd_arg)
                # Keep draining espd's log (ESPD_TRACE_APPLY=1 prints a few
                # lines a batch): a full pipe would hold up its control thread.
                threading.Thread(target=forward, args=(p.stderr,), daemon=True).start()
                rows.append(measure(net, n, singles, calls))
            finally:
                net.close()
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    peers = "one peer address" if a.one_peer else "up to 12 800 peer addresses"
    print(f"control plane, {rows[0]['workers']} workers, {os.cpu_count()} vCPUs, {peers}; "
          "change latency request→live in every worker, median / p99 ms")
    print("| tunnels | SA add | SA delete | policy add | policy delete | espctl (process) | install tunnels/s (SA + policy) | install SAs/s | RSS MiB | KiB/tunnel (idle; 0.3 s after the install) | turns > 50 µs during changes | longest turn since start µs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        l = r["lat"]
        f = lambda k: f"{l[k][0]:.2f} / {l[k][1]:.2f}"  # noqa: E731
        print(f"| {r['tunnels']} | {f('sa add')} | {f('sa delete')} | {f('policy add')} | {f('policy delete')} "
              f"| {r['espctl_ms'][0]:.1f} / {r['espctl_ms'][1]:.1f} | {r['install_per_s']:.0f} | {r['sa_install_per_s']:.0f} "
              f"| {r['rss_mib']:.0f} | {r['kib_per_tunnel']:.2f} ({r['kib_per_tunnel_busy']:.2f}) "
              f"| {r['turns_over_50us']} of {r['turns']} (all < {r['worst_turn_bound_us']} µs) | {r['max_turn_us']:.0f} |")


if __name__ == "__main__":
    main()
