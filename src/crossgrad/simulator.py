"""In-process simulator: all n agents of a graph in one process, the engine on a `LocalComm`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from crossgrad.algorithms import Algorithm
from crossgrad.comm.local import LocalComm
from crossgrad.comm.network import NetworkModel
from crossgrad.engine import Engine
from crossgrad.evaluators import Batch, LossFn
from crossgrad.topology import TimeVaryingTopology, Topology
from crossgrad.wiring import comm_for


def run_stats(steps: int, grad_evals: int, bytes_sent: Tensor, qp_failures: int) -> dict[str, Any]:
    """Counters of all n agents: grad_evals in total, bytes_sent [n, 2] (rounds 1 and 2 per agent)."""
    n, per = bytes_sent.shape[0], max(steps, 1)
    return {
        "steps": steps,
        "grad_evals": grad_evals,
        "grad_evals_per_agent_per_step": grad_evals / (per * n),
        "bytes_sent": bytes_sent,
        "bytes_per_agent_per_step": (bytes_sent.double().mean(0) / per).tolist(),
        "qp_failures": qp_failures,
    }


class Simulator:
    """Runs one algorithm on every agent of `topology`, all starting from `model`'s weights.

    `topology` may be time-varying (crossgrad.topology.timevarying): each step then uses its own graph.

    Computation happens in the model's dtype and on its device (or `device`). `params` is the
    [n, P] parameter matrix, row i = agent i, flattened in `model.parameters()` order (for push-sum,
    `sgp`, the de-biased models x / w; `engine.x` holds its numerators).
    `evaluator`: "loop" evaluates (model, minibatch) pairs one by one (best on CPU), "vmap" all at
    once with torch.func (best on GPU; buffer-free models), "auto" picks by device.
    `network`: an unreliable network and simulated time (`crossgrad.comm.network.NetworkModel`); None: perfect.
    """

    def __init__(
        self,
        model: nn.Module,
        topology: Topology | TimeVaryingTopology,
        algorithm: Algorithm,
        loss_fn: LossFn = torch.nn.functional.cross_entropy,
        device: torch.device | str | None = None,
        evaluator: str = "auto",
        network: NetworkModel | None = None,
    ):
        self.topology = topology
        dev = device or next(model.parameters()).device
        comm = comm_for(topology, lambda edges: LocalComm(edges, topology.n, device=dev))
        self.engine = Engine(model, topology, algorithm, comm, loss_fn, device=device, evaluator=evaluator,
                             network=network)
        self.model = model

    @property
    def n(self) -> int:
        return self.topology.n

    @property
    def params(self) -> Tensor:
        """The agents' models [n, P] (`Engine.models`: push-sum's de-biased x / w, else the rows x themselves)."""
        return self.engine.models()

    @property
    def lr(self) -> float:
        return self.engine.lr

    def set_lr(self, lr: float) -> None:
        self.engine.set_lr(lr)

    @property
    def gamma(self) -> float:
        return self.engine.gamma

    def set_gamma(self, gamma: float) -> None:
        """The averaging rate from the next step on (an ARS-style schedule sets it every epoch)."""
        self.engine.set_gamma(gamma)

    def step(self, batches: Sequence[Batch], communicate: bool = True) -> Tensor:
        """One synchronous iteration; batches[i] = (inputs, targets) of agent i. Returns the n losses.
        communicate=False: a local step (no gossip), for algorithms that allow it (dsgd)."""
        return self.engine.step(batches, communicate)

    def consensus(self) -> Tensor:
        """The exact average of all agents' models, [P]."""
        return self.engine.models().mean(0)

    def consensus_distance(self) -> float:
        """(1/n) sum_i ||x_i - x_bar||^2 over the agents' models x_i."""
        x = self.engine.models()
        return float(((x - x.mean(0)) ** 2).sum(1).mean())

    @property
    def stats(self) -> dict[str, Any]:
        e = self.engine
        return run_stats(e.stats.steps, e.stats.grad_evals, e.comm.bytes_sent.clone(), e.stats.qp_failures)

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)
