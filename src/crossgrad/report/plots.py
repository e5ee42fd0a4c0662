"""Figures: learning curves and accuracy-for-cost per setting, final accuracy against α (PNG and SVG, reproducible
bytes)."""
from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from crossgrad.files import atomic_write, make_dir
from crossgrad.report.runs import as_list, collect, default_out, load_metrics, load_steps, no_runs, number, warn
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
            p = base.parent / f"{base.name}.{ext}"  # not with_suffix: "…dirichlet-0.5" has a "suffix" ".5"
            kw = {"dpi": 150} if ext == "png" else {"metadata": {"Date": None}}
            atomic_write(p, lambda f, ext=ext, kw=kw: fig.savefig(f, format=ext, bbox_inches="tight", **kw))
            out.append(p)
    return out


#: the panels of `crossgrad plot`: test accuracy of the consensus and of the agents' own models, the training
#: loss (per logged step where steps.csv exists) and how far the agents are apart
DEFAULT_METRICS = ("consensus_acc", "local_acc_mean", "train_loss", "consensus_distance")
_LOG_METRICS = {"train_loss", "consensus_loss", "consensus_distance"}


def _curve(records_per_run: list[list[dict]], metric: str, x_key: str = "epoch"):
    """Mean/min/max of one metric over seeds at each x (x values present in any seed)."""
    import numpy as np
    by_x: dict[float, list[float]] = {}
    for recs in records_per_run:
        for rec in recs:
            x, y = number(rec.get(x_key)), number(rec.get(metric))
            if x is None or y is None or not math.isfinite(y):
                continue
            if metric == "consensus_distance" and x == 0:
                continue  # every agent starts from the same weights: 0 up to rounding, off any log scale
            by_x.setdefault(round(x, 6), []).append(y)
    if not by_x:
        return None
    xs = np.array(sorted(by_x))
    ys = [np.array(by_x[x]) for x in xs]
    k = 100.0 if metric in _PCT_METRICS else 1.0
    return (xs, k * np.array([y.mean() for y in ys]), k * np.array([y.min() for y in ys]),
            k * np.array([y.max() for y in ys]))


def _records(run: dict, metric: str) -> list[dict]:
    """The run's records for one metric: per logged step for the training loss when it has them."""
    if metric == "train_loss":
        steps = load_steps(run)
        if steps:
            return steps
    return load_metrics(run)


def _with_cost(recs: list[dict]) -> list[dict]:
    """Records with mb_sent: megabytes each agent has sent so far, both rounds (bytes are per agent per step)."""
    out = []
    for rec in recs:
        b1, b2, step = (number(rec.get(k)) for k in ("bytes_round1", "bytes_round2", "step"))
        if None not in (b1, b2, step):
            out.append({**rec, "mb_sent": (b1 + b2) * step / 1e6})
    return out


def _file_bases(settings: list[str]) -> dict[str, str]:
    """A distinct file name per setting: settings whose readable slugs collide get a short hash each."""
    import hashlib

    slugs = {s: _slug(s) for s in settings}
    clash = {v for v in slugs.values() if list(slugs.values()).count(v) > 1}
    return {s: slug + (f"-{hashlib.sha1(s.encode()).hexdigest()[:6]}" if slug in clash else "")
            for s, slug in slugs.items()}


def _legend(fig, axes) -> None:
    """One legend for the figure, below the panels, where it covers no curve."""
    handles: dict = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(len(handles), 4), fontsize="small", frameon=False)


