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

from crossgrad.report import aggregate, collect, format_table, load_metrics, plot_alpha_sweep, plot_main

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
TABLES = HERE / "tables"
FIGURES = HERE / "figures"

#: the run directories under runs/ that get an accuracy table and curves
ACCURACY_SETS = ("fmnist_ring5", "fmnist_tuned", "fmnist_new_tuned", "fmnist_iid", "fmnist_alpha", "fmnist_scale",
                 "fmnist_scale_gamma",
                 "cifar_ring5", "cifar_lowlr", "cifar_gamma", "gpu_cifar_ring5", "gpu_cifar_ring5_tuned",
                 "gpu_cifar_tune", "gpu_cifar_scale", "gpu_cifar_models")
#: the 2-epoch tuning runs (fmnist_lr.toml, fmnist_lr_wide.toml, fmnist_gamma*.toml, fmnist_alpha_gamma.toml)
TUNING = "fmnist_lr"
#: the 10-epoch runs a tuned (gamma, lr) may already have (fmnist_ring5.toml) or gets (fmnist_tuned.toml)
TUNED_SETS = ("fmnist_ring5", "fmnist_tuned")
#: the method order of the paper's comparison
ORDER = ["DSGDm-N", "QGM", "NGC (α=0)", "NGC (α=1)", "CompNGC", "CGA", "CompCGA"]
#: the methods added in issue 19, tuned on the same budget in their own directory (fmnist_new_lr.toml,
#: fmnist_d2_lr.toml), and their 10-epoch runs (fmnist_new_tuned.toml)
NEW_TUNING = "fmnist_new_lr"
NEW_ORDER = ["GTm-N", "D²", "choco", "SGP"]
#: issue 26, the methods since NGC on the 16-agent Dirichlet-0.1 setting (1 epoch): the seed-0 lr tuning
#: (fmnist16_lr.toml on the ring, fmnist16_relay_lr.toml on the chain, fmnist16_ars_lr.toml; the edge
#: extensions into the same directories) and seeds 1-2 at the picks (fmnist16_tuned.toml, fmnist16_ars_tuned.toml and
#: fmnist16_relay_tuned.toml, all into runs/fmnist16_tuned)
ISSUE26_TUNING = ("fmnist16_lr", "fmnist16_relay_lr", "fmnist16_ars_lr")
ISSUE26_SEEDS = "fmnist16_tuned"
ISSUE26_ORDER = ["NGC (α=1)", "CompNGC", "DSGDm-N", "QGM", "GUT", "QG-GUTm", "RelaySGD", "Momentum Tracking",
                 "DecentLaM", "NGC (α=1), γ exponential", "DSGDm-N, γ exponential"]


def _order(method: str) -> tuple:
    order = ORDER + NEW_ORDER
    return (order.index(method) if method in order else len(order), method)


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


def hp(run: dict, key: str, default: float | None = None) -> float | None:
    """A hyperparameter of the run's algorithm (gamma, lr, alpha), from its saved config."""
    cfg = run.get("config") or run["summary"].get("config") or {}
    return cfg.get("algorithm", {}).get(key, default)


def acc_cell(run: dict | None) -> str:
    """'consensus / mean local' accuracy (%) of one run; 'diverged' / its status otherwise."""
    if run is None:
        return "–"
    s = run["summary"]
    if s.get("status") != "completed":
        return str(s.get("status") or "unfinished")
    if s["consensus_acc"] <= 0.1001 and s["local_acc_mean"] <= 0.1001:
        return "10.00 / 10.00 (chance)"
    return f"{100 * s['consensus_acc']:.2f} / {100 * s['local_acc_mean']:.2f}"


def score(run: dict | None) -> float:
    """What the tuning maximises: final consensus accuracy of a completed run (-1 otherwise)."""
    if run is None or run["summary"].get("status") != "completed":
        return -1.0
    return run["summary"]["consensus_acc"]


