#!/usr/bin/env bash
# What one stored append costs nats-server on the JetStream intake, per retention and ack policy,
# partition count and stored subject: starts its own nats-server (JetStream, file storage, a
# temporary directory, a free loopback port), runs loadgen's `intake_cost` example once per row
# and round (rounds interleave the rows, so a busy machine affects them alike), and prints a
# table of nats-server CPU µs per append (median of the rounds) and appends/s, also written to
# bench/results/<UTC time>-intake-cost.md.
#
#   scripts/intake-cost.sh                    # 100,000 appends a row, 3 rounds
#   COST_MESSAGES=20000 COST_ROUNDS=1 scripts/intake-cost.sh
#
# No worker and no PostgreSQL take part: see loadgen/examples/intake_cost.rs for what runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/packages.sh
. scripts/lib/nats.sh

MESSAGES=${COST_MESSAGES:-100000}
ROUNDS=${COST_ROUNDS:-3}
# retention ack partitions subjects: the rows.
ROWS=${COST_ROWS:-"workqueue each 0 object
limits unread 0 object
limits none 0 object
limits all 0 object
workqueue each 1 object
workqueue each 8 object
workqueue each 32 object
workqueue each 8 partition
workqueue each 32 partition
limits all 8 object
limits all 8 partition
interest all 8 partition"}

NATS_SERVER=$(ensure_nats_server)
cargo build --release --quiet -p logstore-loadgen --example intake_cost
BIN=target/release/examples/intake_cost

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$NATS_SERVER" -a 127.0.0.1 -p "$port" -js -sd "$dir/js" >"$dir/nats.log" 2>&1 &
nats_pid=$!
trap 'kill "$nats_pid" 2>/dev/null; wait "$nats_pid" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  grep -q "Server is ready" "$dir/nats.log" && break
  sleep 0.1
done
grep -q "Server is ready" "$dir/nats.log" || { cat "$dir/nats.log" >&2; exit 1; }
echo "==> nats-server $(nats_server_version "$NATS_SERVER") on port $port, $MESSAGES appends a row, $ROUNDS round(s), $(nproc) cores" >&2

results="$dir/results.jsonl"
for round in $(seq "$ROUNDS"); do
  while read -r retention ack partitions subjects; do
    [ -n "$retention" ] || continue
    echo "    round $round: $retention $ack P=$partitions $subjects" >&2
    "$BIN" --url "nats://127.0.0.1:$port" --nats-pid "$nats_pid" --retention "$retention" \
      --ack "$ack" --partitions "$partitions" --subjects "$subjects" --messages "$MESSAGES" --clk-tck "$(getconf CLK_TCK)" >>"$results"
  done <<<"$ROWS"
done

mkdir -p bench/results
out=bench/results/$(date -u +%Y%m%dT%H%M%SZ)-intake-cost.md
python3 - "$results" <<'EOF' | tee "$out"
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    key = (r["retention"], r["ack"], r["partitions"], r["subjects"])
    rows.setdefault(key, []).append(r)
base = None
print("| retention | ack | partitions | stored subject | nats-server µs/append (median) | vs one-puller lane | appends/s (median) |")
print("|---|---|---|---|---|---|---|")
for key, rs in rows.items():
    us = statistics.median(r["nats_us_per_append"] for r in rs)
    rate = statistics.median(r["appends_per_s"] for r in rs)
    if base is None and key[2] == 0:
        base = us
    retention, ack, p, subjects = key
    subject = "logs" if p == 0 else ("logs.p.<k>.<id>" if subjects == "object" else "logs.p.<k>.s")
    ratio = f"{us / base:.2f}" if base else "-"
    print(f"| {retention} | {ack} | {p if p else '- (logs)'} | `{subject}` | {us:.1f} | {ratio} | {rate:,.0f} |")
EOF
