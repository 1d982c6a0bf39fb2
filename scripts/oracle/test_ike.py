"""espd-ike against strongSwan 5.9.8 (charon with kernel-libipsec) on the
gateway topology (scripts/topo.sh):

    host A ─ gw1 (espd + espd-ike) ═ wire (bridge, captured) ═ gw2 (charon) ─ host B

Both gateways read a swanctl.conf written the same way (each side's own
addresses and ids). kernel-libipsec always encapsulates ESP in UDP, so the
connection has `encap = yes`. Each case negotiates with IKEv2 (PSK), passes
ping and iperf3 between the sites both ways, checks that the wire carries
only IKE and ESP, that tshark decrypts every ESP packet with the keys
espd-ike installed in espd (all ICVs good), and that `espctl ike sas`
names the SPIs `swanctl --list-sas` does. The negative cases end in the
right notify with nothing installed in espd.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

import pytest

from espd_oracle import ESPD, ROOT
from test_gateway import IN_CI, PY, Net, iperf, need, sh

CHARON = "/usr/lib/ipsec/charon"
ESPD_IKE = ESPD.parent / "espd-ike"
ESPCTL = ESPD.parent / "espctl"
PSK = "9f3c1e7a5b2d4f608e1a3c5b7d9f0e2a"


def need_charon():
    need("iperf3", "ping", "tshark")
    if not (shutil.which("swanctl") and os.path.exists(CHARON)):
        if IN_CI:
            pytest.fail("strongSwan missing in CI (scripts/deps.sh installs it)")
        pytest.skip("needs strongSwan 5.9 (strongswan-charon strongswan-swanctl libcharon-extra-plugins)")
    assert ESPD_IKE.exists(), f"{ESPD_IKE} not built (cargo build --release)"


def swanctl_conf(me, peer, proposals="aes128gcm16-prfsha256-x25519", esp="aes128gcm16",
                 start="none", psk=PSK, peer_id=None, local_ts=None, remote_ts=None, v6=False, encap="yes",
                 mode="tunnel", child_extra=""):
    """The connection as a strongSwan user writes it, for gateway `me`."""
    n = {"gw1": 1, "gw2": 2}
    outer = (lambda g: f"2001:db8::{n[g]}") if v6 else (lambda g: f"198.18.0.{n[g]}")
    inner = lambda g: f"198.18.{n[g]}.0/24"
    return f"""# {me}: IKEv2 PSK tunnel to {peer}
connections {{
  site {{
    version = 2
    local_addrs = {outer(me)}
    remote_addrs = {outer(peer)}
    proposals = {proposals}
    encap = {encap}
    local {{
      auth = psk
      id = {me}
    }}
    remote {{
      auth = psk
      id = {peer_id or peer}
    }}
    children {{
      net {{
        local_ts = {local_ts or inner(me)}
        remote_ts = {remote_ts or inner(peer)}
        esp_proposals = {esp}
        start_action = {start}
        mode = {mode}{child_extra}
      }}
    }}
  }}
}}
secrets {{
  ike-site {{
    id-1 = gw1
    id-2 = gw2
    secret = "{psk}"
  }}
}}
"""


class Charon:
    """charon in gw2's namespace, in a private mount namespace with its own /run."""

    def __init__(self, net, conf_text, gw="gw2", fragment_size=600, extra=""):
        self.net = net
        self.gw = gw
        self.dir = net.tmp / f"charon-{gw}"
        self.dir.mkdir(exist_ok=True)
        self.conf = self.dir / "strongswan.conf"
        self.log = self.dir / "charon.log"
        self.conf.write_text(f"""charon {{
  load = random nonce openssl aes sha1 sha2 hmac gcm kdf pem pkcs1 pkcs8 x509 pubkey constraints revocation socket-default vici kernel-libipsec kernel-netlink
  install_routes = yes
  retransmit_tries = 3
  # Small enough that IKE_AUTH with a certificate arrives in RFC 7383 fragments.
  fragment_size = {fragment_size}
  {extra}
  filelog {{
    log {{
      path = {self.log}
      flush_line = yes
      default = 1
      ike = 2
    }}
  }}
  plugins {{
    vici {{ socket = unix://{self.dir}/vici }}
    kernel-libipsec {{ allow_peer_ts = yes }}
  }}
}}
swanctl {{ socket = unix://{self.dir}/vici }}
""")
        self.swanctl_conf = self.dir / "swanctl.conf"
        self.swanctl_conf.write_text(conf_text)
        self.p = net.popen(gw, "unshare", "-m", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs none /run && STRONGSWAN_CONF={self.conf} exec {CHARON}",
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if (self.dir / "vici").exists():
                break
            time.sleep(0.1)
        self.swanctl("--load-all", "--file", str(self.swanctl_conf))

    def swanctl(self, *args, check=True, timeout=30):
        r = subprocess.run(["ip", "netns", "exec", f"{self.net.p}-{self.gw}", "env",
                            f"STRONGSWAN_CONF={self.conf}", f"SWANCTL_DIR={self.dir}", "swanctl", *args],
                           capture_output=True, text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, f"swanctl {' '.join(args)}: {r.stdout}{r.stderr}"
        return r

    def sas(self):
        return self.swanctl("--list-sas").stdout

    def stop(self):
        if self.p.poll() is None:
            subprocess.run(["pkill", "-P", str(self.p.pid)], check=False)
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Ike:
    """espd-ike in gw1's namespace beside espd."""

    def __init__(self, net, conf_text, gw="gw1", sock=None, args=(), run=""):
        self.net = net
        self.gw = gw
        self.conf = net.tmp / f"{gw}-swanctl.conf"
        self.conf.write_text(conf_text)
        self.sock = str(sock or net.tmp / f"{gw}-ike.sock")
        self.logpath = net.tmp / f"{gw}-espd-ike{run}.log"
        self.logf = open(self.logpath, "w")
        self.p = net.popen(gw, str(ESPD_IKE), "--config", str(self.conf), "--espd",
                           net.sock(gw), "--socket", self.sock, *args,
                           stdout=self.logf, stderr=subprocess.STDOUT)
        for _ in range(100):
            if "connected to espd" in self.log():
                break
            assert self.p.poll() is None, self.log()
            time.sleep(0.05)
        else:
            raise AssertionError("espd-ike did not connect to espd:\n" + self.log())

    def log(self):
        return self.logpath.read_text()

    def ctl(self, *args, check=True):
        r = self.net.ns(self.gw, str(ESPCTL), "ike", "--ike-socket", self.sock, *args, check=False)
        if check:
            assert r.returncode == 0, f"espctl ike {' '.join(args)}: {r.stdout}{r.stderr}\n{self.log()}"
        return r

    def sas(self):
        return json.loads(self.ctl("sas", "--json").stdout)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            self.p.wait(timeout=20)
        self.logf.close()
        return self.p.returncode


@pytest.fixture
def site(tmp_path):
    need_charon()
    n = Net(tmp_path)
    parts = {}
    try:
        n.start("gw1", config=False)
        yield n, parts
    finally:
        for k in ("ike", "ike2", "charon"):
            if k in parts:
                parts[k].stop()
        n.close()


def espd_states(net, keys=False, gw="gw1"):
    args = ["state", "list"] + (["--keys"] if keys else [])
    return net.ns(gw, str(ESPCTL), "-s", net.sock(gw), *args).stdout


def espd_policies(net, gw="gw1"):
    return net.ns(gw, str(ESPCTL), "-s", net.sock(gw), "policy", "list").stdout


def wait_child(ike, charon, secs=15):
    deadline = time.time() + secs
    while time.time() < deadline:
        sas = ike.sas()
        if sas and sas[0]["children"] and "INSTALLED" in charon.sas():
            return sas
        time.sleep(0.2)
    raise AssertionError(f"no CHILD_SA within {secs} s:\nespd-ike:\n{ike.log()}\n"
                         f"charon:\n{charon.sas()}\n{charon.log.read_text()[-4000:]}")


def check_traffic_and_wire(net, ike, charon, pcap_name="wire.pcap", decrypt=True):
    """Ping and iperf3 both ways; only IKE/ESP on the wire; tshark verifies every ICV."""
    pcap = net.tmp / pcap_name
    leak = net.tmp / ("leak-" + pcap_name)
    not_ike_esp = ("(ip or ip6) and not (udp port 4500 or udp port 500) and not icmp6 and not igmp "
                   "and not (ip6 and ip6[6] = 0)")
    # Everything for tshark while the small flows run; during the TCP runs
    # only what is neither IKE nor ESP (a capture of all would take tshark minutes).
    dump = net.popen("wire", "tcpdump", "--immediate-mode", "-ni", "br0", "-w", str(pcap), "-U", "ip or ip6",
                     stderr=subprocess.DEVNULL)
    dump2 = net.popen("wire", "tcpdump", "--immediate-mode", "-ni", "br0", "-w", str(leak), "-U", not_ike_esp,
                      stderr=subprocess.DEVNULL)
    time.sleep(1)
    net.ns("a", "ping", "-c", "5", "-i", "0.1", "-W", "2", "198.18.2.20")
    net.ns("b", "ping", "-c", "5", "-i", "0.1", "-W", "2", "198.18.1.10")
    iperf(net, "a", "b", "198.18.2.20", "-u", "-b", "4M", "-l", "1000", secs=1)
    time.sleep(0.3)
    dump.send_signal(signal.SIGINT)
    dump.wait(timeout=10)
    up = iperf(net, "a", "b", "198.18.2.20", secs=2)
    down = iperf(net, "b", "a", "198.18.1.10", secs=2)
    assert up["end"]["sum_received"]["bytes"] > 1_000_000, up["end"]
    assert down["end"]["sum_received"]["bytes"] > 1_000_000, down["end"]
    time.sleep(0.3)
    dump2.send_signal(signal.SIGINT)
    dump2.wait(timeout=10)
    # Between the gateways only IKE (UDP 500/4500) and ESP in UDP 4500.
    for f in (pcap, leak):
        r = sh("tcpdump", "-nr", str(f), not_ike_esp)
        assert r.stdout.strip() == "", "not IKE or ESP on the wire:\n" + r.stdout[:2000]
    if not decrypt:
        return
    # Decrypt with the keys espd-ike gave espd.
    uat = []
    spis = set()
    for line in espd_states(net, keys=True).splitlines():
        m = re.search(r"src (\S+) dst (\S+) proto esp spi (0x[0-9a-f]+) ", line)
        if not m:
            continue
        fam = "IPv6" if ":" in m[1] else "IPv4"
        spis.add(m[3])
        g = re.search(r"aead 'rfc4106\(gcm\(aes\)\)' (0x[0-9a-f]+) 128", line)
        c = re.search(r"enc 'cbc\(aes\)' (0x[0-9a-f]+) auth-trunc 'hmac\(sha256\)' (0x[0-9a-f]+) 128", line)
        if g:
            alg = f'"AES-GCM with 16 octet ICV [RFC4106]","{g[1]}","NULL",""'
        else:
            assert c, line
            alg = f'"AES-CBC [RFC3602]","{c[1]}","HMAC-SHA-256-128 [RFC4868]","{c[2]}"'
        uat += ["-o", f'uat:esp_sa:"{fam}","{m[1]}","{m[2]}","{m[3]}",{alg}']
    assert len(spis) == 2, espd_states(net)
    r = sh("tshark", "-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE",
           "-o", "esp.enable_authentication_check:TRUE", *uat, "-Y", "esp",
           "-T", "fields", "-e", "esp.spi", "-e", "esp.icv_good", "-e", "icmp.type", "-e", "udp.dstport",
           timeout=300)
    rows = [l.split("\t") for l in r.stdout.splitlines() if l.strip()]
    assert len(rows) > 200, len(rows)
    bad = [x for x in rows if x[1] != "1"]
    assert not bad, f"{len(bad)} of {len(rows)} ESP packets not verified: {bad[:5]}"
    assert {x[0] for x in rows} == spis
    # The decrypted inner packets are the test's own traffic.
    assert any(x[2] == "8" for x in rows) and any("5201" in x[3] for x in rows), rows[:5]


def same_spis(ike, charon):
    """espctl ike sas and swanctl --list-sas name the same CHILD_SA SPIs."""
    c = ike.sas()[0]["children"][0]
    text = charon.sas()
    m = re.search(r"in\s+([0-9a-f]{8})[^\n]*\n\s+out\s+([0-9a-f]{8})", text)
    assert m, text
    # charon's inbound SPI is our outbound and the other way round.
    assert (m[1], m[2]) == (c["spi_out"], c["spi_in"]), (text, c)
    assert "AES_GCM_16-128" in text and c["alg"].startswith("aes128gcm16"), (text, c)


def test_espd_ike_initiates_to_charon_and_traffic_flows_both_ways(site):
    net, parts = site
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1"))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2"))
    r = ike.ctl("initiate", "net")
    assert "initiating net" in r.stdout
    sas = wait_child(ike, charon)
    assert sas[0]["state"] == "ESTABLISHED" and sas[0]["initiator"] is True, sas
    c = sas[0]["children"][0]
    assert c["encap"] is True and c["local_ts"] == ["198.18.1.0/24"] and c["remote_ts"] == ["198.18.2.0/24"]
    same_spis(ike, charon)
    # espd holds the two SAs (encapsulated, with the negotiated lifetimes)
    # and the out/in/fwd policies for the reqid.
    st = espd_states(net)
    assert st.count("state add") == 2 and "encap espinudp 4500 4500" in st, st
    pol = espd_policies(net)
    for d in ("out", "in", "fwd"):
        assert f"dir {d}" in pol, pol
    check_traffic_and_wire(net, ike, charon)
    text = ike.ctl("sas").stdout
    assert "site: ESTABLISHED" in text and c["spi_in"] in text, text
    # Terminate: DELETE reaches charon, espd forgets the SAs and policies.
    ike.ctl("terminate", "site")
    for _ in range(50):
        if not ike.sas() and "site:" not in charon.sas():
            break
        time.sleep(0.1)
    assert not ike.sas(), ike.log()
    assert "site:" not in charon.sas(), charon.sas()
    assert espd_states(net).strip() == "" and espd_policies(net).strip() == ""


