#!/usr/bin/env bash
# The gateway test network, in network namespaces (root):
#
#   hostA ─a0──i1─ gw1 ─o1──w1─[ wire: bridge br0 ]─w2──o2─ gw2 ─i2──b0─ hostB
#   198.18.1.10/24   198.18.1.1 | 198.18.0.1/24      198.18.0.2 | 198.18.2.1   198.18.2.20/24
#   2001:db8:1::10/64           | 2001:db8::1/64   2001:db8::2 |              2001:db8:2::20/64
#
# The "wire" namespace holds the gw1–gw2 link as a bridge, so a capture there
# sees what the gateways' AF_XDP sockets send (tcpdump on the sending
# interface would not). Addresses: 198.18.0.0/15 and 2001:db8::/32 only.
#
#   scripts/topo.sh up PREFIX [CONFDIR]   # namespaces PREFIX-{a,gw1,wire,gw2,b}; with
#                                         # CONFDIR, also writes gw1.conf and gw2.conf
#                                         # (AES-GCM-128 tunnel SAs for v4 and v6, fresh keys)
#   scripts/topo.sh down PREFIX
#   QUEUES=2 scripts/topo.sh up …         # veth pairs with 2 RX/TX queues (2 workers per espd)
#   QIN=1 QOUT=2 scripts/topo.sh up …     # uneven: 1-queue inside links, 2-queue outside links
#   SITE_BRIDGE=1 scripts/topo.sh up …    # gw2 ─i2──s2─[ wire: bridge br1 ]─s3──b0─ hostB: the
#                                         # site link captured too (both its ends may be AF_XDP)
#
# Hosts A and B keep veth's default TX checksum offload: their TCP/UDP
# checksums reach espd partial, and espd completes them (see
# docs/operations.md, "veth caveats").
set -euo pipefail

QUEUES=${QUEUES:-1}  # RX/TX queues per veth: espd runs one worker per queue index
QIN=${QIN:-$QUEUES}   # … of the inside links (a0–i1, i2–b0) only
QOUT=${QOUT:-$QUEUES} # … of the outside links (o1–w1, o2–w2) only
SITE_BRIDGE=${SITE_BRIDGE:-}
cmd=${1:?up|down}
P=${2:?namespace prefix}

ns() { ip netns exec "$P-$1" "${@:2}"; }

down() {
    for n in a gw1 wire gw2 b; do ip netns del "$P-$n" 2>/dev/null || true; done
}

up() {
    local confdir=${1:-}
    down
    for n in a gw1 wire gw2 b; do
        ip netns add "$P-$n"
        ip -n "$P-$n" link set lo up
        # No duplicate address detection on these private links (link-local
        # addresses would be tentative for a second and ND answers wait).
        ip netns exec "$P-$n" sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0
    done
    # Queue counts on both ends (iproute2 6.1 applies them to one end only
    # in some word orders: checked below).
    local qi="numtxqueues $QIN numrxqueues $QIN" qo="numtxqueues $QOUT numrxqueues $QOUT"
    ip link add a0 netns "$P-a" $qi type veth peer name i1 netns "$P-gw1" $qi
    ip link add o1 netns "$P-gw1" $qo type veth peer name w1 netns "$P-wire" $qo
    ip link add o2 netns "$P-gw2" $qo type veth peer name w2 netns "$P-wire" $qo
    local checks=("a a0 $QIN" "gw1 i1 $QIN" "gw1 o1 $QOUT" "wire w1 $QOUT" "wire w2 $QOUT"
                  "gw2 o2 $QOUT" "gw2 i2 $QIN" "b b0 $QIN")
    if [ -n "$SITE_BRIDGE" ]; then
        ip link add i2 netns "$P-gw2" $qi type veth peer name s2 netns "$P-wire" $qi
        ip link add b0 netns "$P-b" $qi type veth peer name s3 netns "$P-wire" $qi
        checks+=("wire s2 $QIN" "wire s3 $QIN")
    else
        ip link add i2 netns "$P-gw2" $qi type veth peer name b0 netns "$P-b" $qi
    fi
    for x in "${checks[@]}"; do
        set -- $x
        n=$(ns "$1" ls "/sys/class/net/$2/queues" | grep -c '^rx-')
        [ "$n" = "$3" ] || { echo "topo.sh: $2 in $P-$1 has $n RX queues, not $3" >&2; exit 1; }
    done
    ip -n "$P-wire" link add br0 type bridge
    ip -n "$P-wire" link set w1 master br0
    ip -n "$P-wire" link set w2 master br0
    for l in br0 w1 w2; do ip -n "$P-wire" link set "$l" up; done
    if [ -n "$SITE_BRIDGE" ]; then
        ip -n "$P-wire" link add br1 type bridge
        ip -n "$P-wire" link set s2 master br1
        ip -n "$P-wire" link set s3 master br1
        for l in br1 s2 s3; do ip -n "$P-wire" link set "$l" up; done
    fi
    ns wire sysctl -qw net.ipv6.conf.all.disable_ipv6=1

    addr() { ip -n "$P-$1" addr add "$3" dev "$2" ${4:-}; }
    addr a a0 198.18.1.10/24;  addr a a0 2001:db8:1::10/64 nodad
    addr gw1 i1 198.18.1.1/24; addr gw1 i1 2001:db8:1::1/64 nodad
    addr gw1 o1 198.18.0.1/24; addr gw1 o1 2001:db8::1/64 nodad
    addr gw2 o2 198.18.0.2/24; addr gw2 o2 2001:db8::2/64 nodad
    addr gw2 i2 198.18.2.1/24; addr gw2 i2 2001:db8:2::1/64 nodad
    addr b b0 198.18.2.20/24;  addr b b0 2001:db8:2::20/64 nodad
    for x in "a a0" "gw1 i1" "gw1 o1" "gw2 o2" "gw2 i2" "b b0"; do
        set -- $x
        ip -n "$P-$1" link set "$2" up
    done
    for g in gw1 gw2; do
        ns $g sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
    done
    ip -n "$P-a" route add default via 198.18.1.1
    ip -n "$P-a" -6 route add default via 2001:db8:1::1
    ip -n "$P-b" route add default via 198.18.2.1
    ip -n "$P-b" -6 route add default via 2001:db8:2::1
    ip -n "$P-gw1" route add 198.18.2.0/24 via 198.18.0.2
    ip -n "$P-gw1" -6 route add 2001:db8:2::/64 via 2001:db8::2
    ip -n "$P-gw2" route add 198.18.1.0/24 via 198.18.0.1
    ip -n "$P-gw2" -6 route add 2001:db8:1::/64 via 2001:db8::1
    # Let links, DAD-less addresses and multicast snooping settle: one ping
    # each way over the kernel path, then forget the neighbours, so that espd
    # resolves its next hops itself.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        ns gw1 ping -c1 -W1 198.18.0.2 >/dev/null 2>&1 &&
            ns gw1 ping -6 -c1 -W1 2001:db8::2 >/dev/null 2>&1 && break
        sleep 0.2
    done
    for n in a gw1 gw2 b; do ip -n "$P-$n" neigh flush all; ip -n "$P-$n" -6 neigh flush all; done

    if [ -n "$confdir" ]; then
        conf "$confdir"
    fi
}

