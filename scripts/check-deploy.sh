#!/usr/bin/env bash
# Checks the deployment files without a Docker engine: `scripts/check-deploy.sh`.
#
# - Parses docker-compose.yaml and docker-compose.test.yaml, each alone and with the override
#   docker-compose.ha.yaml (NATS as a 3-node cluster), with a real compose implementation:
#   Debian's Python `docker-compose` (its `config` needs no engine), and also the Docker
#   Compose v2 plugin (`docker compose config`) when one is installed. As root on Debian it
#   installs `docker-compose` when missing; otherwise it says what to install and fails.
# - Checks a few promises of the topology on the parsed result (3 worker replicas, no host port
#   for the workers' metrics, workers start after healthy dependencies and the one-shot
#   `migrate` service, as the least-privileged login with its password from a compose secret
#   (PostgreSQL nodes create that login on first start), loadgen in the test file,
#   Prometheus's rule files mounted next to its config, Grafana on 3000 with anonymous viewing
#   and its provisioning mounted, NATS started with deploy/nats/nats-server.conf and the users'
#   password secrets; with the HA override: three NATS servers on deploy/nats/cluster.conf, each
#   with its own name and store, routed to each other, only one on a host port, and workers
#   that know all three, wait for them and ask for JS_REPLICAS=3), and that every panel of the
#   Grafana dashboards has PromQL on the provisioned Prometheus data source.
# - Checks deploy/nats/nats-server.conf and cluster.conf with `nats-server -t` (through
#   run-nats.sh, as compose starts them) when a nats-server is at hand (LOGSTORE_NATS_SERVER,
#   which scripts/test.sh sets, or PATH); worker/tests/nats_cluster.rs runs cluster.conf.
# - Checks deploy/prometheus/prometheus.yml (and the alert rules it loads) with `promtool check
#   config`, runs the rules' unit tests (`promtool test rules deploy/prometheus/alerts_test.yml`)
#   and checks that every alert has a test case where it fires. promtool is in Debian's
#   `prometheus` package (installed as root when missing).
# - Syntax-checks the shell scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/packages.sh

compose_files=(docker-compose.yaml docker-compose.test.yaml)
# Checked on top of each of them too (rendered as <file>.ha).
ha_override=docker-compose.ha.yaml

# The parser only: install_packages skips recommends, so no Docker engine comes along.
command -v docker-compose >/dev/null 2>&1 || install_packages docker-compose

# Placeholders for the variables the files interpolate, so the check never depends on the
# caller's environment (an exported QUERIES_MIN=abc must not decide the verdict).
export NATS_PORT=4222 PROMETHEUS_PORT=9090 GRAFANA_PORT=3000 RUST_LOG=info LOG_FORMAT=text QUERIES_MIN=600 LOADGEN_DURATION=600

rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT

for file in "${compose_files[@]}"; do
  echo "==> docker-compose -f $file config"
  # `config` validates against the compose schema, resolves `extends` and interpolation, and
  # prints the merged result, which the checks below read.
  docker-compose -f "$file" config >"$rendered/$file"
  echo "==> docker-compose -f $file -f $ha_override config"
  docker-compose -f "$file" -f "$ha_override" config >"$rendered/$file.ha"
  if docker compose version >/dev/null 2>&1; then
    echo "==> docker compose -f $file [-f $ha_override] config (Compose v2)"
    docker compose -f "$file" config -q
    docker compose -f "$file" -f "$ha_override" config -q
  fi
done

echo "==> topology checks"
python3 - "$rendered" <<'EOF'
import glob, json, os, sys, yaml

rendered = sys.argv[1]
problems = []
with open("deploy/prometheus/prometheus.yml") as f:
    rule_files = yaml.safe_load(f).get("rule_files") or []

def load(name):
    with open(f"{rendered}/{name}") as f:
        return yaml.safe_load(f)["services"]

