"""Heterogeneous quadratics f_i(x) = 1/2 ||x - c_i||^2, the suite's test of exactness: the mean objective's
optimum is mean(c), which exact methods reach at a constant lr and DSGD misses by a bias."""
from __future__ import annotations

import torch
from torch import nn


class Point(nn.Module):
    """A 'model' whose parameter is the point x itself: its output is x for every input row."""

    def __init__(self, d: int):
        super().__init__()
        self.x = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.x.expand(len(inputs), -1)


def half_squared_distance(out: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - c) ** 2).sum(1).mean()
