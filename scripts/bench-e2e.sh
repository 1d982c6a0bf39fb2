#!/usr/bin/env bash
# End-to-end throughput through the gateway test network (root), measured in
# one run on this machine (scripts/topo.sh: host A — gw1 — wire — gw2 — host B):
#
#   kernel     plain Linux forwarding, no tunnel
#   espd-null  espd on both gateways with --bench-no-crypto: ESP framing, no
#              cipher (the AF_XDP I/O ceiling)
#   espd-gcm   espd on both gateways, AES-GCM-128 tunnel (RFC 4106)
#   strongswan strongSwan 5.9 kernel-libipsec (IKEv2 PSK, ESP AES-GCM-128, always
#              UDP-encapsulated; scripts/strongswan-peer.sh) — skipped with the
#              reason when not installed
#
# Each row: iperf3 TCP A→B (Mbit/s) and a UDP packet rate A→B (64-octet
# payloads, unlimited offered rate, packets/s received), medians of RUNS.
#   SECS=5 RUNS=3 scripts/bench-e2e.sh [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
ESPD=${ESPD:-target/release/espd}
SECS=${SECS:-5}
RUNS=${RUNS:-3}
JSON=""
[ "${1:-}" = --json ] && JSON=$2
P=espdb$$
work=$(mktemp -d /tmp/espd-bench.XXXXXX)
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    scripts/topo.sh down "$P"
    rm -rf "$work"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] || { echo "bench-e2e.sh: needs root" >&2; exit 1; }

ns() { ip netns exec "$P-$1" "${@:2}"; }

median() { python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

measure() { # row label
    local tcp=() udp=() r
    ns b iperf3 -s -D -I "$work/iperf.pid" >/dev/null
    sleep 0.3
    ns a ping -c 2 -W 2 198.18.2.20 >/dev/null || { echo "  $1: no connectivity" >&2; return 1; }
    for _ in $(seq "$RUNS"); do
        r=$(ns a iperf3 -c 198.18.2.20 -t "$SECS" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6)')
        tcp+=("$r")
        r=$(ns a iperf3 -c 198.18.2.20 -t "$SECS" -u -b 0 -l 64 -J | python3 -c '
import json,sys
s = json.load(sys.stdin)["end"]["sum"]
print((s["packets"] - s["lost_packets"]) / s["seconds"])')
        udp+=("$r")
    done
    kill "$(cat "$work/iperf.pid")" 2>/dev/null || true
    sleep 0.3
    printf '%s %s %s\n' "$1" "$(median "${tcp[@]}")" "$(median "${udp[@]}")" >>"$work/rows"
    printf '  %-11s TCP %8.0f Mbit/s   UDP 64 B %10.0f packets/s\n' "$1" "$(median "${tcp[@]}")" "$(median "${udp[@]}")"
}

start_espd() { # extra args
    local n=$(($(nproc) > 1 ? 1 : 0))
    # `ip netns exec` directly (not a shell function), so that $! is espd itself.
    ip netns exec "$P-gw1" "$ESPD" run -c "$work/gw1.conf" --inside i1 --outside o1 --cores 0 --control "$work/gw1.sock" --seq-file "$work/gw1.seq" -q "$@" 2>"$work/gw1.log" &
    pids+=($!)
    ip netns exec "$P-gw2" "$ESPD" run -c "$work/gw2.conf" --inside i2 --outside o2 --cores "$n" --control "$work/gw2.sock" --seq-file "$work/gw2.seq" -q "$@" 2>"$work/gw2.log" &
    pids+=($!)
    sleep 1.5
}

stop_espd() {
    for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" || true; done
    pids=()
}

echo "bench-e2e: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), kernel $(uname -r), ${SECS} s x ${RUNS} runs per figure (median)"
scripts/topo.sh up "$P" "$work"
measure kernel

start_espd --bench-no-crypto
measure espd-null
stop_espd

start_espd
measure espd-gcm
stop_espd

if [ -x /usr/lib/ipsec/charon ] && command -v swanctl >/dev/null &&
    [ -e /usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so ]; then
    if scripts/strongswan-peer.sh up "$P" "$work" >"$work/swan.log" 2>&1; then
        measure strongswan || true
        scripts/strongswan-peer.sh down "$P" "$work" >/dev/null 2>&1 || true
    else
        echo "  strongswan  skipped: setting up the IKEv2 tunnel failed (see its log)"; tail -5 "$work/swan.log"
    fi
else
    echo "  strongswan  skipped: strongSwan with kernel-libipsec is not installed (apt-get install strongswan-charon strongswan-swanctl libcharon-extra-plugins)"
fi

python3 - "$work/rows" "$JSON" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    k, t, u = line.split()
    rows[k] = {"tcp_mbit": float(t), "udp_pps": float(u)}
def ratio(a, b, f):
    return rows[a][f] / rows[b][f] if a in rows and b in rows and rows[b][f] else None
out = {"rows": rows,
       "gcm_vs_null_tcp": ratio("espd-gcm", "espd-null", "tcp_mbit"),
       "gcm_vs_null_udp": ratio("espd-gcm", "espd-null", "udp_pps"),
       "gcm_vs_kernel_tcp": ratio("espd-gcm", "kernel", "tcp_mbit"),
       "gcm_vs_strongswan_tcp": ratio("espd-gcm", "strongswan", "tcp_mbit")}
for k, v in out.items():
    if k != "rows" and v is not None:
        print(f"  {k:24s} {v:.2f}x")
if sys.argv[2]:
    json.dump(out, open(sys.argv[2], "w"), indent=2)
PY
