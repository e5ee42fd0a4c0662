"""In-process backend: all n agents live in one process and messages are delivered by indexing.

It is a `SharedMemoryComm`: the engine reads neighbours' rows in place instead of calling `exchange`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from crossgrad.codecs import Payload
from crossgrad.comm.base import EdgePlan, count_round1, count_round1_payload, count_round2


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
        #: in-edge e's round-1 row is x[sources[e]] (every agent is local, so global = local index)
        self.sources = self.plan.in_src.to(device)
        self._buffers: dict[int, Tensor] = {}

    def restrict(self, edges: list[tuple[int, int]]) -> LocalComm:
        sub = LocalComm(edges, self.plan.n, device=self.sources.device)
        sub.bytes_sent = self.bytes_sent
        return sub

    def exchange(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Round 1 as a copy (what a backend without shared memory receives): every agent is local, so the
        pool is all of x."""
        count_round1(self, x)
        return x.clone(), self.sources

    def share(self, x: Tensor) -> Tensor:
        count_round1(self, x)
        return x

    def exchange_payload(self, payload: Payload) -> tuple[Payload, Tensor]:
        """Round 1 of a per-agent payload: every agent is local, so the pool is the payload itself."""
        count_round1_payload(self, payload)
        return payload, self.sources

    def global_mean(self, rows: Tensor) -> Tensor:
        return rows.sum(0, keepdim=True).div_(self.plan.n)

    def share_edges(self, payload: Payload) -> Tensor:
        count_round2(self, payload)
        return self._back

    def exchange_edges(self, payload: Payload) -> Payload:
        """Round 2 by indexing, into buffers kept from the previous step (valid until the next call)."""
        count_round2(self, payload)
        return tuple(torch.index_select(t, 0, self._back, out=self._buffer(k, t)) for k, t in enumerate(payload))

    def _buffer(self, k: int, like: Tensor) -> Tensor:
        # a fresh multi-MB block per step costs page faults comparable to the copy itself
        shape = (len(self._back), *like.shape[1:])
        buf = self._buffers.get(k)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[k] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf
