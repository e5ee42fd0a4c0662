"""Experiment runner: config loading/validation, training loop, checkpoint/resume, NaN handling, sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossgrad.data.streams import AgentStream
from crossgrad.run import resume_experiment, run_experiment
from crossgrad.run.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_toml,
    load_config,
    method_label,
    parse_override,
    read_toml,
)
from crossgrad.run.data import AgentBatches
from crossgrad.run.evaluate import TIMING_KEYS, score_rows
from crossgrad.run.rundir import CHECKPOINT, METRICS, SUMMARY
from crossgrad.run.schedule import lr_at

FAST = ["training.threads=1", "training.checkpoint_every=1"]


def fast_cfg(tmp_path: Path, *overrides: str) -> Config:
    return load_config(None, [*FAST, f'output.out_dir="{tmp_path}"', *overrides])


# ------------------------------------------------------------------------------------ config
def test_defaults_and_toml_roundtrip(tmp_path):
    cfg = Config()
    assert (cfg.data.name, cfg.data.partition, cfg.topology.name, cfg.topology.n_agents) == (
        "digits",
        "label_sorted",
        "ring",
        5,
    )
    assert cfg.training.batch_size == 32 and cfg.backend == "sim"
    text = dump_toml(cfg.to_dict())
    p = tmp_path / "c.toml"
    p.write_text(text)
    assert config_from_dict(read_toml(p)) == cfg


def test_load_file_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        '[algorithm]\nname = "compngc"\nlr = 1\n[training]\nepochs = 3\n[topology]\noptions = {p = 0.5}\n'
    )
    cfg = load_config(
        p, ["algorithm.alpha=0", "data.name=mnist", 'model.name="mlp"', "backend=sim", "training.steps=7"]
    )
    a = cfg.algorithm.params
    assert cfg.algorithm.name == "compngc" and a["lr"] == 1.0 and isinstance(a["lr"], float)
    assert a["alpha"] == 0.0 and cfg.data.name == "mnist" and cfg.model.name == "mlp"
    assert cfg.training.epochs == 3 and cfg.training.steps == 7 and cfg.topology.options == {"p": 0.5}
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=true") == (["a", "b"], True)
    # every hyperparameter of the algorithm, resolved from its own defaults, and nothing else
    from crossgrad.algorithms import algorithm_options

    assert set(cfg.algorithm.params) == set(algorithm_options("compngc")) and "margin" not in cfg.algorithm.params
    dsgd = load_config(None, ["algorithm.name=dsgd"])
    assert dsgd.algorithm.params == algorithm_options("dsgd")
    assert apply_overrides({"data": {"name": "x"}}, ["data.name=y"]) == {"data": {"name": "y"}}


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["algorithm.name=adam"], "unknown algorithm"),
        (["algorithm.alpha=1.5"], "alpha"),
        (["algorithm.alpha=-0.1"], "alpha"),
        (["algorithm.gamma=0"], "gamma"),
        (["algorithm.gamma=-1"], "gamma"),
        (["algorithm.lrr=0.1"], "unknown key algorithm.lrr; ngc takes: name, lr, "),
        (["algorithm.name=dsgd", "algorithm.alpha=0.5"], "unknown key algorithm.alpha; dsgd takes"),
        (["algorithm.lr=fast"], "algorithm.lr must be a number"),
        (["optimizer.lr=0.1"], "unknown section"),
        (["training.epochs=two"], "training.epochs must be an integer"),
        (["data.partition=random"], "data.partition"),
        (["training.lr_schedule=linear"], "lr_schedule"),
        (["backend=mpi"], "backend"),
        (["justakey"], "section.key=value"),
    ],
)
def test_validation_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


def test_bad_toml_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[data\nname=1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("batch_size", [1, 7, 1024])
def test_score_rows_equals_one_model_at_a_time(batch_size):
    """The batched (vmap) evaluation, in chunks of at most batch_size (model, image) pairs, counts
    and sums exactly what evaluating each model on its own does."""
    from crossgrad.flat import ParamLayout
    from crossgrad.models import make_model

    torch.manual_seed(0)
    model = make_model("cnn5", (3, 8, 8), 4, "evonorm").double().eval()
    layout = ParamLayout.of(model)
    rows = torch.stack([layout.flatten(model) + 0.3 * torch.randn(layout.size, dtype=torch.float64)
                        for _ in range(6)])
    x, y = torch.randn(50, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (50,))
    correct, loss = score_rows(model, layout, rows, [], x, y, batch_size)
    for i in range(len(rows)):
        with torch.no_grad():
            for p, v in zip(model.parameters(), layout.views(rows[i]), strict=True):
                p.copy_(v)
            out = model(x)
        assert int(correct[i]) == int((out.argmax(-1) == y).sum())
        assert float(loss[i]) == pytest.approx(float(torch.nn.functional.cross_entropy(out, y, reduction="sum")),
                                               rel=1e-10)


def test_method_labels():
    def label(*o):
        return method_label(load_config(None, list(o)))

    assert label("algorithm.name=ngc", "algorithm.alpha=1") == "NGC (α=1)"
    assert label("algorithm.name=ngc", "algorithm.alpha=0.5") == "NGC (α=0.5)"
    assert label("algorithm.name=dsgd") == "DSGDm-N"
    assert label("algorithm.name=dsgd", "algorithm.qgm=true") == "QGM"
    assert label("algorithm.name=dsgd", "algorithm.momentum=0") == "DSGD"
    assert label("algorithm.name=compngc") == "CompNGC"
    assert label("algorithm.name=compcga") == "CompCGA"


# ------------------------------------------------------------------------------ data stream
def test_agent_stream_reshuffles_and_fills_batches():
    s = AgentStream(torch.arange(5), seed=3)
    seen = torch.cat([s.next(4) for _ in range(5)])  # 20 samples = 4 full passes over 5
    assert len(seen) == 20
    for k in range(4):
        assert sorted(seen[5 * k : 5 * k + 5].tolist()) == [0, 1, 2, 3, 4]
    state = s.state_dict()
    a = s.next(7)
    s.load_state_dict(state)
    assert torch.equal(a, s.next(7))


def test_lr_schedules():
    cfg = load_config(None, ["training.lr_schedule=multistep", "algorithm.lr=1.0"])
    assert [lr_at(cfg, t, 8) for t in (0, 3, 4, 5, 6, 7)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cfg = load_config(None, ["training.lr_schedule=cosine", "training.warmup_steps=2", "algorithm.lr=1.0"])
    lrs = [lr_at(cfg, t, 12) for t in range(12)]
    assert lrs[:2] == pytest.approx([0.5, 1.0]) and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] > 0


# ------------------------------------------------------------------------------ training
def _read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line.strip()]


def _strip_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_run_writes_metrics_summary_and_config(tmp_path):
    cfg = fast_cfg(tmp_path, "training.epochs=2", "output.name=r")
    result = run_experiment(cfg, quiet=True)
    assert result.status == "completed" and result.exit_code == 0
    run_dir = tmp_path / "r"
    recs = _read_metrics(run_dir)
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    last = recs[-1]
    for key in (
        "consensus_acc",
        "consensus_loss",
        "local_acc_mean",
        "local_acc_min",
        "local_acc_max",
        "train_loss",
        "train_loss_agents",
        "consensus_distance",
        "bias_mv",
        "bias_dv",
        "bytes_round1",
        "bytes_round2",
        "grad_evals",
        "qp_failures",
        "wall_time_s",
        "peak_mem_mb",
        "lr",
    ):
        assert last[key] is not None, key
    assert len(last["train_loss_agents"]) == 5 and len(last["local_acc"]) == 5
    assert last["local_acc_min"] <= last["local_acc_mean"] <= last["local_acc_max"]
    assert last["bytes_round1"] > 0 and last["bytes_round2"] > 0  # NGC alpha=1 has a second round
    s = json.loads((run_dir / SUMMARY).read_text())
    assert s["method"] == "NGC (α=1)" and s["setting"] == "digits/label_sorted/ring-5"
    assert s["status"] == "completed" and s["seed"] == 0
    assert s["final"]["consensus_acc"] == last["consensus_acc"]
    assert load_config(run_dir / "config.toml") == cfg
    # a finished run is not clobbered
    with pytest.raises(ConfigError, match="already holds a finished run"):
        run_experiment(cfg, quiet=True)


def test_ngc_alpha0_has_no_second_round_and_dsgd_no_bias(tmp_path):
    run_experiment(fast_cfg(tmp_path, "training.steps=3", "algorithm.alpha=0", "output.name=a0"), quiet=True)
    rec = _read_metrics(tmp_path / "a0")[-1]
    assert rec["bytes_round2"] == 0 and rec["bias_dv"] is None and rec["bias_mv"] is not None
    run_experiment(fast_cfg(tmp_path, "training.steps=3", "algorithm.name=dsgd", "output.name=d"), quiet=True)
    rec = _read_metrics(tmp_path / "d")[-1]
    assert rec["bias_mv"] is None and rec["bias_dv"] is None and rec["grad_evals_per_agent_per_step"] == 1


def test_seed_fixes_everything(tmp_path):
    a = run_experiment(fast_cfg(tmp_path, "training.steps=4", "output.name=a"), quiet=True)
    b = run_experiment(fast_cfg(tmp_path, "training.steps=4", "output.name=b"), quiet=True)
    c = run_experiment(fast_cfg(tmp_path, "training.steps=4", "output.name=c", "training.seed=1"), quiet=True)
    ma, mb, mc = (_strip_timing(_read_metrics(r.run_dir)) for r in (a, b, c))
    assert ma == mb and ma != mc


@pytest.mark.parametrize(
    "algo",
    [
        ["algorithm.name=ngc", "training.lr_schedule=multistep"],
        ["algorithm.name=compngc", "training.lr_schedule=cosine", "training.warmup_steps=3"],
        ["algorithm.name=dsgd", "algorithm.qgm=true", "data.partition=iid"],
        # an averaging-rate schedule across epochs and local steps across the stops (7 and 13 are not multiples of 3)
        ["algorithm.name=dsgd", "algorithm.gamma=0.5", "algorithm.gamma_schedule=exponential",
         "algorithm.gamma_growth=1.3", "training.local_steps=3"],
    ],
)
def test_resume_equals_uninterrupted(tmp_path, algo):
    common = ["training.epochs=3", "training.eval_every_steps=4", *algo]
    full = run_experiment(fast_cfg(tmp_path, "output.name=full", *common), quiet=True)
    part = run_experiment(fast_cfg(tmp_path, "output.name=part", *common), quiet=True, stop_after=7)
    assert part.status == "stopped" and part.exit_code == 0  # a requested stop is no interruption
    assert not (part.run_dir / SUMMARY).exists() and (part.run_dir / CHECKPOINT).exists()
    again = resume_experiment(part.run_dir, quiet=True, stop_after=13)  # a second interruption
    assert again.status == "stopped"
    done = resume_experiment(part.run_dir, quiet=True)
    assert done.status == "completed"
    ck_full = torch.load(full.run_dir / CHECKPOINT, weights_only=True)
    ck_part = torch.load(done.run_dir / CHECKPOINT, weights_only=True)
    assert ck_full["step"] == ck_part["step"] == full.summary["steps"]
    assert torch.equal(ck_full["sim"]["x"], ck_part["sim"]["x"])
    assert _strip_timing(_read_metrics(full.run_dir)) == _strip_timing(_read_metrics(done.run_dir))
    strip = ("wall_time_s", "peak_mem_mb", "final", "config")
    assert {k: v for k, v in full.summary.items() if k not in strip} == {
        k: v for k, v in done.summary.items() if k not in strip
    }
    assert _strip_timing([full.summary["final"]]) == _strip_timing([done.summary["final"]])


def test_nonfinite_loss_stops_with_message_and_keeps_checkpoint(tmp_path, monkeypatch):
    cfg = fast_cfg(tmp_path, "training.epochs=3", "output.name=nan")
    original, calls = AgentBatches.next, {"n": 0}
    spe = 9  # digits, 5 agents, batch 32

    def poisoned(self):
        batches = original(self)
        calls["n"] += 1
        if calls["n"] == spe + 2:  # the second step of epoch 2 (step index spe + 1)
            x, y = batches[2]
            batches[2] = (torch.full_like(x, float("nan")), y)
        return batches

    monkeypatch.setattr(AgentBatches, "next", poisoned)
    result = run_experiment(cfg, quiet=True)
    assert result.status == "diverged" and result.exit_code == 1
    assert f"step {spe + 2} on agent 2" in result.message
    ck = torch.load(result.run_dir / CHECKPOINT, weights_only=True)
    assert ck["step"] == spe and torch.isfinite(ck["sim"]["x"]).all()
    s = json.loads((result.run_dir / SUMMARY).read_text())
    assert s["status"] == "diverged" and "agent 2" in s["message"]


def test_huge_lr_diverges(tmp_path):
    result = run_experiment(
        fast_cfg(tmp_path, "training.epochs=2", "algorithm.lr=1e6", "output.name=big"), quiet=True
    )
    assert result.status == "diverged" and "non-finite" in result.message


# ------------------------------------------------------------------------------------ sweep
def test_sweep_is_seed_major_and_seeds_can_be_chosen(tmp_path, capsys):
    from crossgrad.cli import main
    from crossgrad.sweep import expand

    f = tmp_path / "sw.toml"
    f.write_text(f"""
