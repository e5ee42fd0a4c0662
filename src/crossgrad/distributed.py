"""Running the engine on torch.distributed (gloo on CPU, NCCL on GPU), a block of agents per process.

See docs/distributed.md for a complete script and the torchrun command lines.

Training uses only point-to-point messages between ranks whose agents are neighbours, one per peer
rank and round (`DistComm`). The collectives here (`make_engine`'s start-up check, `gather_rows`,
`gather_state`) run outside training steps: the first once at start-up, the others for evaluation
only (the consensus model and the local models' accuracies are computed on rank 0).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from crossgrad.algorithms import Algorithm
from crossgrad.comm.dist import CommTimeoutError, DistComm, label
from crossgrad.comm.network import NetworkModel
from crossgrad.engine import Engine
from crossgrad.evaluators import LossFn
from crossgrad.topology import TimeVaryingTopology, Topology
from crossgrad.wiring import comm_for

__all__ = ["CommTimeoutError", "DistComm", "StartupError", "gather_rows", "gather_state", "init_from_env",
           "is_main", "make_engine", "shutdown"]


class StartupError(RuntimeError):
    """The processes could not form their group (rendezvous, store or connections); the text is one line
    that leads with the cause and says what to do."""


def init_from_env(backend: str | None = None, timeout: float = 60.0,
                  startup_timeout: float | None = None) -> torch.device:
    """Initialise the default process group from torchrun's environment; returns this rank's device.

    Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK for the GPU). The backend is
    NCCL when CUDA is available (one GPU per local rank), gloo otherwise; `backend="gloo"` forces
    the CPU. `startup_timeout` (seconds, default `timeout`) bounds forming the group: the store and
    the connections between the ranks; a failure there raises `StartupError`. `timeout` then bounds
    the collectives: the control points of a run (evaluation, checkpoints), not its training rounds,
    which `DistComm` bounds itself.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: launch with torchrun (see docs/distributed.md)")
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', not {backend!r}")
    cuda = torch.cuda.is_available() and backend != "gloo"
    if backend == "nccl" and not cuda:
        raise RuntimeError("backend 'nccl' needs CUDA, and none is available; use 'gloo'")
    backend = backend or ("nccl" if cuda else "gloo")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # torch sets a group's time-out once, at creation; `_set_pg_timeout` (torch >= 2.2) changes it after
        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        limit = timeout if startup_timeout is None or set_timeout is None else startup_timeout
        try:
            _init_group(backend, timedelta(seconds=limit), device if cuda else None)
        except (RuntimeError, OSError) as e:  # torch's DistError family are RuntimeErrors
            raise StartupError(_startup_failure(e, limit)) from None
        if limit != timeout:  # the group's collectives get the control time-out, not the start-up one
            set_timeout(timedelta(seconds=timeout))
    return device


def _init_group(backend: str, timeout: timedelta, device: torch.device | None) -> None:
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend, timeout=timeout, device_id=device)
        return
    # torchrun keeps its store when it restarts the worker group: the dead group's keys (its ranks' gloo
    # addresses among them) are still there, and a new rank that reads them connects to a dead peer
    # ("connectFullMesh failed ... Connection refused") or waits on it. Each attempt gets its own keys.
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(backend, store=dist.PrefixStore(f"crossgrad/attempt_{attempt}/", store), rank=rank,
                            world_size=world, timeout=timeout, device_id=device)


def _startup_failure(e: BaseException, limit: float) -> str:
    """What went wrong while the group formed, cause first, then what to do."""
    detail = " ".join(str(e).split())[:300] or type(e).__name__
    low = detail.lower()
    rank, world = os.environ["RANK"], os.environ["WORLD_SIZE"]
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if "address already in use" in low or "eaddrinuse" in low:
        cause = f"port {where} is taken by another program"
        advice = "pick a free port (torchrun --master-port or --rdzv-endpoint), or let --standalone choose one"
    elif "timed out" in low or "timeout" in low:
        cause = f"not all {world} processes arrived within {limit:g} s"
        advice = (f"check that every process (every node's torchrun) was started and can reach {where}, "
                  "or raise training.startup_timeout")
    elif "refused" in low or "connect" in low or "reset by peer" in low:
        cause = f"a peer was not there ({where} or another rank refused the connection)"
        advice = ("the other processes exited or were never started: start them all (with torchrun, all nodes "
                  "use the same --rdzv-endpoint)")
    else:
        cause = "the process group could not be formed"
        advice = "check the launch (docs/distributed.md)"
    return f"start-up failed: {cause} (rank {rank} of {world}: {detail}); {advice}"


