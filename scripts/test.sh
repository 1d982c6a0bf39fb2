#!/usr/bin/env bash
# Runs every test: formatting, lints, Rust unit and integration tests, the
# scapy/tshark oracle suite, and the pcap round trip. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
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
echo "== oracle suite (scapy 2.8, tshark, cryptography)"
# In CI a skipped test is a failure: the tshark fixture fails there instead of skipping.
.venv/bin/python -m pytest -p no:cacheprovider -q scripts/oracle "$@"
