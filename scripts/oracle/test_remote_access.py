"""Remote access: espd-ike as the gateway of road-warrior clients (RFC 7296
§2.19, §3.15), the clients strongSwan 5.9.8 with `vips = 0.0.0.0, ::`:

    host A ─ gw1 (espd + espd-ike, pools) ═ wire (bridge, captured) ═ gw2 (NAT) ┬─ c1 (charon)
                                                                                └─ c2 (charon)

gw2 masquerades both clients behind its one address 198.18.0.2 (nftables),
so espd-ike sees two IKE_SAs from one address on two ports, and espd has
two CHILD_SAs whose tunnel endpoints are the same addresses. Each client
must get its own virtual IPv4 and IPv6 address from the pools, reach host A
(and be reached from it) through its own SA, and not reach the other
client (the policy covers the site only). The wire carries only IKE and
ESP-in-UDP, and tshark verifies every ESP packet with the keys espd has.
"""

import re
import signal
import subprocess
import time

import pytest

from test_gateway import Net, need, sh
from test_ike import ESPCTL, PSK, Charon, Ike, espd_policies, espd_states, need_charon

POOL4 = "198.18.100.0/28"
POOL6 = "2001:db8:100::/120"


def gateway_conf():
    return f"""# gw1: the remote-access gateway
pools {{
  rw4 {{
    addrs = {POOL4}
    dns = 198.18.1.53
  }}
  rw6 {{
    addrs = {POOL6}
  }}
}}
connections {{
  rw {{
    version = 2
    local_addrs = 198.18.0.1
    pools = rw4, rw6
    proposals = aes128gcm16-prfsha256-x25519
    local {{
      auth = psk
      id = gw1
    }}
    remote {{
      auth = psk
    }}
    children {{
      rw {{
        local_ts = 198.18.1.0/24, 2001:db8:1::/64
        esp_proposals = aes128gcm16
      }}
    }}
  }}
}}
secrets {{
  ike-rw {{
    id = gw1
    secret = "{PSK}"
  }}
}}
"""


def client_conf(me):
    return f"""# {me}: a road warrior
connections {{
  home {{
    version = 2
    remote_addrs = 198.18.0.1
    vips = 0.0.0.0, ::
    proposals = aes128gcm16-prfsha256-x25519
    encap = yes
    local {{
      auth = psk
      id = {me}
    }}
    remote {{
      auth = psk
      id = gw1
    }}
    children {{
      home {{
        remote_ts = 198.18.1.0/24, 2001:db8:1::/64
        esp_proposals = aes128gcm16
      }}
    }}
  }}
}}
secrets {{
  ike-1 {{
    id-1 = gw1
    id-2 = {me}
    secret = "{PSK}"
  }}
}}
"""


@pytest.fixture
def rw(tmp_path):
    need_charon()
    need("nft")
    n = Net(tmp_path)
    parts = {}
    made = []
    try:
        # The clients: c1 and c2, each on its own link to gw2, which NATs
        # them to its outside address.
        for i in (1, 2):
            ns = f"{n.p}-c{i}"
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", "e0", "netns", ns, "type", "veth", "peer", "name", f"l{i}",
               "netns", f"{n.p}-gw2")
            sh("ip", "-n", ns, "addr", "add", f"198.19.{i}.2/24", "dev", "e0")
            sh("ip", "-n", ns, "link", "set", "e0", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"198.19.{i}.1")
            sh("ip", "-n", f"{n.p}-gw2", "addr", "add", f"198.19.{i}.1/24", "dev", f"l{i}")
            sh("ip", "-n", f"{n.p}-gw2", "link", "set", f"l{i}", "up")
        rules = tmp_path / "nat.nft"
        rules.write_text('table ip nat {\n  chain post {\n    type nat hook postrouting priority srcnat; policy accept;\n'
                         '    oifname "o2" masquerade\n  }\n}\n')
        n.ns("gw2", "nft", "-f", str(rules))
        n.start("gw1", config=False)
        yield n, parts
    finally:
        for k in ("c1", "c2", "ike"):
            if k in parts:
                parts[k].stop()
        n.close()
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)


def diag(net, c):
    """What to look at when a ping fails: espd's counters, the client's routes."""
    out = net.ns("gw1", str(ESPCTL), "-s", net.sock("gw1"), "stats").stdout
    for cmd in (("ip", "addr"), ("ip", "route", "show", "table", "all"), ("ip", "-6", "route", "show", "table", "all")):
        out += "\n" + " ".join(cmd) + ":\n" + net.ns(c, *cmd, check=False).stdout
    out += espd_policies(net) + espd_states(net)
    (net.tmp / "diag.txt").write_text(out)
    return out


