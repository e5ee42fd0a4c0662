"""Normalisation and batch-level augmentation on tensors, driven by a seeded torch.Generator."""
from __future__ import annotations

import torch
from torch import Tensor

# per-channel mean and std on the [0, 1] scale (standard values for the public sets)
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenette": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's, as Imagenette code uses
    "synthetic": ((0.0,), (1.0,)),
}


def dataset_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for a dataset; computed from the train split for `digits`."""
    key = name.lower().replace("-", "_")
    if key == "digits" and key not in _STATS:
        from crossgrad.data.datasets import load_dataset

        x = load_dataset("digits")[0].x.float() / 255
        _STATS[key] = ((float(x.mean()),), (float(x.std()),))
    if key not in _STATS:
        raise ValueError(f"no normalisation statistics for dataset {name!r}")
    return _STATS[key]


def normalize(x: Tensor, stats: tuple[tuple[float, ...], tuple[float, ...]]) -> Tensor:
    """uint8 images are scaled to [0, 1] first; then (x - mean) / std per channel, as float32."""
    mean, std = stats
    xf = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (xf - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by `padding` and crop back to the input size at a random offset per image."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_hflip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class Augment:
    """Random crop with padding, then horizontal flip; the same generator state gives the same batch."""

    def __init__(self, crop_padding: int = 4, hflip: bool = True):
        self.crop_padding, self.hflip = crop_padding, hflip

    @classmethod
    def for_dataset(cls, name: str) -> Augment:
        """Crop + flip for natural images (CIFAR-10/100, Imagenette); a small crop only for digits, never a flip."""
        if name.lower().replace("-", "") in ("cifar10", "cifar100", "imagenette"):
            return cls(4, True)
        return cls(2, False)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        x = random_crop(x, self.crop_padding, generator)
        return random_hflip(x, generator) if self.hflip else x

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, hflip={self.hflip})"
