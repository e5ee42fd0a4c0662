"""Aggregating runs over seeds and rendering the results table (text, Markdown, CSV)."""
from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossgrad.files import atomic_write_text, make_dir
from crossgrad.report.runs import as_list, collect, default_out, load_metrics, no_runs, number, stop_note
from crossgrad.run.rundir import comparable_config


@dataclass
class Stat:
    mean: float
    std: float  # sample std (ddof=1); 0.0 when n == 1
    n: int


def final_metric(key: str) -> Callable[[dict], Any]:
    return lambda s: (s.get("final") or {}).get(key) if isinstance(s.get("final"), dict) else None


def _bytes(i: int) -> Callable[[dict], Any]:
    def get(s: dict) -> Any:
        b = s.get("bytes_per_agent_per_step")
        if isinstance(b, (list, tuple)) and len(b) > i:
            return b[i]
        return None
    return get


Column = tuple[str, str, Callable[[dict], Any], str]
# (key, text header, extractor from summary, kind) ; kind: "pct" | "bytes" | "num" | "time"
COLUMNS: list[Column] = [
    ("consensus_acc", "cons. acc (%)", final_metric("consensus_acc"), "pct"),
    ("local_acc_mean", "local acc (%)", final_metric("local_acc_mean"), "pct"),
    ("best_consensus_acc", "best cons. acc (%)", lambda s: s.get("best_consensus_acc"), "pct"),
    ("bytes_round1", "B/agent/step r1", _bytes(0), "bytes"),
    ("bytes_round2", "B/agent/step r2", _bytes(1), "bytes"),
    ("grad_evals", "grad evals/step", lambda s: s.get("grad_evals_per_agent_per_step"), "num"),
    ("wall_time_s", "wall time (s)", lambda s: s.get("wall_time_s"), "time"),
]


#: `crossgrad report --metric`: which model's accuracy the first column shows, as the papers report it:
#: (column, what it is); the header names it
METRICS: dict[str, tuple[Column, str]] = {
    "consensus": (COLUMNS[0], "the consensus model (the exact average of the agents' models)"),
    "local": (("local_acc_mean", "mean local acc (%)", final_metric("local_acc_mean"), "pct"),
              "the mean over agents of each agent's own model's accuracy"),
    "worst": (("local_acc_min", "worst agent acc (%)", final_metric("local_acc_min"), "pct"),
              "the worst agent's own model"),
    "gossip": (("final_gossip_acc_mean", "post-gossip acc (%)", final_metric("final_gossip_acc_mean"), "pct"),
               "the mean local accuracy after training.final_gossip_rounds gossip-only rounds (blank without)"),
}


def time_to_accuracy(run: dict, target: float) -> float | None:
    """The first simulated time (sim_time_s, runs with a [network] section) at which the consensus accuracy
    reached `target` (a fraction), or None if it never did or the run has no simulated time."""
    for rec in load_metrics(run):
        acc, t = number(rec.get("consensus_acc")), number(rec.get("sim_time_s"))
        if acc is not None and t is not None and acc >= target:
            return t
    return None


def target_column(target: float) -> Column:
    """The time-to-accuracy column for a consensus accuracy in % (report_main puts each run's time in its
    summary first): the mean over the seeds that reached it, how many did in the CSV's _n column."""
    return ("time_to_target", f"sim s to {target:g}%", lambda s: s.get("time_to_target"), "num")


def columns_for(metric: str = "consensus") -> list[Column]:
    """COLUMNS with `metric`'s accuracy first (in place of the consensus model's, which is the default)."""
    first = METRICS[metric][0]
    return [first, *(c for c in COLUMNS[1:] if c[0] != first[0])]


@dataclass
class Row:
    setting: str
    method: str
    n_runs: int                        # all runs in the group
    n_completed: int                   # runs averaged
    seeds: list                        # seeds of the completed runs
    stats: dict[str, Stat | None]      # COLUMNS key -> Stat over completed runs (None: no data)
    incomplete: dict[str, int] = field(default_factory=dict)   # status -> count (not averaged)
    flags: list[str] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list, repr=False)


def mean_std(values: list[float]) -> Stat | None:
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Stat(mean, std, n)


def summary_label(s: dict, key: str) -> str:
    v = s.get(key)
    return str(v) if v not in (None, "") else "?"


#: keys that do not change what a run learns: how often it saves or evaluates, where its data sits, how it
#: runs (the backends are tested equal). Runs differing only in these are one method, not variants.
BOOKKEEPING_KEYS = frozenset({
    "training.seed", "data.data_dir", "backend", "training.checkpoint_every", "training.eval_every",
    "training.eval_every_steps",
})


def _flat_config(run: dict) -> dict[str, Any]:
    """The run's configuration as section.key -> value, without what does not change the result
    (seed, output, device, threads, evaluation cadence, ...; see BOOKKEEPING_KEYS)."""
    flat = comparable_config(run.get("config")) or {}
    return {k: v for k, v in flat.items() if k not in BOOKKEEPING_KEYS}


