"""A run killed with SIGKILL at random moments resumes to exactly the uninterrupted result."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest
import torch

from crossgrad.run.evaluate import TIMING_KEYS
from crossgrad.run.rundir import CHECKPOINT, METRICS, SUMMARY

ARGS = ["--set", 'model.name="mlp"', "--set", "training.epochs=6", "--set", "training.checkpoint_every=1",
        "--set", "training.threads=1", "--set", "algorithm.name=compngc", "--quiet"]


def crossgrad(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "crossgrad", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def comparable(run_dir):
    metrics = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    metrics = [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]
    summary = json.loads((run_dir / SUMMARY).read_text())
    return metrics, summary["final"]["consensus_acc"], summary["steps"]


@pytest.mark.timeout(240)
def test_sigkill_at_random_points_then_resume(tmp_path):
    ref = crossgrad("run", *ARGS, "--out-dir", str(tmp_path), "--name", "ref")
    assert ref.wait(120) == 0, ref.stderr.read()
    expected = comparable(tmp_path / "ref")
    final_params = torch.load(tmp_path / "ref" / CHECKPOINT, weights_only=True)["sim"]["x"]

    rng = random.Random(1)
    run_dir = tmp_path / "killed"
    proc = crossgrad("run", *ARGS, "--out-dir", str(tmp_path), "--name", "killed")
    kills, steps = 0, []
    for _ in range(12):  # bounded: at most 12 launches
        try:
            rc = proc.wait(rng.uniform(1.5, 4.0))  # imports take ~1.5 s, a run a few seconds
            assert rc == 0, proc.stderr.read()  # a launch that was not killed finished cleanly
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kills += 1
            if (run_dir / CHECKPOINT).exists():  # whatever the moment, the checkpoint there is whole
                steps.append(torch.load(run_dir / CHECKPOINT, weights_only=True)["step"])
        if (run_dir / SUMMARY).exists():
            break
        if (run_dir / CHECKPOINT).exists():
            proc = crossgrad("run", "--resume", str(run_dir), "--quiet")
        else:  # killed before the first checkpoint: start again
            proc = crossgrad("run", *ARGS, "--out-dir", str(tmp_path), "--name", "killed", "--overwrite")
    else:
        assert proc.wait(120) == 0
    time.sleep(0.1)
    assert (run_dir / SUMMARY).exists(), "the run never finished"
    assert kills >= 1, "the schedule never hit a running process"
    assert steps == sorted(steps), "a resumed run went back past its last checkpoint"
    assert comparable(run_dir) == expected
    assert torch.equal(torch.load(run_dir / CHECKPOINT, weights_only=True)["sim"]["x"], final_params)
