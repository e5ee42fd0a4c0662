"""Global Update Tracking (Aketi, Hashemi & Roy, NeurIPS 2023): track the neighbours' whole updates, gossip
displacement included, at DSGD's communication cost.

With P = (1 - gamma) I + gamma W, x~ = P x the engine's gossiped rows and r = x~ - x the gossip displacement,
a step of agent i is

    g^t  = grad F_i(x~^t) + wd x~^t                                   (at the gossiped model)
    M^t  = (x~^{t-1} - x~^t) / lr_{t-1}  = sum_j p_ij s_j^{t-1}        (the neighbours' last steps, recovered)
    y^t  = g^t - r^t / lr_t + mu [M^t - g^{t-1} - (b - 1) r^{t-1} / lr_{t-1}]    (bracket 0 at t = 0)
    m^t  = beta m^{t-1} + y^t,  s^t = m^t (heavy ball) or y^t + beta m^t (Nesterov)
    x^{t+1} = x^t - lr_t s^t

with b = 1 + beta (heavy ball) or 1 + beta + beta^2 (Nesterov), as the authors' code scales the recovered
displacement. Only x is sent (the neighbours' steps follow from the gossiped rows of two steps), so the bytes
are DSGD's. The engine steps from x~ = x + r, so combine returns s^t + r^t / lr_t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from crossgrad.algorithms.base import Algorithm, AlgorithmState, CombineContext, ConfigError, RowState, StepView
from crossgrad.algorithms.tracking import check_doubly_stochastic


@dataclass
class GUTState(RowState):
    """m: the momentum buffer; ref: x~^{t-1}, the previous gossiped rows; prev: g^{t-1} + (b - 1) r^{t-1} / lr_{t-1};
    lr_prev: lr_{t-1}; started: false until the first step (everything at t = -1 is 0)."""

    m: Tensor
    ref: Tensor
    prev: Tensor
    lr_prev: float = 0.0
    started: bool = False
    saved: ClassVar[dict[str, str]] = {"m": "GUT momentum buffer", "ref": "GUT previous gossiped rows",
                                       "prev": "GUT previous gradient"}


@dataclass
class GUT(Algorithm):
    """GUT (momentum=0) and QG-GUTm (momentum > 0): mu scales the tracking correction (the paper's mu).

    Defaults are the authors' GUT: mu=0.9, momentum=0, nesterov=false (their QG-GUTm: momentum=0.9, mu=0.06).
    mu=0 with momentum is the GUT paper's QG-DSGDm (heavy ball on the whole displacement), not QGM.
    """

    mu: float = 0.9
    momentum: float = 0.0
    nesterov: bool = False

    name: ClassVar[str] = "gut"
    loss_refusal: ClassVar[str | None] = (
        "it recovers the neighbours' last updates from the gossiped models of two consecutive steps, which holds "
        "only if both were mixed with the same weights, and a lost message changes the step's weights, so the "
        "recovered update would carry a share of the neighbours' models; use dsgd, ngc or decentlam")
    direction_block: ClassVar[bool] = True
    own_momentum: ClassVar[bool] = True
    gamma_schedule_refusal: ClassVar[str | None] = (
        "it recovers the neighbours' last steps from P x^t - P x^(t-1), which needs one P")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.mu <= 1:
            raise ConfigError(f"mu (GUT's tracking scale) must be in [0, 1], not {self.mu}")
        if self.qgm:
            raise ConfigError("gut takes no qgm: its momentum already follows the whole displacement (QG-GUTm is "
                              "momentum > 0); set qgm=false")

    def check_topology(self, topology: Any) -> None:
        if callable(getattr(topology, "at", None)):
            raise ConfigError("gut needs one fixed graph: it recovers the neighbours' last steps from the gossiped "
                              "rows of two steps, which assumes both were gossiped with the same W; use gt or dsgd "
                              "on time-varying graphs")

    def check_mixing(self, topology: Any) -> None:
        super().check_mixing(topology)
        check_doubly_stochastic(self.name, topology, "the tracked update's mean stays the agents' mean gradient")

    def init_state(self, ctx: CombineContext, device: torch.device) -> GUTState:
        return GUTState.zeros(ctx, device)

    def combine(
        self, ctx: CombineContext, g_self: Tensor, mv: Tensor | None, dv: Tensor | None, state: AlgorithmState,
        view: StepView | None = None,
    ) -> Tensor:
        assert isinstance(state, GUTState) and view is not None and view.direction is not None
        x, x_half, lr, d = view.x, view.x_half, view.lr, view.direction
        beta, wd = self.momentum, self.weight_decay
        # d = g + wd x~ + mu [M - prev]: y + r / lr, what the engine applies from x~ when beta = 0
        if state.started and self.mu:
            torch.sub(state.ref, x_half, out=d).div_(state.lr_prev).sub_(state.prev).mul_(self.mu).add_(g_self)
        else:
            d.copy_(g_self)
        if wd:
            d.add_(x_half, alpha=wd)
        state.ref.copy_(x_half)
        r = torch.sub(x_half, x, out=state.prev)  # prev is scratch until its new value below
        if beta:
            m = state.m
            if self.nesterov:  # m = beta m + y; the step y + beta m, from x~: d + beta m
                m.mul_(beta).add_(d).sub_(r, alpha=1 / lr)
                d.add_(m, alpha=beta)
            else:  # the step m = beta m + y, from x~: beta m_old + d
                m.mul_(beta)
                d.add_(m)
                torch.sub(d, r, alpha=1 / lr, out=m)
        b1 = beta + beta * beta if self.nesterov else beta
        r.mul_(b1 / lr).add_(g_self)
        if wd:
            r.add_(x_half, alpha=wd)
        state.lr_prev, state.started = lr, True
        return d
