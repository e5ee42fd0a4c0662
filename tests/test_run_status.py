"""Issue 29.5: after a stop that was not a completion the run directory says so (status.json): why, at which
step, which checkpoint holds it and the exact command that continues it; continuing to the end removes it.

The torchrun case (a killed group leaves the record) is tests/test_elastic.py::test_a_killed_group_*.
"""
from __future__ import annotations

import json
import os
import shlex
import signal

import pytest
import torch

from crossgrad import report
from crossgrad.cli import main
from crossgrad.run.data import AgentBatches
from crossgrad.run.evaluate import TIMING_KEYS
from crossgrad.run.rundir import CHECKPOINT, METRICS, STATUS, SUMMARY

#: digits, 3 agents, 6 steps: a run of a second or two
TINY = ["model.name=mlp", "topology.n_agents=3", "training.batch_size=8", "training.threads=1", "training.steps=6"]


def run_args(tmp_path, name: str) -> list[str]:
    return ["run", "--quiet", *(a for t in TINY for a in ("--set", t)), "--out-dir", str(tmp_path), "--name", name]


def status(run_dir) -> dict:
    return json.loads((run_dir / STATUS).read_text())


def records(run_dir) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run_dir / METRICS).read_text().splitlines()]


def continue_run(record: dict) -> int:
    """Run the record's continue command as it is written (in this process)."""
    argv = shlex.split(record["continue"])
    assert argv[:3] == ["crossgrad", "run", "--resume"], argv
    return main([*argv[1:], "--quiet"])


def signal_at(monkeypatch, call: int, signum: int) -> None:
    """Send this process `signum` while the batches of step `call` are drawn (the step still completes)."""
    original, calls = AgentBatches.next, [0]

    def next_batches(self, *args):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signum)
        return original(self, *args)

    monkeypatch.setattr(AgentBatches, "next", next_batches)


