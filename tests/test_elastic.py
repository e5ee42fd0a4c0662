"""A killed worker costs one restart, not the job (issue 29).

- start-up never hangs or tracebacks: a port taken and a peer that never starts are one line each;
- `--resume-if-exists` continues an unfinished run (and starts a new one), records not doubled;
- a checkpoint re-cut for other numbers of processes and back resumes to the uninterrupted run, bit for
  bit, for every algorithm family; a simulator checkpoint continues under torchrun on 2 processes;
- a real `torchrun --max-restarts 1` run whose worker is SIGKILLed mid-run finishes by itself.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossgrad.cli import main
from crossgrad.run import load_config, resume_experiment, run_experiment
from crossgrad.run.checkpoint import pack, split, write_checkpoint
from crossgrad.run.data import prepare
from crossgrad.run.evaluate import TIMING_KEYS
from crossgrad.run.reblock import reblock

N = 4
#: 4 steps per epoch (250 samples per agent, batches of 64): checkpoints at steps 4 and 8
SETS = ["data.name=synthetic", f"topology.n_agents={N}", "topology.name=ring", "algorithm.name=compngc",
        "algorithm.lr=0.05", "algorithm.gamma=0.5", "training.batch_size=64", "training.epochs=2",
        "training.eval_every_steps=2", "training.threads=1", "training.device=cpu", "training.log_every=1"]


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def simulated(out: Path, sets: list[str], name: str = "ref", stop_after: int | None = None) -> Path:
    cfg = load_config(None, [*sets, f'output.out_dir="{out}"', f"output.name={name}"])
    result = run_experiment(cfg, quiet=True, stop_after=stop_after)
    assert result.status == ("completed" if stop_after is None else "stopped"), result.message
    return out / name


def step_rows(run_dir: Path) -> list[list[str]]:
    """steps.csv without its header and the wall time."""
    return [row.split(",")[:-1] for row in (run_dir / "steps.csv").read_text().splitlines()[1:]]


# ------------------------------------------------------------------------------ start-up
@pytest.fixture
def rank0_of_two(monkeypatch):
    """This process as rank 0 of 2, launched by hand (it hosts the store), on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    return port


def start(tmp_path, capsys) -> tuple[int, str]:
    rc = main(["run", "--quiet", "--backend", "dist", "--out-dir", str(tmp_path), *(f"--set={s}" for s in SETS),
               "--set", "training.startup_timeout=1"])
    return rc, capsys.readouterr().err


def test_startup_on_a_taken_port_is_one_line(tmp_path, capsys, rank0_of_two):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", rank0_of_two))
        taken.listen()
        rc, err = start(tmp_path, capsys)
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"crossgrad: error: start-up failed: port 127.0.0.1:{rank0_of_two} is taken")
    assert "--master-port" in err


def test_startup_with_a_peer_that_never_starts_is_bounded_and_one_line(tmp_path, capsys, rank0_of_two):
    rc, err = start(tmp_path, capsys)
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("crossgrad: error: start-up failed: not all 2 processes arrived within 1 s")
    assert "training.startup_timeout" in err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ --resume-if-exists
def test_resume_if_exists_continues_an_unfinished_run_and_starts_a_new_one(tmp_path, capsys):
    ref = simulated(tmp_path, SETS)
    args = ["run", "--quiet", "--out-dir", str(tmp_path), "--name", "r", *(f"--set={s}" for s in SETS)]
    assert main([*args, "--resume-if-exists", "--stop-after", "6"]) == 0  # nothing there: it starts
    assert main(args) == 2 and "holds an unfinished run" in capsys.readouterr().err  # the default refuses
    assert main([*args, "--resume-if-exists"]) == 0
    assert "continuing the unfinished run from its checkpoint at step 6" not in capsys.readouterr().err  # --quiet
    assert records(tmp_path / "r") == records(ref)  # the records after the checkpoint are not doubled
    assert step_rows(tmp_path / "r") == step_rows(ref)
    assert [row[0] for row in step_rows(ref)] == [str(s) for s in range(1, 9)]
    assert main([*args, "--resume-if-exists"]) == 2 and "already holds a finished run" in capsys.readouterr().err
    assert main([*args, "--resume-if-exists", "--overwrite"]) == 2