def is_main() -> bool:
    """True on rank 0 (or without a process group): the rank that evaluates and writes results."""
    return not dist.is_initialized() or dist.get_rank() == 0


def shutdown() -> None:
    """Destroy the process group if there is one (call at the end of a script)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def make_engine(model: nn.Module, topology: Topology | TimeVaryingTopology, algorithm: Algorithm,
                loss_fn: LossFn = nn.functional.cross_entropy, timeout: float = 60.0,
                device: torch.device | str | None = None, evaluator: str = "auto",
                check_init: bool = True, on_nonfinite: str = "raise", network: NetworkModel | None = None,
                sizes: Sequence[int] | None = None) -> Engine:
    """The same engine as the simulator's, holding this rank's block of agents, on a `DistComm`.

    n agents over W ranks: rank r holds the agents `engine.plan.local` (`agent_blocks(n, W, sizes)[r]`;
    rank r = agent r when n == W; `sizes`, every rank's number of agents, by default as even as they
    come). Call it on every rank with the same model weights (seed before building the model),
    topology and algorithm; `engine.step(batches)` then takes one minibatch per local agent.
    `timeout` (seconds) bounds each communication round: a dead or hung neighbour raises
    `CommTimeoutError`.
    `on_nonfinite="record"` keeps a rank communicating after a NaN/Inf (see `Engine`), so that the
    ranks can agree on the divergence instead of seeing a silent peer.
    `check_init` compares a fingerprint of the initial weights across ranks once (a collective)
    and raises ValueError on every rank if they differ.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    comm = comm_for(topology, lambda edges: DistComm(edges, topology.n, timeout=timeout, device=device,
                                                              sizes=sizes))
    engine = Engine(model, topology, algorithm, comm, loss_fn, device=device, evaluator=evaluator,
                    on_nonfinite=on_nonfinite, network=network)
    if check_init:
        _check_same_init(engine.x[0], engine.comm.spans)  # the local rows start equal: one per rank says it all
    return engine


def _check_same_init(row: Tensor, spans: tuple[tuple[int, int], ...]) -> None:
    weights = torch.linspace(1.0, 2.0, row.numel(), dtype=torch.float64, device=row.device)
    mine = torch.stack([row.double().sum(), (row.double() * weights).sum()])
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    fingerprints = torch.stack(everyone).cpu()
    differ = [r for r in range(len(everyone)) if not torch.equal(fingerprints[r], fingerprints[0])]
    if differ:
        who = f"agents {differ}" if len(spans) == spans[-1][1] else ", ".join(label(r, spans) for r in differ)
        raise ValueError(f"{who} start from other weights than {label(0, spans)}: every rank must build the "
                         "same initial model (seed torch before building it)")


def gather_rows(rows: Tensor, dst: int = 0) -> Tensor | None:
    """Every rank's [k_r, ...] tensor concatenated along dim 0 on `dst` (rank order), None elsewhere.

    The ranks may hold different numbers of rows k_r (uneven blocks of agents); the other
    dimensions and the dtype must agree. A collective outside training (evaluation, statistics);
    all ranks must call it.
    """
    rows = rows.contiguous()
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(rows)], dtype=torch.long, device=rows.device))
    sizes = [int(c) for c in counts]
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))  # gather needs one shape on every rank
    padded[: len(rows)] = rows
    if dist.get_rank() == dst:
        out = [torch.empty_like(padded) for _ in range(world)]
        dist.gather(padded, out, dst=dst)
        return torch.cat([o[:k] for o, k in zip(out, sizes)])
    dist.gather(padded, None, dst=dst)
    return None


def gather_state(engine: Engine, dst: int = 0) -> dict[str, Tensor | list[Tensor]] | None:
    """Every agent's parameters, buffers and byte counters (all ranks' blocks), stacked on `dst` as in the simulator.

    Returns {"x": [n, P], "models": [n, P], "buffers": [[n, *shape] per buffer], "bytes_sent": [n, 2]}
    on `dst`, None elsewhere: x the engine's rows, models the agents' models (`Engine.models`: push-sum's
    de-biased x / w, else x itself); the consensus model is models.mean(0). A collective outside
    training; all ranks must call it.
    """
    x = gather_rows(engine.x, dst)
    own = engine.models()
    models = x if own is engine.x else gather_rows(own, dst)
    buffers = [gather_rows(b, dst) for b in engine.buffers]
    sent = gather_rows(engine.comm.bytes_sent.to(engine.x.device), dst)
    if x is None:
        return None
    return {"x": x, "models": models, "buffers": buffers, "bytes_sent": sent.cpu()}
