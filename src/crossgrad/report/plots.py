"""Figures: learning curves per setting and final accuracy against α (PNG and SVG, reproducible bytes)."""
from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from crossgrad.report.runs import as_list, collect, default_out, load_metrics, no_runs, number, warn
from crossgrad.report.table import Row, aggregate, final_metric, mean_std, summary_label

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
            x, y = number(rec.get("epoch")), number(rec.get(metric))
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
    paths = as_list(paths)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    runs = collect(paths)
    if not runs:
        return no_runs(paths)
    out_dir = default_out(paths, out) or Path(".")
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
            warn(f"no metrics.jsonl data for setting {setting!r}; no figure")
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


def _algorithm_config(run: dict) -> dict:
    algo = (run.get("config") or {}).get("algorithm")
    return algo if isinstance(algo, dict) else {}


def plot_alpha_sweep(rows_or_runs: Sequence[Row] | Sequence[dict], out: str | Path) -> list[Path]:
    """Final consensus accuracy (mean ± std over completed seeds) vs α, a line per
    (setting, algorithm).  Uses runs whose config has ``algorithm.alpha``.  Returns the files
    written (none when no run has an α)."""
    runs = [r for x in rows_or_runs for r in (x.runs if isinstance(x, Row) else [x])]
    pts: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        s, a = r["summary"], number(_algorithm_config(r).get("alpha"))
        acc = number(final_metric("consensus_acc")(s))
        if a is None or acc is None or s.get("status") != "completed":
            continue
        algo = _algorithm_config(r).get("name") or re.sub(r"\s*\(α=[^)]*\)", "", summary_label(s, "method"))
        pts.setdefault(f"{summary_label(s, 'setting')} · {algo}", {}).setdefault(a, []).append(100 * acc)
    if not pts:
        warn("no completed run has config.algorithm.alpha; no alpha-sweep plot")
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, by_a in sorted(pts.items()):
        xs = sorted(by_a)
        st = [mean_std(by_a[x]) for x in xs]
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
