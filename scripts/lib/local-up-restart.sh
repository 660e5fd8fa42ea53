# shellcheck shell=bash
# Sourced by scripts/local-up.sh: `local-up.sh restart worker N | shard pgN` (the client, run
# from another terminal, and the running script's side, which owns the processes), and what
# still runs in the run's temp dir before it is removed.
#
# The client writes a request into the run's temp dir (requests/<pid>.req); the running script
# (its PID in DIR/local-up.pid) picks it up within a second and answers in requests/<pid>.done:
# an exit code, then what it did. Restarted servers stay the running script's children, so its
# Ctrl-C stops them like the others.
#
# The running script's side uses its globals: dir, WORKERS, worker_pids, metrics_ports,
# pg_pids, pg_ports, as_pg, pg_bindir, and its functions (log, alive, stop_procs, poll_until,
# start_worker, start_pg, http_ok, pg_ready).

# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------
# The PID of the local-up.sh running in temp dir $1, if it still runs.
run_pid() {
  local pid
  pid=$(cat "$1/local-up.pid" 2>/dev/null) || return 0
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
  return 0
}

# The temp dir of the running local-up.sh: --dir, else STATE_FILE's `dir=`, else the only one
# under TMPDIR whose script still runs.
find_run_dir() {
  local given=$1 found candidates=() d
  if [ -n "$given" ]; then echo "$given"; return; fi
  if [ -n "${STATE_FILE:-}" ]; then
    d=$(sed -n 's/^dir=//p' "$STATE_FILE" 2>/dev/null | tail -n 1) || true
    [ -n "$d" ] || die "no dir= in STATE_FILE $STATE_FILE"
    echo "$d"
    return
  fi
  for found in "${TMPDIR:-/tmp}"/logstore-local.*/local-up.pid; do
    d=$(dirname "$found")
    [ -n "$(run_pid "$d")" ] && candidates+=("$d")
  done
  case ${#candidates[@]} in
    0) die "no running local-up.sh found under ${TMPDIR:-/tmp} (pass --dir DIR)" ;;
    1) echo "${candidates[0]}" ;;
    *) die "several local-up.sh runs: pass --dir with one of: ${candidates[*]}" ;;
  esac
}

restart_request() {
  local what=${1:-} name=${2:-} dir_arg="" run_dir pid id deadline code
  shift 2 || true
  while [ $# -gt 0 ]; do
    case "$1" in
      --dir) dir_arg=${2:?--dir needs a directory}; shift ;;
      --dir=*) dir_arg=${1#*=} ;;
      *) die "restart: unknown argument '$1' (see --help)" ;;
    esac
    shift
  done
  case "$what $name" in
    worker\ [1-9]*) [[ $name =~ ^[1-9][0-9]*$ ]] || die "restart worker N: N is a number, got '$name'" ;;
    shard\ pg[1-9]*) [[ $name =~ ^pg[1-9][0-9]*$ ]] || die "restart shard pgN: got '$name'" ;;
    *) die "usage: local-up.sh restart worker N | shard pgN [--dir DIR]" ;;
  esac
  run_dir=$(find_run_dir "$dir_arg")
  pid=$(run_pid "$run_dir")
  [ -n "$pid" ] || die "no local-up.sh runs in $run_dir"
  id=$run_dir/requests/$$
  echo "$what $name" >"$id.tmp" && mv "$id.tmp" "$id.req" || die "cannot write $id.req"
  # Stopping takes up to 30 s (a worker drains) and starting up to 60 s.
  deadline=$((SECONDS + 150))
  until [ -e "$id.done" ]; do
    kill -0 "$pid" 2>/dev/null || die "local-up.sh (pid $pid) exited before answering"
    [ "$SECONDS" -lt "$deadline" ] || die "no answer from local-up.sh (pid $pid) within 150 s"
    sleep 0.2
  done
  code=$(head -n 1 "$id.done")
  tail -n +2 "$id.done" >&2
  rm -f "$id.done"
  exit "${code:-1}"
}

# ---------------------------------------------------------------------------------------------
# The running script's side
# ---------------------------------------------------------------------------------------------
# restart_worker I: stop worker I if it runs, start it again, wait until ready. Sets `reply`.
restart_worker() {
  local i=$1 pid=${worker_pids[$1 - 1]} port=${metrics_ports[$1 - 1]}
  if alive "$pid"; then
    log "worker $i: stopping (pid $pid) to restart it"
    stop_procs TERM 30 "worker $i" "$pid"
  else
    wait "$pid" 2>/dev/null || true
  fi
  start_worker "$i" again
  pid=${worker_pids[i - 1]}
  if poll_until 60 "worker $i" "$pid" "$dir/worker$i.log" http_ok "$port" /readyz; then
    reply="worker $i restarted: pid $pid, http://127.0.0.1:$port/metrics, log $dir/worker$i.log"
    return 0
  fi
  reply="worker $i did not become ready within 60 s; see $dir/worker$i.log"
  return 1
}

