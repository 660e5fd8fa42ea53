#!/usr/bin/env bash
# scripts/nemesis.sh: a long run under a rotating nemesis, ending in a verdict table.
#
# Starts, from local binaries on free loopback ports in a temp dir (no Docker):
#   - a NATS cluster of NEMESIS_NATS_NODES [3] nodes with JetStream (the workers get
#     JS_REPLICAS=3: stream, consumers and KV buckets on every node), each with its own store dir;
#   - 2 shards, each a PostgreSQL primary with a synchronous standby (pg_basebackup -R), named in
#     one multi-host URL (`pg1=postgres://postgres@127.0.0.1:A,127.0.0.1:B/logstore?target_session_attrs=read-write`);
#   - a spare PostgreSQL (pg3) for `worker shards add` / `remove`;
#   - 3 workers (INTAKE=jetstream, JS_PARTITIONS=8).
# Then loadgen --jetstream --verify sends NEMESIS_APPENDS appends at a fixed NEMESIS_RATE over
# NEMESIS_OBJECTS objects, and every NEMESIS_INTERVAL seconds the nemesis injects the next fault
# of this rotation (each kind rotates over its targets), logging each with its time:
#   shards-add     `worker shards add pg3=…` (the objects the new ring gives pg3 move there)
#   worker-kill    SIGKILL of a worker, restarted at once
#   nats-kill      SIGKILL of a NATS node, restarted NEMESIS_NATS_DOWN [5] s later on its store dir
#   shards-remove  `worker shards remove pg3` (once the last ring change is done)
#   pg-failover    SIGKILL of a shard's primary (the whole server: a lost machine), its standby
#                  promoted (pg_ctl promote); a new standby is then seeded from the new primary
#                  on the old port, so the URL stays valid and the next failover works
#   pg-sigstop     SIGSTOP of a shard's primary for NEMESIS_STOP_SECONDS [5] s, then SIGCONT
# A sampler reads every worker's /metrics every 200 ms (stored appends per shard) and its VmRSS
# every 10 s. At the end: loadgen's --verify, an SQL check of every object on every shard (seqs
# gapless 1..n, no key twice, ts never going back along seq, head rows, tombstones, no object
# live on two shards), a Markdown table, and JSON in bench/results/<UTC>-nemesis.json. Exit 1 if
# anything was lost, doubled or reordered (or any check failed), 0 otherwise.
#
# Synchronous replication while a shard has no standby: as Patroni does in synchronous_mode
# (not strict), the promoted primary runs with synchronous_standby_names = '' (commits do not
# wait for a standby that does not exist), and only once the re-seeded standby is streaming is
# it set to '*' again (every commit waits for it). During that window an acknowledged append
# has one copy; the nemesis never fails over a shard whose standby is not synchronous again.
#
# Rate: fixed, not max. A stall is time in which the stored counters do not grow although load
# is offered; at max rate a 2-core machine is saturated, so scheduling noise and the catch-up
# burst after each fault blur that. The default 2,000/s makes the default 10,000,000 appends a
# run of about 85 minutes with ~280 faults; a machine that cannot keep up shows it as stalls.
#
# Knobs (env): NEMESIS_APPENDS [10000000], NEMESIS_RATE [2000], NEMESIS_OBJECTS [1000],
# NEMESIS_INTERVAL [18], NEMESIS_NATS_NODES [3; 1 when the workers do not take JS_REPLICAS],
# NEMESIS_NATS_DOWN [5], NEMESIS_STOP_SECONDS [5], NEMESIS_KEEP=1 (keep the temp dir: logs),
# NEMESIS_FAULTS [all six, in the order above] (the rotation: a space-separated subset, to
# hammer one kind), NEMESIS_WORKER_LOG [warn] (the workers' RUST_LOG; to follow every JetStream
# delivery through them: warn,worker::origin=trace,worker::intake=debug),
# BIN_DIR=DIR (use DIR's worker and loadgen, build nothing; else `cargo build --release`).
# Smoke run (every fault kind at least once, ~3 minutes):
#   NEMESIS_APPENDS=150000 NEMESIS_RATE=1000 NEMESIS_INTERVAL=15 scripts/nemesis.sh
# Most functions here run through a trap, wait_for/retry or the fault rotation's name lookup,
# which shellcheck cannot follow:
# shellcheck disable=SC2317
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
. scripts/lib/packages.sh
. scripts/lib/nats.sh
. scripts/lib/proc.sh
. scripts/lib/pg.sh
. scripts/lib/nemesis-sampler.sh
. scripts/lib/nemesis-report.sh

