# shellcheck shell=bash
# Sourced by scripts/nemesis.sh after proc.sh: local PostgreSQL servers (as the `postgres` user
# when run as root: Postgres refuses root) and the steps of a primary with a synchronous
# standby, as worker/tests/support/servers/replica.rs builds one in the tests: a standby is a
# `pg_basebackup -R` of its primary, the primary waits for it on every commit once
# `synchronous_standby_names` names it, and a failover is `pg_ctl promote`.

# find_pg_bindir (scripts/lib/pg-bin.sh), for every PostgreSQL program used here.
# shellcheck source=scripts/lib/pg-bin.sh
. "$(dirname "${BASH_SOURCE[0]}")/pg-bin.sh"
PG_TOOLS=(initdb postgres psql pg_isready pg_ctl pg_basebackup)

# pg_setup DIR: PG_BIN (the programs), AS_PG (the prefix that runs a program as `postgres`
# when we are root; setpriv execs in place, so `$!` is the program itself) and PG_SOCK (the
# servers' Unix socket directory, inside DIR).
pg_setup() {
  PG_BIN=$(find_pg_bindir "${PG_TOOLS[@]}") || return 1
  AS_PG=()
  PG_SOCK=$1/sock
  mkdir -p "$PG_SOCK"
  if [ "$(id -u)" = 0 ]; then
    AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
    chown postgres "$1" "$PG_SOCK"
  fi
}

# pg_initdb DATA: a new cluster (trust logins over TCP on loopback, replication included).
pg_initdb() {
  "${AS_PG[@]}" "$PG_BIN/initdb" -D "$1" -U postgres -A trust -E UTF8 --locale=C >/dev/null
}

# pg_start DATA PORT LOG: starts a server in the background; PG_PID is its postmaster.
# Settings given here override ALTER SYSTEM, so synchronous_standby_names is not among them.
pg_start() {
  "${AS_PG[@]}" "$PG_BIN/postgres" -D "$1" -p "$2" -k "$PG_SOCK" -c listen_addresses=127.0.0.1 \
    -c max_connections=100 -c shared_buffers=64MB -c wal_keep_size=1GB >>"$3" 2>&1 &
  # shellcheck disable=SC2034 # read by the caller
  PG_PID=$!
}

# psql_on PORT ARGS...: psql as postgres on 127.0.0.1:PORT, unaligned, tuples only, stop on error.
psql_on() {
  local port=$1
  shift
  "$PG_BIN/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt "$@"
}

pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$1" -U postgres -d postgres; }

# pg_writable PORT: the server takes writes (it is not in recovery).
pg_writable() { [ "$(psql_on "$1" -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ]; }

# pg_base_backup FROM_PORT DATA LOG: DATA becomes a copy of the server on FROM_PORT that
# starts as its streaming standby (-R: standby.signal and primary_conninfo).
pg_base_backup() {
  "${AS_PG[@]}" "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$1" -U postgres -D "$2" -R -X stream -c fast \
    >>"$3" 2>&1
}

# pg_promote DATA LOG: `pg_ctl promote`, returning once the standby has left recovery.
pg_promote() {
  "${AS_PG[@]}" "$PG_BIN/pg_ctl" promote -D "$1" -w -t 60 >>"$2" 2>&1
}

# pg_sync_names PORT VALUE: ALTER SYSTEM SET synchronous_standby_names and reload. '' lets
# commits return without a standby (asynchronous), '*' makes each wait for one.
pg_sync_names() {
  psql_on "$1" -c "ALTER SYSTEM SET synchronous_standby_names = '$2'" -c 'SELECT pg_reload_conf()' >/dev/null
}

# pg_replicas PORT: one line per standby connected to the server: state:sync_state
# (e.g. streaming:sync).
pg_replicas() { psql_on "$1" -c "SELECT state || ':' || sync_state FROM pg_stat_replication"; }
pg_has_streaming() { pg_replicas "$1" 2>/dev/null | grep -q '^streaming:'; }
pg_has_sync() { pg_replicas "$1" 2>/dev/null | grep -q '^streaming:sync$'; }
