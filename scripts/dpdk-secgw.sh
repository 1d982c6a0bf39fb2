#!/usr/bin/env bash
# Builds DPDK 22.11's ipsec-secgw example (Debian's dpdk-doc carries its
# sources, libdpdk-dev the libraries; scripts/deps.sh installs both) into
# target/dpdk-secgw/, for the tests that use it as the far gateway
# (scripts/oracle/test_dpdk.py). About 25 s; skipped when already built.
#
# One local change to the example: it insists on RX checksum offload and RSS,
# which the af_packet PMD on veth lacks, so its port set-up asks for neither.
# Prints the path of the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
src=/usr/share/dpdk/examples
out=target/dpdk-secgw
bin=$out/ipsec-secgw/build/ipsec-secgw
if [ -x "$bin" ] && [ "$bin" -nt "$src/ipsec-secgw/ipsec-secgw.c" ]; then
    echo "$bin"
    exit 0
fi
[ -d "$src/ipsec-secgw" ] || { echo "dpdk-secgw.sh: $src/ipsec-secgw missing (apt-get install dpdk-doc libdpdk-dev)" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out"
cp -r "$src/ipsec-secgw" "$src/common" "$out/"
sed -i 's/\.mq_mode\t= RTE_ETH_MQ_RX_RSS,/.mq_mode\t= RTE_ETH_MQ_RX_NONE,/;
        s/\.offloads = RTE_ETH_RX_OFFLOAD_CHECKSUM,/.offloads = 0,/' "$out/ipsec-secgw/ipsec-secgw.c"
grep -q 'RTE_ETH_MQ_RX_NONE' "$out/ipsec-secgw/ipsec-secgw.c" || { echo "dpdk-secgw.sh: the port set-up change did not apply" >&2; exit 1; }
make -s -C "$out/ipsec-secgw" -j"$(nproc)" >&2
echo "$bin"
