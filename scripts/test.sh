#!/usr/bin/env bash
# Runs every test: formatting, lints, Rust unit and integration tests, the
# scapy/tshark oracle suite (with the live gateway's namespace tests), the pcap
# round trip and the gateway demo. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
echo "== scripts: bash -n and shellcheck"
for f in scripts/*.sh .ci/run; do bash -n "$f"; done
shellcheck -S warning scripts/*.sh .ci/run
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build --release"
cargo build --release
echo "== cargo test"
cargo test --workspace 2>&1 | tee /tmp/espd-cargo-test.$$ | grep -E '^(test result|error|failures:|---- )' || true
grep -q '^test result: FAILED\|^error' /tmp/espd-cargo-test.$$ && { cat /tmp/espd-cargo-test.$$; rm -f /tmp/espd-cargo-test.$$; exit 1; }
rm -f /tmp/espd-cargo-test.$$
echo "== benches (smoke: each benchmark once)"
cargo bench -p espd-benches -- --test >/dev/null
echo "== fuzz (bounded: 10 s per target; scripts/fuzz.sh SECONDS for longer runs)"
scripts/fuzz.sh 10
echo "== pcap round trip (scripts/demo-pcap.sh)"
scripts/demo-pcap.sh
# Runs a step that needs root (network namespaces, XDP); without root it is
# skipped with the reason, except in CI, where that is a failure.
as_root() {
    local what=$1
    shift
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif [ "${CI:-}" = true ]; then
        echo "CI must run as root: $what needs network namespaces" >&2
        exit 1
    else
        echo "skipped: needs root (network namespaces, XDP)"
    fi
}
echo "== live gateway demo (scripts/demo.sh, 1 s per iperf3 run)"
as_root "the live gateway demo" env SECS=1 scripts/demo.sh
echo "== control-plane benchmark (smoke: 0 and 1000 tunnels; full table: scripts/oracle/ctlbench.py)"
as_root "the control-plane benchmark" .venv/bin/python scripts/oracle/ctlbench.py --smoke
echo "== IKE load (smoke: 200 tunnels against espd-ike; full table: scripts/oracle/ikeload.py)"
as_root "the IKE load test" .venv/bin/python scripts/oracle/ikeload.py --smoke
echo "== IKE rekeys at scale (smoke: 1 000 tunnels rekeyed every 10-20 s with a numbered stream; full: scripts/oracle/ikerekey.py)"
as_root "the IKE rekey test" .venv/bin/python scripts/oracle/ikerekey.py --smoke
echo "== oracle suite (scapy 2.8, tshark, cryptography)"
# In CI a skipped test is a failure: the tshark fixture fails there instead of skipping.
.venv/bin/python -m pytest -p no:cacheprovider -q scripts/oracle "$@"
