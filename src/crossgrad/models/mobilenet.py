"""MobileNetV2 (Sandler et al., 2018), CIFAR variant.

Differences from the ImageNet model, as is usual for 32x32 inputs: the stem conv and the
second bottleneck stage use stride 1 instead of 2 (total downsampling 8: 32x32 -> 4x4),
ReLU instead of ReLU6 (or EvoNorm-S0's built-in gate), and no dropout.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import check_min_size, register_model
from .small import conv_norm_act, init_convs_kaiming

__all__ = ["InvertedResidual", "MobileNetV2", "MOBILENETV2_CIFAR_CFG"]

# (expansion t, output channels c, repeats n, first stride s)
MOBILENETV2_CIFAR_CFG = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the ImageNet model
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor`` without going below 90% of ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


class InvertedResidual(nn.Module):
    """[1x1 expand -> norm/act] -> 3x3 depthwise -> norm/act -> 1x1 project -> norm (linear),
    with an identity residual when stride is 1 and the channel count is unchanged."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int, norm: str) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_norm_act(cin, hidden, norm, kernel_size=1, padding=0))
        layers.append(conv_norm_act(hidden, hidden, norm, stride=stride, groups=hidden))
        layers.append(conv_norm_act(hidden, cout, norm, kernel_size=1, padding=0, act=False))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    def __init__(self, input_shape, num_classes: int, norm: str, width: float = 1.0) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be positive, got {width}")
        cin = make_divisible(32 * width)
        last = make_divisible(1280 * max(1.0, width))
        self.stem = conv_norm_act(input_shape[0], cin, norm)
        blocks: list[nn.Module] = []
        for t, c, n, s in MOBILENETV2_CIFAR_CFG:
            cout = make_divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, norm))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.final = conv_norm_act(cin, last, norm, kernel_size=1, padding=0)
        self.head = nn.Linear(last, num_classes)
        init_convs_kaiming(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final(self.blocks(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


@register_model("mobilenetv2", default_input_shape=(3, 32, 32),
                description="MobileNetV2 (CIFAR variant); width multiplier")
def mobilenetv2(input_shape, num_classes, norm="evonorm", width: float = 1.0) -> nn.Module:
    """MobileNetV2 for 32x32 inputs; channels scaled by ``width`` (rounded to multiples of 8).

    Downsamples by 8 overall, so inputs must be at least 8x8.
    """
    check_min_size("mobilenetv2", input_shape, 8, "three stride-2 stages")
    return MobileNetV2(input_shape, num_classes, norm, width)
