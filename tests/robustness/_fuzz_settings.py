"""Shared settings of the robustness suite.

Fuzzing is bounded and deterministic on CI (`FUZZ`: 60 examples per property, a fixed derandomised
sequence, no deadline). For a deeper local run: CROSSGRAD_FUZZ_EXAMPLES=2000 pytest tests/robustness
(then the examples are random, and a failure is printed with the input that reproduces it).
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_DEEP = "CROSSGRAD_FUZZ_EXAMPLES" in os.environ

FUZZ = settings(
    max_examples=int(os.environ.get("CROSSGRAD_FUZZ_EXAMPLES", 60)),
    deadline=None,
    derandomize=not _DEEP,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