def test_charon_initiates_and_espd_ike_responds(site):
    net, parts = site
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2", proposals="aes256-sha256-ecp256",
                                               esp="aes256gcm16"))
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1", proposals="aes256-sha256-ecp256",
                                                        esp="aes256gcm16"))
    charon.swanctl("--initiate", "--child", "net", timeout=30)
    sas = wait_child(ike, charon)
    assert sas[0]["initiator"] is False
    assert "AES_CBC-256/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/ECP_256" in charon.sas()
    check_traffic_and_wire(net, ike, charon)
    # espd-ike stopping deletes the IKE_SA at charon and its SAs in espd.
    assert ike.stop() == 0
    assert "site:" not in charon.sas()
    assert espd_states(net).strip() == ""


def test_trap_negotiates_on_the_first_packet(site):
    net, parts = site
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1"))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2", start="trap"))
    # The trap policies are in espd before any SA: traffic is held, not leaked.
    pol = espd_policies(net)
    assert "dir out" in pol and "reqid 1" in pol, pol
    assert espd_states(net).strip() == ""
    pcap = net.tmp / "trap.pcap"
    dump = net.popen("wire", "tcpdump", "--immediate-mode", "-ni", "br0", "-w", str(pcap), "-U", "ip",
                     stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    # The first pings trigger the acquire; the tunnel is up within seconds.
    net.ns("a", "ping", "-c", "12", "-i", "0.5", "-W", "1", "198.18.2.20", check=False, timeout=30)
    dump.send_signal(signal.SIGINT)
    dump.wait(timeout=10)
    assert "acquire for net: negotiating" in ike.log(), ike.log()
    sas = wait_child(ike, charon)
    # The child was narrowed to what charon allows and the first packet's pair is in it.
    assert sas[0]["children"][0]["local_ts"] == ["198.18.1.0/24"], sas
    r = net.ns("a", "ping", "-c", "3", "-i", "0.1", "-W", "2", "198.18.2.20")
    assert " 0% packet loss" in r.stdout
    leaked = sh("tcpdump", "-nr", str(pcap), "icmp")
    assert leaked.stdout.strip() == "", "plaintext ICMP on the wire before the SA:\n" + leaked.stdout


def test_wrong_psk_is_refused_and_nothing_is_installed(site):
    net, parts = site
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1", psk="not-the-same-secret-at-all-0123"))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2"))
    ike.ctl("initiate", "net")
    for _ in range(100):
        if "AUTHENTICATION_FAILED" in ike.log() or "authentication" in ike.log().lower():
            break
        time.sleep(0.1)
    log = ike.log()
    assert "AUTHENTICATION_FAILED" in log, log
    assert espd_states(net).strip() == "" and espd_policies(net).strip() == ""
    assert "INSTALLED" not in charon.sas()