[training]
steps = 1
[output]
out_dir = "{tmp_path / "out"}"
[sweep]
algorithms = ["ngc", "dsgd"]
seeds = [0, 1, 2]
""")
    runs, _ = expand(f)
    assert [(r.cfg.training.seed, r.cfg.algorithm.name) for r in runs] == [
        (0, "ngc"), (0, "dsgd"), (1, "ngc"), (1, "dsgd"), (2, "ngc"), (2, "dsgd")]
    runs, _ = expand(f, seeds=[5])
    assert [(r.cfg.training.seed, r.cfg.algorithm.name) for r in runs] == [(5, "ngc"), (5, "dsgd")]
    assert main(["sweep", str(f), "--seeds", "1,2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs" in out and "ring-5_s1" in out and "ring-5_s0" not in out
    assert main(["sweep", str(f), "--seeds", "one", "--dry-run"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_sweep_runs_grid_and_skips_finished(tmp_path, capsys):
    from crossgrad.sweep import expand, run_sweep

    f = tmp_path / "sw.toml"
    f.write_text(f"""
[training]
steps = 2
threads = 1
[output]
out_dir = "{tmp_path / "out"}"
[sweep]
algorithms = [{{name = "ngc", alpha = 1.0}}, {{name = "dsgd"}}, {{name = "ngc", alpha = 1.0, lr = 0.05}}]
seeds = [0, 1]
[sweep.grid]
"data.partition" = ["label_sorted", "iid"]
""")
    runs, jobs = expand(f)
    assert len(runs) == 12 and jobs == 1 and len({r.run_dir for r in runs}) == 12
    assert run_sweep(f, overrides=["training.steps=1"], quiet=True) == 0
    summaries = sorted((tmp_path / "out").glob("*/summary.json"))
    assert len(summaries) == 12
    mtimes = [p.stat().st_mtime_ns for p in summaries]
    capsys.readouterr()
    assert run_sweep(f, overrides=["training.steps=1"], quiet=True) == 0
    out = capsys.readouterr().out
    assert "12 already done, 0 to run" in out and out.count("skip ") == 12
    assert [p.stat().st_mtime_ns for p in summaries] == mtimes


def test_sweep_errors(tmp_path):
    from crossgrad.sweep import expand

    f = tmp_path / "sw.toml"
    f.write_text('[sweep]\nalgorithms = ["ngc"]\nbogus = 1\n')
    with pytest.raises(ConfigError, match="unknown \\[sweep\\] key"):
        expand(f)
    f.write_text('[sweep]\nalgorithms = [{name = "ngc", alpha = 2.0}]\n')
    with pytest.raises(ConfigError, match="alpha"):
        expand(f)
    f.write_text('[data]\nname = "digits"\n')
    with pytest.raises(ConfigError, match="needs a \\[sweep\\] table"):
        expand(f)


def test_ctrl_c_writes_checkpoint_and_resume_matches(tmp_path, monkeypatch):
    import os
    import signal

    common = ["training.steps=8", "training.eval_every_steps=3"]
    full = run_experiment(fast_cfg(tmp_path, "output.name=full", *common), quiet=True)
    original, calls = AgentBatches.next, {"n": 0}

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGINT)  # handled between steps: step 6 still completes
        return original(self)

    monkeypatch.setattr(AgentBatches, "next", interrupting)
    part = run_experiment(fast_cfg(tmp_path, "output.name=part", *common), quiet=True)
    assert part.status == "interrupted"
    assert torch.load(part.run_dir / CHECKPOINT, weights_only=True)["step"] == 6
    monkeypatch.setattr(AgentBatches, "next", original)
    done = resume_experiment(part.run_dir, quiet=True)
    assert _strip_timing(_read_metrics(full.run_dir)) == _strip_timing(_read_metrics(done.run_dir))
