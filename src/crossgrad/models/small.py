"""Small models: ``mlp``, ``lenet5`` and the NGC paper's 5-layer CNN ``cnn5``."""
from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norms import norm_act
from .registry import check_min_size, register_model

__all__ = ["MLP", "LeNet5", "CNN5", "conv_norm_act"]


def conv_norm_act(
    cin: int, cout: int, norm: str, kernel_size: int = 3, stride: int = 1, padding: int = 1,
    groups: int = 1, act: bool = True,
) -> nn.Sequential:
    """``Conv2d -> norm (+ReLU)``; the conv has a bias only when ``norm == "none"``."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, groups=groups,
                  bias=(norm == "none")),
        norm_act(norm, cout, act=act),
    )


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (200, 200)) -> None:
        super().__init__()
        dims = [in_features, *(int(h) for h in hidden)]
        if min(dims) < 1:
            raise ValueError(f"hidden sizes must be positive, got {tuple(hidden)}")
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


@register_model("mlp", default_input_shape=(1, 28, 28), uses_norm=False,
                description="MLP, hidden (200, 200) by default; no norm layers")
def mlp(input_shape, num_classes, norm="none", hidden: Sequence[int] = (200, 200)) -> nn.Module:
    """Multi-layer perceptron on the flattened input (``norm`` is ignored)."""
    return MLP(math.prod(input_shape), num_classes, hidden)


class LeNet5(nn.Module):
    """conv5(6) -> norm/act -> maxpool2 -> conv5(16) -> norm/act -> maxpool2
    -> fc120 -> ReLU -> fc84 -> ReLU -> fc(num_classes)."""

    def __init__(self, input_shape, num_classes: int, norm: str, padding1: int, padding2: int) -> None:
        super().__init__()
        c, h, w = input_shape

        def out(s: int) -> int:  # conv5 -> pool2 -> conv5 -> pool2 (floor division)
            s = (s + 2 * padding1 - 4) // 2
            return (s + 2 * padding2 - 4) // 2

        fh, fw = out(h), out(w)
        if fh < 1 or fw < 1:
            raise ValueError(
                f"lenet5 with padding1={padding1}, padding2={padding2} needs larger inputs than "
                f"{h}x{w} (feature map would be {fh}x{fw}); try cnn5 or mlp, or more padding"
            )
        self.features = nn.Sequential(
            conv_norm_act(c, 6, norm, kernel_size=5, padding=padding1),
            nn.MaxPool2d(2),
            conv_norm_act(6, 16, norm, kernel_size=5, padding=padding2),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(16 * fh * fw, 120)
        self.fc2 = nn.Linear(120, 84)
        self.head = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.head(x)


@register_model("lenet5", default_input_shape=(1, 28, 28),
                description="LeNet-5 (conv5(6)-pool-conv5(16)-pool-fc120-fc84-fc)")
def lenet5(input_shape, num_classes, norm="evonorm", padding1: int | None = None,
           padding2: int | None = None) -> nn.Module:
    """LeNet-5 with max-pooling and ReLU (or EvoNorm's gate) instead of tanh/avg-pool.

    Padding (``None`` = automatic):

    * ``padding1`` = 2 when min(H, W) <= 28 (MNIST-style: 28x28 behaves like the
      original 32x32 LeNet, giving the classic 16x5x5 feature map), else 0.
    * ``padding2`` = 0 when the map entering the second conv is at least 10x10
      (inputs >= 20x20), else 2 ("same"), so 8x8 digits work: 8 -> 8 -> 4 -> 4 -> 2.
    """
    _, h, w = input_shape
    if padding1 is None:
        padding1 = 2 if min(h, w) <= 28 else 0
    if padding2 is None:
        after_pool1 = (min(h, w) + 2 * padding1 - 4) // 2
        padding2 = 0 if after_pool1 >= 10 else 2
    return LeNet5(input_shape, num_classes, norm, int(padding1), int(padding2))


class CNN5(nn.Module):
    """NGC paper's 5-layer CNN: conv3x3(32), conv3x3(32), pool, conv3x3(64), pool,
    conv3x3(64), pool, fc.  Each conv (padding 1) is followed by the norm and ReLU
    (EvoNorm-S0 already contains the nonlinearity)."""

    def __init__(self, input_shape, num_classes: int, norm: str, widths: Sequence[int] = (32, 32, 64, 64)):
        super().__init__()
        c, h, w = input_shape
        if len(widths) != 4:
            raise ValueError(f"cnn5 needs 4 conv widths, got {tuple(widths)}")
        w1, w2, w3, w4 = (int(x) for x in widths)
        check_min_size("cnn5", input_shape, 8, "three 2x2 max-pools")
        self.features = nn.Sequential(
            conv_norm_act(c, w1, norm),
            conv_norm_act(w1, w2, norm),
            nn.MaxPool2d(2),
            conv_norm_act(w2, w3, norm),
            nn.MaxPool2d(2),
            conv_norm_act(w3, w4, norm),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(w4 * (h // 8) * (w // 8), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@register_model("cnn5", default_input_shape=(1, 28, 28),
                description="NGC paper 5-layer CNN (4 conv3x3 + fc)")
def cnn5(input_shape, num_classes, norm="evonorm", widths: Sequence[int] = (32, 32, 64, 64)) -> nn.Module:
    """5-layer CNN from the NGC paper; inputs of at least 8x8."""
    return CNN5(input_shape, num_classes, norm, widths)


def init_convs_kaiming(model: nn.Module) -> None:
    """He (fan-out) initialisation for every conv layer, zero biases: the usual CIFAR-net init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
