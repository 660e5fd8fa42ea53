# syntax=docker/dockerfile:1
#
# One image, three programs: `worker` (the default entrypoint), `loadgen` and the `logstore` CLI.
#
#   docker build -t logstore .
#   docker run --rm logstore --help            # worker flags
#   docker run --rm --entrypoint loadgen logstore --help
#   docker run --rm --entrypoint logstore logstore --help
#
# The build stage uses BuildKit cache mounts (the default builder since Docker 23 and in
# Docker Compose v2), so a rebuild after a source change reuses the downloaded crates and the
# compiled dependencies instead of a cargo-chef style "manifests first" layer dance.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# `--locked`: the image is built from exactly the dependency versions the tests ran with.
# target/ lives in a cache mount, which is not part of the image, so the binaries are copied
# out of it in the same step. The release profile keeps line-table debug info for local
# profiling; the image drops it (70 MB -> 11 MB for the worker) but keeps the symbols, so
# backtraces still name functions.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin worker --bin loadgen --bin logstore \
 && mkdir -p /out \
 && strip --strip-debug -o /out/worker target/release/worker \
 && strip --strip-debug -o /out/loadgen target/release/loadgen \
 && strip --strip-debug -o /out/logstore target/release/logstore

# ---------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates: for TLS to NATS or Postgres when a URL asks for it. Nothing else is needed:
# the worker embeds its SQL migrations, and the compose healthcheck probes /readyz with bash's
# /dev/tcp, so the image carries no curl or wget.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin logstore
COPY --from=build /out/worker /out/loadgen /out/logstore /usr/local/bin/
USER logstore:logstore
# Prometheus metrics, /healthz and /readyz (METRICS_ADDR, default 0.0.0.0:2112).
EXPOSE 2112
# The worker exits 0 after a graceful drain on SIGTERM (what `docker stop` sends).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/worker"]
