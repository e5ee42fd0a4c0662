"""Tables and figures of experiments/REPORT.md from the finished runs under experiments/runs.

    python experiments/make_report.py    # writes experiments/tables/*.md, experiments/figures/*
                                         # and the tables inside REPORT.md

Every number in the report's tables comes from a run's summary.json / metrics.jsonl; nothing is
typed in. REPORT.md marks each generated table with `<!-- table:NAME -->` ... `<!-- /table -->`
and this script replaces what is between the marks with tables/NAME.md. Settings with no
finished run yet are left out (and said so).
"""
from __future__ import annotations

import math
import re
import sys
from collections import defaultdict
from pathlib import Path

import alpha0_stability

from crossgrad.report import aggregate, collect, format_table, plot_alpha_sweep, plot_main

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
TABLES = HERE / "tables"
FIGURES = HERE / "figures"

#: the run directories under runs/ that get an accuracy table and curves
ACCURACY_SETS = ("fmnist_ring5", "fmnist_iid", "fmnist_alpha", "fmnist_scale", "cifar_ring5", "cifar_lowlr")
#: the method order of the paper's comparison
ORDER = ["DSGDm-N", "QGM", "NGC (α=0)", "NGC (α=1)", "CompNGC", "CGA", "CompCGA"]


def _order(method: str) -> tuple:
    return (ORDER.index(method) if method in ORDER else len(ORDER), method)


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * m:.2f} (n=1)"
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * m:.2f} ± {100 * sd:.2f}"


def completed(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["summary"].get("status") == "completed"]


def lr_table(runs: list[dict]) -> str:
    """Method × learning rate: final consensus / mean local accuracy of the tuning runs; the pick in bold."""
    cells: dict[str, dict[float, tuple[float, float]]] = defaultdict(dict)
    for r in runs:
        s = r["summary"]
        cells[s["method"]][s["config"]["algorithm"]["lr"]] = (
            (s["consensus_acc"], s["local_acc_mean"]) if s.get("status") == "completed" else (math.nan, math.nan))
    lrs = sorted({lr for c in cells.values() for lr in c})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | picked |",
             "|:---|" + "---:|" * (len(lrs) + 1)]
    for method in sorted(cells, key=_order):
        best = max(cells[method], key=lambda lr: -1 if math.isnan(cells[method][lr][0]) else cells[method][lr][0])
        row = []
        for lr in lrs:
            if lr not in cells[method]:
                row.append("–")
                continue
            c, loc = cells[method][lr]
            text = "diverged" if math.isnan(c) else f"{100 * c:.2f} / {100 * loc:.2f}"
            row.append(f"**{text}**" if lr == best else text)
        lines.append(f"| {method} | " + " | ".join(row) + f" | {best:g} |")
    return "\n".join(lines) + "\n"


def accuracy_table(runs: list[dict]) -> str:
    """Setting × method × lr: consensus and mean local accuracy, mean ± std over completed seeds."""
    groups: dict[tuple[str, str, float], list[dict]] = defaultdict(list)
    for r in runs:
        s = r["summary"]
        groups[(s["setting"], s["method"], s["config"]["algorithm"]["lr"])].append(r)
    lines = ["| setting | method | lr | seeds | consensus acc (%) | mean local acc (%) | min local acc (%) |",
             "|:---|:---|---:|---:|---:|---:|---:|"]

    def key(k: tuple[str, str, float]) -> tuple:
        alpha = groups[k][0]["summary"]["config"]["algorithm"].get("alpha", 0.0)
        family = k[1].split(" (α=")[0] if k[1].startswith("NGC (α=") else k[1]
        return (k[0], _order("NGC (α=0)" if family == "NGC" else family), alpha, -k[2])

    for (setting, method, lr) in sorted(groups, key=key):
        group = groups[(setting, method, lr)]
        done = completed(group)
        failed = len(group) - len(done)
        seeds = ",".join(str(r["summary"]["seed"]) for r in done) + (f" (+{failed} failed)" if failed else "")
        lines.append(
            f"| {setting} | {method} | {lr:g} | {seeds} | "
            f"{mean_std([r['summary']['consensus_acc'] for r in done])} | "
            f"{mean_std([r['summary']['local_acc_mean'] for r in done])} | "
            f"{mean_std([r['summary']['final']['local_acc_min'] for r in done])} |")
    return "\n".join(lines) + "\n"