def _sort_value(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, repr(v))


def _variants(group: list[dict]) -> list[tuple[str, list[dict]]]:
    """Split runs of one (setting, method) that differ in more than their seed (an lr grid, say),
    so that they are never averaged as if they were seeds: ("lr=0.005", runs) per variant."""
    flats = [_flat_config(r) for r in group]
    keys = sorted({k for f in flats for k in f})
    differing = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
    if not differing:
        return [("", group)]
    buckets: dict[tuple, list[dict]] = {}
    for run, flat in zip(group, flats, strict=True):
        # lists (training.lr_milestones) as tuples: a bucket key must be hashable
        values = tuple(tuple(v) if isinstance(v, list) else v for v in (flat.get(k) for k in differing))
        buckets.setdefault(values, []).append(run)
    out = []
    for values in sorted(buckets, key=lambda vs: tuple(_sort_value(v) for v in vs)):
        label = " ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float)
                         else f"{k.split('.')[-1]}={list(v) if isinstance(v, tuple) else v}"
                         for k, v in zip(differing, values, strict=True))
        out.append((label, buckets[values]))
    return out


def aggregate(runs: Sequence[dict], columns: Sequence[Column] = COLUMNS) -> list[Row]:
    """Group runs by (setting, method) and average the completed ones over seeds, in each of `columns`.

    Runs of one method whose configurations differ in more than the seed become separate rows,
    their method labelled with the differing values (e.g. ``NGC (α=0) [lr=0.005]``)."""
    by_method: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        s = run["summary"]
        by_method.setdefault((summary_label(s, "setting"), summary_label(s, "method")), []).append(run)
    groups: dict[tuple[str, str], list[dict]] = {}
    for (setting, method), grp in by_method.items():
        for label, runs_of in _variants(grp):
            groups[(setting, f"{method} [{label}]" if label else method)] = runs_of
    rows = []
    for (setting, method), grp in sorted(groups.items()):
        done = [r for r in grp if r["summary"].get("status") == "completed"]
        incomplete: dict[str, int] = {}
        for r in grp:
            st = r["summary"].get("status")
            if st != "completed":
                st = str(st) if st is not None else "no status"
                incomplete[st] = incomplete.get(st, 0) + 1
        stats = {}
        for key, _, get, _kind in columns:
            vals = [number(get(r["summary"])) for r in done]
            stats[key] = mean_std([v for v in vals if v is not None])
        seeds = sorted((r["summary"].get("seed") for r in done), key=lambda x: (x is None, str(x)))
        flags = [f"{c} {st}" for st, c in sorted(incomplete.items())]
        if not done:
            flags.append("no completed runs")
        dups = sorted({str(x) for x in seeds if x is not None and seeds.count(x) > 1})
        if dups:
            flags.append("duplicate seed " + ",".join(dups))
        qp = sum(number(r["summary"].get("qp_failures")) or 0 for r in done)
        if qp:
            flags.append(f"qp_failures={qp:g}")
        rows.append(Row(setting, method, len(grp), len(done), seeds, stats, incomplete, flags,
                        list(grp)))
    return rows


def _human_bytes(b: float) -> str:
    if not math.isfinite(b):
        return str(b)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(b) < 1000 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.2f} {unit}"
        b /= 1000.0
    return f"{b:.2f} GB"  # unreachable


def _fmt_stat(st: Stat | None, kind: str, n_row: int) -> str:
    if st is None:
        return ""
    if kind == "pct":
        if st.n == 1:  # one run has no spread to show
            return f"{100 * st.mean:.2f} (n=1)"
        s = f"{100 * st.mean:.2f} ± {100 * st.std:.2f}"
        return s + (f" (n={st.n})" if st.n != n_row else "")
    if kind == "bytes":
        return _human_bytes(st.mean)
    if kind == "time":
        return f"{st.mean:.1f}"
    return f"{st.mean:.3g}"


def _text_cells(row: Row, columns: Sequence[Column]) -> list[str]:
    seeds = ",".join("?" if x is None else str(x) for x in row.seeds)
    cells = [row.setting, row.method, f"{row.n_completed}/{row.n_runs}", seeds]
    cells += [_fmt_stat(row.stats.get(k), kind, row.n_completed) for k, _, _, kind in columns]
    cells.append("; ".join(row.flags))
    return cells


def _text_headers(columns: Sequence[Column]) -> list[str]:
    return ["setting", "method", "n ok/all", "seeds"] + [h for _, h, _, _ in columns] + ["flags"]


