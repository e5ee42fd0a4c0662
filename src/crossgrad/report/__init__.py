"""Collect finished runs, aggregate them over seeds, and print tables / draw learning curves.

A *run directory* is any directory holding a ``summary.json`` (written by the runner), usually
next to ``metrics.jsonl`` (one JSON object per evaluation) and ``config.toml``::

    runs = collect(["results/"])
    rows = aggregate(runs)
    print(format_table(rows))              # aligned text; also "markdown" and "csv"
    report_main(["results/"])              # prints + writes results/report.md, results/report.csv
    plot_main(["results/"])                # results/curves_<setting>.png, cost_<setting>.png (and .svg)

Statistics: mean ± sample standard deviation (ddof=1) over the *completed* seeds of each
(setting, method) group.  Runs whose status is not "completed" (stopped, interrupted, terminated,
failed, killed, running and crashed runs included) are counted and flagged in the table, never
averaged; the report lists each with what its status.json says (the step, the continue command).  A group with one seed shows
its value and "(n=1)", no spread.

``runs`` reads run directories, ``table`` aggregates and renders, ``plots`` draws.
Run as a script: ``python -m crossgrad.report [table|plot] PATH... [--out DIR]``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from crossgrad.report.plots import DEFAULT_METRICS, plot_alpha_sweep, plot_main
from crossgrad.report.runs import collect, load_metrics
from crossgrad.report.table import COLUMNS, METRICS, Row, Stat, aggregate, columns_for, format_table, report_main

__all__ = [
    "COLUMNS", "METRICS", "Stat", "Row", "columns_for", "collect", "load_metrics", "aggregate", "format_table",
    "report_main", "plot_main", "plot_alpha_sweep", "main",
]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crossgrad.report",
                                 usage="%(prog)s [table|plot] PATH... [--out DIR] [--metrics A,B]",
                                 description="Aggregate crossgrad runs (table) or plot curves.")
    ap.add_argument("paths", nargs="+", help="result directories (searched recursively)")
    ap.add_argument("--out", default=None, help="output directory (default: first path)")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    ap.add_argument("--metric", choices=list(METRICS), default="consensus", help="the table's accuracy column")
    argv = list(sys.argv[1:] if argv is None else argv)
    what = argv.pop(0) if argv and argv[0] in ("table", "plot") else "table"
    a = ap.parse_args(argv)
    if what == "plot":
        return plot_main(a.paths, a.out, tuple(m for m in a.metrics.split(",") if m))
    return report_main(a.paths, a.out, a.metric)
