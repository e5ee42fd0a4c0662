"""Time-varying topologies: a different graph at every step.

A time-varying topology is an object with ``at(step) -> Topology``, the graph and mixing matrix
``W_t`` of that step; the engine builds the backend's wiring for each distinct graph (see
``Engine``). Each ``W_t`` is validated like any :class:`Topology` except for connectivity: one
step's graph connects only pairs of agents, and it is the graphs of consecutive steps together
that connect everyone.

Besides ``at``, the classes here answer what the code around a run asks of a topology: ``n``,
``name``, ``params``, ``period`` (steps after which the graphs repeat; None for random graphs),
``is_directed`` / ``is_symmetric`` / ``is_doubly_stochastic`` (of every step's graph: what an
algorithm's ``check_topology`` needs to decide whether it can run), ``mixing_matrix()`` and
``spectral_gap`` (of one period's product of the W_t, or of the expected W_t for random graphs),
``consensus_warning`` and ``summary``.

* :class:`OnePeerExponential`: at step t, with k = t mod tau and tau = ceil(log2 n), agent i sends its
  model to agent (i + 2^k) mod n and receives from (i - 2^k) mod n; W_t = (I + S_k) / 2 with S_k the
  cyclic shift by 2^k. The graph of Assran et al. (SGP, 2019) and Ying et al. (2021). Every W_t is a
  doubly stochastic average of two permutations. When n is a power of 2 the product of one period
  is exactly the averaging matrix J/n (the binary digits of m = 0 .. n-1 pick each shift once), so
  tau steps of plain gossip reach the exact average. When n is not a power of 2 the product is
  (1 / 2^tau) * sum over m < 2^tau of the shift by m mod n: the shifts 0 .. 2^tau - n - 1 are counted
  twice, so one period does not average exactly, but every entry of the product is positive and
  repeated periods contract to the average (``spectral_gap`` < 1 says how fast).
* :class:`RandomMatching`: at every step a uniformly random perfect matching of the n agents (n
  even; for odd n one agent, drawn at random, stays unmatched). Matched pairs average (w = 1/2 each),
  an unmatched agent keeps its model (w_ii = 1). Every W_t is symmetric and doubly stochastic. The
  matching of step t is drawn from a generator seeded with (seed, t) alone, so every process, and a
  run resumed at any step, draws the same graph without sharing anything.

Both builders take ``weights`` so that a config's ``[topology] weights`` applies unchanged: with one
peer per step, uniform and Metropolis weights both give 1/2 to the peer and to oneself.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crossgrad.topology.checks import MAX_AGENTS, check_int, check_scheme
from crossgrad.topology.graph import Topology


def is_time_varying(topology: Any) -> bool:
    """True for a topology whose graph changes with the step (one with an ``at(step)`` method)."""
    return callable(getattr(topology, "at", None))


class TimeVaryingTopology(ABC):
    """A graph per step; subclasses give ``at`` and the mixing summary, the rest follows."""

    name: str = ""

    def __init__(self, n: int, weights: str = "uniform") -> None:
        self._n = check_int(n, "n (number of agents)", 1, MAX_AGENTS)
        check_scheme(weights)

    @property
    def n(self) -> int:
        return self._n

    @property
    def params(self) -> dict[str, Any]:
        """Constructor parameters worth reporting."""
        return {}

    @property
    def period(self) -> int | None:
        """Steps after which the graphs repeat; None when they are random."""
        return None

    @abstractmethod
    def at(self, step: int) -> Topology:
        """The graph and mixing matrix W_t of `step` (0-based)."""

    @abstractmethod
    def mixing_matrix(self) -> Tensor:
        """What gossip does over time, float64 [n, n]: the product of one period's W_t, or the expected W_t."""

    def period_product(self) -> Tensor:
        """The product W_{p-1} ... W_1 W_0 of one period's mixing matrices (a periodic topology's mixing_matrix)."""
        out = torch.eye(self.n, dtype=torch.float64, device="cpu")
        for t in range(self.period):
            out = self.at(t).W @ out
        return out

    @property
    def spectral_gap(self) -> float:
        """1 - |lambda_2| of `mixing_matrix()` (1.0: one period averages exactly)."""
        if self.n == 1:
            return 1.0
        mods = np.sort(np.abs(np.linalg.eigvals(self.mixing_matrix().numpy())))[::-1]
        return float(min(max(1.0 - mods[1], 0.0), 1.0))

    def consensus_warning(self, gamma: float = 1.0) -> str | None:
        """None: every W_t keeps w_ii >= 1/2 and the graphs connect everyone over time (within a period,
        or almost surely for random draws), so gossip contracts to the average at any gamma."""
        return None

    @property
    def is_directed(self) -> bool:
        """Whether some step's graph has an edge without its reverse."""
        return False

    @property
    def is_symmetric(self) -> bool:
        """Whether every step's W_t is symmetric."""
        return not self.is_directed

    @property
    def is_doubly_stochastic(self) -> bool:
        """Every W_t here is: gossip preserves the network mean at every step."""
        return True

    def summary(self) -> dict[str, Any]:
        """Plain-data description for logs and the `topology` command; degrees are step 0's."""
        first = self.at(0)
        return {
            "name": self.name,
            "n": self.n,
            "params": self.params,
            "time_varying": True,
            "period": self.period,
            "n_edges": len(first.edges),
            "directed": self.is_directed,
            "symmetric": self.is_symmetric,
            "doubly_stochastic": self.is_doubly_stochastic,
            "regular": first.is_regular,
            "spectral_gap": self.spectral_gap,
            "in_degrees": first.in_degrees,
            "out_degrees": first.out_degrees,
        }

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}(n={self.n}{extra}, period={self.period})"


