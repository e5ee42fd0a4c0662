"""Algorithm registry: `make_algorithm("ngc", lr=0.1, alpha=1.0)`."""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from crossgrad.algorithms.base import Algorithm, CombineContext, ConfigError, combine_weights
from crossgrad.algorithms.cga import CGA, CompCGA
from crossgrad.algorithms.dsgd import DSGD
from crossgrad.algorithms.ngc import NGC, CompNGC

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    ALGORITHMS[cls.name] = cls
    return cls


for _cls in (DSGD, NGC, CompNGC, CGA, CompCGA):
    register_algorithm(_cls)


def make_algorithm(name: str, **kwargs: Any) -> Algorithm:
    """Build a registered algorithm; unknown names or options raise ConfigError listing what exists."""
    try:
        cls = ALGORITHMS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown algorithm {name!r}; available: {', '.join(sorted(ALGORITHMS))}") from None
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(f"{name} does not take {', '.join(unknown)}; its options: {', '.join(sorted(allowed))}")
    return cls(**kwargs)


__all__ = [
    "ALGORITHMS", "Algorithm", "CGA", "CombineContext", "CompCGA", "CompNGC", "ConfigError", "DSGD", "NGC",
    "combine_weights", "make_algorithm", "register_algorithm",
]
