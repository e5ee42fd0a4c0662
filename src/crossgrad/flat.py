"""Flat parameter layout: every agent's parameters are one row of an [n, P] buffer.

Keeping parameters flat makes gossip a single matrix product and the optimizer update a
handful of fused tensor ops; the layout records where each parameter tensor lives in a row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of a model's parameters inside one flat row."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        names, shapes, offsets, numels = [], [], [], []
        off = 0
        for name, p in model.named_parameters():
            names.append(name)
            shapes.append(p.shape)
            offsets.append(off)
            numels.append(p.numel())
            off += p.numel()
        if not names:
            raise ValueError("the model has no parameters to train")
        return cls(tuple(names), tuple(shapes), tuple(offsets), tuple(numels))

    @property
    def size(self) -> int:
        """P, the number of scalars in one flat row."""
        return self.offsets[-1] + self.numels[-1]

    @property
    def num_tensors(self) -> int:
        return len(self.names)

    def slices(self) -> list[slice]:
        return [slice(o, o + k) for o, k in zip(self.offsets, self.numels)]

    def flatten(self, model: nn.Module) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def views(self, row: Tensor) -> list[Tensor]:
        """Views of one flat row shaped like the model's parameters (no copies)."""
        return [row[s].view(shape) for s, shape in zip(self.slices(), self.shapes)]
