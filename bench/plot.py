#!/usr/bin/env python3
"""Plot a bench/run.py connection sweep: events/s and p99 against wrk connections.

    python bench/plot.py bench/results/<ts>/report.json [--out sweep.png]

Reads the ``rows`` of report.json (written by ``bench/run.py --sweep-connections ...``),
keeps the single-event rows (mode ``single`` or ``single/seed``) with a numeric connection
count, takes the median row by events/s per (target, mode, connections) when there were
several rounds (as the table does), and draws one line per target and mode: events/s on
the left, p99 latency (ms, log scale) on the right. Writes ``sweep.png`` next to
report.json unless ``--out`` says otherwise. Needs matplotlib (bench/requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Fixed colours, so the same target looks the same in every run's plot.
COLOURS = {"payflux": "tab:blue", "go-seed": "tab:green", "fastapi": "tab:orange",
           "webdis": "tab:gray"}


def sweep_points(rows: list[dict]) -> dict[tuple[str, str], list[tuple[int, float, float, int]]]:
    """(target, mode) -> [(connections, events/s, p99 µs, non-2xx)] sorted by connections."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:
        if not str(r.get("mode", "")).startswith("single") or r.get("eps") is None:
            continue
        try:
            conns = int(r["connections"])
        except (TypeError, ValueError):
            continue
        groups.setdefault((r["target"], r["mode"], conns), []).append(r)
    lines: dict[tuple[str, str], list[tuple[int, float, float, int]]] = {}
    for (target, mode, conns), group in groups.items():
        ranked = sorted(group, key=lambda r: r["eps"])
        med = ranked[(len(ranked) - 1) // 2]  # the lower middle, as bench/run.py's table
        lines.setdefault((target, mode), []).append(
            (conns, med["eps"], med["p99_us"], med.get("non2xx") or 0))
    return {k: sorted(v) for k, v in lines.items()}


def plot_report(report_json: Path, out: Path | None = None) -> Path:
    report = json.loads(Path(report_json).read_text())
    lines = sweep_points(report.get("rows", []))
    if not lines:
        raise ValueError(f"no single-event rows with a connection count in {report_json}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args = report.get("args", {})
    fig, (ax_eps, ax_p99) = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    counts = sorted({pt[0] for pts in lines.values() for pt in pts})
    for i, ((target, mode), pts) in enumerate(sorted(lines.items())):
        dy = 6 if i % 2 == 0 else -6  # value labels above / below, alternating by line
        xs = [pt[0] for pt in pts]
        label = target if mode == "single" else f"{target} ({mode.split('/', 1)[1]})"
        style = {"color": COLOURS.get(target), "marker": "o",
                 "linestyle": "-" if mode == "single/seed" else "--"}
        ax_eps.plot(xs, [pt[1] for pt in pts], label=label, **style)
        ax_p99.plot(xs, [(pt[2] or 0) / 1000 for pt in pts], label=label, **style)
        for c, e, p, bad in pts:
            # a run with non-2xx answers or socket errors: red ring and its count
            ax_eps.annotate(f"{e:,.0f}" + (f"\n({bad:,} non-2xx)" if bad else ""), (c, e),
                            textcoords="offset points", xytext=(0, dy), ha="center",
                            va="bottom" if dy > 0 else "top", fontsize=7,
                            color="red" if bad else "black")
            if bad:
                for ax, y in ((ax_eps, e), (ax_p99, (p or 0) / 1000)):
                    ax.plot([c], [y], marker="o", markersize=11, markerfacecolor="none",
                            markeredgecolor="red", linestyle="none")
            if p:
                ax_p99.annotate(f"{p / 1000:.1f}", (c, p / 1000), textcoords="offset points",
                                xytext=(0, dy), ha="center", fontsize=7,
                                va="bottom" if dy > 0 else "top")
    for ax in (ax_eps, ax_p99):
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts)
        ax.set_xticklabels([str(c) for c in counts])
        ax.set_xlabel("wrk connections")
        ax.grid(True, which="major", alpha=0.3)
    ax_eps.set_ylabel("events/s (2xx answers)")
    ax_eps.set_ylim(bottom=0)
    ax_eps.set_title("single-event throughput")
    ax_p99.set_yscale("log")
    # plain "5", "10", "20", "50" ms labels instead of 5×10^0 ...
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax_p99.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_p99.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax_p99.yaxis.set_minor_formatter(NullFormatter())
    ax_p99.set_ylabel("p99 latency (ms)")
    ax_p99.set_title("single-event p99")
    ax_eps.legend(fontsize=8)
    fig.suptitle(f"bench/run.py connection sweep — wrk -t{args.get('threads', 1)} "
                 f"-d{args.get('duration', '?')}s, {args.get('workers', 1)} server process(es); "
                 f"{Path(report_json).parent.name}", fontsize=9)
    out = Path(out) if out else Path(report_json).parent / "sweep.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="report.json of a bench/run.py sweep")
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default: sweep.png "
                    "next to report.json)")
    args = ap.parse_args()
    print(plot_report(args.report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
