"""Algorithm registry: `make_algorithm("ngc", lr=0.1, alpha=1.0)`, `algorithm_options("ngc")`."""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from crossgrad.algorithms.base import (
    Algorithm,
    AlgorithmState,
    CombineContext,
    ConfigError,
    CrossGradientAlgorithm,
    NoState,
    StepView,
    combine_weights,
)
from crossgrad.algorithms.cga import CGA, CGAState, CompCGA
from crossgrad.algorithms.choco import Choco, ChocoState
from crossgrad.algorithms.d2 import D2, D2State
from crossgrad.algorithms.decentlam import DecentLaM, DecentLaMState
from crossgrad.algorithms.dsgd import DSGD
from crossgrad.algorithms.gut import GUT, GUTState
from crossgrad.algorithms.momentum_tracking import MomentumTracking, MomentumTrackingState
from crossgrad.algorithms.ngc import NGC, CompNGC
from crossgrad.algorithms.relay import RelaySGD, RelayState
from crossgrad.algorithms.sgp import SGP, PushSumState
from crossgrad.algorithms.tracking import GT, TrackingState

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    ALGORITHMS[cls.name] = cls
    return cls


for _cls in (DSGD, NGC, CompNGC, CGA, CompCGA, GT, D2, Choco, SGP, GUT, MomentumTracking, DecentLaM, RelaySGD):
    register_algorithm(_cls)


def _lookup(name: str) -> type[Algorithm]:
    try:
        return ALGORITHMS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown algorithm {name!r}; available: {', '.join(sorted(ALGORITHMS))}") from None


def algorithm_options(name: str) -> dict[str, Any]:
    """A registered algorithm's hyperparameters and their defaults, in declaration order."""
    return {f.name: f.default for f in fields(_lookup(name))}


def make_algorithm(name: str, **kwargs: Any) -> Algorithm:
    """Build a registered algorithm; unknown names or options raise ConfigError listing what exists."""
    cls = _lookup(name)
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        why = " (it exchanges no cross-gradients to compress)" if "codec" in unknown and not cls.cross_gradients else ""
        raise ConfigError(f"{name} does not take {', '.join(unknown)}{why}; its options: {', '.join(sorted(allowed))}")
    return cls(**kwargs)


__all__ = [
    "ALGORITHMS", "Algorithm", "AlgorithmState", "CGA", "CGAState", "Choco", "ChocoState", "CombineContext",
    "CompCGA", "CompNGC", "ConfigError", "CrossGradientAlgorithm", "D2", "D2State", "DSGD", "DecentLaM",
    "DecentLaMState", "GT", "GUT", "GUTState", "MomentumTracking", "MomentumTrackingState", "NGC", "NoState",
    "PushSumState", "RelaySGD", "RelayState", "SGP", "StepView", "TrackingState", "algorithm_options",
    "combine_weights", "make_algorithm", "register_algorithm",
]
