#!/usr/bin/env bash
# Run a command in a network namespace of its own whose only interface is loopback, so that
# nothing it starts can reach any other address: not a private network, not cloud metadata, not
# a DNS server. The tests promise to send traffic only to 127.0.0.0/8 and ::1; this makes the
# kernel keep that promise even when the code under test is broken (a token-URL policy that
# let 10.1.2.3 through would get "network unreachable", never a packet on the wire).
#
#   bash scripts/loopback-only.sh cargo test --workspace --all-targets
#
# Needs root or unprivileged user namespaces (then `unshare --map-root-user`). Where neither
# works it says so on stderr in one line and runs the command unconfined; VAULTCONN_LOOPBACK_ONLY=require
# makes that an error instead. Everything that needs the network (crates, npm, the control-plane
# build) must be fetched before: inside, cargo runs offline.
set -euo pipefail
[[ $# -gt 0 ]] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }

inner='ip link set lo up 2>/dev/null || ifconfig lo up 2>/dev/null || { echo "loopback-only: cannot bring lo up" >&2; exit 1; }; exec "$@"'
for flags in "--net" "--net --map-root-user"; do
  # shellcheck disable=SC2086
  if unshare $flags true 2>/dev/null; then
    echo "loopback-only: running in a network namespace with loopback only (unshare $flags)" >&2
    # shellcheck disable=SC2086
    exec env CARGO_NET_OFFLINE=true unshare $flags bash -c "$inner" loopback-only "$@"
  fi
done
if [[ "${VAULTCONN_LOOPBACK_ONLY:-}" == require ]]; then
  echo "loopback-only: no network namespace available (unshare failed) and VAULTCONN_LOOPBACK_ONLY=require" >&2
  exit 1
fi
echo "loopback-only: NOT CONFINED: no network namespace available here (needs root or user namespaces); running the command with the host's network" >&2
exec "$@"
