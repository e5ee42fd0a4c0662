"""D-PSGD with gamma-gossip; with Nesterov momentum it is DSGDm-N, with qgm=True it is QGM."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from crossgrad.algorithms.base import Algorithm


@dataclass
class DSGD(Algorithm):
    """Each agent steps along its own gradient at its gossiped model (g~ = g_ii)."""

    name: ClassVar[str] = "dsgd"
    local_steps_refusal: ClassVar[str | None] = None  # Local-DSGD: H local steps, then one gossip
