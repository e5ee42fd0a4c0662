"""Collect finished runs, aggregate them over seeds, and print tables / draw learning curves.

A *run directory* is any directory holding a ``summary.json`` (written by the runner), usually
next to ``metrics.jsonl`` (one JSON object per evaluation) and a config::

    runs = collect(["results/"])
    rows = aggregate(runs)
    print(format_table(rows))              # aligned text; also "markdown" and "csv"
    report_main(["results/"])              # prints + writes results/report.md, results/report.csv
    plot_main(["results/"])                # results/curves_<setting>.png / .svg

Statistics: mean ± sample standard deviation (ddof=1) over the *completed* seeds of each
(setting, method) group.  Runs whose status is not "completed" are counted and flagged in the
table, never averaged.  A group with one seed shows "± 0.00 (n=1)".
Run as a script: ``python -m crossgrad.report [plot] PATH... [--out DIR]``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Stat", "Row", "collect", "load_metrics", "aggregate", "format_table", "report_main",
    "plot_main", "plot_alpha_sweep", "main",
]

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
# files that mark a directory as a (possibly crashed) run directory even without a summary
_RUN_MARKERS = ("metrics.jsonl", "config.json", "config.yaml", "config.yml", "checkpoint.pt")


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------- collect
def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        _warn(f"cannot read {path}: {e}; skipped")
        return None


def _load_run(run_dir: Path) -> dict | None:
    summary = _read_json(run_dir / SUMMARY)
    if summary is None:
        return None
    if not isinstance(summary, dict):
        _warn(f"{run_dir / SUMMARY} is not a JSON object; skipped")
        return None
    config = summary.get("config")
    if not isinstance(config, dict) and (run_dir / "config.json").is_file():
        config = _read_json(run_dir / "config.json")
    return {"path": str(run_dir), "summary": summary,
            "config": config if isinstance(config, dict) else None}


def collect(paths: Iterable[str | Path]) -> list[dict]:
    """Find run directories (those with a summary.json) recursively under each path.

    Returns ``[{"path": str, "summary": dict, "config": dict | None}, ...]`` sorted by path.
    Unreadable summaries and run-looking directories without a summary are skipped with a
    warning on stderr.  Run directories are not searched further (their subfolders are not runs).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: dict[str, dict] = {}
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name == SUMMARY:
            p = p.parent
        if not p.exists():
            _warn(f"{p} does not exist; skipped")
            continue
        if not p.is_dir():
            _warn(f"{p} is not a directory; skipped")
            continue
        for root, dirs, files in os.walk(p):
            dirs.sort()
            root_p = Path(root)
            if SUMMARY in files:
                dirs[:] = []  # a run directory: do not descend
                key = str(root_p.resolve())
                if key not in found:
                    run = _load_run(root_p)
                    if run is not None:
                        found[key] = run
            elif any(m in files for m in _RUN_MARKERS):
                _warn(f"{root_p} has no {SUMMARY} (unfinished or crashed run?); skipped")
    return sorted(found.values(), key=lambda r: r["path"])


def load_metrics(run: dict | str | Path) -> list[dict]:
    """The evaluation records of a run (``metrics.jsonl``); bad lines are skipped with a warning."""
    run_dir = Path(run["path"] if isinstance(run, dict) else run)
    path = run_dir / METRICS
    if not path.is_file():
        return []
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    _warn(f"{path}:{lineno}: invalid JSON ({e}); line skipped")
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
    except (OSError, UnicodeDecodeError) as e:
        _warn(f"cannot read {path}: {e}; skipped")
    return records


# --------------------------------------------------------------------------------- aggregate
@dataclass
class Stat:
    mean: float
    std: float  # sample std (ddof=1); 0.0 when n == 1
    n: int


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _final(key: str) -> Callable[[dict], Any]:
    return lambda s: (s.get("final") or {}).get(key) if isinstance(s.get("final"), dict) else None


def _bytes(i: int) -> Callable[[dict], Any]:
    def get(s: dict) -> Any:
        b = s.get("bytes_per_agent_per_step")
        if isinstance(b, (list, tuple)) and len(b) > i:
            return b[i]
        return None
    return get