# ------------------------------------------------------------------------------ another number of processes
FAMILIES = [
    ["algorithm.name=dsgd", "algorithm.qgm=true"],
    ["algorithm.name=compngc", "algorithm.compress_self=true"],
    ["algorithm.name=compcga"],
    ["algorithm.name=gt"],
    ["algorithm.name=d2", "topology.name=full"],
    ["algorithm.name=choco", 'algorithm.codec="random-k"'],
    ["algorithm.name=sgp", "topology.name=directed_ring", 'topology.weights="out_uniform"'],
]


@pytest.mark.parametrize("family", FAMILIES, ids=[f[0].split("=")[1] for f in FAMILIES])
def test_a_checkpoint_recut_for_other_process_counts_and_back_resumes_exactly(tmp_path, family):
    """5 agents: the simulator's checkpoint at step 2 cut in blocks for 3, then 2 processes, then joined again,
    continues to the uninterrupted run's records and parameters bit for bit (every rule of reblock.RULES is
    met by one of the families)."""
    sets = [*SETS, "topology.n_agents=5", "training.epochs=1", "training.eval_every_steps=4",
            "training.eval_at_start=false", *family]
    ref = simulated(tmp_path, sets)
    run = simulated(tmp_path, sets, "r", stop_after=2)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    prepared = prepare(load_config(None, sets).validate(), torch.device("cpu"), quiet=True)
    e, margin = prepared.topology.edges, float(getattr(prepared.algorithm, "margin", 0.0))
    three = reblock(split(state), 5, e, 3, margin)
    assert [len(p["streams"]) for p in three] == [2, 2, 1]
    back = reblock(reblock(three, 5, e, 2, margin), 5, e, 1, margin)
    common = {k: v for k, v in state.items() if k not in back[0]}
    write_checkpoint(run / "checkpoint.pt", pack({**common, "version": state["version"]}, back))
    assert resume_experiment(run, quiet=True).status == "completed"
    assert records(run) == records(ref)
    final = torch.load(run / "checkpoint.pt", weights_only=True)["sim"]["x"]
    assert torch.equal(final, torch.load(ref / "checkpoint.pt", weights_only=True)["sim"]["x"])


def test_a_recut_of_state_that_differs_between_processes_is_refused():
    from crossgrad.run.rundir import RunError

    parts = [{"sim": {"lr": 0.1}}, {"sim": {"lr": 0.2}}]
    with pytest.raises(RunError, match="sim.lr differs between its 2 processes; resume on 2"):
        reblock(parts, 4, [], 1)


# ------------------------------------------------------------------------------ torchrun
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

KILL = """
import os, signal, sys
from crossgrad.cli import main
from crossgrad.run.data import AgentBatches

original, calls = AgentBatches.next, [0]

def killed(self):
    calls[0] += 1
    if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and calls[0] == 6:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 of one worker, after the checkpoint of step 4
    return original(self)

AgentBatches.next = killed
raise SystemExit(main(sys.argv[1:]))
"""


def torchrun(cwd: Path, *args: str, restarts: int = 0, processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           f"--max-restarts={restarts}", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=240)


