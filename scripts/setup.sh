#!/usr/bin/env bash
# One command on a fresh Debian 12 machine with rustup: install what is
# needed, build espd and espctl, and run the main job.
#
# The main job is the live gateway (scripts/demo.sh, root): host A — gw1 —
# gw2 — host B in network namespaces, espd on both gateways with an AES-GCM
# tunnel for IPv4 and IPv6, ping and iperf3 both ways, counters. The offline
# round trip (scripts/demo-pcap.sh) runs first: it needs no privileges.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release
scripts/demo-pcap.sh
scripts/demo.sh