# (key, text header, extractor from summary, kind) ; kind: "pct" | "bytes" | "num" | "time"
COLUMNS: list[tuple[str, str, Callable[[dict], Any], str]] = [
    ("consensus_acc", "cons. acc (%)", _final("consensus_acc"), "pct"),
    ("local_acc_mean", "local acc (%)", _final("local_acc_mean"), "pct"),
    ("best_consensus_acc", "best cons. acc (%)", lambda s: s.get("best_consensus_acc"), "pct"),
    ("bytes_round1", "B/agent/step r1", _bytes(0), "bytes"),
    ("bytes_round2", "B/agent/step r2", _bytes(1), "bytes"),
    ("grad_evals", "grad evals/step", lambda s: s.get("grad_evals_per_agent_per_step"), "num"),
    ("wall_time_s", "wall time (s)", lambda s: s.get("wall_time_s"), "time"),
]


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


def _stat(values: list[float]) -> Stat | None:
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Stat(mean, std, n)


def _label(s: dict, key: str) -> str:
    v = s.get(key)
    return str(v) if v not in (None, "") else "?"


def _flat_config(summary: dict) -> dict[str, Any]:
    """The run's configuration as section.key -> value, without what does not change the result
    (seed, output, device, threads, ...) and without the data folder (the same files may sit anywhere)."""
    from crossgrad.experiment import _comparable_config

    flat = _comparable_config(summary.get("config")) or {}
    return {k: v for k, v in flat.items() if k not in ("training.seed", "data.data_dir")}


def _sort_value(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, repr(v))


def _variants(group: list[dict]) -> list[tuple[str, list[dict]]]:
    """Split runs of one (setting, method) that differ in more than their seed (an lr grid, say),
    so that they are never averaged as if they were seeds: ("lr=0.005", runs) per variant."""
    flats = [_flat_config(r["summary"]) for r in group]
    keys = sorted({k for f in flats for k in f})
    differing = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
    if not differing:
        return [("", group)]
    buckets: dict[tuple, list[dict]] = {}
    for run, flat in zip(group, flats, strict=True):
        buckets.setdefault(tuple(flat.get(k) for k in differing), []).append(run)
    out = []
    for values in sorted(buckets, key=lambda vs: tuple(_sort_value(v) for v in vs)):
        label = " ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                         for k, v in zip(differing, values, strict=True))
        out.append((label, buckets[values]))
    return out


def aggregate(runs: Sequence[dict]) -> list[Row]:
    """Group runs by (setting, method) and average the completed ones over seeds.

    Runs of one method whose configurations differ in more than the seed become separate rows,
    their method labelled with the differing values (e.g. ``NGC (α=0) [lr=0.005]``)."""
    by_method: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        s = run["summary"]
        by_method.setdefault((_label(s, "setting"), _label(s, "method")), []).append(run)
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
        for key, _, get, _kind in COLUMNS:
            vals = [_num(get(r["summary"])) for r in done]
            stats[key] = _stat([v for v in vals if v is not None])
        seeds = sorted((r["summary"].get("seed") for r in done), key=lambda x: (x is None, str(x)))
        flags = [f"{c} {st}" for st, c in sorted(incomplete.items())]
        if not done:
            flags.append("no completed runs")
        dups = sorted({str(x) for x in seeds if x is not None and seeds.count(x) > 1})
        if dups:
            flags.append("duplicate seed " + ",".join(dups))
        qp = sum(_num(r["summary"].get("qp_failures")) or 0 for r in done)
        if qp:
            flags.append(f"qp_failures={qp:g}")
        rows.append(Row(setting, method, len(grp), len(done), seeds, stats, incomplete, flags,
                        list(grp)))
    return rows


# ------------------------------------------------------------------------------------ format
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
        s = f"{100 * st.mean:.2f} ± {100 * st.std:.2f}"
        if st.n == 1 or st.n != n_row:
            s += f" (n={st.n})"
        return s
    if kind == "bytes":
        return _human_bytes(st.mean)
    if kind == "time":
        return f"{st.mean:.1f}"
    return f"{st.mean:.3g}"


def _text_cells(row: Row) -> list[str]:
    seeds = ",".join("?" if x is None else str(x) for x in row.seeds)
    cells = [row.setting, row.method, f"{row.n_completed}/{row.n_runs}", seeds]
    cells += [_fmt_stat(row.stats.get(k), kind, row.n_completed) for k, _, _, kind in COLUMNS]
    cells.append("; ".join(row.flags))
    return cells


