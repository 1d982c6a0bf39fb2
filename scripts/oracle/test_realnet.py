"""The live gateway on less tidy networks (issue: "real networks"), on the
topology of scripts/topo.sh:

    host A ─ gw1 (espd) ═ wire (bridge br0) ═ gw2 (espd) ─ host B

- a neighbour entry the operator made permanent stays exactly as it was
  while espd uses it (espd refreshes dynamic entries only), and traffic flows.
"""

import time

import pytest

from test_gateway import Net, need


@pytest.fixture
def net(tmp_path):
    need("ping")
    n = Net(tmp_path)
    try:
        yield n
    finally:
        n.close()


def test_a_permanent_neighbour_entry_is_used_and_left_alone(net):
    peer_mac = net.ns("gw2", "cat", "/sys/class/net/o2/address").stdout.strip()
    net.ns("gw1", "ip", "neigh", "replace", "198.18.0.2", "lladdr", peer_mac, "dev", "o1",
           "nud", "permanent")
    before = net.ns("gw1", "ip", "neigh", "show", "198.18.0.2", "dev", "o1").stdout.strip()
    assert "PERMANENT" in before, before
    net.start("gw1")
    net.start("gw2")
    # Two of espd's 5-second refresh rounds, with traffic through the tunnel.
    r = net.ns("a", "ping", "-c", "60", "-i", "0.2", "-W", "2", "198.18.2.20", check=False,
               timeout=60)
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout
    after = net.ns("gw1", "ip", "neigh", "show", "198.18.0.2", "dev", "o1").stdout.strip()
    assert after == before, (before, after)
    net.stop("gw1")
    net.stop("gw2")
