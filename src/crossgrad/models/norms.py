"""Normalization layers for decentralized training.

``make_norm(kind, channels)`` builds one of:

``"evonorm"``
    EvoNorm-S0 (Liu et al., 2020, "Evolving Normalization-Activation Layers")::

        y = x * sigmoid(v * x) / group_std(x) * gamma + beta

    where ``group_std`` is the per-sample standard deviation over each group of
    ``C / G`` channels and all spatial positions, ``sqrt(var + eps)``.  The layer
    *includes* the nonlinearity (the sigmoid gate), so models do not add a separate
    ReLU after it.  ``apply_act=False`` drops the gate (``y = x / group_std * gamma
    + beta``) for places where the architecture has a norm without activation
    (the last norm of a residual branch, MobileNetV2's linear bottleneck).
``"group"``
    ``nn.GroupNorm`` (followed by ReLU in the models).
``"batch"``
    ``nn.BatchNorm2d`` (followed by ReLU in the models).
``"none"``
    ``nn.Identity`` (the preceding conv then gets a bias).

Why EvoNorm?  Gossip-based decentralized algorithms (DSGD, NGC, CGA, ...) average
only *parameters* (``model.parameters()``) between neighbouring agents.  Batch
norm's running mean / variance are *buffers*: each agent keeps its own, computed
from its own (non-IID) data, and gossip never averages them.  At evaluation time
an agent's consensus parameters are then combined with statistics that belong to
its local data distribution only, which hurts accuracy badly on skewed data.
EvoNorm-S0 and GroupNorm use per-sample statistics and have no running state,
so every piece of model state is a parameter and is gossiped; this is why the NGC
paper uses EvoNorm.  ``"batch"`` is provided for comparison only.

Group count: by default the largest divisor of ``C`` that is at most 32
(``default_groups``), so any channel count is accepted.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = [
    "NORM_KINDS",
    "EvoNormS0",
    "default_groups",
    "make_norm",
    "norm_act",
    "norm_includes_act",
]

NORM_KINDS: tuple[str, ...] = ("evonorm", "group", "batch", "none")


def check_norm(kind: str) -> str:
    """Return ``kind`` if it is a known norm, else raise ``ValueError`` listing them."""
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm {kind!r}; available norms: {', '.join(NORM_KINDS)}")
    return kind


def default_groups(channels: int, max_groups: int = 32) -> int:
    """Largest group count ``<= min(max_groups, channels)`` that divides ``channels``."""
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1  # unreachable: 1 always divides


class EvoNormS0(nn.Module):
    """EvoNorm-S0 over inputs of shape ``[N, C, *spatial]`` (no running statistics).

    Parameters (all of shape ``[C]``): ``weight`` (gamma, init 1), ``bias`` (beta,
    init 0) and ``v`` (init 1; absent when ``apply_act=False``).
    """

    def __init__(
        self,
        channels: int,
        groups: int | None = None,
        eps: float = 1e-5,
        apply_act: bool = True,
    ) -> None:
        super().__init__()
        groups = default_groups(channels) if groups is None else int(groups)
        if groups < 1 or channels % groups != 0:
            raise ValueError(f"groups={groups} must be positive and divide channels={channels}")
        self.channels = channels
        self.groups = groups
        self.eps = float(eps)
        self.apply_act = bool(apply_act)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        if self.apply_act:
            self.v = nn.Parameter(torch.ones(channels))
        else:
            self.register_parameter("v", None)

    def group_std(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample, per-group ``sqrt(var + eps)`` broadcastable to ``x``'s grouped view
        ``[N, G, C/G * prod(spatial)]``; variance is the biased (population) one."""
        xg = x.reshape(x.shape[0], self.groups, -1)
        # torch.var is a two-pass / Welford computation (no E[x^2]-E[x]^2 cancellation).
        var = torch.var(xg, dim=-1, correction=0, keepdim=True)
        return torch.sqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(
                f"EvoNormS0 expects input [N, {self.channels}, ...], got shape {tuple(x.shape)}"
            )
        bshape = (1, self.channels) + (1,) * (x.dim() - 2)
        num = x * torch.sigmoid(self.v.view(bshape) * x) if self.apply_act else x
        std = self.group_std(x)
        y = (num.reshape(x.shape[0], self.groups, -1) / std).reshape(x.shape)
        return y * self.weight.view(bshape) + self.bias.view(bshape)

    def extra_repr(self) -> str:
        return f"{self.channels}, groups={self.groups}, eps={self.eps}, apply_act={self.apply_act}"


def make_norm(
    kind: str,
    channels: int,
    groups: int | None = None,
    *,
    eps: float = 1e-5,
    apply_act: bool = True,
) -> nn.Module:
    """Build a normalization layer for ``channels`` feature maps.

    ``groups`` applies to ``"evonorm"`` and ``"group"`` (default: ``default_groups``);
    ``apply_act`` only affects ``"evonorm"`` (whether the sigmoid gate is used).
    """
    check_norm(kind)
    if kind == "evonorm":
        return EvoNormS0(channels, groups=groups, eps=eps, apply_act=apply_act)
    if kind == "group":
        g = default_groups(channels) if groups is None else int(groups)
        if g < 1 or channels % g != 0:
            raise ValueError(f"groups={g} must be positive and divide channels={channels}")
        return nn.GroupNorm(g, channels, eps=eps)
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=eps)
    return nn.Identity()


def norm_includes_act(kind: str) -> bool:
    """True when the norm layer already contains the nonlinearity (EvoNorm-S0)."""
    return check_norm(kind) == "evonorm"


def norm_act(kind: str, channels: int, act: bool = True, groups: int | None = None) -> nn.Module:
    """Norm followed by ReLU (``act=True``) or by nothing (``act=False``).

    For ``"evonorm"`` this is a single EvoNorm-S0 layer with or without its gate.
    ReLUs are out-of-place, so models stay usable under ``torch.func.vmap``.
    """
    if norm_includes_act(kind):
        return make_norm(kind, channels, groups, apply_act=act)
    norm = make_norm(kind, channels, groups)
    if not act:
        return norm
    if isinstance(norm, nn.Identity):
        return nn.ReLU()
    return nn.Sequential(norm, nn.ReLU())
