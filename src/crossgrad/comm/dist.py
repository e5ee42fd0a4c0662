"""torch.distributed backend: one agent per rank, point-to-point along graph edges only.

Every round is symmetric and fully batched: each rank posts all its sends and receives of the
round together (`batch_isend_irecv`), then waits on them against one deadline. A peer that dies
or hangs makes the others raise `CommTimeoutError` naming it and the round, instead of hanging.

Message order: between two ranks the messages of a step go in a fixed order (round 1, then
round 2), and both ranks post them in the same order, so point-to-point FIFO matching pairs every
send with the right receive even on directed and irregular graphs.

Blame: a rank whose round fails publishes its failure in the process group's key-value store
before it gives up, and reads what the peers it waited for published. A peer that published a
failure of its own (it waited for someone else) is not the cause: the message says the cause is
further away and quotes the peer. A peer that published nothing is the culprit: silent (time-out)
or gone (its connection closed without a word).

Waiting: on gloo, `Work.wait(timeout)` blocks with a real time-out. On NCCL `wait()` only orders
the CUDA stream and never times out on the host, so the rank polls `Work.is_completed()` against
the deadline instead, and on failure aborts the communicator so that the process can exit.
"""
from __future__ import annotations

import contextlib
import json
import re
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from crossgrad.codecs import Payload
from crossgrad.comm.base import EdgePlan, count_round1, count_round2

ROUND1 = "round 1 (models)"
ROUND2 = "round 2 (cross-gradients)"


def _describe(error: BaseException, timeout: float) -> str:
    """The backend's message, without its source path and advice: 'connection closed by peer' and the like."""
    msg = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "imeout" in msg or "imed out" in msg:
        return f"no answer within {timeout:g} s"
    msg = re.sub(r"^\[[^\]]*\]\s*", "", msg)
    return msg.split(". This is typically")[0]


_FAILED = "crossgrad/failed/{}"  # store key of a rank's published failure


def _store():
    """The default process group's key-value store, or None (blame is best effort)."""
    with contextlib.suppress(Exception):
        return dist.distributed_c10d._get_default_store()
    return None


def _publish(rank: int, peers: list[int], message: str) -> None:
    """Tell the others that `rank` failed waiting for `peers`."""
    store = _store()
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(_FAILED.format(rank), json.dumps({"peers": peers, "message": message}))


def _read(rank: int) -> dict | None:
    """The failure `rank` published, if any."""
    store = _store()
    with contextlib.suppress(Exception):
        if store is not None and store.check([_FAILED.format(rank)]):
            return json.loads(store.get(_FAILED.format(rank)))
    return None


def _reports(peers: list[int], wait: float) -> dict[int, dict]:
    """The failures `peers` published, waiting up to `wait` seconds for ones still to come."""
    found: dict[int, dict] = {}
    deadline = time.monotonic() + wait
    while True:
        for p in peers:
            report = None if p in found else _read(p)
            if report is not None:
                found[p] = report
        if len(found) == len(peers) or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def _first_failure(start: int, report: dict) -> str:
    """Follow published failures from agent `start` away from us to the first one: the agent whose
    own peers published nothing (or only blame it back)."""
    seen, current = {start}, start
    while True:
        step = None
        for q in report["peers"]:
            theirs = None if q in seen else _read(q)
            if theirs is not None and theirs["peers"] != [current]:
                step = q, theirs
                break
        if step is None:
            return report["message"]
        current, report = step
        seen.add(current)


def _blame(rank: int, peers: list[int], detail: str, reports: dict[int, dict]) -> str:
    """Why the round with `peers` failed: a silent or vanished peer, or a failure further away."""
    timed_out = detail.startswith("no answer")
    parts = []
    for p in peers:
        report = reports.get(p)
        if report is not None and report["peers"] != [rank]:  # it failed waiting for someone else
            parts.append(f"agent {p} stopped after its own failure, so the cause is further away "
                         f"(first failure: {_first_failure(p, report)})")
        elif timed_out:
            parts.append(f"agent {p} is silent: {detail}")
        else:
            parts.append(f"agent {p} closed its connection without reporting a failure (it exited or crashed): "
                         f"{detail}")
    return "; ".join(parts) or detail


class CommTimeoutError(RuntimeError):
    """A peer did not complete a round in time (or its connection failed).

    `rank`: the agent reporting; `peers`: the agents it was waiting for; `round_name`: which round.
    """

    def __init__(self, rank: int, peers: list[int], round_name: str, detail: str):
        who = ", ".join(map(str, peers)) or "unknown"
        super().__init__(f"agent {rank}: {round_name} with peer(s) {who} failed: {detail}")
        self.rank, self.peers, self.round_name, self.detail = rank, peers, round_name, detail

    def __reduce__(self):  # picklable across processes
        return (type(self), (self.rank, self.peers, self.round_name, self.detail))


