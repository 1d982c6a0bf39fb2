"""Tunnels that rekey all day (issue #15, docs/performance.md): N tunnels
(IKE_SA + CHILD_SA each) held up against espd-ike with espd on gw1 while
espd-ike rekeys every CHILD_SA on its timers (make-before-break, PFS with
x25519), and a numbered UDP stream crosses a sample tunnel that is rekeyed
all through the storm.

- The N tunnels come from espd-ike-load in a sixth namespace on the wire
  (198.18.0.3 to .6, 256 set-ups in flight, pinned to CPU 0); every CHILD_SA is installed in gw1's espd
  (2 N SAs, and 2 N more for a moment at each rekey).
- The sample: charon 5.9.8 on gw2 (kernel-libipsec, the site-to-site
  tunnel 198.18.1.0/24 ⇄ 198.18.2.0/24) with espd-ike as its peer, whose
  child rekeys every `--sample-rekey` seconds; host A sends 200 numbered
  datagrams a second to host B through it from before the first load
  tunnel comes up until after the last is deleted.
- Time is compressed: the real case is 40 000 tunnels with one-hour
  lifetimes, about 11 rekeys a second. Here `rekey_time` is `--rekey`
  seconds (120) less a jitter of up to `rand_time` (60), life_time their
  sum, so the same tunnels rekey 30 to 60 times faster: every tunnel is
  rekeyed at least once while they are held.

espd-ike counts how late each rekey it started was complete (from its due
time to the new pair installed, `child-rekey-lag.*`) and the rekeys that
finished after the old SA's life_time (`child-rekey-late`): the figures
printed are those counters, the stream's losses, and the RSS of espd-ike and
espd.

    python scripts/oracle/ikerekey.py 40000          # the benchmark (about 5 minutes)
    python scripts/oracle/ikerekey.py --smoke        # bounded (tests): 1 000 tunnels, 20 s rekeys

Root, namespaces, strongSwan and a release build are needed.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ikeload import ESPD_IKE, LOAD, LOAD_SECRET, PSK, add_sources, cleanup, load_conn, rss_kib  # noqa: E402
from test_gateway import PY, Net, sh  # noqa: E402
import test_ike  # noqa: E402
from test_ike import ESPCTL, STREAM_RX, STREAM_TX, Charon, swanctl_conf  # noqa: E402

RATE = 200  # numbered datagrams a second through the sample tunnel
SOURCES = 4  # the generator's addresses (198.18.0.3 …): 256 set-ups in flight


def responder_conf(rekey, rand, sample_rekey):
    """gw1's file: the sample connection to charon on gw2 first (it is
    picked by its address), then the load generator's (`%any`)."""
    site = swanctl_conf("gw1", "gw2", child_extra=f"\n        rekey_time = {sample_rekey}s"
                        f"\n        rand_time = 0s\n        life_time = {3 * sample_rekey}s")
    conns, secrets = site.split("\nsecrets {\n")
    conns = conns.rstrip().removesuffix("}")
    load = load_conn(esp="aes128gcm16-x25519", child_extra=f"\n        rekey_time = {rekey}s"
                     f"\n        rand_time = {rand}s\n        life_time = {rekey + rand}s")
    return f"{conns}\n{load}}}\nsecrets {{\n{LOAD_SECRET}{secrets}"


class Gen:
    """A sixth namespace on the wire's bridge, 198.18.0.3, for the generator."""

    def __init__(self, net):
        self.net = net
        self.ns = f"{net.p}-gen"
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", "g0", "netns", self.ns, "type", "veth", "peer", "name", "w3", "netns",
           f"{net.p}-wire")
        sh("ip", "-n", f"{net.p}-wire", "link", "set", "w3", "master", "br0", "up")
        sh("ip", "-n", self.ns, "addr", "add", "198.18.0.3/24", "dev", "g0")
        add_sources(lambda *c: sh("ip", "netns", "exec", self.ns, *c), "g0", 3, SOURCES)
        sh("ip", "-n", self.ns, "link", "set", "g0", "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")

    def close(self):
        sh("ip", "netns", "del", self.ns, check=False)


