"""Issue 17, what a new user meets first: feedback while a run starts, logs, stops, resumption, public API."""
from __future__ import annotations

import csv
import json
import re
import sys

import pytest

from crossgrad.cli import main
from crossgrad.run import resume_experiment, run_experiment
from crossgrad.run.config import ConfigError, load_config

TINY = ["model.name=mlp", "topology.n_agents=3", "training.batch_size=8", "training.threads=1",
        "training.steps=6", "training.eval_every_steps=3", "training.log_every=2", "training.eval_subset=50"]


def tiny(tmp_path, *overrides):
    return load_config(None, [*TINY, f'output.out_dir="{tmp_path}"', "output.name=r", *overrides])


def test_step_zero_scores_identical_models_once_and_says_so(tmp_path, monkeypatch, capsys):
    """Issue 17.2: the step-0 evaluation scored n identical models and the consensus: n + 1 passes, in silence."""
    import crossgrad.run.evaluate as ev
    import crossgrad.run.trainer as trainer

    # the "loading" line waits SLOW_S; on a machine busy with other jobs digits may take longer than 1 s
    monkeypatch.setattr(trainer, "SLOW_S", 60.0)
    calls = []
    real = ev.score_rows
    monkeypatch.setattr(ev, "score_rows", lambda model, layout, rows, *a, **k: (
        calls.append(rows.shape[0]), real(model, layout, rows, *a, **k))[1])
    result = run_experiment(tiny(tmp_path, "training.steps=1", "training.eval_every_steps=1"))
    assert result.status == "completed"
    assert calls[0] == 1 and len(calls) == 3  # step 0: one model; step 1: the 3 agents, then the consensus
    err = capsys.readouterr().err
    assert "loading" not in err  # digits loads at once: no status line for it
    assert "step 0: evaluating the initial model on 50 test samples" in err
    first = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["local_acc"] == [first["consensus_acc"]] * 3


def test_eval_at_start_false_skips_step_zero(tmp_path):
    result = run_experiment(tiny(tmp_path, "training.eval_at_start=false"))
    steps = [json.loads(line)["step"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6]


def test_eval_subset_is_seeded_and_bounded(tmp_path):
    import torch

    from crossgrad.run.data import prepare

    a, b = (prepare(tiny(tmp_path), torch.device("cpu")) for _ in range(2))
    assert len(a.y_test) == 50 and torch.equal(a.y_test, b.y_test)
    assert len(set(a.y_test.tolist())) > 5  # a random draw, not the first 50 samples of a sorted set
    with pytest.raises(ConfigError, match="eval_subset"):
        tiny(tmp_path, "training.eval_subset=0")


def _steps_csv(run_dir):
    with open(run_dir / "steps.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_steps_csv_logs_per_step_scalars_and_survives_resume(tmp_path):
    """Issue 17.6/17.7: per-step training loss, so a run that stops in its first epoch still has a curve."""
    assert run_experiment(tiny(tmp_path), stop_after=5).status == "stopped"
    assert [int(r["step"]) for r in _steps_csv(tmp_path / "r")] == [2, 3, 4]
    assert resume_experiment(tmp_path / "r").status == "completed"
    assert run_experiment(tiny(tmp_path, "output.name=whole")).status == "completed"
    rows, whole = _steps_csv(tmp_path / "r"), _steps_csv(tmp_path / "whole")
    assert [int(r["step"]) for r in rows] == [int(r["step"]) for r in whole] == [2, 3, 4, 6]
    assert [r["train_loss"] for r in rows[:3]] == [r["train_loss"] for r in whole[:3]]
    assert all(float(r["train_loss"]) > 0 and float(r["lr"]) == 0.01 for r in rows)


def test_a_run_diverging_in_its_first_epoch_has_steps_and_an_honest_message(tmp_path):
    """Issue 17.1: "the last good checkpoint" was named when none existed."""
    result = run_experiment(tiny(tmp_path, "algorithm.lr=1e12", "training.log_every=1",
                                 "training.eval_every_steps=100", "training.steps=200"))
    assert result.status == "diverged"
    assert "no checkpoint had been written yet" in result.message and "last good" not in result.message
    assert len(_steps_csv(tmp_path / "r")) >= 1


def test_tensorboard_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were absent
    with pytest.raises(ConfigError, match=r"pip install 'crossgrad\[tensorboard\]'"):
        tiny(tmp_path, "output.tensorboard=true")


def test_tensorboard_events_written(tmp_path):
    pytest.importorskip("tensorboard")
    result = run_experiment(tiny(tmp_path, "output.tensorboard=true"))
    assert result.status == "completed" and any((result.run_dir / "tensorboard").iterdir())


def test_stop_after_is_a_requested_stop_exit_0(tmp_path, capsys):
    """Issue 17.11: --stop-after reported "interrupted" and exited 130."""
    args = ["run", *[a for t in TINY for a in ("--set", t)], "--out-dir", str(tmp_path), "--name", "r", "--quiet"]
    assert main([*args, "--stop-after", "2"]) == 0
    assert "stopped: stopped at step 2 of 6" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "r"), "--quiet"]) == 0


