#!/usr/bin/env python3
"""IKE_SA + first CHILD_SA set-up time and CPU, espd-ike vs charon, one run.

Both initiate from gw1 to the same charon 5.9.8 responder on gw2 (scripts/topo.sh,
PSK, aes128gcm16-prfsha256-x25519, ESP aes128gcm16, encap = yes). Set-up time
is read off the wire capture (bridge namespace): the first IKE_SA_INIT request to
the IKE_AUTH response of each IKE_SA, so neither side's command-line tools count.
CPU is the initiator process's user+system time over the run, per set-up.
Prints medians over N set-ups (default 20) and the ratio.

    sudo .venv/bin/python scripts/bench-ike.py [N] [psk|ecdsa]

With `ecdsa` both sides authenticate with ECDSA P-256 certificates from one CA
(RFC 7427 signatures), as test_ike.py's certificate cases.
"""
import os
import pathlib
import socket
import json
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "oracle"))
import test_ike as T  # noqa: E402
from test_gateway import Net  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20
AUTH = sys.argv[2] if len(sys.argv) > 2 else "psk"
TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def ike_call(sock, req):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall((json.dumps(req) + "\n").encode())
    buf = b""
    while not buf.endswith(b"\n"):
        buf += s.recv(65536)
    return json.loads(buf)


def wire_times(pcap):
    r = subprocess.run(["tshark", "-r", str(pcap), "-Y", "isakmp", "-T", "fields",
                        "-e", "frame.time_epoch", "-e", "isakmp.ispi", "-e", "isakmp.exchangetype",
                        "-e", "isakmp.flag_r"], capture_output=True, text=True, timeout=300)
    start, done = {}, {}
    for l in r.stdout.splitlines():
        t, spi, ex, resp = l.split("\t")[:4]
        if ex == "34" and resp in ("0", "False") and spi not in start:
            start[spi] = float(t)
        if ex == "35" and resp in ("1", "True") and spi not in done:
            done[spi] = float(t)
    return [(done[s] - start[s]) * 1000 for s in start if s in done]


def main():
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-ike-"))
    net = Net(tmp)
    res = {}
    try:
        net.start("gw1", config=False)
        if AUTH == "ecdsa":
            pki = T.make_pki(tmp / "pki", "ec")
            T.install_creds(pki, "gw1", tmp)
            T.install_creds(pki, "gw2", tmp / "charon-gw2")
            T.install_creds(pki, "gw1", tmp / "charon-gw1")
            conf = lambda me, peer: T.cert_conf(me, peer, pki)  # noqa: E731
        else:
            conf = T.swanctl_conf
        # The same fragment size as espd-ike's default on both charons.
        responder = T.Charon(net, conf("gw2", "gw1"), fragment_size=1280)
        pcap = tmp / "espd-ike.pcap"
        dump = net.popen("wire", "tcpdump", "-ni", "br0", "-w", str(pcap), "-U", "udp",
                         stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        ike = T.Ike(net, conf("gw1", "gw2"))
        c0 = cpu(ike.p.pid)
        for _ in range(N):
            assert ike_call(ike.sock, {"op": "initiate", "name": "net"})["ok"]
            while not any(s["children"] for s in ike_call(ike.sock, {"op": "sas"})["sas"]):
                time.sleep(0.002)
            ike_call(ike.sock, {"op": "terminate", "name": "site"})
            while ike_call(ike.sock, {"op": "sas"})["sas"]:
                time.sleep(0.002)
            time.sleep(0.05)
        c1 = cpu(ike.p.pid)
        ike.stop()
        net.stop("gw1")
        time.sleep(0.3)
        dump.terminate()
        dump.wait()
        res["espd-ike"] = (wire_times(pcap), (c1 - c0) / N * 1000)
        pcap = tmp / "charon.pcap"
        dump = net.popen("wire", "tcpdump", "-ni", "br0", "-w", str(pcap), "-U", "udp",
                         stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        ini = T.Charon(net, conf("gw1", "gw2"), gw="gw1", fragment_size=1280)
        c0 = cpu(ini.p.pid)
        for _ in range(N):
            ini.swanctl("--initiate", "--child", "net")
            ini.swanctl("--terminate", "--ike", "site")
            time.sleep(0.05)
        c1 = cpu(ini.p.pid)
        time.sleep(0.3)
        dump.terminate()
        dump.wait()
        ini.stop()
        responder.stop()
        res["charon"] = (wire_times(pcap), (c1 - c0) / N * 1000)
    finally:
        net.close()
    cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                      if l.startswith("model name")), "?")
    print(f"IKE_SA + first CHILD_SA set-up, {AUTH.upper()}, x25519, against charon 5.9.8 as responder; "
          f"{N} set-ups each; {os.cpu_count()} CPUs, {cpu_model}")
    out = {}
    for k, (t, c) in res.items():
        assert len(t) >= N // 2, (k, len(t))
        out[k] = {"median_ms": statistics.median(t), "cpu_ms_per_setup": c, "n": len(t)}
        print(f"  {k:9} wire IKE_SA_INIT→IKE_AUTH reply median {statistics.median(t):6.2f} ms "
              f"(min {min(t):.2f}, max {max(t):.2f}); initiator CPU {c:.2f} ms per set-up")
    print(f"  ratio charon/espd-ike: time {out['charon']['median_ms'] / out['espd-ike']['median_ms']:.2f}, "
          f"CPU {out['charon']['cpu_ms_per_setup'] / max(out['espd-ike']['cpu_ms_per_setup'], 1e-9):.2f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
