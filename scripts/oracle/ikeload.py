"""IKE responders under load (docs/performance.md): espd-ike-load on gw2 of
the namespace topology brings up N IKE_SAs with one CHILD_SA each (PSK,
aes128gcm16-prfsha256-x25519, its own identity and /32 selector each)
against one responder on gw1, then deletes them; first espd-ike (beside
espd, installing every CHILD_SA there), then charon 5.9.8 (kernel-libipsec),
in one run. The generator is pinned to CPU 0, the responder to CPU 1.
Prints set-ups per second, teardown time and the responder's RSS per
established IKE_SA (RSS with the tunnels up less RSS before, over N).

    python scripts/oracle/ikeload.py 10000         # the table
    python scripts/oracle/ikeload.py 10000 --auth ecdsa   # ECDSA P-256 certificates instead of PSK
    python scripts/oracle/ikeload.py --smoke       # bounded (tests): 200 tunnels, espd-ike only

With `--auth ecdsa` both sides authenticate with ECDSA P-256 certificates of
one CA (RFC 7427 signatures; the responder gw1.example.net, every tunnel of
the generator gw2.example.net), the same swanctl.conf text for espd-ike and
charon.

Root, namespaces and a release build are needed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from espd_oracle import ROOT  # noqa: E402
from test_gateway import Net  # noqa: E402

LOAD = ROOT / "target" / "release" / "espd-ike-load"
ESPD_IKE = ROOT / "target" / "release" / "espd-ike"
CHARON = "/usr/lib/ipsec/charon"
PSK = "load-test-secret-0123456789abcdef"


def load_conn(esp="aes128gcm16", child_extra=""):
    """The responder's connection for the generator (PSK, any address)."""
    return f"""  load {{
    local_addrs = 198.18.0.1
    proposals = aes128gcm16-prfsha256-x25519
    local {{
      auth = psk
      id = gw
    }}
    remote {{
      auth = psk
    }}
    children {{
      load {{
        local_ts = 198.18.1.0/24
        remote_ts = 198.19.0.0/16
        esp_proposals = {esp}{child_extra}
      }}
    }}
  }}
"""


LOAD_SECRET = f"""  ike-load {{
    id = gw
    secret = "{PSK}"
  }}
"""
RESPONDER = f"connections {{\n{load_conn()}}}\nsecrets {{\n{LOAD_SECRET}}}\n"


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_secs(pid):
    """User + system CPU seconds of process `pid`, all its threads."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


RESPONDER_CERT = """connections {
  load {
    local_addrs = 198.18.0.1
    proposals = aes128gcm16-prfsha256-x25519
    local {
      auth = pubkey
      certs = gw1.pem
      id = gw1.example.net
    }
    remote {
      auth = pubkey
      cacerts = ca.pem
    }
    children {
      load {
        local_ts = 198.18.1.0/24
        remote_ts = 198.19.0.0/16
        esp_proposals = aes128gcm16
      }
    }
  }
}
"""
# Set-ups in flight at once (--window), and the generator's source addresses
# (--sources: a responder limits the half-open IKE_SAs of one address).
WINDOW = [64]
SOURCES = [1]
# Set by main(): "psk" or "ecdsa", and the CA's directory for ecdsa.
AUTH = {"kind": "psk", "pki": None}


def responder_conf(confdir):
    """The responder's swanctl.conf text, its credentials laid out beside it."""
    if AUTH["kind"] == "psk":
        return RESPONDER
    from test_ike import install_creds
    install_creds(AUTH["pki"], "gw1", confdir)
    return RESPONDER_CERT


def generator_auth():
    if AUTH["kind"] == "psk":
        return ["--psk", PSK]
    pki = AUTH["pki"]
    return ["--cert", str(pki / "gw2.pem"), "--key", str(pki / "gw2.key"), "--ca", str(pki / "ca.pem"),
            "--id", "gw2.example.net", "--peer-id", "gw1.example.net"]


