#!/usr/bin/env bash
# The scale benchmark in one command: builds both binaries in release mode, provisions the local
# control plane binaries if needed, runs `vaultconn-bench` with the given flags and prints its
# Markdown table (also written to target/bench/report.md; operator logs beside it).
#
#   bash scripts/bench.sh                 # full default sizes (~20–30 min on 2 cores)
#   bash scripts/bench.sh --smoke         # CI size (about a minute once built)
#   bash scripts/bench.sh --n 2000 --only cold,latency
#
# Exit status: 0 all invariants held, 1 an invariant failed (a connection did not converge,
# writes while idle or on restart, an expired token seen, concurrent refreshes), 2 harness error.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/provision-control-plane.sh >/dev/null
cargo build --release -p vaultconn -p vaultconn-bench --bins >&2
target_dir="${CARGO_TARGET_DIR:-target}"
# Loopback only, kept by the kernel (scripts/loopback-only.sh).
exec bash scripts/loopback-only.sh "$target_dir/release/vaultconn-bench" --operator-binary "$target_dir/release/vaultconn" "$@"