class DistComm:
    """The `Comm` of the rank's own agent (rank r = agent r) on an initialised process group.

    `timeout` (seconds) bounds each round: the time from posting its messages until all of them
    have completed. After a failed round the object refuses further rounds (the peers' message
    streams are out of step); restart the run.
    """

    def __init__(self, edges: list[tuple[int, int]], n: int, timeout: float = 60.0,
                 device: torch.device | str = "cpu"):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call crossgrad.distributed.init_from_env()")
        world = dist.get_world_size()
        if world != n:
            raise ValueError(f"the topology has {n} agents but the process group has {world} ranks; "
                             "launch one process per agent")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.rank = dist.get_rank()
        self.plan = EdgePlan.build(edges, n, [self.rank])
        self.bytes_sent = torch.zeros(1, 2, dtype=torch.float64)
        self.timeout = float(timeout)
        self.device = torch.device(device)
        self._in_peers = self.plan.in_src.tolist()  # agents whose models we receive
        self._out_peers = self.plan.out_dst.tolist()  # agents that receive our model
        self._poll = dist.get_backend() == "nccl"
        self._failed: CommTimeoutError | None = None

    def exchange(self, x: Tensor) -> Tensor:
        """Round 1: send our row to every out-neighbour, receive one row per in-edge (in-edge order)."""
        count_round1(self, x)
        row = x[0].contiguous()
        received = torch.empty(len(self._in_peers), x.shape[1], dtype=x.dtype, device=x.device)
        ops = [(dist.isend, row, j) for j in self._out_peers]
        ops += [(dist.irecv, received[e], j) for e, j in enumerate(self._in_peers)]
        self._run(ops, ROUND1)
        return received

    def exchange_edges(self, payload: Payload) -> Payload:
        """Round 2: row e of every payload tensor goes back to in-edge e's source; one row per out-edge returns.

        Receive buffers take their row shapes and dtypes from the local payload: every agent has the
        same model, so every message of the round has the same tensors (e.g. packed sign bits and
        float32 scales, or one float row when uncompressed).
        """
        count_round2(self, payload)
        received = tuple(
            torch.empty((len(self._out_peers), *t.shape[1:]), dtype=t.dtype, device=t.device) for t in payload
        )
        ops = []
        for e, j in enumerate(self._in_peers):  # the cross-gradient made with j's model goes back to j
            ops += [(dist.isend, t[e].contiguous(), j) for t in payload]
        for e, j in enumerate(self._out_peers):
            ops += [(dist.irecv, r[e], j) for r in received]
        self._run(ops, ROUND2)
        return received

    # -- posting and waiting -------------------------------------------------------------------

    def _run(self, ops: list[tuple], round_name: str) -> None:
        if self._failed is not None:
            raise CommTimeoutError(self.rank, self._failed.peers, round_name,
                                   f"an earlier round failed ({self._failed})")
        if not ops:
            return
        p2p = [dist.P2POp(op, tensor, peer) for op, tensor, peer in ops]
        try:
            works = dist.batch_isend_irecv(p2p)
        except RuntimeError as e:  # a connection already known to be closed
            self._fail(sorted({p for _, _, p in ops}), round_name, _describe(e, self.timeout))
        deadline = time.monotonic() + self.timeout
        peers: list = [[p] for _, _, p in ops]
        if len(works) != len(ops):  # coalesced (NCCL: one work for the whole batch): blame the round's peers
            peers = [sorted({p for _, _, p in ops})] * len(works)
        failed, detail = self._poll_works(works, peers, deadline) if self._poll else \
            self._wait_works(works, peers, deadline)
        if failed:
            self._fail(sorted({p for group in failed for p in group}), round_name, detail)

    def _wait_works(self, works: list, peers: list[list[int]], deadline: float) -> tuple[list, str]:
        """gloo: block on each work with what is left of the deadline."""
        failed: list[list[int]] = []
        detail = ""
        for work, peer in zip(works, peers):
            left = max(deadline - time.monotonic(), 1e-3)  # past the deadline: still collect finished ones
            try:
                if not work.wait(timeout=timedelta(seconds=left)):
                    failed.append(peer)
                    detail = detail or f"no answer within {self.timeout:g} s"
            except RuntimeError as e:  # gloo raises on a time-out and on a closed connection
                failed.append(peer)
                detail = detail or _describe(e, self.timeout)
        return failed, detail

    def _poll_works(self, works: list, peers: list[list[int]], deadline: float) -> tuple[list, str]:
        """NCCL: poll completion on the host (wait() would not time out), then order the stream."""
        pending = list(range(len(works)))
        spin = 0
        while pending:
            try:
                pending = [k for k in pending if not works[k].is_completed()]
            except RuntimeError as e:  # the communicator reported an error
                return [peers[k] for k in pending], _describe(e, self.timeout)
            if not pending:
                break
            if time.monotonic() > deadline:
                return [peers[k] for k in pending], f"no answer within {self.timeout:g} s"
            spin += 1
            time.sleep(0 if spin < 1000 else 1e-4)
        failed: list[list[int]] = []
        detail = ""
        for work, peer in zip(works, peers):
            try:
                work.wait()
            except RuntimeError as e:
                failed.append(peer)
                detail = detail or _describe(e, self.timeout)
        return failed, detail

    def _fail(self, peers: list[int], round_name: str, detail: str) -> None:
        _publish(self.rank, peers, str(CommTimeoutError(self.rank, peers, round_name, detail)))
        # a peer that failed further away publishes about when our own time-out fires: give it a moment
        grace = min(0.25 * self.timeout, 2.0) if detail.startswith("no answer") else 0.2
        detail = _blame(self.rank, peers, detail, _reports(peers, grace))
        error = CommTimeoutError(self.rank, peers, round_name, detail)
        self._failed = error
        if self._poll:  # NCCL: pending kernels would block the process at exit; abort the communicator
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None:
                with contextlib.suppress(Exception):  # best effort: the error below is what matters
                    abort()
        raise error from None
