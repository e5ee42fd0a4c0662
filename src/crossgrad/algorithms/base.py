"""What every algorithm shares: hyperparameters, validation, and the combine weights.

An algorithm *declares* what it computes and exchanges (cross-gradients or not, a second round or
not, which compressor) and how it combines gradients; the engine carries that out on any backend.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from crossgrad.comm.base import EdgePlan
from crossgrad.flat import ParamLayout


class ConfigError(ValueError):
    """A hyperparameter or option is out of range."""


@dataclass
class CombineContext:
    """Per-run constants the combine step needs, derived once from the topology and the layout.

    self_w[i]: weight of agent i's self-gradient; in_w[e]: weight of the model-variant gradient on
    in-edge e; out_w[e]: weight of the data-variant gradient arriving on out-edge e.
    """

    plan: EdgePlan
    layout: ParamLayout
    self_w: Tensor
    in_w: Tensor
    out_w: Tensor


def combine_weights(W: Tensor, plan: EdgePlan, mode: str, directed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Self, model-variant and data-variant weights for the local agents.

    mode "mixing" uses W; "uniform" uses pi = 1/(k+1) for every neighbour, as the reference code
    does (the two agree on regular graphs with uniform weights). On an undirected graph the
    data-variant gradient from j gets the same weight as j's model-variant gradient. On a directed
    graph the data-variant gradients arrive from out-neighbours instead; they share the weight
    1 - w_ii in proportion to the weight each out-neighbour gives agent i, which reduces to w_ij
    whenever W is symmetric.
    """
    W = W.to(torch.float64)
    if mode == "uniform":
        mask = (W > 0).to(torch.float64)
        mask.fill_diagonal_(1.0)
        W = mask / mask.sum(1, keepdim=True)
    elif mode != "mixing":
        raise ConfigError(f"weights must be 'mixing' or 'uniform', not {mode!r}")
    local = torch.tensor(plan.local, dtype=torch.long)
    self_w = W[local, local]
    in_w = W[local[plan.in_dst], plan.in_src]
    if not directed:
        out_w = W[local[plan.out_src], plan.out_dst]
    else:
        given = W[plan.out_dst, local[plan.out_src]]
        total = torch.zeros(plan.n_local, dtype=torch.float64).index_add_(0, plan.out_src, given)
        out_w = (1 - self_w[plan.out_src]) * given / total[plan.out_src]
    return self_w, in_w, out_w


@dataclass
class Algorithm:
    """Hyperparameters common to every algorithm (contract steps 2, 7, 8, 9)."""

    lr: float = 0.1
    gamma: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False
    qgm: bool = False
    weight_decay: float = 0.0

    name: ClassVar[str] = ""
    #: computes model-variant cross-gradients (neighbour models on own data)
    cross_gradients: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ConfigError(f"lr must be a positive finite number, not {self.lr}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma (gossip rate) must be in (0, 1], not {self.gamma}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), not {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, not {self.weight_decay}")
        if self.qgm and self.momentum == 0:
            raise ConfigError("qgm=True needs momentum > 0 (QGM is a momentum method)")

    @property
    def round2(self) -> bool:
        """Whether cross-gradients are sent back to their models' owners (the second round)."""
        return False

    #: combine weights: "mixing" (W) or "uniform" (pi = 1/(k+1)); a field on algorithms that combine
    weights: ClassVar[str] = "mixing"
    #: compressor name for cross-gradient messages; None sends them uncompressed
    compression: ClassVar[str | None] = None
    #: pass the self-gradient through the compressor too (with its own error memory)
    compress_self: ClassVar[bool] = False

    def init_state(self, ctx: CombineContext, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        return {}

    def combine(
        self, ctx: CombineContext, g_self: Tensor, mv: Tensor | None, dv: Tensor | None, state: dict[str, Any]
    ) -> Tensor:
        """Contract step 6: the combined gradient per local agent, [n_local, P]."""
        return g_self

    def hyperparameters(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{self.name}({args})"