key() { echo "0x$(head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n')"; }

# Tunnel-mode AES-GCM-128 (RFC 4106, 16-octet ICV) SA pairs for both families.
conf() {
    local d=$1 k1 k2 k3 k4 gcm="aead 'rfc4106(gcm(aes))'"
    k1=$(key 20); k2=$(key 20); k3=$(key 20); k4=$(key 20)
    # A replay window wide enough for several workers sending through one SA.
    local w="replay-window 1024"
    local states="state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1001 reqid 1 mode tunnel $w $gcm $k1 128
state add src 198.18.0.2 dst 198.18.0.1 proto esp spi 0x2001 reqid 2 mode tunnel $w $gcm $k2 128
state add src 2001:db8::1 dst 2001:db8::2 proto esp spi 0x1006 reqid 3 mode tunnel $w $gcm $k3 128
state add src 2001:db8::2 dst 2001:db8::1 proto esp spi 0x2006 reqid 4 mode tunnel $w $gcm $k4 128"
    cat >"$d/gw1.conf" <<CONF
# gw1: site A (198.18.1.0/24, 2001:db8:1::/64) <-> site B through gw2
$states
policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel
policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir fwd tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
policy add src 2001:db8:1::/64 dst 2001:db8:2::/64 dir out tmpl src 2001:db8::1 dst 2001:db8::2 proto esp reqid 3 mode tunnel
policy add src 2001:db8:2::/64 dst 2001:db8:1::/64 dir fwd tmpl src 2001:db8::2 dst 2001:db8::1 proto esp reqid 4 mode tunnel
CONF
    cat >"$d/gw2.conf" <<CONF
# gw2: site B (198.18.2.0/24, 2001:db8:2::/64) <-> site A through gw1
$states
policy add src 198.18.2.0/24 dst 198.18.1.0/24 dir out tmpl src 198.18.0.2 dst 198.18.0.1 proto esp reqid 2 mode tunnel
policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir fwd tmpl src 198.18.0.1 dst 198.18.0.2 proto esp reqid 1 mode tunnel
policy add src 2001:db8:2::/64 dst 2001:db8:1::/64 dir out tmpl src 2001:db8::2 dst 2001:db8::1 proto esp reqid 4 mode tunnel
policy add src 2001:db8:1::/64 dst 2001:db8:2::/64 dir fwd tmpl src 2001:db8::1 dst 2001:db8::2 proto esp reqid 3 mode tunnel
CONF
    chmod 600 "$d/gw1.conf" "$d/gw2.conf"
}

case $cmd in
    up) up "${@:3}" ;;
    down) down ;;
    *) echo "usage: $0 up|down PREFIX [CONFDIR]" >&2; exit 2 ;;
esac
