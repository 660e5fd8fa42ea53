#!/usr/bin/env python3
"""Draw loadgen `--report` per-second series as the README's PNGs (called by scripts/plots.sh).

    plots.py --machine M --date D --workers N --out DIR NAME=REPORT.json ...

Writes DIR/throughput.png (appends acknowledged per second) and DIR/latency.png (append
latency p50 and p99 per second, log scale), one line (pair) per report.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402


def describe(report):
    """One legend label: intake, batching, target rate, what the run achieved."""
    mode = "core" if report["mode"] == "core" else "JetStream"
    acked = "reply after commit" if report["mode"] == "core" else "PubAck"
    batch = report["batch"]
    per_message = "1 append/message" if batch == 1 else f"batches of {batch}"
    target = report.get("target_rate")
    target = f"{target:,.0f}/s asked" if target else "max rate"
    appends = report["appends"]
    verified = ""
    if report.get("verify") is not None:
        verified = ", verified" if report["verify"].get("ok") else ", verify FAILED"
    return (
        f"{mode} intake, {per_message}, {target}: {appends['per_sec']:,.0f}/s "
        f"({appends['ok']:,} acked: {acked}{verified})"
    )


def whole_seconds(report):
    """The series without its last, partial second (a few ms of it would read as a drop)."""
    whole = int(report["elapsed_secs"])
    return [s for s in report["series"] if s["second"] < whole]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--machine", required=True)
    parser.add_argument("--date", required=True)
    parser.add_argument("--workers", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("runs", nargs="+", metavar="NAME=REPORT.json")
    args = parser.parse_args()

    runs = []
    for spec in args.runs:
        name, _, path = spec.partition("=")
        with open(path, encoding="utf-8") as f:
            runs.append((name, json.load(f)))

    fleet = (
        f"loadgen against {args.workers} workers, 2 PostgreSQL shards, one nats-server "
        f"(scripts/local-up.sh), all on one machine"
    )
    where = f"{args.machine}, {args.date}"
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    # Appends acknowledged per second: one panel per run (their rates differ tenfold).
    fig, axes = plt.subplots(
        len(runs), 1, figsize=(10, 2.6 + 2.4 * len(runs)), dpi=110, sharex=True, squeeze=False
    )
    for (name, report), colour, ax in zip(runs, colours, axes[:, 0]):
        series = whole_seconds(report)
        ax.plot(
            [s["second"] for s in series],
            [s["appends"] for s in series],
            color=colour,
            marker=".",
            label=describe(report),
        )
        if report.get("target_rate"):
            ax.axhline(
                report["target_rate"],
                color="grey",
                linestyle=":",
                linewidth=1,
                label="the rate asked for",
            )
        ax.set_ylabel("appends/s")
        ax.set_ylim(bottom=0, top=max(s["appends"] for s in series) * 1.2)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[-1, 0].set_xlabel("time since loadgen started (s)")
    fig.suptitle(
        f"Appends acknowledged per second: {fleet}\n{where}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "throughput.png"))
    plt.close(fig)

    # Latency p50 / p99 per second (of the messages settled in that second).
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    for (name, report), colour in zip(runs, colours):
        series = [s for s in whole_seconds(report) if s["messages"] > 0]
        seconds = [s["second"] for s in series]
        per = "per message" if report["batch"] == 1 else f"per message of {report['batch']}"
        mode = "core" if report["mode"] == "core" else "JetStream"
        ax.plot(
            seconds,
            [s["p99_ms"] for s in series],
            color=colour,
            label=f"{mode} p99 ({per})",
        )
        ax.plot(
            seconds,
            [s["p50_ms"] for s in series],
            color=colour,
            linestyle="--",
            label=f"{mode} p50 ({per})",
        )
    ax.set_yscale("log")
    ax.set_xlabel("time since loadgen started (s)")
    ax.set_ylabel("append latency, send to acknowledgement (ms, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        f"Append latency per second: {fleet}\n{where}; core: reply after the Postgres commit, "
        f"JetStream: the stream's PubAck",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "latency.png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
