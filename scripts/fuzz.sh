#!/usr/bin/env bash
# Runs every fuzz target (cargo-fuzz / libFuzzer, nightly) for SECONDS each
# (default 60; the test command uses a short run). New inputs go to
# dataplane/core/fuzz/corpus/<target> (not committed); the committed seeds are in
# dataplane/core/fuzz/seeds/<target>. A crash leaves its input in
# dataplane/core/fuzz/artifacts/<target> and fails the script.
#
#   scripts/fuzz.sh            # 60 s per target
#   scripts/fuzz.sh 3600 decap # one target for an hour
set -euo pipefail
cd "$(dirname "$0")/../dataplane/core"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(wire decap config burst ike_wire ike_responder)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    echo "== fuzz $t for ${secs}s"
    out=$(cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" -max_len=4096 -print_final_stats=1 2>&1) || true
    grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|==[0-9]+==|SUMMARY|Done)' <<<"$out" || true
    # A target that did not build or run is a failure, not a silent pass.
    if ! grep -q '^stat::number_of_executed_units' <<<"$out"; then
        echo "fuzz.sh: $t did not run:" >&2
        tail -20 <<<"$out" >&2
        exit 1
    fi
    if ls "fuzz/artifacts/$t"/crash-* >/dev/null 2>&1; then
        echo "fuzz.sh: $t crashed; inputs in dataplane/core/fuzz/artifacts/$t" >&2
        exit 1
    fi
done