APPENDS=${NEMESIS_APPENDS:-10000000}
RATE=${NEMESIS_RATE:-2000}
OBJECTS=${NEMESIS_OBJECTS:-1000}
INTERVAL=${NEMESIS_INTERVAL:-18}
NATS_DOWN=${NEMESIS_NATS_DOWN:-5}
STOP_SECONDS=${NEMESIS_STOP_SECONDS:-5}
ALL_FAULTS="shards-add worker-kill nats-kill shards-remove pg-failover pg-sigstop"
read -ra kinds <<<"${NEMESIS_FAULTS:-$ALL_FAULTS}"
WORKER_LOG=${NEMESIS_WORKER_LOG:-warn}
WORKERS=3
PARTITIONS=8
SHARDS=(pg1 pg2)
SPARE=pg3

log() { echo "nemesis: $*" >&2; }
die() { log "$*"; exit 1; }
for knob in APPENDS RATE OBJECTS INTERVAL NATS_DOWN STOP_SECONDS; do
  [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || die "NEMESIS_$knob must be a positive whole number, got '${!knob}'"
done
[ "${#kinds[@]}" -gt 0 ] || die "NEMESIS_FAULTS names no fault kind (kinds: $ALL_FAULTS)"
for kind in "${kinds[@]}"; do
  [[ " $ALL_FAULTS " == *" $kind "* ]] || die "NEMESIS_FAULTS: unknown fault kind '$kind' (kinds: $ALL_FAULTS)"
done
[[ $WORKER_LOG =~ ^[A-Za-z0-9_:=,.-]+$ ]] || die "NEMESIS_WORKER_LOG must be a RUST_LOG filter without spaces, got '$WORKER_LOG'"

# ---------------------------------------------------------------- binaries and packages
missing=()
find_pg_bindir "${PG_TOOLS[@]}" >/dev/null || missing+=(postgresql)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
install_packages "${missing[@]}"
nats_bin=$(ensure_nats_server) || die "no nats-server $NATS_SERVER_MIN or newer (see scripts/lib/nats.sh)"
if [ -n "${BIN_DIR:-}" ]; then
  bin=$(cd "$BIN_DIR" && pwd) || die "BIN_DIR=$BIN_DIR is not a directory"
  log "using the binaries in $bin (BIN_DIR: nothing is built)"
else
  log "building release binaries"
  cargo build --release --locked --bins -q
  bin=$root/target/release
fi
for b in worker loadgen; do [ -x "$bin/$b" ] || die "$bin has no $b binary"; done
# Workers that take JS_REPLICAS run on the 3-node cluster with R3; older ones would put every
# stream and bucket on one node, whose loss stops the fleet: then one node unless told otherwise.
replicas_ok=0
worker_help=$("$bin/worker" --help 2>&1 || true)
[[ $worker_help == *JS_REPLICAS* ]] && replicas_ok=1
NATS_NODES=${NEMESIS_NATS_NODES:-$([ "$replicas_ok" = 1 ] && echo 3 || echo 1)}
[[ $NATS_NODES =~ ^[1-5]$ ]] || die "NEMESIS_NATS_NODES must be 1 to 5, got '$NATS_NODES'"
JS_REPLICAS=1
if [ "$replicas_ok" = 1 ]; then
  JS_REPLICAS=$((NATS_NODES < 3 ? NATS_NODES : 3))
else
  log "these workers do not take JS_REPLICAS: the stream and buckets have one copy ($NATS_NODES NATS node(s))"
fi

# ---------------------------------------------------------------- bookkeeping and cleanup
tmp=$(mktemp -d /tmp/logstore-nemesis.XXXXXX)
chmod 755 "$tmp"
mkdir -p "$tmp/pids"
: >"$tmp/faults.jsonl"
: >"$tmp/reseed.jsonl"
# Every process started here has its PID in $tmp/pids/<name>.pid (re-seed jobs rewrite their
# server's file), so the cleanup finds each one, whoever started it.
pid_of() { cat "$tmp/pids/$1.pid" 2>/dev/null || true; }
pids_like() { local f; for f in "$tmp"/pids/$1.pid; do [ -e "$f" ] && cat "$f"; done; return 0; }
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  touch "$tmp/sampler.stop"
  # Re-seed jobs first (they start servers), then the clients, the workers, NATS, Postgres.
  # SIGINT: loadgen and the workers finish cleanly, nats-server too, Postgres does a fast shutdown.
  # shellcheck disable=SC2046 # one PID a word
  stop_all TERM 5 $(pids_like 'reseed*')
  # shellcheck disable=SC2046
  stop_all TERM 3 $(pids_like sampler)
  # shellcheck disable=SC2046
  stop_all INT 10 $(pids_like loadgen)
  # shellcheck disable=SC2046
  stop_all INT 25 $(pids_like 'w*')
  # shellcheck disable=SC2046
  stop_all INT 10 $(pids_like 'nats*')
  # shellcheck disable=SC2046
  stop_all INT 20 $(pids_like 'pg*')
  if [ "${NEMESIS_KEEP:-0}" = 1 ]; then log "kept $tmp (logs, samples, faults)"; else rm -rf "$tmp"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
pg_setup "$tmp" || die "PostgreSQL binaries not found"

now_ms() { date +%s%3N; }
ms_s() { printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }
clock() { date -u -d "@$(ms_s "${1:-$(now_ms)}")" +%H:%M:%S.%3N; } # clock [MS]: UTC time of day

# ---------------------------------------------------------------- NATS
mapfile -t ports < <(free_ports $((NATS_NODES * 3 + WORKERS + 5)))
nats_port=("${ports[@]:0:NATS_NODES}")
nats_http=("${ports[@]:NATS_NODES:NATS_NODES}")
nats_route=("${ports[@]:$((NATS_NODES * 2)):NATS_NODES}")
worker_port=("${ports[@]:$((NATS_NODES * 3)):WORKERS}")
pg_ports=("${ports[@]:$((NATS_NODES * 3 + WORKERS))}")
routes=$(printf 'nats-route://127.0.0.1:%s,' "${nats_route[@]}")
for ((i = 1; i <= NATS_NODES; i++)); do
  {
    echo "server_name: n$i"
    echo "listen: 127.0.0.1:${nats_port[i - 1]}"
    echo "http: 127.0.0.1:${nats_http[i - 1]}"
    echo "jetstream { store_dir: \"$tmp/nats$i\" }"
    if [ "$NATS_NODES" -gt 1 ]; then
      echo "cluster { name: nemesis, listen: 127.0.0.1:${nats_route[i - 1]}, routes: [${routes%,}] }"
    fi
  } >"$tmp/nats$i.conf"
done
start_nats() { # start_nats I: node I on its config (its ports and store dir)
  "$nats_bin" -c "$tmp/nats$1.conf" >>"$tmp/nats$1.log" 2>&1 &
  echo $! >"$tmp/pids/nats$1.pid"
  disown # its SIGKILL is the point: no "Killed" line from bash
}
nats_healthy() { http_ok "http://127.0.0.1:${nats_http[$1 - 1]}/healthz"; }
# NATS_URL naming every node, node I first (clients spread over the nodes, and reconnect to any).
nats_url_from() {
  local i url="" n
  for ((i = 0; i < NATS_NODES; i++)); do
    n=$(((i + $1 - 1) % NATS_NODES))
    url+="nats://127.0.0.1:${nats_port[n]},"
  done
  echo "${url%,}"
}
for ((i = 1; i <= NATS_NODES; i++)); do start_nats "$i"; done
for ((i = 1; i <= NATS_NODES; i++)); do wait_for 60 nats_healthy "$i" || die "NATS node $i is not healthy: $(tail -5 "$tmp/nats$i.log")"; done
log "NATS: $NATS_NODES node(s) on ${nats_port[*]}, nats-server $(nats_server_version "$nats_bin"), JS_REPLICAS=$JS_REPLICAS"

# ---------------------------------------------------------------- PostgreSQL
# Shard k's two servers are nodes a and b (ports pg_ports[2k-2], pg_ports[2k-1]); which one is
# the primary now is in $tmp/pgK.primary, its standby's state (sync, async, failed) in
# $tmp/pgK.standby. The spare is pg3 on the fifth port.
pg_port() { # pg_port SHARD NODE
  local k=${1#pg}
  case $2 in a) echo "${pg_ports[2 * k - 2]}" ;; b) echo "${pg_ports[2 * k - 1]}" ;; *) echo "${pg_ports[4]}" ;; esac
}
other() { [ "$1" = a ] && echo b || echo a; }
start_pg() { # start_pg NAME PORT: server NAME (data dir $tmp/NAME) on PORT, PID file pids/NAME.pid
  pg_start "$tmp/$1" "$2" "$tmp/$1.log"
  echo "$PG_PID" >"$tmp/pids/$1.pid"
  disown
  wait_for 60 pg_ready "$2" || { log "postgres $1 on :$2 did not start: $(tail -5 "$tmp/$1.log")"; return 1; }
}
# make_sync PORT: every commit on the primary on PORT waits for its standby, once that one
# streams (as Patroni's synchronous_mode turns synchronous again).
make_sync() {
  wait_for 120 pg_has_streaming "$1" || return 1
  pg_sync_names "$1" '*' && wait_for 60 pg_has_sync "$1"
}
shard_url() { # the multi-host URL of a shard: both servers, node a first, whichever takes writes
  echo "postgres://postgres@127.0.0.1:$(pg_port "$1" a),127.0.0.1:$(pg_port "$1" b)/logstore?target_session_attrs=read-write"
}
pg_initdb "$tmp/pg-template"
for shard in "${SHARDS[@]}" "$SPARE"; do
  first=a
  [ "$shard" = "$SPARE" ] && first=s
  "${AS_PG[@]}" cp -a "$tmp/pg-template" "$tmp/$shard$first"
  start_pg "$shard$first" "$(pg_port "$shard" "$first")" || die "cannot start $shard"
  psql_on "$(pg_port "$shard" "$first")" -c 'CREATE DATABASE logstore'
