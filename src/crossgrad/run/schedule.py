"""The learning-rate schedule: warm-up, then constant, multistep or cosine."""
from __future__ import annotations

import math

from crossgrad.run.config import Config


def lr_at(cfg: Config, step: int, total: int) -> float:
    """Learning rate of step `step` (0-based) out of `total`: warm-up, then the schedule."""
    base, tr = cfg.algorithm.params["lr"], cfg.training
    if tr.warmup_steps and step < tr.warmup_steps:
        return base * (step + 1) / tr.warmup_steps
    if tr.lr_schedule == "multistep":
        return base * (0.1 ** ((step >= total // 2) + (step >= (3 * total) // 4)))
    if tr.lr_schedule == "cosine":
        span = max(total - tr.warmup_steps, 1)
        t = min(max(step - tr.warmup_steps, 0), span - 1)
        return max(base * 0.5 * (1 + math.cos(math.pi * t / span)), base * 1e-6)
    return base
