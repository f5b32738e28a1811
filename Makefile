# The two commands of the README: `make run` and `make test`.
.PHONY: run test crd bench

# Run the operator. Without KUBECONFIG it starts a local control plane first (Ctrl-C stops both).
run:
	bash scripts/provision-control-plane.sh >/dev/null
	cargo run --release -- run --allow-http-loopback

# The whole test suite: unit tests and the cluster tests against a real control plane.
test:
	bash scripts/provision-control-plane.sh >/dev/null
	bash scripts/install-oidc-provider.sh
	bash scripts/install-helm.sh >/dev/null
	cargo test --workspace --all-targets

# Regenerate the committed CRD from the Rust types.
crd:
	cargo run -q -p vaultconn -- crd > crds/vaultconnections.vaultconn.dev.yaml
	cp crds/vaultconnections.vaultconn.dev.yaml charts/vaultconn/crds/

bench:
	bash scripts/bench.sh
