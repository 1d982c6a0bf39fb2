#!/usr/bin/env bash
# Installs what espd's build and tests need, idempotently: Debian packages
# (tshark, python3-venv, iproute2, tcpdump, ping, iperf3, ethtool, LLVM 22, strongSwan), the nightly
# toolchain's rust-src, bpf-linker and cargo-fuzz, and a Python venv with scapy 2.8
# (Debian's scapy 2.5 gets CBC+ESN wrong), cryptography and pytest.
# Rust comes from rustup (present on the build machines).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v tshark >/dev/null || need+=(tshark)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
command -v setpriv >/dev/null || need+=(util-linux)
# The live gateway's demo and tests: iperf3 traffic, ethtool on veth.
command -v iperf3 >/dev/null || need+=(iperf3)
command -v ethtool >/dev/null || need+=(ethtool)
# The test command lints every script.
command -v shellcheck >/dev/null || need+=(shellcheck)
# DPDK 22.11's ipsec-secgw as a far gateway in the tests (scripts/dpdk-secgw.sh builds it).
for p in libdpdk-dev dpdk-doc; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
# strongSwan 5.9 (charon with kernel-libipsec): espd-ike's IKEv2 peer in the
# tests (scripts/oracle/test_ike.py) and the comparison tunnel of bench-e2e.sh.
for p in strongswan-charon strongswan-swanctl libcharon-extra-plugins; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
# The remote-access test's NAT router (nft masquerade in a namespace).
command -v nft >/dev/null || need+=(nftables)
# The XDP program: LLVM 22 for bpf-linker (Debian 12's security suite has it).
[ -d /usr/lib/llvm-22 ] || need+=(llvm-22-dev)
# xsk-rs builds a vendored libxdp/libbpf.
for p in m4 make clang pkg-config libelf-dev zlib1g-dev libpcap-dev; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "deps.sh: need root to install: ${need[*]}" >&2
        exit 1
    fi
    echo "deps.sh: installing ${need[*]}"
    # Wireshark asks whether non-root users may capture: answer no, quietly.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections 2>/dev/null || true
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Fuzzing: a nightly toolchain (present on the build machines) and cargo-fuzz.
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# The XDP program is built with nightly's build-std (rust-src) and bpf-linker.
rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src' ||
    rustup component add rust-src --toolchain nightly
if ! bpf-linker --version >/dev/null 2>&1; then
    echo "deps.sh: installing bpf-linker 0.13.0 (about 90 s)"
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker@0.13.0 --locked --no-default-features --features llvm-22
fi

if ! .venv/bin/python -c 'import scapy, cryptography, pytest, prometheus_client; assert scapy.__version__ >= "2.8"' 2>/dev/null; then
    echo "deps.sh: creating .venv (scapy 2.8.0, cryptography, pytest, prometheus-client)"
    python3 -m venv .venv
    # prometheus-client: its parser checks espd's metrics text in the tests.
    .venv/bin/pip install -q --disable-pip-version-check 'scapy==2.8.0' cryptography pytest 'prometheus-client==0.21.1'
fi
