#!/usr/bin/env bash
# Checks the deployment files without a Docker engine: `scripts/check-deploy.sh`.
#
# - Parses docker-compose.yaml and docker-compose.test.yaml with a real compose implementation:
#   Debian's Python `docker-compose` (its `config` needs no engine), and also the Docker
#   Compose v2 plugin (`docker compose config`) when one is installed. As root on Debian it
#   installs `docker-compose` when missing; otherwise it says what to install and fails.
# - Checks a few promises of the topology on the parsed result (3 worker replicas, no host port
#   for the workers' metrics, workers start after healthy dependencies, loadgen in the test file).
# - Checks deploy/prometheus/prometheus.yml with `promtool check config` when promtool exists
#   (Debian package `prometheus`).
# - Syntax-checks the shell scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/packages.sh

compose_files=(docker-compose.yaml docker-compose.test.yaml)

# The parser only: install_packages skips recommends, so no Docker engine comes along.
command -v docker-compose >/dev/null 2>&1 || install_packages docker-compose

# Placeholders for the variables the files interpolate, so the check never depends on the
# caller's environment (an exported QUERIES_MIN=abc must not decide the verdict).
export NATS_PORT=4222 PROMETHEUS_PORT=9090 RUST_LOG=info LOG_FORMAT=text QUERIES_MIN=600 LOADGEN_DURATION=600

rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT

for file in "${compose_files[@]}"; do
  echo "==> docker-compose -f $file config"
  # `config` validates against the compose schema, resolves `extends` and interpolation, and
  # prints the merged result, which the checks below read.
  docker-compose -f "$file" config >"$rendered/$file"
  if docker compose version >/dev/null 2>&1; then
    echo "==> docker compose -f $file config (Compose v2)"
    docker compose -f "$file" config -q
  fi
done

echo "==> topology checks"
python3 - "$rendered" <<'EOF'
import sys, yaml

rendered = sys.argv[1]
problems = []

def load(name):
    with open(f"{rendered}/{name}") as f:
        return yaml.safe_load(f)["services"]

for name in ("docker-compose.yaml", "docker-compose.test.yaml"):
    services = load(name)
    want = {"nats", "postgres1", "postgres2", "worker", "prometheus"}
    if name == "docker-compose.test.yaml":
        want.add("loadgen")
    missing = want - set(services)
    if missing:
        problems.append(f"{name}: missing services {sorted(missing)}")
        continue
    worker = services["worker"]
    if worker.get("ports"):
        problems.append(f"{name}: worker publishes host ports {worker['ports']} (replicas would clash)")
    if (worker.get("deploy") or {}).get("replicas") != 3:
        problems.append(f"{name}: worker must have deploy.replicas 3")
    deps = worker.get("depends_on") or {}
    for dep in ("nats", "postgres1", "postgres2"):
        if (deps.get(dep) or {}).get("condition") != "service_healthy":
            problems.append(f"{name}: worker must depend on {dep} being healthy")
    for svc in ("nats", "postgres1", "postgres2", "worker"):
        if "healthcheck" not in services[svc]:
            problems.append(f"{name}: {svc} has no healthcheck")
    shards = worker.get("environment", {}).get("POSTGRES_SHARDS", "")
    for host in ("postgres1", "postgres2"):
        if f"@{host}:" not in shards:
            problems.append(f"{name}: POSTGRES_SHARDS does not name {host}")

for p in problems:
    print(f"  FAIL {p}")
if problems:
    sys.exit(1)
print("  ok")
EOF

if command -v promtool >/dev/null 2>&1; then
  echo "==> promtool check config deploy/prometheus/prometheus.yml"
  promtool check config deploy/prometheus/prometheus.yml
else
  echo "==> promtool not found: skipping the Prometheus config check (apt-get install prometheus)"
fi

echo "==> bash -n scripts/*.sh scripts/lib/*.sh"
for script in scripts/*.sh scripts/lib/*.sh; do
  bash -n "$script"
done

echo "deploy files: ok"