def test_no_common_proposal_is_refused_with_no_proposal_chosen(site):
    net, parts = site
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1", esp="aes256gcm16"))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2", esp="chacha20poly1305"))
    ike.ctl("initiate", "net")
    for _ in range(100):
        if "NO_PROPOSAL_CHOSEN" in ike.log():
            break
        time.sleep(0.1)
    assert "NO_PROPOSAL_CHOSEN" in ike.log(), ike.log()
    assert espd_states(net).strip() == ""
    assert "INSTALLED" not in charon.sas()


def test_unacceptable_selectors_are_refused_with_ts_unacceptable(site):
    net, parts = site
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1"))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2", local_ts="198.18.5.0/24",
                                               remote_ts="198.18.6.0/24"))
    ike.ctl("initiate", "net")
    for _ in range(100):
        if "TS_UNACCEPTABLE" in ike.log():
            break
        time.sleep(0.1)
    assert "TS_UNACCEPTABLE" in ike.log(), ike.log()
    assert espd_states(net).strip() == "" and espd_policies(net).strip() == ""


@pytest.mark.parametrize("ike_prop,esp,v6,charon_names", [
    ("aes256gcm16-prfsha384-ecp384", "aes256gcm16", True, ("AES_GCM_16-256", "ECP_384")),
    ("aes128-sha512-ecp521", "aes128-sha256", False, ("AES_CBC-128/HMAC_SHA2_256_128", "ECP_521")),
    ("chacha20poly1305-prfsha256-x25519", "chacha20poly1305", False, ("CHACHA20_POLY1305", "CURVE_25519")),
    ("aes256-sha384-modp3072", "aes256-sha256", False, ("AES_CBC-256/HMAC_SHA2_384_192", "MODP_3072")),
])
def test_algorithms_and_ipv6_outer_addresses(site, ike_prop, esp, v6, charon_names):
    net, parts = site
    kw = dict(proposals=ike_prop, esp=esp, v6=v6)
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1", **kw))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2", **kw))
    ike.ctl("initiate", "net")
    sas = wait_child(ike, charon)
    text = charon.sas()
    for n in charon_names:
        assert n in text, text
    if v6:
        assert sas[0]["local"] == "[2001:db8::1]:4500", sas
        assert "src 2001:db8::1 dst 2001:db8::2" in espd_states(net)
    # tshark 4.0 cannot decrypt ChaCha20-Poly1305: the wire is still checked.
    check_traffic_and_wire(net, ike, charon, decrypt=not esp.startswith("chacha"))


def wait_ike_child(a, b, secs=15):
    deadline = time.time() + secs
    while time.time() < deadline:
        sa, sb = a.sas(), b.sas()
        if sa and sa[0]["children"] and sb and sb[0]["children"]:
            return sa, sb
        time.sleep(0.2)
    raise AssertionError(f"no CHILD_SA within {secs} s:\n{a.log()}\n{b.log()}")


def test_espd_ike_to_espd_ike_raw_esp_tunnel(site):
    """Two espd gateways, each with espd-ike: raw ESP (no UDP), both ways."""
    net, parts = site
    net.start("gw2", config=False)
    conf = dict(encap="no", proposals="aes256gcm16-prfsha256-x25519", esp="aes128gcm16-esn")
    parts["ike"] = a = Ike(net, swanctl_conf("gw1", "gw2", **conf))
    parts["ike2"] = b = Ike(net, swanctl_conf("gw2", "gw1", **conf), gw="gw2")
    a.ctl("initiate", "net")
    sa, sb = wait_ike_child(a, b)
    ca, cb = sa[0]["children"][0], sb[0]["children"][0]
    assert (ca["spi_in"], ca["spi_out"]) == (cb["spi_out"], cb["spi_in"])
    assert ca["encap"] is False and "esn" in ca["alg"], ca
    st = espd_states(net)
    assert "encap" not in st and "flag esn" in st, st
    pcap = net.tmp / "raw.pcap"
    dump = net.popen("wire", "tcpdump", "--immediate-mode", "-ni", "br0", "-w", str(pcap), "-U", "ip",
                     stderr=subprocess.DEVNULL)
    time.sleep(1)
    net.ns("a", "ping", "-c", "5", "-i", "0.1", "-W", "2", "198.18.2.20")
    net.ns("b", "ping", "-c", "5", "-i", "0.1", "-W", "2", "198.18.1.10")
    up = iperf(net, "a", "b", "198.18.2.20", secs=1)
    down = iperf(net, "b", "a", "198.18.1.10", secs=1)
    assert up["end"]["sum_received"]["bytes"] > 1_000_000
    assert down["end"]["sum_received"]["bytes"] > 1_000_000
    dump.send_signal(signal.SIGINT)
    dump.wait(timeout=10)
    assert sh("tcpdump", "-nr", str(pcap), "not esp and not udp port 500 and not igmp").stdout.strip() == ""
    assert int(sh("bash", "-c", f"tcpdump -nr {pcap} esp 2>/dev/null | wc -l").stdout) > 1000
    assert sh("tcpdump", "-nr", str(pcap), "udp port 4500").stdout.strip() == ""
    parts.pop("ike2").stop()


def test_transport_mode_is_negotiated_and_installed_as_transport_sas(site):
    """USE_TRANSPORT_MODE between two espd-ike: transport SAs for the
    gateways' own addresses (host traffic through them comes with the host path)."""
    net, parts = site
    net.start("gw2", config=False)
    conf = dict(encap="no", mode="transport", local_ts="dynamic", remote_ts="dynamic")
    parts["ike"] = a = Ike(net, swanctl_conf("gw1", "gw2", **conf))
    parts["ike2"] = b = Ike(net, swanctl_conf("gw2", "gw1", **conf), gw="gw2")
    a.ctl("initiate", "net")
    sa, _ = wait_ike_child(a, b)
    c = sa[0]["children"][0]
    assert c["mode"].lower() == "transport" and c["local_ts"] == ["198.18.0.1/32"], c
    for gw in ("gw1", "gw2"):
        st = espd_states(net, gw=gw)
        assert st.count("mode transport") == 2, st
        pol = espd_policies(net, gw=gw)
        assert "mode transport" in pol and "dir fwd" not in pol, pol
    parts.pop("ike2").stop()


def test_espd_restarted_under_espd_ike_gets_its_sas_again(site):
    net, parts = site
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1"))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2"))
    ike.ctl("initiate", "net")
    wait_child(ike, charon)
    net.ns("a", "ping", "-c", "3", "-i", "0.1", "-W", "2", "198.18.2.20")
    before = espd_states(net)
    assert "replay-oseq" not in before, before
    net.stop("gw1")
    net.start("gw1", config=False)
    # Within 2 s espd has the same SAs again and traffic flows. The
    # listing shows the SAs as they run: the outbound one starts past the
    # numbers it sent before the restart (the sequence store continues the
    # counter, so no sequence number or IV repeats; RFC 4303 §3.3.3).
    oseq = re.compile(r" replay-oseq (\d+)")
    for _ in range(40):
        if oseq.sub("", espd_states(net)) == before:
            break
        time.sleep(0.05)
    after = espd_states(net)
    assert oseq.sub("", after) == before, (before, after, ike.log())
    assert [int(n) >= 3 for n in oseq.findall(after)] == [True], after
    assert "installing" in ike.log() and "again" in ike.log()
    r = net.ns("a", "ping", "-c", "3", "-i", "0.1", "-W", "2", "198.18.2.20")
    assert " 0% packet loss" in r.stdout


