"""torch.distributed backend: each rank holds a contiguous block of agents; point-to-point between ranks.

Agents are placed in contiguous blocks over the ranks (`agent_blocks`: uneven when the ranks do
not divide the agents; one agent per rank is the special case rank r = agent r). Edges between two
agents of one rank are served in memory. Everything a rank sends to one peer rank in a round goes
as **one message**: round 1 the rows of its agents that the peer's agents receive, round 2 the
cross-gradients bound for the peer's agents (several payload tensors, e.g. packed sign bits and
float32 scales, travel as the bytes of one buffer). So the per-step message count grows with the
number of peer ranks, not with the number of agents.

Every round is symmetric and fully batched: each rank posts all its sends and receives of the
round together (`batch_isend_irecv`), then waits on them against one deadline. A peer that dies
or hangs makes the others raise `CommTimeoutError` naming it and the round, instead of hanging.

Message order: between two ranks a step sends at most one message each way per round, in a fixed
order (round 1, then round 2), and the rows inside a message are in an order both ranks derive
from the edge list, so point-to-point FIFO matching pairs every send with the right receive even
on directed and irregular graphs.

Blame: a rank whose round fails publishes its failure in the process group's key-value store
before it gives up, and reads what the peers it waited for published. A peer that published a
failure of its own (it waited for someone else) is not the cause: the message says the cause is
further away and quotes the peer. A peer that published nothing is the culprit: silent (time-out)
or gone (its connection closed without a word). Ranks are named by their agents: "agent r" with
one agent per rank, "rank r (agents a-b)" otherwise.

Waiting: on gloo, `Work.wait(timeout)` blocks with a real time-out. On NCCL `wait()` only orders
the CUDA stream and never times out on the host, so the rank polls `Work.is_completed()` against
the deadline instead, and on failure aborts the communicator so that the process can exit.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from crossgrad.codecs import Payload
from crossgrad.comm.base import EdgePlan, agent_blocks, count_round1, count_round1_payload, count_round2

ROUND1 = "round 1 (models)"
ROUND2 = "round 2 (cross-gradients)"
GLOBAL = "global average (all-gather)"

Spans = tuple[tuple[int, int], ...]  # (first agent, one past the last) of every rank's block


def label(rank: int, spans: Spans | None = None) -> str:
    """How messages name a rank: by its agent with one agent per rank, else by rank and agents."""
    if spans is None or len(spans) == spans[-1][1]:
        return f"agent {rank}"
    a, b = spans[rank]
    return f"rank {rank} (agent {a})" if b - a == 1 else f"rank {rank} (agents {a}-{b - 1})"


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
    """Follow published failures from rank `start` away from us to the first one: the rank whose
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


def _blame(rank: int, peers: list[int], detail: str, reports: dict[int, dict], spans: Spans | None) -> str:
    """Why the round with `peers` failed: a silent or vanished peer, or a failure further away."""
    timed_out = detail.startswith("no answer")
    parts = []
    for p in peers:
        report, who = reports.get(p), label(p, spans)
        if report is not None and report["peers"] != [rank]:  # it failed waiting for someone else
            parts.append(f"{who} stopped after its own failure, so the cause is further away "
                         f"(first failure: {_first_failure(p, report)})")
        elif timed_out:
            parts.append(f"{who} is silent: {detail}")
        else:
            parts.append(f"{who} closed its connection without reporting a failure (it exited or crashed): "
                         f"{detail}")
    return "; ".join(parts) or detail


class CommTimeoutError(RuntimeError):
    """A peer did not complete a round in time (or its connection failed).

    `rank`: the rank reporting; `peers`: the ranks it was waiting for; `round_name`: which round;
    `spans`: every rank's block of agents (None: one agent per rank), to name ranks by their agents.
    """

    def __init__(self, rank: int, peers: list[int], round_name: str, detail: str, spans: Spans | None = None):
        if spans is None or len(spans) == spans[-1][1]:
            who = ", ".join(map(str, peers))
        else:
            who = ", ".join(label(p, spans) for p in peers)
        super().__init__(f"{label(rank, spans)}: {round_name} with peer(s) {who or 'unknown'} failed: {detail}")
        self.rank, self.peers, self.round_name, self.detail, self.spans = rank, peers, round_name, detail, spans

    def __reduce__(self):  # picklable across processes
        return (type(self), (self.rank, self.peers, self.round_name, self.detail, self.spans))


