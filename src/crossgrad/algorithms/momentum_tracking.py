"""Momentum Tracking (Takezawa, Bao, Niwa, Sato & Yamada, TMLR 2023): gradient tracking applied to the momentum.

With P = (1 - gamma) I + gamma W the step's gossip matrix, a step of agent i, in the authors' order, is

    m   = beta m + g + wd x            g = grad F_i(x^t): the gradient at the model *before* the gossip
    x  <- P x - lr (m - c)             (round 1, as DSGD: x)
    c  <- P (c - m) + m                (a second round-1 message per edge: c - m)

so that the mean of c stays 0 and every agent steps along the network's mean momentum plus its own
consensus error. init = "global_mean" starts from the authors' first step, c = m = (g - mean_j g_j) / (1 - beta)
at step 0 (one global average over all agents), "zero" from c = m = 0 (the second implementation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from crossgrad.algorithms.base import Algorithm, AlgorithmState, CombineContext, ConfigError, RowState, StepView
from crossgrad.algorithms.tracking import check_doubly_stochastic

INITS = ("global_mean", "zero")


@dataclass
class MomentumTrackingState(RowState):
    """The momentum m and the tracking variable c, one row per local agent; started: the first step is done."""

    m: Tensor
    c: Tensor
    started: bool = False
    saved: ClassVar[dict[str, str]] = {"m": "momentum buffer", "c": "momentum tracking variable c"}


def refuse_other_momentum(algo: Algorithm) -> None:
    """Methods with their own heavy-ball form take neither Nesterov nor QGM."""
    if algo.nesterov or algo.qgm:
        raise ConfigError(f"{algo.name} has its own heavy-ball momentum (momentum = beta) and takes neither nesterov "
                          "nor qgm; set nesterov=false and qgm=false (their defaults)")


@dataclass
class MomentumTracking(Algorithm):
    """Momentum Tracking; own defaults momentum=0.9, nesterov=false (its momentum is heavy ball), init global_mean."""

    nesterov: bool = False
    init: str = "global_mean"

    name: ClassVar[str] = "momentum_tracking"
    loss_refusal: ClassVar[str | None] = (
        "a lost c - m message breaks the tracking invariant (the mean of c stays 0 only if every message "
        "arrives), so the tracked momentum drifts for the rest of the run; use dsgd, ngc or decentlam")
    direction_block: ClassVar[bool] = True
    own_momentum: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        refuse_other_momentum(self)
        if self.init not in INITS:
            raise ConfigError(f"init must be 'global_mean' (the authors' first step) or 'zero', not {self.init!r}")

    def check_mixing(self, topology: Any) -> None:
        super().check_mixing(topology)
        check_doubly_stochastic(self.name, topology, "the tracking variable's mean stays 0")

    def init_state(self, ctx: CombineContext, device: torch.device) -> MomentumTrackingState:
        return MomentumTrackingState.zeros(ctx, device)

    def gradient_rows(self, ctx: CombineContext, view: StepView, state: AlgorithmState) -> Tensor:
        assert view.x is not None
        return view.x

    def combine(
        self, ctx: CombineContext, g_self: Tensor, mv: Tensor | None, dv: Tensor | None, state: AlgorithmState,
        view: StepView | None = None,
    ) -> Tensor:
        assert isinstance(state, MomentumTrackingState) and view is not None and view.direction is not None
        beta, m, c, d = self.momentum, state.m, state.c, view.direction
        if not state.started and self.init == "global_mean":
            assert view.mean is not None
            torch.sub(g_self, view.mean(g_self), out=m).div_(1 - beta)
            c.copy_(m)
        state.started = True
        m.mul_(beta).add_(g_self)
        if self.weight_decay:
            m.add_(view.x, alpha=self.weight_decay)
        torch.sub(c, m, out=d)  # c - m: what goes to the neighbours
        view.mix(d, out=c).add_(m)
        return d.neg_()  # m - c_old, the step from P x
