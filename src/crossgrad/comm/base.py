"""The communication interface the engine is written against, and the edge bookkeeping it shares.

An edge (j -> i) means agent i receives agent j's model (w_ij > 0). A backend holds some *local*
agents (all of them in the simulator, a block per process under torch.distributed). Round 1 sends
every local agent's model along its out-edges; round 2 sends one message back along every in-edge
of a local agent (agent i returns the cross-gradient it computed with j's model to j).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from crossgrad.codecs import Payload


@dataclass(frozen=True)
class EdgePlan:
    """Which edges touch the local agents, in a fixed order every backend agrees on.

    in_src[e], in_dst[e]: global sender and *local index* of the receiver of in-edge e, sorted by
    (receiver, sender). out_dst[e], out_src[e]: global receiver and local index of the sender of
    out-edge e, sorted by (sender, receiver).
    """

    n: int
    local: tuple[int, ...]
    in_src: Tensor
    in_dst: Tensor
    out_dst: Tensor
    out_src: Tensor

    @classmethod
    def build(cls, edges: list[tuple[int, int]], n: int, local: list[int] | tuple[int, ...]) -> EdgePlan:
        pos = {g: k for k, g in enumerate(local)}
        ins = sorted((pos[d], s) for s, d in edges if d in pos)
        outs = sorted((pos[s], d) for s, d in edges if s in pos)
        long, cpu = torch.long, torch.device("cpu")  # host-side bookkeeping; backends move what they index with
        return cls(
            n=n,
            local=tuple(local),
            in_src=torch.tensor([s for _, s in ins], dtype=long, device=cpu),
            in_dst=torch.tensor([d for d, _ in ins], dtype=long, device=cpu),
            out_dst=torch.tensor([d for _, d in outs], dtype=long, device=cpu),
            out_src=torch.tensor([s for s, _ in outs], dtype=long, device=cpu),
        )

    @property
    def n_local(self) -> int:
        return len(self.local)

    @functools.cached_property
    def pool_agents(self) -> Tensor:
        """Round 1's pool (`Comm.exchange`): every agent held here or received from, ascending global index."""
        return torch.tensor(sorted(set(self.local) | set(self.in_src.tolist())), dtype=torch.long, device="cpu")


class Comm(Protocol):
    """What a backend provides to the engine. Byte counters come from the tensors actually sent."""

    plan: EdgePlan
    bytes_sent: Tensor  # float64 [n_local, 2]: bytes each local agent has sent in rounds 1 and 2

    def exchange(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Round 1: send each local row along its out-edges; return (pool, index): in-edge e's sender's row is
        pool[index[e]]. The pool holds a row per agent of `plan.pool_agents`, in that (global) order."""
        ...

    def exchange_edges(self, payload: Payload) -> Payload:
        """Round 2: send payload row e back along in-edge e; return what arrives, indexed by out-edge."""
        ...

    def exchange_payload(self, payload: Payload) -> tuple[Payload, Tensor]:
        """Round 1 with a message per local agent that is not its model (Choco's compressed difference):
        payload row k goes along local agent k's out-edges. Returns (pool, index): the pool holds one
        row per distinct sender, the local agents' own rows first (as given, in order), then those of the
        other agents the local ones receive from, ascending; in-edge e's message is pool row index[e]."""
        ...

    def global_mean(self, rows: Tensor) -> Tensor:
        """The mean over all n agents of rows [n_local, P], as [1, P]: one collective over every agent (Momentum
        Tracking's first step). Not counted in bytes_sent, which counts messages along edges."""
        ...

    def restrict(self, edges: list[tuple[int, int]]) -> Comm:
        """A comm over a subset of this one's edges (RelaySGD's two trees inside the double-binary-trees
        graph) that counts into the same bytes_sent (and on torch.distributed shares the failure state)."""
        ...


@runtime_checkable
class SharedMemoryComm(Comm, Protocol):
    """A backend whose agents share one address space (the simulator): round 1 moves nothing.

    The engine then gossips with one product over the rows and evaluates cross-gradients straight
    from them, instead of copying every neighbour's row per in-edge as `exchange` does.
    """

    sources: Tensor  # [E_in] on the run's device: in-edge e's round-1 row is row sources[e] of share(x)

    def share(self, x: Tensor) -> Tensor:
        """Round 1 without copies: counts what `exchange` would send; returns the rows every agent reads."""
        ...

    def share_edges(self, payload: Payload) -> Tensor:
        """Round 2 without copies: counts what `exchange_edges` would send; returns [E_out], the in-edge
        whose message each out-edge receives (the receiver reads the sender's row in place)."""
        ...


def count_round1(comm: Comm, x: Tensor) -> None:
    _count(comm.bytes_sent[:, 0], comm.plan.out_src, x.shape[1] * x.element_size())


def count_round1_payload(comm: Comm, payload: Payload) -> None:
    _count(comm.bytes_sent[:, 0], comm.plan.out_src, sum(_row_bytes(t) for t in payload))


def _row_bytes(t: Tensor) -> int:
    return t[0].numel() * t.element_size() if len(t) else 0


def count_round2(comm: Comm, payload: Payload) -> None:
    row = sum(t[0].numel() * t.element_size() for t in payload) if len(comm.plan.in_dst) else 0
    _count(comm.bytes_sent[:, 1], comm.plan.in_dst, row)


def _count(sent: Tensor, senders: Tensor, row_bytes: int) -> None:
    """Add one message of `row_bytes` to the counter of each edge's sending agent."""
    sent.index_add_(0, senders, sent.new_full((len(senders),), float(row_bytes)))


def agent_blocks(n: int, parts: int, sizes: Sequence[int] | None = None) -> list[range]:
    """Agents 0..n-1 in `parts` contiguous blocks, in order; the first n % parts blocks hold one more, unless
    `sizes` gives every block's number of agents (e.g. 4 + 2 for 6 agents on 2 processes)."""
    if not 1 <= parts <= n:
        raise ValueError(f"cannot place {n} agents on {parts} processes: every process needs at least one agent")
    if sizes is None:
        size, extra = divmod(n, parts)
        sizes = [size + (r < extra) for r in range(parts)]
    sizes = list(sizes)
    if len(sizes) != parts or sum(sizes) != n or min(sizes) < 1:
        raise ValueError(f"block sizes {sizes} do not place {n} agents on {parts} processes with at least one each")
    starts = [sum(sizes[:r]) for r in range(parts + 1)]
    return [range(starts[r], starts[r + 1]) for r in range(parts)]
