#!/usr/bin/env bash
# scripts/bench.sh: the benchmark, one command, local binaries, no Docker.
#
# In ONE run on this machine it starts nats-server and two PostgreSQL shards (default durability:
# fsync and synchronous_commit on), then measures:
#   (a) the ceiling: pgbench 1,000-row multi-row INSERTs into the same table, both shards at once;
#   (a') our own storage ceiling: pgbench calling logstore_append_at (the function the workers
#       call: the ring-epoch fence, then logstore_append) with 1,000-entry batches over the same objects, both shards at once, with (a)'s clients and
#       duration; (c)/(a') is what the pipeline costs, (a')/(a) what the storage design costs;
#   (b) the original's design: pgbench single-row autocommit INSERTs, both shards at once;
#   (c) end to end: loadgen at max rate through 2 workers, core and JetStream intake,
#       BENCH_APPENDS appends of 100-byte logs over 10,000 objects, with --verify, one append per
#       message and then BENCH_BATCH [100] per message (batch append); core request-reply
#       latency at half the single-append rate, for 30 s;
#   (d) queries: the first page of 100 from a BENCH_BIG_ENTRIES-entry object, and a whole read of it;
#   (e) the partitioned ordered JetStream intake (BENCH_PARTITIONS [8]) with BENCH_PART_WORKERS
#       ["1 2 3"] workers, single and batch appends as in (c);
#   (f) takeover: the time until every partition is pulled again when one of 2 partitioned
#       workers is SIGKILLed under a steady BENCH_TAKEOVER_RATE [2000] appends/s over
#       BENCH_TAKEOVER_OBJECTS [64] objects.
# It prints Markdown tables, checks the speed targets (BENCHMARKS.md lists them), and writes JSON to
# bench/results/<UTC time>.json.
#
# Knobs (env): BENCH_APPENDS [500000], BENCH_BIG_ENTRIES [1000000], BENCH_SECONDS [15] (pgbench
# duration each), BENCH_OBJECTS [10000], BENCH_IN_FLIGHT [512] and BENCH_JS_IN_FLIGHT [1024]
# (loadgen's outstanding messages at max rate, core and JetStream, one append each),
# BENCH_BATCH [100], BENCH_BATCH_IN_FLIGHT [64] and BENCH_JS_BATCH_IN_FLIGHT [64] (the batch
# rows: appends per message and outstanding messages), BENCH_CONNECTIONS [1] (loadgen's NATS
# connections, every row). BIN_DIR=DIR: use the worker and loadgen binaries in DIR and build
# nothing (no cargo, no registry: for a machine that only has the binaries).
# A quick smoke run:
#   BENCH_APPENDS=20000 BENCH_BIG_ENTRIES=50000 BENCH_SECONDS=3 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
. scripts/lib/packages.sh
. scripts/lib/nats.sh

APPENDS=${BENCH_APPENDS:-500000}
BIG=${BENCH_BIG_ENTRIES:-1000000}
SECONDS_EACH=${BENCH_SECONDS:-15}
OBJECTS=${BENCH_OBJECTS:-10000}
BATCH=${BENCH_BATCH:-100}
# (e) the partitioned ordered intake: JS_PARTITIONS for its rows (0: no such rows) and the
# worker counts to run them with.
PARTS=${BENCH_PARTITIONS:-8}
PART_WORKERS=${BENCH_PART_WORKERS:-1 2 3}
part_dbs() { [ "$PARTS" -gt 0 ] || return 0; for w in $PART_WORKERS; do echo "e2e_p${w}_single e2e_p${w}_batch"; done; echo e2e_takeover; }
# (f) takeover after a SIGKILL: the steady load it runs under.
TAKEOVER_RATE=${BENCH_TAKEOVER_RATE:-2000}
TAKEOVER_OBJECTS=${BENCH_TAKEOVER_OBJECTS:-64}
CONNECTIONS=${BENCH_CONNECTIONS:-1}
BIG_ID=4242

log() { echo "bench: $*" >&2; }
die() { log "$*"; exit 1; }

