"""NaN / Inf in a message or a gradient: named (what, step, agent), exit 1, the last good checkpoint kept."""
from __future__ import annotations

import json

import pytest
import torch

from crossgrad.cli import main
from crossgrad.comm.local import LocalComm
from crossgrad.run.data import AgentBatches
from crossgrad.run.rundir import CHECKPOINT, SUMMARY
from crossgrad.wiring import Wiring

POISON_AT = 12  # a step of epoch 2 (digits, 5 agents, batch 32: 9 steps per epoch)


def run_cli(capsys, tmp_path, *sets: str) -> tuple[int, str]:
    args = ["run", "--quiet", "--out-dir", str(tmp_path), "--name", "r"]
    for s in ("training.epochs=3", "training.checkpoint_every=1", "training.threads=1", 'model.name="mlp"', *sets):
        args += ["--set", s]
    rc = main(args)
    return rc, capsys.readouterr().err.strip()


def poison_nth_call(monkeypatch, cls, name, n, value=float("nan")):
    original = getattr(cls, name)
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == n:
            if isinstance(out, tuple):
                out = (out[0].clone(),) + tuple(out[1:])
                out[0][1, 3] = value  # one element of the message on edge 1
            else:
                out = out.clone()
                out[1, 3] = value
        return out

    monkeypatch.setattr(cls, name, poisoned)


def assert_stopped_cleanly(tmp_path, rc, err):
    assert rc == 1 and err.count("\n") == 0 and "Traceback" not in err, err
    assert f"at step {POISON_AT}" in err and "agent" in err
    ck = torch.load(tmp_path / "r" / CHECKPOINT, weights_only=True)
    assert ck["step"] == 9 and torch.isfinite(ck["sim"]["x"]).all()  # the end of epoch 1, untouched
    summary = json.loads((tmp_path / "r" / SUMMARY).read_text())
    assert summary["status"] == "diverged" and summary["steps"] == POISON_AT - 1


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_cross_gradient_received_in_round_2(tmp_path, capsys, monkeypatch, value):
    # in-process, round 2's receivers read the senders' decoded rows in place (Wiring.round2): poison them there
    poison_nth_call(monkeypatch, Wiring, "round2", POISON_AT, value)
    rc, err = run_cli(capsys, tmp_path)
    assert_stopped_cleanly(tmp_path, rc, err)
    assert "cross-gradient received from agent" in err and "round 2" in err


def test_nonfinite_model_received_in_round_1(tmp_path, capsys, monkeypatch):
    # in-process, round 1 hands the engine the senders' rows in place (share); poison them in transit there
    poison_nth_call(monkeypatch, LocalComm, "share", POISON_AT)
    rc, err = run_cli(capsys, tmp_path, 'algorithm.name="dsgd"')
    assert_stopped_cleanly(tmp_path, rc, err)
    assert "model received from agent" in err and "round 1" in err


def test_nonfinite_input_batch_names_the_loss(tmp_path, capsys, monkeypatch):
    original, calls = AgentBatches.next, {"n": 0}

    def poisoned(self):
        batches = original(self)
        calls["n"] += 1
        if calls["n"] == POISON_AT:
            x, y = batches[3]
            batches[3] = (torch.full_like(x, float("inf")), y)
        return batches

    monkeypatch.setattr(AgentBatches, "next", poisoned)
    rc, err = run_cli(capsys, tmp_path)
    assert_stopped_cleanly(tmp_path, rc, err)
    assert "non-finite loss" in err and "agent 3" in err


def test_diverged_run_resumes_from_its_last_finite_checkpoint(tmp_path, capsys, monkeypatch):
    from crossgrad.sweep import SweepRun, _status

    poison_nth_call(monkeypatch, Wiring, "round2", POISON_AT)  # a one-off fault (a flipped bit)
    rc, err = run_cli(capsys, tmp_path)
    assert rc == 1 and "the last finite checkpoint (step 9)" in err and f"--resume {tmp_path / 'r'}" in err
    assert _status(SweepRun(None, tmp_path / "r")) == "done"  # a sweep never resumes it into a loop by itself
    assert main(["run", "--resume", str(tmp_path / "r"), "--quiet"]) == 0  # on from step 9, past the fault
    assert json.loads((tmp_path / "r" / SUMMARY).read_text())["status"] == "completed"
    assert main(["run", "--resume", str(tmp_path / "r"), "--quiet"]) == 2
    assert "already finished" in capsys.readouterr().err
