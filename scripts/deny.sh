#!/usr/bin/env bash
# The dependency check (deny.toml; docs/props.md): licenses, bans and sources with cargo-deny,
# offline; then the RustSec advisories, whose database is fetched from GitHub.
#
#   bash scripts/deny.sh        installs cargo-deny when missing (`cargo install --locked
#                               cargo-deny`: about 11 minutes on a 2-core machine), checks all
#   bash scripts/deny.sh --ci   what .ci/run does: never installs; says so when it is missing
set -euo pipefail
cd "$(dirname "$0")/.."

ci=false
[ "${1:-}" = "--ci" ] && ci=true
# In CI only errors are printed (duplicate versions other than the banned ones are warnings).
level=warn
$ci && level=error

if ! cargo deny --version >/dev/null 2>&1; then
  if $ci; then
    echo "DENY: cargo-deny is not installed on this machine: skipped licenses, bans, sources and advisories (bash scripts/deny.sh installs it and runs them)"
    exit 0
  fi
  cargo install --locked cargo-deny
fi

cargo deny --offline --log-level "$level" check --hide-inclusion-graph licenses bans sources

out=$(mktemp)
trap 'rm -f "$out"' EXIT
if cargo deny check advisories >"$out" 2>&1; then
  tail -n 1 "$out"
elif grep -q "failed to fetch advisory database" "$out"; then
  echo "DENY: advisory database unreachable: skipped advisories (run \`cargo deny check advisories\` where GitHub is reachable)"
else
  cat "$out"
  exit 1
fi
