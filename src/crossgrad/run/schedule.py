"""The schedules of a run: the learning rate (warm-up, then constant, multistep or cosine) and the averaging rate."""
from __future__ import annotations

import math
from collections.abc import Sized
from fractions import Fraction

from crossgrad.run.config import Config


def run_length(cfg: Config, shards: list[Sized]) -> tuple[int, int]:
    """(steps per epoch, steps in all): an epoch is one pass over the largest shard; training.steps wins."""
    per_epoch = max(1, math.ceil(max(len(s) for s in shards) / cfg.training.batch_size))
    tr = cfg.training
    return per_epoch, tr.steps if tr.steps is not None else tr.epochs * per_epoch


def milestone_steps(cfg: Config, total: int) -> list[int]:
    """The first step (0-based) of each of the multistep schedule's drops in a run of `total` steps.

    A milestone f falls at floor(f * total), with f read as the decimal the config wrote (0.29 is 29/100,
    not the double below it, whose product with 100 floors to 28): a run of E epochs whose f * E is whole
    drops at the start of epoch f * E, as an epoch-wise MultiStepLR at that epoch does. The default
    [0.5, 0.75] is total // 2 and (3 * total) // 4, as before the milestones could be set.
    """
    fractions = cfg.training.lr_milestones
    if fractions is None:
        return [total // 2, (3 * total) // 4]
    return [math.floor(Fraction(repr(f)) * total) for f in fractions]


def lr_at(cfg: Config, step: int, total: int) -> float:
    """Learning rate of step `step` (0-based) out of `total`: warm-up, then the schedule."""
    base, tr = cfg.algorithm.params["lr"], cfg.training
    if tr.warmup_steps and step < tr.warmup_steps:
        return base * (step + 1) / tr.warmup_steps
    if tr.lr_schedule == "multistep":
        decay = 0.1 if tr.lr_decay is None else tr.lr_decay
        return base * (decay ** sum(step >= m for m in milestone_steps(cfg, total)))
    if tr.lr_schedule == "cosine":
        span = max(total - tr.warmup_steps, 1)
        t = min(max(step - tr.warmup_steps, 0), span - 1)
        return max(base * 0.5 * (1 + math.cos(math.pi * t / span)), base * 1e-6)
    return base


def gamma_at(params: dict, epoch: int, epochs: int) -> float:
    """Averaging rate in epoch `epoch` (0-based) of `epochs`, from the algorithm's resolved hyperparameters.

    "exponential" is ARS's (Aketi et al., ICLR 2024 Tiny Papers): min(1, gamma * growth ** (epoch + 1));
    "cosine" rises from gamma in the first epoch to 1 in the last along half a cosine.
    """
    gamma, schedule = params["gamma"], params.get("gamma_schedule", "constant")
    if schedule == "exponential":
        return min(1.0, gamma * params["gamma_growth"] ** (epoch + 1))
    if schedule == "cosine":
        span = max(epochs - 1, 1)
        return 1 - (1 - gamma) * 0.5 * (1 + math.cos(math.pi * min(epoch, span) / span))
    return gamma
