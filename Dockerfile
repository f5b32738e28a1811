# Static binary on a distroless base (CA certificates included, non-root).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --no-default-features --bin vaultconn

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/vaultconn /usr/local/bin/vaultconn
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/vaultconn", "run"]