def vip_of(charon):
    """The virtual IPs swanctl --list-sas shows for the client."""
    text = charon.sas()
    m = re.search(r"local\s+'[^']*' @ \S+ \[([^\]]+)\]", text)
    return m[1].split() if m else [], text


def test_two_road_warriors_behind_one_nat_get_their_own_addresses_and_reach_the_site(rw):
    net, parts = rw
    parts["ike"] = ike = Ike(net, gateway_conf())
    for c in ("c1", "c2"):
        parts[c] = Charon(net, client_conf(c), gw=c)
    for c in ("c1", "c2"):
        r = parts[c].swanctl("--initiate", "--child", "home", check=False, timeout=40)
        assert r.returncode == 0, r.stdout + r.stderr + ike.log()
    vips = {}
    for c in ("c1", "c2"):
        v, text = vip_of(parts[c])
        assert len(v) == 2, text
        vips[c] = v
    # charon parsed our CFG_REPLY: both addresses and the pool's DNS server.
    for c in ("c1", "c2"):
        log = parts[c].log.read_text()
        assert "CPRP(ADDR DNS ADDR6)" in log and "processing INTERNAL_IP4_DNS attribute" in log, log[-3000:]
    v4 = {c: next(a for a in v if "." in a) for c, v in vips.items()}
    v6 = {c: next(a for a in v if ":" in a) for c, v in vips.items()}
    assert v4["c1"] != v4["c2"] and v6["c1"] != v6["c2"], vips
    assert all(a.startswith("198.18.100.") for a in v4.values()), vips
    assert all(a.startswith("2001:db8:100::") for a in v6.values()), vips
    # espd-ike: two IKE_SAs from the NAT's one address on two ports, each
    # with the client's virtual addresses, its own reqid and selectors.
    sas = ike.sas()
    assert len(sas) == 2, sas
    assert {s["remote"].rsplit(":", 1)[0] for s in sas} == {"198.18.0.2"}, sas
    assert len({s["remote"] for s in sas}) == 2, sas
    assert all(s["nat"] for s in sas), sas
    by_id = {s["remote_id"]: s for s in sas}
    for c in ("c1", "c2"):
        s = by_id[c]
        assert sorted(s["remote_vips"]) == sorted(vips[c]), (s, vips)
        ch = s["children"][0]
        assert sorted(ch["remote_ts"]) == sorted([f"{v4[c]}/32", f"{v6[c]}/128"]), ch
        assert ch["encap"], ch
    assert len({s["children"][0]["reqid"] for s in sas}) == 2, sas
    pol = espd_policies(net)
    for c in ("c1", "c2"):
        assert f"dst {v4[c]}/32 dir out" in pol, pol
    # Traffic: each client to host A and back, v4 and v6; A to each client.
    pcap = net.tmp / "rw.pcap"
    dump = net.popen("wire", "tcpdump", "-ni", "br0", "--immediate-mode", "-w", str(pcap), "-U", "ip or ip6",
                     stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        for c in ("c1", "c2"):
            for dst in ("198.18.1.10", "2001:db8:1::10"):
                r = net.ns(c, "ping", "-c", "5", "-i", "0.1", "-W", "2", dst, check=False)
                assert r.returncode == 0 and " 0% packet loss" in r.stdout, (c, dst, r.stdout, diag(net, c))
            for dst in (v4[c], v6[c]):
                r = net.ns("a", "ping", "-c", "5", "-i", "0.1", "-W", "2", dst, check=False)
                assert r.returncode == 0 and " 0% packet loss" in r.stdout, (c, dst, r.stdout, diag(net, c))
        time.sleep(0.3)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
    # Between the NAT and the gateway only IKE and ESP in UDP (and neighbour
    # discovery, IGMP and MLD: MLD reports carry a hop-by-hop header first).
    r = sh("tcpdump", "-nr", str(pcap), "(ip or ip6) and not (udp port 4500 or udp port 500) "
           "and not icmp6 and not igmp and not (ip6 and ip6[6] = 0)")
    assert r.stdout.strip() == "", "not IKE or ESP on the wire:\n" + r.stdout[:2000]
    # tshark opens every ESP packet with the keys espd-ike gave espd.
    uat, spis = [], set()
    for line in espd_states(net, keys=True).splitlines():
        m = re.search(r"src (\S+) dst (\S+) proto esp spi (0x[0-9a-f]+) ", line)
        g = re.search(r"aead 'rfc4106\(gcm\(aes\)\)' (0x[0-9a-f]+) 128", line)
        if m and g:
            spis.add(m[3])
            uat += ["-o", f'uat:esp_sa:"IPv4","{m[1]}","{m[2]}","{m[3]}",'
                          f'"AES-GCM with 16 octet ICV [RFC4106]","{g[1]}","NULL",""']
    assert len(spis) == 4, espd_states(net)
    r = sh("tshark", "-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE",
           "-o", "esp.enable_authentication_check:TRUE", *uat, "-Y", "esp",
           "-T", "fields", "-e", "esp.spi", "-e", "esp.icv_good", "-e", "ip.src", "-e", "ipv6.src",
           timeout=300)
    rows = [l.split("\t") for l in r.stdout.splitlines() if l.strip()]
    # 2 clients × (to A and from A) × (IPv4 and IPv6) × 5 pings × 2 ways.
    assert len(rows) == 80, len(rows)
    bad = [x for x in rows if x[1] != "1"]
    assert not bad, f"{len(bad)} of {len(rows)} ESP packets not verified: {bad[:5]}"
    assert {x[0] for x in rows} == spis
    inner = " ".join(x[2] + " " + x[3] for x in rows)
    for c in ("c1", "c2"):
        assert v4[c] in inner and v6[c] in inner, (c, rows[:6])
    # The policy covers the site only: c1 does not reach c2's address.
    r = net.ns("c1", "ping", "-c", "2", "-i", "0.2", "-W", "1", v4["c2"], check=False)
    assert r.returncode != 0, r.stdout
    st = ike.ctl("stats").stdout
    assert '"pool.rw4.online": 2' in st and '"vips-assigned": 4' in st, st
    # A client leaves: its addresses go offline, and when it comes back it
    # has the same ones (its lease is kept for its identity).
    parts["c1"].swanctl("--terminate", "--ike", "home", timeout=30)
    for _ in range(50):
        if len(ike.sas()) == 1:
            break
        time.sleep(0.2)
    assert len(ike.sas()) == 1, ike.sas()
    assert f"virtual IP {v4['c1']} released to pool rw4" in ike.log(), ike.log()
    parts["c1"].swanctl("--initiate", "--child", "home", timeout=40)
    again, text = vip_of(parts["c1"])
    assert sorted(again) == sorted(vips["c1"]), (again, vips, text)
    r = net.ns("c1", "ping", "-c", "3", "-i", "0.1", "-W", "2", "198.18.1.10", check=False)
    assert r.returncode == 0, r.stdout


def test_road_warriors_reach_each_other_through_the_gateway(rw):
    """Hairpin: with the pools in the gateway's local_ts, a packet c1 sends to
    c2's virtual address is decapsulated from c1's SA and, since its next hop
    is not inside, goes through espd's outbound SPD again and into c2's SA —
    never out of the gateway in clear."""
    net, parts = rw
    pools = f"{POOL4}, {POOL6}"
    gw = gateway_conf().replace("local_ts = 198.18.1.0/24, 2001:db8:1::/64",
                                f"local_ts = 198.18.1.0/24, 2001:db8:1::/64, {pools}")
    parts["ike"] = ike = Ike(net, gw)
    for c in ("c1", "c2"):
        conf = client_conf(c).replace("remote_ts = 198.18.1.0/24, 2001:db8:1::/64",
                                      f"remote_ts = 198.18.1.0/24, 2001:db8:1::/64, {pools}")
        parts[c] = Charon(net, conf, gw=c)
        r = parts[c].swanctl("--initiate", "--child", "home", check=False, timeout=40)
        assert r.returncode == 0, r.stdout + r.stderr + ike.log()
    vips = {c: vip_of(parts[c])[0] for c in ("c1", "c2")}
    assert all(len(v) == 2 for v in vips.values()), vips
    pcap = net.tmp / "hairpin.pcap"
    dump = net.popen("wire", "tcpdump", "-ni", "br0", "--immediate-mode", "-w", str(pcap), "-U", "ip or ip6",
                     stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        for a, b in (("c1", "c2"), ("c2", "c1")):
            for dst in vips[b]:
                r = net.ns(a, "ping", "-c", "5", "-i", "0.1", "-W", "2", dst, check=False)
                assert r.returncode == 0 and " 0% packet loss" in r.stdout, (a, dst, r.stdout, diag(net, a))
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
    r = sh("tcpdump", "-nr", str(pcap), "(ip or ip6) and not (udp port 4500 or udp port 500) "
           "and not icmp6 and not igmp and not (ip6 and ip6[6] = 0)")
    assert r.stdout.strip() == "", "not IKE or ESP on the wire:\n" + r.stdout[:2000]
    # Every echo and reply went into the gateway in one SA and out in another:
    # 2 ways × 2 families × 5 pings × request and reply (40), each in and out.
    esp = int(sh("bash", "-c", f"tcpdump -nr {pcap} udp port 4500 and greater 60 2>/dev/null | wc -l").stdout)
    assert esp >= 80, esp
    stats, _ = net.stop("gw1")
    hair = sum(w["hairpinned"] for w in stats["workers"])
    assert hair >= 40, stats["workers"]
