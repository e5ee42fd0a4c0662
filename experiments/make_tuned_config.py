"""Write experiments/fmnist_tuned.toml: setting 1's 10-epoch comparison at each method's tuned (gamma, lr).

    python experiments/make_tuned_config.py     # after the tuning sweeps (run_all.sh runs it)

The pick is each method's best final consensus accuracy over every 2-epoch tuning run in
experiments/runs/fmnist_lr (gamma in {0.1, 0.5, 1} x lr; make_report.py's tables/tuned_picks.md).
Methods whose pick equals a setting fmnist_ring5.toml already ran (gamma 0.1 and the same lr) are
left out: their runs are reused. Everything else is fmnist_ring5.toml's configuration.
"""
from __future__ import annotations

import sys

from make_report import HERE, RUNS, TUNING, _order, completed, hp, picks

from crossgrad.report import collect


def entry(run: dict) -> str:
    a = run.get("config", {}).get("algorithm", {})
    keys = {"name": f'"{a["name"]}"'}
    if a.get("qgm"):
        keys["qgm"] = "true"
    if a["name"] == "ngc":
        keys["alpha"] = f"{a['alpha']:g}" if a["alpha"] % 1 else f"{a['alpha']:.1f}"
    keys["gamma"] = f"{a['gamma']}"
    keys["lr"] = f"{a['lr']}"
    return "{ " + ", ".join(f"{k} = {v}" for k, v in keys.items()) + " }"


def main() -> int:
    tuning = completed(collect([RUNS / TUNING]))
    if not tuning:
        print(f"no finished tuning runs under {RUNS / TUNING}", file=sys.stderr)
        return 2
    existing = completed(collect([RUNS / "fmnist_ring5"])) if (RUNS / "fmnist_ring5").is_dir() else []
    lines, reused = [], []
    for method, o in sorted(picks(tuning).items(), key=lambda kv: _order(kv[0])):
        best = o["all"]
        g, lr = hp(best, "gamma"), hp(best, "lr")
        if any(r["summary"]["method"] == method and hp(r, "gamma") == g and hp(r, "lr") == lr for r in existing):
            reused.append(f"#   {method}: gamma {g:g}, lr {lr:g} (runs/fmnist_ring5)")
            continue
        lines.append(f"    {entry(best)},   # {method}")
    base = (HERE / "fmnist_ring5.toml").read_text(encoding="utf-8")
    body = base[base.index("[data]"):base.index("[sweep]")]
    body = body.replace('out_dir = "experiments/runs/fmnist_ring5"', 'out_dir = "experiments/runs/fmnist_tuned"')
    text = (
        "# Setting 1 at each method's tuned (gamma, lr): written by experiments/make_tuned_config.py from the\n"
        "# 2-epoch gamma x lr tuning (tables/gamma_tuning.md, tables/tuned_picks.md); do not edit by hand.\n"
        "# Otherwise fmnist_ring5.toml's settings (10 epochs, multistep, Nesterov 0.9, 3 seeds).\n"
        "# Reused, already run at their tuned setting:\n" + ("\n".join(reused) or "#   none") + "\n"
        "# crossgrad sweep experiments/fmnist_tuned.toml --seeds 0 --jobs 1, then --seeds 1,2\n"
        + body.replace("gamma = 0.1\n", "")
        + "[sweep]\nalgorithms = [\n" + "\n".join(lines) + "\n]\nseeds = [0, 1, 2]\n"
    )
    (HERE / "fmnist_tuned.toml").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
