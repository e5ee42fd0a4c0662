"""Tables and figures of REPORT.md's section "Unreliable and slow networks (issue 28)".

    python experiments/make_network_report.py [ISSUE26_RUNS]   # tables/network_*.md, figures/network/*
                                                               # and the tables inside REPORT.md

It reads the runs of net_lr.toml (GTm-N and Choco's lr pick), net_drop.toml (NGC, CompNGC and DSGDm-N
under drop 0 / 0.1 / 0.3) and net_nodrop.toml (the methods that refuse a lossy network, at drop 0),
each at 1000 and 10 Mbit/s. Every number comes from a run's summary.json / metrics.jsonl. Bandwidth
changes only the simulated time, never what is learned: the script checks that the two bandwidths'
runs of one (method, drop, seed) have the same accuracies at every evaluation, and says so. The drop-0
runs are also set beside issue 26's runs of the same setting (ISSUE26_RUNS, default runs/fmnist16_lr):
the same training, evaluated there once on the whole test set.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from make_report import fill_report, mean_std, write

from crossgrad.report import collect, load_metrics
from crossgrad.report.plots import _curve, _finish_axis, _legend, _pyplot, _save
from crossgrad.report.runs import load_steps
from crossgrad.report.table import time_to_accuracy

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
FIGURES = HERE / "figures" / "network"
TUNING = "net_lr"
SETS = ("net_drop", "net_nodrop")
#: issue 26's lr tuning in the same setting without [network] (full test set, evaluated once at the end)
ISSUE26 = RUNS / "fmnist16_lr"
#: the row order of the tables: the methods that re-weight over what arrived, then those refusing loss
ORDER = ["NGC (α=1)", "CompNGC", "DSGDm-N", "GTm-N", "choco", "QG-GUTm"]
BANDWIDTHS = (1000.0, 10.0)
DROPS = (0.0, 0.1, 0.3)
#: consensus accuracies (%) whose first simulated time the time-to-accuracy table gives
TARGETS = (50.0, 70.0)


def _order(method: str) -> tuple:
    return (ORDER.index(method) if method in ORDER else len(ORDER), method)


def net(run: dict, key: str):
    return ((run.get("config") or {}).get("network") or {}).get(key)


def algo(run: dict, key: str):
    return ((run.get("config") or {}).get("algorithm") or {}).get(key)


def done(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["summary"].get("status") == "completed"]


def curve(run: dict) -> list[tuple[int, float]]:
    return [(rec["step"], rec["consensus_acc"]) for rec in load_metrics(run) if "consensus_acc" in rec]


def tuning_table(runs: list[dict]) -> str:
    """GTm-N and Choco × lr at drop 0: final consensus / mean local accuracy; the pick in bold."""
    cells: dict[str, dict[float, dict]] = defaultdict(dict)
    for r in runs:
        cells[r["summary"]["method"]][algo(r, "lr")] = r
    lrs = sorted({lr for c in cells.values() for lr in c})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | picked |",
             "|:---|" + "---:|" * (len(lrs) + 1)]
    for method in sorted(cells, key=_order):
        ok = [r for r in cells[method].values() if r["summary"].get("status") == "completed"]
        best = max(ok, key=lambda r: r["summary"]["consensus_acc"]) if ok else None
        row = []
        for lr in lrs:
            r = cells[method].get(lr)
            if r is None:
                row.append("–")
                continue
            s = r["summary"]
            text = (f"{100 * s['consensus_acc']:.2f} / {100 * s['local_acc_mean']:.2f}"
                    if s.get("status") == "completed" else str(s.get("status")))
            row.append(f"**{text}**" if r is best else text)
        pick = "–" if best is None else f"{algo(best, 'lr'):g}"
        lines.append(f"| {method} | " + " | ".join(row) + f" | {pick} |")
    return "\n".join(lines) + "\n"


def groups_of(runs: list[dict]) -> dict[tuple[str, float, float], dict[int, dict]]:
    """(method, lr, drop) -> bandwidth -> seed -> run."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        out[(r["summary"]["method"], algo(r, "lr"), net(r, "drop_prob"))][net(r, "bandwidth_mbps")][
            r["summary"]["seed"]] = r
    return out


def bandwidth_check(groups: dict) -> tuple[int, list[str]]:
    """How many (method, drop, seed) pairs of bandwidths were compared; those whose curves differ."""
    pairs, differ = 0, []
    for (method, _lr, drop), by_bw in groups.items():
        a, b = (by_bw.get(bw, {}) for bw in BANDWIDTHS)
        for seed in sorted(set(a) & set(b)):
            if a[seed]["summary"].get("status") != "completed" or b[seed]["summary"].get("status") != "completed":
                continue
            pairs += 1
            if curve(a[seed]) != curve(b[seed]):
                differ.append(f"{method} drop {drop:g} seed {seed}")
    return pairs, differ


