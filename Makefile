# The two commands of the README: `make run` and `make test`.
.PHONY: run test crd bench

# Run the operator against the cluster kubectl would use ($KUBECONFIG, ~/.kube/config, in-cluster).
# With none configured it starts a local control plane first (Ctrl-C stops both); only then are
# the control-plane binaries provisioned.
run:
	@if [ -z "$$KUBECONFIG" ] && [ ! -f "$$HOME/.kube/config" ] && [ -z "$$KUBERNETES_SERVICE_HOST" ]; then \
		bash scripts/provision-control-plane.sh >/dev/null; \
	fi
	cargo run --release -- run --allow-http-loopback

# The whole test suite: unit tests and the cluster tests against a real control plane.
test:
	bash scripts/provision-control-plane.sh >/dev/null
	bash scripts/install-oidc-provider.sh
	bash scripts/install-helm.sh >/dev/null
	cargo test --workspace --all-targets --no-run
	bash scripts/loopback-only.sh cargo test --workspace --all-targets

# Regenerate the committed CRD from the Rust types.
crd:
	cargo run -q -p vaultconn -- crd > crds/vaultconnections.vaultconn.dev.yaml
	cp crds/vaultconnections.vaultconn.dev.yaml charts/vaultconn/crds/

bench:
	bash scripts/bench.sh