def _finish_axis(ax, metric: str, xlabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_YLABELS.get(metric, metric))
    ax.grid(True, alpha=0.3)
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    if metric in _LOG_METRICS and ys and min(ys) > 0:
        ax.set_yscale("log")
        ax.set_ylabel(_YLABELS.get(metric, metric) + " (log scale)")
    if not ax.get_lines():
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _draw_curves(plt, srows: list[Row], metrics: list[str], colour: dict, setting: str):
    """The learning curves of one setting against epochs; None when no run has a record."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    axes, drawn = axes[0], False
    for row in srows:
        done = [r for r in row.runs if r["summary"].get("status") == "completed"]
        use, style = (done, "-") if done else (row.runs, "--")
        label = f"{row.method} (n={len(use)}{'' if done else ', not completed'})"
        for ax, metric in zip(axes, metrics):
            c = _curve([_records(r, metric) for r in use], metric)
            if c is None:
                continue
            xs, mean, lo, hi = c
            ax.plot(xs, mean, style, color=colour[row.method], label=label, lw=1.4)
            if len(use) > 1:
                ax.fill_between(xs, lo, hi, color=colour[row.method], alpha=0.2, lw=0)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, metric in zip(axes, metrics):
        _finish_axis(ax, metric, "epoch")
    fig.suptitle(setting)
    fig.tight_layout()
    _legend(fig, axes)
    return fig


#: the x axes of the cost figure; simulated time only where a run has it (a [network] section)
_COST_AXES = {"mb_sent": "MB sent per agent (both rounds)", "wall_time_s": "wall time (s)",
              "sim_time_s": "simulated time (s)"}


def _draw_cost(plt, srows: list[Row], colour: dict, setting: str):
    """Consensus accuracy against megabytes sent per agent, against wall time and, for runs on a simulated
    network, against simulated time, one line per run; None when no run recorded any. What compression
    buys (CompNGC) shows on the left."""
    records = {id(run): _with_cost(load_metrics(run)) for row in srows for run in row.runs}
    simulated = any("sim_time_s" in rec for recs in records.values() for rec in recs)
    x_keys = list(_COST_AXES) if simulated else ["mb_sent", "wall_time_s"]
    fig, axes = plt.subplots(1, len(x_keys), figsize=(4.2 * len(x_keys), 3.4), squeeze=False)
    axes, drawn = axes[0], False
    for row in srows:
        done = [r for r in row.runs if r["summary"].get("status") == "completed"]
        for i, run in enumerate(done or row.runs):
            recs = records[id(run)]
            for ax, x_key in zip(axes, x_keys):
                c = _curve([recs], "consensus_acc", x_key)
                if c is not None:
                    ax.plot(c[0], c[1], "-" if done else "--", color=colour[row.method], lw=1.2,
                            label=row.method if i == 0 else None)
                    drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, x_key in zip(axes, x_keys):
        _finish_axis(ax, "consensus_acc", _COST_AXES[x_key])
    fig.suptitle(f"{setting}: accuracy for the communication and the time spent")
    fig.tight_layout()
    _legend(fig, axes)
    return fig


def plot_main(paths: Sequence[str | Path], out: str | Path | None = None,
              metrics: Sequence[str] = DEFAULT_METRICS) -> int:
    """Per setting, two figures: learning curves (a panel per metric, a colour per method) and cost
    (consensus accuracy against megabytes sent and against wall time).

    Seeds of a method are drawn as their mean with a shaded min–max band. Methods with no completed
    run are drawn dashed from their other runs (interrupted, diverged), so a run that stopped in its
    first epoch still shows its per-step training loss. Saves ``curves_<setting>.png``/``.svg`` and
    ``cost_<setting>.png``/``.svg``, one distinct name per setting. Returns 0, or 2 when nothing to plot.
    """
    paths = as_list(paths)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    runs = collect(paths)
    if not runs:
        return no_runs(paths)
    out_dir = make_dir(default_out(paths, out) or Path("."))
    rows = aggregate(runs)
    plt = _pyplot()
    methods = sorted({r.method for r in rows})
    palette = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    if len(methods) > len(palette):
        cmap = plt.get_cmap("tab20")
        palette = [cmap(i % 20) for i in range(len(methods))]
    colour = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    written: list[Path] = []
    settings = sorted({r.setting for r in rows})
    for setting, base in _file_bases(settings).items():
        srows = [r for r in rows if r.setting == setting]
        for kind, fig in (("curves", _draw_curves(plt, srows, metrics, colour, setting)),
                          ("cost", _draw_cost(plt, srows, colour, setting))):
            if fig is None:
                warn(f"no records to draw for setting {setting!r}; no {kind} figure")
                continue
            written += _save(fig, out_dir / f"{kind}_{base}")
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
    make_dir(out_dir)
    written = _save(fig, out_dir / "alpha_sweep")
    plt.close(fig)
    for p in written:
        print(f"wrote {p}")
    return written