@pytest.mark.parametrize("start", ["start", "trap"])
def test_espd_ike_killed_and_restarted_brings_the_tunnel_back(site, start):
    """espd-ike is SIGKILLed (no DELETE, espd keeps what it installed) and
    started again: with start_action = start it negotiates at once, with
    trap its trap policies are back and the next packet negotiates; charon
    drops its stale IKE_SA on our INITIAL_CONTACT, espd is left with exactly
    the new tunnel's two SAs, and traffic flows both ways."""
    net, parts = site
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1"))
    conf = swanctl_conf("gw1", "gw2", start=start)
    parts["ike"] = ike = Ike(net, conf)
    if start == "trap":
        net.ns("a", "ping", "-c", "3", "-i", "0.3", "-W", "2", "198.18.2.20", check=False)
    first = wait_child(ike, charon)[0]
    r = net.ns("a", "ping", "-c", "3", "-i", "0.1", "-W", "2", "198.18.2.20")
    assert " 0% packet loss" in r.stdout
    # Fail closed throughout: pings run across the kill and the restart,
    # and the wire must never carry one of them in plaintext.
    leak = net.tmp / "leak.pcap"
    dump = net.popen("wire", "tcpdump", "--immediate-mode", "-ni", "br0", "--immediate-mode", "-w", str(leak), "icmp",
                     stderr=subprocess.DEVNULL)
    pinger = net.popen("a", "ping", "-i", "0.05", "-c", "200", "198.18.2.20",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        ike.p.kill()
        ike.p.wait()
        ike.logf.close()
        t0 = time.time()
        parts["ike"] = ike = Ike(net, conf, run="-2")
        if start == "trap":
            # Trap policies first; the old SAs must not carry the traffic.
            net.ns("a", "ping", "-c", "3", "-i", "0.3", "-W", "2", "198.18.2.20", check=False)
        sas = wait_child(ike, charon)
        up = time.time() - t0
        assert sas[0]["spi_i"] != first["spi_i"], (sas, first)
        # Within seconds, and what the killed one left is gone from espd.
        assert up < 10, (up, ike.log())
        deadline = time.time() + 10
        while time.time() < deadline:
            text = charon.sas()
            if text.count("ESTABLISHED") == 1 and espd_states(net).count("state add") == 2:
                break
            time.sleep(0.2)
        pinger.wait(timeout=30)
    finally:
        pinger.kill()
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
    r = sh("tcpdump", "-nr", str(leak))
    assert r.stdout.strip() == "", "plaintext ICMP on the wire:\n" + r.stdout[:2000]
    assert "earlier espd-ike" in ike.log(), ike.log()
    st = espd_states(net)
    assert st.count("state add") == 2, (st, ike.log())
    c = sas[0]["children"][0]
    assert f"spi 0x{c['spi_in']}" in st and f"spi 0x{c['spi_out']}" in st, (st, c)
    assert charon.sas().count("ESTABLISHED") == 1, charon.sas()
    for frm, to in (("a", "198.18.2.20"), ("b", "198.18.1.10")):
        r = net.ns(frm, "ping", "-c", "5", "-i", "0.1", "-W", "2", to)
        assert " 0% packet loss" in r.stdout, (r.stdout[-300:], ike.log())


def test_close_action_start_brings_back_what_charon_closes(site):
    """close_action = start: charon terminates the CHILD_SA, then the whole
    IKE_SA; each time espd-ike negotiates it again at once, and traffic
    flows on the new SAs."""
    net, parts = site
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1"))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2", child_extra="\n        close_action = start"))
    ike.ctl("initiate", "net")
    first = wait_child(ike, charon)[0]
    for what, arg in (("child", "net"), ("ike", "site")):
        before = [c["spi_in"] for s in ike.sas() for c in s["children"]]
        charon.swanctl("--terminate", f"--{what}", arg, timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline:
            kids = [c["spi_in"] for s in ike.sas() for c in s["children"]]
            if kids and kids != before and "INSTALLED" in charon.sas() and espd_states(net).count("state add") == 2:
                break
            time.sleep(0.2)
        kids = [c["spi_in"] for s in ike.sas() for c in s["children"]]
        assert len(kids) == 1 and kids != before, (what, kids, before, ike.log())
        assert espd_states(net).count("state add") == 2, espd_states(net)
        r = net.ns("a", "ping", "-c", "5", "-i", "0.1", "-W", "2", "198.18.2.20")
        assert " 0% packet loss" in r.stdout, (what, r.stdout[-300:])
    sas = ike.sas()
    assert len(sas) == 1 and sas[0]["spi_i"] != first["spi_i"], sas
    stats = json.loads(ike.ctl("stats").stdout)
    assert stats.get("close-action-starts") == 2, (stats, ike.log())


def test_stopping_espd_ike_keeps_trap_policies_so_traffic_stays_blocked(site):
    net, parts = site
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1"))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2", start="trap"))
    net.ns("a", "ping", "-c", "6", "-i", "0.5", "-W", "1", "198.18.2.20", check=False, timeout=30)
    wait_child(ike, charon)
    trap = [l for l in espd_policies(net).splitlines() if "priority 1000" in l]
    assert len(trap) == 3, espd_policies(net)
    assert parts.pop("ike").stop() == 0
    assert espd_states(net).strip() == ""
    assert sorted(espd_policies(net).strip().splitlines()) == sorted(trap)
    pcap = net.tmp / "stopped.pcap"
    dump = net.popen("wire", "tcpdump", "--immediate-mode", "-ni", "br0", "-w", str(pcap), "-U", "ip",
                     stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    r = net.ns("a", "ping", "-c", "3", "-i", "0.2", "-W", "1", "198.18.2.20", check=False)
    dump.send_signal(signal.SIGINT)
    dump.wait(timeout=10)
    assert "100% packet loss" in r.stdout
    assert sh("tcpdump", "-nr", str(pcap), "icmp").stdout.strip() == ""
    # Restarted, espd-ike takes its trap policies back and negotiates again.
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2", start="trap"))
    net.ns("a", "ping", "-c", "6", "-i", "0.5", "-W", "1", "198.18.2.20", check=False, timeout=30)
    wait_child(ike, charon)
    r = net.ns("a", "ping", "-c", "3", "-i", "0.1", "-W", "2", "198.18.2.20")
    assert " 0% packet loss" in r.stdout


@pytest.mark.parametrize("initiator", ["espd-ike", "charon"])
def test_espd_ike_rekeys_children_under_traffic_without_loss(site, initiator):
    """espd-ike starts CHILD_SA rekeys every ~6 s (charon's own are an hour
    away), as the IKE_SA's initiator and as its responder (then its
    CREATE_CHILD_SA's TSi is its own side, RFC 7296 §2.9): ping at 20 pps
    through two rekeys loses nothing, both ways afterwards, and the old
    SAs leave espd and charon."""
    net, parts = site
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1"))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2", child_extra="\n        rekey_time = 6s\n        life_time = 30s"))
    if initiator == "espd-ike":
        ike.ctl("initiate", "net")
    else:
        charon.swanctl("--initiate", "--child", "net", timeout=30)
    first = wait_child(ike, charon)[0]["children"][0]["spi_in"]
    assert ike.sas()[0]["initiator"] is (initiator == "espd-ike")
    r = net.ns("a", "ping", "-c", "280", "-i", "0.05", "-W", "2", "198.18.2.20", timeout=60)
    assert " 0% packet loss" in r.stdout, r.stdout[-300:]
    r = net.ns("b", "ping", "-c", "10", "-i", "0.1", "-W", "2", "198.18.1.10")
    assert " 0% packet loss" in r.stdout, r.stdout[-300:]
    assert ike.log().count("rekeying CHILD_SA net") >= 2, ike.log()
    stats = json.loads(ike.ctl("stats").stdout)
    assert stats["child-rekeyed"] >= 2, stats
    time.sleep(0.5)
    kids = ike.sas()[0]["children"]
    assert len(kids) == 1 and kids[0]["spi_in"] != first, kids
    assert espd_states(net).count("state add") == 2, espd_states(net)
    text = charon.sas()
    assert text.count("INSTALLED") == 1 and kids[0]["spi_in"] in text, text


STREAM_RX = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7777))
s.settimeout(float(sys.argv[1]))
seen = []
try:
    while True:
        seen.append(int(s.recv(64).split()[0]))
except socket.timeout:
    pass
print(len(seen), len(set(seen)), max(seen, default=-1), sum(1 for a, b in zip(seen, seen[1:]) if b < a))
"""

STREAM_TX = r"""
import socket, sys, time
n, rate = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t0 = time.time()
for i in range(n):
    s.sendto(b"%d numbered" % i, ("198.18.2.20", 7777))
    ahead = (i + 1) / rate - (time.time() - t0)
    if ahead > 0:
        time.sleep(ahead)
