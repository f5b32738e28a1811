#!/usr/bin/env bash
# Pack a built vaultconn binary as a krew archive and write the plugin manifest for it.
#   bash plugins/package.sh BINARY OUTDIR OS ARCH
# writes OUTDIR/kubectl-vaultconn_OS_ARCH.tar.gz (holding kubectl-vaultconn) and
# OUTDIR/vaultconn.yaml: plugins/vaultconn.yaml with that platform's uri and sha256 filled in
# (and the other platforms' entries as they are). RELEASE_BASE_URL: where archives are
# published, default the manifest's own.
set -euo pipefail
binary=${1:?binary}; out=${2:?outdir}; os=${3:?os}; arch=${4:?arch}
here=$(cd "$(dirname "$0")" && pwd)
version=$(sed -n 's/^  version: //p' "$here/vaultconn.yaml")
base=${RELEASE_BASE_URL:-https://github.com/OWNER/vaultconn/releases/download}
name="kubectl-vaultconn_${os}_${arch}.tar.gz"
mkdir -p "$out"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp "$binary" "$stage/kubectl-vaultconn"
chmod 0755 "$stage/kubectl-vaultconn"
# Reproducible: fixed owner, mode and time, so the same binary gives the same sha256.
tar --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$stage" -czf "$out/$name" kubectl-vaultconn
sum=$(sha256sum "$out/$name" | cut -d' ' -f1)
awk -v os="$os" -v arch="$arch" -v uri="$base/$version/$name" -v sum="$sum" '
  /^ *os: /   { cur_os = $2 }
  /^ *arch: / { cur_arch = $2 }
  /^ *uri: /    && cur_os == os && cur_arch == arch { sub(/uri: .*/, "uri: " uri) }
  /^ *sha256: / && cur_os == os && cur_arch == arch { sub(/sha256: .*/, "sha256: \"" sum "\""); found = 1 }
  { print }
  END { if (!found) { print "no platform " os "/" arch " in the manifest" > "/dev/stderr"; exit 1 } }
' "$here/vaultconn.yaml" > "$out/vaultconn.yaml"
echo "$out/$name $sum"
