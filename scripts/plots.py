#!/usr/bin/env python3
"""Draw a scripts/bench.sh report (bench/results/*.json) as the README's PNGs.

    plots.py --report FILE --name SHOWN_NAME [--commit TEXT] --out DIR

Called by scripts/plots.sh. Writes:
  DIR/throughput.png  achieved appends/s stored in PostgreSQL, each intake and batching at max
                      rate (the report's (c) rows, and its (e) partitioned rows when it has them),
                      beside pgbench's rows/s on the same two PostgreSQL servers for reference
  DIR/latency.png     latency p50 / p99 / max of each row that has one (log scale), grouped by
                      what the clock stops at: the reply after the commit, the JetStream PubAck,
                      a query's answer
Every number comes from the report; nothing is measured here.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

# One colour per kind of row, the same in both figures.
CORE, JETSTREAM, PARTITIONED, PGBENCH, QUERY = (
    "#2a7ab0", "#6b8e23", "#b5651d", "#9a9a9a", "#8e44ad")


def fmt(n):
    return f"{n:,.0f}"


def verified(row):
    """' (verify FAILED)' when loadgen's read-back found a problem, else ''."""
    check = row.get("verify")
    return " (verify FAILED)" if check is not None and not check.get("ok") else ""


def pubacks(row):
    """How fast the stream took the appends in, when the report says."""
    rate = row.get("pubacks_per_s")
    return f"  (PubAcks: {fmt(rate)}/s)" if rate else ""


def throughput_rows(r):
    """(label, appends or rows per second, colour, note) for each row, top to bottom."""
    batch = r["params"].get("batch", 100)
    rows = [("core intake, 1 append per message", r["c_core"]["appends_per_s"], CORE,
             verified(r["c_core"]))]
    if r.get("c_core_batch"):
        rows.append((f"core intake, batches of {batch}", r["c_core_batch"]["appends_per_s"], CORE,
                     verified(r["c_core_batch"])))
    js = r["c_jetstream"]
    rows.append(("JetStream intake (subject logs), 1 append per message", js["appends_per_s"],
                 JETSTREAM, f"{pubacks(js)}{verified(js)}"))
    if r.get("c_jetstream_batch"):
        jb = r["c_jetstream_batch"]
        rows.append((f"JetStream intake (subject logs), batches of {batch}", jb["appends_per_s"],
                     JETSTREAM, f"{pubacks(jb)}{verified(jb)}"))
    parts = r.get("e_partitioned")
    if parts:
        for workers, p in sorted(parts["by_workers"].items(), key=lambda kv: int(kv[0])):
            who = f"{parts['partitions']} partitions, {workers} worker{'s' if workers != '1' else ''}"
            rows.append((f"JetStream, {who}, 1 append per message", p["single_per_s"],
                         PARTITIONED, ""))
            rows.append((f"JetStream, {who}, batches of {batch}", p["batch_per_s"],
                         PARTITIONED, ""))
    # PostgreSQL alone; older reports lack some of these rows.
    for key, label, unit in (
        ("a_pgbench_batched_rows_per_s", "pgbench: plain INSERT, 1,000 rows per transaction",
         "rows"),
        ("a2_pgbench_logstore_append_entries_per_s",
         "pgbench: the workers' append function, 1,000 entries\nper call (our storage alone)",
         "entries"),
        ("b_pgbench_single_rows_per_s", "pgbench: 1-row autocommit INSERT\n(the original's design)",
         "rows"),
    ):
        if r.get(key) is not None:
            rows.append((label, r[key], PGBENCH, f" ({unit})"))
    return rows


def latency_rows(r):
    """(label, {p50, p99, max}, colour) for each row that has a latency, top to bottom."""
    batch = r["params"].get("batch", 100)
    half = r["c_core_half_rate"]
    rows = [
        ("core, 1 append per message, max rate", r["c_core"]["latency_ms"], CORE),
        (f"core, 1 append per message, at half that rate ({fmt(half['rate'])}/s)",
         half["latency_ms"], CORE),
    ]
    if r.get("c_core_batch"):
        rows.append((f"core, batches of {batch}, max rate (per message of {batch})",
                     r["c_core_batch"]["latency_ms_per_message"], CORE))
    rows.append(("JetStream, 1 append per message, max rate", r["c_jetstream"]["latency_ms"],
                 JETSTREAM))
    if r.get("c_jetstream_batch"):
        rows.append((f"JetStream, batches of {batch}, max rate (per message of {batch})",
                     r["c_jetstream_batch"]["latency_ms_per_message"], JETSTREAM))
    big = r["params"].get("big_entries")
    rows.append((f"query: first page of 100 entries\nof a {fmt(big)}-entry object, one at a time",
                 r["d_first_page_latency_ms"], QUERY))
    return rows


