"""A run directory: its file names, who may train in it, atomic writes, and the checks before training.

One run lives in one directory::

    config.toml      the resolved configuration (every algorithm hyperparameter with its value)
    metrics.jsonl    one JSON object per evaluation (keys: see crossgrad.run.evaluate.METRIC_KEYS)
    summary.json     headline numbers, written when the run ends ("completed" or "diverged")
    status.json      where an unfinished run stands (see `status_record`); removed when the run completes
    checkpoint.pt    the latest checkpoint
    .lock            held (flock) by the one process training here
"""
from __future__ import annotations

import json
import math
import os
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crossgrad.algorithms import ConfigError
from crossgrad.files import append_text, atomic_write_text, make_dir, open_nofollow
from crossgrad.run.config import Config, config_from_dict, dump_toml, read_toml, saved_config_data

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
STATUS = "status.json"
CONFIG = "config.toml"
LOCK = ".lock"


class RunError(ConfigError):
    """A problem with a run directory (nothing to resume, a run already there, ...)."""


class RunBusyError(RunError):
    """Another live process is training in this run directory."""

    exit_code = 75  # EX_TEMPFAIL: try again later; sweeps treat it as "running elsewhere"


# ------------------------------------------------------------------------------ writes (never through a link)
def jsonable(v: Any) -> Any:
    """`v` with every non-finite float as None (JSON has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def write_metrics(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(jsonable(r)) + "\n" for r in records))


def append_metrics(path: Path, record: dict) -> None:
    append_text(path, json.dumps(jsonable(record)) + "\n")


def one_line(text: Any, limit: int) -> str:
    """An exception's text as one line of at most `limit` characters (for one-line CLI errors)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ------------------------------------------------------------------------------ configuration
#: config keys that may differ between a checkpoint and its resumption (where and how fast, not what)
#: (the backend too: agent state is per agent, so a checkpoint resumes on any number of processes)
RESUMABLE_KEYS = {"output", "backend", "training.device", "training.threads", "training.eval_batch_size",
                  "training.comm_timeout", "training.control_timeout", "training.startup_timeout",
                  "training.eval_at_start", "training.log_every"}


def comparable_config(d: Any) -> dict[str, Any] | None:
    """A config's plain data flattened to "section.key" entries, without the keys a resumption may change.

    Unset (None) entries are left out: a key added since a run was written is unset by default, so
    the run's saved config, which lacks it, still compares equal (and its checkpoint still resumes).
    """
    if not isinstance(d, dict):
        return None
    flat = {}
    for k, v in d.items():
        for kk, vv in (v.items() if isinstance(v, dict) and k != "backend" else [(None, v)]):
            key = k if kk is None else f"{k}.{kk}"
            if k not in RESUMABLE_KEYS and key not in RESUMABLE_KEYS and vv is not None:
                flat[key] = vv
    return flat


def load_run_config(run_dir: str | Path) -> Config:
    p = Path(run_dir) / CONFIG
    if not p.is_file():
        raise RunError(f"{run_dir} is not a run directory (no {CONFIG})")
    return config_from_dict(saved_config_data(read_toml(p)), str(p)).validate()


def finished_status(run_dir: Path) -> str | None:
    """The status in the run's summary ("completed", "diverged", ...; "unknown" if unreadable), None if none."""
    try:
        status = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8")).get("status")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return status if isinstance(status, str) else "unknown"


def check_resumable(run_dir: Path) -> None:
    """A finished run or one without a checkpoint cannot be resumed (checked again under the lock).

    A diverged run can: its checkpoint is the last finite state (nothing non-finite is ever saved).
    """
    status = finished_status(run_dir)
    if status not in (None, "diverged"):
        raise RunError(f"{run_dir} is already finished ({SUMMARY} says {status}); nothing to resume")
    if not (run_dir / CHECKPOINT).is_file():
        raise RunError(f"nothing to resume in {run_dir} (no {CHECKPOINT}"
                       + ("; it diverged before its first checkpoint)" if status else ")"))


def holds_unfinished_run(run_dir: Path) -> bool:
    """A run with a checkpoint and no verdict yet: what output.resume = "auto" (and a torchrun restart) continues."""
    return finished_status(run_dir) is None and (run_dir / CHECKPOINT).is_file()


def open_run_dir(run_dir: Path, cfg: Config, *, resume: bool, overwrite: bool) -> None:
    """Check that `run_dir` may be trained in (the caller holds its lock); a new run also writes its config."""
    if resume:
        check_resumable(run_dir)
        (run_dir / SUMMARY).unlink(missing_ok=True)  # a diverged run's verdict no longer holds
        return
    if (run_dir / SUMMARY).exists() and not overwrite:
        raise RunError(f"{run_dir} already holds a finished run; name this one with --name NEW (output.name), "
                       "or replace that one with --overwrite")
    if (run_dir / CHECKPOINT).exists() and not overwrite:
        raise RunError(f"{run_dir} holds an unfinished run; continue it with: crossgrad run --resume {run_dir}")
    for stale in (SUMMARY, CHECKPOINT, METRICS, STATUS):
        (run_dir / stale).unlink(missing_ok=True)
    atomic_write_text(run_dir / CONFIG, dump_toml(cfg.to_dict()))


