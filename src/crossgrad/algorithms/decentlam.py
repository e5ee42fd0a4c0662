"""DecentLaM (Yuan et al., ICCV 2021), as the MomentumTracking
repository runs it: agents send their local SGD step instead of their model.

With P = (1 - gamma) I + gamma W, a step of agent i is

    z   = x - lr (grad F_i(x) + wd x)        sent to the neighbours (round 1: one row per edge, as DSGD)
    m  <- beta m + (x - (P z)_i) / lr
    x  <- x - lr m

so the momentum acts on the whole displacement, gossip included (with beta = 0 it is x <- P z,
adapt-then-combine DSGD). The model itself is never sent: `gossip` replaces the engine's round 1 with
nothing (x_half starts as x), and combine sends z through view.mix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from crossgrad.algorithms.base import Algorithm, AlgorithmState, CombineContext, RowState, StepView, nothing_received
from crossgrad.algorithms.momentum_tracking import refuse_other_momentum


@dataclass
class DecentLaMState(RowState):
    """The momentum m per local agent; `mixed` is scratch within a step (P z)."""

    m: Tensor
    mixed: Tensor
    saved: ClassVar[dict[str, str]] = {"m": "DecentLaM momentum buffer"}


@dataclass
class DecentLaM(Algorithm):
    """DecentLaM; own defaults momentum=0.9, nesterov=false (its momentum is heavy ball)."""

    nesterov: bool = False

    name: ClassVar[str] = "decentlam"
    direction_block: ClassVar[bool] = True
    own_momentum: ClassVar[bool] = True
    rejoin_refusal: ClassVar[str | None] = (
        "it never sends its model (its round-1 message is its local step z), so a returning agent has no "
        "neighbour's model to copy; it rejoins with its own")

    def validate(self) -> None:
        super().validate()
        refuse_other_momentum(self)

    def init_state(self, ctx: CombineContext, device: torch.device) -> DecentLaMState:
        return DecentLaMState.zeros(ctx, device)

    def gossip(self, ctx: CombineContext, comm: Any, x: Tensor, out: Tensor,
               state: AlgorithmState) -> tuple[Tensor, Tensor]:
        out.copy_(x)  # the step starts from the model itself: no model goes out
        return nothing_received(ctx, x)

    def combine(
        self, ctx: CombineContext, g_self: Tensor, mv: Tensor | None, dv: Tensor | None, state: AlgorithmState,
        view: StepView | None = None,
    ) -> Tensor:
        assert isinstance(state, DecentLaMState) and view is not None and view.direction is not None
        x, lr, z = view.x_half, view.lr, view.direction  # x_half is x itself: nothing was gossiped
        if self.weight_decay:
            torch.add(g_self, x, alpha=self.weight_decay, out=z)
        else:
            z.copy_(g_self)
        torch.sub(x, z, alpha=lr, out=z)
        mixed = view.mix(z, out=state.mixed)
        torch.sub(x, mixed, out=z).div_(lr)
        return state.m.mul_(self.momentum).add_(z)