# restart_shard N: stop Postgres pgN if it runs (local-up's, or one started by hand on its data
# dir), start it again on the same data dir and port, wait until it answers. Sets `reply`.
restart_shard() {
  local n=$1 data=$dir/pg/pg$1 pid=${pg_pids[$1 - 1]} port=${pg_ports[$1 - 1]} hand attempt
  local stop=() took_over=""
  alive "$pid" && stop+=("$pid")
  hand=$(postmaster_pid "$data")
  if [ -n "$hand" ] && [ "$hand" != "$pid" ]; then
    log "postgres pg$n: pid $hand, started outside local-up, runs on $data; stopping it to restart pg$n"
    stop+=("$hand")
    took_over=" (stopped pid $hand, which had been started outside local-up, first)"
  fi
  if [ "${#stop[@]}" -gt 0 ]; then
    stop_procs INT 20 "postgres pg$n" "${stop[@]}"
  else
    wait "$pid" 2>/dev/null || true
  fi
  # A postmaster that was SIGKILLed leaves its backends for a moment, and a new one refuses to
  # start while they hold the old shared memory: try a few times.
  for attempt in 1 2 3; do
    start_pg "$n" again
    pid=${pg_pids[n - 1]}
    if poll_until 30 "postgres pg$n" "$pid" "$dir/pg$n.log" pg_ready "$port"; then
      reply="postgres pg$n restarted$took_over: pid $pid, 127.0.0.1:$port, data $data, log $dir/pg$n.log"
      return 0
    fi
    alive "$pid" && break
    wait "$pid" 2>/dev/null || true
    sleep 1
  done
  reply="postgres pg$n did not start (attempt $attempt); see $dir/pg$n.log"
  return 1
}

# Answer every pending request in DIR/requests: `worker N` or `shard pgN`.
handle_requests() {
  local request id what name code reply
  for request in "$dir"/requests/*.req; do
    [ -e "$request" ] || continue
    id=${request%.req}
    read -r what name <"$request" || true
    rm -f "$request"
    code=1
    case "$what" in
      worker)
        if [[ $name =~ ^[0-9]+$ ]] && [ "$name" -ge 1 ] && [ "$name" -le "$WORKERS" ]; then
          if restart_worker "$name"; then code=0; fi
        else
          reply="no worker $name: workers are 1 to $WORKERS"
        fi
        ;;
      shard)
        if [[ $name =~ ^pg[12]$ ]]; then
          if restart_shard "${name#pg}"; then code=0; fi
        else
          reply="no shard $name: shards are pg1 and pg2"
        fi
        ;;
      *) reply="cannot restart '$what $name'" ;;
    esac
    log "$reply"
    printf '%s\n%s\n' "$code" "$reply" >"$id.tmp" && mv "$id.tmp" "$id.done"
  done
}

# ---------------------------------------------------------------------------------------------
# What still runs in the temp dir
# ---------------------------------------------------------------------------------------------
# The PID of the postmaster running on data dir $1 (its postmaster.pid names one that is alive
# and whose working directory is that data dir), whoever started it; nothing otherwise.
postmaster_pid() {
  local data=$1 pid
  pid=$(head -n 1 "$data/postmaster.pid" 2>/dev/null) || return 0
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  alive "$pid" && [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$data" ] && echo "$pid"
  return 0
}

# One line per server still running in $dir: a PID local-up recorded, a postmaster on one of
# its data dirs (started by hand, say), or a nats-server or prometheus using a path inside it.
running_in_dir() {
  local pid n data f comm seen=" "
  for pid in $loadgen_pid "${worker_pids[@]}" $prometheus_pid "${pg_pids[@]}" $nats_pid; do
    if alive "$pid"; then
      seen+="$pid "
      echo "  pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)), started by local-up, did not stop"
    fi
  done
  for n in 1 2; do
    data=$dir/pg/pg$n
    pid=$(postmaster_pid "$data")
    if [ -n "$pid" ] && [[ $seen != *" $pid "* ]]; then
      seen+="$pid "
      echo "  postgres pg$n, pid $pid, on $data (started outside local-up): stop it with" \
        "${as_pg[*]:+${as_pg[*]} }$pg_bindir/pg_ctl -D $data stop"
    fi
  done
  for f in /proc/[0-9]*/comm; do
    comm=$(cat "$f" 2>/dev/null) || continue
    case "$comm" in nats-server | prometheus) ;; *) continue ;; esac
    pid=${f#/proc/}
    pid=${pid%/comm}
    [[ $seen == *" $pid "* ]] && continue
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$dir/"; then
      echo "  $comm, pid $pid, uses $dir (started outside local-up): stop it with kill $pid"
    fi
  done
  return 0
}
