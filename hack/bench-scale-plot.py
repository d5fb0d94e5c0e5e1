#!/usr/bin/env python3
"""Plots the scale harness's results (benches/results/scale.json, written by
hack/bench-scale.sh): offer-to-assignment latency and placement rate against agents,
latency against the offered rate, and the owner's heartbeat round, tick and memory
against the pods it tracks."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402


def main():
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "benches/results/scale.json")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else source.parent)
    results = json.loads(source.read_text())
    title = f"{results['date']}, {results['machine']['cpus']} CPUs"
    runs = [r for r in results["agents"] if r.get("phases")]
    places = [p for p in results.get("placement", []) if "per_pod_ms" in p]
    tracks = [t for t in results["tracking"] if "rounds" in t]
    written = []

    if runs or places:
        fig, (lat, rate) = plt.subplots(1, 2, figsize=(11, 4.2))
        agents = [r["agents"] for r in runs]
        # The lowest rate, which every run measured: latency with the least queueing.
        first = [r["phases"][0] for r in runs]
        if runs:
            offered = f" at {first[0]['rate']:g} pods/s"
            lat.plot(agents, [p["p50_ms"] for p in first], "o-", label=f"p50{offered}")
            lat.plot(agents, [p["p99_ms"] for p in first], "s-", label=f"p99{offered}")
            for n, p in zip(agents, first):
                if p["saturated"]:
                    lat.annotate(
                        f"saturated: {p['assigned']} of {p['pods']} placed",
                        (n, p["p99_ms"]),
                        textcoords="offset points",
                        xytext=(-60, 8),
                        fontsize="small",
                    )
        if places:
            lat.plot(
                [p["agents"] for p in places],
                [p["per_pod_ms"] for p in places],
                "^:",
                label="owner CPU per pod (no mesh)",
            )
        lat.plot([1000, 10000], [100, 250], "k_", markersize=18, mew=2, label="target p99")
        lat.set_xscale("log")
        lat.set_yscale("log")
        lat.set_xlabel("agents")
        lat.set_ylabel("ms")
        lat.set_title("offer to assignment")
        lat.legend(fontsize="small")
        lat.grid(True, which="both", alpha=0.3)
        if runs:
            # The highest rate placed in full; a run that saturated at its lowest rate
            # shows what that phase placed per second.
            kept = [
                (r["agents"], max(p["sustained_per_s"] for p in r["phases"] if not p["saturated"]))
                for r in runs
                if any(not p["saturated"] for p in r["phases"])
            ]
            if kept:
                rate.plot(*zip(*kept), "o-", label="highest rate placed in full (mesh)")
            collapsed = [
                (r["agents"], r["phases"][0]["sustained_per_s"])
                for r in runs
                if r["phases"][0]["saturated"]
            ]
            if collapsed:
                rate.plot(
                    *zip(*collapsed),
                    "rx",
                    markersize=9,
                    label=f"saturated at {runs[0]['phases'][0]['rate']:g} pods/s (mesh)",
                )
        if places:
            rate.plot(
                [p["agents"] for p in places],
                [p["max_pods_per_s"] for p in places],
                "^:",
                label="owner CPU bound (no mesh)",
            )
        rate.axhline(1000, color="k", linestyle="--", label="target 1,000/s")
        rate.set_xscale("log")
        rate.set_yscale("log")
        rate.set_xlabel("agents")
        rate.set_ylabel("pods placed per second")
        rate.set_title("one owner")
        rate.legend(fontsize="small")
        rate.grid(True, which="both", alpha=0.3)
        fig.suptitle(f"Placement against agents ({title})")
        fig.tight_layout()
        path = out / "scale-vs-agents.png"
        fig.savefig(path, dpi=110)
        written.append(path)

    if runs:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for r in runs:
            phases = r["phases"]
            ax.plot(
                [p["rate"] for p in phases],
                [p["p99_ms"] for p in phases],
                "o-",
                label=f"{r['agents']:,} agents, p99",
            )
            ax.plot(
                [p["rate"] for p in phases],
                [p["p50_ms"] for p in phases],
                "x--",
                label=f"{r['agents']:,} agents, p50",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        rates = sorted({p["rate"] for r in runs for p in r["phases"]})
        ax.set_xticks(rates, [f"{x:g}" for x in rates])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("pods offered per second")
        ax.set_ylabel("offer to assignment (ms)")
        ax.set_title(f"Latency against load ({title})")
        ax.legend(fontsize="small")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = out / "scale-vs-rate.png"
        fig.savefig(path, dpi=110)
        written.append(path)

    # Pod counts not run for want of memory, extrapolated from the largest run: memory in
    # proportion to pods, a heartbeat round to pods times agents (each heartbeat looks at
    # every pod), a tick to pods.
    skipped = [t for t in results["tracking"] if "needed_gib" in t]
    if tracks:
        fig, (time, mem) = plt.subplots(1, 2, figsize=(11, 4.2))
        pods = [t["pods"] for t in tracks]
        big = tracks[-1]
        for t in skipped:
            scale = t["pods"] / big["pods"]
            work = scale * t["agents"] / big["agents"]
            time.plot(
                [big["pods"], t["pods"]],
                [big["rounds"][-1]["round_secs"], big["rounds"][-1]["round_secs"] * work],
                "o--",
                mfc="none",
                color="C0",
                label=f"{t['pods']:,} pods extrapolated (not run: memory)",
            )
            time.plot(
                [big["pods"], t["pods"]],
                [big["tick_ms_median"] / 1000, big["tick_ms_median"] / 1000 * scale],
                "s--",
                mfc="none",
                color="C1",
            )
            mem.plot(
                [big["pods"], t["pods"]],
                [big["rss_end_mib"] / 1024, big["rss_end_mib"] / 1024 * scale],
                "o--",
                mfc="none",
                color="C0",
                label=f"{t['pods']:,} pods extrapolated (not run)",
            )
        time.plot(pods, [t["rounds"][-1]["round_secs"] for t in tracks], "o-", color="C0", label="heartbeat round (s)")
        time.plot(pods, [t["tick_ms_median"] / 1000 for t in tracks], "s-", color="C1", label="owner tick (s)")
        time.axhline(results["heartbeat_interval_secs"], color="k", linestyle="--", label="heartbeat interval")
        time.axhline(0.02, color="grey", linestyle=":", label="tick interval")
        time.set_xscale("log")
        time.set_yscale("log")
        time.set_xlabel("pods tracked (100 per agent)")
        time.set_ylabel("seconds")
        time.legend(fontsize="small")
        time.grid(True, which="both", alpha=0.3)
        mem.plot(pods, [t["rss_end_mib"] / 1024 for t in tracks], "o-", color="C0", label="owner RSS")
        mem.axhline(4, color="k", linestyle="--", label="target 4 GiB")
        mem.set_xscale("log")
        mem.set_yscale("log")
        mem.set_xlabel("pods tracked")
        mem.set_ylabel("GiB")
        mem.legend()
        mem.grid(True, which="both", alpha=0.3)
        fig.suptitle(f"One owner against the pods it tracks ({title})")
        fig.tight_layout()
        path = out / "scale-vs-pods.png"
        fig.savefig(path, dpi=110)
        written.append(path)

    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