"""


@pytest.mark.parametrize("gw1", ["espd-ike", "charon"])
def test_child_rekeys_every_12_s_lose_no_ping_and_no_numbered_datagram(tmp_path, gw1):
    """Issue #15's proof, and its baseline: gw1 rekeys the CHILD_SA every
    12 s (rekey_time = 12s, no jitter) during 40 s of 20 pps ping and a
    numbered UDP stream of 200 datagrams a second from host A to host B;
    nothing is lost, duplicated or reordered. gw1 is espd-ike with espd,
    or charon (kernel-libipsec) itself: charon ⇄ charon on the same
    topology is what espd-ike ⇄ charon is measured against."""
    need_charon()
    net = Net(tmp_path)
    parts = {}
    try:
        extra = "\n        rekey_time = 12s\n        rand_time = 0\n        life_time = 60s"
        conf1 = swanctl_conf("gw1", "gw2", child_extra=extra)
        parts["charon"] = peer = Charon(net, swanctl_conf("gw2", "gw1"))
        if gw1 == "espd-ike":
            net.start("gw1", config=False)
            parts["ike"] = me = Ike(net, conf1)
            me.ctl("initiate", "net")
            wait_child(me, peer)
        else:
            parts["charon1"] = me = Charon(net, conf1, gw="gw1")
            me.swanctl("--initiate", "--child", "net", timeout=30)
        deadline = time.time() + 15
        while net.ns("a", "ping", "-c", "1", "-W", "1", "198.18.2.20", check=False).returncode != 0:
            assert time.time() < deadline, "no tunnel"
        rx = tmp_path / "rx.py"
        rx.write_text(STREAM_RX)
        tx = tmp_path / "tx.py"
        tx.write_text(STREAM_TX)
        recv = net.popen("b", PY, str(rx), "3", stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)
        send = net.popen("a", PY, str(tx), "8000", "200")
        r = net.ns("a", "ping", "-c", "800", "-i", "0.05", "-W", "2", "198.18.2.20", timeout=90)
        assert send.wait(timeout=60) == 0
        got, distinct, top, back = (int(x) for x in recv.communicate(timeout=30)[0].split())
        if gw1 == "espd-ike":
            rekeys = json.loads(me.ctl("stats").stdout).get("child-rekeyed", 0)
        else:
            # "CHILD_SA net{N} established": the first and one per rekey.
            rekeys = len(set(re.findall(r"CHILD_SA net\{(\d+)\} established", me.log.read_text()))) - 1
        assert rekeys >= 3, (gw1, rekeys)
        assert " 0% packet loss" in r.stdout, (gw1, r.stdout[-300:])
        assert (got, distinct, top, back) == (8000, 8000, 7999, 0), (gw1, got, distinct, top, back)
    finally:
        for k in ("ike", "charon1", "charon"):
            if k in parts:
                parts[k].stop()
        net.close()


def drop_gw1_to_gw2(net, start, end):
    """From time `start` to `end`, the wire loses what gw1 sends to gw2 but
    not the other way: the bridge stops learning and flooding towards w2
    and forgets gw2's address, so unicast to gw2 has nowhere to go."""
    gw2_mac = net.ns("gw2", "cat", "/sys/class/net/o2/address").stdout.strip()
    time.sleep(max(0, start - time.time()))
    net.ns("wire", "bridge", "link", "set", "dev", "w2", "learning", "off", "flood", "off")
    net.ns("wire", "bridge", "fdb", "del", gw2_mac, "dev", "w2", "master", check=False)
    time.sleep(max(0, end - time.time()))
    net.ns("wire", "bridge", "link", "set", "dev", "w2", "learning", "on", "flood", "on")


def test_crossing_child_rekeys_converge_to_one_sa_per_direction(site):
    """Both sides rekey the CHILD_SA, each before the other's request has
    reached it (RFC 7296 §2.25.1), and the lowest of the four nonces
    settles which new SA stays (§2.8.1). Equal timers collide only within a
    network round trip, so the crossing is made certain: no rand_time,
    espd-ike's rekey_time 10 s and charon's 11 s, and the wire bridge drops
    what gw1 sends to gw2 from 8 s to 12.5 s after the initiate. espd-ike's
    request (10 s) and its first retransmission are lost; charon's (11 s)
    reaches espd-ike while espd-ike's is out; espd-ike's next retransmission
    (13 s) reaches charon while charon's is out. Both end with one CHILD_SA,
    the same SPIs, one SA per direction in espd, and traffic flows."""
    net, parts = site
    timers = "\n        rekey_time = {}s\n        life_time = 60s\n        rand_time = 0s"
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1", child_extra=timers.format(11)))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2", child_extra=timers.format(10)))
    t0 = time.time()
    ike.ctl("initiate", "net")
    first = wait_child(ike, charon)[0]["children"][0]["spi_in"]
    assert time.time() < t0 + 7, "the tunnel took too long to come up for the timing below"
    drop_gw1_to_gw2(net, t0 + 8.0, t0 + 12.5)
    deadline = time.time() + 30
    while time.time() < deadline:
        kids = [c for s in ike.sas() for c in s["children"]]
        text = charon.sas()
        # charon done too: no task left, one CHILD_SA listed.
        if (len(kids) == 1 and kids[0]["spi_in"] != first and text.count(", reqid ") == 1
                and "INSTALLED" in text and "active:" not in text
                and espd_states(net).count("state add") == 2):
            break
        time.sleep(0.5)
    log = ike.log()
    clog = charon.log.read_text()
    assert "rekeying CHILD_SA net" in log, log
    assert "rekeying CHILD_SA" in clog or "establishing CHILD_SA" in clog, clog[-3000:]
    kids = [c for s in ike.sas() for c in s["children"]]
    text = charon.sas()
    assert len(kids) == 1 and kids[0]["spi_in"] != first, (kids, log)
    assert text.count("INSTALLED") == 1, (text, log, clog[-4000:])
    assert text.count(", reqid ") == 1 and "active:" not in text, (text, log, clog[-4000:])
    same_spis(ike, charon)
    assert espd_states(net).count("state add") == 2, espd_states(net)
    stats = json.loads(ike.ctl("stats").stdout)
    # Both met the other's request while their own was out.
    assert stats.get("child-rekey-collisions") == 1, (stats, log)
    assert "detected CHILD_REKEY collision with CHILD_REKEY" in clog, clog[-4000:]
    for frm, to in (("a", "198.18.2.20"), ("b", "198.18.1.10")):
        r = net.ns(frm, "ping", "-c", "10", "-i", "0.1", "-W", "2", to)
        assert " 0% packet loss" in r.stdout, r.stdout[-300:]


def test_crossing_ike_sa_rekeys_converge_to_one_ike_sa(site):
    """Both sides rekey the IKE_SA, each before the other's request has
    reached it: each answers the other's as usual (RFC 7296 §2.25.2) and the
    lowest of the four nonces marks the redundant new IKE_SA, which its
    initiator deletes, while the other takes the CHILD_SA and its initiator
    deletes the old one (§2.8.2). Made certain as for the CHILD_SA case: no
    rand_time, rekey_time 10 s (espd-ike) and 11 s (charon), and the bridge
    drops what gw1 sends to gw2 from 8 s to 12.5 s after the initiate."""
    net, parts = site
    timers = lambda t: f"    encap = yes\n    rekey_time = {t}s\n    rand_time = 0s\n    over_time = 60s\n"
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1").replace("    encap = yes\n", timers(11), 1))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2").replace("    encap = yes\n", timers(10), 1))
    t0 = time.time()
    ike.ctl("initiate", "net")
    first = wait_child(ike, charon)[0]
    child = first["children"][0]["spi_in"]
    assert time.time() < t0 + 7, "the tunnel took too long to come up for the timing below"
    drop_gw1_to_gw2(net, t0 + 8.0, t0 + 12.5)
    # The redundant IKE_SA goes with its initiator's DELETE, or, when charon
    # abandoned its rekey (our DELETE of the old SA reached it before our
    # answer to its rekey), with ours after the 30 s superseded wait.
    deadline = time.time() + 50
    while time.time() < deadline:
        sas = ike.sas()
        text = charon.sas()
        if (len(sas) == 1 and sas[0]["spi_i"] != first["spi_i"] and text.count("ESTABLISHED") == 1
                and "active:" not in text and sas[0]["spi_i"] in text):
            break
        time.sleep(0.5)
    log, clog = ike.log(), charon.log.read_text()
    sas, text = ike.sas(), charon.sas()
    assert len(sas) == 1 and sas[0]["state"] == "ESTABLISHED", (sas, log)
    assert (sas[0]["spi_i"], sas[0]["spi_r"]) != (first["spi_i"], first["spi_r"]), sas
    assert text.count("ESTABLISHED") == 1 and "active:" not in text, (text, log, clog[-4000:])
    assert sas[0]["spi_i"] in text and sas[0]["spi_r"] in text, (sas, text)
    # The CHILD_SA only changed IKE_SA: same SPIs, nothing re-installed.
    assert [c["spi_in"] for c in sas[0]["children"]] == [child], (sas, log)
    assert espd_states(net).count("state add") == 2, espd_states(net)
    stats = json.loads(ike.ctl("stats").stdout)
    assert stats.get("ike-rekey-collisions") == 1 and stats.get("ike-rekey-collisions-resolved") == 1, (stats, log)
    assert "crossing IKE_SA rekeys" in log, log
    assert "detected IKE_REKEY collision with IKE_REKEY" in clog, clog[-4000:]
    for frm, to in (("a", "198.18.2.20"), ("b", "198.18.1.10")):
        r = net.ns(frm, "ping", "-c", "10", "-i", "0.1", "-W", "2", to)
        assert " 0% packet loss" in r.stdout, r.stdout[-300:]
    # The surviving IKE_SA works: a DELETE over it reaches charon.
    ike.ctl("terminate", "site")
    for _ in range(50):
        if not ike.sas() and "site:" not in charon.sas():
            break
        time.sleep(0.2)
    assert not ike.sas() and "site:" not in charon.sas(), (ike.sas(), charon.sas())