done
for shard in "${SHARDS[@]}"; do
  pg_base_backup "$(pg_port "$shard" a)" "$tmp/${shard}b" "$tmp/${shard}b.log" || die "pg_basebackup for $shard failed"
  start_pg "${shard}b" "$(pg_port "$shard" b)" || die "cannot start $shard's standby"
  make_sync "$(pg_port "$shard" a)" || die "$shard's standby did not become synchronous"
  echo a >"$tmp/$shard.primary"
  echo sync >"$tmp/$shard.standby"
done
spare_url="postgres://postgres@127.0.0.1:$(pg_port "$SPARE" s)/logstore"
shards_env="pg1=$(shard_url pg1),pg2=$(shard_url pg2)"
log "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $NF}'): pg1 on :${pg_ports[0]},:${pg_ports[1]}, pg2 on :${pg_ports[2]},:${pg_ports[3]} (primary first, synchronous standby second), spare $SPARE on :${pg_ports[4]}"

# ---------------------------------------------------------------- workers
worker_env() { # worker_env I: the environment of worker I (and of `worker shards`)
  echo "NATS_URL=$(nats_url_from "$1")" INTAKE=jetstream "JS_PARTITIONS=$PARTITIONS" "JS_REPLICAS=$JS_REPLICAS" \
    "POSTGRES_SHARDS=$shards_env" "RUST_LOG=$WORKER_LOG"
}
start_worker() { # start_worker I: worker I (1-based) on its metrics port
  local env
  read -ra env <<<"$(worker_env "$1")"
  env "${env[@]}" METRICS_ADDR="127.0.0.1:${worker_port[$1 - 1]}" "$bin/worker" >>"$tmp/w$1.log" 2>&1 &
  echo $! >"$tmp/pids/w$1.pid"
  disown
}
worker_ready() { http_ok "http://127.0.0.1:${worker_port[$1 - 1]}/readyz"; }
# readyz_says I: what worker I's /readyz answers (what is not ready), on one line.
readyz_says() {
  python3 - "http://127.0.0.1:${worker_port[$1 - 1]}/readyz" <<'PY'
import sys, urllib.error, urllib.request
try:
    body = urllib.request.urlopen(sys.argv[1], timeout=2).read()
except urllib.error.HTTPError as e:
    body = e.read()
except Exception as e:
    body = str(e).encode()
print(" ".join(body.decode(errors="replace").split())[:300].replace('"', "'"))
PY
}
shards_cmd() { # shards_cmd ARGS...: `worker shards ARGS` with the fleet's settings, within 120 s
  local env
  read -ra env <<<"$(worker_env 1)"
  env "${env[@]}" timeout 120 "$bin/worker" shards "$@" >>"$tmp/shards.log" 2>&1
}
partitions_held() {
  python3 - "$PARTITIONS" "${worker_port[@]}" <<'PY'
import re, sys, urllib.request
held = sum(float(m) for port in sys.argv[2:] for m in re.findall(
    r'^logstore_jetstream_partitions_held (\S+)$',
    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode(), re.M))
sys.exit(0 if held >= int(sys.argv[1]) else 1)
PY
}
for ((i = 1; i <= WORKERS; i++)); do start_worker "$i"; done
for ((i = 1; i <= WORKERS; i++)); do wait_for 120 worker_ready "$i" || die "worker $i is not ready: $(tail -5 "$tmp/w$i.log")"; done
wait_for 60 partitions_held || die "the workers do not pull all $PARTITIONS partitions"
log "workers: $WORKERS on ${worker_port[*]} (metrics), $PARTITIONS partitions pulled"

