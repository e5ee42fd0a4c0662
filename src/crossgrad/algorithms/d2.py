"""D² (Tang, Lian, Yan, Zhang, Liu, ICML 2018), also known as exact diffusion.

D² iterates x_{t+1} = W (2 x_t - x_{t-1} - lr g(x_t) + lr g(x_{t-1})). The engine stores the
iterate before gossip, so with m_t = W_gamma h_{t-1} (step 2, the engine's gossip; m_t is D²'s x_t)
and g_t = grad f_i(m_t) (step 3) a step makes

    h_t = 2 m_t - m_{t-1} - lr_t g_t + lr_{t-1} g_{t-1}      (h_0 = m_0 - lr_0 g_0)
        = p_t + (m_t - p_{t-1}),   p_t = m_t - lr_t g_t, the plain update of DSGD.

The engine's transforms make p_t (weight decay included: it is the gradient of a regulariser all
agents share); `after_update` adds the correction m_t - p_{t-1}, computed in `combine` while the
gossiped rows m_t are still there. The fixed points are exact: consensus on a stationary point of
the mean objective at a constant lr. D² needs a symmetric W with lambda_min(W_gamma) > -1/3.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from crossgrad.algorithms.base import Algorithm, AlgorithmState, CombineContext, ConfigError, RowState, StepView

#: D²'s bound on the smallest eigenvalue of the mixing matrix, and the margin a value must clear
#: (a ring of even length with uniform weights sits exactly on -1/3 and must be refused reliably)
LAMBDA_MIN = -1 / 3
EIG_TOL = 1e-9


@dataclass
class D2State(RowState):
    """p_{t-1}, the previous step's plain update, per local agent; `corr` is scratch within a step.

    `started` is false until the first step, which makes no correction.
    """

    prev: Tensor
    corr: Tensor
    started: bool = False
    saved: ClassVar[dict[str, str]] = {"prev": "D2 previous update"}


def smallest_eigenvalue(W: Tensor, gamma: float) -> float:
    """lambda_min of W_gamma = (1 - gamma) I + gamma W, for a symmetric W."""
    W = W.to(torch.float64)
    return float(1 - gamma + gamma * torch.linalg.eigvalsh(W)[0])


@dataclass
class D2(Algorithm):
    """D² / exact diffusion: DSGD's update plus the correction m_t - p_{t-1}; no momentum.

    Defaults differ from the other algorithms: momentum=0 and nesterov=false (D² is defined and
    analysed without momentum, and refuses it), and gamma=0.5, exact diffusion's (I + W) / 2, whose
    eigenvalues are >= 0 for every symmetric W (gamma=1 fails D²'s condition on even rings and tori).
    """

    gamma: float = 0.5
    momentum: float = 0.0
    nesterov: bool = False

    name: ClassVar[str] = "d2"
    loss_refusal: ClassVar[str | None] = (
        "its correction compares iterates mixed with one fixed W, and every lost message changes the step's "
        "W (as on a time-varying graph, which D2 refuses too); use dsgd, ngc or sgp")

    def validate(self) -> None:
        super().validate()
        if self.qgm or self.momentum > 0:
            raise ConfigError(
                f"d2 takes no momentum (momentum={self.momentum}, qgm={str(self.qgm).lower()}): D² and its "
                "condition on W are defined and analysed for the plain step; set momentum=0 (its default) and "
                "qgm=false, or use gt, which corrects the same bias and takes momentum")

    def check_topology(self, topology: Any) -> None:
        if callable(getattr(topology, "at", None)):
            raise ConfigError("d2 needs one fixed graph: its correction m_t - p_{t-1} assumes both were gossiped "
                              "with the same W, so time-varying topologies are refused; use gt or dsgd on them")
        where = f"W of {topology.name} (n={topology.n})"
        if topology.is_directed:
            raise ConfigError(f"d2 needs an undirected graph with a symmetric W; {where} is directed "
                              "(use gt, dsgd or sgp on directed graphs)")
        if not topology.is_symmetric:
            raise ConfigError(f"d2 needs a symmetric W; {where} is not (uniform weights on an irregular graph): "
                              "use topology.weights = 'metropolis'")
        gamma = self.gamma_max  # the condition weakens as gamma grows: a schedule must meet it at its largest
        lam = smallest_eigenvalue(topology.W, gamma)
        if lam <= LAMBDA_MIN + EIG_TOL:
            reached = "" if gamma == self.gamma else f" (which gamma_schedule={self.gamma_schedule!r} reaches)"
            w_min = smallest_eigenvalue(topology.W, 1.0)
            bound = (4 / 3) / (1 - w_min)  # gamma (1 - lambda_min(W)) < 4/3
            raise ConfigError(
                f"d2 needs lambda_min((1 - gamma) I + gamma W) > -1/3; {where} with gamma={gamma:g}{reached} "
                f"has {lam:.4g}. Lower algorithm.gamma below {bound:.4g} (gamma=0.5, d2's default, always works), "
                "or give the agents more self-weight")

    def init_state(self, ctx: CombineContext, device: torch.device) -> D2State:
        return D2State.zeros(ctx, device)

    def combine(
        self, ctx: CombineContext, g_self: Tensor, mv: Tensor | None, dv: Tensor | None, state: AlgorithmState,
        view: StepView | None = None,
    ) -> Tensor:
        assert isinstance(state, D2State) and view is not None
        if state.started:  # m_t - p_{t-1}, while view.x_half still holds m_t
            torch.sub(view.x_half, state.prev, out=state.corr)
        return g_self

    def after_update(self, ctx: CombineContext, view: StepView, state: AlgorithmState) -> None:
        assert isinstance(state, D2State)
        state.prev.copy_(view.x_half)  # p_t, DSGD's update
        if state.started:
            view.x_half.add_(state.corr)
        state.started = True
