"""Neighborhood Gradient Clustering (NGC) and CompNGC, which is NGC with the scaled-sign codec."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from crossgrad.algorithms.base import (
    AlgorithmState,
    CombineContext,
    ConfigError,
    CrossGradientAlgorithm,
    StepView,
    add_weighted_edges,
    weighted_self,
)


@dataclass
class NGC(CrossGradientAlgorithm):
    """g~_i = w_ii g_ii + sum_j w_ij [alpha g_ij + (1 - alpha) g_ji].

    alpha = 1 uses data-variant cross-gradients only, alpha = 0 model-variant only (no second
    communication round at all); `weights="uniform"` uses the reference's pi = 1/(k+1). With a
    codec the sender uses its own compressed message for its model-variant term.
    """

    alpha: float = 1.0

    name: ClassVar[str] = "ngc"

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha must be in [0, 1], not {self.alpha}")

    @property
    def round2(self) -> bool:
        return self.alpha > 0

    @property
    def data_variant_share(self) -> float:
        return self.alpha

    def combine(
        self, ctx: CombineContext, g_self: Tensor, mv: Tensor | None, dv: Tensor | None, state: AlgorithmState,
        view: StepView | None = None,
    ) -> Tensor:
        plan, a = ctx.plan, self.alpha
        out = weighted_self(g_self, ctx, view)
        if a < 1:
            add_weighted_edges(out, mv, plan.in_dst, ctx.in_w, ctx.in_k, alpha=1 - a)
        if a > 0:
            add_weighted_edges(out, dv, plan.out_src, ctx.out_w, ctx.out_k, alpha=a)
        return out


@dataclass
class CompNGC(NGC):
    """NGC with codec="sign": scaled-sign messages with sender-side error feedback, the self-gradient too."""

    codec: str | None = "sign"

    name: ClassVar[str] = "compngc"
