# shellcheck shell=bash
# Sourced by scripts/nemesis.sh: the sampler that watches the workers while the nemesis runs.
#
# nemesis_sampler DIR PERIOD_MS RSS_EVERY_S PORT...: until the file DIR/sampler.stop exists,
# every PERIOD_MS reads each worker's /metrics (worker i serves on the i-th PORT; its current
# PID is in DIR/pids/w<i>.pid, rewritten when the worker is restarted) and appends one JSON line to
# DIR/samples.jsonl:
#   {"t": UNIX seconds, "w": [{"pid": P, "stored": {"pg1": N, ...}} or null (no answer), ...],
#    "rss": [VmRSS KiB or null, ...]}   ("rss" only every RSS_EVERY_S seconds)
# "stored" is logstore_appends_total{result="stored"} by shard, as that process counts it (a
# restarted worker starts again at 0: the report tells processes apart by PID). One process does
# all of it: a process per poll would itself take a share of the 2 cores being measured.
nemesis_sampler() {
  python3 - "$@" <<'PY'
import json, os, re, sys, time, urllib.request

tmp, period, rss_every, ports = sys.argv[1], int(sys.argv[2]) / 1000, float(sys.argv[3]), sys.argv[4:]
series = re.compile(r'^logstore_appends_total\{([^}]*)\} (\S+)$', re.M)
label = re.compile(r'(\w+)="([^"]*)"')


def pid_of(i):
    try:
        return int(open(os.path.join(tmp, "pids", f"w{i + 1}.pid")).read())
    except (OSError, ValueError):
        return None


def stored(port):
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except Exception:
        return None
    out = {}
    for labels, value in series.findall(body):
        pairs = dict(label.findall(labels))
        if pairs.get("result") == "stored":
            shard = pairs.get("shard", "?")
            out[shard] = out.get(shard, 0) + float(value)
    return out


def rss(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, TypeError):
        pass
    return None


out = open(os.path.join(tmp, "samples.jsonl"), "a", buffering=1)
next_rss = 0.0
while not os.path.exists(os.path.join(tmp, "sampler.stop")):
    started = time.time()
    workers = []
    for i, port in enumerate(ports):
        pid = pid_of(i)
        values = stored(port)
        workers.append(None if values is None or pid is None else {"pid": pid, "stored": values})
    line = {"t": round(started, 3), "w": workers}
    if started >= next_rss:
        line["rss"] = [rss(pid_of(i)) for i in range(len(ports))]
        next_rss = started + rss_every
    out.write(json.dumps(line, separators=(",", ":")) + "\n")
    time.sleep(max(0.0, period - (time.time() - started)))
PY
}