def test_resume_without_checkpoint_fails_before_loading_data(tmp_path, monkeypatch, capsys):
    """Issue 17.11: --resume decoded all of CIFAR-10 before saying there was nothing to resume."""
    import crossgrad.data

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.toml").write_text('[data]\nname = "cifar10"\ndata_dir = "/nowhere"\n')
    monkeypatch.setattr(crossgrad.data, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    assert main(["run", "--resume", str(tmp_path / "r")]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_quiet_silences_the_data_decoding_bar(tmp_path, monkeypatch):
    """Issue 17.11: the CIFAR-10 decoding progress bar ignored --quiet (issue 30.4: and output to a file)."""
    import crossgrad.console
    import crossgrad.data

    seen = []
    real = crossgrad.data.load_dataset
    monkeypatch.setattr(crossgrad.data, "load_dataset",
                        lambda *a, progress=True, **k: (seen.append(progress), real(*a, progress=progress, **k))[1])
    run_experiment(tiny(tmp_path, "training.steps=1", "output.name=f"))  # the test's output is no terminal
    monkeypatch.setattr(crossgrad.console, "bars_wanted", lambda: True)
    run_experiment(tiny(tmp_path, "training.steps=1"), quiet=True)
    run_experiment(tiny(tmp_path, "training.steps=1", "output.name=s"))
    assert seen == [False, False, True]


# ------------------------------------------------------------------------------ discoverability (17.8)
def test_config_prints_the_resolved_configuration(tmp_path, capsys):
    from crossgrad.run.config import config_from_dict
    from crossgrad.sweep import read_toml

    assert main(["config", "--set", "algorithm.name=compngc", "--set", "topology.name=erdos_renyi",
                 "--set", "topology.options.p=0.5"]) == 0
    out = capsys.readouterr().out
    (tmp_path / "c.toml").write_text(out)
    cfg = config_from_dict(read_toml(tmp_path / "c.toml"))  # what it prints is a valid config, comments aside
    assert cfg.algorithm.params["codec"] == "sign" and cfg.topology.options == {"p": 0.5}
    assert "unset (their defaults apply): data.data_dir" in out


def test_dotted_overrides_reach_option_tables(tmp_path):
    cfg = load_config(None, ["topology.name=erdos_renyi", "topology.options.p=0.6", "topology.options.seed=3",
                             "model.options.width=0.5"])
    assert cfg.topology.options == {"p": 0.6, "seed": 3} and cfg.model.options == {"width": 0.5}
    for bad, match in (("training.seed.x=1", "training.seed is not a table"),
                       ("algorithm.lr.x=1", "algorithm.lr is not a table"),
                       ("a.b.c.d=1", "section.table.key=value")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])


def test_algorithms_listing_shows_every_hyperparameter(capsys):
    from crossgrad.algorithms import ALGORITHMS, algorithm_options

    assert main(["algorithms"]) == 0
    out = capsys.readouterr().out
    for name in ALGORITHMS:
        assert f"\n{name}" in "\n" + out
        assert all(f"    {k} = " in out for k in algorithm_options(name))
    assert "codec = (unset)" in out and 'codec = "sign"' in out


def test_partition_prints_the_class_histogram(capsys):
    assert main(["partition", "--set", "data.partition=dirichlet", "--set", "data.beta=0.3"]) == 0
    out = capsys.readouterr().out
    assert "digits/dirichlet-0.3/ring-5" in out
    totals = [int(line.rsplit("|", 1)[1]) for line in out.splitlines()[3:]]
    assert len(totals) == 5 and sum(totals) > 1000
    assert main(["partition", "--set", "data.name=nope"]) == 2


def test_partition_shows_dirichlet_even_and_classes(capsys):
    def rows(out: str) -> list[list[int]]:  # the histogram's per-class counts and the total, one row per agent
        return [[int(v) for v in line.replace("|", " ").split()[1:]] for line in out.splitlines()[3:]]

    assert main(["partition", "--set", "data.partition=dirichlet_even", "--set", "data.beta=0.1"]) == 0
    out = capsys.readouterr().out
    assert "digits/dirichlet_even-0.1/ring-5" in out
    totals = [r[-1] for r in rows(out)]
    assert len(totals) == 5 and max(totals) - min(totals) <= 1  # N/n each
    assert main(["partition", "--set", "data.partition=classes", "--set", "data.classes_per_agent=3"]) == 0
    out = capsys.readouterr().out
    assert "digits/classes-3/ring-5" in out
    assert [sum(v > 0 for v in r[:-1]) for r in rows(out)] == [3] * 5
    assert main(["partition", "--set", "data.partition=classes"]) == 2
    assert "needs data.classes_per_agent" in capsys.readouterr().err
    assert main(["partition", "--set", "data.partition=classes", "--set", "data.classes_per_agent=11"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "crossgrad: error: classes_per_agent=11 exceeds the 10 classes" in err
    for bad, msg in (("data.classes_per_agent=0", "data.classes_per_agent must be >= 1"),
                     ("data.image_size=0", "data.image_size must be >= 1")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [bad])


def test_every_bench_flag_is_described(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    flags = [line.split()[0] for line in out.splitlines() if line.strip().startswith("--")]
    assert len(flags) >= 10
    for entry in out.split("options:")[1].split("\n  -")[1:]:  # "-flag METAVAR  help", help maybe on the next line
        assert len(re.split(r"\s{2,}", entry.strip(), maxsplit=1)) == 2, f"bench flag without help: {entry!r}"


# ------------------------------------------------------------------------------ the README's Python (17.9)
def readme_python() -> str:
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Using the simulator from Python", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_python_snippet_runs_in_any_folder(tmp_path, monkeypatch, capsys):
    """Issue 17.9: `batches` was undefined and there was no loader or evaluation helper. Issue 30.5: it read
    ../shared/data, so it ended in a traceback anywhere else. It runs as printed, from an empty folder,
    with fewer steps."""
    code = readme_python()
    assert "range(300)" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("range(300)", "range(3)"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "'consensus_acc'" in out and "'local_acc'" in out


def test_batch_streams_match_the_runner(tmp_path):
    """The public streams give the runner's batches: same seeds, same samples, same normalisation."""
    import torch

    from crossgrad.data import BatchStreams
    from crossgrad.run.data import AgentBatches, prepare

    p = prepare(tiny(tmp_path), torch.device("cpu"))
    from crossgrad.data import load_dataset

    train, _ = load_dataset("digits")
    ours, runner = BatchStreams(train, p.shards, 8, seed=0), AgentBatches(p, [0, 1, 2], 8)
    for _ in range(3):
        for (xa, ya), (xb, yb) in zip(next(ours), runner.next(), strict=True):
            assert torch.equal(ya, yb) and torch.allclose(xa, xb)


# ------------------------------------------------------------------------------ sweeps (17.3, 17.11)
@pytest.mark.slow  # three child processes
def test_one_ctrl_c_stops_a_parallel_sweep_with_every_run_resumable(tmp_path):
    """Issue 17.3: the first Ctrl-C interrupted the running pair and started the next; the third ended in a
    traceback. Now the sweep forwards it once to each run, starts nothing new and exits 130."""
    import signal
    import subprocess
    import time

    f = tmp_path / "s.toml"
    f.write_text(f'[output]\nout_dir = "{tmp_path / "out"}"\n[model]\nname = "mlp"\n[topology]\nn_agents = 3\n'
                 '[training]\nsteps = 100000\nbatch_size = 8\ncheckpoint_every = 0\nlog_every = 1\n'
                 '[sweep]\nalgorithms = ["ngc", "dsgd", "compngc"]\n')
    proc = subprocess.Popen([sys.executable, "-m", "crossgrad", "sweep", str(f), "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "out").glob("*/steps.csv"))) < 2:  # both runs are in their training loops
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "sweep interrupted" in err
    runs = sorted(d for d in (tmp_path / "out").iterdir() if d.is_dir())
    assert len(runs) == 2  # the third run never started
    for d in runs:
        assert (d / "checkpoint.pt").is_file() and not (d / "summary.json").exists()
        assert resume_experiment(d, stop_after=int(torch_step(d)) + 1).status == "stopped"


def torch_step(run_dir) -> int:
    import torch

    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"]


def test_sweep_progress_shows_elapsed_and_time_left():
    import time

    from crossgrad.sweep import _progress

    started = time.monotonic() - 120
    assert _progress(1, 3, started).startswith("[1/3] 2m00s, about 4m0")
    assert _progress(3, 3, started) == "[3/3] 2m00s"


def test_a_checkpoint_written_before_the_new_keys_still_resumes(tmp_path):
    """Keys added by issue 17 (training.eval_subset, ...) are absent from older runs' saved configs; their
    checkpoints must resume, not fail with "written by another configuration (differs in )"."""
    import torch

    from crossgrad.run.rundir import comparable_config

    cfg = tiny(tmp_path)
    cfg.training.eval_subset = None  # unset, as in every run written before the key existed
    assert run_experiment(cfg, stop_after=2).status == "stopped"
    path = tmp_path / "r" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    for section in ("training", "output"):  # as an older version wrote it
        for key in ("eval_subset", "eval_at_start", "log_every", "tensorboard"):
            state["config"][section].pop(key, None)
    torch.save(state, path)
    assert comparable_config(state["config"]) == comparable_config(cfg.to_dict())
    assert resume_experiment(tmp_path / "r").status == "completed"


def test_a_slow_data_load_says_what_is_happening(tmp_path, monkeypatch, capsys):
    """Issue 17.2: a minute without output while the data loaded."""
    import crossgrad.run.trainer as trainer

    monkeypatch.setattr(trainer, "SLOW_S", 0.0)
    run_experiment(tiny(tmp_path, "training.steps=1"))
    assert "[r] loading digits and building the run" in capsys.readouterr().err
