"""A checkpoint's per-process parts re-cut for another number of processes (4 -> 2, dist -> simulator, ...).

Each process's part holds the state of its contiguous block of agents (`agent_blocks`). Almost all of it
is per agent, so it can be re-cut for any other blocks, value for value:

- rows per agent (parameters, buffers, momentum, error memories of the self-gradient, tracking, D2 and
  push-sum state, byte counters, running losses) and per-agent lists (batch streams, augmentation
  generators) are concatenated in agent order and split by the new blocks, and so are the bias sums, kept
  per agent (a checkpoint from before that holds one total per process: summed as the counters below);
- rows per in-edge (the error memories of the cross-gradient messages) are keyed by their edge
  (sender, receiver) and laid out in each new block's edge order;
- Choco's public copies: agent j's copy is the same on every process that keeps one, so the owner's row
  is taken and each new block gets its agents' copies and then those of the agents they receive from;
- CGA's multipliers, one slot per out-edge padded to the graph's largest out-degree: each agent's real
  slots move, the padding (never read: masked by the QP's active set) is the initial margin;
- counters the processes sum (gradient evaluations, QP failures, the bias element counts) go whole to the first new
  process, 0 to the others, so that the sum is unchanged;
- the random generators' state is the first process's (the processes run in lockstep and draw nothing
  from torch's global generator during training);
- everything else (learning rate, step counts, the transforms' kinds, ...) must be equal on every
  process, and is kept; a piece that is not is refused with one line, never guessed at.

So the state after a re-cut is exactly what the new layout would hold at that step (tested), and the run
continues as on its new layout: bit for bit where the layouts sum in the same order (docs/distributed.md).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from crossgrad.comm.base import EdgePlan, agent_blocks
from crossgrad.run.rundir import RunError

AGENTS, AGENT_LIST, EDGES, COPIES, SLOTS, SUM, FIRST, AGENT_SUMS = "agents", "agent_list", "edges", "copies", \
    "slots", "sum", "first", "agent_sums"

#: how each piece of a part is re-cut, by its path (a list index is "*"); any other piece must be equal
RULES: dict[tuple[str, ...], str] = {
    ("sim", "x"): AGENTS,
    ("sim", "buffers", "*"): AGENTS,
    ("sim", "bytes_sent"): AGENTS,
    ("sim", "transforms", "states", "*", "m"): AGENTS,
    ("sim", "transforms", "states", "*", "m_hat"): AGENTS,
    ("sim", "transforms", "states", "*", "x_prev"): AGENTS,
    ("sim", "codec", "edge", "memory"): EDGES,
    ("sim", "codec", "self", "memory"): AGENTS,
    ("sim", "algorithm", "w"): AGENTS,  # sgp
    ("sim", "algorithm", "y"): AGENTS,  # gt
    ("sim", "algorithm", "g_prev"): AGENTS,
    ("sim", "algorithm", "prev"): AGENTS,  # d2
    ("sim", "algorithm", "x_hat"): COPIES,  # choco
    ("sim", "algorithm", "v"): SLOTS,  # cga
    ("sim", "algorithm", "qp_failures"): SUM,
    ("sim", "stats", "grad_evals"): SUM,
    ("streams",): AGENT_LIST,
    ("aug_gens",): AGENT_LIST,
    ("torch_rng",): FIRST,
    ("cuda_rng",): FIRST,
    ("acc", "loss"): AGENTS,
    ("acc", "bias_mv"): AGENT_SUMS,
    ("acc", "bias_mv_n"): SUM,
    ("acc", "bias_dv"): AGENT_SUMS,
    ("acc", "bias_dv_n"): SUM,
}


class Layout:
    """The agents' blocks of one number of processes, with the edge facts the per-edge pieces need."""

    def __init__(self, n: int, n_processes: int, edges: list[tuple[int, int]] | None):
        self.blocks = agent_blocks(n, n_processes)
        self.edges = edges
        self._plans: list[EdgePlan] | None = None

    def plans(self, what: str) -> list[EdgePlan]:
        if self.edges is None:
            raise RunError(f"cannot re-cut {what} for another number of processes on a time-varying topology; "
                           "resume on the number of processes that wrote the checkpoint")
        if self._plans is None:
            self._plans = [EdgePlan.build(self.edges, self.blocks[-1].stop, list(b)) for b in self.blocks]
        return self._plans

    def in_edges(self, r: int) -> list[tuple[int, int]]:
        """(sender, receiver) of block r's in-edges, in its edge order (the rows of its per-edge state)."""
        p = self.plans("per-edge state")[r]
        return list(zip(p.in_src.tolist(), [p.local[d] for d in p.in_dst.tolist()]))

    def copies(self, r: int) -> list[int]:
        """Whose Choco copies block r keeps, in their row order: its agents, then the others it receives from."""
        p, block = self.plans("public copies")[r], self.blocks[r]
        return list(block) + sorted(set(p.in_src.tolist()) - set(block))

    def out_degrees(self, r: int) -> list[int]:
        p = self.plans("CGA multipliers")[r]
        return torch.bincount(p.out_src, minlength=p.n_local).tolist()