_TEXT_HEADERS = ["setting", "method", "n ok/all", "seeds"] + [h for _, h, _, _ in COLUMNS] + ["flags"]
_LEFT = {0, 1, 3, len(_TEXT_HEADERS) - 1}  # left-aligned text columns


def _csv_headers() -> list[str]:
    hs = ["setting", "method", "n_runs", "n_completed", "n_incomplete", "incomplete", "seeds"]
    for key, _, _, kind in COLUMNS:
        unit = "_pct" if kind == "pct" else ""
        hs += [f"{key}{unit}_mean", f"{key}{unit}_std", f"{key}_n"]
    return hs + ["flags"]


def _csv_cells(row: Row) -> list:
    cells: list = [row.setting, row.method, row.n_runs, row.n_completed,
                   sum(row.incomplete.values()),
                   ";".join(f"{st}={c}" for st, c in sorted(row.incomplete.items())),
                   ";".join("?" if x is None else str(x) for x in row.seeds)]
    for key, _, _, kind in COLUMNS:
        st = row.stats.get(key)
        if st is None:
            cells += ["", "", 0]
        else:
            k = 100.0 if kind == "pct" else 1.0
            cells += [repr(round(k * st.mean, 10)), repr(round(k * st.std, 10)), st.n]
    return cells + ["; ".join(row.flags)]