def overhead_table(runs: list[dict]) -> str:
    """Per method (one setting): gradient evaluations and bytes per agent per step, peak memory.

    Step times are not taken from these runs (two shared the machine, and some were paused while
    benchmarks ran); tables/overhead_bench.md times every method alone.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in completed(runs):
        groups[r["summary"]["method"]].append(r)
    lines = ["| method | grad evals / agent / step | round 1 B / agent / step | round 2 B / agent / step | "
             "round 2 vs NGC (α=1) | peak RSS (MiB) |",
             "|:---|---:|---:|---:|---:|---:|"]
    ref = [r["summary"]["bytes_per_agent_per_step"][1] for r in groups.get("NGC (α=1)", [])]
    for method in sorted(groups, key=_order):
        ss = [r["summary"] for r in groups[method]]
        s0 = ss[0]
        b1, b2 = s0["bytes_per_agent_per_step"]
        vs = "–" if not ref or not b2 else f"1/{ref[0] / b2:.1f}"
        lines.append(
            f"| {method} | {s0['grad_evals_per_agent_per_step']:g} | {b1:,.0f} | {b2:,.0f} | {vs} | "
            f"{max(s['peak_mem_mb'] for s in ss):,.0f} |")
    return "\n".join(lines) + "\n"


def write(name: str, text: str) -> None:
    TABLES.mkdir(parents=True, exist_ok=True)
    (TABLES / name).write_text(text, encoding="utf-8")
    print(f"wrote {TABLES / name}")


def fill_report(path: Path = HERE / "REPORT.md") -> None:
    """Put the current tables/NAME.md between REPORT.md's `<!-- table:NAME -->` marks."""
    if not path.is_file():
        return

    def table(m: re.Match) -> str:
        src = TABLES / f"{m.group(1)}.md"
        body = src.read_text(encoding="utf-8") if src.is_file() else "(no finished runs yet)\n"
        return f"<!-- table:{m.group(1)} -->\n{body}<!-- /table -->"

    text = path.read_text(encoding="utf-8")
    path.write_text(re.sub(r"<!-- table:([\w-]+) -->\n.*?<!-- /table -->", table, text, flags=re.S),
                    encoding="utf-8")
    print(f"filled the tables of {path}")


def main() -> int:
    FIGURES.mkdir(parents=True, exist_ok=True)
    found = {d.name: collect([d]) for d in sorted(RUNS.iterdir()) if d.is_dir()} if RUNS.is_dir() else {}
    found = {k: v for k, v in found.items() if v}
    if not found:
        print(f"no finished runs under {RUNS}", file=sys.stderr)
        return 2
    if "fmnist_lr" in found:
        write("lr_tuning.md", lr_table(found["fmnist_lr"]))
    acc_sets = [k for k in ACCURACY_SETS if k in found]
    for key in acc_sets:
        write(f"{key}.md", accuracy_table(found[key]))
        plot_main([RUNS / key], FIGURES / key, metrics=("consensus_acc", "local_acc_mean", "consensus_distance"))
    if "fmnist_ring5" in found:
        write("overhead.md", overhead_table(found["fmnist_ring5"]))
    if "cifar_ring5" in found:
        write("overhead_cifar.md", overhead_table(found["cifar_ring5"]))
    if "fmnist_alpha" in found:
        plot_alpha_sweep(found["fmnist_alpha"], FIGURES)
    missing = [k for k in ACCURACY_SETS if k not in found]
    if missing:
        print(f"not run yet (no finished runs): {', '.join(missing)}")
    # the generic per-directory tables too, with bytes and wall time (crossgrad report's format)
    for key, runs in found.items():
        write(f"{key}_full.md", format_table(aggregate(runs), "markdown"))
    alpha0_stability.main()  # tables/stability.md: no runs needed
    fill_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