_ALIGN = 8  # byte alignment of each tensor in a packed message, so that every section views back as its dtype


def _row_bytes(t: Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


def _pack(parts: list[Tensor]) -> Tensor:
    """Several tensors as one message: a single one as it is, several as their bytes, one after the other."""
    if len(parts) == 1:
        return parts[0].contiguous()
    blob = []
    for p in parts:
        b = p.contiguous().reshape(-1).view(torch.uint8)
        blob += [b, b.new_zeros(-len(b) % _ALIGN)]
    return torch.cat(blob)


def _receive_buffer(like: Payload, rows: int) -> Tensor:
    """An empty message of `rows` rows of each tensor of `like` (see `_pack`)."""
    if len(like) == 1:
        return like[0].new_empty((rows, *like[0].shape[1:]))
    total = sum(-(-rows * _row_bytes(t) // _ALIGN) * _ALIGN for t in like)
    return torch.empty(total, dtype=torch.uint8, device=like[0].device)


def _unpack(message: Tensor, like: Payload, rows: int) -> list[Tensor]:
    """The tensors of a message made by `_pack`, [rows, ...] each."""
    if len(like) == 1:
        return [message]
    out, at = [], 0
    for t in like:
        size = rows * _row_bytes(t)
        out.append(message[at : at + size].view(t.dtype).reshape(rows, *t.shape[1:]))
        at += -(-size // _ALIGN) * _ALIGN
    return out


class DistComm:
    """The `Comm` of this rank's block of agents on an initialised process group.

    With n agents over W ranks, rank r holds `agent_blocks(n, W, sizes)[r]` (one agent each when n == W;
    `sizes`: every rank's number of agents, by default as even as they come).
    `timeout` (seconds) bounds each round: the time from posting its messages until all of them
    have completed. After a failed round the object refuses further rounds (the peers' message
    streams are out of step); restart the run.

    `wire_bytes` (float64 [2]) counts what this rank sent to other ranks in rounds 1 and 2; unlike
    `bytes_sent` (per agent, every edge, the simulator's counter) it leaves out edges inside the rank.
    """

    def __init__(self, edges: list[tuple[int, int]], n: int, timeout: float = 60.0,
                 device: torch.device | str = "cpu", sizes: Sequence[int] | None = None):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call crossgrad.distributed.init_from_env()")
        world = dist.get_world_size()
        if world > n:
            raise ValueError(f"the topology has {n} agents but the process group has {world} ranks; "
                             "launch at most one process per agent")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.rank = dist.get_rank()
        blocks = agent_blocks(n, world, sizes)
        self.sizes = tuple(len(b) for b in blocks)
        self.spans: Spans = tuple((b.start, b.stop) for b in blocks)
        self.plan = plan = EdgePlan.build(edges, n, list(blocks[self.rank]))
        self.bytes_sent = torch.zeros(plan.n_local, 2, dtype=torch.float64)
        self.wire_bytes = torch.zeros(2, dtype=torch.float64)
        self.timeout = float(timeout)
        self.device = torch.device(device)
        self._poll = dist.get_backend() == "nccl"
        #: the failed round, if any (a list: the comms of a time-varying topology's graphs share it)
        self.failed: list[CommTimeoutError] = []
        self._plan_routes(blocks)

    def _plan_routes(self, blocks: list[range]) -> None:
        """Which rows go to and come from every peer rank in each round, and where the arriving rows go.

        Round 1: the rows of ours a peer's agents receive (sorted by agent), and the peer's agents
        ours receive; the round's rows live in a pool [local rows, then each peer's, in rank order].
        Round 2: one row per edge between the two blocks, both sides sorting the edges by (model's
        agent, receiver); the arriving rows follow the payload's in the round's pool.
        """
        plan, start, dev = self.plan, blocks[self.rank].start, self.device
        owner = [r for r, b in enumerate(blocks) for _ in b]
        in_src, in_dst = plan.in_src.tolist(), [start + k for k in plan.in_dst.tolist()]
        out_src, out_dst = [start + k for k in plan.out_src.tolist()], plan.out_dst.tolist()
        peers = sorted({owner[a] for a in in_src + out_dst} - {self.rank})
        row = {a: a - start for a in blocks[self.rank]}
        self._send1: dict[int, Tensor] = {}
        self._recv1: dict[int, int] = {}
        in_edge = {(s, d): e for e, (s, d) in enumerate(zip(in_src, in_dst))}
        back = {(s, d): e for (s, d), e in in_edge.items() if owner[s] == self.rank}
        self._send2: dict[int, Tensor] = {}
        self._recv2: dict[int, int] = {}
        arrived: dict[tuple[int, int], int] = {}
        n_arrived = 0
        for q in peers:
            sends = sorted({s - start for s, d in zip(out_src, out_dst) if owner[d] == q})
            gets = sorted({s for s in in_src if owner[s] == q})
            for a in gets:
                row[a] = len(row)
            self._send1[q] = torch.tensor(sends, dtype=torch.long, device=dev)
            self._recv1[q] = len(gets)
            to_q = sorted((s, d) for s, d in in_edge if owner[s] == q)
            from_q = sorted((s, d) for s, d in zip(out_src, out_dst) if owner[d] == q)
            self._send2[q] = torch.tensor([in_edge[sd] for sd in to_q], dtype=torch.long, device=dev)
            self._recv2[q] = len(from_q)
            for sd in from_q:
                arrived[sd] = len(in_src) + n_arrived
                n_arrived += 1
        self._pool1 = torch.tensor([row[s] for s in in_src], dtype=torch.long, device=dev)
        # exchange's pool is in global agent order: the blocks ascend with the ranks, so the local rows and each
        # peer's rows are contiguous runs of it
        agents = plan.pool_agents
        at = {int(a): k for k, a in enumerate(agents)}
        self._pool_size = len(agents)
        self._own1 = slice(at[start], at[start] + plan.n_local)
        self._at1 = {q: at[min(s for s in in_src if owner[s] == q)] for q in peers if self._recv1[q]}
        self._index1 = torch.tensor([at[s] for s in in_src], dtype=torch.long, device=dev)
        self._pool2 = torch.tensor([back.get(sd, arrived.get(sd)) for sd in zip(out_src, out_dst)],
                                   dtype=torch.long, device=dev)
        self.peers = peers  # the ranks this rank exchanges with

    def restrict(self, edges: list[tuple[int, int]]) -> DistComm:
        """A comm over a subset of the edges: the same blocks of agents, so the same counters (and one
        failure state: after a failed round neither may go on)."""
        sub = DistComm(edges, self.plan.n, timeout=self.timeout, device=self.device, sizes=self.sizes)
        sub.bytes_sent, sub.wire_bytes, sub.failed = self.bytes_sent, self.wire_bytes, self.failed
        return sub

    def exchange(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Round 1: one message of rows per peer rank each way, received straight into the pool (Comm.exchange:
        the rows in global agent order)."""
        count_round1(self, x)
        pool = x.new_empty(self._pool_size, x.shape[1])
        pool[self._own1].copy_(x)
        ops = []
        for q, rows in self._send1.items():
            if len(rows):
                ops.append((dist.isend, x.index_select(0, rows), q))
            if self._recv1[q]:
                at = self._at1[q]
                ops.append((dist.irecv, pool[at : at + self._recv1[q]], q))
        self._run(ops, ROUND1, 0)
        return pool, self._index1

    def exchange_payload(self, payload: Payload) -> tuple[Payload, Tensor]:
        """Round 1 with a payload row per local agent instead of its model: the same messages as
        `exchange` (one per peer rank, several tensors packed as in round 2). The pool is round 1's:
        the local rows, then each peer's rows in rank order (peers hold ascending blocks of agents)."""
        count_round1_payload(self, payload)
        ops, received = [], []
        for q, rows in self._send1.items():
            if len(rows):
                ops.append((dist.isend, _pack([t.index_select(0, rows) for t in payload]), q))
            if self._recv1[q]:
                buffer = _receive_buffer(payload, self._recv1[q])
                ops.append((dist.irecv, buffer, q))
                received.append((buffer, self._recv1[q]))
        self._run(ops, ROUND1, 0)
        parts = [_unpack(buffer, payload, rows) for buffer, rows in received]
        return tuple(torch.cat([t, *(p[k] for p in parts)]) for k, t in enumerate(payload)), self._pool1

    def exchange_edges(self, payload: Payload) -> Payload:
        """Round 2: row e of every payload tensor goes back to in-edge e's source; one row per out-edge returns.

        Receive buffers take their row shapes and dtypes from the local payload: every agent has the
        same model, so every message of the round has the same tensors (e.g. packed sign bits and
        float32 scales, or one float row when uncompressed).
        """
        count_round2(self, payload)
        ops, received = [], []
        for q, edges in self._send2.items():
            if len(edges):
                ops.append((dist.isend, _pack([t.index_select(0, edges) for t in payload]), q))
            if self._recv2[q]:
                buffer = _receive_buffer(payload, self._recv2[q])
                ops.append((dist.irecv, buffer, q))
                received.append((buffer, self._recv2[q]))
        self._run(ops, ROUND2, 1)
        parts = [_unpack(buffer, payload, rows) for buffer, rows in received]
        return tuple(torch.cat([t, *(p[k] for p in parts)]).index_select(0, self._pool2)
                     for k, t in enumerate(payload))

    def global_mean(self, rows: Tensor) -> Tensor:
        """The mean over all agents: every agent's row gathered from the process group (all-gather) and summed
        in agent order, as the simulator sums them, so the mean is the same bit for bit however the agents are
        placed (an all-reduce of per-rank sums would add in an order that depends on the blocks). Bounded by
        the same time-out as a round; not counted in the byte counters."""
        if self.failed:
            earlier = self.failed[0]
            raise CommTimeoutError(self.rank, earlier.peers, GLOBAL, f"an earlier round failed ({earlier})",
                                   self.spans)
        others = [r for r in range(len(self.spans)) if r != self.rank]
        if not others:
            return rows.sum(0, keepdim=True).div_(self.plan.n)
        padded = rows.new_zeros(max(self.sizes), rows.shape[1])  # all-gather takes one shape from every rank
        padded[: len(rows)] = rows
        everyone = [torch.empty_like(padded) for _ in self.spans]
        work = dist.all_gather(everyone, padded, async_op=True)
        deadline = time.monotonic() + self.timeout
        wait = self._poll_works if self._poll else self._wait_works
        failed, detail = wait([work], [others], deadline)
        if failed:
            self._fail(others, GLOBAL, detail)
        whole = torch.cat([block[:size] for block, size in zip(everyone, self.sizes)])
        return whole.sum(0, keepdim=True).div_(self.plan.n)

    # -- posting and waiting -------------------------------------------------------------------

    def _run(self, ops: list[tuple], round_name: str, round_index: int) -> None:
        if self.failed:
            earlier = self.failed[0]
            raise CommTimeoutError(self.rank, earlier.peers, round_name, f"an earlier round failed ({earlier})",
                                   self.spans)
        if not ops:
            return
        self.wire_bytes[round_index] += sum(t.numel() * t.element_size() for op, t, _ in ops if op is dist.isend)
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
        _publish(self.rank, peers, str(CommTimeoutError(self.rank, peers, round_name, detail, self.spans)))
        # a peer that failed further away publishes about when our own time-out fires: give it a moment
        grace = min(0.25 * self.timeout, 2.0) if detail.startswith("no answer") else 0.2
        detail = _blame(self.rank, peers, detail, _reports(peers, grace), self.spans)
        error = CommTimeoutError(self.rank, peers, round_name, detail, self.spans)
        self.failed.append(error)
        if self._poll:  # NCCL: pending kernels would block the process at exit; abort the communicator
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None:
                with contextlib.suppress(Exception):  # best effort: the error below is what matters
                    abort()
        raise error from None