for name in ("docker-compose.yaml", "docker-compose.test.yaml"):
    services = load(name)
    want = {"nats", "postgres1", "postgres2", "worker", "prometheus", "grafana"}
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
    # NATS requires logins: the shipped configuration, its three passwords as secrets; the workers
    # log in as `worker` with theirs.
    nats = services["nats"]
    if "/etc/nats/run-nats.sh" not in " ".join(nats.get("entrypoint") or []):
        problems.append(f"{name}: nats must start through deploy/nats/run-nats.sh")
    nats_secrets = {s if isinstance(s, str) else s.get("source") for s in nats.get("secrets") or []}
    if nats_secrets != {"nats_worker_password", "nats_admin_password", "nats_client_password"}:
        problems.append(f"{name}: nats must get the secrets nats_worker_password, nats_admin_password and nats_client_password, has {sorted(nats_secrets)}")
    wenv = worker.get("environment") or {}
    if wenv.get("NATS_USER") != "worker" or wenv.get("NATS_PASSWORD_FILE") != "/run/secrets/nats_worker_password":
        problems.append(f"{name}: the workers must log in as NATS_USER=worker with NATS_PASSWORD_FILE=/run/secrets/nats_worker_password")
    shards = worker.get("environment", {}).get("POSTGRES_SHARDS", "")
    for host in ("postgres1", "postgres2"):
        if f"@{host}:" not in shards:
            problems.append(f"{name}: POSTGRES_SHARDS does not name {host}")
    # Least privilege: the workers log in as logstore_worker (no password in the URL; it comes
    # from a secret file), after the one-shot migrate service has run as the owner, and every
    # PostgreSQL node creates that login on its first start.
    def secret_names(service):
        return {s if isinstance(s, str) else s.get("source") for s in service.get("secrets") or []}
    for part in shards.split(","):
        url = part.partition("=")[2]
        if not url.startswith("postgres://logstore_worker@"):
            problems.append(f"{name}: worker shard {part.partition('=')[0]} must log in as logstore_worker@ without a password in the URL")
    if worker.get("environment", {}).get("POSTGRES_PASSWORD_FILE") != "/run/secrets/postgres_worker_password" \
            or "postgres_worker_password" not in secret_names(worker):
        problems.append(f"{name}: worker must read POSTGRES_PASSWORD_FILE from the secret postgres_worker_password")
    if (deps.get("migrate") or {}).get("condition") != "service_completed_successfully":
        problems.append(f"{name}: worker must wait for the migrate service to complete successfully")
    migrate = services.get("migrate") or {}
    if migrate.get("command") != ["migrate", "--grant"] or "postgres_owner_password" not in secret_names(migrate):
        problems.append(f"{name}: the migrate service must run `worker migrate --grant` with the secret postgres_owner_password")
    for pg in ("postgres1", "postgres2"):
        mounts = [str(v) for v in services[pg].get("volumes") or []]
        if not any("deploy/postgres/worker-login.sh:/docker-entrypoint-initdb.d/" in m for m in mounts):
            problems.append(f"{name}: {pg} must run deploy/postgres/worker-login.sh on its first start")
        if "postgres_worker_password" not in secret_names(services[pg]):
            problems.append(f"{name}: {pg} needs the secret postgres_worker_password for worker-login.sh")
    # Prometheus reads its rule files relative to its config (/etc/prometheus): each one named in
    # prometheus.yml must be mounted there, or the container starts without its alerts.
    mounts = {}
    for volume in services["prometheus"].get("volumes") or []:
        source, _, rest = str(volume).partition(":")
        mounts[rest.split(":")[0]] = source
    for rule_file in rule_files:
        source = mounts.get(f"/etc/prometheus/{rule_file}", "")
        if not source.endswith(f"deploy/prometheus/{rule_file}"):
            problems.append(f"{name}: prometheus does not mount deploy/prometheus/{rule_file} at /etc/prometheus/{rule_file}")
    # Grafana: port 3000 published, anonymous viewing, provisioning and dashboards mounted
    # where the provisioning files and the home-dashboard setting expect them.
    grafana = services["grafana"]
    if not str(grafana.get("image", "")).startswith("grafana/grafana"):
        problems.append(f"{name}: grafana must run the grafana/grafana image")
    targets = [p.get("target") if isinstance(p, dict) else str(p).rsplit(":", 1)[-1]
               for p in grafana.get("ports") or []]
    if 3000 not in targets and "3000" not in targets:
        problems.append(f"{name}: grafana does not publish port 3000")
    env = grafana.get("environment") or {}
    if str(env.get("GF_AUTH_ANONYMOUS_ENABLED")).lower() != "true" or env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") != "Viewer":
        problems.append(f"{name}: grafana must allow anonymous Viewer access")
    mounts = {}
    for volume in grafana.get("volumes") or []:
        source, _, rest = str(volume).partition(":")
        mounts[rest.split(":")[0]] = source
    for target, source in (("/etc/grafana/provisioning", "deploy/grafana/provisioning"),
                           ("/etc/grafana/dashboards", "deploy/grafana/dashboards")):
        if not mounts.get(target, "").endswith(source):
            problems.append(f"{name}: grafana does not mount {source} at {target}")
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", "")
    if not home.startswith("/etc/grafana/dashboards/") or not os.path.isfile(
            "deploy/grafana/dashboards/" + home.removeprefix("/etc/grafana/dashboards/")):
        problems.append(f"{name}: the home dashboard {home!r} is not a file of deploy/grafana/dashboards")

