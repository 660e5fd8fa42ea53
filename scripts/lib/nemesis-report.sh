# shellcheck shell=bash
# Sourced by scripts/nemesis.sh: the verdict of a nemesis run.
#
# nemesis_report DIR OUT.json: reads what the run left in DIR
#   params.json     the run's settings, machine and commit
#   samples.jsonl   the sampler's lines (scripts/lib/nemesis-sampler.sh)
#   faults.jsonl    one line per fault: {"n", "kind", "target", "t", "t_done", "ok", "note"}
#   reseed.jsonl    one line per standby re-seeded after a failover: {"shard", "t", "t_sync", "ok"}
#   loadgen.json    loadgen's --report (with --verify); loadgen.rc its exit code
#   sql.txt         per shard database: name|gap objects|keys twice|ts backwards|head mismatches|
#                   tombstones with entries|entries|objects; live.<name>.txt its live object ids
# prints the Markdown verdict, writes OUT.json, and exits 1 when anything was lost, doubled or
# reordered, a check found a problem, or loadgen failed; 0 otherwise.
#
# Stalls: the stored counters are summed per shard over the workers (a restarted worker's count
# starts again; the sampler's PIDs tell processes apart, so the sums only grow). A stall of a
# series is the time from one sample where it grew to the next one where it grew, so it is an
# upper bound by at most one sampling period (0.2 s; the workers' counters also move in steps, so
# a steady load shows 0.4-0.6 s). A fault's stall
# is the longest one that began after it and before the next fault (within the load: first to
# last growth of the fleet's sum), on the fault's shard for pg-failover and pg-sigstop, else on
# the fleet's sum ("no shard stored anything"). The lowest rate is the
# fleet's stored appends over 1 s in the 30 s after the fault, as a share of the offered rate:
# it shows stalls of part of the fleet (a killed worker's partitions) that the sum hides.
nemesis_report() {
  python3 - "$@" <<'PY'
import json, os, sys
from collections import defaultdict

tmp, out = sys.argv[1], sys.argv[2]


def jsonl(name):
    path = os.path.join(tmp, name)
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


params = json.load(open(os.path.join(tmp, "params.json")))
samples, faults, reseeds = jsonl("samples.jsonl"), jsonl("faults.jsonl"), jsonl("reseed.jsonl")
try:
    loadgen = json.load(open(os.path.join(tmp, "loadgen.json")))
except (OSError, ValueError):
    loadgen = None
loadgen_rc = int(open(os.path.join(tmp, "loadgen.rc")).read().strip() or 1)

# ---- cumulative stored counts per shard, one point per sample
acc, last = defaultdict(float), {}
times, points = [], []
for s in samples:
    for slot, w in enumerate(s["w"]):
        if w is None:
            continue
        prev = last.get(slot)
        for shard, v in w["stored"].items():
            d = v - prev[1].get(shard, 0) if prev and prev[0] == w["pid"] else v
            acc[shard] += max(d, 0)
        last[slot] = (w["pid"], w["stored"])
    times.append(s["t"])
    points.append(dict(acc))
shards = sorted({k for p in points for k in p if k != "none"} | set(params["shards"]))


def series(keys):
    return [sum(p.get(k, 0) for k in keys) for p in points]


fleet = series(shards)
growth = [i for i in range(1, len(fleet)) if fleet[i] > fleet[i - 1]]
load_start = times[growth[0] - 1] if growth else None
load_end = times[growth[-1]] if growth else None


def stalls(values):
    """(start, length) of every span between two samples where the series grew, in the load."""
    runs, since = [], None
    for i in range(1, len(values)):
        if times[i] <= load_start or times[i] > load_end:
            continue
        if since is None:
            since = times[i - 1]
        if values[i] > values[i - 1]:
            runs.append((since, times[i] - since))
            since = times[i]
    return runs


# A stall belongs to the last fault that had begun by its start: the last sample where the series
# grew, plus the counters' granularity (0.7 s: a stall seen from 44.8 s on began after a fault at
# 45.0 s). -1: before the first fault.
SLACK = 0.7


def owner(start):
    return max([i for i, f in enumerate(faults) if f["t"] <= start + SLACK] or [-1])


def longest(runs, i):
    """The longest stall of the series that belongs to fault i (-1: before the first fault)."""
    return round(max([length for start, length in runs if owner(start) == i] or [0.0]), 2)


def lowest_rate(a, b):
    """The fleet's lowest stored appends/s over 1 s within [a, b], as a share of the offered rate."""
    rates, j = [], 0
    for i in range(len(times)):
        if not (a <= times[i] < b) or times[i] > load_end:
            continue
        j = max(j, i)
        while j < len(times) and times[j] - times[i] < 1.0:
            j += 1
        if j < len(times) and times[j] <= min(b, load_end):
            rates.append((fleet[j] - fleet[i]) / (times[j] - times[i]))
    return round(min(rates) / params["rate"], 2) if rates else None


faults.sort(key=lambda f: f["t"])
fleet_runs = stalls(fleet) if growth else []
shard_runs = {k: stalls(series([k])) for k in shards} if growth else {}
other_runs = {k: stalls(series([o for o in shards if o != k])) for k in shards} if growth else {}
SHARD_FAULTS = ("pg-failover", "pg-sigstop")
for i, f in enumerate(faults):
    a = f["t"]
    b = faults[i + 1]["t"] if i + 1 < len(faults) else float("inf")
    on_shard = f["kind"] in SHARD_FAULTS and f["target"] in shard_runs
    if not growth or f["t"] > load_end:  # no load left to stall (the last faults of a short run)
        f["stall_s"], f["stall_on"], f["others_stall_s"], f["lowest_rate"] = None, None, None, None
        continue
    f["stall_on"] = f["target"] if on_shard else "fleet"
    f["stall_s"] = longest(shard_runs[f["target"]] if on_shard else fleet_runs, i)
    f["others_stall_s"] = longest(other_runs[f["target"]], i) if on_shard else None
    f["lowest_rate"] = lowest_rate(f["t"], min(b, f["t"] + 30))
    f["at_s"] = round(f["t"] - load_start, 1)
baseline_end = faults[0]["t"] if faults else float("inf")
baseline = {
    "fleet_stall_s": longest(fleet_runs, -1) if growth else None,
    "shard_stall_s": {k: longest(shard_runs[k], -1) for k in params["shards"]} if growth else {},
    "lowest_rate": lowest_rate(load_start + 2, min(baseline_end, load_start + 30)) if growth else None,  # past the ramp-up
}

by_kind = {}
for f in faults:
    k = by_kind.setdefault(f["kind"], {"times": 0, "failed": 0, "stall_s": None, "stall_on": None,
                                      "others_stall_s": None, "lowest_rate": None})
    k["times"] += 1
    k["failed"] += 0 if f["ok"] else 1
    if not f["ok"]:
        continue
    if f.get("stall_s") is not None and (k["stall_s"] is None or f["stall_s"] > k["stall_s"]):
        k["stall_s"], k["stall_on"] = f["stall_s"], "that shard" if f["stall_on"] != "fleet" else "fleet"
    if f.get("others_stall_s") is not None:
        k["others_stall_s"] = max(k["others_stall_s"] or 0, f["others_stall_s"])
    if f.get("lowest_rate") is not None:
        k["lowest_rate"] = min(k["lowest_rate"] if k["lowest_rate"] is not None else 9e9, f["lowest_rate"])

# ---- worker memory
rss = []
for slot in range(params["workers"]):
    values = [s["rss"][slot] for s in samples if "rss" in s and s["rss"][slot] is not None]
    restarts = sum(1 for f in faults if f["kind"] == "worker-kill" and f["target"] == f"w{slot + 1}")
    mib = lambda kib: round(kib / 1024, 1)
    rss.append({"worker": f"w{slot + 1}", "first_mib": mib(values[0]) if values else None,
                "max_mib": mib(max(values)) if values else None, "last_mib": mib(values[-1]) if values else None,
                "samples": len(values), "restarts": restarts})

# ---- loadgen's verify
verify = (loadgen or {}).get("verify") or {}
classes = {"lost": ("missing",), "doubled": ("duplicate",), "reordered": ("out_of_order", "ts_decreased")}
listed = verify.get("problems", [])
count = lambda kinds: sum(1 for p in listed if p.get("problem") in kinds)
lost, doubled, reordered = (count(classes[c]) for c in ("lost", "doubled", "reordered"))
other = verify.get("problem_count", 0) - lost - doubled - reordered
truncated = verify.get("problem_count", 0) > len(listed)

# ---- the SQL check of every shard database
sql, live = [], {}
for line in open(os.path.join(tmp, "sql.txt")):
    name, *nums = line.strip().split("|")
    gap, twice, back, heads, tomb, entries, objects = map(int, nums)
    sql.append({"shard": name, "gap_objects": gap, "keys_twice": twice, "ts_backwards_objects": back,
                "head_mismatches": heads, "tombstones_with_entries": tomb, "entries": entries, "objects": objects})
    live[name] = set(open(os.path.join(tmp, f"live.{name}.txt")).read().split())
on_two = set()
names = sorted(live)
for i, a in enumerate(names):
    for b in names[i + 1:]:
        on_two |= live[a] & live[b]
sql_entries = sum(r["entries"] for r in sql)
sql_bad = {
    "gap_objects": sum(r["gap_objects"] for r in sql), "keys_twice": sum(r["keys_twice"] for r in sql),
    "ts_backwards_objects": sum(r["ts_backwards_objects"] for r in sql),
    "head_mismatches": sum(r["head_mismatches"] for r in sql),
    "tombstones_with_entries": sum(r["tombstones_with_entries"] for r in sql), "objects_on_two_shards": len(on_two),
    "entries_not_read_back": sql_entries - verify.get("entries", 0) if verify else None,
}
sql_ok = all(v == 0 for v in sql_bad.values())

appends = (loadgen or {}).get("appends", {})
ok = (loadgen is not None and loadgen_rc == 0 and verify.get("ok") is True and sql_ok)
report = {
    "params": params, "ok": ok, "loadgen_exit": loadgen_rc,
    "appends": {"asked": params["appends"], "sent": appends.get("sent"), "acknowledged": appends.get("ok"),
                "retries": appends.get("retries"), "failed": appends.get("failed"),
                "stored_per_metrics": round(fleet[-1]) if fleet else 0, "stored_in_sql": sql_entries,
                "elapsed_s": (loadgen or {}).get("elapsed_secs"), "errors": (loadgen or {}).get("errors")},
    "load_seconds": round(load_end - load_start, 1) if growth else None,
    "verify": {"ok": verify.get("ok"), "acked": verify.get("acked"), "found": verify.get("found"),
               "entries": verify.get("entries"), "problem_count": verify.get("problem_count"),
               "lost": lost, "doubled": doubled, "reordered": reordered, "other": other,
               "listing_truncated": truncated, "first_problems": listed[:20]},
    "sql": {"ok": sql_ok, "problems": sql_bad, "shards": sql},
    "baseline": baseline, "faults_by_kind": by_kind, "faults": faults, "reseeds": reseeds,
    "worker_rss": rss, "loadgen_series": (loadgen or {}).get("series"),
}
json.dump(report, open(out, "w"), indent=1)

fmt = lambda v, unit="": "n/a" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v}") + unit
pct = lambda v: "n/a" if v is None else f"{v:.0%}"
kinds = ", ".join(f"{k} {v['times']}" + (f" ({v['failed']} failed)" if v["failed"] else "") for k, v in by_kind.items())
print(f"\n### Nemesis run: {params['appends']:,} appends at {params['rate']:,}/s, a fault every {params['interval']} s\n")
print("| | |\n|---|---|")
print(f"| appends | {fmt(appends.get('ok'))} acknowledged (PubAck) of {params['appends']:,}; {fmt(appends.get('retries'))} retries, "
      f"{fmt(appends.get('failed'))} given up; {sql_entries:,} entries in the shards |")
