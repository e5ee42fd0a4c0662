"""VGG-11 for 32x32 inputs (CIFAR style)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import check_min_size, register_model
from .small import conv_norm_act, init_convs_kaiming

__all__ = ["VGG", "VGG11_CFG"]

# Numbers are conv3x3 output widths, "M" a 2x2 max-pool (configuration "A" of Simonyan & Zisserman).
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _scaled(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class VGG(nn.Module):
    """VGG feature extractor (conv3x3 pad 1 -> norm/act, max-pools) + one linear classifier.

    As in the usual CIFAR adaptations, the three 4096-wide FC layers of ImageNet VGG are
    replaced by a single ``Linear(512 * width * h * w, num_classes)``, where ``h x w`` is the
    final feature map (1x1 for 32x32 inputs).
    """

    def __init__(self, cfg, input_shape, num_classes: int, norm: str, width: float = 1.0, name="vgg"):
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be positive, got {width}")
        c, h, w = input_shape
        n_pool = sum(1 for v in cfg if v == "M")
        check_min_size(name, input_shape, 2**n_pool, f"{n_pool} 2x2 max-pools")
        layers: list[nn.Module] = []
        cin = c
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = _scaled(int(v), width)
                layers.append(conv_norm_act(cin, cout, norm))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin * (h >> n_pool) * (w >> n_pool), num_classes)
        init_convs_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@register_model("vgg11", default_input_shape=(3, 32, 32),
                description="VGG-11 (CIFAR), single linear classifier; width multiplier")
def vgg11(input_shape, num_classes, norm="evonorm", width: float = 1.0) -> nn.Module:
    """VGG-11; channel widths are ``round(c * width)``; inputs of at least 32x32."""
    return VGG(VGG11_CFG, input_shape, num_classes, norm, width, name="vgg11")