def reblock(parts: list[dict[str, Any]], n: int, edges: list[tuple[int, int]] | None, n_processes: int,
            margin: float = 0.0) -> list[dict[str, Any]]:
    """`parts` (one per process of a run of n agents on len(parts) processes) re-cut for `n_processes`.

    `edges`: the topology's (sender, receiver) pairs (None for a time-varying one: per-edge state is then
    refused); `margin`: CGA's initial multiplier, for the padding of its slots. RunError if a piece
    cannot be re-cut.
    """
    if len(parts) == n_processes:
        return parts
    old, new = Layout(n, len(parts), edges), Layout(n, n_processes, edges)
    return _walk(parts, (), old, new, margin)


def _walk(values: list[Any], path: tuple[str, ...], old: Layout, new: Layout, margin: float) -> list[Any]:
    rule = RULES.get(path)
    if rule is not None:
        return _RECUT[rule](values, old, new, margin, path)
    first = values[0]
    if isinstance(first, dict) and all(isinstance(v, dict) and v.keys() == first.keys() for v in values):
        per_key = {k: _walk([v[k] for v in values], (*path, k), old, new, margin) for k in first}
        return [{k: per_key[k][r] for k in first} for r in range(len(new.blocks))]
    if isinstance(first, (list, tuple)) and all(isinstance(v, (list, tuple)) and len(v) == len(first)
                                                for v in values):
        items = [_walk([v[i] for v in values], (*path, "*"), old, new, margin) for i in range(len(first))]
        return [type(first)(item[r] for item in items) for r in range(len(new.blocks))]
    if all(_equal(v, first) for v in values):
        return [first] * len(new.blocks)
    raise RunError(f"cannot re-cut the checkpoint for {len(new.blocks)} processes: {'.'.join(path)} differs "
                   f"between its {len(values)} processes; resume on {len(values)}")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _agents(values, old, new, margin, path):
    for r, t in enumerate(values):
        _check_rows(t, len(old.blocks[r]), path)
    return list(torch.cat(values).split([len(b) for b in new.blocks]))


def _agent_list(values, old, new, margin, path):
    whole = [item for v in values for item in v]
    return [type(values[0])(whole[b.start : b.stop]) for b in new.blocks]


def _edges(values, old, new, margin, path):
    row = {}
    for r, memory in enumerate(values):
        edges = old.in_edges(r)
        _check_rows(memory, len(edges), path)
        row.update(zip(edges, memory))
    return [_stack([row[e] for e in new.in_edges(r)], values[0]) for r in range(len(new.blocks))]


def _copies(values, old, new, margin, path):
    copy = {}
    for r, x_hat in enumerate(values):
        _check_rows(x_hat, len(old.copies(r)), path)
        copy.update(zip(old.blocks[r], x_hat))  # each agent's copy as its owner keeps it
    return [_stack([copy[j] for j in new.copies(r)], values[0]) for r in range(len(new.blocks))]


def _slots(values, old, new, margin, path):
    real: list[Tensor] = []  # agent a's multipliers [layers, out-degree], in agent order
    for r, v in enumerate(values):
        degrees = old.out_degrees(r)
        _check_rows(v.transpose(0, 1), len(degrees), path)
        real += [v[:, k, :deg] for k, deg in enumerate(degrees)]
    out = []
    width = max((d for r in range(len(new.blocks)) for d in new.out_degrees(r)), default=0)  # the graph's
    for r, b in enumerate(new.blocks):
        degrees = new.out_degrees(r)
        v = values[0].new_full((values[0].shape[0], len(b), width), margin)
        for k, (a, deg) in enumerate(zip(b, degrees)):
            v[:, k, :deg] = real[a]
        out.append(v)
    return out


def _sum(values, old, new, margin, path):
    total = sum(values[1:], values[0])
    zero = torch.zeros_like(total) if isinstance(total, Tensor) else type(total)(0)
    return [total] + [zero] * (len(new.blocks) - 1)


def _agent_sums(values, old, new, margin, path):
    """Sums kept per agent (the bias sums), re-cut as rows; a checkpoint from before they were per agent holds
    one total per process, summed as counters are."""
    if all(isinstance(v, Tensor) and v.dim() == 0 for v in values):
        return _sum(values, old, new, margin, path)
    return _agents(values, old, new, margin, path)


def _first(values, old, new, margin, path):
    return [values[0]] * len(new.blocks)


def _check_rows(t: Tensor, rows: int, path: tuple[str, ...]) -> None:
    if not isinstance(t, Tensor) or len(t) != rows:
        raise RunError(f"cannot re-cut the checkpoint: {'.'.join(path)} does not hold the {rows} rows its "
                       "process's agents and edges call for (another topology?)")


def _stack(rows: list[Tensor], like: Tensor) -> Tensor:
    return torch.stack(rows) if rows else like.new_empty((0, *like.shape[1:]))


_RECUT: dict[str, Callable[..., list[Any]]] = {
    AGENTS: _agents, AGENT_LIST: _agent_list, EDGES: _edges, COPIES: _copies, SLOTS: _slots, SUM: _sum,
    FIRST: _first, AGENT_SUMS: _agent_sums,
}
