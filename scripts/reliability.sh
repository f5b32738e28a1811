#!/usr/bin/env bash
# Regenerates docs/RELIABILITY.md from a run of the reliability suites.
#
# Every test that survives a fault class records what it injected, how and how many times
# (vaultconn_testkit::reliability::record) when VAULTCONN_RELIABILITY_DIR is set, and every test
# binary's exit leak scan records what it scanned and found. The table is rendered from those
# records plus the rows other suites keep in docs/reliability-*.md. A failing test stops the
# script before anything is written.
#
#   bash scripts/reliability.sh                 # the suites below (~15 min on 2 cores)
#   RELIABILITY_SUITES="badinput" bash scripts/reliability.sh   # plus more test binaries
set -euo pipefail
cd "$(dirname "$0")/.."

# Every test binary that records facts, and the ones whose leak scan the table reports too.
mapfile -t recording < <(grep -l 'reliability::{' tests/*.rs | xargs -n1 basename | sed 's/\.rs$//')
suites=("${recording[@]}" oauth connections metrics ${RELIABILITY_SUITES:-})
mapfile -t suites < <(printf '%s\n' "${suites[@]}" | sort -u)

results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT
export VAULTCONN_RELIABILITY_DIR="$results"

args=()
for s in "${suites[@]}"; do args+=(--test "$s"); done
echo "reliability: running ${suites[*]}" >&2
started=$(date +%s)
cargo test -p vaultconn "${args[@]}" --no-run
bash scripts/loopback-only.sh cargo test -p vaultconn "${args[@]}"
minutes=$(( ($(date +%s) - started + 59) / 60 ))

changes=""
git diff --quiet HEAD -- src crates tests 2>/dev/null || changes=" with local changes"
run="$(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD)${changes}, $(nproc) CPUs, ${minutes} min, suites: ${suites[*]}"
cargo run -q -p vaultconn-testkit --bin reliability-table -- "$results" docs "$run"
