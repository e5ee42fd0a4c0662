"""Tests for crossgrad.report on synthetic run directories (no training involved)."""
from __future__ import annotations

import csv
import io
import json
import statistics

import pytest

from crossgrad import report

SETTING = "digits/label_sorted/ring-5"
ACC = {  # method -> final consensus acc per seed (completed runs)
    "NGC (α=1)": [0.91, 0.88, 0.86],
    "DSGDm-N": [0.71, 0.75, 0.62],
}
LOCAL = {"NGC (α=1)": [0.90, 0.87, 0.85], "DSGDm-N": [0.65, 0.70, 0.55]}
BYTES = {"NGC (α=1)": [1000, 1000], "DSGDm-N": [1000, 0]}


def _write_run(d, method, seed, acc, local, status="completed", n_epochs=4, alpha=None, bytes_=None):
    d.mkdir(parents=True)
    summary = {
        "method": method, "setting": SETTING, "seed": seed, "status": status,
        "final": {"consensus_acc": acc, "consensus_loss": 0.5, "local_acc_mean": local,
                  "local_acc_min": local - 0.1, "local_acc_max": local + 0.05,
                  "consensus_distance": 1e-3},
        "best_consensus_acc": acc + 0.01, "steps": 100, "epochs": n_epochs,
        "wall_time_s": 10.0 + seed, "bytes_per_agent_per_step": bytes_ or [1000, 1000],
        "grad_evals_per_agent_per_step": 2 if method.startswith("NGC") else 1,
        "qp_failures": 0, "peak_memory_mb": 12.0,
    }
    if alpha is not None:
        summary["config"] = {"algorithm": {"name": "ngc", "alpha": alpha}}
    (d / "summary.json").write_text(json.dumps(summary))
    with open(d / "metrics.jsonl", "w") as f:
        for e in range(1, n_epochs + 1):
            f.write(json.dumps({
                "epoch": e, "step": 25 * e, "consensus_acc": acc * e / n_epochs,
                "consensus_loss": 1.0 / e, "local_acc_mean": local, "local_acc_min": local,
                "local_acc_max": local, "train_loss": 2.0 / e + 0.01 * seed,
                "consensus_distance": 10.0 ** (-e), "bias_mv": None, "bias_dv": None,
                "lr": 0.1, "wall_time_s": float(e), "bytes_round1": (bytes_ or [1000, 1000])[0],
                "bytes_round2": (bytes_ or [1000, 1000])[1]}) + "\n")


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    for method, accs in ACC.items():
        slug = "ngc" if method.startswith("NGC") else "dsgdm"
        for seed, (a, l) in enumerate(zip(accs, LOCAL[method])):
            _write_run(root / slug / f"seed{seed}", method, seed, a, l, bytes_=BYTES[method])
    # a failed run: must be counted and flagged, not averaged
    _write_run(root / "dsgdm" / "seed3", "DSGDm-N", 3, 0.10, 0.10, status="failed", n_epochs=2,
               bytes_=BYTES["DSGDm-N"])
    # a crashed run: metrics but no summary -> skipped with a warning
    crashed = root / "ngc" / "seed9"
    crashed.mkdir()
    (crashed / "metrics.jsonl").write_text('{"epoch": 1, "consensus_acc": 0.5}\n')
    return root


def _row(rows, method):
    (r,) = [r for r in rows if r.method == method]
    return r


def test_collect_finds_runs_and_warns(results, capsys):
    runs = report.collect([results])
    assert len(runs) == 7
    err = capsys.readouterr().err
    assert "seed9" in err and "summary.json" in err


