#!/usr/bin/env bash
# The cargo-fuzz targets of the parsers (fuzz/; docs/props.md). Needs the nightly toolchain and
# cargo-fuzz (`cargo install --locked cargo-fuzz`, about 70 s here).
#
#   bash scripts/fuzz.sh                    every target, 60 s each
#   bash scripts/fuzz.sh manifest 600       one target, 10 minutes
#   bash scripts/fuzz.sh --ci               what .ci/run does: every target, FUZZ_SECONDS (5)
#                                           each, the build bounded by FUZZ_BUILD_SECONDS (300)
#
# New corpus entries go to a temporary directory; the committed seeds (fuzz/seeds/<target>) are
# only read. A crash leaves its input in fuzz/artifacts/<target>/: copy it into
# fuzz/seeds/<target>/ so the unit tests (fuzz_seeds_pass_the_checks) replay it from then on.
# Exit status: 0 all ran clean, 1 a target crashed, 3 the build did not finish in time (--ci).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

all=(token_response retry_after time state_data manifest url_policy)
ci=false
if [ "${1:-}" = "--ci" ]; then
  ci=true
  shift
fi
targets=("${1:-}")
[ -z "${targets[0]}" ] && targets=("${all[@]}")
seconds=${2:-${FUZZ_SECONDS:-$($ci && echo 5 || echo 60)}}

# One build directory per machine, kept between runs: the first build takes minutes (the
# product's whole dependency tree with coverage instrumentation), later ones seconds.
export CARGO_TARGET_DIR="${VAULTCONN_FUZZ_TARGET:-$HOME/.cache/vaultconn/fuzz-target}"
mkdir -p "$CARGO_TARGET_DIR"
# No sanitizer: the product forbids unsafe code; what is fuzzed are its assertions (panics).
flags=(--sanitizer none)

started=$(date +%s)
if $ci; then
  if ! timeout "${FUZZ_BUILD_SECONDS:-300}" cargo +nightly fuzz build "${flags[@]}" >/dev/null 2>&1; then
    echo "FUZZ: the fuzz targets did not build within ${FUZZ_BUILD_SECONDS:-300}s (cold cache at $CARGO_TARGET_DIR?)"
    exit 3
  fi
else
  cargo +nightly fuzz build "${flags[@]}"
fi
echo "fuzz build: $(( $(date +%s) - started ))s"

status=0
for t in "${targets[@]}"; do
  work=$(mktemp -d)
  log=$(mktemp)
  if cargo +nightly fuzz run "${flags[@]}" "$t" "$work" "$PWD/seeds/$t" -- \
      -max_total_time="$seconds" -max_len=8192 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | awk '{print $2}')
    echo "fuzz $t: ${runs:-?} runs in ${seconds}s, no crash"
  else
    status=1
    tail -n 40 "$log"
    echo "fuzz $t: CRASHED; the input is in fuzz/artifacts/$t/ (replay: cargo +nightly fuzz run ${flags[*]} $t fuzz/artifacts/$t/<file>)"
  fi
  rm -rf "$work" "$log"
done
exit $status
