"""Where a run's agents live: all in this process (`LocalCluster`) or in blocks over torch.distributed
ranks (`DistCluster`).

The trainer talks only to this interface and never asks which backend it runs on:

- `local`, `main`: the agents of this process, and whether it is the one that writes files;
- `build_engine(prepared)`: the engine of the local agents on the backend's `Comm`;
- `gather(tensor)`: the processes' tensors concatenated (dim 0) on the main process, None elsewhere;
- `share(obj)`: every process's small object, on every process (the cheap agreement on flags);
- `barrier()`: wait for every process (after evaluation and checkpoints, bounded by the generous
  control time-out, so that the main process's work never counts against the neighbours'
  communication time-out);
- `gather_parts` / `scatter_parts`: checkpoint parts to and from the main process;
- `broadcast_error(err)`: the main process's set-up error (or None) raised on every process;
- `interrupt(run_dir)`: a context that turns Ctrl-C (and the simulator's SIGTERM) into a flag the trainer
  agrees on between steps;
- `continue_command(run_dir)`: the exact command that continues the run after a stop (for status.json);
- `failures`: the exceptions that mean a peer died or hung (the run fails, the checkpoint is kept);
- `restarts`: how many times the launcher restarted the worker group (torchrun's elastic restarts); a
  restarted group continues its run from the last checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossgrad.algorithms import ConfigError
from crossgrad.devices import resolve_device
from crossgrad.run.config import Config
from crossgrad.run.data import Prepared
from crossgrad.run.rundir import continue_command


class StartupFailure(ConfigError):
    """The processes of a dist run could not form their group: one line, exit 1 (the run failed, retry it)."""

    exit_code = 1


def elastic_restarts() -> int:
    """How many times torchrun has restarted this worker group (0 on its first start, and without torchrun)."""
    try:
        return max(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), 0)
    except ValueError:
        return 0


class Interrupt:
    """Turns Ctrl-C (SIGINT), and in a single process SIGTERM, into a flag checked between steps.

    `hit`: the name of the first such signal ("SIGINT", "SIGTERM"), None before one came.
    `abort_on_second`: a second one raises KeyboardInterrupt at once (a single process); under
    torchrun the launcher forwards the signal again, so a second one only keeps the flag set.
    `on_sigterm` (torchrun): SIGTERM is not a flag but the end of this process, which prints that line,
    calls `before_death` (the trainer's: rank 0 records the stop in the run directory), then dies of the
    signal as before. It cannot stop in order: torchrun sends it when a peer failed, so the collective
    that a checkpoint takes would wait for a dead process, and torchrun sends SIGKILL 30 s later.
    """

    def __init__(self, abort_on_second: bool, on_sigterm: str | None = None) -> None:
        self.hit: str | None = None
        self.abort_on_second = abort_on_second
        self.on_sigterm = on_sigterm
        self.before_death: Any = None
        self._old: Any = None
        self._old_term: Any = None

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
            self._old_term = signal.signal(signal.SIGTERM,
                                           self._handle if self.on_sigterm is None else self._terminated)
        return self

    def _terminated(self, signum: int, frame: Any) -> None:
        """Say why this process stops, have the stop recorded, then die of the signal (the launcher sees the
        same exit)."""
        print(self.on_sigterm, file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while recording ends it at once
        try:
            if self.before_death is not None:
                self.before_death()
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.hit and self.abort_on_second:
            raise KeyboardInterrupt
        self.hit = self.hit or signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)


class LocalCluster:
    """Every agent in this process, on the in-process `LocalComm`; every collective is the identity."""

    n_processes = 1
    sync_every = 1  # agreeing costs nothing here: a divergence stops the run at the failing step
    failures: tuple[type[BaseException], ...] = ()
    restarts = 0

    def __init__(self, cfg: Config):
        self.n = cfg.topology.n_agents
        self.local = list(range(self.n))
        self.main = True
        self.device = resolve_device(cfg.training.device)

    def build_engine(self, p: Prepared) -> Any:
        from crossgrad.comm.local import LocalComm
        from crossgrad.engine import Engine
        from crossgrad.wiring import comm_for

        comm = comm_for(p.topology, lambda edges: LocalComm(edges, p.topology.n, device=p.device))
        return Engine(p.model, p.topology, p.algorithm, comm, torch.nn.functional.cross_entropy,
                      device=p.device, on_nonfinite="record", network=p.network)

    def gather(self, t: Tensor) -> Tensor:
        return t

    def share(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        """Nothing to wait for."""

    def gather_parts(self, part: dict[str, Any]) -> list[dict[str, Any]]:
        return [part]

    def scatter_parts(self, parts: list[dict[str, Any]] | None) -> dict[str, Any]:
        assert parts is not None
        return parts[0]

    def broadcast_error(self, error: BaseException | None) -> None:
        if error is not None:
            raise error

    def interrupt(self, run_dir: Path) -> Interrupt:
        return Interrupt(abort_on_second=True)

    def continue_command(self, run_dir: Path) -> str:
        return continue_command(run_dir)


class DistCluster:
    """A contiguous block of agents per torch.distributed rank (`agent_blocks`), launched by torchrun.

    Any number of processes from 1 to n_agents; with n_agents processes, rank r = agent r.

    Training exchanges messages between ranks of neighbouring agents only (`DistComm`, bounded by
    training.comm_timeout); everything here is a collective outside the steps, bounded by
    training.control_timeout.
    """

    sync_every = 10  # steps between two agreements on the flags (plus one at every evaluation and checkpoint)

    def __init__(self, cfg: Config):
        import torch.distributed as dist

        from crossgrad.comm.base import agent_blocks
        from crossgrad.comm.dist import CommTimeoutError
        from crossgrad.distributed import StartupError, init_from_env

        n = cfg.topology.n_agents
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                f"backend 'dist' runs the {n} agents in blocks over P processes (1 <= P <= {n}): launch it with "
                "torchrun --nproc-per-node P -m crossgrad run ... (see docs/distributed.md)"
            )
        world = int(os.environ["WORLD_SIZE"])
        if world > n:
            raise ConfigError(
                f"backend 'dist' needs at least one agent per process: {world} processes were launched for "
                f"{n} agents (torchrun --nproc-per-node / --nnodes)"
            )
        wanted = resolve_device(cfg.training.device)  # the simulator's check: no silent fall-back to the CPU
        self.cfg = cfg
        try:
            self.device = init_from_env("nccl" if wanted.type == "cuda" else "gloo",
                                        timeout=cfg.training.control_timeout,
                                        startup_timeout=cfg.training.startup_timeout)
        except StartupError as e:
            raise StartupFailure(str(e)) from None
        self.restarts = elastic_restarts()
        self.n, self.n_processes = n, world
        self.rank = dist.get_rank()
        self.local = list(agent_blocks(n, world)[self.rank])
        self.main = self.rank == 0
        self.failures = (CommTimeoutError,)
        self._dist = dist

    def build_engine(self, p: Prepared) -> Any:
        from crossgrad.distributed import make_engine

        return make_engine(p.model, p.topology, p.algorithm, timeout=self.cfg.training.comm_timeout,
                           device=p.device, on_nonfinite="record", network=p.network)

    def gather(self, t: Tensor) -> Tensor | None:
        from crossgrad.distributed import gather_rows

        return gather_rows(t)

    def share(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.n_processes
        self._dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self._dist.barrier()

    def gather_parts(self, part: dict[str, Any]) -> list[dict[str, Any]] | None:
        from crossgrad.run.checkpoint import to_cpu

        everyone = [None] * self.n_processes if self.main else None
        self._dist.gather_object(to_cpu(part), everyone, dst=0)
        return everyone

    def scatter_parts(self, parts: list[dict[str, Any]] | None) -> dict[str, Any]:
        got: list[Any] = [None]
        self._dist.scatter_object_list(got, parts if self.main else None, src=0)
        return got[0]

    def broadcast_error(self, error: BaseException | None) -> None:
        box = [error]
        self._dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise box[0]

    def interrupt(self, run_dir: Path) -> Interrupt:
        from crossgrad.comm.base import agent_blocks
        from crossgrad.comm.dist import label

        spans = tuple((b.start, b.stop) for b in agent_blocks(self.n, self.n_processes))
        # torchrun stops the whole group with SIGTERM when one of its processes fails
        return Interrupt(abort_on_second=False, on_sigterm=(
            f"crossgrad: {label(self.rank, spans)}: stopped by SIGTERM from the launcher (torchrun stops the group "
            "when one of its processes fails; with --max-restarts it starts the group again, which continues from "
            f"the last checkpoint; otherwise continue with {self.continue_command(run_dir)})"))

    def continue_command(self, run_dir: Path) -> str:
        return continue_command(run_dir, int(os.environ.get("LOCAL_WORLD_SIZE", self.n_processes)))


@contextlib.contextmanager
def open_cluster(cfg: Config) -> Iterator[LocalCluster | DistCluster]:
    """The cluster of `cfg.backend` ("sim": this process; "dist": this torchrun rank's block), torn down at exit."""
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    if cfg.backend != "dist":
        yield LocalCluster(cfg)
        return
    from crossgrad.distributed import shutdown

    try:
        yield DistCluster(cfg)
    finally:
        shutdown()