# The HA override: three NATS servers on cluster.conf, routed to each other, and workers that use
# them all with three copies of everything.
with open("deploy/nats/cluster.conf") as f:
    cluster_conf = f.read()
if "include ./nats-server.conf" not in cluster_conf:
    problems.append("deploy/nats/cluster.conf must include nats-server.conf (its accounts and users)")
for name in ("docker-compose.yaml", "docker-compose.test.yaml"):
    services = load(name + ".ha")
    label = f"{name} + docker-compose.ha.yaml"
    nodes = ("nats", "nats2", "nats3")
    missing = [n for n in nodes if n not in services]
    if missing:
        problems.append(f"{label}: missing NATS servers {missing}")
        continue
    names, stores = set(), set()
    for node in nodes:
        svc = services[node]
        env = svc.get("environment") or {}
        if "/etc/nats/run-nats.sh" not in " ".join(svc.get("entrypoint") or []):
            problems.append(f"{label}: {node} must start through deploy/nats/run-nats.sh")
        if env.get("NATS_CONF") != "/etc/nats/cluster.conf":
            problems.append(f"{label}: {node} must run NATS_CONF=/etc/nats/cluster.conf")
        names.add(env.get("NATS_SERVER_NAME"))
        if f"nats-route://{node}:6222" not in cluster_conf:
            problems.append(f"deploy/nats/cluster.conf: no route to {node}:6222")
        if "healthcheck" not in svc:
            problems.append(f"{label}: {node} has no healthcheck")
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in svc.get("volumes") or []}
        stores.add(mounts.get("/data"))
        if not mounts.get("/etc/nats", "").endswith("deploy/nats"):
            problems.append(f"{label}: {node} must mount deploy/nats at /etc/nats")
        secrets = {s if isinstance(s, str) else s.get("source") for s in svc.get("secrets") or []}
        if secrets != {"nats_worker_password", "nats_admin_password", "nats_client_password"}:
            problems.append(f"{label}: {node} must get the three NATS password secrets")
        if node != "nats" and svc.get("ports"):
            problems.append(f"{label}: {node} publishes host ports {svc['ports']} (only nats does)")
    if None in names or len(names) != len(nodes):
        problems.append(f"{label}: each NATS server needs its own NATS_SERVER_NAME, got {sorted(map(str, names))}")
    if None in stores or len(stores) != len(nodes):
        problems.append(f"{label}: each NATS server needs its own store volume at /data, got {sorted(map(str, stores))}")
    worker = services["worker"]
    wenv = worker.get("environment") or {}
    urls = str(wenv.get("NATS_URL", "")).split(",")
    if sorted(urls) != sorted(f"nats://{n}:4222" for n in nodes):
        problems.append(f"{label}: the workers' NATS_URL must name nats, nats2 and nats3, is {wenv.get('NATS_URL')!r}")
    if str(wenv.get("JS_REPLICAS")) != "3":
        problems.append(f"{label}: the workers must run JS_REPLICAS=3")
    deps = worker.get("depends_on") or {}
    for node in nodes:
        if (deps.get(node) or {}).get("condition") != "service_healthy":
            problems.append(f"{label}: worker must depend on {node} being healthy")

# The provisioned data source points at the compose Prometheus with its scrape interval, and
# every dashboard panel queries it by its uid with PromQL (worker/tests/deploy.rs runs them).
with open("deploy/grafana/provisioning/datasources/prometheus.yaml") as f:
    sources = yaml.safe_load(f)["datasources"]
with open("deploy/prometheus/prometheus.yml") as f:
    scrape_interval = yaml.safe_load(f)["global"]["scrape_interval"]