def test_collect_warns_on_bad_json(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json")
    assert report.collect([tmp_path]) == []
    err = capsys.readouterr().err
    assert str(bad / "summary.json") in err


def test_aggregate_numbers(results):
    rows = report.aggregate(report.collect([results]))
    assert {(r.setting, r.method) for r in rows} == {(SETTING, m) for m in ACC}
    for method, accs in ACC.items():
        r = _row(rows, method)
        st = r.stats["consensus_acc"]
        assert st.n == 3
        assert st.mean == pytest.approx(statistics.fmean(accs))
        assert st.std == pytest.approx(statistics.stdev(accs))  # sample std, ddof=1
        lo = r.stats["local_acc_mean"]
        assert lo.mean == pytest.approx(statistics.fmean(LOCAL[method]))
        assert lo.std == pytest.approx(statistics.stdev(LOCAL[method]))
        best = r.stats["best_consensus_acc"]
        assert best.mean == pytest.approx(statistics.fmean(accs) + 0.01)
        assert r.stats["bytes_round1"].mean == BYTES[method][0]
        assert r.stats["bytes_round2"].mean == BYTES[method][1]
        assert r.stats["wall_time_s"].mean == pytest.approx(11.0)  # seeds 0,1,2
        assert r.seeds == [0, 1, 2]
    assert _row(rows, "NGC (α=1)").stats["grad_evals"].mean == 2


def test_failed_runs_flagged_not_averaged(results):
    rows = report.aggregate(report.collect([results]))
    d = _row(rows, "DSGDm-N")
    assert (d.n_runs, d.n_completed) == (4, 3)
    assert d.incomplete == {"failed": 1}
    assert any("failed" in f for f in d.flags)
    assert d.stats["consensus_acc"].mean == pytest.approx(statistics.fmean(ACC["DSGDm-N"]))
    n = _row(rows, "NGC (α=1)")
    assert n.flags == [] and n.incomplete == {}


def test_runs_differing_in_more_than_seed_are_separate_rows(tmp_path):
    """An lr grid is not a set of seeds: each lr gets its own row, labelled, in numeric order."""
    for i, (lr, acc) in enumerate([(0.01, 0.5), (0.0025, 0.3), (0.01, 0.6)]):
        _write_run(tmp_path / f"r{i}", "DSGDm-N", i // 2, acc, acc)
        path = tmp_path / f"r{i}" / "summary.json"
        s = json.loads(path.read_text())
        s["config"] = {"algorithm": {"name": "dsgd", "lr": lr}, "training": {"seed": i // 2, "threads": i},
                       "output": {"name": f"r{i}"}}
        path.write_text(json.dumps(s))
    rows = report.aggregate(report.collect([tmp_path]))
    assert [r.method for r in rows] == ["DSGDm-N [lr=0.0025]", "DSGDm-N [lr=0.01]"]
    assert rows[0].n_completed == 1 and rows[1].n_completed == 2
    assert rows[1].stats["consensus_acc"].mean == pytest.approx(0.55)
    assert not rows[1].flags  # seeds 0 and 1: no "duplicate seed"


def test_config_toml_stands_in_for_a_summary_without_config(tmp_path, capsys):
    """The runner writes config.toml (never config.json): a summary with no "config" is read with it,
    so an lr grid stays an lr grid; an unreadable config.toml is a warning, not a crash."""
    for i, lr in enumerate([0.01, 0.0025]):
        _write_run(tmp_path / f"r{i}", "DSGDm-N", 0, 0.5, 0.5)
        (tmp_path / f"r{i}" / "config.toml").write_text(f'[algorithm]\nname = "dsgd"\nlr = {lr}\n')
    _write_run(tmp_path / "r2", "DSGDm-N", 1, 0.5, 0.5)
    (tmp_path / "r2" / "config.toml").write_text("[algorithm\nlr = ")
    runs = report.collect([tmp_path])
    assert [r["config"] for r in runs] == [{"algorithm": {"name": "dsgd", "lr": 0.01}},
                                           {"algorithm": {"name": "dsgd", "lr": 0.0025}}, None]
    assert "invalid TOML" in capsys.readouterr().err
    rows = report.aggregate(runs[:2])
    assert [r.method for r in rows] == ["DSGDm-N [lr=0.0025]", "DSGDm-N [lr=0.01]"]


def test_unfinished_runs_are_counted_not_averaged(tmp_path, capsys):
    """Issue 17.5: the footer says runs not completed are counted in 'n ok/all'; interrupted ones were not."""
    from crossgrad.run.config import config_from_dict

    def config(seed):
        return {"algorithm": {"name": "ngc", "alpha": 1.0}, "training": {"seed": seed}}

    _write_run(tmp_path / "done", "NGC (α=1)", 0, 0.5, 0.4)
    summary = json.loads((tmp_path / "done" / "summary.json").read_text())
    summary["config"] = config_from_dict(config(0)).to_dict()
    (tmp_path / "done" / "summary.json").write_text(json.dumps(summary))
    for name, seed, ckpt in (("crashed", 1, False), ("interrupted", 2, True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.toml").write_text(
            f'[algorithm]\nname = "ngc"\nalpha = 1.0\n[training]\nseed = {seed}\n')
        if ckpt:
            (tmp_path / name / "checkpoint.pt").write_bytes(b"x")
    runs = report.collect([tmp_path])
    assert sorted(r["summary"]["status"] for r in runs) == ["completed", "crashed", "interrupted"]
    (row,) = report.aggregate(runs)
    assert (row.method, row.n_completed, row.n_runs) == ("NGC (α=1)", 1, 3)
    assert "1/3" in report.format_table([row])


def test_bookkeeping_keys_do_not_split_a_method(tmp_path):
    """Issue 17.5: checkpoint_every, threads, the evaluation cadence, the backend are not variants."""
    for seed, extra in ((0, {"checkpoint_every": 1, "threads": 1, "eval_every": 1}),
                        (1, {"checkpoint_every": 0, "threads": 2, "eval_every": 2})):
        _write_run(tmp_path / f"s{seed}", "NGC (α=1)", seed, 0.5, 0.4)
        summary = json.loads((tmp_path / f"s{seed}" / "summary.json").read_text())
        summary["config"] = {"algorithm": {"name": "ngc", "lr": 0.01}, "training": {"seed": seed, **extra},
                             "backend": "sim" if seed else "dist"}
        (tmp_path / f"s{seed}" / "summary.json").write_text(json.dumps(summary))
    (row,) = report.aggregate(report.collect([tmp_path]))
    assert row.n_completed == 2


def test_single_seed_std_zero_and_labelled(tmp_path):
    _write_run(tmp_path / "r", "CompNGC", 0, 0.5, 0.4)
    (row,) = report.aggregate(report.collect([tmp_path]))
    assert row.stats["consensus_acc"].std == 0.0
    text = report.format_table([row])
    assert "50.00 (n=1)" in text and "±" not in text.splitlines()[2]  # issue 17.5: no "± 0.00" for one run


def test_missing_optional_keys_blank(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps(
        {"method": "X", "setting": "s", "seed": 0, "status": "completed",
         "final": {"consensus_acc": 0.3}}))
    (row,) = report.aggregate(report.collect([tmp_path]))
    assert row.stats["local_acc_mean"] is None and row.stats["bytes_round1"] is None
    for fmt in ("text", "markdown", "csv"):
        assert "30.0" in report.format_table([row], fmt)


def test_markdown_and_csv(results):
    rows = report.aggregate(report.collect([results]))
    md = report.format_table(rows, "markdown")
    lines = md.strip().splitlines()
    assert lines[0].startswith("| setting | method |")
    assert set(lines[1]) <= set("|:-")
    assert len(lines) == 2 + len(rows)
    ngc = statistics.fmean(ACC["NGC (α=1)"]) * 100, statistics.stdev(ACC["NGC (α=1)"]) * 100
    assert f"{ngc[0]:.2f} ± {ngc[1]:.2f}" in md
    assert "1 failed" in md
    assert "1.00 kB" in md

    parsed = list(csv.DictReader(io.StringIO(report.format_table(rows, "csv"))))
    assert len(parsed) == 2
    by_method = {p["method"]: p for p in parsed}
    for method, accs in ACC.items():
        p = by_method[method]
        assert p["setting"] == SETTING
        assert float(p["consensus_acc_pct_mean"]) == pytest.approx(100 * statistics.fmean(accs))
        assert float(p["consensus_acc_pct_std"]) == pytest.approx(100 * statistics.stdev(accs))
        assert int(p["consensus_acc_n"]) == 3
    assert by_method["DSGDm-N"]["n_runs"] == "4"
    assert by_method["DSGDm-N"]["incomplete"] == "failed=1"
    assert "failed" in by_method["DSGDm-N"]["flags"]

    text = report.format_table(rows, "text")
    assert "DSGDm-N" in text and "3/4" in text
    with pytest.raises(ValueError):
        report.format_table(rows, "html")


def test_report_main_writes_files(results, capsys):
    assert report.report_main([results]) == 0
    out = capsys.readouterr().out
    assert "NGC (α=1)" in out and "report.md" in out
    md = (results / "report.md").read_text()
    assert "DSGDm-N" in md and "seed3" in md  # the failed run is named
    assert (results / "report.csv").read_text().startswith("setting,method,")


def test_report_main_empty(tmp_path, capsys):
    assert report.report_main([tmp_path]) == 2
    assert "no runs found" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_plot_main(results, tmp_path, capsys):
    out = tmp_path / "figs"
    assert report.plot_main([results], out=out) == 0
    slug = "digits-label_sorted-ring-5"
    for ext in ("png", "svg"):
        f = out / f"curves_{slug}.{ext}"
        assert f.is_file() and f.stat().st_size > 1000
    assert (out / f"curves_{slug}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / f"curves_{slug}.svg").read_text()
    assert str(out) in capsys.readouterr().out
    assert report.plot_main([tmp_path / "nothing"]) == 2


def test_plot_alpha_sweep(tmp_path):
    for i, a in enumerate([0.0, 0.5, 1.0]):
        for seed in range(2):
            _write_run(tmp_path / "runs" / f"a{i}s{seed}", f"NGC (α={a:g})", seed,
                       0.6 + 0.1 * a + 0.01 * seed, 0.5, alpha=a)
    rows = report.aggregate(report.collect([tmp_path / "runs"]))
    written = report.plot_alpha_sweep(rows, tmp_path / "out")
    assert sorted(p.suffix for p in written) == [".png", ".svg"]
    assert all(p.stat().st_size > 0 for p in written)
    assert report.plot_alpha_sweep([], tmp_path / "none") == []


def test_cli_main(results, capsys):
    assert report.main([str(results)]) == 0
    assert report.main(["plot", str(results), "--metrics", "consensus_acc"]) == 0
    out = capsys.readouterr().out
    assert "report.md" in out and "curves_" in out


def test_plot_gives_each_setting_its_own_file(tmp_path, capsys):
    """Issue 17.4: settings whose names differ only in punctuation or a decimal got one file name, the last
    one silently overwriting the others."""
    for i, setting in enumerate(("d/dirichlet 0.5/ring-5", "d/dirichlet:0.5/ring-5", "d/dirichlet-0.3/ring-5")):
        _write_run(tmp_path / "runs" / f"r{i}", "NGC (α=1)", 0, 0.5, 0.4)
        s = json.loads((tmp_path / "runs" / f"r{i}" / "summary.json").read_text())
        (tmp_path / "runs" / f"r{i}" / "summary.json").write_text(json.dumps({**s, "setting": setting}))
    assert report.plot_main([tmp_path / "runs"], out=tmp_path / "fig") == 0
    curves = sorted(p.name for p in (tmp_path / "fig").glob("curves_*.png"))
    assert len(curves) == 3 and "curves_d-dirichlet-0.3-ring-5.png" in curves


def test_plot_draws_cost_figure_log_loss_and_per_step_loss(tmp_path, capsys):
    """Issue 17.6: accuracy against bytes and wall time, mean local accuracy, a log-scale loss, per-step
    training loss (a run that diverged in its first epoch still has a curve)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from crossgrad.report import plots

    _write_run(tmp_path / "ok", "NGC (α=1)", 0, 0.5, 0.4)
    _write_run(tmp_path / "dead", "DSGDm-N", 0, 0.1, 0.1, status="diverged", n_epochs=0)
    (tmp_path / "dead" / "steps.csv").write_text("step,epoch,lr,train_loss,wall_time_s\n"
                                                 "10,0.4,0.1,2.3,1.0\n20,0.8,0.1,9.5,2.0\n")
    rows = report.aggregate(report.collect([tmp_path]))
    colour = {r.method: f"C{i}" for i, r in enumerate(rows)}
    fig = plots._draw_curves(plt, rows, list(plots.DEFAULT_METRICS), colour, SETTING)
    acc, local, loss, dist = fig.axes
    assert loss.get_yscale() == "log" and dist.get_yscale() == "log"
    assert "mean local accuracy" in local.get_ylabel()
    (dead,) = [line for line in loss.get_lines() if line.get_color() == colour["DSGDm-N"]]
    assert list(dead.get_xdata()) == [0.4, 0.8]
    assert fig.legends and not any(ax.get_legend() for ax in fig.axes)  # one legend, outside the panels
    cost = plots._draw_cost(plt, rows, colour, SETTING)
    by_bytes, by_time = cost.axes
    (line,) = [ln for ln in by_bytes.get_lines() if ln.get_color() == colour["NGC (α=1)"]]
    assert list(line.get_xdata()) == [2000 * 25 * e / 1e6 for e in (1, 2, 3, 4)]  # (r1 + r2) x step
    assert "wall time" in by_time.get_xlabel()


def test_metric_picks_the_accuracy_column_and_names_it(tmp_path, capsys):
    """--metric: the consensus model (default), the agents' mean, the worst agent, the mean after the final
    gossip rounds; the header says which, and runs without final gossip leave the post-gossip cell blank."""
    from crossgrad.cli import REPORT_METRICS, main

    root = tmp_path / "runs"
    gossip = [0.83, 0.79]
    for seed, (a, l, g) in enumerate(zip([0.9, 0.8], [0.7, 0.6], gossip)):
        _write_run(root / f"s{seed}", "DSGDm-N", seed, a, l)
        path = root / f"s{seed}" / "summary.json"
        s = json.loads(path.read_text())
        s["final"]["final_gossip_acc_mean"] = g
        path.write_text(json.dumps(s))
    _write_run(root / "other", "NGC (α=1)", 0, 0.5, 0.4)  # trained without final gossip rounds
    assert tuple(report.METRICS) == REPORT_METRICS
    expected = {"consensus": ("cons. acc (%)", [0.9, 0.8]), "local": ("mean local acc (%)", [0.7, 0.6]),
                "worst": ("worst agent acc (%)", [0.6, 0.5]), "gossip": ("post-gossip acc (%)", gossip)}
    for metric, (header, values) in expected.items():
        columns = report.columns_for(metric)
        rows = report.aggregate(report.collect([root]), columns)
        key = columns[0][0]
        assert [c[0] for c in columns].count(key) == 1  # "local" is not shown twice
        stat = _row(rows, "DSGDm-N").stats[key]
        assert stat.mean == pytest.approx(statistics.fmean(values)) and stat.n == 2
        md = report.format_table(rows, "markdown", columns)
        assert md.splitlines()[0].split(" | ")[4] == header
        csv_header = report.format_table(rows, "csv", columns).splitlines()[0].split(",")
        assert csv_header[7] == f"{key}_pct_mean"
        assert (_row(rows, "NGC (α=1)").stats[key] is None) == (metric == "gossip")
    assert main(["report", str(root), "--metric", "worst", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "worst agent acc (%)" in out and "'worst agent acc (%)': the worst agent's own model" in out
    assert "worst agent acc (%)" in (tmp_path / "out" / "report.md").read_text()
    assert main(["report", str(root), "--out", str(tmp_path / "out")]) == 0
    assert "cons. acc (%)" in capsys.readouterr().out  # the default is today's column


def test_runs_differing_in_a_list_option_are_two_variants(tmp_path):
    """training.lr_milestones is a list: runs that differ in it are split (not averaged), not a crash."""
    for i, milestones in enumerate(["[0.5, 0.75]", "[0.75, 0.9]"]):
        _write_run(tmp_path / f"r{i}", "DSGDm-N", 0, 0.5, 0.5)
        (tmp_path / f"r{i}" / "config.toml").write_text(
            f'[algorithm]\nname = "dsgd"\n[training]\nlr_milestones = {milestones}\n')
    rows = report.aggregate(report.collect([tmp_path]))
    assert sorted(r.method for r in rows) == ["DSGDm-N [lr_milestones=[0.5, 0.75]]",
                                              "DSGDm-N [lr_milestones=[0.75, 0.9]]"]