def format_table(rows: Sequence[Row], fmt: str = "text") -> str:
    """Render rows as an aligned text table, a Markdown table or CSV.

    Accuracies are percentages, mean ± sample std over the completed seeds; "n ok/all" counts
    completed runs over all runs of the group; flags name runs that were not averaged.
    """
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(_csv_headers())
        for r in rows:
            w.writerow(_csv_cells(r))
        return buf.getvalue()
    body = [_text_cells(r) for r in rows]
    if fmt == "markdown":
        def esc(c: str) -> str:
            return c.replace("|", "\\|")
        lines = ["| " + " | ".join(_TEXT_HEADERS) + " |",
                 "|" + "|".join(":---" if i in _LEFT else "---:" for i in range(len(_TEXT_HEADERS))) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in cells) + " |" for cells in body]
        return "\n".join(lines) + "\n"
    if fmt != "text":
        raise ValueError(f"unknown table format {fmt!r} (expected 'text', 'markdown' or 'csv')")
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(_TEXT_HEADERS)]

    def line(cells: list[str]) -> str:
        out = [c.ljust(w) if i in _LEFT else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    lines = [line(_TEXT_HEADERS), "  ".join("-" * w for w in widths)]
    prev = None
    for r, cells in zip(rows, body):
        if prev is not None and r.setting == prev:
            cells = [""] + cells[1:]  # do not repeat the setting within a block
        prev = r.setting
        lines.append(line(cells))
    return "\n".join(lines) + "\n"


def _default_out(paths: Sequence[str | Path], out: str | Path | None) -> Path | None:
    if out is not None:
        return Path(out)
    if paths and Path(paths[0]).is_dir():
        return Path(paths[0])
    return None


def _as_list(paths: Any) -> list:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def report_main(paths: Sequence[str | Path], out: str | Path | None = None) -> int:
    """Print the aggregated table; write report.md and report.csv into ``out``.

    ``out`` defaults to the first path when it is a directory.  Returns 0, or 2 when no run was
    found.
    """
    paths = _as_list(paths)
    runs = collect(paths)
    if not runs:
        print(f"error: no runs found (no {SUMMARY} under: {', '.join(map(str, paths)) or 'nothing'})",
              file=sys.stderr)
        return 2
    rows = aggregate(runs)
    note = ("accuracies in %, mean ± sample std (ddof=1) over completed seeds; "
            "runs not completed are counted in 'n ok/all' and flagged, not averaged")
    print(format_table(rows, "text"), end="")
    print(f"({len(runs)} runs; {note})")
    bad = [r for row in rows for r in row.runs if r["summary"].get("status") != "completed"]
    for r in bad:
        print(f"  not averaged: {r['path']} (status: {r['summary'].get('status')})")
    out_dir = _default_out(paths, out)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        md = ["# crossgrad results", "",
              f"Runs: {len(runs)} from {', '.join(f'`{p}`' for p in paths)}.", "",
              note[0].upper() + note[1:] + ".", "", format_table(rows, "markdown")]
        if bad:
            md += ["## Runs not averaged", ""]
            md += [f"- `{r['path']}`: {r['summary'].get('status')}" for r in bad]
            md.append("")
        (out_dir / "report.md").write_text("\n".join(md), encoding="utf-8")
        (out_dir / "report.csv").write_text(format_table(rows, "csv"), encoding="utf-8")
        print(f"wrote {out_dir / 'report.md'} and {out_dir / 'report.csv'}")
    return 0


# -------------------------------------------------------------------------------------- plots
_PCT_METRICS = {"consensus_acc", "local_acc_mean", "local_acc_min", "local_acc_max"}
_YLABELS = {
    "consensus_acc": "consensus accuracy (%)",
    "local_acc_mean": "mean local accuracy (%)",
    "local_acc_min": "min local accuracy (%)",
    "local_acc_max": "max local accuracy (%)",
    "consensus_loss": "consensus loss (cross-entropy)",
    "train_loss": "training loss (cross-entropy)",
    "consensus_distance": "consensus distance",
    "bias_mv": "model-variant bias",
    "bias_dv": "data-variant bias",
    "lr": "learning rate",
    "wall_time_s": "wall time (s)",
}


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", s).strip("-.") or "all"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # before pyplot is imported
    import matplotlib.pyplot as plt
    return plt


def _save(fig, base: Path) -> list[Path]:
    import matplotlib
    out = []
    with matplotlib.rc_context({"svg.hashsalt": "crossgrad"}):
        for ext in ("png", "svg"):
            p = base.with_suffix(f".{ext}")
            kw = {"dpi": 150} if ext == "png" else {"metadata": {"Date": None}}
            fig.savefig(p, bbox_inches="tight", **kw)
            out.append(p)
    return out


def _curve(records_per_run: list[list[dict]], metric: str):
    """Mean/min/max of one metric over seeds, per epoch (epochs present in any seed)."""
    import numpy as np
    by_epoch: dict[float, list[float]] = {}
    for recs in records_per_run:
        for rec in recs:
            x, y = _num(rec.get("epoch")), _num(rec.get(metric))
            if x is None or y is None or not math.isfinite(y):
                continue
            if metric == "consensus_distance" and x == 0:
                continue  # every agent starts from the same weights: 0 up to rounding, off any log scale
            by_epoch.setdefault(round(x, 6), []).append(y)
    if not by_epoch:
        return None
    xs = np.array(sorted(by_epoch))
    ys = [np.array(by_epoch[x]) for x in xs]
    k = 100.0 if metric in _PCT_METRICS else 1.0
    return (xs, k * np.array([y.mean() for y in ys]), k * np.array([y.min() for y in ys]),
            k * np.array([y.max() for y in ys]))


def plot_main(paths: Sequence[str | Path], out: str | Path | None = None,
              metrics: Sequence[str] = ("consensus_acc", "train_loss", "consensus_distance")) -> int:
    """Learning curves: one figure per setting, a subplot per metric, a colour per method.

    Seeds of a method are drawn as their mean with a shaded min–max band.  Only completed runs
    are drawn; a method with no completed run is drawn dashed from its incomplete runs.
    Saves ``curves_<setting-slug>.png`` and ``.svg``.  Returns 0, or 2 when nothing to plot.
    """
    paths = _as_list(paths)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    runs = collect(paths)
    if not runs:
        print(f"error: no runs found (no {SUMMARY} under: {', '.join(map(str, paths)) or 'nothing'})",
              file=sys.stderr)
        return 2
    out_dir = _default_out(paths, out) or Path(".")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = aggregate(runs)
    plt = _pyplot()
    methods = sorted({r.method for r in rows})
    palette = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    if len(methods) > len(palette):
        cmap = plt.get_cmap("tab20")
        palette = [cmap(i % 20) for i in range(len(methods))]
    colour = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    written: list[Path] = []
    for setting in sorted({r.setting for r in rows}):
        srows = [r for r in rows if r.setting == setting]
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.0 * len(metrics), 3.8), squeeze=False)
        axes = axes[0]
        drawn = False
        for row in srows:
            done = [r for r in row.runs if r["summary"].get("status") == "completed"]
            use, style = (done, "-") if done else (row.runs, "--")
            recs = [load_metrics(r) for r in use]
            label = f"{row.method} (n={len(use)}{'' if done else ', incomplete'})"
            for ax, metric in zip(axes, metrics):
                c = _curve(recs, metric)
                if c is None:
                    continue
                xs, mean, lo, hi = c
                ax.plot(xs, mean, style, color=colour[row.method], label=label, lw=1.6)
                if len(use) > 1:
                    ax.fill_between(xs, lo, hi, color=colour[row.method], alpha=0.2, lw=0)
                drawn = True
        if not drawn:
            _warn(f"no metrics.jsonl data for setting {setting!r}; no figure")
            plt.close(fig)
            continue
        for ax, metric in zip(axes, metrics):
            ax.set_xlabel("epoch")
            ax.set_ylabel(_YLABELS.get(metric, metric))
            ax.grid(True, alpha=0.3)
            ys = [y for line in ax.get_lines() for y in line.get_ydata()]
            if metric == "consensus_distance" and ys and min(ys) > 0:
                ax.set_yscale("log")
                ax.set_ylabel(_YLABELS.get(metric, metric) + " (log scale)")
            if not ax.get_lines():
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        handles, labels = {}, []
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in handles:
                    handles[lab] = h
                    labels.append(lab)
        axes[0].legend([handles[lab] for lab in labels], labels, fontsize="small")
        fig.suptitle(setting)
        fig.tight_layout()
        written += _save(fig, out_dir / f"curves_{_slug(setting)}")
        plt.close(fig)
    if not written:
        print("error: no learning curves to plot (no metrics.jsonl records)", file=sys.stderr)
        return 2
    for p in written:
        print(f"wrote {p}")
    return 0


