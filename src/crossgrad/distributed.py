"""Running the engine with one agent per process on torch.distributed (gloo on CPU, NCCL on GPU).

See docs/distributed.md for a complete script and the torchrun command lines.

Training uses only point-to-point messages along graph edges. `gather_rows` is a collective used
for evaluation only (the consensus model and local accuracies are computed on rank 0).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from crossgrad.algorithms import Algorithm
from crossgrad.comm.dist import CommTimeoutError, DistComm
from crossgrad.engine import Engine, LossFn
from crossgrad.topology import Topology

__all__ = ["CommTimeoutError", "DistComm", "gather_rows", "init_from_env", "make_engine"]


def init_from_env(backend: str | None = None, timeout: float = 60.0) -> torch.device:
    """Initialise the default process group from torchrun's environment; returns this rank's device.

    The backend is NCCL when CUDA is available (one GPU per local rank), gloo otherwise.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: launch with torchrun (see docs/distributed.md)")
    cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if cuda else "gloo")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return device


def make_engine(model: nn.Module, topology: Topology, algorithm: Algorithm,
                loss_fn: LossFn = nn.functional.cross_entropy, timeout: float = 60.0,
                device: torch.device | str | None = None) -> Engine:
    """The same engine as the simulator's, holding this rank's agent, on a `DistComm`."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    comm = DistComm(topology.edges, topology.n, timeout=timeout, device=device)
    return Engine(model, topology, algorithm, comm, loss_fn, device=device)


def gather_rows(row: Tensor, dst: int = 0) -> Tensor | None:
    """Evaluation only (a collective, not part of training): every rank's row, stacked on `dst`."""
    row = row.reshape(1, -1).contiguous()
    if dist.get_rank() == dst:
        out = [torch.empty_like(row) for _ in range(dist.get_world_size())]
        dist.gather(row, out, dst=dst)
        return torch.cat(out)
    dist.gather(row, None, dst=dst)
    return None
