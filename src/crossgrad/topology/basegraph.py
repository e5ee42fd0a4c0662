"""Base-(k+1) graphs: time-varying graphs of at most k peers per agent and step whose product over one
period is exactly the averaging matrix J/n, for any number of agents n.

From Takezawa, Bao, Niwa, Sato & Yamada, *Beyond Exponential Graph: Communication-Efficient Topologies
for Decentralized Learning via Finite-time Convergence* (NeurIPS 2023). The rounds below are those of
the authors' code (github.com/yukiTakezawa/BaseGraph, ``base_graph.py`` and ``simple_base_graph.py``),
rewritten from its construction, redundant rounds included, so that a run here sees the graphs the
paper's experiments saw:

* **k-peer hyper-hypercube** (n whose prime factors are all <= k + 1): write n = f_1 f_2 ... f_L with
  every f_r in 2 .. k+1 and read an agent's position as a mixed-radix number with those digits; round r
  averages, in cliques of f_r agents (weights 1/f_r), the agents whose positions differ in digit r only.
  After the L rounds every agent holds the mean.
* **simple Base-(k+1) graph** (any n): write n in base k + 1, n = sum of a_l (k+1)^p_l with
  p_0 > p_1 > ... and digits 1 <= a_l <= k, and split the agents into consecutive groups V_l of those
  sizes. (1) Every group averages itself with its hyper-hypercube. (2) At round s, every agent of the
  later groups V_{s+1}, V_{s+2}, ... links to one agent in each of the a_s blocks of (k+1)^p_s agents of
  V_s, with weight c / a_s, c = |V_s| / |V_s ∪ V_{s+1} ∪ ...|; this moves the mean of the later groups
  to the mean of V_s ∪ later exactly, and puts the same total into every block of V_s. (3) From round s + 1 on,
  V_s averages each of its blocks again, which spreads that total evenly. The last group ends at the
  mean of everyone, and each earlier V_s at the mean of V_s ∪ later, which is the same number.
* **Base-(k+1) graph**: with n = m r, m the largest divisor of n whose prime factors are <= k + 1,
  also try m groups of r consecutive agents, each running the simple graph at once, then the
  hyper-hypercube on the r "columns" of m agents (one from each group); keep whichever has fewer rounds
  (the composite on a tie, as the authors' code does).

Rounds that change nothing in the product are kept as the authors' code has them, because between
gossip steps the models move: a group done with its hyper-hypercube early repeats it while the largest
group finishes, the agents of V_s left unlinked in step (2) average in cliques of k + 1, and groups
done with (3) repeat its rounds. Every round's W is symmetric and doubly stochastic with
w_ii > 0, and no agent has more than k peers in any round.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from crossgrad.topology.checks import TopologyError, check_int
from crossgrad.topology.graph import Topology
from crossgrad.topology.timevarying import TimeVaryingTopology

#: one round's links: (i, j) with i < j -> w_ij = w_ji; each agent keeps the rest of its row for itself
Round = dict[tuple[int, int], float]


def smooth_factors(m: int, k: int) -> list[int] | None:
    """m as a product of factors in 2 .. k+1, the largest taken first, listed smallest first (the order
    the hyper-hypercube's rounds use them); None when a prime factor of m exceeds k + 1. [] for m = 1."""
    out = []
    rest = m
    for f in range(min(k + 1, m), 1, -1):
        while rest % f == 0:
            out.append(f)
            rest //= f
    return out[::-1] if rest == 1 else None


def hyper_hypercube(nodes: Sequence[int], k: int) -> list[list[list[int]]]:
    """The rounds of the k-peer hyper-hypercube on `nodes` (their count factors into 2 .. k+1), each a
    list of cliques. A lone agent has one round in which it keeps its model, so that it can repeat."""
    factors = smooth_factors(len(nodes), k)
    if factors is None:
        raise TopologyError(f"{len(nodes)} agents have a prime factor above k + 1 = {k + 1}: no k-peer hyper-hypercube")
    rounds = []
    stride = 1
    for f in factors:
        # position p leads the clique of the positions that differ from it in this digit only
        rounds.append([[nodes[p + stride * d] for d in range(f)] for p in range(len(nodes)) if (p // stride) % f == 0])
        stride *= f
    return rounds or [[]]


def cliques(groups: Iterable[Sequence[int]], into: Round | None = None) -> Round:
    """Every clique averages within itself (w = 1 / its size)."""
    out: Round = {} if into is None else into
    for group in groups:
        for a, i in enumerate(group):
            for j in group[a + 1:]:
                out[(min(i, j), max(i, j))] = 1 / len(group)
    return out


def simple_base_graph(nodes: Sequence[int], k: int) -> list[Round]:
    """The rounds of the simple Base-(k+1) graph on `nodes` (module docstring)."""
    if smooth_factors(len(nodes), k) is not None:
        return [cliques(r) for r in hyper_hypercube(nodes, k)]
    base = k + 1
    # the base-(k+1) digits of n, largest power first: group l has a_l blocks of q_l = (k+1)^p_l agents
    q = 1
    while q * base <= len(nodes):
        q *= base
    groups: list[list[int]] = []
    blocks: list[list[list[int]]] = []
    start = 0
    while q:
        a = (len(nodes) - start) // q
        if a:
            groups.append(list(nodes[start:start + a * q]))
            blocks.append([groups[-1][b * q:(b + 1) * q] for b in range(a)])
            start += a * q
        q //= base
    first = [hyper_hypercube(g, k) for g in groups]
    # step (3): a group smaller than k + 1 is one clique; a larger one averages each of its blocks
    again = [first[l] if len(g) < base else [sum(rs, []) for rs in zip(*(hyper_hypercube(b, k) for b in blocks[l]))]
             for l, g in enumerate(groups)]
    rounds = [cliques(c for h in first for c in h[t % len(h)]) for t in range(len(first[0]))]
    last = len(groups) - 1
    repeats = [0] * len(groups)
    for s in range(len(again[0]) + 1):  # until V_0 has averaged its blocks again; the others finish sooner
        r: Round = {}
        if s < last:
            left = [list(b) for b in blocks[s]]
            c = len(groups[s]) / sum(len(g) for g in groups[s:])
            for g in reversed(groups[s + 1:]):
                for i in g:
                    for b in left:
                        j = b.pop()
                        r[(min(i, j), max(i, j))] = c / len(left)
            rest = [j for b in left for j in b]
            cliques((rest[p:p + base] for p in range(0, len(rest) - 1, base)), into=r)
        redo = range(s) if s < last else range(len(groups))  # the last group has no later ones to wait for
        for l in redo:
            cliques(again[l][repeats[l] % len(again[l])], into=r)
            repeats[l] += 1
        rounds.append(r)
    return rounds


def largest_smooth_divisor(n: int, k: int) -> int:
    """The largest divisor of n whose prime factors are all <= k + 1."""
    out, rest = 1, n
    for f in range(2, min(k + 1, n) + 1):
        while rest % f == 0:
            rest //= f
            out *= f
    return out


def base_graph_rounds(n: int, k: int) -> list[Round]:
    """The rounds of the Base-(k+1) graph on agents 0 .. n-1 (module docstring)."""
    nodes = list(range(n))
    whole = simple_base_graph(nodes, k)
    m = largest_smooth_divisor(n, k)
    r = n // m
    if m == 1 or r == 1:  # the composite would only add a round in which nothing happens
        return whole
    rows = [simple_base_graph(nodes[i * r:(i + 1) * r], k) for i in range(m)]
    columns = [hyper_hypercube(nodes[j::r], k) for j in range(r)]
    composite = [{e: w for rs in rows for e, w in rs[t].items()} for t in range(len(rows[0]))]
    composite += [cliques(c for h in columns for c in h[t]) for t in range(len(columns[0]))]
    return whole if len(whole) < len(composite) else composite


class BaseGraph(TimeVaryingTopology):
    """Base-(k+1) graph: at most k peers per agent and step; one period of gossip averages exactly."""

    name = "base_graph"

    def __init__(self, n: int, k: int = 1, weights: str = "uniform") -> None:
        super().__init__(n, weights)
        # configs always pass their weights scheme; only a non-default one is a mistake here
        if weights != "uniform":
            raise TopologyError(f"weights={weights!r} does not apply to topology 'base_graph': its construction "
                                "fixes every W_t")
        self.k = check_int(k, "k (the most peers of an agent per step)", 1)
        # more than n - 1 peers cannot be used: every k >= n - 1 gives the same rounds (one clique of all)
        self._rounds = base_graph_rounds(self.n, min(self.k, max(self.n - 1, 1)))
        self._graphs: dict[int, Topology] = {}

    @property
    def params(self) -> dict[str, Any]:
        return {"k": self.k}

    @property
    def period(self) -> int:
        return len(self._rounds)

    def at(self, step: int) -> Topology:
        t = check_int(step, "step", 0) % self.period
        graph = self._graphs.get(t)
        if graph is None:
            # graphs are built while a run steps, possibly under a default device: host tensors, named so
            W = torch.zeros(self.n, self.n, dtype=torch.float64, device="cpu")
            for (i, j), w in self._rounds[t].items():
                W[i, j] = W[j, i] = w
            W += torch.diag(1 - W.sum(1))
            graph = self._graphs[t] = Topology(W, name=self.name, _params={"k": self.k, "round": t}, _connected=False)
        return graph

    def mixing_matrix(self) -> Tensor:
        return self.period_product()

    def consensus_warning(self, gamma: float = 1.0) -> str | None:
        """None: one period's product is J/n, and for gamma < 1 every (1 - gamma) I + gamma W_t keeps a
        positive diagonal over graphs that connect everyone within a period, so gossip still averages."""
        return None
