#!/usr/bin/env bash
# Provision the binaries of the local Kubernetes control plane used by tests and `make run`.
#
# Prints the folder holding etcd, kube-apiserver and kube-controller-manager (envtest layout).
# - If KUBEBUILDER_ASSETS names a folder that already has etcd and kube-apiserver, that folder is used.
# - Otherwise kube-apiserver and kube-controller-manager v1.20.2 are built once from Debian's
#   `kubernetes` source package (the only source of them this machine can reach) and cached under
#   ${VAULTCONN_CACHE:-~/.cache/vaultconn}/k8s-<version>; etcd comes from Debian's etcd-server.
# All progress goes to stderr; stdout is only the folder path.
set -euo pipefail

K8S_VERSION=v1.20.2
CACHE_ROOT="${VAULTCONN_CACHE:-$HOME/.cache/vaultconn}"
OUT="$CACHE_ROOT/k8s-$K8S_VERSION"

log() { echo "provision: $*" >&2; }

if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/etcd" && -x "$KUBEBUILDER_ASSETS/kube-apiserver" ]]; then
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

if [[ -x "$OUT/kube-apiserver" && -x "$OUT/kube-controller-manager" && -x "$OUT/etcd" ]]; then
  echo "$OUT"
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

apt_ready=0
apt_install() {
  if [[ $apt_ready -eq 0 ]]; then
    # Source entries are needed for `apt-get source kubernetes`.
    if ! grep -rqs "deb-src" /etc/apt/sources.list.d/ /etc/apt/sources.list; then
      log "adding deb-src entries"
      $SUDO tee /etc/apt/sources.list.d/vaultconn-src.sources >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    $SUDO apt-get update -qq >&2
    apt_ready=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >&2
}

if [[ ! -x /usr/bin/etcd ]]; then
  log "installing etcd-server"
  apt_install etcd-server
fi

mkdir -p "$OUT"
# One build at a time per machine (two test binaries may start at once).
exec 9>"$CACHE_ROOT/.build.lock"
flock 9
if [[ -x "$OUT/kube-apiserver" && -x "$OUT/kube-controller-manager" ]]; then
  ln -sf /usr/bin/etcd "$OUT/etcd"
  echo "$OUT"
  exit 0
fi

log "building kube-apiserver and kube-controller-manager $K8S_VERSION from Debian source (~4 min, once per machine)"
apt_install golang-1.19 rsync jq golang-github-modern-go-reflect2-dev dpkg-dev

BUILD="$CACHE_ROOT/build-$K8S_VERSION"
rm -rf "$BUILD"
mkdir -p "$BUILD"
cd "$BUILD"
apt-get source --download-only kubernetes >&2
tar xzf kubernetes_*.orig.tar.gz
SRC_DIR=$(find . -maxdepth 1 -mindepth 1 -type d | head -n1)
cd "$SRC_DIR"

# The vendored reflect2 v1.0.1 crashes under Go >= 1.18 (fault in aeshashbody under load); use Debian's v1.0.2.
rm -f vendor/github.com/modern-go/reflect2/*.go vendor/github.com/modern-go/reflect2/*.s
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go vendor/github.com/modern-go/reflect2/
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s vendor/github.com/modern-go/reflect2/ 2>/dev/null || true

export PATH=/usr/lib/go-1.19/bin:$PATH GOPATH=$PWD/.go CGO_ENABLED=0 GOFLAGS=-mod=vendor
mkdir -p .go/src/k8s.io
ln -sfn ../../.. .go/src/k8s.io/kubernetes
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2

cp _output/local/bin/linux/amd64/kube-apiserver _output/local/bin/linux/amd64/kube-controller-manager "$OUT/"
ln -sf /usr/bin/etcd "$OUT/etcd"
cd /
rm -rf "$BUILD"
log "cached in $OUT"
echo "$OUT"
