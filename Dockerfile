# syntax=docker/dockerfile:1
# The operator image: a release build of `vaultconn` without the default `local-cluster` feature
# (no control plane inside a Pod), on distroless: glibc and CA certificates (token endpoints are
# verified against the system roots), no shell, no package manager, non-root.
#
#   docker build -t REGISTRY/vaultconn:VERSION .
#
# tests/chart.rs checks that every `cargo build` here uses the flags of the build CI compiles
# (`--no-default-features`, the vaultconn package only).

ARG RUST_VERSION=1.89

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer: only the manifests and the lock file, with empty
# stand-ins for the sources (cargo needs every workspace member's manifest and a target to
# build). This layer is rebuilt only when a manifest or Cargo.lock changes, not on a source edit.
# (Hand-rolled rather than cargo-chef: one more tool to fetch for five lines.)
COPY Cargo.toml Cargo.lock ./
COPY crates/local-cluster/Cargo.toml crates/local-cluster/Cargo.toml
COPY crates/testkit/Cargo.toml crates/testkit/Cargo.toml
COPY crates/bench/Cargo.toml crates/bench/Cargo.toml
RUN mkdir -p src crates/local-cluster/src crates/testkit/src crates/bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > crates/bench/src/main.rs \
 && touch src/lib.rs crates/local-cluster/src/lib.rs crates/testkit/src/lib.rs \
 && cargo build --release --locked --no-default-features -p vaultconn --bin vaultconn

# The product's sources. `touch`: COPY keeps the context's mtimes, which may be older than the
# stand-ins just built, and cargo would then keep the empty binary.
COPY src src
RUN touch src/lib.rs src/main.rs \
 && cargo build --release --locked --no-default-features -p vaultconn --bin vaultconn \
 && cp target/release/vaultconn /vaultconn

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /vaultconn /usr/local/bin/vaultconn
# distroless' "nonroot" user, numeric so that runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/vaultconn"]
CMD ["run"]
