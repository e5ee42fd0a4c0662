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

from crossgrad.run import load_config, run_experiment
from crossgrad.run.evaluate import TIMING_KEYS

N = 3
STEPS = 8
SETS = [
    "data.name=synthetic", f"topology.n_agents={N}", "topology.name=chain", "algorithm.name=compngc",
    "algorithm.lr=0.05", "algorithm.gamma=0.5", f"training.steps={STEPS}", "training.eval_every_steps=4",
    "training.threads=1", "training.device=cpu", "training.comm_timeout=60",
]


def torchrun(tmp_path: Path, *args: str, processes: int = N) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
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
            assert y[key] == value, (x["step"], key, value, y[key])  # float32, bit for bit on any layout
    assert torch.equal(final_params(b), final_params(a))


def _simulated(out: Path, sets: list[str]) -> Path:
    """The simulator's run of `sets` in out/run (what the dist runs are compared with)."""
    cfg = load_config(None, [*sets, f'output.out_dir="{out}"', "output.name=run"])
    assert run_experiment(cfg, quiet=True).status == "completed"
    return out / "run"


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory) -> Path:
    return _simulated(tmp_path_factory.mktemp("sim"), SETS)


def test_dist_run_writes_the_simulators_results(tmp_path, sim_run):
    proc = torchrun(tmp_path, *(f"--set={s}" for s in SETS), "--backend", "dist", "--out-dir", "out",
                    "--name", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "run"
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == sorted(p.name for p in sim_run.iterdir())  # the simulator's files, none per rank
    assert {"checkpoint.pt", "config.toml", "metrics.jsonl", "summary.json"} <= set(names)
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
    # a requested stop is no failure: every rank checkpoints and exits 0, torchrun kills nobody
    assert first.returncode == 0 and "stopped: stopped at step 5 of 8" in first.stderr, first.stderr[-3000:]
    assert "Traceback" not in first.stderr and "SIGTERM" not in first.stderr
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
    assert rc == 2 and "torchrun --nproc-per-node P" in err and "1 <= P <= 3" in err and "Traceback" not in err


BLOCKS = [s.replace(f"n_agents={N}", "n_agents=5") for s in SETS]  # 5 agents on 2 processes: blocks of 3 and 2


@pytest.fixture(scope="module")
def sim_blocks_run(tmp_path_factory) -> Path:
    return _simulated(tmp_path_factory.mktemp("sim_blocks"), BLOCKS)


@pytest.mark.slow
def test_blocks_of_agents_stopped_and_resumed_equal_the_simulator(tmp_path, sim_blocks_run):
    """5 agents on 2 processes (uneven blocks): stopped at step 5, resumed, the simulator's run; one process
    more than agents is refused with one line."""
    sets = [f"--set={s}" for s in BLOCKS]
    first = torchrun(tmp_path, *sets, "--backend", "dist", "--out-dir", "out", "--name", "run", "--stop-after", "5",
                     processes=2)
    assert first.returncode == 0 and "stopped: stopped at step 5 of 8" in first.stderr, first.stderr[-3000:]
    run_dir = tmp_path / "out" / "run"
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert [len(r["streams"]) for r in state["ranks"]] == [3, 2]
    second = torchrun(tmp_path, "--resume", "out/run", processes=2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_run(sim_blocks_run, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    sim_summary = json.loads((sim_blocks_run / "summary.json").read_text())
    assert summary["bytes_per_agent_per_step"] == sim_summary["bytes_per_agent_per_step"]
    assert summary["shard_sizes"] == sim_summary["shard_sizes"] and len(records(run_dir)[-1]["local_acc"]) == 5


def test_dist_run_with_more_processes_than_agents_says_so(tmp_path, capsys, monkeypatch):
    from crossgrad.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    rc = main(["run", "--quiet", "--backend", "dist", "--out-dir", str(tmp_path), *(f"--set={s}" for s in SETS)])
    err = capsys.readouterr().err
    assert rc == 2 and "4 processes were launched for 3 agents" in err and "Traceback" not in err


POISON = """
import os, sys, torch
from crossgrad.cli import main
from crossgrad.run.data import AgentBatches

original, calls = AgentBatches.next, [0]

def poisoned(self):
    batches = original(self)
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 3:  # agent 1's third step, on one rank only
        x, y = batches[0]
        batches[0] = (torch.full_like(x, float("nan")), y)
    return batches

AgentBatches.next = poisoned
raise SystemExit(main(sys.argv[1:]))
"""


def test_dist_run_nonfinite_on_one_rank_is_a_divergence_on_all(tmp_path):
    """Every rank agrees the run diverged (no rank mistakes it for a network failure) and rank 0 writes
    the simulator's summary, naming the failing step and agent; the last good checkpoint is kept."""
    script = tmp_path / "poisoned_run.py"
    script.write_text(POISON)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    sets = [*SETS, "training.checkpoint_every=0", "training.eval_every_steps=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={N}", str(script),
           "run", "--quiet", *(f"--set={s}" for s in sets), "--backend", "dist", "--out-dir", "out", "--name", "r"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0  # every rank exits 1 (diverged)
    assert "crossgrad: agent" not in proc.stderr and "no answer" not in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "r" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] == 2
    assert "non-finite loss at step 3 on agent 1" in summary["message"]
    assert proc.stderr.count("training diverged") == 1  # rank 0 reports for everyone


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "fashion-mnist").is_dir(), reason="../shared/data not present")
def test_dist_run_slow_evaluation_does_not_count_against_the_comm_timeout(tmp_path):
    """Rank 0 scores the consensus model and writes checkpoints while the others wait at a barrier bounded
    by the generous control time-out: a healthy run with a tight comm_timeout completes."""
    sets = ["data.name=fashion-mnist", f'data.data_dir="{SHARED / "fashion-mnist"}"', "model.name=lenet5",
            "topology.n_agents=2", "topology.name=chain", "training.steps=4", "training.eval_every_steps=2",
            "training.checkpoint_every=0", "training.threads=1", "training.device=cpu",
            "training.comm_timeout=0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "crossgrad", "run", "--quiet", *(f"--set={s}" for s in sets), "--backend", "dist",
           "--out-dir", "out", "--name", "r"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in records(tmp_path / "out" / "r")] == [0, 2, 4]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_dist_run_on_cuda_without_cuda_is_the_simulators_error(tmp_path, capsys, monkeypatch):
    from crossgrad.cli import main

    args = ["run", "--quiet", "--out-dir", str(tmp_path), "--set", "training.device=cuda", "--set",
            "topology.n_agents=2", "--set", "training.steps=1"]
    assert main(args) == 2
    sim_err = capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main([*args, "--backend", "dist"]) == 2
    assert capsys.readouterr().err == sim_err and "CUDA is not available" in sim_err


def test_dist_run_ctrl_c_stops_every_rank_with_a_checkpoint(tmp_path):
    """Ctrl-C in the terminal reaches torchrun and every rank; the ranks agree on it, stop at the same step,
    and rank 0 writes the checkpoint: one message, no traceback from any rank."""
    import signal
    import time

    sets = [*SETS, "training.steps=1000000", "training.eval_every_steps=1000000", "training.checkpoint_every=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={N}", "-m", "crossgrad",
           "run", "--quiet", *(f"--set={s}" for s in sets), "--backend", "dist", "--out-dir", "out", "--name", "r"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    run_dir = tmp_path / "out" / "r"
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # training
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the launcher and every rank
    _, err = proc.communicate(timeout=120)
    assert err.count("crossgrad: interrupted: stopped at step") == 1, err[-3000:]
    assert "KeyboardInterrupt" not in err and "crossgrad/run" not in err, err[-3000:]  # no rank's traceback
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["step"] > 0 and len(state["ranks"]) == N and not (run_dir / "summary.json").exists()