def _seeds_runs(by_bw: dict) -> list[dict]:
    """One completed run per seed (the first bandwidth that has it): what was learned, once per seed."""
    runs = {}
    for bw in BANDWIDTHS:
        for seed, r in by_bw.get(bw, {}).items():
            if r["summary"].get("status") == "completed":
                runs.setdefault(seed, r)
    return [runs[s] for s in sorted(runs)]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def final_table(groups: dict) -> str:
    """Method × drop: accuracy (once: both bandwidths learn the same), its change against drop 0 on the same
    seeds, simulated time to the end at each bandwidth, bytes per agent and step, and messages lost."""
    head = ["method", "lr", "drop", "seeds", "consensus acc (%)", "mean local acc (%)", "Δ cons. vs drop 0 (pp)"]
    head += [f"sim. time, {bw:g} Mbit/s (s)" for bw in BANDWIDTHS]
    head += ["B / agent / step (r1 + r2)", "dropped / sent (share)"]
    lines = ["| " + " | ".join(head) + " |", "|:---|---:|---:|:---|" + "---:|" * (len(head) - 4)]
    for key in sorted(groups, key=lambda k: (_order(k[0]), k[2])):
        method, lr, drop = key
        runs = _seeds_runs(groups[key])
        if not runs:
            continue
        cons = [r["summary"]["consensus_acc"] for r in runs]
        delta = "–"
        lossless = {r["summary"]["seed"]: r for r in _seeds_runs(groups.get((method, lr, 0.0), {}))}
        paired = [(r["summary"]["consensus_acc"], lossless[r["summary"]["seed"]]["summary"]["consensus_acc"])
                  for r in runs if r["summary"]["seed"] in lossless]
        if drop != 0 and paired:
            delta = f"{100 * _mean([a - b for a, b in paired]):+.2f}" + (
                "" if len(paired) == len(runs) else f" (seeds {len(paired)} of {len(runs)})")
        times = []
        for bw in BANDWIDTHS:
            t = [r["summary"]["final"].get("sim_time_s") for r in done(list(groups[key].get(bw, {}).values()))]
            t = [x for x in t if x is not None]
            times.append("–" if not t else f"{_mean(t):.3g}" + ("" if len(t) == len(runs) else f" (n={len(t)})"))
        b1, b2 = runs[0]["summary"]["bytes_per_agent_per_step"]
        dropped = sum(r["summary"]["final"]["messages_dropped"] for r in runs)
        sent = sum(r["summary"]["final"]["messages_sent"] for r in runs)
        row = [method, f"{lr:g}", f"{drop:g}", ",".join(str(r["summary"]["seed"]) for r in runs),
               mean_std(cons), mean_std([r["summary"]["local_acc_mean"] for r in runs]), delta,
               *times, f"{b1:,.0f} + {b2:,.0f}", f"{dropped:,} / {sent:,} ({dropped / sent:.3f})"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def tta_table(groups: dict) -> str:
    """Method × drop: the first simulated time at which the consensus accuracy reached each target, at each
    bandwidth (mean over the seeds that reached it; how many did when not all)."""
    head = ["method", "drop", "seeds, " + " / ".join(f"{bw:g}" for bw in BANDWIDTHS) + " Mbit/s"]
    head += [f"to {t:g} %, {bw:g} Mbit/s (s)" for bw in BANDWIDTHS for t in TARGETS]
    lines = ["| " + " | ".join(head) + " |", "|:---|---:|:---|" + "---:|" * (len(head) - 3)]
    for key in sorted(groups, key=lambda k: (_order(k[0]), k[2])):
        method, _lr, drop = key
        cells = []
        for bw in BANDWIDTHS:
            runs = done(list(groups[key].get(bw, {}).values()))
            for target in TARGETS:
                if not runs:
                    cells.append("–")
                    continue
                ts = [time_to_accuracy(r, target / 100) for r in runs]
                hit = [t for t in ts if t is not None]
                text = "not reached" if not hit else f"{_mean(hit):.3g}"
                if hit and len(hit) < len(runs):
                    text += f" ({len(hit)} of {len(runs)} seeds)"
                cells.append(text)
        seeds = " / ".join(",".join(str(r["summary"]["seed"]) for r in sorted(
            done(list(groups[key].get(bw, {}).values())), key=lambda r: r["summary"]["seed"])) or "–"
            for bw in BANDWIDTHS)
        lines.append(f"| {method} | {drop:g} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def issue26_table(groups: dict, issue26: Path) -> str:
    """The drop-0 runs next to issue 26's runs of the same method, lr and seed (no [network], evaluated once on
    the full test set): whether they trained the same (training loss at every logged step) and both accuracies."""
    theirs = {(r["summary"]["method"], algo(r, "lr"), r["summary"]["seed"]): r for r in done(collect([issue26]))}
    lines = ["| method | lr | seed | same training loss at every logged step | consensus acc here, 2,000-image "
             "subset (%) | consensus acc in issue 26, 10,000 images (%) |", "|:---|---:|---:|:---|---:|---:|"]
    for (method, lr, drop), by_bw in sorted(groups.items(), key=lambda kv: _order(kv[0][0])):
        if drop != 0:
            continue
        for r in _seeds_runs(by_bw):
            other = theirs.get((method, lr, r["summary"]["seed"]))
            if other is None:
                continue
            mine_loss = [(x["step"], x["train_loss"]) for x in load_steps(r)]
            same = mine_loss == [(x["step"], x["train_loss"]) for x in load_steps(other)] and bool(mine_loss)
            lines.append(f"| {method} | {lr:g} | {r['summary']['seed']} | {'yes' if same else '**no**'} | "
                         f"{100 * r['summary']['consensus_acc']:.2f} | {100 * other['summary']['consensus_acc']:.2f} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else "(no run of issue 26 with the same method, lr and seed)\n"


def figures(groups: dict) -> list[Path]:
    """Per bandwidth: consensus accuracy against simulated time (log scale, from the first evaluation after
    step 0), a panel per drop probability, a line per method (the mean over seeds, their min–max shaded),
    drawn with crossgrad's plotting helpers."""
    plt = _pyplot()
    methods = sorted({k[0] for k in groups}, key=_order)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    written = []
    for bw in BANDWIDTHS:
        fig, axes = plt.subplots(1, len(DROPS), figsize=(4.2 * len(DROPS), 3.4), squeeze=False, sharex=True,
                                 sharey=True)
        for ax, drop in zip(axes[0], DROPS):
            for key in sorted(groups, key=lambda k: _order(k[0])):
                if key[2] != drop:
                    continue
                runs = done(list(groups[key].get(bw, {}).values()))
                # the step-0 record (t = 0) has no place on a log axis: a clipped x would draw it as a flat line
                c = _curve([[m for m in load_metrics(r) if (m.get("sim_time_s") or 0) > 0] for r in runs],
                           "consensus_acc", "sim_time_s")
                if c is None:
                    continue
                xs, mean, lo, hi = c
                ax.plot(xs, mean, "-", color=colour[key[0]], lw=1.4, label=f"{key[0]} (n={len(runs)})")
                if len(runs) > 1:
                    ax.fill_between(xs, lo, hi, color=colour[key[0]], alpha=0.2, lw=0)
            _finish_axis(ax, "consensus_acc", "simulated time (s, log scale)")
            if ax.get_lines():  # the methods' times differ 30-fold at 10 Mbit/s
                ax.set_xscale("log")
            ax.set_title(f"drop {drop:g}" + (" (and the methods refusing loss)" if drop == 0 else ""),
                         fontsize="medium")
        fig.suptitle(f"Fashion-MNIST, 16-agent ring, Dirichlet 0.1, 1 epoch: {bw:g} Mbit/s, latency 1 ms, "
                     "6 ms per gradient")
        fig.tight_layout()
        _legend(fig, axes[0])
        written += _save(fig, FIGURES / f"acc_vs_sim_time_{bw:g}mbps")
        plt.close(fig)
    return written


def main() -> int:
    found = {name: collect([RUNS / name]) for name in (TUNING, *SETS) if (RUNS / name).is_dir()}
    if not any(found.values()):
        print(f"no runs of the network experiment under {RUNS}", file=sys.stderr)
        return 2
    if found.get(TUNING):
        write("network_lr.md", tuning_table(found[TUNING]))
    runs = [r for name in SETS for r in found.get(name, [])]
    if runs:
        groups = groups_of(runs)
        pairs, differ = bandwidth_check(groups)
        note = (f"\nBoth bandwidths learned the same in {pairs - len(differ)} of {pairs} (method, drop, seed) pairs "
                "(equal consensus accuracy at every evaluation); the accuracy columns show each seed once.\n")
        if differ:
            note += f"\nDifferent at the two bandwidths (bandwidth must only change time): {'; '.join(differ)}.\n"
        write("network_final.md", final_table(groups) + note)
        write("network_tta.md", tta_table(groups))
        issue26 = Path(sys.argv[1]) if len(sys.argv) > 1 else ISSUE26
        if issue26.is_dir():
            write("network_issue26.md", issue26_table(groups, issue26))
        else:
            print(f"no {issue26}: tables/network_issue26.md not rewritten")
        FIGURES.mkdir(parents=True, exist_ok=True)
        for p in figures(groups):
            print(f"wrote {p}")
        if differ:
            print(f"warning: bandwidth changed what was learned: {'; '.join(differ)}", file=sys.stderr)
    fill_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