def same(a: list[dict], b: list[dict]) -> None:
    """The records of two runs equal value for value: float32 runs are bit-identical on any number of processes."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key, value in x.items():
            assert y[key] == value, (x["step"], key, value, y[key])


@pytest.mark.timeout(300)
def test_torchrun_restart_after_a_worker_is_killed_continues_the_run(tmp_path):
    """torchrun --max-restarts 1: rank 1 dies by SIGKILL at step 6; torchrun restarts the group, which continues
    from the checkpoint of step 4 with the same command line and ends with the simulator's records."""
    ref = simulated(tmp_path / "sim", SETS)
    script = tmp_path / "killed_run.py"
    script.write_text(KILL)
    proc = torchrun(tmp_path, str(script), "run", "--quiet", *(f"--set={s}" for s in SETS), "--backend", "dist",
                    "--out-dir", "out", "--name", "r", restarts=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the survivor said why it stopped: the launcher's SIGTERM, or its dead neighbour if it noticed first
    assert "crossgrad: rank 0 (agents 0-1): stopped by SIGTERM" in proc.stderr or "crossgrad: cause:" in proc.stderr
    run_dir = tmp_path / "out" / "r"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    same(records(ref), records(run_dir))  # every record once: those after the checkpoint were redone
    # dist logs at its sync points, here the evaluations: each row is every agent's mean loss since the last
    rows, evaluated = step_rows(run_dir), {r["step"]: r["train_loss"] for r in records(ref)}
    assert [int(r[0]) for r in rows] == [2, 4, 6, 8]
    assert [float(r[3]) for r in rows] == pytest.approx([evaluated[int(r[0])] for r in rows], rel=1e-5)


@pytest.mark.timeout(300)
def test_a_killed_group_leaves_the_record_and_every_survivor_says_why(tmp_path):
    """Issue 29.5, torchrun without restarts, 3 processes: rank 1 dies by SIGKILL at step 6 and torchrun stops
    the group. Each surviving rank says why it stops (its dead neighbour, or torchrun's SIGTERM) before it
    goes; rank 0 leaves status.json: unfinished, at which step, the checkpoint of step 4, the command that
    continues it. Continued in the simulator, the run ends with the simulator's records."""
    ref = simulated(tmp_path / "sim", SETS)
    script = tmp_path / "killed_run.py"
    script.write_text(KILL)
    proc = torchrun(tmp_path, str(script), "run", "--quiet", *(f"--set={s}" for s in SETS), "--backend", "dist",
                    "--out-dir", "out", "--name", "r", processes=3)
    assert proc.returncode != 0, proc.stderr[-4000:]
    for rank in (0, 2):  # rank 0 holds agents 0-1, rank 2 agent 3: both neighbours of rank 1's agent 2
        said = (f"crossgrad: rank {rank} (agent", f"seen by rank {rank} (agent")
        assert any(s in proc.stderr for s in said), (rank, proc.stderr[-4000:])
    run_dir = tmp_path / "out" / "r"
    record = json.loads((run_dir / "status.json").read_text())
    assert record["status"] in ("terminated", "failed"), record
    assert record["checkpoint_step"] == 4 and 4 <= record["step"] <= 6, record
    assert record["continue"] == f"torchrun --standalone --nproc-per-node 3 -m crossgrad run --resume {run_dir}"
    assert not (run_dir / "summary.json").exists()
    assert resume_experiment(run_dir, quiet=True, backend="sim").status == "completed"
    same(records(ref), records(run_dir))
    assert not (run_dir / "status.json").exists()


@pytest.mark.slow
def test_a_simulator_checkpoint_continues_on_two_processes_and_back(tmp_path):
    """The simulator stops at step 3; torchrun continues on 2 processes to step 6; the simulator finishes."""
    ref = simulated(tmp_path / "sim", SETS)
    run = simulated(tmp_path, SETS, "r", stop_after=3)
    proc = torchrun(tmp_path, "-m", "crossgrad", "run", "--quiet", "--resume", str(run), "--backend", "dist",
                    "--stop-after", "6")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert len(torch.load(run / "checkpoint.pt", weights_only=True)["ranks"]) == 2
    assert resume_experiment(run, quiet=True, backend="sim").status == "completed"
    same(records(ref), records(run))
    assert torch.equal(torch.load(run / "checkpoint.pt", weights_only=True)["sim"]["x"],
                       torch.load(ref / "checkpoint.pt", weights_only=True)["sim"]["x"])


def test_a_failed_run_says_the_cause_first_then_who_saw_it_and_how_to_go_on(tmp_path):
    from crossgrad.comm.dist import CommTimeoutError
    from crossgrad.run.trainer import _failure_message

    spans = ((0, 2), (2, 4), (4, 6))
    error = CommTimeoutError(0, [2], "round 1 (models)", "rank 2 (agents 4-5) is silent: no answer within 10 s", spans)
    command = f"torchrun --standalone --nproc-per-node 3 -m crossgrad run --resume {tmp_path}"
    message = _failure_message(error, 4, command)
    assert message.startswith("cause: rank 2 (agents 4-5) is silent: no answer within 10 s; seen by rank 0 "
                              "(agents 0-1) in round 1 (models); the checkpoint of step 4 is kept")
    assert message.endswith(f"continue with: {command}")
    assert "no checkpoint had been written yet" in _failure_message(error, None, command)
