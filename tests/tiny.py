"""The tiny float64 problem the algorithm tests share: a 3-5-3 tanh network, random batches per agent and
step, a simulator run with an optional lr schedule, and plain-autograd gradients for the references."""
from __future__ import annotations

import torch
from torch import nn

import crossgrad as cg
from crossgrad.topology import Topology


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()

def make_batches(n: int, steps: int, seed: int = 1) -> list[list[tuple]]:
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
             for _ in range(n)] for _ in range(steps)]

def small_model(seed: int = 0) -> nn.Module:
    """The smaller variant some tests were written with: 3-4-3 (their hand-computed values depend on it)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def small_batches(n: int, steps: int, seed: int = 1) -> list[list[tuple]]:
    """Batches of 5 for small_model."""
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g))
             for _ in range(n)] for _ in range(steps)]


def run_sim(topo: Topology, batches, name: str, schedule=None, model=None, loss_fn=None, **kw) -> cg.Simulator:
    extra = {} if loss_fn is None else {"loss_fn": loss_fn}
    sim = cg.Simulator(model or tiny_model(), topo, cg.make_algorithm(name, **kw), **extra)
    for t, b in enumerate(batches):
        if schedule:
            sim.set_lr(schedule(t))
        sim.step(b)
    return sim

def grad_at(model: nn.Module, theta: list[torch.Tensor], batch) -> list[torch.Tensor]:
    params = {name: t.clone().requires_grad_(True) for (name, _), t in zip(model.named_parameters(), theta)}
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])
    return list(torch.autograd.grad(loss, list(params.values())))
