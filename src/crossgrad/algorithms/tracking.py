"""Gradient tracking (DSGT): each agent steps along a tracked estimate of the network's mean gradient.

In the engine's order (gossip, gradient at the gossiped model, update), at step t:

    x_half = W_gamma x                                  (step 2, the engine's gossip)
    g_t    = grad f_i(x_half)                           (step 3)
    y_t    = W_gamma y_{t-1} + g_t - g_{t-1}            (one more round-1 message per edge: y)
    x      = x_half - lr * T(y_t)                       (steps 7-9, T the direction transforms)

with y_{-1} = g_{-1} = 0, so that mean(y_t) = mean(g_t) at every step when W_gamma is doubly
stochastic. Written for z = x_half this is the adapt-then-combine form z <- W (z - lr y),
y <- W y + g(z_new) - g(z_old), whose fixed points are exact: consensus on a stationary point
of the mean objective, at a constant lr, however different the agents' objectives are.

variant = "diging" is DIGing (Nedic, Olshevsky & Shi, SIAM J. Optim. 2017, Algorithm 1, as Bluefog's
examples run it): the same recursion with the gradient taken at the un-gossiped x,

    x_{t+1} = W_gamma x_t - lr * y_t,    y_t = W_gamma y_{t-1} + g(x_t) - g(x_{t-1}),

so y_0 = g(x_0). track_weight_decay = true tracks g + wd * x (x: where the gradient was taken), as
epfml/relaysgd does, instead of adding wd * x_half outside the tracking.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from crossgrad.algorithms.base import Algorithm, AlgorithmState, CombineContext, ConfigError, RowState, StepView


@dataclass
class TrackingState(RowState):
    """The tracked direction y and the previous self-gradient, one row per local agent."""

    y: Tensor
    g_prev: Tensor
    saved: ClassVar[dict[str, str]] = {"y": "tracked direction y", "g_prev": "previous gradient"}


def check_doubly_stochastic(name: str, topology: Any, why: str) -> None:
    """Refuse a W whose columns do not sum to 1: tracking methods need the gossip to keep sums (`why`)."""
    if not topology.is_column_stochastic:
        sums = topology.W.sum(0)
        raise ConfigError(
            f"{name} needs a doubly stochastic W (columns summing to 1 too), so that {why}; the columns of the "
            f"{topology.name} topology's W (n={topology.n}) sum to {sums.min().item():.4g} to "
            f"{sums.max().item():.4g}. Use topology.weights = 'metropolis' on an undirected graph, or a regular graph")


@dataclass
class GT(Algorithm):
    """Gradient tracking (DSGT): steps along y, which gossips and tracks the mean gradient.

    Every momentum form acts on the tracked direction y (Nesterov 0.9 by default); at a fixed point
    y = 0 and the buffers vanish, so the fixed points stay exact. W must be doubly stochastic.
    variant: "dsgt" (the gradient at the gossiped rows) or "diging" (at the rows before the gossip);
    track_weight_decay: track g + weight_decay * x instead of adding the decay after the tracking.
    """

    variant: str = "dsgt"
    track_weight_decay: bool = False

    name: ClassVar[str] = "gt"
    direction_block: ClassVar[bool] = True
    loss_refusal: ClassVar[str | None] = (
        "a lost y message takes its share of the tracked gradients with it, so the sum of the y stops being the "
        "sum of the gradients and the tracked mean drifts for the rest of the run (robust tracking needs running "
        "sums, not implemented); use dsgd, ngc or sgp")

    def validate(self) -> None:
        super().validate()
        if self.variant not in ("dsgt", "diging"):
            raise ConfigError(f"gt's variant must be 'dsgt' (gradient at the gossiped model) or 'diging' (at the "
                              f"model before the gossip), not {self.variant!r}")

    @property
    def transform_weight_decay(self) -> float:
        return 0.0 if self.track_weight_decay else self.weight_decay

    def check_mixing(self, topology: Any) -> None:
        super().check_mixing(topology)
        check_doubly_stochastic(self.name, topology, "the tracked direction's mean stays the agents' mean gradient")

    def init_state(self, ctx: CombineContext, device: torch.device) -> TrackingState:
        return TrackingState.zeros(ctx, device)

    def gradient_rows(self, ctx: CombineContext, view: StepView, state: AlgorithmState) -> Tensor:
        return view.x if self.variant == "diging" else view.x_half

    def combine(
        self, ctx: CombineContext, g_self: Tensor, mv: Tensor | None, dv: Tensor | None, state: AlgorithmState,
        view: StepView | None = None,
    ) -> Tensor:
        assert isinstance(state, TrackingState) and view is not None
        y = view.mix(state.y, out=view.direction)  # not state.y itself: the transforms may overwrite the direction
        y.add_(g_self).sub_(state.g_prev)
        state.g_prev.copy_(g_self)
        if self.track_weight_decay and self.weight_decay:
            # the decay's gradient, at the rows the gradient was taken at, joins the tracked gradient
            rows = self.gradient_rows(ctx, view, state)
            y.add_(rows, alpha=self.weight_decay)
            state.g_prev.add_(rows, alpha=self.weight_decay)
        state.y.copy_(y)
        return y
