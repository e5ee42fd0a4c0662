"""`crossgrad run --backend dist` under torchrun writes the simulator's results, and resumes exactly.

Three torchrun launches of 3 gloo processes (start-up dominates, so the runs are tiny): a full
run, and the same run stopped half-way and resumed. Both are compared with the simulator's run
of the same config in this process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossgrad.config import load_config
from crossgrad.experiment import TIMING_KEYS, run_experiment

N = 3
STEPS = 8
SETS = [
    "data.name=synthetic", f"topology.n_agents={N}", "topology.name=chain", "algorithm.name=compngc",
    "algorithm.lr=0.05", "algorithm.gamma=0.5", f"training.steps={STEPS}", "training.eval_every_steps=4",
    "training.threads=1", "training.device=cpu", "training.comm_timeout=60",
]


def torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={N}",
           "-m", "crossgrad", "run", "--quiet", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_params(run_dir: Path) -> torch.Tensor:
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    if "ranks" in state:
        return torch.cat([r["sim"]["x"] for r in state["ranks"]])
    return state["sim"]["x"]


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [0, 4, 8]
    for x, y in zip(ra, rb, strict=True):
        for key, value in x.items():
            if key in TIMING_KEYS:
                continue
            if value is None:
                assert y[key] is None, (x["step"], key)
                continue
            assert y[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (x["step"], key)
    torch.testing.assert_close(final_params(b), final_params(a), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    cfg = load_config(None, [*SETS, f'output.out_dir="{out}"', "output.name=run"])
    assert run_experiment(cfg, quiet=True).status == "completed"
    return out / "run"


def test_dist_run_writes_the_simulators_results(tmp_path, sim_run):
    proc = torchrun(tmp_path, *(f"--set={s}" for s in SETS), "--backend", "dist", "--out-dir", "out",
                    "--name", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "config.toml", "metrics.jsonl",
                                                         "summary.json"]
    assert proc.stdout.count("completed") == 1  # rank 0 reports for everyone
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["backend"] == "dist" and summary["status"] == "completed"
    sim_summary = json.loads((sim_run / "summary.json").read_text())
    assert summary["bytes_per_agent_per_step"] == sim_summary["bytes_per_agent_per_step"]
    assert summary["grad_evals"] == sim_summary["grad_evals"] == STEPS * (N + 2 * (N - 1))
    assert_same_run(sim_run, run_dir)


def test_dist_run_stopped_and_resumed_equals_the_uninterrupted_run(tmp_path, sim_run):
    first = torchrun(tmp_path, *(f"--set={s}" for s in SETS), "--backend", "dist", "--out-dir", "out",
                     "--name", "run", "--stop-after", "5")
    # every rank exits with 130 (interrupted); torchrun itself reports that as 1
    assert first.returncode != 0 and "stopped at step 5 of 8" in first.stderr, first.stderr[-3000:]
    run_dir = tmp_path / "out" / "run"
    assert not (run_dir / "summary.json").exists() and (run_dir / "checkpoint.pt").exists()
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["step"] == 5 and len(state["ranks"]) == N
    second = torchrun(tmp_path, "--resume", "out/run")
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_run(sim_run, run_dir)


def test_dist_run_outside_torchrun_says_how_to_launch(tmp_path, capsys):
    from crossgrad.cli import main

    rc = main(["run", "--quiet", "--backend", "dist", "--out-dir", str(tmp_path), *(f"--set={s}" for s in SETS)])
    err = capsys.readouterr().err
    assert rc == 2 and "torchrun --nproc-per-node 3" in err and "Traceback" not in err