# ------------------------------------------------------------------------------ status.json
def continue_command(run_dir: Path, processes: int | None = None) -> str:
    """The exact command that continues the run in `run_dir`: the simulator's, or (`processes` set: this
    node's number of torchrun workers) torchrun's on as many processes as now."""
    where = shlex.quote(str(Path(run_dir).absolute()))
    if processes is None:
        return f"crossgrad run --resume {where}"
    nodes = max(int(os.environ.get("WORLD_SIZE", processes)) // processes, 1)
    launch = ("torchrun --standalone" if nodes == 1 else  # several nodes: launched on each, one rendezvous
              f"torchrun --nnodes {nodes} --rdzv-backend c10d --rdzv-endpoint "
              f"{os.environ.get('MASTER_ADDR', 'HOST')}:{os.environ.get('MASTER_PORT', 'PORT')}")
    return f"{launch} --nproc-per-node {processes} -m crossgrad run --resume {where}"


def status_record(status: str, *, step: int, total_steps: int, checkpoint_step: int | None, reason: str,
                  message: str, command: str | None) -> dict[str, Any]:
    """status.json's content: why the run is not complete, at which step, which checkpoint holds it, and the
    command that continues it (None when no checkpoint had been written: then the run starts again).

    `status`: "running" while it trains (a "running" record that no live process holds was killed without
    a word, e.g. by SIGKILL), else the trainer's status of a stop that is not a completion: "stopped",
    "interrupted", "terminated" or "failed".
    """
    return {
        "status": status,
        "reason": reason,
        "step": step,
        "total_steps": total_steps,
        "checkpoint": None if checkpoint_step is None else CHECKPOINT,
        "checkpoint_step": checkpoint_step,
        "continue": command if checkpoint_step is not None else None,
        "message": message,
        "pid": os.getpid(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_status(run_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / STATUS, json.dumps(jsonable(record), indent=2) + "\n")


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The run's status.json (None without one; {"status": "unknown"} when it cannot be read)."""
    try:
        record = json.loads((Path(run_dir) / STATUS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"status": "unknown"}
    return record if isinstance(record, dict) else {"status": "unknown"}


def clear_status(run_dir: Path) -> None:
    (Path(run_dir) / STATUS).unlink(missing_ok=True)


# ------------------------------------------------------------------------------ claiming
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(run_dir: Path) -> int | None:
    """The live process that holds `run_dir` (its pid, or -1 if not known yet), or None."""
    import fcntl

    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:  # a shared probe: it succeeds only if nobody holds the exclusive lock
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            pass  # held
        else:
            return None
        try:
            pid = int(os.read(fd, 32).decode().strip() or -1)
        except ValueError:
            pid = -1
        return pid if pid == -1 or pid_alive(pid) else -1
    finally:
        os.close(fd)  # also drops the probe


@contextmanager
def claim_run_dir(run_dir: Path) -> Iterator[None]:
    """Only one process trains in a run directory at a time; a dead process's lock is taken over.

    The lock is an exclusive `flock` on `.lock` (which also records the holder's pid for messages
    and `lock_holder`). The kernel drops it when its process dies, even by SIGKILL, so there is no
    stale-lock guesswork and no window in which two processes both believe they hold the directory:
    two sweeps sharing an output folder never write the same run's files at once; the second one
    is told the run is busy.
    """
    import fcntl

    make_dir(run_dir)
    path = run_dir / LOCK
    waits = [0.01, 0.05, 0.2]  # a `lock_holder` probe holds the lock for a moment: look again
    for _ in range(100):
        fd = open_nofollow(path, os.O_CREAT | os.O_RDWR)  # a planted link is refused, never truncated
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            if waits:
                time.sleep(waits.pop(0))
                continue
            holder = lock_holder(run_dir)
            who = f"process {holder}" if holder is not None and holder > 0 else "another process"
            raise RunBusyError(f"{run_dir} is in use by {who}; wait for it to finish or stop it") from None
        try:  # the previous holder may have removed the file between our open and flock: open it again
            if os.fstat(fd).st_ino == os.lstat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    else:
        raise RunError(f"cannot lock {run_dir}")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        for tmp in run_dir.glob(".*.tmp*"):  # half-written files of a process killed while saving
            # (files.atomic_write names them .NAME.tmpPID.HEX; a live process's, e.g. a sweep writing its
            # config copy for this run, is still being written)
            pid = tmp.name.rpartition(".tmp")[2].partition(".")[0]
            if not (pid.isdigit() and pid_alive(int(pid))):
                tmp.unlink(missing_ok=True)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding the lock (see the inode check above)
        os.close(fd)
