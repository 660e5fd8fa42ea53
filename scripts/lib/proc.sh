# shellcheck shell=bash
# Sourced by scripts that start their own servers (scripts/nemesis.sh): free loopback ports,
# polling a condition under a timeout, and process bookkeeping through /proc. Needs python3.

# now_s: the wall clock in seconds with a fraction (what fault logs and samples are stamped with).
now_s() { date +%s.%N; }

# free_ports N: N distinct free TCP ports on 127.0.0.1, one a line (all bound at once, so no two
# are the same; each is free again once printed). Taken below the kernel's ephemeral range
# (ip_local_port_range) where there is room: a server restarted on its port after a kill must
# not find it taken meanwhile as the local port of some other program's outgoing connection
# (seen once in a default-size nemesis run on a busy machine: a restarted worker exited with
# "Address already in use" and that worker stayed down for 16 minutes).
free_ports() {
  python3 - "$1" <<'PY'
import random, socket, sys
n = int(sys.argv[1])
try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
pool = list(range(10000, low))
random.shuffle(pool)
socks = []
for port in pool:
    if len(socks) == n:
        break
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        continue
    socks.append(s)
while len(socks) < n:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print("\n".join(str(s.getsockname()[1]) for s in socks))
PY
}

# http_ok URL: the URL answers 2xx within 2 s.
http_ok() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null; }

# tcp_open PORT: something accepts connections on 127.0.0.1:PORT.
tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for SECONDS COMMAND...: runs COMMAND every 0.1 s until it succeeds (0) or SECONDS have
# passed (1). The caller says what timed out.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# alive PID: the process exists and has not exited. `kill -0` succeeds on a zombie (an exited
# child not reaped yet), so the state comes from /proc. (Builtins only: no process per call.)
alive() {
  local stat
  { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != [ZX] ]]
}

# tree_of PID: PID and all its descendants (e.g. a Postgres server and its backends), parents
# first. One pass over /proc with builtins: a process per entry would take seconds on a busy box.
tree_of() {
  local f stat pid ppid rest i=0 queue=("$1")
  local -A kids=()
  for f in /proc/[0-9]*/stat; do
    { read -r stat <"$f"; } 2>/dev/null || continue
    pid=${stat%% *}
    rest=${stat##*) }
    rest=${rest#* }
    ppid=${rest%% *}
    kids[$ppid]+=" $pid"
  done
  while [ "$i" -lt "${#queue[@]}" ]; do
    echo "${queue[i]}"
    # shellcheck disable=SC2206 # PIDs, one a word
    queue+=(${kids[${queue[i]}]:-})
    i=$((i + 1))
  done
}

# signal_tree SIGNAL PID: SIGNAL to PID and every descendant, all collected before the first
# signal is sent (a SIGKILLed parent's children are re-parented at once).
signal_tree() {
  local sig=$1 pids p
  pids=$(tree_of "$2")
  for p in $pids; do kill "-$sig" "$p" 2>/dev/null || true; done
}

# wait_gone SECONDS PID...: waits until none of the PIDs is alive; 1 if some still are.
wait_gone() {
  local deadline=$((SECONDS + $1)) p left
  shift
  while :; do
    left=0
    for p in "$@"; do alive "$p" && left=1; done
    [ "$left" = 0 ] && return 0
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# stop_all SIGNAL SECONDS PID...: SIGCONT to each PID's tree (a stopped process cannot act on
# a signal) and SIGNAL to the PID; after SECONDS, SIGKILL whatever is left of the trees.
stop_all() {
  local sig=$1 secs=$2 p tree=()
  shift 2
  for p in "$@"; do
    alive "$p" || continue
    mapfile -t -O "${#tree[@]}" tree < <(tree_of "$p")
  done
  [ "${#tree[@]}" -gt 0 ] || return 0
  kill -CONT "${tree[@]}" 2>/dev/null || true
  for p in "$@"; do kill "-$sig" "$p" 2>/dev/null || true; done
  wait_gone "$secs" "${tree[@]}" && return 0
  kill -KILL "${tree[@]}" 2>/dev/null || true
  wait_gone 5 "${tree[@]}" || true
}
