#!/usr/bin/env bash
# Redraw the README's plots from a scripts/bench.sh report: `scripts/plots.sh [REPORT.json]`.
#
# Measures nothing: it draws what a bench run recorded (scripts/plots.py,
# matplotlib) into
#   readme/throughput.png   achieved appends/s stored in PostgreSQL by each intake (core, JetStream,
#                           and the partitioned JetStream rows when the report has them), one
#                           append per message and in batches, at max rate; pgbench's rows/s on
#                           the same servers beside them for reference
#   readme/latency.png      latency p50 / p99 / max of each row: core to the reply after the
#                           commit (at max rate and at half of it), JetStream to the PubAck, and
#                           the first page of a query
# The titles name the report file, its commit (COMMIT below), the machine's cores and memory, and
# the run's size.
#
# REPORT.json defaults to the newest full-size bench.sh report in bench/results/ (BENCH_APPENDS of 500,000 or
# more; smoke runs are smaller). To plot a fresh one, run scripts/bench.sh first (about ten
# minutes, release build) and pass the JSON it names.
#
# Settings (environment):
#   COMMIT=TEXT   the commit the report measured, shown in the titles (bench reports do not
#                 record it); default: the report's own `commit` field if it has one, else "added
#                 in commit <the commit that added the file to git>"
#   OUT_DIR=DIR   where the PNGs go (default readme/)
#
# Needs python3 with matplotlib 3.7 or newer; when it is missing (or older), it is installed with
# pip into a virtual environment under ~/.cache/logstore/plots-venv (nothing system-wide).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=${OUT_DIR:-$repo/readme}

log() { echo "plots: $*" >&2; }
die() { log "$*"; exit 1; }

command -v python3 >/dev/null || die "python3 is needed (with matplotlib)"
# matplotlib 3.7 or newer: the legends are placed outside the axes with `loc="outside …"`.
has_matplotlib() {
  "$1" -c 'import sys, matplotlib; sys.exit(tuple(map(int, matplotlib.__version__.split(".")[:2])) < (3, 7))' 2>/dev/null
}
python=python3
if ! has_matplotlib python3; then
  venv=${XDG_CACHE_HOME:-$HOME/.cache}/logstore/plots-venv
  if ! has_matplotlib "$venv/bin/python"; then
    log "installing matplotlib into $venv (pip)"
    python3 -m venv "$venv" ||
      die "cannot make a virtual environment: install python3-venv, or matplotlib itself (Debian: python3-matplotlib)"
    "$venv/bin/pip" install --quiet 'matplotlib>=3.7' || die "cannot install matplotlib with pip"
  fi
  python=$venv/bin/python
fi

# The newest full-size run: bench/results/<UTC time>[-note].json sorts by time.
newest_full() {
  python3 - "$repo"/bench/results/*.json <<'PY'
import json, sys
full = [p for p in sorted(sys.argv[1:]) if "a_pgbench_batched_rows_per_s" in (r := json.load(open(p))) and r["params"]["appends"] >= 500_000]
print(full[-1] if full else "")
PY
}

report=${1:-$(newest_full)}
[ -n "$report" ] || die "no full-size run in bench/results/: pass a report, e.g. scripts/plots.sh bench/results/X.json"
[ -f "$report" ] || die "no such report: $report"
report=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
name=${report#"$repo"/}

commit=${COMMIT:-$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("commit") or "")' "$report")}
if [ -n "$commit" ]; then
  commit="measured at $commit"
elif added=$(git -C "$repo" log --diff-filter=A --format=%h -1 -- "$name" 2>/dev/null) && [ -n "$added" ]; then
  commit="added in commit $added"
fi

mkdir -p "$OUT_DIR"
log "drawing $name${commit:+ ($commit)}"
"$python" "$repo/scripts/plots.py" --report "$report" --name "$name" --commit "$commit" --out "$OUT_DIR"
log "wrote $OUT_DIR/throughput.png and $OUT_DIR/latency.png"
