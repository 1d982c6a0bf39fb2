#!/usr/bin/env python3
"""Host-to-host throughput and latency: espd host mode vs the plain path vs
strongSwan (charon 5.9.8, kernel-libipsec), one run, side by side.

gw1 and gw2 of scripts/topo.sh act as two hosts (198.18.0.1 ⇄ 198.18.0.2
through the wire bridge). Three set-ups in turn, each measured the same way:
- plain: no IPsec, with TSO/GSO/GRO off on the hosts' links (espd's host pair
  has no TSO either: veth with XDP);
- espd: `espd run --host` on both, transport-mode AES-GCM-128 SAs (and again
  with `--busy-poll`: workers that never sleep; and with `--bench-no-crypto`
  too: ESP framing without the cipher, the I/O path's ceiling);
- charon: two charons, PSK, aes128gcm16, tunnel mode with /32 selectors
  (kernel-libipsec has no transport mode; UDP-encapsulated ESP through its
  TUN device; its sockets marked so its own ESP is not routed into the TUN).
For each: iperf3 TCP one stream (REPS runs of SECS s, median), iperf3 UDP
64-octet datagrams unlimited (received packets a second, median), and ping
(400 echoes at 10 ms, median RTT).

    sudo .venv/bin/python scripts/bench-host.py [SECS] [REPS]
"""
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "oracle"))
import test_host as H  # noqa: E402
import test_ike as T  # noqa: E402

SECS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
REPS = int(sys.argv[2]) if len(sys.argv) > 2 else 3


def iperf(net, *extra):
    srv = net.popen("gw2", "iperf3", "-s", "-1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.4)
    try:
        r = net.ns("gw1", "taskset", "-c", "0", "iperf3", "-c", "198.18.0.2", "-t", str(SECS), "-J",
                   *extra, timeout=SECS + 60)
    finally:
        srv.wait(timeout=30)
    return json.loads(r.stdout)["end"]


def measure(net):
    tcp = [iperf(net)["sum_received"]["bits_per_second"] / 1e9 for _ in range(REPS)]
    udp = []
    for _ in range(REPS):
        e = iperf(net, "-u", "-l", "64", "-b", "0")["sum"]
        udp.append((e["packets"] - e["lost_packets"]) / e["seconds"])
    rtts = []
    r = net.ns("gw1", "ping", "-c", "400", "-i", "0.01", "198.18.0.2", timeout=60)
    for line in r.stdout.splitlines():
        if "time=" in line:
            rtts.append(float(line.split("time=")[1].split()[0]) * 1000)
    return {"tcp_gbps": statistics.median(tcp), "tcp_runs": tcp,
            "udp64_pps": statistics.median(udp), "udp_runs": udp,
            "ping_median_us": statistics.median(rtts), "pings": len(rtts)}


def offloads(net, on):
    for gw, dev in (("gw1", "o1"), ("gw2", "o2")):
        net.ns(gw, "ethtool", "-K", dev, "tso", on, "gso", on, "gro", on, check=False)


def main():
    res = {}
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-host-"))
    net = H.Hosts(tmp)
    try:
        H.host_confs(tmp)
        offloads(net, "off")
        res["plain"] = measure(net)
        offloads(net, "on")
        # The last row has no cipher (ESP framing only): the I/O path's own
        # ceiling on this machine (AF_XDP copy mode on veth).
        for name, args in (("espd", ()), ("espd --busy-poll", ("--busy-poll",)),
                           ("espd --busy-poll, no cipher", ("--busy-poll", "--bench-no-crypto"))):
            net.start("gw1", args=args)
            net.start("gw2", args=args)
            res[name] = measure(net)
            net.kill("gw1", 15)
            net.kill("gw2", 15)
        H.sh("ip", "netns", "exec", f"{net.p}-gw1", str(H.ESPD), "down", "--control", net.sock("gw1"))
        H.sh("ip", "netns", "exec", f"{net.p}-gw2", str(H.ESPD), "down", "--control", net.sock("gw2"))
        mark = ("plugins {\n    kernel-netlink { fwmark = !0x42 }\n"
                "    socket-default { fwmark = 0x42 }\n  }")
        conf = lambda me, peer: T.swanctl_conf(  # noqa: E731
            me, peer, local_ts=f"198.18.0.{me[-1]}/32", remote_ts=f"198.18.0.{peer[-1]}/32")
        c2 = T.Charon(net, conf("gw2", "gw1"), gw="gw2", extra=mark)
        c1 = T.Charon(net, conf("gw1", "gw2"), gw="gw1", extra=mark)
        try:
            c1.swanctl("--initiate", "--child", "net")
            r = net.ns("gw1", "ping", "-c", "3", "-i", "0.2", "-W", "2", "198.18.0.2", check=False)
            assert " 0% packet loss" in r.stdout, r.stdout + c1.log.read_text()[-3000:]
            res["charon"] = measure(net)
        finally:
            c1.stop()
            c2.stop()
    finally:
        net.close()
    cpu_model = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo")
                      if x.startswith("model name")), "?")
    print(f"host to host, gw1 → gw2 (scripts/topo.sh), {SECS} s × {REPS} runs, medians; "
          f"{os.cpu_count()} CPUs, {cpu_model}")
    print("| path | TCP one stream Gbit/s | UDP 64 B received pkt/s | ping RTT median µs |")
    print("|---|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v['tcp_gbps']:.2f} | {v['udp64_pps']:,.0f} | {v['ping_median_us']:.0f} |")
    e, p = res["espd"], res["plain"]
    line = (f"espd/plain TCP {e['tcp_gbps'] / p['tcp_gbps']:.2f}×, added ping latency "
            f"{e['ping_median_us'] - p['ping_median_us']:.0f} µs")
    if "charon" in res:
        line += f"; espd/charon TCP {e['tcp_gbps'] / res['charon']['tcp_gbps']:.2f}×, " \
                f"UDP {e['udp64_pps'] / res['charon']['udp64_pps']:.2f}×"
    print(line)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
