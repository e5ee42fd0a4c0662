"""Stochastic Gradient Push (SGP): push-sum gossip, for directed graphs whose W is only column-stochastic.

Assran, Loizou, Ballas & Rabbat, "Stochastic Gradient Push for Distributed Deep Learning", ICML 2019;
push-sum is Kempe, Dobra & Gehrke, "Gossip-based computation of aggregate information", FOCS 2003.

A column-stochastic W (each agent splits what it sends over itself and its out-neighbours, knowing
only its out-degree) keeps the network's *sum* of what it mixes but not the mean of it: gossiping
the models alone pulls them towards a weighted average, weighted by W's Perron vector. Push-sum
gossips one scalar per agent with the same matrix, a weight w_i that starts at 1, and reads agent
i's model as the ratio z_i = x_i / w_i, which is the unbiased one: x and w are mixed alike, so their
ratio reaches the plain average of the x_i when the sum of the w_i is n.

One step, in the engine's order (P = (1 - gamma) I + gamma W):

    x_half = P x              round 1: the numerators
    w_new  = P w              round 1 too: one more message of one scalar per edge (counted)
    z      = x_half / w_new   the de-biased models: gradients are taken there, evaluation reads x / w
    x_new  = x_half - lr * T(g(z))

T is the engine's direction transforms (weight decay, momentum, Nesterov, QGM), which act on the
numerators. On a doubly stochastic W every w stays 1 (up to the rounding of W's column sums) and
SGP is DSGD step for step.

The paper's Algorithm 1 (and facebookresearch/stochastic_gradient_push) orders a step gradient, local
step, gossip, with w = 1 at the first gradient: the loop above from its second step on, so the first
step skips the gossip (nothing is sent, the gradient is taken at x0 with w = 1). Gossiping x0 and the
weights first instead would start push-sum from weights P 1, for no gain.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from crossgrad.algorithms.base import Algorithm, CombineContext, StepView, nothing_received
from crossgrad.comm.base import Comm
from crossgrad.comm.network import Delivery, MixWeights
from crossgrad.errors import ConfigError
from crossgrad.topology.checks import ROW_TOL


class PushSumState:
    """The push-sum weights w [n_local, 1] (in the rows' dtype) and whether the first step (which gossips
    nothing) is done, saved with the run; and the de-biased rows of the current step, a work buffer
    reused every step (not saved)."""

    def __init__(self, w: Tensor):
        self.w = w
        self.started = False
        self.z: Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.clone(), "started": self.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        w = state["w"]
        if tuple(w.shape) != tuple(self.w.shape):
            raise ValueError(f"push-sum weights of shape {tuple(w.shape)} do not fit this run's {tuple(self.w.shape)}")
        self.w = w.to(device=self.w.device, dtype=self.w.dtype, copy=True)
        # checkpoints from before the published first step was matched were all past their first step, and
        # from the second step on both orders are the same loop
        self.started = bool(state.get("started", True))

    def counters(self) -> dict[str, int]:
        return {}


@dataclass
class SGP(Algorithm):
    """Stochastic Gradient Push: push-sum for a column-stochastic W, gradients at the de-biased x / w.

    Every agent gossips its model and a weight with the same matrix (topology.weights = out_uniform
    builds such a W); evaluation reads the de-biased models too (Engine.models).
    """

    name: ClassVar[str] = "sgp"
    local_steps_refusal: ClassVar[str | None] = (
        "its push-sum weights are mixed with the models in every round, so a step without one has no weights")
    rejoin_refusal: ClassVar[str | None] = (
        "its rows are shares of the network's mass (x and w), so a copied row would add mass and bias every "
        "agent's x / w; it rejoins with its own")

    def reweight(self, ctx: CombineContext, w: MixWeights, delivery: Delivery) -> MixWeights:
        """Push-sum keeps the mass: a lost message's share stays with its sender (w_jj += w_ij), the receiver
        just does without it, so every column of the step's matrix still sums to 1 and the sums of the
        numerators and of the weights are unchanged (Kempe et al. 2003 analyse it on such varying matrices)."""
        lost = torch.where(delivery.out1, torch.zeros_like(w.mix_out), w.mix_out)
        kept = torch.where(delivery.in1, w.mix_in, torch.zeros_like(w.mix_in))
        return replace(w, mix_self=w.mix_self.index_add(0, ctx.plan.out_src, lost), mix_in=kept)

    def check_mixing(self, topology: Any) -> None:
        """Push-sum needs the columns of W to sum to 1 (each agent hands out all it has, keeping the
        network's sum); a doubly stochastic W qualifies, a W that is only row-stochastic does not."""
        if not topology.is_column_stochastic:
            sums = topology.W.sum(0)
            j = int(((sums - 1).abs() > ROW_TOL).nonzero()[0])  # the first offending column
            raise ConfigError(
                f"sgp (push-sum) needs a column-stochastic W (each agent's weights over itself and its "
                f"out-neighbours sum to 1), but column {j} of the {topology.name} topology's W sums to "
                f"{sums[j].item():.6g}; use topology.weights = 'out_uniform' (each agent splits its mass "
                "uniformly over itself and its out-neighbours) or a doubly stochastic W ('metropolis')")

    def init_state(self, ctx: CombineContext, device: torch.device) -> PushSumState:
        return PushSumState(torch.ones(ctx.plan.n_local, 1, dtype=ctx.dtype, device=device))

    def gossip(self, ctx: CombineContext, comm: Comm, x: Tensor, out: Tensor,
               state: PushSumState) -> tuple[Tensor, Tensor] | None:
        if state.started:
            return None  # the engine's round 1 gossips the numerators
        out.copy_(x)  # the first step is the published one's: a local step from x0, nothing sent
        return nothing_received(ctx, x)

    def gradient_rows(self, ctx: CombineContext, view: StepView, state: PushSumState) -> Tensor:
        if state.started:
            state.w = view.mix(state.w)  # the weights travel with the models, mixed by the same matrix
        state.started = True
        if state.z is None or state.z.shape != view.x_half.shape:
            state.z = torch.empty_like(view.x_half)
        return torch.div(view.x_half, state.w, out=state.z)

    def models(self, x: Tensor, state: PushSumState) -> Tensor:
        return x / state.w

    def gossip_only(self, x: Tensor, state: PushSumState, mixes: Iterable[Callable[[Tensor], Tensor]]) -> Tensor:
        w = state.w
        for mix in mixes:
            x, w = mix(x), mix(w)
        return x / w