uids = {d["uid"] for d in sources if d.get("type") == "prometheus"}
for d in sources:
    if d.get("url") != "http://prometheus:9090":
        problems.append(f"data source {d.get('name')}: url must be http://prometheus:9090")
    if (d.get("jsonData") or {}).get("timeInterval") != scrape_interval:
        problems.append(f"data source {d.get('name')}: jsonData.timeInterval must equal Prometheus's scrape_interval {scrape_interval}")
dashboards = sorted(glob.glob("deploy/grafana/dashboards/*.json"))
if not dashboards:
    problems.append("no dashboard in deploy/grafana/dashboards")
for path in dashboards:
    with open(path) as f:
        dashboard = json.load(f)
    ids = set()
    panels = list(dashboard.get("panels", []))
    for panel in panels:
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels inside
        if panel.get("type") == "row":
            continue
        title = panel.get("title", "?")
        if panel.get("id") in ids:
            problems.append(f"{path}: panel id {panel.get('id')} used twice")
        ids.add(panel.get("id"))
        targets = panel.get("targets") or []
        if not targets or not all(t.get("expr", "").strip() for t in targets):
            problems.append(f"{path}: panel {title!r} has a target without PromQL")
        for item in [panel] + targets:
            uid = (item.get("datasource") or {}).get("uid")
            if uid not in uids:
                problems.append(f"{path}: panel {title!r} uses data source uid {uid!r}, provisioned: {sorted(uids)}")

for p in problems:
    print(f"  FAIL {p}")
if problems:
    sys.exit(1)
print("  ok")
EOF

# promtool comes with Debian's `prometheus` package (as root: installed when missing).
command -v promtool >/dev/null 2>&1 || install_packages prometheus
echo "==> promtool check config deploy/prometheus/prometheus.yml (and its rule files)"
promtool check config deploy/prometheus/prometheus.yml
echo "==> promtool test rules deploy/prometheus/alerts_test.yml"
promtool test rules deploy/prometheus/alerts_test.yml
echo "==> every alert rule has a unit test where it fires"
python3 - <<'EOF'
import sys, yaml

with open("deploy/prometheus/alerts.yml") as f:
    rules = {r["alert"] for g in yaml.safe_load(f)["groups"] for r in g["rules"] if "alert" in r}
with open("deploy/prometheus/alerts_test.yml") as f:
    tests = yaml.safe_load(f)["tests"]
# A case that only expects silence would also pass for a rule that can never fire.
firing = {
    t["alertname"]
    for case in tests
    for t in case.get("alert_rule_test", [])
    if t.get("exp_alerts")
}
untested = sorted(rules - firing)
if untested:
    print(f"  FAIL no firing test case for: {untested}")
    sys.exit(1)
print(f"  ok ({len(rules)} rules)")
EOF

# The NATS configurations as run-nats.sh hands them to the server, with throw-away passwords.
nats_server=${LOGSTORE_NATS_SERVER:-$(command -v nats-server || true)}
if [ -n "$nats_server" ] && [ -x "$nats_server" ]; then
  for conf in nats-server.conf cluster.conf; do
    echo "==> nats-server -t -c deploy/nats/$conf (through run-nats.sh)"
    for user in worker admin client; do
      printf 'check-%s\n' "$user" >"$rendered/$user.password"
    done
    NATS_WORKER_PASSWORD_FILE="$rendered/worker.password" \
      NATS_ADMIN_PASSWORD_FILE="$rendered/admin.password" \
      NATS_CLIENT_PASSWORD_FILE="$rendered/client.password" \
      NATS_CONF="$PWD/deploy/nats/$conf" NATS_SERVER_NAME=check NATS_SERVER_BIN="$nats_server" \
      sh deploy/nats/run-nats.sh -t -js -sd "$rendered/store"
  done
else
  echo "==> nats-server -t: skipped (no nats-server; scripts/test.sh installs one into LOGSTORE_NATS_SERVER)"
fi

echo "==> bash -n scripts/*.sh scripts/lib/*.sh; sh -n deploy/nats/run-nats.sh"
for script in scripts/*.sh scripts/lib/*.sh; do
  bash -n "$script"
done
# Run by the nats image's busybox sh: POSIX sh, not bash.
sh -n deploy/nats/run-nats.sh

echo "deploy files: ok"