class OnePeerExponential(TimeVaryingTopology):
    """Agent i sends to (i + 2^k) mod n at step t, k = t mod ceil(log2 n); W_t = (I + shift) / 2."""

    name = "one_peer_exponential"

    def __init__(self, n: int, weights: str = "uniform") -> None:
        super().__init__(n, weights)
        self._graphs: dict[int, Topology] = {}  # one per shift: tau of them

    @property
    def period(self) -> int:
        return max(1, math.ceil(math.log2(self.n)))

    def shift(self, step: int) -> int:
        """The distance 2^k an agent sends over at `step`."""
        return 2 ** (check_int(step, "step", 0) % self.period)

    def at(self, step: int) -> Topology:
        s = self.shift(step)
        graph = self._graphs.get(s)
        if graph is None:
            n = self.n
            # graphs are built while a run steps, possibly under a default device: host tensors, named so
            W = torch.eye(n, dtype=torch.float64, device="cpu") / 2
            agents = torch.arange(n, device="cpu")
            W[(agents + s) % n, agents] += 0.5  # row i + s receives from column i
            graph = self._graphs[s] = Topology(W, name=self.name, _params={"shift": s}, _connected=False)
        return graph

    def mixing_matrix(self) -> Tensor:
        return self.period_product()

    @property
    def is_directed(self) -> bool:
        # a shift by 2^k is its own reverse only when 2^k = n/2 (or 0 mod n): n <= 2 has no other
        return self.n > 2


class RandomMatching(TimeVaryingTopology):
    """A uniformly random perfect matching per step (one agent unmatched when n is odd); pairs average."""

    name = "random_matching"

    def __init__(self, n: int, seed: int = 0, weights: str = "uniform") -> None:
        super().__init__(n, weights)
        self.seed = check_int(seed, "seed", 0)
        self._last: tuple[int, Topology] | None = None  # the engine asks for every step's graph once or twice

    @property
    def params(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def pairs(self, step: int) -> list[tuple[int, int]]:
        """The matched pairs of `step`, drawn from (seed, step) alone."""
        step = check_int(step, "step", 0)
        order = np.random.default_rng([self.seed, step]).permutation(self.n).tolist()
        return [(order[k], order[k + 1]) for k in range(0, self.n - 1, 2)]

    def at(self, step: int) -> Topology:
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        W = torch.eye(self.n, dtype=torch.float64, device="cpu")
        for a, b in self.pairs(step):
            W[a, a] = W[b, b] = W[a, b] = W[b, a] = 0.5
        graph = Topology(W, name=self.name, _params={"seed": self.seed, "step": step}, _connected=False)
        self._last = (step, graph)
        return graph

    def mixing_matrix(self) -> Tensor:
        """E[W_t]: agent i is matched with a given j with probability p = 1/(n-1) (n even) or 1/n (n odd)."""
        n = self.n
        if n == 1:
            return torch.ones(1, 1, dtype=torch.float64, device="cpu")
        p = 1 / (n - 1) if n % 2 == 0 else 1 / n
        out = torch.full((n, n), p / 2, dtype=torch.float64, device="cpu")
        out.fill_diagonal_(1 - (n - 1) * p / 2)
        return out