print(f"| faults | {len(faults)}: {kinds or 'none'} |")
lost_s = f"{lost}" + (" (listing truncated)" if truncated else "")
print(f"| lost (acknowledged, not stored) | {lost_s} |")
print(f"| doubled (a key stored twice) | {doubled} (SQL: {sql_bad['keys_twice']} keys twice, {len(on_two)} objects on two shards) |")
print(f"| reordered | {reordered} (SQL: {sql_bad['ts_backwards_objects']} objects with ts going back along seq) |")
print(f"| other problems | verify {other}; SQL: {sql_bad['gap_objects']} objects with seq gaps, {sql_bad['head_mismatches']} head rows off, "
      f"{sql_bad['tombstones_with_entries']} tombstones with entries, {fmt(sql_bad['entries_not_read_back'])} entries not read back |")
print(f"| loadgen | exit {loadgen_rc}, verify {'OK' if verify.get('ok') else 'FAILED'} |")
print(f"| verdict | {'OK' if ok else '**FAILED**'} |")
print("\n| fault | times | longest stall | stalled series | other shards' longest stall (before the first fault: each shard's) | lowest 1 s stored rate (of offered) |")
print("|---|---:|---:|---|---:|---:|")
print(f"| none (before the first fault) | | {fmt(baseline['fleet_stall_s'], ' s')} | fleet | "
      f"{', '.join(f'{k} {v} s' for k, v in baseline['shard_stall_s'].items())} | {pct(baseline['lowest_rate'])} |")
for k, v in by_kind.items():
    print(f"| {k} | {v['times']} | {fmt(v['stall_s'], ' s')} | {fmt(v['stall_on'])} | {fmt(v['others_stall_s'], ' s')} | {pct(v['lowest_rate'])} |")
if reseeds:
    took = [round(r["t_sync"] - r["t"], 1) for r in reseeds if r.get("ok")]
    print(f"\nStandbys re-seeded after a failover: {len(took)} of {len(reseeds)}, synchronous again after "
          f"{min(took) if took else 'n/a'}-{max(took) if took else 'n/a'} s (the shard committed asynchronously meanwhile).")
print("\n| worker | RSS first (MiB) | max | last | SIGKILLed and restarted |\n|---|---:|---:|---:|---:|")
for r in rss:
    print(f"| {r['worker']} | {fmt(r['first_mib'])} | {fmt(r['max_mib'])} | {fmt(r['last_mib'])} | {r['restarts']} |")
print(f"\nJSON: {out}")
sys.exit(0 if ok else 1)
PY
}