def _alpha(run: dict) -> float | None:
    for cfg in (run["summary"].get("config"), run.get("config")):
        if isinstance(cfg, dict) and isinstance(cfg.get("algorithm"), dict):
            a = _num(cfg["algorithm"].get("alpha"))
            if a is not None:
                return a
    return None


def plot_alpha_sweep(rows_or_runs: Sequence[Row] | Sequence[dict], out: str | Path) -> list[Path]:
    """Final consensus accuracy (mean ± std over completed seeds) vs α, a line per
    (setting, algorithm).  Uses runs whose config has ``algorithm.alpha``.  Returns the files
    written (none when no run has an α)."""
    runs = [r for x in rows_or_runs for r in (x.runs if isinstance(x, Row) else [x])]
    pts: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        s, a = r["summary"], _alpha(r)
        acc = _num(_final("consensus_acc")(s))
        if a is None or acc is None or s.get("status") != "completed":
            continue
        cfg = r["summary"].get("config") or r.get("config") or {}
        algo = cfg.get("algorithm", {}).get("name") or re.sub(r"\s*\(α=[^)]*\)", "", _label(s, "method"))
        pts.setdefault(f"{_label(s, 'setting')} · {algo}", {}).setdefault(a, []).append(100 * acc)
    if not pts:
        _warn("no completed run has config.algorithm.alpha; no alpha-sweep plot")
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, by_a in sorted(pts.items()):
        xs = sorted(by_a)
        st = [_stat(by_a[x]) for x in xs]
        ax.errorbar(xs, [s.mean for s in st], yerr=[s.std for s in st], marker="o", capsize=3,
                    label=name)
    ax.set_xlabel("α")
    ax.set_ylabel("final consensus accuracy (%)")
    ax.set_title("α sweep (mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = _save(fig, out_dir / "alpha_sweep")
    plt.close(fig)
    for p in written:
        print(f"wrote {p}")
    return written


# ----------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m crossgrad.report",
                                 usage="%(prog)s [table|plot] PATH... [--out DIR] [--metrics A,B]",
                                 description="Aggregate crossgrad runs (table) or plot curves.")
    ap.add_argument("paths", nargs="+", help="result directories (searched recursively)")
    ap.add_argument("--out", default=None, help="output directory (default: first path)")
    ap.add_argument("--metrics", default="consensus_acc,train_loss,consensus_distance")
    argv = list(sys.argv[1:] if argv is None else argv)
    what = argv.pop(0) if argv and argv[0] in ("table", "plot") else "table"
    a = ap.parse_args(argv)
    if what == "plot":
        return plot_main(a.paths, a.out, tuple(m for m in a.metrics.split(",") if m))
    return report_main(a.paths, a.out)


if __name__ == "__main__":
    sys.exit(main())
