"""The CPU-budget cells of experiments/presets.md and the presets table of experiments/REPORT.md, from the runs.

    python experiments/presets_cpu_table.py     # after bash experiments/presets_cpu.sh

In presets.md every table row that names a preset (a first cell such as `gut-cifar10-resnet20-ring16-gut`,
or `relaysgd-...-aA-...` for the three alphas) gets its last cell, "crossgrad, CPU budget", rewritten from
runs/presets_cpu/NAME/summary.json: the accuracy the paper reports, with the run's length and wall time.
REPORT.md's table between `<!-- table:presets_cpu -->` and `<!-- /table -->` lists each run beside the
published cell of its row in presets.md. Nothing is typed in: a preset without a run says "not run".
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs" / "presets_cpu"
PRESETS_MD = HERE / "presets.md"
REPORT_MD = HERE / "REPORT.md"
ALPHAS = ("1", "0.1", "0.01")


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def measured(name: str) -> str | None:
    """The run's numbers as the paper reports them (presets.md, "what is reported"), or None without a run."""
    path = RUNS / name / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    f = s["final"]
    if s["status"] != "completed":
        return f"{s['status']} at step {s['steps']}"
    if name.startswith("gut-"):
        acc = f"local {pct(f['local_acc_mean'])}, after {s['final_gossip_rounds']} gossip rounds " \
              f"{pct(s['final_gossip_acc_mean'])}"
    elif name.startswith("relaysgd-"):
        acc = f"worst {pct(f['local_acc_min'])}"
    elif name.startswith("ars-"):
        acc = f"local {pct(f['local_acc_mean'])}, consensus {pct(f['consensus_acc'])}"
    else:  # mt-
        acc = f"local {pct(f['local_acc_mean'])}"
    length = f"{s['epochs']:g} epochs" if s["epochs"] >= 1 else f"{s['steps']} steps"
    return f"{acc} ({length}, {s['wall_time_s'] / 60:.1f} min)"


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def row_names(first: str) -> list[str]:
    """The preset names a row stands for: one, or one per alpha for an `...-aA-...` row."""
    m = re.fullmatch(r"`([a-z0-9.\-]+(?:-aA-[a-z0-9.\-]+)?)`", first)
    if not m:
        return []
    return [m[1].replace("-aA-", f"-a{a}-") for a in ALPHAS] if "-aA-" in m[1] else [m[1]]


def fill_presets_md(text: str) -> tuple[str, list[tuple[str, str, str]]]:
    """presets.md with its CPU-budget cells filled; and (name, measured, published) for every run found."""
    out, found, header = [], [], []
    for line in text.splitlines():
        c = cells(line) if line.startswith("|") else []
        if c and not row_names(c[0]) and not set("".join(c)) <= set("-: "):
            header = c
        names = row_names(c[0]) if c else []
        if names and header and header[-1].startswith("crossgrad, CPU budget"):
            runs = [(n, measured(n)) for n in names]
            done = [(n, m) for n, m in runs if m is not None]
            if len(names) == 1:
                c[-1] = done[0][1] if done else "not run"
            else:
                c[-1] = "; ".join(f"α {n.split('-a')[-1].split('-')[0]}: {m}" for n, m in done) or "not run"
            for n, m in done:
                found.append((n, m, published(header, c, n)))
            line = "| " + " | ".join(c) + " |"
        out.append(line)
    return "\n".join(out) + "\n", found


def published(header: list[str], row: list[str], name: str) -> str:
    """The row's published cell for this preset (its alpha's column in RelaySGD's table)."""
    cols = [i for i, h in enumerate(header) if h.startswith("published")]
    if not cols:
        return "–"
    if "-a" in name and name.startswith("relaysgd-") and "iid" not in name:
        alpha = name.split("-a")[-1].split("-")[0]
        for i in range(cols[0], len(header)):
            if header[i].endswith(f"α = {alpha}"):
                return row[i]
    return row[cols[0]]


def report_table(found: list[tuple[str, str, str]]) -> str:
    lines = ["| preset | crossgrad at the CPU budget (2-vCPU VM, one thread, seed of the preset) | published |",
             "|---|---|---|"]
    # presets.md's "see below" points at its own text, which the report links to
    lines += [f"| `{n}` | {m} | {p.replace('(see below)', '(presets.md)')} |" for n, m, p in found]
    return "\n".join(lines)


def main() -> int:
    text, found = fill_presets_md(PRESETS_MD.read_text())
    PRESETS_MD.write_text(text)
    report = REPORT_MD.read_text()
    marks = re.compile(r"(<!-- table:presets_cpu -->\n)(?:.*?\n)?(<!-- /table -->)", re.S)
    if not marks.search(report):
        print("REPORT.md has no <!-- table:presets_cpu --> marks", file=sys.stderr)
        return 1
    REPORT_MD.write_text(marks.sub(lambda m: m[1] + report_table(found) + "\n" + m[2], report))
    print(f"{len(found)} runs in presets.md and REPORT.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
