"""CIFAR ResNet-20 (He et al., 2016, Sec. 4.2): 3 stages x 3 basic blocks, 16/32/64 channels."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norms import norm_act
from .registry import check_min_size, register_model
from .small import conv_norm_act, init_convs_kaiming

__all__ = ["BasicBlock", "CifarResNet"]


class BasicBlock(nn.Module):
    """conv3x3 -> norm/act -> conv3x3 -> norm (no act) -> + shortcut -> ReLU.

    Shortcut when the shape changes:
    ``"A"`` (default, as in the CIFAR ResNet paper): parameter-free, spatial subsampling
    ``x[:, :, ::s, ::s]`` and zero-padding of the new channels;
    ``"B"``: 1x1 strided conv + norm (no act).
    """

    def __init__(self, cin: int, cout: int, stride: int, norm: str, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = conv_norm_act(cin, cout, norm, stride=stride)
        self.conv2 = conv_norm_act(cout, cout, norm, act=False)
        self.stride = stride
        self.pad = (0, 0)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            if shortcut == "A":
                if cout < cin:
                    raise ValueError("option-A shortcut cannot reduce the channel count")
                front = (cout - cin) // 2
                self.pad = (front, cout - cin - front)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=(norm == "none")),
                    norm_act(norm, cout, act=False),
                )
        self.use_a = self.shortcut is None and (stride != 1 or cin != cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        if self.shortcut is not None:
            sc = self.shortcut(x)
        elif self.use_a:
            sc = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, *self.pad))
        else:
            sc = x
        return F.relu(out + sc)


class CifarResNet(nn.Module):
    """conv3x3(16) -> 3 stages of ``n`` basic blocks (stride 1, 2, 2) -> global avg pool -> fc."""

    def __init__(self, input_shape, num_classes: int, norm: str, blocks_per_stage: int = 3,
                 widths: Sequence[int] = (16, 32, 64), shortcut: str = "A") -> None:
        super().__init__()
        shortcut = str(shortcut).upper()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if len(widths) != 3:
            raise ValueError(f"widths must have 3 entries, got {tuple(widths)}")
        c = input_shape[0]
        self.stem = conv_norm_act(c, int(widths[0]), norm)
        blocks: list[nn.Module] = []
        cin = int(widths[0])
        for i, wd in enumerate(int(x) for x in widths):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, wd, stride, norm, shortcut))
                cin = wd
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)
        init_convs_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


@register_model("resnet20", default_input_shape=(3, 32, 32),
                description="CIFAR ResNet-20 (3x3 basic blocks, 16/32/64), option-A shortcut")
def resnet20(input_shape, num_classes, norm="evonorm", shortcut: str = "A",
             widths: Sequence[int] = (16, 32, 64)) -> nn.Module:
    """ResNet-20; ``shortcut="A"`` (zero-pad identity, default) or ``"B"`` (1x1 conv).

    Downsamples by 4 overall, so inputs must be at least 4x4.
    """
    check_min_size("resnet20", input_shape, 4, "two stride-2 stages")
    return CifarResNet(input_shape, num_classes, norm, 3, widths, shortcut)