def setting(r, name, commit):
    """The three lines every title ends with: which run, on what machine, how big."""
    m, p = r["machine"], r["params"]
    return (f"{name}{', ' + commit if commit else ''}\n"
            f"{m['cpus']} cores, {m['mem_gib']} GiB: nats-server, 2 PostgreSQL shards, the workers "
            f"and loadgen all on this one machine\n"
            f"{fmt(p['appends'])} appends of {p['log_bytes']} bytes over {fmt(p['objects'])} "
            f"objects per row, each read back with loadgen --verify (scripts/bench.sh)")


def draw_throughput(r, name, commit, path):
    rows = throughput_rows(r)
    fig, ax = plt.subplots(figsize=(11, 2.8 + 0.5 * len(rows)), dpi=110, layout="constrained")
    ys = list(range(len(rows))[::-1])
    top = max(v for _, v, _, _ in rows)
    ax.barh(ys, [v for _, v, _, _ in rows], color=[c for _, _, c, _ in rows], height=0.65)
    for y, (_, value, _, note) in zip(ys, rows):
        ax.text(value + top * 0.01, y, f"{fmt(value)}/s{note}", va="center", fontsize=8)
    ax.set_yticks(ys, [label for label, _, _, _ in rows], fontsize=8)
    ax.set_xlim(0, top * 1.4)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt(x)))
    ax.set_xlabel("achieved appends/s stored in PostgreSQL (pgbench rows: rows or entries/s "
                  "that pgbench wrote)")
    ax.grid(True, axis="x", alpha=0.3)
    kinds = [(CORE, "core intake, 2 workers: stored = acknowledged (the reply comes after the "
                    "commit)"),
             (JETSTREAM, "JetStream intake, 2 workers: appends / time until the workers had "
                         "stored the last one (PubAcks/s: how fast the stream took them)"),
             (PARTITIONED, "JetStream with partitions (JS_PARTITIONS), same measure"),
             (PGBENCH, "PostgreSQL alone: pgbench on the same 2 shards, no NATS, no workers")]
    kinds = [(c, n) for c, n in kinds if any(rc == c for _, _, rc, _ in rows)]
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=c) for c, _ in kinds], [n for _, n in kinds],
               loc="outside lower center", fontsize=8, frameon=False)
    ax.set_title("Throughput: appends stored in PostgreSQL per second, each row at the highest "
                 "rate it reached (loadgen --max-rate)\n" + setting(r, name, commit), fontsize=9)
    fig.savefig(path)
    plt.close(fig)


def draw_latency(r, name, commit, path):
    rows = latency_rows(r)
    fig, ax = plt.subplots(figsize=(11, 3.2 + 0.55 * len(rows)), dpi=110, layout="constrained")
    ys = list(range(len(rows))[::-1])
    for y, (_, lat, colour) in zip(ys, rows):
        ax.plot([lat["p50"], lat["max"]], [y, y], color=colour, linewidth=2, alpha=0.5)
        for key, marker in (("p50", "o"), ("p99", "D"), ("max", "x")):
            ax.plot(lat[key], y, marker=marker, color=colour, markersize=7, linestyle="none")
        ax.text(lat["max"] * 1.25, y, f"{lat['p50']:.2f} / {lat['p99']:.2f} / {lat['max']:.2f} ms",
                va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(lat["p50"] for _, lat, _ in rows) / 2,
                max(lat["max"] for _, lat, _ in rows) * 12)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_yticks(ys, [label for label, _, _ in rows], fontsize=8)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel("latency in ms, log scale: p50 (o), p99 (◆), max (x); numbers: p50 / p99 / max"
                  "\n\nAt max rate loadgen keeps many messages outstanding (bench.sh's "
                  "defaults: 512 core, 1,024 JetStream, 64 batch),\nso a max-rate latency "
                  "includes queueing behind them. The half-rate row is core at a fixed rate "
                  "the fleet keeps up with.", fontsize=8.5)
    ax.grid(True, which="both", axis="x", alpha=0.3)
    groups = [(CORE, "core: from sending to the worker's reply, which comes after the "
                     "PostgreSQL commit"),
              (JETSTREAM, "JetStream: from publishing to the PubAck (the append is in the "
                          "stream; the workers store it in PostgreSQL after that)"),
              (QUERY, "query: from the request to the answer")]
    fig.legend([plt.Line2D([], [], color=c, linewidth=3) for c, _ in groups],
               [n for _, n in groups], loc="outside lower center", fontsize=8, frameon=False)
    ax.set_title("Latency of each bench row: p50, p99 and max\n" + setting(r, name, commit),
                 fontsize=9)
    fig.savefig(path)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", required=True, help="a scripts/bench.sh JSON report")
    parser.add_argument("--name", required=True, help="how the titles name the report")
    parser.add_argument("--commit", default="", help="which code was measured, for the titles")
    parser.add_argument("--out", required=True, help="directory for the PNGs")
    args = parser.parse_args()
    with open(args.report, encoding="utf-8") as f:
        report = json.load(f)
    draw_throughput(report, args.name, args.commit, os.path.join(args.out, "throughput.png"))
    draw_latency(report, args.name, args.commit, os.path.join(args.out, "latency.png"))


if __name__ == "__main__":
    main()