def add_sources(run, dev, first, count):
    """Addresses 198.18.0.(first+1) … for a generator with `count` sources
    (the first, 198.18.0.first, is there already); `run(*cmd)` runs in its
    namespace."""
    assert first + count <= 255, "198.18.0.0/24 has no room for so many sources"
    for k in range(1, count):
        run("ip", "addr", "add", f"198.18.0.{first + k}/24", "dev", dev)


def generate(net, n, hold, on_up):
    """Runs the generator; calls on_up() while the tunnels are held up."""
    add_sources(lambda *c: net.ns("gw2", *c), "o2", 2, SOURCES[0])
    p = net.popen("gw2", "taskset", "-c", "0", str(LOAD), "--local", "198.18.0.2", "--peer", "198.18.0.1",
                  "--tunnels", str(n), *generator_auth(), "--hold", str(hold), "--timeout", "600",
                  "--window", str(WINDOW[0]), "--sources", str(SOURCES[0]),
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    assert line.startswith("up "), line + p.stderr.read()
    extra = on_up()
    out, err = p.communicate(timeout=700)
    assert p.returncode == 0, out + err
    r = json.loads(out.strip().splitlines()[-1])
    r.update(extra)
    return r


def pid_in(net, ns, exe):
    """The pid of `exe` started in namespace `ns` (ip netns exec execs it)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.readlink(d / "exe") == exe and os.stat(d / "ns" / "net").st_ino == os.stat(
                    f"/run/netns/{net.p}-{ns}").st_ino:
                return int(d.name)
        except OSError:
            pass
    return None


def cleanup(procs):
    for p in procs:
        if p.poll() is None:
            subprocess.run(["pkill", "-P", str(p.pid)], check=False)
            p.kill()
            p.wait()


def espd_ike_run(tmp, n, hold):
    net = Net(Path(tmp))
    procs = []
    try:
        net.start("gw1", config=False)
        conf = Path(tmp) / "responder.conf"
        conf.write_text(responder_conf(Path(tmp)))
        log = open(Path(tmp) / "espd-ike.log", "w")
        ike = net.popen("gw1", "taskset", "-c", "1", str(ESPD_IKE), "--config", str(conf), "--espd",
                        net.sock("gw1"), "--socket", str(Path(tmp) / "ike.sock"),
                        stdout=log, stderr=subprocess.STDOUT)
        procs.append(ike)
        time.sleep(1)
        base = rss_kib(ike.pid)
        espd_pid = net.procs["gw1"].pid
        cpu0 = (cpu_secs(ike.pid), cpu_secs(espd_pid))

        def up():
            cpu = (cpu_secs(ike.pid) - cpu0[0], cpu_secs(espd_pid) - cpu0[1])
            time.sleep(0.5)
            st = subprocess.run(["ip", "netns", "exec", f"{net.p}-gw1", str(ROOT / "target/release/espctl"),
                                 "-s", net.sock("gw1"), "state", "list"], capture_output=True, text=True).stdout
            return {"rss_kib": rss_kib(ike.pid), "base_kib": base, "espd_states": st.count("state add"),
                    "cpu_secs": cpu[0], "espd_cpu_secs": cpu[1]}

        r = generate(net, n, hold, up)
        ike.terminate()
        ike.wait(timeout=30)
        r["responder"] = "espd-ike"
        return r
    finally:
        cleanup(procs)
        net.close()


def start_charon(net, d, conf_text):
    """charon 5.9.8 (kernel-libipsec) on gw1 in a private mount namespace,
    `conf_text` loaded; its processes (to clean up) and its pid."""
    d.mkdir(exist_ok=True)
    (d / "strongswan.conf").write_text(f"""charon {{
  load = random nonce openssl aes sha1 sha2 hmac gcm kdf pem pkcs1 pkcs8 x509 pubkey revocation socket-default vici kernel-libipsec kernel-netlink
  install_routes = no
  ikesa_table_size = 4096
  # The same half-open limits as espd-ike's (1000 before COOKIEs, 100 per
  # peer address); charon's defaults (30, 5) would throttle one generator.
  cookie_threshold = 1000
  block_threshold = 100
  filelog {{
    log {{
      path = {d}/charon.log
      flush_line = yes
      default = 0
    }}
  }}
  plugins {{
    vici {{ socket = unix://{d}/vici }}
  }}
}}
swanctl {{ socket = unix://{d}/vici }}
""")
    (d / "swanctl.conf").write_text(conf_text)
    p = net.popen("gw1", "taskset", "-c", "1", "unshare", "-m", "--propagation", "private", "sh", "-c",
                  f"mount -t tmpfs none /run && STRONGSWAN_CONF={d}/strongswan.conf exec {CHARON}",
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if (d / "vici").exists():
            break
        time.sleep(0.1)
    subprocess.run(["ip", "netns", "exec", f"{net.p}-gw1", "env", f"STRONGSWAN_CONF={d}/strongswan.conf",
                    "swanctl", "--load-all", "--file", str(d / "swanctl.conf")], check=True,
                   capture_output=True)
    time.sleep(0.5)
    return [p], pid_in(net, "gw1", CHARON)


def charon_run(tmp, n, hold):
    net = Net(Path(tmp))
    procs = []
    try:
        d = Path(tmp) / "charon"
        d.mkdir()
        procs, pid = start_charon(net, d, responder_conf(d))
        base = rss_kib(pid)
        cpu0 = cpu_secs(pid)
        r = generate(net, n, hold, lambda: {"rss_kib": rss_kib(pid), "base_kib": base,
                                            "cpu_secs": cpu_secs(pid) - cpu0})
        r["responder"] = "charon 5.9.8"
        return r
    finally:
        cleanup(procs)
        net.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tunnels", nargs="?", type=int, default=10_000)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-charon", action="store_true", help="espd-ike only")
    ap.add_argument("--auth", choices=["psk", "ecdsa"], default="psk")
    ap.add_argument("--window", type=int, default=64, help="set-ups in flight at once")
    ap.add_argument("--sources", type=int, default=1, help="generator source addresses")
    a = ap.parse_args()
    WINDOW[0], SOURCES[0] = a.window, a.sources
    n = 200 if a.smoke else a.tunnels
    rows = []
    pki_dir = tempfile.TemporaryDirectory()
    AUTH["kind"] = a.auth
    if a.auth == "ecdsa":
        from test_ike import make_pki
        AUTH["pki"] = make_pki(Path(pki_dir.name) / "pki", "ec")
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(espd_ike_run(tmp, n, 2))
    if a.smoke:
        r = rows[0]
        assert r["left"] == 0 and r["espd_states"] == 2 * n, r
    elif not a.no_charon:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(charon_run(tmp, n, 2))
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    auth = "PSK" if a.auth == "psk" else "ECDSA P-256 certificates"
    print(f"IKE responders, {n} tunnels (IKE_SA + CHILD_SA, {auth}, x25519), {os.cpu_count()} vCPUs; "
          "generator on CPU 0, responder on CPU 1")
    print(f"window {WINDOW[0]} set-ups in flight from {SOURCES[0]} source address(es); CPU: the responder "
          "process's user+system seconds during set-up, and the set-ups one of its cores would do at that cost")
    print("| responder | set-up s | set-ups/s | retransmits | teardown s | RSS up MiB | KiB per IKE_SA "
          "| responder CPU s (set-ups per core-second) | espd CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per = (r["rss_kib"] - r["base_kib"]) / n
        cpu = r["cpu_secs"]
        espd = f"{r['espd_cpu_secs']:.2f}" if "espd_cpu_secs" in r else "—"
        print(f"| {r['responder']} | {r['setup_secs']:.2f} | {r['setups_per_sec']:.0f} | {r['retransmits']} "
              f"| {r['teardown_secs']:.2f} | {r['rss_kib'] / 1024:.1f} | {per:.2f} "
              f"| {cpu:.2f} ({n / max(cpu, 1e-9):.0f}) | {espd} |")


if __name__ == "__main__":
    main()