# ---------------------------------------------------------------- binaries and packages
missing=()
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
pg_bindir=""
for candidate in "$(command -v pg_config >/dev/null 2>&1 && pg_config --bindir)" /usr/lib/postgresql/*/bin; do
  if [ -n "$candidate" ] && [ -x "$candidate/initdb" ] && [ -x "$candidate/pgbench" ]; then pg_bindir=$candidate; fi
done
[ -n "$pg_bindir" ] || missing+=(postgresql postgresql-contrib)
command -v python3 >/dev/null 2>&1 || missing+=(python3) # ports, polling, /proc accounting, report
if [ "${#missing[@]}" -gt 0 ]; then
  install_packages "${missing[@]}"
  exec "$0" "$@" # find the freshly installed binaries
fi
# A nats-server 2.10.22+ when there is one (LOGSTORE_NATS_SERVER, the tests' cached 2.15.1, PATH);
# else whichever is installed (no crash happens here, so 2.9's redelivery bug does not matter).
nats_bin=$(find_nats_server 2>/dev/null || command -v nats-server || echo /usr/sbin/nats-server)
log "nats-server: $nats_bin ($(nats_server_version "$nats_bin"))"

if [ -n "${BIN_DIR:-}" ]; then
  bin=$(cd "$BIN_DIR" && pwd) || die "BIN_DIR=$BIN_DIR is not a directory"
  for b in worker loadgen; do [ -x "$bin/$b" ] || die "BIN_DIR=$BIN_DIR has no $b binary"; done
  log "using the binaries in $bin (BIN_DIR: nothing is built)"
else
  log "building release binaries"
  cargo build --release --locked --bins -q
  bin=$root/target/release
fi

# ---------------------------------------------------------------- servers
tmp=$(mktemp -d /tmp/logstore-bench.XXXXXX)
chmod 755 "$tmp"
[ "$(id -u)" = 0 ] && chown postgres "$tmp"  # initdb and postgres run as postgres and write here
pids=()
cleanup() {
  local pid
  # SIGINT: nats-server and the workers stop cleanly, postgres does a fast shutdown.
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Postgres refuses to run as root. setpriv execs in place (runuser would fork and stay the
# parent), so with a plain `&` the PID we record and later signal is postgres itself.
as_pg=()
[ "$(id -u)" = 0 ] && as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --)
http_ok() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "timed out waiting for $what"
    sleep 0.1
  done
}

nats_port=$(free_port)
"$nats_bin" -a 127.0.0.1 -p "$nats_port" -js -sd "$tmp/nats" -l "$tmp/nats.log" &
pids+=($!)
nats_url=nats://127.0.0.1:$nats_port

"${as_pg[@]}" "$pg_bindir/initdb" -D "$tmp/pg-template" -U postgres -A trust -E UTF8 --locale=C >/dev/null
pg_ports=()
for shard in 1 2; do
  port=$(free_port)
  cp -a "$tmp/pg-template" "$tmp/pg$shard"
  "${as_pg[@]}" "$pg_bindir/postgres" -D "$tmp/pg$shard" -p "$port" -k "$tmp" -c listen_addresses=127.0.0.1 \
    -c max_connections=200 -c shared_buffers=256MB >"$tmp/pg$shard.log" 2>&1 &
  pids+=($!)
  pg_ports+=("$port")
done
psql_on() { local port=$1; shift; "$pg_bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
for port in "${pg_ports[@]}"; do wait_for 30 "postgres on $port" psql_on "$port" -c 'SELECT 1'; done
wait_for 30 "nats-server" bash -c "exec 3<>/dev/tcp/127.0.0.1/$nats_port"
for port in "${pg_ports[@]}"; do
  for db in pgbench pgbench_fn e2e_core e2e_core_b e2e_js e2e_js_b $(part_dbs); do psql_on "$port" -c "CREATE DATABASE $db"; done
  # (a') gets a database of its own: (a)'s rows carry seqs from a global sequence, which would
  # collide with the per-object seqs logstore_append gives.
  for db in pgbench pgbench_fn; do
    for migration in "$root"/migrations/[0-9]*.sql; do psql_on "$port" -d "$db" -f "$migration"; done
    psql_on "$port" -d "$db" -c 'CREATE SEQUENCE bench_seq CACHE 1000'
  done
done

# ---------------------------------------------------------------- (a) and (b): pgbench
cat >"$tmp/batched.sql" <<'EOF'
INSERT INTO logs (object_id, seq, ts, key, log)
SELECT (random() * 9999)::bigint, nextval('bench_seq'), now(), md5(random()::text), repeat('x', 100)
FROM generate_series(1, 1000);
EOF
# (a'): the same rows through the workers' own function: 1,000 entries over the same 10,000
# objects, each with a unique key of (a)'s shape (md5 of a sequence value: unique, so every batch
# takes the fast path, as the workers' batches do), 100-byte logs, one timestamp.
cat >"$tmp/function.sql" <<'EOF'
SELECT count(*) FROM logstore_append_at(1, NULL,
  array(SELECT (random() * 9999)::bigint FROM generate_series(1, 1000)),
  array(SELECT md5(nextval('bench_seq')::text) FROM generate_series(1, 1000)),
  array_fill(repeat('x', 100), ARRAY[1000]),
  array_fill(now(), ARRAY[1000]), NULL);
EOF
cat >"$tmp/single.sql" <<'EOF'
INSERT INTO logs (object_id, seq, ts, key, log)
VALUES ((random() * 9999)::bigint, nextval('bench_seq'), now(), md5(random()::text), repeat('x', 100));
EOF
# Both shards at once, as the fleet uses them; rows/s summed.
pgbench_rows() { # pgbench_rows SCRIPT ROWS_PER_TX CLIENTS [DATABASE]
  local script=$1 per_tx=$2 clients=$3 db=${4:-pgbench} port out total=0
  for port in "${pg_ports[@]}"; do
    "$pg_bindir/pgbench" -h 127.0.0.1 -p "$port" -U postgres -n -f "$script" -c "$clients" -j "$clients" \
      -T "$SECONDS_EACH" "$db" >"$tmp/pgbench.$port.out" 2>&1 &
  done
  wait
  for port in "${pg_ports[@]}"; do
    out=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$tmp/pgbench.$port.out")
    [ -n "$out" ] || die "pgbench failed: $(cat "$tmp/pgbench.$port.out")"
    total=$(python3 -c "print($total + $out * $per_tx)")
  done
  printf '%.0f\n' "$total"
}
log "(a) pgbench: 1,000-row INSERTs, both shards"
ceiling=$(pgbench_rows "$tmp/batched.sql" 1000 2)
log "    $ceiling rows/s"
log "(a') pgbench: logstore_append_at with 1,000-entry batches, both shards"
fn_ceiling=$(pgbench_rows "$tmp/function.sql" 1000 2 pgbench_fn)
log "    $fn_ceiling entries/s"
log "(b) pgbench: single-row autocommit INSERTs, both shards"
single=$(pgbench_rows "$tmp/single.sql" 1 8)
log "    $single rows/s"
# The millions of rows pgbench wrote would otherwise be vacuumed, analyzed and checkpointed by
# the servers during the end-to-end phases, billing the system under test for the baseline's
# cleanup: drop them and start (c) from a checkpoint.
for port in "${pg_ports[@]}"; do
  psql_on "$port" -c 'DROP DATABASE pgbench' -c 'DROP DATABASE pgbench_fn' -c 'CHECKPOINT'
done

# ---------------------------------------------------------------- (c) end to end
# Every core phase runs before the first JetStream phase: once the workers' stream captures
# `logs`, a core request would be answered by the stream (loadgen then refuses to start). The
# JetStream phases share one stream (two streams cannot capture the same subject); it is a work
# queue, empty again when a phase has stored everything.
worker_pids=()
worker_ports=()
start_workers() { # start_workers INTAKE DB [WORKERS [JS_PARTITIONS]]
  local intake=$1 db=$2 count=${3:-2} partitions=${4:-0} port i
  worker_pids=(); worker_ports=()
  for ((i = 0; i < count; i++)); do
    port=$(free_port)
    NATS_URL=$nats_url INTAKE=$intake NATS_STREAM=BENCH_LOGS JS_PARTITIONS=$partitions \
    POSTGRES_SHARDS="pg1=postgres://postgres@127.0.0.1:${pg_ports[0]}/$db,pg2=postgres://postgres@127.0.0.1:${pg_ports[1]}/$db" \
    METRICS_ADDR=127.0.0.1:$port RUST_LOG=warn "$bin/worker" 2>>"$tmp/worker.log" &
    worker_pids+=($!); pids+=($!); worker_ports+=("$port")
  done
  for port in "${worker_ports[@]}"; do wait_for 60 "worker on $port" http_ok "http://127.0.0.1:$port/readyz"; done
}
stop_workers() {
  local pid
  for pid in "${worker_pids[@]}"; do kill -TERM "$pid"; done
  for pid in "${worker_pids[@]}"; do wait "$pid" || die "worker $pid exited non-zero"; done
}
# Peak RSS (MiB) of the running workers: the larger of the two.
worker_peak_rss() {
  local pid rss=0 r
  for pid in "${worker_pids[@]}"; do
    r=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    rss=$((r > rss ? r : rss))
  done
  echo "$((rss / 1024))"
}
loadgen_run() { # loadgen_run NAME ARGS... -> report in $tmp/NAME.json
  local name=$1; shift
  NATS_URL=$nats_url "$bin/loadgen" --connections "$CONNECTIONS" --report "$tmp/$name.json" "$@" \
    >"$tmp/$name.out" 2>&1 || die "loadgen $name failed: $(tail -20 "$tmp/$name.out")"
}
now() { date +%s.%N; }
# CPU seconds used so far by each kind of process, from /proc: diffed around the append phase
# of a run, it shows what the end-to-end number is bound by.
cat >"$tmp/cpu.py" <<'PY'
import glob, os
KINDS = ("postgres", "nats-server", "worker", "loadgen")
def snapshot():
    hz = os.sysconf("SC_CLK_TCK"); use = dict.fromkeys(KINDS, 0.0)
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = open(stat).read()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        if comm in use:
            fields = text[text.rindex(")") + 2:].split()
            # utime + stime, plus cutime + cstime: children that have exited (postgres backends
            # and autovacuum workers, reaped by the postmaster) still count.
            use[comm] += sum(int(f) for f in fields[11:15]) / hz
    return use
if __name__ == "__main__":
    import json; print(json.dumps(snapshot()))
PY
cpu_snapshot() { python3 "$tmp/cpu.py" >"$tmp/cpu.$1"; }
# Waits until the workers' metrics count APPENDS stored, then writes the time to $tmp/NAME_end
# and a CPU snapshot to $tmp/cpu.NAME_end: the append phase ends there, before loadgen's
# --verify reads everything back. One process polling every 50 ms (a process per poll would
# itself take a noticeable share of the two cores being measured).
watch_stored() { # watch_stored NAME
  python3 - "$1" "$APPENDS" "$tmp" "${worker_ports[@]}" <<'PY' || die "the workers never stored all $APPENDS appends"
import json, re, sys, time, urllib.request
name, want, tmp, ports = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
sys.path.insert(0, tmp)
import cpu
stored = re.compile(r'^logstore_appends_total\{[^}]*result="stored"[^}]*\} (\S+)$', re.M)
deadline = time.monotonic() + 900
while time.monotonic() < deadline:
    total = 0
    for port in ports:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        total += sum(float(v) for v in stored.findall(body))
    if total >= want:
        end = time.time()
        json.dump(cpu.snapshot(), open(f"{tmp}/cpu.{name}_end", "w"))
        open(f"{tmp}/{name}_end", "w").write(f"{end:.6f}\n")
        sys.exit(0)
    time.sleep(0.05)
sys.exit(1)
PY
}
# appends / (time from loadgen's start until the workers count every one stored)
e2e_rate() { python3 -c "print(round($APPENDS / ($(cat "$tmp/$1_end") - $2)))"; }
jq_() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {'d': d}))" "$@"; }

log "(c) end to end, core intake: $APPENDS appends at max rate, 2 workers"
start_workers core e2e_core
cpu_snapshot core_start
watch_stored core &
watcher=$!
# Core: loadgen's acknowledgement is the worker's reply after the commit, so its rate is the
# end-to-end store rate.
loadgen_run core --objects "$OBJECTS" --log-size 100 --max-rate --in-flight "${BENCH_IN_FLIGHT:-512}" --count "$APPENDS" --verify
wait "$watcher"
core_e2e=$(jq_ "$tmp/core.json" "round(d['appends']['per_sec'])")
core_rss=$(worker_peak_rss)
core_rate=$core_e2e
half=$((core_rate / 2))
log "    $core_rate appends/s; latency at half rate ($half/s)"
# 30 s: a p99 over a few seconds would hang on whether one autovacuum or writeback stall fell
# inside them.
loadgen_run half --objects "$OBJECTS" --log-size 100 --rate "$half" --count $((half * 30)) --in-flight 4096
# The batch rows need workers that take batch appends (an array body); older ones answer
# invalid_request, and a JetStream phase would then wait for appends never stored.
batch_ok=1
if ! NATS_URL=$nats_url "$bin/loadgen" --batch 2 --count 2 --rate 100 --objects 1 --progress-secs 0 \
    >"$tmp/batch_probe.out" 2>&1; then
  batch_ok=0
  log "    SKIPPING the batch rows: these workers do not take batch appends: $(grep -m1 'gave up' "$tmp/batch_probe.out" || tail -1 "$tmp/batch_probe.out")"
fi
stop_workers

core_b_e2e=None; core_b_rss=None; js_b_e2e=None; js_b_rss=None
if [ "$batch_ok" = 1 ]; then
  log "(c) end to end, core intake: $APPENDS appends in batches of $BATCH at max rate, 2 workers"
  start_workers core e2e_core_b
  cpu_snapshot core_b_start
  watch_stored core_b &
  watcher=$!
  loadgen_run core_b --objects "$OBJECTS" --log-size 100 --max-rate --batch "$BATCH" \
    --in-flight "${BENCH_BATCH_IN_FLIGHT:-64}" --count "$APPENDS" --verify
  wait "$watcher"
  core_b_e2e=$(jq_ "$tmp/core_b.json" "round(d['appends']['per_sec'])")
  core_b_rss=$(worker_peak_rss)
  log "    $core_b_e2e appends/s"
  stop_workers
fi

log "(c) end to end, JetStream intake: $APPENDS appends at max rate, 2 workers"
start_workers jetstream e2e_js
cpu_snapshot js_start
e2e_start=$(now)
watch_stored js &
watcher=$!
loadgen_run js --objects "$OBJECTS" --log-size 100 --jetstream --max-rate --in-flight "${BENCH_JS_IN_FLIGHT:-1024}" --count "$APPENDS" --verify
wait "$watcher"; js_e2e=$(e2e_rate js "$e2e_start")
js_rss=$(worker_peak_rss)
js_rate=$js_e2e
log "    $js_rate appends/s"
stop_workers

if [ "$batch_ok" = 1 ]; then
  log "(c) end to end, JetStream intake: $APPENDS appends in batches of $BATCH at max rate, 2 workers"
  start_workers jetstream e2e_js_b
  cpu_snapshot js_b_start
  e2e_start=$(now)
  watch_stored js_b &
  watcher=$!
  loadgen_run js_b --objects "$OBJECTS" --log-size 100 --jetstream --max-rate --batch "$BATCH" \
    --in-flight "${BENCH_JS_BATCH_IN_FLIGHT:-64}" --count "$APPENDS" --verify
  wait "$watcher"; js_b_e2e=$(e2e_rate js_b "$e2e_start")
  js_b_rss=$(worker_peak_rss)
  log "    $js_b_e2e appends/s"
  stop_workers
fi

# ---------------------------------------------------------------- (e) partitioned intake
metric_sum() { # metric_sum PORT SERIES: the sum of SERIES (a name, or a name{labels}) on one worker
  python3 -c "
import re, sys, urllib.request
text = urllib.request.urlopen(f'http://127.0.0.1:{sys.argv[1]}/metrics', timeout=2).read().decode()
print(int(sum(float(m) for m in re.findall('^' + re.escape(sys.argv[2]) + r' (\S+)$', text, re.M))))" "$1" "$2"
}
wait_partitions_held() { # every one of the $PARTS partitions held by one of the running workers
  wait_for 60 "$PARTS partitions pulled" python3 -c "
import re, sys, urllib.request
held = sum(float(m) for port in sys.argv[1:] for m in re.findall(r'^logstore_jetstream_partitions_held (\S+)$',
           urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=2).read().decode(), re.M))
sys.exit(0 if held >= $PARTS else 1)" "${worker_ports[@]}"
}
# The same loads through the partitioned ordered intake (JS_PARTITIONS=$PARTS): loadgen finds
# the partitions in the workers' service info and publishes each append on its object's
# subject, each batch on its partition's. The stream keeps its partitions from here on.
if [ "$PARTS" -gt 0 ] && [ "$batch_ok" = 1 ]; then
  for w in $PART_WORKERS; do
    for mode in single batch; do
      name=p${w}_$mode
      log "(e) partitioned JetStream intake, $PARTS partitions, $w worker(s): $APPENDS appends, $mode"
      start_workers jetstream "e2e_$name" "$w" "$PARTS"
      # Every partition pulled before the clock starts.
      wait_partitions_held
      cpu_snapshot "${name}_start"
      e2e_start=$(now)
      watch_stored "$name" &
      watcher=$!
      if [ "$mode" = single ]; then
        loadgen_run "$name" --objects "$OBJECTS" --log-size 100 --jetstream --max-rate \
          --in-flight "${BENCH_JS_IN_FLIGHT:-1024}" --count "$APPENDS" --verify
      else
        loadgen_run "$name" --objects "$OBJECTS" --log-size 100 --jetstream --max-rate --batch "$BATCH" \
          --in-flight "${BENCH_JS_BATCH_IN_FLIGHT:-64}" --count "$APPENDS" --verify
      fi
      wait "$watcher"
      echo "$(e2e_rate "$name" "$e2e_start")" >"$tmp/$name.rate"
      log "    $(cat "$tmp/$name.rate") appends/s"
      stop_workers
    done
  done

  # (f) takeover: 2 workers under a steady TAKEOVER_RATE of single appends over TAKEOVER_OBJECTS
  # objects; 5 s in, one worker is SIGKILLed. Its partitions wait for its KV leases to expire
  # (JS_LEASE_MS, 3 s) and are taken over by the survivor, with a consumer reset so nothing
  # waits for ack_wait. The row: the time from the SIGKILL until the survivor pulls every
  # partition (its metrics polled every 50 ms), and loadgen's --verify of everything.
  # (Stored entries' ts cannot show the stall: on JetStream ts is when the stream took the
  # append, not when a worker stored it.)
  log "(f) takeover: $PARTS partitions, 2 workers, one SIGKILLed under $TAKEOVER_RATE appends/s"
  start_workers jetstream e2e_takeover 2 "$PARTS"
  wait_partitions_held
  loadgen_run takeover --objects "$TAKEOVER_OBJECTS" --log-size 100 --jetstream --rate "$TAKEOVER_RATE" \
    --duration 15 --verify &
  takeover_loadgen=$!
  sleep 5
  # What the victim held when it died, and how long until the survivor held everything.
  victim_held=$(metric_sum "${worker_ports[0]}" logstore_jetstream_partitions_held)
  killed_at=$(now)
  kill -KILL "${worker_pids[0]}"
  wait "${worker_pids[0]}" 2>/dev/null || true
  worker_pids=("${worker_pids[@]:1}")
  worker_ports=("${worker_ports[@]:1}")
  until [ "$(metric_sum "${worker_ports[0]}" logstore_jetstream_partitions_held)" -ge "$PARTS" ]; do
    python3 -c "import sys, time; sys.exit(time.time() - float(sys.argv[1]) > 60)" "$killed_at" \
      || die "(f): the survivor did not pull every partition within 60 s of the SIGKILL"
    sleep 0.05
  done
  resumed_at=$(now)
  wait "$takeover_loadgen" || die "loadgen takeover failed"
  echo "$victim_held $(metric_sum "${worker_ports[0]}" 'logstore_jetstream_takeovers_total{kind="crash"}')" \
    "$(python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$killed_at" "$resumed_at")" >"$tmp/takeover.row"
  stop_workers
fi

# ---------------------------------------------------------------- (d) queries
log "(d) queries on a $BIG-entry object"
start_workers jetstream e2e_js
big_shard=$(POSTGRES_SHARDS="pg1=postgres://x@h/db,pg2=postgres://x@h/db" "$bin/worker" ring "$BIG_ID" | awk '{print $2}')
big_port=${pg_ports[$(( ${big_shard#pg} - 1 ))]}
remaining=$BIG
while [ "$remaining" -gt 0 ]; do
  n=$((remaining < 50000 ? remaining : 50000))
  psql_on "$big_port" -d e2e_js -c "SELECT count(*) FROM logstore_append(
      array_fill($BIG_ID::bigint, ARRAY[$n]), array_fill(NULL::text, ARRAY[$n]),
      array(SELECT 'entry ' || g || ' ' || repeat('x', 90) FROM generate_series(1, $n) g),
      array_fill(now(), ARRAY[$n]))" >/dev/null
  remaining=$((remaining - n))
done
psql_on "$big_port" -d e2e_js -c "VACUUM ANALYZE logs" >/dev/null
loadgen_run first_page --objects 1 --id-base "$BIG_ID" --query-share 1.0 --count 2000 --max-rate --in-flight 1
loadgen_run whole --read-whole "$BIG_ID"
stop_workers

# ---------------------------------------------------------------- report
mkdir -p bench/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
python3 - "$tmp" "$root/bench/results/$stamp.json" <<EOF
import json, os, platform, sys
tmp, out = sys.argv[1], sys.argv[2]
load = lambda n: json.load(open(os.path.join(tmp, n + ".json")))
core, half, js, first, whole = load("core"), load("half"), load("js"), load("first_page"), load("whole")
batched = $batch_ok == 1
core_b, js_b = (load("core_b"), load("js_b")) if batched else (None, None)
def cpu(phase):
    """CPU seconds per process kind from the start of a run until its last append was stored."""
    start = json.load(open(os.path.join(tmp, f"cpu.{phase}_start")))
    end = json.load(open(os.path.join(tmp, f"cpu.{phase}_end")))
    return {k: round(end.get(k, 0) - start.get(k, 0), 2) for k in end}
core_cpu, js_cpu = cpu("core"), cpu("js")
core_b_cpu, js_b_cpu = (cpu("core_b"), cpu("js_b")) if batched else (None, None)
r = {
    "commit": "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)",
    "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
    "params": {"appends": $APPENDS, "objects": $OBJECTS, "log_bytes": 100, "big_entries": $BIG, "pgbench_seconds": $SECONDS_EACH,
               "batch": $BATCH, "connections": $CONNECTIONS},
    "a_pgbench_batched_rows_per_s": $ceiling,
    "a2_pgbench_logstore_append_entries_per_s": $fn_ceiling,
    "b_pgbench_single_rows_per_s": $single,
    "c_core": {"appends_per_s": $core_e2e, "loadgen_acks_per_s": core["appends"]["per_sec"], "latency_ms": core["appends"]["latency_ms"],
               "verify": core.get("verify"), "worker_peak_rss_mib": $core_rss, "worker_cpu_s": core_cpu["worker"]},
    "c_core_half_rate": {"rate": $half, "latency_ms": half["appends"]["latency_ms"]},
    "c_jetstream": {"appends_per_s": $js_e2e, "pubacks_per_s": js["appends"]["per_sec"], "latency_ms": js["appends"]["latency_ms"],
                    "verify": js.get("verify"), "worker_peak_rss_mib": $js_rss, "worker_cpu_s": js_cpu["worker"]},
    "c_core_batch": None if not batched else {
        "batch": $BATCH, "appends_per_s": $core_b_e2e, "latency_ms_per_message": core_b["appends"]["latency_ms"],
        "verify": core_b.get("verify"), "worker_peak_rss_mib": $core_b_rss, "worker_cpu_s": core_b_cpu["worker"]},
    "c_jetstream_batch": None if not batched else {
        "batch": $BATCH, "appends_per_s": $js_b_e2e, "pubacks_per_s": js_b["appends"]["per_sec"],
        "latency_ms_per_message": js_b["appends"]["latency_ms"], "verify": js_b.get("verify"),
        "worker_peak_rss_mib": $js_b_rss, "worker_cpu_s": js_b_cpu["worker"]},
    "batch_rows_skipped": None if batched else "the workers answered a batch append with an error (no batch support)",
    "cpu_seconds_core_phase": core_cpu,
    "cpu_seconds_jetstream_phase": js_cpu,
    "cpu_seconds_core_batch_phase": core_b_cpu,
    "cpu_seconds_jetstream_batch_phase": js_b_cpu,
    "d_first_page_latency_ms": first["queries"]["latency_ms"],
    "d_whole_read": whole.get("whole_read"),
}
json.dump(r, open(out, "w"), indent=2)
a, a2, b = r["a_pgbench_batched_rows_per_s"], r["a2_pgbench_logstore_append_entries_per_s"], r["b_pgbench_single_rows_per_s"]
def row(name, rate, lat, rss, cpu):
    return (f"| {name} | {rate:,.0f} | {rate / a:.0%} | {rate / a2:.0%} | {rate / b:.1f}x | "
            f"{lat['p50']:.2f} / {lat['p99']:.2f} / {lat['max']:.2f} | {rss} | {cpu:.1f} |")
print(f"\n| measurement | rows or appends/s | of (a) | of (a') | of (b) | latency p50 / p99 / max (ms) | worker peak RSS (MiB) | worker CPU (s) |")
print("|---|---:|---:|---:|---:|---|---:|---:|")
print(f"| (a) pgbench 1,000-row INSERTs, 2 shards | {a:,.0f} | 100% | {a / a2:.0%} | {a / b:.1f}x | | | |")
print(f"| (a') pgbench logstore_append_at, 1,000-entry batches, 2 shards | {a2:,.0f} | {a2 / a:.0%} | 100% | {a2 / b:.1f}x | | | |")
print(f"| (b) pgbench single-row autocommit, 2 shards | {b:,.0f} | {b / a:.0%} | {b / a2:.0%} | 1.0x | | | |")
print(row("(c) end to end, core intake, max rate", r["c_core"]["appends_per_s"], r["c_core"]["latency_ms"], $core_rss, core_cpu["worker"]))
print(row("(c) end to end, JetStream intake, max rate", r["c_jetstream"]["appends_per_s"], r["c_jetstream"]["latency_ms"], $js_rss, js_cpu["worker"]))
if batched:
    print(row(f"(c) end to end, core intake, batches of $BATCH, max rate (latency per message)", r["c_core_batch"]["appends_per_s"],
              r["c_core_batch"]["latency_ms_per_message"], $core_b_rss, core_b_cpu["worker"]))
    print(row(f"(c) end to end, JetStream intake, batches of $BATCH, max rate (latency per message)", r["c_jetstream_batch"]["appends_per_s"],
              r["c_jetstream_batch"]["latency_ms_per_message"], $js_b_rss, js_b_cpu["worker"]))
else:
    print(f"| (c) end to end, batches of $BATCH, core and JetStream | skipped: the workers do not take batch appends | | | | | | |")
hl = r["c_core_half_rate"]["latency_ms"]
print(f"| (c) core request-reply at half max rate ({r['c_core_half_rate']['rate']:,}/s) | | | | | {hl['p50']:.2f} / {hl['p99']:.2f} / {hl['max']:.2f} | | |")
fl = r["d_first_page_latency_ms"]
print(f"| (d) first page of 100 of a {$BIG:,}-entry object | | | | | {fl['p50']:.2f} / {fl['p99']:.2f} / {fl['max']:.2f} | | |")
w = r["d_whole_read"] or {}
print(f"| (d) whole read of the {$BIG:,}-entry object | {w.get('entries_per_second', 0):,.0f} entries/s | | | | {w.get('seconds', 0):.2f} s total, {w.get('chunks', 0)} chunks | | |")
print("\nCPU from the start of each run until its last append was stored (loadgen's --verify comes after):\n")
print("| run | " + " | ".join(f"{k} µs/append (share)" for k in core_cpu) + " | all, µs/append |")
print("|---|" + "---:|" * (len(core_cpu) + 1))
phases = [("core", core_cpu), ("jetstream", js_cpu)]
if batched:
    phases += [("core, batches of $BATCH", core_b_cpu), ("jetstream, batches of $BATCH", js_b_cpu)]
per = lambda v: v * 1e6 / $APPENDS
for phase, use in phases:
    total = sum(use.values()) or 1
    print(f"| {phase} | " + " | ".join(f"{per(v):.1f} ({v / total:.0%})" for v in use.values()) + f" | {per(total):.1f} |")
js_rate, hl, fl = r["c_jetstream"]["appends_per_s"], r["c_core_half_rate"]["latency_ms"], r["d_first_page_latency_ms"]
peak_rss = max($core_rss, $js_rss)
targets = [
    ("end to end >= 60% of (a), JetStream", f"{js_rate / a:.0%}", js_rate >= 0.6 * a),
    ("end to end >= 5x (b), JetStream", f"{js_rate / b:.1f}x", js_rate >= 5 * b),
    ("core p99 <= 25 ms at half max rate", f"{hl['p99']:.2f} ms", hl["p99"] <= 25),
    ("first page of 100, p99 <= 5 ms", f"{fl['p99']:.2f} ms", fl["p99"] <= 5),
    ("whole read >= 300,000 entries/s", f"{w.get('entries_per_second', 0):,.0f}/s", w.get("entries_per_second", 0) >= 300_000),
    ("worker peak RSS <= 100 MiB", f"{peak_rss} MiB", peak_rss <= 100),
]
# Issue 10: a batch-100 JetStream pipeline close to our own storage ceiling, a storage function
# close to a plain INSERT, and the durable single-append path no slower than core. None = not
# measured in this run (the batch rows were skipped).
core_rate = r["c_core"]["appends_per_s"]
skipped = "skipped (no batch support in the workers)"
if batched:
    jb = r["c_jetstream_batch"]["appends_per_s"]
    targets10 = [
        ("JetStream batch $BATCH: (c)/(a') >= 80%", f"{jb / a2:.0%}", jb >= 0.8 * a2),
        ("JetStream batch $BATCH: >= 5x (b)", f"{jb / b:.1f}x", jb >= 5 * b),
        ("JetStream batch $BATCH: nats-server CPU <= 3 µs per stored append", f"{per(js_b_cpu['nats-server']):.1f} µs", per(js_b_cpu["nats-server"]) <= 3),
        ("JetStream batch $BATCH: worker CPU <= 4 µs per stored append", f"{per(js_b_cpu['worker']):.1f} µs", per(js_b_cpu["worker"]) <= 4),
    ]
else:
    targets10 = [(t, skipped, None) for t in (
        "JetStream batch $BATCH: (c)/(a') >= 80%", "JetStream batch $BATCH: >= 5x (b)",
        "JetStream batch $BATCH: nats-server CPU <= 3 µs per stored append",
        "JetStream batch $BATCH: worker CPU <= 4 µs per stored append")]
targets10 += [
    ("storage design: (a')/(a) >= 60%", f"{a2 / a:.0%}", a2 >= 0.6 * a),
    ("JetStream single-entry >= core single-entry", f"{js_rate:,.0f} vs {core_rate:,.0f}/s", js_rate >= core_rate),
]
r["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets]
r["targets_issue_10"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets10]
json.dump(r, open(out, "w"), indent=2)
verdict = lambda ok: "skipped" if ok is None else ("met" if ok else "**missed**")
print("\n| target: end to end | measured | |\n|---|---|---|")
for t, m, ok in targets:
    print(f"| {t} | {m} | {verdict(ok)} |")
print("\n| target: batches and CPU | measured | |\n|---|---|---|")
for t, m, ok in targets10:
    print(f"| {t} | {m} | {verdict(ok)} |")
# What the CPU budget allows: at a rate R, the two cores give each append cores * 1e6 / R µs.
cores = os.cpu_count()
js_total = sum(js_cpu.values()) * 1e6 / $APPENDS
for name, goal in (("60% of (a)", 0.6 * a), ("5x (b)", 5 * b)):
    budget = cores * 1e6 / goal
    print(f"\nJetStream at {name} = {goal:,.0f}/s leaves {budget:.1f} µs of CPU per append on {cores} cores; "
          f"this run used {js_total:.1f} µs (nats-server {js_cpu['nats-server'] * 1e6 / $APPENDS:.1f}, "
          f"postgres {js_cpu['postgres'] * 1e6 / $APPENDS:.1f}).")
print(f"\nverify: core={r['c_core']['verify']}, jetstream={r['c_jetstream']['verify']}")
if batched:
    print(f"verify, batches of $BATCH: core={r['c_core_batch']['verify']}, jetstream={r['c_jetstream_batch']['verify']}")
part_workers = "$PART_WORKERS".split() if $PARTS > 0 and batched else []
if part_workers:
    print(f"\n(e) partitioned ordered JetStream intake, {$PARTS} partitions (same run, same {$APPENDS:,} appends):\n")
    print("| workers | single appends/s | vs (c) JetStream single | batch-$BATCH appends/s | vs (c) JetStream batch | nats-server µs/append, single | worker µs/append, single |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    parts = {}
    for w in part_workers:
        single = int(open(os.path.join(tmp, f"p{w}_single.rate")).read())
        batch = int(open(os.path.join(tmp, f"p{w}_batch.rate")).read())
        c = cpu(f"p{w}_single")
        parts[w] = {"single_per_s": single, "batch_per_s": batch, "cpu_seconds_single": c,
                    "cpu_seconds_batch": cpu(f"p{w}_batch")}
        print(f"| {w} | {single:,} | {single / r['c_jetstream']['appends_per_s']:.0%} | {batch:,} | "
              f"{batch / r['c_jetstream_batch']['appends_per_s']:.0%} | "
              f"{c['nats-server'] * 1e6 / $APPENDS:.1f} | {c['worker'] * 1e6 / $APPENDS:.1f} |")
    r["e_partitioned"] = {"partitions": $PARTS, "by_workers": parts}
    victim_held, taken_over, seconds = open(os.path.join(tmp, "takeover.row")).read().split()
    t = load("takeover")
    r["f_takeover"] = {"rate": $TAKEOVER_RATE, "objects": $TAKEOVER_OBJECTS, "victim_partitions": int(victim_held),
                       "crash_takeovers": int(taken_over), "seconds_until_all_pulled": float(seconds), "verify": t.get("verify")}
    f = r["f_takeover"]
    print(f"\n(f) takeover: 2 workers, {$PARTS} partitions, one SIGKILLed under {$TAKEOVER_RATE:,} appends/s over {$TAKEOVER_OBJECTS} objects:\n")
    print("| partitions the killed worker held | taken over after the crash | SIGKILL to every partition pulled again | verify |")
    print("|---:|---:|---:|---|")
    print(f"| {f['victim_partitions']} | {f['crash_takeovers']} | {f['seconds_until_all_pulled']:.2f} s | "
          f"{'ok' if (f['verify'] or {}).get('ok') else f['verify']} |")
    json.dump(r, open(out, "w"), indent=2)
print(f"JSON: {out}")
EOF