def test_espds_packet_soft_expiry_makes_espd_ike_rekey_without_loss(site):
    """`rekey_packets = 100`, `life_packets = 200` (rekey_time an hour
    away): espd counts the packets of each SA and raises soft-expire at 100,
    espd-ike rekeys the child then (make-before-break), so 280 pings at 20
    pps cross several rekeys and lose nothing. (The default life, 110 % of
    the rekey value, leaves 0.5 s at this rate: a loaded CI machine could
    reach it while the rekey runs.)"""
    net, parts = site
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1"))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2", child_extra="\n        rekey_packets = 100\n        life_packets = 200"))
    ike.ctl("initiate", "net")
    first = wait_child(ike, charon)[0]["children"][0]["spi_in"]
    r = net.ns("a", "ping", "-c", "280", "-i", "0.05", "-W", "2", "198.18.2.20", timeout=60)
    if " 0% packet loss" not in r.stdout:
        lost = sorted(set(range(1, 281)) - {int(m) for m in re.findall(r"icmp_seq=(\d+)", r.stdout)})
        drops = net.ns("gw1", str(ESPCTL), "-s", net.sock("gw1"), "stats").stdout
        raise AssertionError(f"lost {lost}\n{ike.log()}\n{drops}\n{charon.log.read_text()[-6000:]}")
    time.sleep(0.5)
    stats = json.loads(ike.ctl("stats").stdout)
    # 280 requests and 280 replies, 100 packets an SA: at least two rekeys.
    assert stats.get("child-soft-expired", 0) >= 2 and stats.get("child-rekeyed", 0) >= 2, (stats, ike.log())
    assert "espd's soft lifetime of SPI" in ike.log(), ike.log()
    assert "hard expiry" not in ike.log(), ike.log()
    kids = ike.sas()[0]["children"]
    assert len(kids) == 1 and kids[0]["spi_in"] != first, kids
    assert espd_states(net).count("state add") == 2, espd_states(net)
    text = charon.sas()
    assert text.count("INSTALLED") == 1 and kids[0]["spi_in"] in text, text


@pytest.mark.parametrize("who", ["espd-ike", "charon"])
def test_ike_sa_rekeys_either_way_under_traffic_without_loss(site, who):
    """The IKE_SA is rekeyed every ~6 s by one side (RFC 7296 §2.18; the
    other's is hours away) during 14 s of 20 pps ping: nothing lost, the
    CHILD_SA stays, and both sides end with one IKE_SA with the same SPIs."""
    net, parts = site
    fast = lambda t: t.replace("    encap = yes\n", "    encap = yes\n    rekey_time = 6s\n    rand_time = 1s\n    over_time = 10s\n", 1)
    ours, theirs = swanctl_conf("gw1", "gw2"), swanctl_conf("gw2", "gw1")
    if who == "espd-ike":
        ours = fast(ours)
    else:
        theirs = fast(theirs)
    parts["charon"] = charon = Charon(net, theirs)
    parts["ike"] = ike = Ike(net, ours)
    ike.ctl("initiate", "net")
    first = wait_child(ike, charon)[0]
    child = first["children"][0]["spi_in"]
    r = net.ns("a", "ping", "-c", "280", "-i", "0.05", "-W", "2", "198.18.2.20", timeout=60)
    assert " 0% packet loss" in r.stdout, r.stdout[-300:]
    how = "by us" if who == "espd-ike" else "by the peer"
    assert ike.log().count(f"IKE_SA rekeyed ({how})") >= 2, ike.log()
    # The rekeys go on every ~6 s: the two sides are read until one pair of
    # readings falls between two rekeys (a rekey between the reads is no
    # disagreement).
    for _ in range(10):
        time.sleep(0.5)
        sas = ike.sas()
        text = charon.sas()
        if (len(sas) == 1 and sas[0]["state"] == "ESTABLISHED" and text.count("ESTABLISHED") == 1
                and sas[0]["spi_i"] in text and sas[0]["spi_r"] in text):
            break
    assert len(sas) == 1 and sas[0]["state"] == "ESTABLISHED", sas
    assert (sas[0]["spi_i"], sas[0]["spi_r"]) != (first["spi_i"], first["spi_r"])
    assert sas[0]["children"][0]["spi_in"] == child, sas
    assert text.count("ESTABLISHED") == 1, text
    assert sas[0]["spi_i"] in text and sas[0]["spi_r"] in text, (sas, text)
    assert espd_states(net).count("state add") == 2, espd_states(net)
    r = net.ns("b", "ping", "-c", "3", "-i", "0.1", "-W", "2", "198.18.1.10")
    assert " 0% packet loss" in r.stdout


def test_dpd_restart_brings_the_tunnel_back_after_charon_is_killed_and_restarted(site):
    """charon is killed (SIGKILL: no DELETE). espd-ike's liveness check
    (dpd_delay = 2s; retransmissions 0.5 s doubling, three) gives up within
    about 10 s and removes the SAs from espd; `dpd_action = restart` then
    negotiates again, retrying until charon is back; charon is started
    again, the tunnel comes up with new SPIs and traffic flows both ways."""
    net, parts = site
    ours = swanctl_conf("gw1", "gw2", child_extra="\n        dpd_action = restart").replace(
        "    encap = yes\n", "    encap = yes\n    dpd_delay = 2s\n", 1)
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1"))
    parts["ike"] = ike = Ike(net, ours, args=("--retransmit-timeout", "0.5", "--retransmit-tries", "3"))
    ike.ctl("initiate", "net")
    first = wait_child(ike, charon)[0]
    r = net.ns("a", "ping", "-c", "3", "-i", "0.1", "-W", "2", "198.18.2.20")
    assert " 0% packet loss" in r.stdout, r.stdout[-300:]
    charon.p.kill()
    charon.p.wait()
    killed = time.time()
    deadline = killed + 20
    while time.time() < deadline and "giving up" not in ike.log():
        time.sleep(0.2)
    noticed = time.time() - killed
    assert "giving up" in ike.log(), ike.log()
    assert noticed < 12, f"{noticed:.1f} s"
    time.sleep(0.5)
    assert "state add" not in espd_states(net), espd_states(net)
    # Down for a few seconds more: restarts keep trying meanwhile.
    time.sleep(4)
    (charon.dir / "vici").unlink(missing_ok=True)
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1"))
    sas = wait_child(ike, charon, secs=30)
    again = time.time() - killed
    assert (sas[0]["spi_i"], sas[0]["spi_r"]) != (first["spi_i"], first["spi_r"])
    assert "dpd_action = restart: negotiating net again" in ike.log(), ike.log()
    stats = json.loads(ike.ctl("stats").stdout)
    assert stats.get("dpd-restarts", 0) >= 1, stats
    same_spis(ike, charon)
    assert espd_states(net).count("state add") == 2, espd_states(net)
    for frm, to in (("a", "198.18.2.20"), ("b", "198.18.1.10")):
        r = net.ns(frm, "ping", "-c", "5", "-i", "0.1", "-W", "2", to)
        assert " 0% packet loss" in r.stdout, r.stdout[-300:]
    print(f"dead peer noticed after {noticed:.1f} s; tunnel back {again:.1f} s after the kill")