def ike_stats(net, sock):
    r = net.ns("gw1", str(ESPCTL), "ike", "--ike-socket", sock, "stats")
    return json.loads(r.stdout)


def run(tmp, n, rekey, rand, hold, sample_rekey):
    tmp = Path(tmp)
    net = Net(tmp)
    gen = None
    procs = []
    charon = None
    try:
        gen = Gen(net)
        net.start("gw1", config=False)
        conf = tmp / "gw1-swanctl.conf"
        conf.write_text(responder_conf(rekey, rand, sample_rekey))
        sock = str(tmp / "ike.sock")
        log = open(tmp / "espd-ike.log", "w")
        ike = net.popen("gw1", "taskset", "-c", "1", str(ESPD_IKE), "--config", str(conf), "--espd",
                        net.sock("gw1"), "--socket", sock, stdout=log, stderr=subprocess.STDOUT)
        procs.append(ike)
        charon = Charon(net, swanctl_conf("gw2", "gw1"))
        time.sleep(0.5)
        charon.swanctl("--initiate", "--child", "net", timeout=30)
        deadline = time.time() + 15
        while net.ns("a", "ping", "-c", "1", "-W", "1", "198.18.2.20", check=False).returncode != 0:
            assert time.time() < deadline, "the sample tunnel is not up"
        base_ike = rss_kib(ike.pid)
        espd_pid = net.procs["gw1"].pid
        base_espd = rss_kib(espd_pid)
        # The stream: long enough to cover set-up (at most 60 s), hold and teardown.
        secs = n / 1000 + hold + n / 1000 + 10
        (tmp / "rx.py").write_text(STREAM_RX)
        (tmp / "tx.py").write_text(STREAM_TX)
        recv = net.popen("b", PY, str(tmp / "rx.py"), "3", stdout=subprocess.PIPE, text=True)
        procs.append(recv)
        time.sleep(0.3)
        sent = int(secs * RATE)
        send = net.popen("a", PY, str(tmp / "tx.py"), str(sent), str(RATE))
        procs.append(send)
        time.sleep(2)
        g = subprocess.Popen(["ip", "netns", "exec", gen.ns, "taskset", "-c", "0", str(LOAD), "--local",
                              "198.18.0.3", "--peer", "198.18.0.1", "--tunnels", str(n), "--psk", PSK,
                              "--esp", "aes128gcm16-x25519", "--hold", str(hold), "--timeout", "900",
                              "--window", "256", "--sources", str(SOURCES)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(g)
        line = g.stderr.readline()
        assert line.startswith("up "), line + g.stderr.read()
        time.sleep(min(5, hold / 2))
        up = {"ike_rss_kib": rss_kib(ike.pid), "espd_rss_kib": rss_kib(espd_pid),
              "espd_states": net.ns("gw1", str(ESPCTL), "-s", net.sock("gw1"), "state", "list")
              .stdout.count("state add")}
        out, err = g.communicate(timeout=hold + 600)
        assert g.returncode == 0, out + err
        r = json.loads(out.strip().splitlines()[-1])
        r.update(up)
        r.update({"base_ike_kib": base_ike, "base_espd_kib": base_espd, "rekey": rekey, "rand": rand,
                  "hold": hold, "sample_rekey": sample_rekey})
        st = ike_stats(net, sock)
        assert send.wait(timeout=secs + 60) == 0
        got, distinct, top, back = (int(x) for x in recv.communicate(timeout=60)[0].split())
        r["stream"] = {"sent": sent, "got": got, "distinct": distinct, "top": top, "reordered": back}
        r["stats"] = st
        text = (tmp / "espd-ike.log").read_text()
        r["sample_rekeys"] = text.count("rekeying CHILD_SA net")
        ike.terminate()
        ike.wait(timeout=60)
        return r
    finally:
        if charon:
            charon.stop()
        cleanup(procs)
        if gen:
            gen.close()
        net.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tunnels", nargs="?", type=int, default=40_000)
    ap.add_argument("--rekey", type=int, default=120, help="the load children's rekey_time, seconds")
    ap.add_argument("--rand", type=int, default=60, help="their rand_time (jitter), seconds")
    ap.add_argument("--sample-rekey", type=int, default=15, help="the sample child's rekey_time, seconds")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not (shutil.which("swanctl") and os.path.exists(test_ike.CHARON)):
        why = "needs strongSwan 5.9 (strongswan-charon strongswan-swanctl libcharon-extra-plugins)"
        if os.environ.get("CI") == "true":
            sys.exit(f"strongSwan missing in CI (scripts/deps.sh installs it): {why}")
        print(f"skipped: {why}")
        return
    if a.smoke:
        a.tunnels, a.rekey, a.rand, a.sample_rekey = 1000, 20, 10, 6
    # Every tunnel up by the end of set-up is rekeyed within `rekey` of it.
    hold = a.rekey + 10 + a.tunnels // 1000
    with tempfile.TemporaryDirectory() as tmp:
        r = run(tmp, a.tunnels, a.rekey, a.rand, hold, a.sample_rekey)
    st, s = r["stats"], r["stream"]
    if a.json:
        print(json.dumps(r, indent=1))
    buckets = ["0-10ms", "10-100ms", "100ms-1s", "1-10s", "over-10s"]
    lag = {b: st.get(f"child-rekey-lag.{b}", 0) for b in buckets}
    lost = s["sent"] - s["distinct"]
    dup = s["got"] - s["distinct"]
    print(f"{a.tunnels} tunnels held {hold} s, CHILD_SA rekey_time {a.rekey} s less up to {a.rand} s of jitter "
          f"(life_time {a.rekey + a.rand} s, PFS x25519), espd-ike + espd on gw1, {os.cpu_count()} vCPUs")
    print(f"set-up {r['setup_secs']:.1f} s ({r['setups_per_sec']:.0f}/s), teardown {r['teardown_secs']:.1f} s, "
          f"espd SAs while up {r['espd_states']}")
    print(f"CHILD_SA rekeys completed: {st.get('child-rekeyed', 0)} (started {st.get('child-rekeys-started', 0)}), "
          f"late (after life_time) {st.get('child-rekey-late', 0)}, hard-expired {st.get('child-hard-expired', 0)}, "
          f"collisions {st.get('child-rekey-collisions', 0)}, retransmits {st.get('retransmits', 0)}")
    print("lag from due time to new pair installed: " + ", ".join(f"{b} {v}" for b, v in lag.items())
          + f"; max {st.get('child-rekey-lag-max-ms', 0)} ms")
    print(f"sample tunnel (charon 5.9.8 on gw2): {r['sample_rekeys']} rekeys; numbered stream {s['sent']} sent, "
          f"{s['distinct']} received, {lost} lost, {dup} duplicated, {s['reordered']} reordered")
    print(f"RSS with the tunnels up: espd-ike {r['ike_rss_kib'] / 1024:.0f} MiB "
          f"({(r['ike_rss_kib'] - r['base_ike_kib']) / a.tunnels:.2f} KiB a tunnel), espd "
          f"{r['espd_rss_kib'] / 1024:.0f} MiB ({(r['espd_rss_kib'] - r['base_espd_kib']) / a.tunnels:.2f} KiB)")
    ok = (st.get("child-rekeyed", 0) >= a.tunnels and st.get("child-rekey-late", 0) == 0
          and st.get("child-hard-expired", 0) == 0 and lost == 0 and dup == 0 and r["left"] == 0
          and r["sample_rekeys"] >= 2)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
