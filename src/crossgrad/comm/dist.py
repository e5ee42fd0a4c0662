"""torch.distributed backend: one agent per rank, point-to-point along graph edges only.

Every round is symmetric and fully batched: each rank posts all its sends and receives of the
round together (`batch_isend_irecv`), then waits on them against one deadline. A peer that dies
or hangs makes the others raise `CommTimeoutError` naming it, instead of hanging.
"""
from __future__ import annotations

import re
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from crossgrad.comm.base import EdgePlan, count_round1, count_round2
from crossgrad.compress import Payload


def _describe(error: Exception, timeout: float) -> str:
    """gloo's message, without its source path and advice: 'connection closed by peer' and the like."""
    msg = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "imeout" in msg or "imed out" in msg:
        return f"no answer within {timeout:g} s"
    msg = re.sub(r"^\[[^\]]*\]\s*", "", msg)
    return msg.split(". This is typically")[0]


class CommTimeoutError(RuntimeError):
    """A peer did not complete a round in time (or its connection failed)."""

    def __init__(self, rank: int, peers: list[int], round_name: str, detail: str):
        who = ", ".join(map(str, peers)) or "unknown"
        super().__init__(f"agent {rank}: {round_name} with peer(s) {who} failed: {detail}")
        self.rank, self.peers, self.round_name = rank, peers, round_name


class DistComm:
    """The `Comm` of the rank's own agent (rank r = agent r) on an initialised process group."""

    def __init__(self, edges: list[tuple[int, int]], n: int, timeout: float = 60.0,
                 device: torch.device | str = "cpu"):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call crossgrad.distributed.init_from_env()")
        world = dist.get_world_size()
        if world != n:
            raise ValueError(f"the topology has {n} agents but the process group has {world} ranks; "
                             "launch one process per agent")
        self.rank = dist.get_rank()
        self.plan = EdgePlan.build(edges, n, [self.rank])
        self.bytes_sent = torch.zeros(1, 2, dtype=torch.float64)
        self.timeout = float(timeout)
        self.device = torch.device(device)
        self._in_peers = self.plan.in_src.tolist()  # agents whose models we receive
        self._out_peers = self.plan.out_dst.tolist()  # agents that receive our model

    def exchange(self, x: Tensor) -> Tensor:
        count_round1(self, x)
        row = x[0].contiguous()
        received = torch.empty(len(self._in_peers), x.shape[1], dtype=x.dtype, device=x.device)
        ops = [(dist.isend, row, j) for j in self._out_peers]
        ops += [(dist.irecv, received[e], j) for e, j in enumerate(self._in_peers)]
        self._run(ops, "round 1 (models)")
        return received

    def exchange_edges(self, payload: Payload) -> Payload:
        count_round2(self, payload)
        received = tuple(
            torch.empty((len(self._out_peers), *t.shape[1:]), dtype=t.dtype, device=t.device) for t in payload
        )
        ops = []
        for e, j in enumerate(self._in_peers):  # the cross-gradient made with j's model goes back to j
            ops += [(dist.isend, t[e].contiguous(), j) for t in payload]
        for e, j in enumerate(self._out_peers):
            ops += [(dist.irecv, r[e], j) for r in received]
        self._run(ops, "round 2 (cross-gradients)")
        return received

    def _run(self, ops: list[tuple], round_name: str) -> None:
        if not ops:
            return
        p2p = [dist.P2POp(op, tensor, peer) for op, tensor, peer in ops]
        try:
            works = dist.batch_isend_irecv(p2p)
        except RuntimeError as e:
            raise CommTimeoutError(self.rank, sorted({p for _, _, p in ops}), round_name, str(e)) from None
        deadline = time.monotonic() + self.timeout
        failed: list[int] = []
        detail = ""
        for work, (_, _, peer) in zip(works, ops):
            left = max(deadline - time.monotonic(), 1e-3)  # past the deadline: still collect finished ones
            try:
                if not work.wait(timeout=timedelta(seconds=left)):
                    failed.append(peer)
                    detail = detail or f"no answer within {self.timeout:g} s"
            except RuntimeError as e:  # gloo raises on timeout and on a closed connection
                failed.append(peer)
                detail = detail or _describe(e, self.timeout)
        if failed:
            raise CommTimeoutError(self.rank, sorted(set(failed)), round_name, detail)