def lr_table(runs: list[dict]) -> str:
    """Method × lr at γ 0.1: final consensus / mean local accuracy of the tuning runs; the pick in bold."""
    cells: dict[str, dict[float, tuple[float, float]]] = defaultdict(dict)
    for r in runs:
        s = r["summary"]
        if hp(r, "gamma") != 0.1 or s["method"] not in ORDER or s.get("status") not in ("completed", "diverged"):
            continue
        cells[s["method"]][hp(r, "lr")] = (
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
    groups: dict[tuple[str, str, float, float], list[dict]] = defaultdict(list)
    for r in runs:
        s = r["summary"]
        groups[(s["setting"], s["method"], hp(r, "gamma"), hp(r, "lr"))].append(r)
    lines = ["| setting | method | γ | lr | seeds | consensus acc (%) | mean local acc (%) | min local acc (%) |",
             "|:---|:---|---:|---:|---:|---:|---:|---:|"]

    def key(k: tuple[str, str, float, float]) -> tuple:
        alpha = hp(groups[k][0], "alpha", 0.0)
        family = k[1].split(" (α=")[0] if k[1].startswith("NGC (α=") else k[1]
        return (k[0], _order("NGC (α=0)" if family == "NGC" else family), alpha, k[2], -k[3])

    for (setting, method, gamma, lr) in sorted(groups, key=key):
        group = groups[(setting, method, gamma, lr)]
        done = completed(group)
        failed = len(group) - len(done)
        seeds = ",".join(str(r["summary"]["seed"]) for r in done) + (f" (+{failed} failed)" if failed else "")
        lines.append(
            f"| {setting} | {method} | {gamma:g} | {lr:g} | {seeds} | "
            f"{mean_std([r['summary']['consensus_acc'] for r in done])} | "
            f"{mean_std([r['summary']['local_acc_mean'] for r in done])} | "
            f"{mean_std([r['summary']['final']['local_acc_min'] for r in done])} |")
    return "\n".join(lines) + "\n"


def gamma_table(runs: list[dict], methods: list[str] = ORDER) -> str:
    """(Method, γ) × lr: consensus / mean local accuracy of the 2-epoch tuning runs. Bold: the method's best
    over every (γ, lr); the last column is the best lr at that γ."""
    cells: dict[tuple[str, float], dict[float, dict]] = defaultdict(dict)
    for r in runs:
        if r["summary"]["method"] in methods:
            cells[(r["summary"]["method"], hp(r, "gamma"))][hp(r, "lr")] = r
    lrs = sorted({lr for c in cells.values() for lr in c})
    best = {m: max((r for (mm, _), c in cells.items() if mm == m for r in c.values()), key=score)
            for m in {m for m, _ in cells}}
    lines = ["| method | γ | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr at this γ |",
             "|:---|---:|" + "---:|" * (len(lrs) + 1)]
    for (method, gamma) in sorted(cells, key=lambda k: (_order(k[0]), k[1])):
        row = []
        for lr in lrs:
            r = cells[(method, gamma)].get(lr)
            text = acc_cell(r)
            row.append(f"**{text}**" if r is not None and r is best[method] else text)
        at = max(cells[(method, gamma)].values(), key=score)
        edge = " (edge)" if hp(at, "lr") in (min(cells[(method, gamma)]), max(cells[(method, gamma)])) else ""
        lines.append(f"| {method} | {gamma:g} | " + " | ".join(row) + f" | {hp(at, 'lr'):g}{edge} |")
    return "\n".join(lines) + "\n"


def picks(runs: list[dict], methods: list[str] = ORDER) -> dict[str, dict]:
    """Each method's best 2-epoch tuning run over every (γ, lr), and its best at the reference γ = 0.1."""
    out: dict[str, dict] = {}
    for r in runs:
        m = r["summary"]["method"]
        if m not in methods:
            continue
        o = out.setdefault(m, {"all": None, "g01": None})
        if score(r) > score(o["all"]):
            o["all"] = r
        if hp(r, "gamma") == 0.1 and score(r) > score(o["g01"]):
            o["g01"] = r
    return out


def picks_table(runs: list[dict], methods: list[str] = ORDER) -> str:
    lines = ["| method | best at γ 0.1: lr | consensus / local (%) | tuned γ | tuned lr | consensus / local (%) "
             "| gain (pp) |",
             "|:---|---:|---:|---:|---:|---:|---:|"]
    for m, o in sorted(picks(runs, methods).items(), key=lambda kv: _order(kv[0])):
        a, g = o["all"], o["g01"]
        gain = 100 * (score(a) - score(g)) if g is not None else float("nan")
        lines.append(f"| {m} | {hp(g, 'lr'):g} | {acc_cell(g)} | {hp(a, 'gamma'):g} | {hp(a, 'lr'):g} | "
                     f"{acc_cell(a)} | {gain:+.2f} |")
    return "\n".join(lines) + "\n"


def tuned_runs(tuning: list[dict], found: dict[str, list[dict]]) -> tuple[list[dict], list[str]]:
    """The 10-epoch runs (fmnist_ring5 or fmnist_tuned) at each method's tuned (γ, lr); methods with none."""
    chosen, missing = [], []
    for m, o in sorted(picks(tuning).items(), key=lambda kv: _order(kv[0])):
        g, lr = hp(o["all"], "gamma"), hp(o["all"], "lr")
        got = [r for k in TUNED_SETS for r in found.get(k, [])
               if r["summary"]["method"] == m and hp(r, "gamma") == g and hp(r, "lr") == lr]
        chosen += got
        if not got:
            missing.append(f"{m} (γ {g:g}, lr {lr:g})")
    return chosen, missing


def tuned_table(chosen: list[dict], missing: list[str]) -> str:
    body = accuracy_table(chosen) if chosen else ""
    src = sorted({Path(r["path"]).parent.name for r in chosen})
    note = f"\nRuns from: {', '.join(f'`runs/{s}/`' for s in src)}.\n" if src else ""
    if missing:
        note += f"\nNot run yet at the tuned setting: {'; '.join(missing)}.\n"
    return body + note


def alpha_gamma_table(runs: list[dict]) -> str:
    """NGC α × γ at lr 0.01, 2 epochs: consensus / mean local accuracy; each α's best γ in bold."""
    cells: dict[float, dict[float, dict]] = defaultdict(dict)
    for r in runs:
        if hp(r, "name") == "ngc" and hp(r, "lr") == 0.01 and hp(r, "codec") in (None, "identity"):
            cells[hp(r, "alpha")][hp(r, "gamma")] = r
    gammas = sorted({g for c in cells.values() for g in c})
    lines = ["| α | " + " | ".join(f"γ {g:g}" for g in gammas) + " | best γ |",
             "|---:|" + "---:|" * (len(gammas) + 1)]
    for a in sorted(cells):
        best = max(cells[a].values(), key=score)
        row = [(f"**{acc_cell(cells[a][g])}**" if cells[a].get(g) is best else acc_cell(cells[a].get(g)))
               for g in gammas]
        lines.append(f"| {a:g} | " + " | ".join(row) + f" | {hp(best, 'gamma'):g} |")
    return "\n".join(lines) + "\n"


def defaults_table(runs: list[dict]) -> str:
    """The defaults check: every run at the algorithms' defaults, whether it trained or diverged."""
    lines = ["| setting | method | lr | γ | schedule | epochs | state | consensus acc (%) | mean local acc (%) | "
             "min local acc (%) | final train loss |",
             "|:---|:---|---:|---:|:---|---:|:---|---:|---:|---:|---:|"]
    for r in sorted(runs, key=lambda r: (r["summary"]["setting"], _order(r["summary"]["method"]))):
        s = r["summary"]
        cfg = r.get("config") or s.get("config") or {}
        f = s.get("final") or {}
        ok = s.get("status") == "completed"
        state = s.get("status") if not ok else ("chance level" if s["consensus_acc"] <= 0.1001 else "trained")
        accs = [s.get("consensus_acc"), s.get("local_acc_mean"), f.get("local_acc_min")]
        if not ok:  # stopped early (a CPU budget): its last evaluation, said so
            recs = [m for m in load_metrics(r) if "consensus_acc" in m]
            if recs:
                f = recs[-1]
                accs = [f.get("consensus_acc"), f.get("local_acc_mean"), f.get("local_acc_min")]
                state = f"{state} after epoch {f.get('epoch', 0):g} (last evaluation shown)"
                ok = True
        accs_text = " | ".join(f"{100 * v:.2f}" if ok and v is not None else "–" for v in accs)
        loss = f.get("train_loss")
        lines.append(
            f"| {s['setting']} | {s['method']} | {hp(r, 'lr'):g} | {hp(r, 'gamma'):g} | "
            f"{cfg['training']['lr_schedule']} | {s.get('epochs', 0):g} | {state} | {accs_text} | "
            f"{'–' if loss is None else f'{loss:.3f}'} |")
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


def _order26(method: str) -> tuple:
    return (ISSUE26_ORDER.index(method) if method in ISSUE26_ORDER else len(ISSUE26_ORDER), method)


def issue26_picks(tuning: list[dict]) -> dict[str, dict]:
    """Each method's seed-0 tuning run with the best final consensus accuracy (ties: the smaller lr)."""
    best: dict[str, dict] = {}
    for r in sorted(tuning, key=lambda r: hp(r, "lr")):
        m = r["summary"]["method"]
        if r["summary"]["seed"] == 0 and score(r) > score(best.get(m)):
            best[m] = r
    return best


def issue26_tuning_table(tuning: list[dict]) -> str:
    """Method × lr, seed 0: final consensus / mean local accuracy; the pick in bold."""
    cells: dict[str, dict[float, dict]] = defaultdict(dict)
    for r in tuning:
        if r["summary"]["seed"] == 0:
            cells[r["summary"]["method"]][hp(r, "lr")] = r
    best = issue26_picks(tuning)
    lrs = sorted({lr for c in cells.values() for lr in c})
    lines = ["| method | topology | γ | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | picked lr |",
             "|:---|:---|---:|" + "---:|" * (len(lrs) + 1)]
    for m in sorted(cells, key=_order26):
        row = []
        for lr in lrs:
            r = cells[m].get(lr)
            text = acc_cell(r)
            row.append(f"**{text}**" if r is not None and r is best.get(m) else text)
        any_run = next(iter(cells[m].values()))
        pick = best.get(m)
        picked = "–" if pick is None else f"{hp(pick, 'lr'):g}"
        if pick is not None and len(cells[m]) > 1 and hp(pick, "lr") in (min(cells[m]), max(cells[m])):
            picked += " (edge)"
        lines.append(f"| {m} | {any_run['summary']['setting'].split('/')[-1]} | {_gamma26(any_run)} | "
                     + " | ".join(row) + f" | {picked} |")
    return "\n".join(lines) + "\n"


def _gamma26(run: dict) -> str:
    """The γ a run used: the constant, or the schedule with the values its records show."""
    if hp(run, "gamma_schedule", "constant") == "constant":
        return f"{hp(run, 'gamma'):g}"
    used = sorted({m["gamma"] for m in load_metrics(run) if m.get("gamma") is not None and m.get("step", 0) > 0})
    return f"{hp(run, 'gamma_schedule')} ({', '.join(f'{g:.4f}' for g in used)})"


def issue26_result_table(tuning: list[dict], seeds: list[dict]) -> str:
    """At each method's pick: seed 0 from the tuning run, seeds 1-2 from fmnist16_tuned (the same config
    but the seed); accuracy mean ± std over seeds, bytes sent per agent and step (both rounds), gradient
    passes per agent and step."""
    lines = ["| method | topology | γ | lr | seeds | consensus acc (%) | mean local acc (%) | min local acc (%) | "
             "bytes sent / agent / step | gradient passes / agent / step |",
             "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, pick in sorted(issue26_picks(completed(tuning)).items(), key=lambda kv: _order26(kv[0])):
        runs = [pick] + [r for r in seeds if r["summary"]["method"] == m and hp(r, "lr") == hp(pick, "lr")
                         and r["summary"]["setting"] == pick["summary"]["setting"] and r["summary"]["seed"] != 0]
        done = completed(runs)
        others = "".join(f" (seed {r['summary']['seed']}: {r['summary'].get('status')})" for r in runs if r not in done)
        s0 = done[0]["summary"]
        lines.append(
            f"| {m} | {s0['setting'].split('/')[-1]} | {_gamma26(pick)} | {hp(pick, 'lr'):g} | "
            f"{','.join(str(r['summary']['seed']) for r in sorted(done, key=lambda r: r['summary']['seed']))}"
            f"{others} | "
            f"{mean_std([r['summary']['consensus_acc'] for r in done])} | "
            f"{mean_std([r['summary']['local_acc_mean'] for r in done])} | "
            f"{mean_std([r['summary']['final']['local_acc_min'] for r in done])} | "
            f"{sum(s0['bytes_per_agent_per_step']):,.0f} | {s0['grad_evals_per_agent_per_step']:g} |")
    return "\n".join(lines) + "\n"


def write(name: str, text: str) -> None:
    TABLES.mkdir(parents=True, exist_ok=True)
    (TABLES / name).write_text(text, encoding="utf-8")
    print(f"wrote {TABLES / name}")


def fill_report(path: Path = HERE / "REPORT.md") -> None:
    """Put the current tables/NAME.md between REPORT.md's `<!-- table:NAME -->` marks; a mark with no
    tables/NAME.md is left as it is (its table is another script's: presets_cpu_table.py,
    make_network_report.py)."""
    if not path.is_file():
        return

    def table(m: re.Match) -> str:
        src = TABLES / f"{m.group(1)}.md"
        return f"<!-- table:{m.group(1)} -->\n{src.read_text(encoding='utf-8')}<!-- /table -->" if src.is_file() \
            else m.group(0)

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
    if TUNING in found:
        tuning = completed(found[TUNING])
        write("lr_tuning.md", lr_table(found[TUNING]))
        write("gamma_tuning.md", gamma_table(found[TUNING]))  # diverged runs shown as such
        write("tuned_picks.md", picks_table(tuning))
        write("alpha_gamma.md", alpha_gamma_table(tuning))
        chosen, missing = tuned_runs(tuning, found)
        write("fmnist_tuned_comparison.md", tuned_table(chosen, missing))
        if chosen:
            plot_main([r["path"] for r in chosen], FIGURES / "fmnist_tuned_comparison",
                      metrics=("consensus_acc", "local_acc_mean", "consensus_distance"))
    if NEW_TUNING in found:
        write("new_methods_tuning.md", gamma_table(found[NEW_TUNING], NEW_ORDER))  # diverged runs shown as such
        write("new_methods_picks.md", picks_table(completed(found[NEW_TUNING]), NEW_ORDER))
    tuning26 = [r for k in ISSUE26_TUNING for r in found.get(k, [])]
    if tuning26:
        write("issue26_tuning.md", issue26_tuning_table(tuning26))  # diverged runs shown as such
        write("issue26_results.md", issue26_result_table(tuning26, found.get(ISSUE26_SEEDS, [])))
    if "defaults_check" in found:
        write("defaults_check.md", defaults_table(found["defaults_check"]))
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
