# larder: ETS/DETS-style tables over HTTP/JSON.
#
# Build:  docker build -t larder .
# Run:    docker run -p 8080:8080 -v larder-data:/data \
#           -e LARDER_TOKENS='admin:change-me-please,app:change-me-too' larder
#
# The container listens on 0.0.0.0:8080, so larder requires tokens: set
# LARDER_TOKENS, or mount a tokens file and set LARDER_TOKENS_FILE. Without
# them it refuses to start (LARDER_ALLOW_INSECURE_PUBLIC=true overrides that,
# for a trusted network only).

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
# A workspace member: cargo reads its manifest even when building the server
# alone (nothing of it is compiled into the image).
COPY bench ./bench
RUN cargo build --release --locked --bin larder

FROM debian:bookworm-slim
# The system's roots, for https:// origins (--origin-ca adds to them). The
# version follows the base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 larder \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --shell /usr/sbin/nologin larder \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=build /src/target/release/larder /usr/local/bin/larder
USER 10001:10001
# Probes and scrapers use the admin listener (no token; /healthz, /readyz
# and /metrics only), and so does the HEALTHCHECK below.
ENV LARDER_LISTEN=0.0.0.0:8080 \
    LARDER_ADMIN_LISTEN=0.0.0.0:9090 \
    LARDER_DATA_DIR=/data \
    LARDER_LOG_FORMAT=json \
    LARDER_ACCESS_LOG=true
VOLUME ["/data"]
EXPOSE 8080 9090
# SIGTERM is a graceful stop: finish requests, write every dirty object, fsync.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/larder", "--healthcheck"]
ENTRYPOINT ["/usr/local/bin/larder"]
