"""In-process backend: all n agents live in one process and messages are delivered by indexing."""
from __future__ import annotations

import torch
from torch import Tensor

from crossgrad.codecs import Payload
from crossgrad.comm.base import EdgePlan, count_round1, count_round2


class LocalComm:
    def __init__(self, edges: list[tuple[int, int]], n: int, device: torch.device | str = "cpu"):
        self.plan = EdgePlan.build(edges, n, list(range(n)))
        self.bytes_sent = torch.zeros(n, 2, dtype=torch.float64, device="cpu")
        in_index = {
            (int(s), int(d)): e for e, (s, d) in enumerate(zip(self.plan.in_src, self.plan.in_dst))
        }
        # Out-edge (j -> i) carries back the message that in-edge (j -> i) produced at i.
        self._back = torch.tensor(
            [in_index[(int(s), int(d))] for s, d in zip(self.plan.out_src, self.plan.out_dst)],
            dtype=torch.long,
            device=device,
        )
        self._src = self.plan.in_src.to(device)

    def exchange(self, x: Tensor) -> Tensor:
        count_round1(self, x)
        return x.index_select(0, self._src)

    def exchange_edges(self, payload: Payload) -> Payload:
        count_round2(self, payload)
        return tuple(t.index_select(0, self._back) for t in payload)
