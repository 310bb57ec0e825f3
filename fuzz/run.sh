#!/usr/bin/env bash
# Fuzzes every parser that takes outside bytes (cargo-fuzz, libFuzzer, nightly).
#   bash fuzz/run.sh              # CI: a few seconds per target
#   bash fuzz/run.sh 1800         # seconds per target
#   FUZZ_RUNS=10000000 bash fuzz/run.sh 7200   # the campaign: 10^7 executions per target,
#                                              # at most 7200 s each (README "Fuzzing")
# FUZZ_TARGETS="wav text" limits the run to those targets.
# Seeds are in fuzz/seeds (made by hand from our own fixtures); what libFuzzer adds goes to
# fuzz/corpus (git-ignored). A crash leaves its input in fuzz/artifacts and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
read -r -a targets <<< "${FUZZ_TARGETS:-audiosocket_frames wav sidecar control_request config_toml rules_toml manifest_json text}"
runs_arg=()
if [ -n "${FUZZ_RUNS:-}" ]; then runs_arg=(-runs="$FUZZ_RUNS"); fi
# -s none: the code under test is safe Rust (its unsafe blocks are FFI elsewhere), so the
# campaign hunts panics and broken invariants; no sanitizer keeps the build and runs fast.
cargo +nightly fuzz build -s none
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    started=$(date +%s)
    out=$(cargo +nightly fuzz run -s none "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" "${runs_arg[@]}" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 2>&1) || {
        echo "$out" | tail -n 40
        echo "fuzz: target $t FAILED (input saved under fuzz/artifacts/$t)" >&2
        exit 1
    }
    runs=$(echo "$out" | sed -n 's/^stat::number_of_executed_units: *//p' | tail -n 1)
    echo "fuzz: $t: ${runs:-?} executions in $(( $(date +%s) - started )) s, no crash"
done
