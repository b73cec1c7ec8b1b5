# agentid: a static (musl) binary on a distroless base, running as non-root.
#   docker build -t agentid .
#   docker buildx build --platform linux/amd64,linux/arm64 -t agentid .   (arm64 builds under emulation)
# It cannot be built on the development machine (no Docker engine there); the release workflow builds it.

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --locked --release --target "$(uname -m)-unknown-linux-musl" --bin agentid \
 && cp "target/$(uname -m)-unknown-linux-musl/release/agentid" /agentid

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /agentid /agentid
USER 65532:65532
EXPOSE 8080 9443
ENTRYPOINT ["/agentid"]
CMD ["run"]
