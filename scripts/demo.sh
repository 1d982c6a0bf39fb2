#!/usr/bin/env bash
# The live gateway (root): two espd gateways tunnel two sites over ESP.
#
#   host A ── gw1 (espd) ══ ESP, AES-GCM-128 tunnel ══ gw2 (espd) ── host B
#   198.18.1.0/24, 2001:db8:1::/64                     198.18.2.0/24, 2001:db8:2::/64
#
# Network namespaces and veth pairs (scripts/topo.sh), fresh keys, espd on
# gw1 and gw2 (one pinned worker each), then ping and iperf3 TCP both ways
# over IPv4 and IPv6, a look at the wire (only ESP), throughput and espd's
# counters. Everything is removed on exit.
#   SECS=5  seconds per iperf3 run
set -euo pipefail
cd "$(dirname "$0")/.."
ESPD=${ESPD:-target/release/espd}
SECS=${SECS:-5}
P=espd$$
work=$(mktemp -d /tmp/espd-demo.XXXXXX)
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    scripts/topo.sh down "$P"
    rm -rf "$work"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "demo.sh: needs root (network namespaces, XDP, AF_XDP)" >&2; exit 1; }
[ -x "$ESPD" ] || { echo "demo.sh: $ESPD missing: cargo build --release" >&2; exit 1; }
command -v iperf3 >/dev/null || { echo "demo.sh: iperf3 missing (scripts/deps.sh installs it)" >&2; exit 1; }

scripts/topo.sh up "$P" "$work"
ncores=$(nproc)
start_gw() { # name inside outside core
    ip netns exec "$P-$1" "$ESPD" run -c "$work/$1.conf" --inside "$2" --outside "$3" \
        --cores "$4" --stats-json "$work/$1.json" --control "$work/$1.sock" --seq-file "$work/$1.seq" \
        -q 2>"$work/$1.log" &
    pids+=($!)
}
start_gw gw1 i1 o1 0
start_gw gw2 i2 o2 $((1 % ncores))
for _ in $(seq 50); do
    grep -q "espd run: inside" "$work/gw1.log" "$work/gw2.log" 2>/dev/null &&
        [ "$(grep -l 'espd run: inside' "$work"/gw*.log | wc -l)" = 2 ] && break
    sleep 0.1
done
head -qn1 "$work/gw1.log" "$work/gw2.log"

ip netns exec "$P-wire" tcpdump -ni br0 -w "$work/wire.pcap" ip or ip6 2>/dev/null &
dump=$!
sleep 0.5
echo "== ping over the tunnel"
ip netns exec "$P-a" ping -c 3 -i 0.2 198.18.2.20 | tail -2
ip netns exec "$P-a" ping -6 -c 3 -i 0.2 2001:db8:2::20 | tail -2

ip netns exec "$P-b" iperf3 -s -D -I "$work/iperf.pid" >/dev/null
ip netns exec "$P-a" iperf3 -s -D -I "$work/iperf-a.pid" >/dev/null
sleep 0.3
rate() { # ns dst [-R] label
    local r
    r=$(ip netns exec "$P-$1" iperf3 -c "$2" -t "$SECS" -f m ${3:-} | awk '/receiver/ {print $(NF-2), $(NF-1)}')
    printf '  %-34s %s\n' "$4" "$r"
}
echo "== iperf3 TCP, ${SECS} s each"
rate a 198.18.2.20 "" "IPv4 A -> B"
rate b 198.18.1.10 "" "IPv4 B -> A"
rate a 2001:db8:2::20 "" "IPv6 A -> B"
rate b 2001:db8:1::10 "" "IPv6 B -> A"
kill "$(cat "$work/iperf.pid")" "$(cat "$work/iperf-a.pid")" 2>/dev/null || true
kill -INT "$dump"; wait "$dump" 2>/dev/null || true

echo "== the gw1-gw2 wire"
total=$(tcpdump -nr "$work/wire.pcap" 2>/dev/null | wc -l)
esp=$(tcpdump -nr "$work/wire.pcap" esp 2>/dev/null | wc -l)
nd=$(tcpdump -nr "$work/wire.pcap" 'icmp6 and (ip6[40] >= 133 and ip6[40] <= 137) or (ip6 and ip6[6] = 0 and ip6[40] = 58)' 2>/dev/null | wc -l)
echo "  $total IP packets captured: $esp ESP, $nd neighbour discovery / MLD, $((total - esp - nd)) other"
tcpdump -nr "$work/wire.pcap" 'not esp and not icmp6' 2>/dev/null | head -5 | sed 's/^/    /'

for p in "${pids[@]}"; do kill -INT "$p"; done
for p in "${pids[@]}"; do wait "$p" || true; done
pids=()
echo "== espd counters"
for g in gw1 gw2; do
    echo "  $g: $(grep -h '^espd run: rx' "$work/$g.log" | sed 's/^espd run: //')"
done
for g in gw1 gw2; do grep -h "detached" "$work/$g.log" | sed 's/^/  /'; done