def test_a_bad_configuration_is_refused_with_file_and_line(tmp_path):
    assert ESPD_IKE.exists(), f"{ESPD_IKE} not built (cargo build --release)"
    bad = tmp_path / "swanctl.conf"
    text = swanctl_conf("gw1", "gw2").replace("proposals = aes128gcm16-prfsha256-x25519",
                                              "proposals = aes128-sha1-modp1024")
    text = text.replace("esp_proposals = aes128gcm16", "esp_proposals = aes128gcm16\n        bogus = 1")
    bad.write_text(text)
    r = subprocess.run([str(ESPD_IKE), "--check", "--config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert any(f"{bad}:7: proposals: `sha1` is not supported" in l for l in lines), r.stderr
    assert any(f"{bad}:22: `bogus` is not supported in a child" in l for l in lines), r.stderr
    assert len(lines) == 2, r.stderr
    good = tmp_path / "good.conf"
    good.write_text(swanctl_conf("gw1", "gw2"))
    r = subprocess.run([str(ESPD_IKE), "--check", "--config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0 and "ok (1 connection(s))" in r.stdout, r


def test_the_control_socket_is_root_only(site):
    net, parts = site
    # A directory anyone may enter, so that only espd-ike's own checks stand.
    d = pathlib.Path(f"/tmp/{net.p}-ikesock")
    d.mkdir(mode=0o755)
    try:
        _root_only(net, parts, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _root_only(net, parts, d):
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2"), sock=d / "ike.sock")
    mode = os.stat(ike.sock).st_mode & 0o777
    assert mode == 0o600, oct(mode)
    os.chmod(ike.sock, 0o666)  # even when the file mode would let it in: SO_PEERCRED
    r = net.ns("gw1", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
               str(ESPCTL), "ike", "--ike-socket", ike.sock, "sas", check=False)
    assert r.returncode != 0 and "root only" in r.stderr, (r.stdout, r.stderr)


DN = "C=CH, O=espd test, CN={}.example.net"


def make_pki(d, kind="ec", revoke=None, other_ca=False):
    """A CA and a certificate per gateway (subject DN C=CH, O=espd test,
    CN=gwN.example.net; subjectAltName DNS:gwN.example.net), with openssl;
    `kind` ec (P-256), rsa (2048) or ed25519; `revoke` puts that gateway's
    certificate on the CA's CRL."""
    d.mkdir(exist_ok=True)
    newkey = {"ec": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"], "rsa": ["-newkey", "rsa:2048"],
              "ed25519": ["-newkey", "ed25519"]}[kind]

    def ossl(*a):
        sh("openssl", *a)

    def ca(name):
        ossl("req", "-x509", *newkey, "-nodes", "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem"),
             "-days", "30", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ca("ca")
    if other_ca:
        ca("other-ca")
    (d / "index.txt").write_text("")
    (d / "crlnumber").write_text("01\n")
    (d / "ca.cnf").write_text(f"""[ca]
default_ca = c
[c]
database = {d}/index.txt
crlnumber = {d}/crlnumber
default_md = sha256
default_crl_days = 30
""")
    for g in ("gw1", "gw2"):
        signer = "other-ca" if (other_ca and g == "gw2") else "ca"
        ossl("req", *newkey, "-nodes", "-keyout", str(d / f"{g}.key"), "-out", str(d / f"{g}.csr"),
             "-subj", f"/C=CH/O=espd test/CN={g}.example.net")
        (d / f"{g}.ext").write_text(f"subjectAltName=DNS:{g}.example.net\nbasicConstraints=CA:FALSE\n")
        ossl("x509", "-req", "-in", str(d / f"{g}.csr"), "-CA", str(d / f"{signer}.pem"), "-CAkey",
             str(d / f"{signer}.key"), "-CAcreateserial", "-out", str(d / f"{g}.pem"), "-days", "30",
             "-extfile", str(d / f"{g}.ext"))
    if revoke:
        ossl("ca", "-config", str(d / "ca.cnf"), "-cert", str(d / "ca.pem"), "-keyfile", str(d / "ca.key"),
             "-revoke", str(d / f"{revoke}.pem"))
    return d


def reissue_expired(pki, g):
    """Re-signs gateway g's certificate (same key, subject and extensions)
    valid from 60 to 30 days ago, with python's cryptography."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    old = x509.load_pem_x509_certificate((pki / f"{g}.pem").read_bytes())
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(ca.subject)
         .public_key(old.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=60))
         .not_valid_after(now - datetime.timedelta(days=30)))
    for e in old.extensions:
        b = b.add_extension(e.value, e.critical)
    (pki / f"{g}.pem").write_bytes(b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def install_creds(pki, me, confdir, crl=False):
    """swanctl's layout beside a swanctl.conf: x509/, x509ca/, private/, x509crl/."""
    for sub in ("x509", "x509ca", "private", "x509crl"):
        (confdir / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(pki / f"{me}.pem", confdir / "x509" / f"{me}.pem")
    shutil.copy(pki / "ca.pem", confdir / "x509ca" / "ca.pem")
    shutil.copy(pki / f"{me}.key", confdir / "private" / f"{me}.key")
    os.chmod(confdir / "private" / f"{me}.key", 0o600)
    if crl:
        shutil.copy(pki / "ca.crl", confdir / "x509crl" / "ca.crl")


def cert_conf(me, peer, pki, auth="pubkey", ids="san", **kw):
    """swanctl_conf with certificates, swanctl-relative names (the same text
    strongSwan takes). ids: "san" names both sides by their subjectAltName
    FQDN; "dn" gives no local id (strongSwan's default: the certificate's
    subject DN) and the peer's subject DN as its remote id."""
    text = swanctl_conf(me, peer, **kw)
    local_id = f"      id = {me}.example.net\n" if ids == "san" else ""
    remote_id = f"{peer}.example.net" if ids == "san" else f'"{DN.format(peer)}"'
    text = text.replace(f"""      auth = psk
      id = {me}
""", f"""      auth = {auth}
      certs = {me}.pem
{local_id}""")
    text = text.replace(f"""      auth = psk
      id = {peer}
""", f"""      auth = {auth}
      id = {remote_id}
      cacerts = ca.pem
""")
    return text[:text.index("secrets {")]


def ping_then_charon_initiates(net, ike, charon):
    """Traffic through the tunnel espd-ike set up, then the roles swapped:
    espd-ike terminates it and charon initiates, espd-ike responding."""
    r = net.ns("a", "ping", "-c", "3", "-i", "0.1", "-W", "2", "198.18.2.20")
    assert " 0% packet loss" in r.stdout
    ike.ctl("terminate", "site")
    time.sleep(0.5)
    charon.swanctl("--initiate", "--child", "net", timeout=30)
    sas = wait_child(ike, charon)
    assert sas[0]["initiator"] is False
    return sas


# (key, auth words, outer family, identities, start_action, how each side logs the other's signature)
CERT_CASES = {
    "ecdsa": ("ec", "pubkey", False, "san", "none", "ECDSA SHA-256", "ECDSA_WITH_SHA256_DER"),
    "rsa": ("rsa", "pubkey", False, "san", "none", "RSA PKCS#1 v1.5 SHA-256", "RSA_EMSA_PKCS1_SHA2_256"),
    "rsa-pss-v6-dn": ("rsa", "ike:rsa/pss-sha256", True, "dn", "none", "RSA-PSS SHA-256", "RSA_EMSA_PSS_SHA2_256_SALT_32"),
    "ed25519-dn": ("ed25519", "pubkey", False, "dn", "none", "Ed25519", "ED25519"),
    "ecdsa-v6-dn-trap": ("ec", "pubkey", True, "dn", "trap", "ECDSA SHA-256", "ECDSA_WITH_SHA256_DER"),
}


@pytest.mark.parametrize("case", list(CERT_CASES))
def test_certificates_both_ways_with_charon(site, case):
    """The same swanctl.conf text on both sides: espd-ike initiates (or traps),
    then charon initiates; each way the peer's signature is checked, traffic
    passes both ways (ping, iperf3) and the wire carries only IKE and ESP
    that tshark decrypts with every ICV good."""
    kind, auth, v6, ids, start, ours_sees, charon_sees = CERT_CASES[case]
    net, parts = site
    pki = make_pki(net.tmp / "pki", kind)
    install_creds(pki, "gw1", net.tmp)
    install_creds(pki, "gw2", net.tmp / "charon-gw2")
    kw = dict(auth=auth, ids=ids, v6=v6)
    parts["charon"] = charon = Charon(net, cert_conf("gw2", "gw1", pki, **kw))
    # Both sides fragment (RFC 7383) what is above 600 octets: IKE_AUTH with a certificate.
    parts["ike"] = ike = Ike(net, cert_conf("gw1", "gw2", pki, start=start, **kw), args=("--fragment-size", "600"))
    if start == "trap":
        assert "dir out" in espd_policies(net) and espd_states(net).strip() == ""
        net.ns("a", "ping", "-c", "8", "-i", "0.5", "-W", "1", "198.18.2.20", check=False, timeout=30)
        assert "acquire for net: negotiating" in ike.log(), ike.log()
    else:
        ike.ctl("initiate", "net")
    sas = wait_child(ike, charon)
    peer = "gw2.example.net" if ids == "san" else DN.format("gw2")
    assert sas[0]["remote_id"] == peer, sas
    assert f"IKE_SA established with {peer} (" in ike.log() and f"{ours_sees} signature" in ike.log(), ike.log()
    me = "gw1.example.net" if ids == "san" else DN.format("gw1")
    want = f"authentication of '{me}' with {charon_sees} successful"
    assert want in charon.log.read_text(), charon.log.read_text()[-3000:]
    assert json.loads(ike.ctl("stats").stdout).get("ike-fragments-sent", 0) >= 1
    if v6:
        assert sas[0]["local"] == "[2001:db8::1]:4500", sas
    check_traffic_and_wire(net, ike, charon)
    # And charon as the initiator, espd-ike verifying its certificate: the
    # same traffic, wire and decryption checks with the new SAs.
    ping_then_charon_initiates(net, ike, charon)
    time.sleep(0.5)
    check_traffic_and_wire(net, ike, charon, pcap_name="wire-responder.pcap")
    # charon (fragment_size = 600) sent its certificate-bearing IKE_AUTH
    # messages in RFC 7383 fragments; espd-ike reassembled them, and sent its own.
    st = json.loads(ike.ctl("stats").stdout)
    assert st.get("ike-fragments-reassembled", 0) >= 2 and st["ike-fragments"] >= 4, st


@pytest.mark.parametrize("case", ["untrusted", "revoked", "expired", "id-mismatch", "dn-mismatch"])
def test_bad_certificates_are_refused(site, case):
    net, parts = site
    pki = make_pki(net.tmp / "pki", "ec", revoke="gw2" if case == "revoked" else None,
                   other_ca=case == "untrusted")
    ours = cert_conf("gw1", "gw2", pki, ids="dn" if case == "dn-mismatch" else "san")
    if case == "id-mismatch":
        ours = ours.replace("id = gw2.example.net", "id = gw9.example.net")
    if case == "dn-mismatch":
        # charon sends its subject DN; we expect another O=.
        ours = ours.replace("O=espd test, CN=gw2", "O=elsewhere, CN=gw2")
    if case == "expired":
        reissue_expired(pki, "gw2")
    if case == "revoked":
        sh("openssl", "ca", "-config", str(pki / "ca.cnf"), "-cert", str(pki / "ca.pem"), "-keyfile",
           str(pki / "ca.key"), "-gencrl", "-out", str(pki / "ca.crl"))
    # The CRL sits in x509crl/ beside our configuration, as swanctl's layout.
    install_creds(pki, "gw1", net.tmp, crl=case == "revoked")
    install_creds(pki, "gw2", net.tmp / "charon-gw2")
    if case == "untrusted":
        # gw2's certificate is issued by another CA; charon itself trusts both.
        shutil.copy(pki / "other-ca.pem", net.tmp / "charon-gw2" / "x509ca" / "other-ca.pem")
    parts["charon"] = charon = Charon(net, cert_conf("gw2", "gw1", pki, ids="dn" if case == "dn-mismatch" else "san"))
    parts["ike"] = ike = Ike(net, ours)
    if case in ("id-mismatch", "dn-mismatch"):
        # charon initiates as gw2.example.net (or its DN); we expect another.
        charon.swanctl("--initiate", "--child", "net", check=False, timeout=30)
    else:
        ike.ctl("initiate", "net")
    want = {"untrusted": "not issued by a trusted CA", "revoked": "revoked",
            "expired": "the peer's certificate has expired",
            "id-mismatch": "peer gw2.example.net: identity is not remote id",
            "dn-mismatch": f"peer {DN.format('gw2')}: identity is not remote id"}[case]
    for _ in range(100):
        if want in ike.log():
            break
        time.sleep(0.1)
    assert want in ike.log() and "AUTHENTICATION_FAILED" in ike.log(), ike.log()
    assert espd_states(net).strip() == "" and espd_policies(net).strip() == ""
    assert "INSTALLED" not in charon.sas()


def test_reload_keeps_unchanged_connections_and_refuses_a_bad_file(site):
    net, parts = site
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1"))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2"))
    ike.ctl("initiate", "net")
    spi = wait_child(ike, charon)[0]["children"][0]["spi_in"]
    # The same file again (a comment added): nothing changes.
    ike.conf.write_text("# edited\n" + swanctl_conf("gw1", "gw2"))
    r = ike.ctl("reload")
    assert "reloaded" in r.stdout and "deleted" not in r.stdout, r.stdout
    assert ike.sas()[0]["children"][0]["spi_in"] == spi
    # A bad file: refused with FILE:LINE, the tunnel stays.
    ike.conf.write_text(swanctl_conf("gw1", "gw2").replace("encap = yes", "encap = maybe"))
    r = ike.ctl("reload", check=False)
    assert r.returncode != 0 and f"{ike.conf}:8: encap = maybe: expected yes or no" in r.stderr, r.stderr
    assert "nothing changed" in r.stderr
    assert ike.sas()[0]["children"][0]["spi_in"] == spi
    net.ns("a", "ping", "-c", "2", "-i", "0.1", "-W", "2", "198.18.2.20")
    # A changed connection: its IKE_SA goes (and its SAs leave espd).
    ike.conf.write_text(swanctl_conf("gw1", "gw2", esp="aes256gcm16,aes128gcm16"))
    r = ike.ctl("reload")
    assert "connection site: changed or removed, 1 IKE_SA(s) deleted" in r.stdout, r.stdout
    for _ in range(50):
        if not ike.sas() and espd_states(net).strip() == "":
            break
        time.sleep(0.1)
    assert not ike.sas() and espd_states(net).strip() == ""
    # And it comes up again with the new proposals (charon takes the second).
    ike.ctl("initiate", "net")
    c = wait_child(ike, charon)[0]["children"][0]
    assert c["alg"].startswith("aes128gcm16") and c["spi_in"] != spi, c


def test_a_child_negotiated_while_espd_is_down_is_installed_when_it_is_back(site):
    net, parts = site
    parts["charon"] = charon = Charon(net, swanctl_conf("gw2", "gw1"))
    parts["ike"] = ike = Ike(net, swanctl_conf("gw1", "gw2"))
    net.stop("gw1")
    ike.ctl("initiate", "net")
    wait_child(ike, charon)
    assert "installed when espd is back" in ike.log(), ike.log()
    net.start("gw1", config=False)
    for _ in range(60):
        if espd_states(net).count("state add") == 2:
            break
        time.sleep(0.05)
    assert espd_states(net).count("state add") == 2, ike.log()
    assert espd_policies(net).count("policy add") == 3
    r = net.ns("a", "ping", "-c", "3", "-i", "0.1", "-W", "2", "198.18.2.20")
    assert " 0% packet loss" in r.stdout



@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_classic_signatures_with_a_peer_without_rfc_7427(site, kind):
    """charon with signature_authentication = no announces no hashes and signs
    with a classic method: 9 (ECDSA P-256, RFC 4754), or 1 (RSA PKCS#1 v1.5
    with SHA-1). espd-ike checks it; it answers ECDSA in kind, and RSA with
    RFC 7427 PKCS#1 v1.5 SHA-256 (aws-lc-rs signs no SHA-1), which charon
    takes."""
    net, parts = site
    pki = make_pki(net.tmp / "pki", kind)
    install_creds(pki, "gw1", net.tmp)
    install_creds(pki, "gw2", net.tmp / "charon-gw2")
    parts["charon"] = charon = Charon(net, cert_conf("gw2", "gw1", pki), extra="signature_authentication = no")
    parts["ike"] = ike = Ike(net, cert_conf("gw1", "gw2", pki))
    ike.ctl("initiate", "net")
    wait_child(ike, charon)
    want = {"ec": "authentication of 'gw1.example.net' with ECDSA-256 signature successful",
            "rsa": "authentication of 'gw1.example.net' with RSA_EMSA_PKCS1_SHA2_256 successful"}[kind]
    for _ in range(50):
        if want in charon.log.read_text():
            break
        time.sleep(0.1)
    assert want in charon.log.read_text(), charon.log.read_text()[-3000:]
    ours = {"ec": "ECDSA-256 signature (RFC 4754)", "rsa": "RSA signature, method 1 (SHA-1)"}[kind]
    assert f"IKE_SA established with gw2.example.net (" in ike.log() and ours in ike.log(), ike.log()
    ping_then_charon_initiates(net, ike, charon)
