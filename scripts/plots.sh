#!/usr/bin/env bash
# Regenerate the README's plots from real runs: `scripts/plots.sh`.
#
# Runs two short loadgen runs, each against a fresh local fleet (`scripts/local-up.sh`:
# nats-server with JetStream, two PostgreSQL shards, WORKERS workers, no Prometheus), and draws
# their `--report` per-second series (scripts/plots.py, matplotlib):
#   readme/throughput.png   appends acknowledged per second over time, both runs
#   readme/latency.png      append latency p50 and p99 per second over time, both runs
# The runs:
#   core      INTAKE=core, one append per message at CORE_RATE/s: acknowledged = the worker's
#             reply after the Postgres commit, so the latency is the whole store round trip
#   jetstream INTAKE=jetstream, batches of BATCH appends at JS_RATE appends/s: acknowledged =
#             the stream's PubAck for the message
# both with --verify (every acknowledged append is read back). Takes about two minutes plus
# the build. Not part of scripts/test.sh (slow, and the numbers depend on the machine).
#
# Settings (environment):
#   DURATION=30        seconds each loadgen run sends
#   CORE_RATE=2000     appends/s of the core run
#   JS_RATE=20000      appends/s of the JetStream run
#   BATCH=100          appends per message of the JetStream run
#   WORKERS=2          workers per fleet
#   BIN_DIR=DIR        prebuilt `worker` and `loadgen` (default: cargo build --release --bins)
#   OUT_DIR=readme     where the PNGs go
#   KEEP_REPORTS=DIR   also keep the two loadgen reports (JSON) in DIR
#
# Needs python3 with matplotlib: installed with `pip install matplotlib` when missing.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${DURATION:-30}
CORE_RATE=${CORE_RATE:-2000}
JS_RATE=${JS_RATE:-20000}
BATCH=${BATCH:-100}
WORKERS=${WORKERS:-2}
OUT_DIR=${OUT_DIR:-$repo/readme}

log() { echo "plots: $*" >&2; }
die() { log "$*"; exit 1; }

command -v python3 >/dev/null || die "python3 is needed (with matplotlib)"
if ! python3 -c 'import matplotlib' 2>/dev/null; then
  log "installing matplotlib (pip install matplotlib)"
  python3 -m pip install --quiet matplotlib || die "cannot install matplotlib: pip install matplotlib"
fi

if [ -z "${BIN_DIR:-}" ]; then
  log "building release binaries"
  (cd "$repo" && cargo build --release --bins)
  BIN_DIR=${CARGO_TARGET_DIR:-$repo/target}/release
fi
BIN_DIR=$(cd "$BIN_DIR" && pwd)

work=$(mktemp -d -t logstore-plots.XXXXXX)
trap 'rm -rf "$work"' EXIT

# One run: a fresh fleet, loadgen with --report, everything stopped when loadgen ends.
run() {
  local name=$1 intake=$2
  shift 2
  log "run '$name': INTAKE=$intake loadgen $*"
  if ! INTAKE=$intake WORKERS=$WORKERS PROMETHEUS=0 BIN_DIR=$BIN_DIR RUST_LOG=warn \
    KEEP_RUNNING_AFTER_LOADGEN=0 STATE_FILE="$work/$name.state" \
    bash "$repo/scripts/local-up.sh" --loadgen -- \
    --duration "$DURATION" --verify --progress-secs 5 --report "$work/$name.json" "$@" \
    >"$work/$name.log" 2>&1; then
    tail -n 30 "$work/$name.log" >&2
    die "run '$name' failed (local-up.sh or loadgen exited non-zero; its log is above)"
  fi
  grep -E '^(run |appends:|  latency|verify)' "$work/$name.log" >&2 || true
}

run core core --rate "$CORE_RATE"
run jetstream jetstream --rate "$JS_RATE" --batch "$BATCH"

if [ -n "${KEEP_REPORTS:-}" ]; then
  mkdir -p "$KEEP_REPORTS"
  cp "$work/core.json" "$work/jetstream.json" "$KEEP_REPORTS/"
fi

mkdir -p "$OUT_DIR"
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)
machine="$(nproc) cores${cpu:+ ($cpu)}"
python3 "$repo/scripts/plots.py" \
  --machine "$machine" \
  --date "$(date -u +%Y-%m-%d)" \
  --workers "$WORKERS" \
  --out "$OUT_DIR" \
  "core=$work/core.json" "jetstream=$work/jetstream.json"
log "wrote $OUT_DIR/throughput.png and $OUT_DIR/latency.png"