def test_stop_after_leaves_the_record_and_continuing_removes_it(tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert main([*run_args(tmp_path, "r"), "--stop-after", "2"]) == 0
    record = status(run_dir)
    assert {k: record[k] for k in ("status", "reason", "step", "total_steps", "checkpoint", "checkpoint_step")} == {
        "status": "stopped", "reason": "--stop-after 2", "step": 2, "total_steps": 6, "checkpoint": CHECKPOINT,
        "checkpoint_step": 2}
    assert record["continue"] == f"crossgrad run --resume {run_dir}"
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["step"] == 2
    assert record["message"] in capsys.readouterr().err  # the file says what the command line said
    assert continue_run(record) == 0
    assert not (run_dir / STATUS).exists()
    assert json.loads((run_dir / SUMMARY).read_text())["status"] == "completed"


def test_sigterm_in_the_simulator_stops_in_order_and_the_run_continues_exactly(tmp_path, monkeypatch, capsys):
    assert main(run_args(tmp_path, "ref")) == 0
    signal_at(monkeypatch, 4, signal.SIGTERM)
    run_dir = tmp_path / "r"
    assert main(run_args(tmp_path, "r")) == 143
    err = capsys.readouterr().err
    assert f"crossgrad: terminated: stopped at step 4 of 6 (SIGTERM); the checkpoint of step 4 is kept; resume with: " \
           f"crossgrad run --resume {run_dir}" in err
    record = status(run_dir)
    assert (record["status"], record["reason"], record["step"], record["checkpoint_step"]) == \
        ("terminated", "SIGTERM", 4, 4)
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["step"] == 4
    monkeypatch.undo()
    assert continue_run(record) == 0
    assert records(run_dir) == records(tmp_path / "ref")
    assert not (run_dir / STATUS).exists()


def test_ctrl_c_is_recorded_and_a_run_killed_without_a_word_reads_as_killed(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "r"
    signal_at(monkeypatch, 3, signal.SIGINT)
    assert main(run_args(tmp_path, "r")) == 130
    record = status(run_dir)
    assert (record["status"], record["reason"], record["step"], record["checkpoint_step"]) == \
        ("interrupted", "Ctrl-C (SIGINT)", 3, 3)

    class Killed(BaseException):
        """Ends the process's run where nothing handles it, as SIGKILL would (the lock is dropped)."""

    original = AgentBatches.next
    monkeypatch.setattr(AgentBatches, "next", lambda self, *a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        continue_run(record)
    monkeypatch.setattr(AgentBatches, "next", original)
    record = status(run_dir)
    assert (record["status"], record["step"], record["checkpoint_step"]) == ("running", 3, 3)
    (run,) = report.collect([tmp_path])
    assert run["summary"]["status"] == "killed"
    assert report.runs.stop_note(run["summary"]) == (f"killed after its checkpoint of step 3; continue with: "
                                                     f"crossgrad run --resume {run_dir}")
    assert continue_run(record) == 0 and not (run_dir / STATUS).exists()


def test_ctrl_c_before_the_first_checkpoint_says_the_run_starts_again(tmp_path, monkeypatch):
    import crossgrad.run.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "evaluate", interrupted)  # Ctrl-C while the initial model is scored
    assert main(run_args(tmp_path, "r")) == 130
    record = status(tmp_path / "r")
    assert (record["status"], record["step"], record["checkpoint"], record["continue"]) == \
        ("interrupted", 0, None, None)
    assert "run the same command again" in record["message"]
    monkeypatch.undo()
    assert main(run_args(tmp_path, "r")) == 0 and not (tmp_path / "r" / STATUS).exists()  # as it says


def test_report_says_where_each_unfinished_run_stands(tmp_path, capsys):
    assert main([*run_args(tmp_path, "a"), "--stop-after", "2"]) == 0
    assert main(run_args(tmp_path, "b")) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (f"not averaged: {tmp_path / 'a'} (status: stopped; at step 2 of 6 (--stop-after 2); continue with: "
            f"crossgrad run --resume {tmp_path / 'a'})") in out
    assert "1 stopped" in out and f"not averaged: {tmp_path / 'b'}" not in out
    assert "continue with: crossgrad run --resume" in (tmp_path / "report.md").read_text()


def test_a_peer_failure_is_recorded_cause_first(tmp_path, monkeypatch):
    """What rank 0 records when a neighbour dies or hangs (here raised in the simulator, whose cluster
    otherwise has no such failure)."""
    from crossgrad.comm.dist import CommTimeoutError
    from crossgrad.run.cluster import LocalCluster

    run_dir = tmp_path / "r"
    assert main([*run_args(tmp_path, "r"), "--stop-after", "2"]) == 0
    spans = ((0, 1), (1, 2), (2, 3))
    error = CommTimeoutError(0, [2], "round 1 (models)", "agent 2 is silent: no answer within 10 s", spans)
    monkeypatch.setattr(LocalCluster, "failures", (CommTimeoutError,))
    monkeypatch.setattr(AgentBatches, "next", lambda self, *a: (_ for _ in ()).throw(error))
    assert continue_run(status(run_dir)) == 1
    record = status(run_dir)
    assert (record["status"], record["step"], record["checkpoint_step"]) == ("failed", 2, 2)
    assert record["reason"] == "cause: agent 2 is silent: no answer within 10 s"
    assert record["message"].startswith(record["reason"] + "; seen by agent 0 in round 1 (models)")
    assert record["continue"] == f"crossgrad run --resume {run_dir}"


def test_sigterm_stops_an_in_process_sweep_after_the_runs_checkpoint(tmp_path, monkeypatch, capsys):
    """The run stops in order (exit 143) and the sweep with it: before, the signal killed the process; a run
    that caught it and returned must not let the sweep go on to the next run."""
    f = tmp_path / "sw.toml"
    f.write_text(f'[model]\nname = "mlp"\n[topology]\nn_agents = 3\n[training]\nsteps = 6\nbatch_size = 8\n'
                 f'threads = 1\n[output]\nout_dir = "{tmp_path / "out"}"\n[sweep]\nalgorithms = ["ngc", "dsgd"]\n')
    signal_at(monkeypatch, 2, signal.SIGTERM)
    assert main(["sweep", str(f), "--quiet"]) == 143
    (first,) = [d for d in (tmp_path / "out").iterdir() if d.is_dir()]  # the second run never started
    assert status(first)["status"] == "terminated"
    monkeypatch.undo()
    assert main(["sweep", str(f), "--quiet"]) == 0  # the same command continues it, then runs the other
    assert sorted(json.loads((d / SUMMARY).read_text())["status"] for d in (tmp_path / "out").iterdir()) == \
        ["completed", "completed"]


def test_a_failed_rank_says_its_cause_before_it_returns_and_once(tmp_path, monkeypatch, capsys):
    """Each rank's cause line leaves before the process group is torn down (torchrun's SIGTERM, sent when the
    first rank exits, may end a rank there), so the trainer prints it, not the command line after it."""
    from crossgrad.comm.dist import CommTimeoutError
    from crossgrad.run import resume_experiment
    from crossgrad.run.cluster import LocalCluster

    assert main([*run_args(tmp_path, "r"), "--stop-after", "2"]) == 0
    error = CommTimeoutError(0, [1], "round 1 (models)", "agent 1 is silent: no answer within 10 s")
    monkeypatch.setattr(LocalCluster, "failures", (CommTimeoutError,))
    monkeypatch.setattr(AgentBatches, "next", lambda self, *a: (_ for _ in ()).throw(error))
    capsys.readouterr()
    assert resume_experiment(tmp_path / "r", quiet=True).status == "failed"
    assert capsys.readouterr().err.startswith("crossgrad: cause: agent 1 is silent: no answer within 10 s; ")
    assert main(["run", "--resume", str(tmp_path / "r"), "--quiet"]) == 1
    assert capsys.readouterr().err.count("crossgrad: cause: agent 1 is silent") == 1