# ---------------------------------------------------------------- the run's settings
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit+="+dirty"; fi
python3 - "$tmp/params.json" <<EOF
import json, os, platform, sys
json.dump({"appends": $APPENDS, "rate": $RATE, "objects": $OBJECTS, "interval": $INTERVAL,
           "nats_nodes": $NATS_NODES, "js_replicas": $JS_REPLICAS, "workers": $WORKERS,
           "partitions": $PARTITIONS, "shards": ["pg1", "pg2"], "spare": "$SPARE", "nats_down_s": $NATS_DOWN, "stop_s": $STOP_SECONDS, "sample_ms": 200,
           "faults": "${kinds[*]}".split(), "worker_log": "$WORKER_LOG", "commit": "$commit", "started_utc": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
           "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                       "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}},
          open(sys.argv[1], "w"), indent=1)
EOF

# ---------------------------------------------------------------- faults
fault_no=0
# fault KIND TARGET T_MS OK NOTE: logs a fault (started at T_MS, done now) and records it.
fault() {
  local done_ms note=${5//\\/\\\\}
  note=${note//\"/\\\"} # as a JSON string
  done_ms=$(now_ms)
  fault_no=$((fault_no + 1))
  printf '{"n":%d,"kind":"%s","target":"%s","t":%s,"t_done":%s,"ok":%s,"note":"%s"}\n' "$fault_no" "$1" "$2" \
    "$(ms_s "$3")" "$(ms_s "$done_ms")" "$4" "$note" >>"$tmp/faults.jsonl"
  log "$(clock "$3") +$(ms_s $(($3 - load_ms)))s fault $fault_no: $1 $2: $5$([ "$4" = true ] || echo ' (FAILED)')"
}
took() { ms_s $(($(now_ms) - $1)); }

count_worker=0
fault_worker_kill() {
  local i=$((count_worker % WORKERS + 1)) pid t ok=true
  count_worker=$((count_worker + 1))
  pid=$(pid_of "w$i")
  t=$(now_ms)
  kill -KILL "$pid" 2>/dev/null || true
  wait_gone 10 "$pid" || ok=false
  start_worker "$i"
  local ready="ready after"
  wait_for 60 worker_ready "$i" || { ok=false; ready="/readyz: $(readyz_says "$i"); not ready after"; }
  fault worker-kill "w$i" "$t" "$ok" "SIGKILL pid $pid, restarted as $(pid_of "w$i"), $ready $(took "$t") s"
}

count_nats=0
fault_nats_kill() {
  local i=$((count_nats % NATS_NODES + 1)) pid t ok=true
  count_nats=$((count_nats + 1))
  pid=$(pid_of "nats$i")
  t=$(now_ms)
  kill -KILL "$pid" 2>/dev/null || true
  wait_gone 10 "$pid" || ok=false
  sleep "$NATS_DOWN"
  start_nats "$i"
  wait_for 120 nats_healthy "$i" || ok=false
  fault nats-kill "n$i" "$t" "$ok" "SIGKILL, restarted after ${NATS_DOWN} s on its store dir, healthy after $(took "$t") s"
}

# reseed SHARD NODE: (a background job) a new standby on NODE's port, a base backup of the
# shard's new primary, then synchronous replication again.
reseed() {
  local shard=$1 node=$2 t primary_port ok=true
  trap - EXIT INT TERM
  t=$(now_ms)
  primary_port=$(pg_port "$shard" "$(other "$node")")
  rm -rf "${tmp:?}/$shard$node"
  if pg_base_backup "$primary_port" "$tmp/$shard$node" "$tmp/$shard$node.log" &&
    start_pg "$shard$node" "$(pg_port "$shard" "$node")" && make_sync "$primary_port"; then
    echo sync >"$tmp/$shard.standby"
  else
    ok=false
    echo failed >"$tmp/$shard.standby"
  fi
  printf '{"shard":"%s","t":%s,"t_sync":%s,"ok":%s}\n' "$shard" "$(ms_s "$t")" "$(ms_s "$(now_ms)")" "$ok" >>"$tmp/reseed.jsonl"
  rm -f "$tmp/pids/reseed$shard.pid"
}

count_failover=0
fault_pg_failover() {
  local shard=pg$((count_failover % 2 + 1)) old new pid t ok=true
  count_failover=$((count_failover + 1))
  # Never fail over to nothing: wait for a re-seed still running on this shard.
  wait_for 600 grep -qx sync "$tmp/$shard.standby" || {
    fault pg-failover "$shard" "$(now_ms)" false "skipped: its standby is $(cat "$tmp/$shard.standby"), not synchronous"
    return 0
  }
  old=$(cat "$tmp/$shard.primary")
  new=$(other "$old")
  pid=$(pid_of "$shard$old")
  t=$(now_ms)
  signal_tree KILL "$pid"
  wait_gone 10 "$pid" || ok=false
  rm -f "$tmp/pids/$shard$old.pid"
  # The new primary commits without waiting for a standby until the re-seeded one streams.
  if pg_promote "$tmp/$shard$new" "$tmp/$shard$new.log" && pg_sync_names "$(pg_port "$shard" "$new")" ''; then
    echo "$new" >"$tmp/$shard.primary"
    echo async >"$tmp/$shard.standby"
    fault pg-failover "$shard" "$t" "$ok" "SIGKILL primary :$(pg_port "$shard" "$old"), standby :$(pg_port "$shard" "$new") promoted after $(took "$t") s"
    reseed "$shard" "$old" &
    echo $! >"$tmp/pids/reseed$shard.pid"
    disown
  else
    echo failed >"$tmp/$shard.standby"
    fault pg-failover "$shard" "$t" false "promotion of :$(pg_port "$shard" "$new") failed: $(tail -1 "$tmp/$shard$new.log")"
  fi
}

count_stop=0
fault_pg_sigstop() {
  local shard=pg$(((count_stop + 1) % 2 + 1)) node pids t
  count_stop=$((count_stop + 1))
  node=$(cat "$tmp/$shard.primary")
  mapfile -t pids < <(tree_of "$(pid_of "$shard$node")")
  t=$(now_ms)
  kill -STOP "${pids[@]}"
  sleep "$STOP_SECONDS"
  kill -CONT "${pids[@]}" 2>/dev/null || true
  fault pg-sigstop "$shard" "$t" true "primary :$(pg_port "$shard" "$node") (${#pids[@]} processes) stopped for $STOP_SECONDS s"
}

spare_member=0
# retry SECONDS COMMAND...: COMMAND until it succeeds, every 2 s, for at most SECONDS.
retry() { local deadline=$((SECONDS + $1)); shift; until "$@"; do [ "$SECONDS" -lt "$deadline" ] || return 1; sleep 2; done; }
# One ring change at a time (a second is refused): wait until the last one, its move and its
# MOVE_GRACE_MS (30 s) are over. The fault's time starts after this wait.
ring_steady() { retry 180 shards_cmd status || log "the ring is still changing after 180 s"; }
fault_shards_add() {
  local t
  ring_steady
  t=$(now_ms)
  if retry 60 shards_cmd add "$SPARE=$spare_url"; then
    spare_member=1
    fault shards-add "$SPARE" "$t" true "move started after $(took "$t") s"
  else
    fault shards-add "$SPARE" "$t" false "refused: $(tail -1 "$tmp/shards.log")"
  fi
}
fault_shards_remove() {
  local t
  [ "$spare_member" = 1 ] || { fault shards-remove "$SPARE" "$(now_ms)" false "skipped: $SPARE was not added"; return 0; }
  ring_steady
  t=$(now_ms)
  if retry 60 shards_cmd remove "$SPARE"; then
    spare_member=0
    fault shards-remove "$SPARE" "$t" true "move started after $(took "$t") s"
  else
    fault shards-remove "$SPARE" "$t" false "refused: $(tail -1 "$tmp/shards.log")"
  fi
}

# ---------------------------------------------------------------- the run
nemesis_sampler "$tmp" 200 10 "${worker_port[@]}" &
echo $! >"$tmp/pids/sampler.pid"
NATS_URL=$(nats_url_from 1) "$bin/loadgen" --jetstream --rate "$RATE" --count "$APPENDS" --objects "$OBJECTS" \
  --log-size 100 --in-flight 1024 --retries 100 --verify --verify-timeout 900 --progress-secs 30 \
  --report "$tmp/loadgen.json" >"$tmp/loadgen.out" 2>&1 &
loadgen_pid=$!
echo "$loadgen_pid" >"$tmp/pids/loadgen.pid"
load_ms=$(now_ms)
send_end_ms=$((load_ms + APPENDS * 1000 / RATE))
log "$(clock) load: $APPENDS appends at $RATE/s over $OBJECTS objects (about $((APPENDS / RATE)) s); a fault every $INTERVAL s"
# add and remove three faults apart: each must wait for the other's move and MOVE_GRACE_MS (30 s).
next_ms=$((load_ms + INTERVAL * 1000))
n=0
# A fault starts only while at least half an interval of sending is left, so its effect is
# measured under load.
while [ $((next_ms + INTERVAL * 500)) -lt "$send_end_ms" ]; do
  while [ "$(now_ms)" -lt "$next_ms" ] && alive "$loadgen_pid"; do sleep 0.2; done
  alive "$loadgen_pid" || break
  kind=${kinds[n % ${#kinds[@]}]}
  n=$((n + 1))
  "fault_${kind//-/_}"
  # The next fault on time, but at least half an interval after this one is over, so that each
  # fault's effect is measured on its own.
  next_ms=$((next_ms + INTERVAL * 1000))
  now=$(($(now_ms) + INTERVAL * 500))
  [ "$next_ms" -ge "$now" ] || next_ms=$now
done
log "$(clock) nemesis done ($fault_no faults); waiting for loadgen (its sending, then --verify)"

# ---------------------------------------------------------------- the end
# shellcheck disable=SC2046
wait_gone 900 $(pids_like 'reseed*') || log "a standby re-seed is still running"
loadgen_rc=0
wait "$loadgen_pid" || loadgen_rc=$?
echo "$loadgen_rc" >"$tmp/loadgen.rc"
touch "$tmp/sampler.stop"
wait "$(pid_of sampler)" || true
grep -E '^(appends|verify)' "$tmp/loadgen.out" | head -5 >&2 || true
[ "$loadgen_rc" = 0 ] || log "loadgen exited $loadgen_rc: $(tail -5 "$tmp/loadgen.out")"
ring_steady
# Every object on every shard database, on each shard's current primary (and the spare, if it
# ever held anything): storage invariants, and which objects each one holds.
sql_check() { # sql_check NAME PORT
  psql_on "$2" -d logstore -c "SELECT to_regclass('logs') IS NOT NULL" | grep -qx t || return 0
  echo "$1|$(psql_on "$2" -d logstore <<'SQL'
WITH per AS (SELECT object_id, count(*) AS n, min(seq) AS lo, max(seq) AS hi FROM logs GROUP BY object_id)
SELECT (SELECT count(*) FROM per WHERE lo <> 1 OR hi <> n)
    || '|' || (SELECT count(*) FROM (SELECT 1 FROM logs WHERE key IS NOT NULL GROUP BY object_id, key HAVING count(*) > 1) d)
    || '|' || (SELECT count(DISTINCT object_id) FROM (SELECT object_id, ts < lag(ts) OVER (PARTITION BY object_id ORDER BY seq) AS back FROM logs) b WHERE back)
    || '|' || (SELECT count(*) FROM objects o LEFT JOIN per ON per.object_id = o.id
               WHERE o.moved_to IS NULL AND (o.entries <> coalesce(per.n, 0) OR o.last_seq <> coalesce(per.hi, 0)))
    || '|' || (SELECT count(*) FROM objects o JOIN per ON per.object_id = o.id WHERE o.moved_to IS NOT NULL)
    || '|' || (SELECT count(*) FROM logs) || '|' || (SELECT count(*) FROM per);
SQL
)" >>"$tmp/sql.txt"
  psql_on "$2" -d logstore -c 'SELECT DISTINCT object_id FROM logs' >"$tmp/live.$1.txt"
}
: >"$tmp/sql.txt"
for shard in "${SHARDS[@]}"; do sql_check "$shard" "$(pg_port "$shard" "$(cat "$tmp/$shard.primary")")"; done
sql_check "$SPARE" "$(pg_port "$SPARE" s)"
mkdir -p "$root/bench/results"
report_rc=0
nemesis_report "$tmp" "$root/bench/results/$(date -u +%Y%m%dT%H%M%SZ)-nemesis.json" || report_rc=$?
exit "$report_rc"
