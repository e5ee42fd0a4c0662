"""Argument and graph checks shared by the topology constructors, and the error they raise."""
from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

ROW_TOL = 1e-9     # |row sum - 1| (or |column sum - 1| for a column-stochastic W) allowed
SYM_TOL = 1e-12    # |W - W^T| allowed for is_symmetric
WEIGHT_SCHEMES = ("uniform", "metropolis", "out_uniform")
#: which sums of W are 1: "row" (each agent averages what it receives) or "column" (each agent splits
#: what it sends, as push-sum needs)
STOCHASTIC = ("row", "column")

#: the most agents a topology may have: W is a dense n x n matrix (4096 agents: 128 MiB)
MAX_AGENTS = 4096


class TopologyError(ValueError):
    """An invalid graph or mixing matrix, or bad arguments to a topology constructor."""



def fmt_agents(agents: Iterable[int], limit: int = 10) -> str:
    """``{4, 5}``; long sets are cut so the message stays readable."""
    items = sorted(agents)
    shown = ", ".join(str(a) for a in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items)} agents)"
    return "{" + shown + "}"




def check_int(value: Any, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """Accept Python/NumPy/torch integers (not bools, not floats) and check the bounds."""
    if isinstance(value, bool):
        raise TopologyError(f"{what} must be an integer, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise TopologyError(f"{what} must be an integer, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise TopologyError(f"{what} must be >= {minimum}, got {out}")
    if maximum is not None and out > maximum:
        raise TopologyError(f"{what} must be at most {maximum}, got {out}")
    return out


def check_scheme(weights: str) -> str:
    if weights not in WEIGHT_SCHEMES:
        raise TopologyError(f"weights must be 'uniform' or 'metropolis' (row-stochastic W), or 'out_uniform' "
                            f"(column-stochastic W, for push-sum: algorithm 'sgp'), got {weights!r}")
    return weights


def check_stochastic(stochastic: str) -> str:
    if stochastic not in STOCHASTIC:
        raise TopologyError(f"stochastic must be 'row' (rows of W sum to 1) or 'column' (columns sum to 1), "
                            f"got {stochastic!r}")
    return stochastic


def reach(adj_out: Sequence[Sequence[int]], start: int) -> set[int]:
    """Agents reachable from ``start`` following ``adj_out`` (breadth-first)."""
    seen = {start}
    frontier = [start]
    while frontier:
        nxt = []
        for a in frontier:
            for b in adj_out[a]:
                if b not in seen:
                    seen.add(b)
                    nxt.append(b)
        frontier = nxt
    return seen


def connectivity_problem(ins: Sequence[Sequence[int]], outs: Sequence[Sequence[int]]) -> str | None:
    """Why the graph is not strongly connected, or None if it is.

    Information flows along out-edges; agent 0 must reach everyone and everyone must reach agent 0.
    """
    n = len(ins)
    if n <= 1:
        return None
    undirected = all(set(ins[i]) == set(outs[i]) for i in range(n))
    kind = "connected" if undirected else "strongly connected"
    missed = set(range(n)) - reach(outs, 0)
    if missed:
        return f"graph is not {kind}: agents {fmt_agents(missed)} cannot be reached from agent 0"
    missed = set(range(n)) - reach(ins, 0)
    if missed:
        return f"graph is not {kind}: agent 0 cannot be reached from agents {fmt_agents(missed)}"
    return None


