#!/usr/bin/env bash
# One command on a fresh Debian 12 machine with rustup: install what is
# needed, build espd and espctl, and run the main job.
#
# Until the AF_XDP gateway lands, the main job is the offline round trip
# (scripts/demo-pcap.sh): plaintext from site A is protected by espd as gw1,
# tshark decrypts the ESP capture, espd as gw2 restores the plaintext.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release
scripts/demo-pcap.sh