def _csv_headers(columns: Sequence[Column]) -> list[str]:
    hs = ["setting", "method", "n_runs", "n_completed", "n_incomplete", "incomplete", "seeds"]
    for key, _, _, kind in columns:
        unit = "_pct" if kind == "pct" else ""
        hs += [f"{key}{unit}_mean", f"{key}{unit}_std", f"{key}_n"]
    return hs + ["flags"]


def _csv_cells(row: Row, columns: Sequence[Column]) -> list:
    cells: list = [row.setting, row.method, row.n_runs, row.n_completed,
                   sum(row.incomplete.values()),
                   ";".join(f"{st}={c}" for st, c in sorted(row.incomplete.items())),
                   ";".join("?" if x is None else str(x) for x in row.seeds)]
    for key, _, _, kind in columns:
        st = row.stats.get(key)
        if st is None:
            cells += ["", "", 0]
        else:
            k = 100.0 if kind == "pct" else 1.0
            cells += [repr(round(k * st.mean, 10)), repr(round(k * st.std, 10)), st.n]
    return cells + ["; ".join(row.flags)]


def format_table(rows: Sequence[Row], fmt: str = "text", columns: Sequence[Column] = COLUMNS) -> str:
    """Render rows (aggregated with the same `columns`) as an aligned text table, a Markdown table or CSV.

    Accuracies are percentages, mean ± sample std over the completed seeds; "n ok/all" counts
    completed runs over all runs of the group; flags name runs that were not averaged.
    """
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(_csv_headers(columns))
        for r in rows:
            w.writerow(_csv_cells(r, columns))
        return buf.getvalue()
    headers = _text_headers(columns)
    left = {0, 1, 3, len(headers) - 1}  # left-aligned text columns
    body = [_text_cells(r, columns) for r in rows]
    if fmt == "markdown":
        def esc(c: str) -> str:
            return c.replace("|", "\\|")
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join(":---" if i in left else "---:" for i in range(len(headers))) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in cells) + " |" for cells in body]
        return "\n".join(lines) + "\n"
    if fmt != "text":
        raise ValueError(f"unknown table format {fmt!r} (expected 'text', 'markdown' or 'csv')")
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    lines = [line(headers), "  ".join("-" * w for w in widths)]
    prev = None
    for r, cells in zip(rows, body):
        if prev is not None and r.setting == prev:
            cells = [""] + cells[1:]  # do not repeat the setting within a block
        prev = r.setting
        lines.append(line(cells))
    return "\n".join(lines) + "\n"


def report_main(paths: Sequence[str | Path], out: str | Path | None = None, metric: str = "consensus",
                target: float | None = None) -> int:
    """Print the aggregated table; write report.md and report.csv into ``out``.

    ``out`` defaults to the first path when it is a directory; ``metric`` (a key of METRICS) is the
    accuracy the first column shows; ``target`` (a consensus accuracy in %) adds the first simulated time
    it was reached. Returns 0, or 2 when no run was found or the target is not in (0, 100].
    """
    if target is not None and not 0 < target <= 100:
        print(f"crossgrad: error: --target must be an accuracy in (0, 100] (percent), not {target:g}",
              file=sys.stderr)
        return 2
    paths = as_list(paths)
    runs = collect(paths)
    if not runs:
        return no_runs(paths)
    columns = columns_for(metric)
    if target is not None:
        columns.append(target_column(target))
        for run in runs:
            run["summary"] = {**run["summary"], "time_to_target": time_to_accuracy(run, target / 100)}
    rows = aggregate(runs, columns)
    note = ("accuracies in %, mean ± sample std (ddof=1) over completed seeds; "
            "runs not completed are counted in 'n ok/all' and flagged, not averaged")
    if metric != "consensus":
        note = f"'{columns[0][1]}': {METRICS[metric][1]}; {note}"
    print(format_table(rows, "text", columns), end="")
    print(f"({len(runs)} runs; {note})")
    bad = [r for row in rows for r in row.runs if r["summary"].get("status") != "completed"]
    for r in bad:
        where = stop_note(r["summary"])
        print(f"  not averaged: {r['path']} (status: {r['summary'].get('status')}{'; ' + where if where else ''})")
    out_dir = default_out(paths, out)
    if out_dir is not None:
        make_dir(out_dir)
        md = ["# crossgrad results", "",
              f"Runs: {len(runs)} from {', '.join(f'`{p}`' for p in paths)}.", "",
              note[0].upper() + note[1:] + ".", "", format_table(rows, "markdown", columns)]
        if bad:
            md += ["## Runs not averaged", ""]
            md += [f"- `{r['path']}`: {r['summary'].get('status')}"
                   + (f" ({stop_note(r['summary'])})" if stop_note(r["summary"]) else "") for r in bad]
            md.append("")
        atomic_write_text(out_dir / "report.md", "\n".join(md))
        atomic_write_text(out_dir / "report.csv", format_table(rows, "csv", columns))
        print(f"wrote {out_dir / 'report.md'} and {out_dir / 'report.csv'}")
    return 0
