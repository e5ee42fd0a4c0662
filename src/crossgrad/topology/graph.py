"""The :class:`Topology` class: an immutable graph of agents with a validated stochastic mixing matrix.

``W[i, j] > 0`` with ``j != i`` means agent ``i`` *receives* from agent ``j``: ``j`` is an
in-neighbour of ``i`` and the edge is written ``(src, dst) = (j, i)``. By default each row of ``W``
is the averaging rule of one receiver, so rows sum to 1; columns need not (directed graphs). A
*column-stochastic* topology (``stochastic="column"``) is the other way round: column ``j`` is how
agent ``j`` splits what it sends over itself and its out-neighbours, so columns sum to 1 and rows
need not. Only push-sum (algorithm ``sgp``) mixes with such a W without bias; the others refuse it.

Every constructor validates what it builds (square, finite, non-negative, rows (or columns) summing
to 1, strongly connected), so an algorithm handed a ``Topology`` never has to re-check it.

Mixing weights (``weights=``) for graphs built from edges:

* ``"uniform"``: ``w_ij = 1 / (indeg_i + 1)`` for ``j`` in ``N_in(i) ∪ {i}``, the choice of the
  reference NGC implementation. Symmetric (hence doubly stochastic) only on regular undirected
  graphs.
* ``"metropolis"``: Metropolis–Hastings, ``w_ij = 1 / (1 + max(deg_i, deg_j))`` and
  ``w_ii = 1 - sum_j w_ij``. Symmetric and doubly stochastic on any undirected graph; not defined
  for directed graphs.
* ``"out_uniform"``: ``w_ij = 1 / (outdeg_j + 1)`` for ``i`` in ``N_out(j) ∪ {j}``: every agent
  splits its mass uniformly over itself and its out-neighbours, knowing only its out-degree. A
  column-stochastic W (``stochastic="column"``), for push-sum; doubly stochastic on regular graphs.

Note on ``torus``: the reference NGC code's "torus" was really the circulant graph ``C_n(1, 5)``
(agent i linked to i ± 1 and i ± 5), which is not a torus and breaks for ``n = 10`` (i + 5 and
i - 5 coincide). Ours is the genuine 2-D ``rows x cols`` grid with wrap-around; that circulant is
:meth:`Topology.circulant` with ``offsets=[1, 5]``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crossgrad.topology.checks import (
    MAX_AGENTS,
    ROW_TOL,
    SYM_TOL,
    TopologyError,
    check_int,
    check_scheme,
    check_stochastic,
    connectivity_problem,
)


def _rebuild(W: Tensor, name: str, params: dict[str, Any], connected: bool = True,
             stochastic: str = "row") -> Topology:
    """Pickle/copy support: the object is immutable, so state is restored through the constructor."""
    return Topology(W, name=name, stochastic=stochastic, _params=params, _connected=connected)


# ----------------------------------------------------------------------------- the class


class Topology:
    """An immutable communication graph of ``n`` agents with a row-stochastic mixing matrix (or, with
    ``stochastic="column"``, a column-stochastic one, for push-sum).

    Build one with :meth:`from_weights`, :meth:`from_edges`, a named constructor (:meth:`ring`,
    :meth:`torus`, ...) or :func:`make_topology`. ``Topology(W, name)`` is the same as
    :meth:`from_weights`.
    """

    __slots__ = ("_W", "_name", "_params", "_in", "_out", "_gap", "_connected", "_stochastic")

    # -------------------------------------------------------------- construction / validation

    def __init__(self, W: Tensor | np.ndarray | Sequence[Sequence[float]], name: str = "custom",
                 *, stochastic: str = "row", _params: dict[str, Any] | None = None,
                 _connected: bool = True) -> None:
        # _connected=False skips the connectivity check, for one step of a time-varying graph (see
        # crossgrad.topology.timevarying), which connects the agents only over several steps
        stochastic = check_stochastic(stochastic)
        Wt = self._validate(W, stochastic)
        n = Wt.shape[0]
        pos = (Wt > 0).numpy()
        ins = tuple(tuple(int(j) for j in np.flatnonzero(pos[i]) if j != i) for i in range(n))
        outs = tuple(tuple(int(i) for i in np.flatnonzero(pos[:, j]) if i != j) for j in range(n))
        problem = connectivity_problem(ins, outs) if _connected else None
        if problem is not None:
            raise TopologyError(problem)
        Wt.requires_grad_(False)
        set_ = object.__setattr__
        set_(self, "_W", Wt)
        set_(self, "_name", str(name))
        set_(self, "_params", dict(_params or {}))
        set_(self, "_in", ins)
        set_(self, "_out", outs)
        set_(self, "_gap", None)
        set_(self, "_connected", bool(_connected))
        set_(self, "_stochastic", stochastic)

    @staticmethod
    def _validate(W: Any, stochastic: str = "row") -> Tensor:
        """Convert to a fresh float64 CPU tensor and check shape, finiteness, signs and row (or column) sums."""
        try:
            src = W.detach() if isinstance(W, Tensor) else torch.as_tensor(np.asarray(W))
        except (TypeError, ValueError, RuntimeError) as err:
            raise TopologyError(f"W cannot be read as a numeric matrix: {err}") from None
        if src.is_complex() or src.dtype == torch.bool:
            raise TopologyError(f"W must hold real numbers, got dtype {src.dtype}")
        Wt = src.to(device="cpu", dtype=torch.float64).clone()
        if Wt.dim() != 2 or Wt.shape[0] != Wt.shape[1]:
            raise TopologyError(f"W must be a square n x n matrix, got shape {tuple(Wt.shape)}")
        n = Wt.shape[0]
        if n == 0:
            raise TopologyError("W must describe at least one agent (n >= 1), got shape (0, 0)")
        bad = (~torch.isfinite(Wt)).nonzero()
        if len(bad):
            i, j = (int(v) for v in bad[0])
            raise TopologyError(f"W[{i}, {j}] is {Wt[i, j].item()}; mixing weights must be finite")
        neg = (Wt < 0).nonzero()
        if len(neg):
            i, j = (int(v) for v in neg[0])
            raise TopologyError(f"W[{i}, {j}] = {Wt[i, j].item():.12g} is negative; mixing weights must be >= 0")
        if stochastic == "column":
            sums = Wt.sum(0)
            off = ((sums - 1).abs() > ROW_TOL).nonzero()
            if len(off):
                j = int(off[0])
                raise TopologyError(
                    f"column {j} of W sums to {sums[j].item():.12g}, not 1 (a column-stochastic W: each "
                    "agent's weights over itself and its out-neighbours sum to 1)"
                )
            return Wt
        sums = Wt.sum(1)
        off = ((sums - 1).abs() > ROW_TOL).nonzero()
        if len(off):
            i = int(off[0])
            raise TopologyError(
                f"row {i} of W sums to {sums[i].item():.12g}, not 1 "
                "(W must be row-stochastic: each agent's weights over itself and its in-neighbours sum to 1)"
            )
        return Wt

    @classmethod
    def from_weights(cls, W: Tensor | np.ndarray | Sequence[Sequence[float]], name: str = "custom",
                     stochastic: str = "row") -> Topology:
        """Wrap a given mixing matrix after validating it (w_ii = 0 is allowed); `stochastic` says whether
        its rows (the default) or its columns (push-sum) must sum to 1."""
        return cls(W, name=name, stochastic=stochastic)

    @classmethod
    def from_edges(cls, n: int, edges: Iterable[Sequence[int]], directed: bool = False,
                   weights: str = "uniform", name: str = "custom") -> Topology:
        """Build W from an edge list of ``(src, dst)`` pairs (``dst`` receives from ``src``).

        Undirected mode adds both directions of every pair. Self-loops, duplicates (in undirected
        mode also ``(a, b)`` after ``(b, a)``), out-of-range ids and disconnected graphs are errors.
        """
        return cls._from_edges(n, edges, directed, weights, name, {})

    @classmethod
    def _from_edges(cls, n: int, edges: Iterable[Sequence[int]], directed: bool, weights: str,
                    name: str, params: dict[str, Any]) -> Topology:
        n = check_int(n, "n (number of agents)", 1, MAX_AGENTS)
        check_scheme(weights)
        if isinstance(edges, (str, bytes)):
            raise TopologyError("edges must be an iterable of (src, dst) pairs, got a string")
        try:
            edge_iter = iter(edges)
        except TypeError:
            raise TopologyError(f"edges must be an iterable of (src, dst) pairs, got {edges!r}") from None
        adj = np.zeros((n, n), dtype=bool)    # adj[dst, src]
        seen: dict[tuple[int, int], tuple[int, int]] = {}
        for k, e in enumerate(edge_iter):
            try:
                pair = tuple(e)
            except TypeError:
                raise TopologyError(f"edge #{k} ({e!r}) is not a (src, dst) pair") from None
            if len(pair) != 2:
                raise TopologyError(f"edge #{k} ({e!r}) is not a (src, dst) pair")
            s = check_int(pair[0], f"source of edge #{k}")
            d = check_int(pair[1], f"destination of edge #{k}")
            for a in (s, d):
                if not 0 <= a < n:
                    raise TopologyError(f"edge #{k} ({s}, {d}) names agent {a}, but agents are 0..{n - 1}")
            if s == d:
                raise TopologyError(f"edge #{k} ({s}, {d}) is a self-loop; self-weights come from the weight scheme")
            key = (s, d) if directed else (min(s, d), max(s, d))
            if key in seen:
                first = seen[key]
                if first == (s, d):
                    raise TopologyError(f"duplicate edge ({s}, {d})")
                raise TopologyError(
                    f"edge ({s}, {d}) duplicates edge {first}: the graph is undirected, "
                    "so (a, b) and (b, a) are the same edge"
                )
            seen[key] = (s, d)
            adj[d, s] = True
            if not directed:
                adj[s, d] = True
        ins = [tuple(int(j) for j in np.flatnonzero(adj[i])) for i in range(n)]
        outs = [tuple(int(i) for i in np.flatnonzero(adj[:, j])) for j in range(n)]
        problem = connectivity_problem(ins, outs)
        if problem is not None:
            raise TopologyError(problem)
        stochastic = "column" if weights == "out_uniform" else "row"
        return cls(cls._weights_from_adjacency(adj, weights), name=name, stochastic=stochastic, _params=params)

    @staticmethod
    def _weights_from_adjacency(adj: np.ndarray, weights: str) -> Tensor:
        """Mixing matrix for a boolean adjacency ``adj[dst, src]`` (no diagonal)."""
        n = adj.shape[0]
        A = torch.as_tensor(adj, dtype=torch.float64)
        if weights in ("uniform", "out_uniform"):
            M = A + torch.eye(n, dtype=torch.float64)
            # uniform: each receiver averages over its in-neighbours (rows sum to 1); out_uniform: each
            # sender splits over its out-neighbours (columns sum to 1)
            return M / M.sum(1, keepdim=True) if weights == "uniform" else M / M.sum(0, keepdim=True)
        asym = np.argwhere(adj & ~adj.T)
        if len(asym):
            d, s = (int(v) for v in asym[0])
            raise TopologyError(
                f"metropolis weights need an undirected graph, but edge ({s}, {d}) has no reverse ({d}, {s}); "
                "use weights='uniform' for directed graphs"
            )
        deg = A.sum(1)
        W = A / (1 + torch.maximum(deg[:, None], deg[None, :]))
        W += torch.diag(1 - W.sum(1))
        return W

    # Immutability: attributes are set once in __init__.
    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"Topology is immutable (cannot set {key!r})")

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"Topology is immutable (cannot delete {key!r})")

    def __reduce__(self) -> tuple[Callable[..., Topology], tuple[Any, ...]]:
        return _rebuild, (self._W.clone(), self._name, dict(self._params), self._connected, self._stochastic)

    # -------------------------------------------------------------- named constructors

    @classmethod
    def _undirected(cls, n: int, pairs: Iterable[tuple[int, int]], weights: str, name: str,
                    params: dict[str, Any] | None = None) -> Topology:
        """From unordered pairs that may repeat or include (i, i) (they are dropped first)."""
        uniq = sorted({(min(a, b), max(a, b)) for a, b in pairs if a != b})
        return cls._from_edges(n, uniq, False, weights, name, params or {})

    @classmethod
    def ring(cls, n: int, weights: str = "uniform") -> Topology:
        """Undirected cycle 0-1-...-(n-1)-0.

        Degenerate cases: ``n = 1`` is a lone agent (``W = [[1]]``) and ``n = 2`` a single edge
        (both agents average with each other); every agent has degree 2 only for ``n >= 3``.
        """
        n = check_int(n, "n (number of agents)", 1, MAX_AGENTS)
        return cls._undirected(n, ((i, (i + 1) % n) for i in range(n)), weights, "ring")

    @classmethod
    def directed_ring(cls, n: int, weights: str = "uniform") -> Topology:
        """Agent i receives from agent i-1 only (w = 1/2 each); the smallest strongly connected digraph.

        ``n = 1`` is a lone agent; ``n = 2`` coincides with the undirected single edge.
        """
        n = check_int(n, "n (number of agents)", 1, MAX_AGENTS)
        edges = sorted({((i - 1) % n, i) for i in range(n) if (i - 1) % n != i})
        return cls._from_edges(n, edges, True, weights, "directed_ring", {})

    @classmethod
    def torus(cls, rows: int, cols: int | None = None, weights: str = "uniform") -> Topology:
        """2-D ``rows x cols`` grid with wrap-around; agent id = ``row * cols + col``.

        ``torus(n)`` factors n into the most square ``r x c`` with ``r, c >= 3`` if possible, else
        with ``r, c >= 2`` (e.g. 8 -> 2 x 4), else raises. Neighbour sets are *sets*: on a side of
        length 2 the up and down (or left and right) neighbours are the same agent, so a ``2 x c``
        torus has degree 3 (c >= 3) and ``2 x 2`` is a 4-cycle. With explicit sides, a side of 1 is
        allowed and degenerates to a ring.
        """
        if cols is None:
            n = check_int(rows, "n (number of agents)", 1, MAX_AGENTS)
            r, c = cls._torus_shape(n)
        else:
            r = check_int(rows, "rows", 1)
            c = check_int(cols, "cols", 1)
        n = check_int(r * c, "n = rows x cols (number of agents)", 1, MAX_AGENTS)
        pairs = []
        for i in range(r):
            for j in range(c):
                a = i * c + j
                pairs.append((a, ((i + 1) % r) * c + j))
                pairs.append((a, i * c + (j + 1) % c))
        return cls._undirected(n, pairs, weights, "torus", {"rows": r, "cols": c})

    @staticmethod
    def _torus_shape(n: int) -> tuple[int, int]:
        """Most square factorisation ``r x c`` (``r <= c``), preferring ``r >= 3`` over ``r = 2``."""
        for lo in (3, 2):
            for r in range(math.isqrt(n), lo - 1, -1):
                if n % r == 0:
                    return r, n // r
        raise TopologyError(
            f"n={n} cannot be arranged as an r x c torus (needs r, c >= 2 with r * c = n); "
            "pass rows and cols explicitly or pick another n or topology"
        )

    @classmethod
    def full(cls, n: int, weights: str = "uniform") -> Topology:
        """Complete graph: every agent receives from every other (W = 1/n everywhere)."""
        n = check_int(n, "n (number of agents)", 1, MAX_AGENTS)
        return cls._undirected(n, ((i, j) for i in range(n) for j in range(i + 1, n)), weights, "full")

    @classmethod
    def chain(cls, n: int, weights: str = "uniform") -> Topology:
        """Path 0-1-...-(n-1): a ring without its closing edge, the worst-connected tree."""
        n = check_int(n, "n (number of agents)", 1, MAX_AGENTS)
        return cls._undirected(n, ((i, i + 1) for i in range(n - 1)), weights, "chain")

    @classmethod
    def star(cls, n: int, weights: str = "uniform") -> Topology:
        """Agent 0 is the hub, linked to every other agent; leaves are linked only to the hub."""
        n = check_int(n, "n (number of agents)", 1, MAX_AGENTS)
        return cls._undirected(n, ((0, i) for i in range(1, n)), weights, "star")

    @classmethod
    def exponential(cls, n: int, directed: bool = False, weights: str = "uniform") -> Topology:
        """Exponential graph: links at distances 2^k (2^k < n) around the ring.

        Undirected (default): agent i is linked to i ± 2^k mod n (as a set, so i + n/2 and i - n/2
        count once). ``directed=True``: the one-peer-per-power variant, i sends to i + 2^k, so it
        receives from i - 2^k; in- and out-degree are both ceil(log2 n).
        """
        n = check_int(n, "n (number of agents)", 1, MAX_AGENTS)
        hops = [1 << k for k in range(max(n - 1, 0).bit_length())]  # all 2^k < n
        if not directed:
            return cls._undirected(n, ((i, (i + h) % n) for i in range(n) for h in hops), weights,
                                   "exponential")
        edges = sorted({(i, (i + h) % n) for i in range(n) for h in hops})
        return cls._from_edges(n, edges, True, weights, "exponential", {})

    @classmethod
    def circulant(cls, n: int, offsets: Sequence[int], weights: str = "uniform") -> Topology:
        """Circulant graph C_n(offsets): agent i is linked to i ± o mod n for every offset o.

        Offsets are distinct integers in 1 .. n // 2: o and n - o give the same links, so a larger one
        would only repeat another under a different name, and o = n / 2 links each agent once (i + o and
        i - o coincide). ``C_n(1)`` is the ring, ``C_n(1, 4)`` what the GUT authors' code calls a torus.
        """
        n = check_int(n, "n (number of agents)", 1, MAX_AGENTS)
        if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Sequence) or not offsets:
            raise TopologyError(f"offsets must be a non-empty list of integers, e.g. offsets=[1, 4], got {offsets!r}")
        if n < 2:
            raise TopologyError("a circulant graph needs n >= 2 agents: with one agent there is no offset to link")
        checked: list[int] = []
        for o in offsets:
            o = check_int(o, "every circulant offset")
            if not 1 <= o <= n // 2:
                raise TopologyError(f"circulant offset {o} is outside 1 .. n // 2 = {n // 2} (n={n}; offsets o and "
                                    "n - o give the same links)")
            if o in checked:
                raise TopologyError(f"circulant offset {o} is given twice")
            checked.append(o)
        # C_n(offsets) is connected exactly when gcd(n, offsets) = 1; say so before the generic check does
        g = math.gcd(n, *checked)
        if g > 1:
            raise TopologyError(f"circulant C_{n}({', '.join(map(str, checked))}) is not connected: every offset and "
                                f"n share the factor {g}, so agent 0 only reaches multiples of {g}")
        pairs = ((i, (i + o) % n) for i in range(n) for o in checked)
        return cls._undirected(n, pairs, weights, "circulant", {"offsets": checked})

    @classmethod
    def lcf(cls, jumps: Sequence[int], repeats: int = 1, weights: str = "uniform", name: str = "lcf") -> Topology:
        """Cubic Hamiltonian graph in LCF notation [jumps]^repeats: the cycle 0-1-...-(N-1)-0 with
        N = len(jumps) * repeats, plus a chord from i to i + jumps[i mod len(jumps)] mod N.

        The chords must pair the agents up: the jump at i + d must lead back by -d.
        """
        if isinstance(jumps, (str, bytes)) or not isinstance(jumps, Sequence) or not jumps:
            raise TopologyError(f"LCF jumps must be a non-empty list of integers, got {jumps!r}")
        steps = [check_int(d, "every LCF jump") for d in jumps]
        n = check_int(len(steps) * check_int(repeats, "LCF repeats", 1), "n = len(jumps) x repeats", 1, MAX_AGENTS)
        pairs = []
        for i in range(n):
            d = steps[i % len(steps)]
            j = (i + d) % n
            if j in (i, (i + 1) % n, (i - 1) % n):
                raise TopologyError(f"LCF jump {d} at agent {i} lands on {j}, which is {i} or its neighbour on the "
                                    f"cycle of {n} agents")
            back = steps[j % len(steps)]
            if (j + back) % n != i:
                raise TopologyError(f"LCF [{', '.join(map(str, steps))}]^{repeats} is not a graph: agent {i} jumps "
                                    f"{d} to {j}, but {j} jumps {back} to {(j + back) % n}")
            pairs += [(i, (i + 1) % n), (i, j)]
        return cls._undirected(n, pairs, weights, name, {})

    @classmethod
    def petersen(cls, weights: str = "uniform") -> Topology:
        """The Petersen graph: 10 agents, 3-regular, diameter 2, girth 5.

        Agents 0-4 form a pentagon (i ~ i + 1), agents 5-9 a pentagram (5 + i ~ 5 + (i + 2) mod 5), and
        spokes join i ~ 5 + i. (The GUT authors' code calls another graph "Petersen"; this is the true one.)
        """
        pairs = [(i, (i + 1) % 5) for i in range(5)] + [(5 + i, 5 + (i + 2) % 5) for i in range(5)]
        return cls._undirected(10, pairs + [(i, 5 + i) for i in range(5)], weights, "petersen")

    @classmethod
    def dyck(cls, weights: str = "uniform") -> Topology:
        """The Dyck graph, LCF [5, -5, 13, -13]^8: 32 agents, cubic, bipartite, diameter 5, girth 6."""
        return cls.lcf([5, -5, 13, -13], 8, weights=weights, name="dyck")

    @classmethod
    def erdos_renyi(cls, n: int, p: float, seed: int | None = 0, max_tries: int = 100,
                    weights: str = "uniform", directed: bool = False) -> Topology:
        """Random undirected G(n, p), redrawn until connected; the same seed gives the same graph.

        Uses ``numpy.random.default_rng(seed)``; raises after ``max_tries`` disconnected draws.
        ``directed=True``: every ordered pair is an edge ``i -> j`` with probability p, redrawn until
        strongly connected; in- and out-degrees then differ from agent to agent, the graph push-sum
        (``weights="out_uniform"``, algorithm ``sgp``) is made for.
        """
        if not isinstance(directed, bool):
            raise TopologyError(f"directed must be true or false, got {directed!r}")
        n = check_int(n, "n (number of agents)", 1, MAX_AGENTS)
        max_tries = check_int(max_tries, "max_tries", 1, 10_000)
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)):
            raise TopologyError(f"p must be a number in (0, 1], got {p!r}")
        p = float(p)
        if not 0 < p <= 1:
            raise TopologyError(f"p must be in (0, 1], got {p}")
        if seed is not None:
            seed = check_int(seed, "seed", 0)
        check_scheme(weights)
        rng = np.random.default_rng(seed)
        # candidate edges (src, dst): the pairs i < j undirected, every ordered pair i != j directed
        iu, ju = np.nonzero(~np.eye(n, dtype=bool)) if directed else np.triu_indices(n, k=1)
        params = {"p": p, "seed": seed}
        for attempt in range(1, max_tries + 1):
            keep = rng.random(len(iu)) < p
            pairs = list(zip(iu[keep].tolist(), ju[keep].tolist()))
            outs: list[list[int]] = [[] for _ in range(n)]
            ins: list[list[int]] = [[] for _ in range(n)]
            for a, b in pairs:
                outs[a].append(b)
                ins[b].append(a)
                if not directed:
                    outs[b].append(a)
                    ins[a].append(b)
            if connectivity_problem(ins, outs) is None:
                return cls._from_edges(n, pairs, directed, weights, "erdos_renyi", {**params, "tries": attempt})
        raise TopologyError(
            f"no {'strongly ' if directed else ''}connected Erdos-Renyi graph G(n={n}, p={p}) in {max_tries} draws "
            f"(seed={seed}); "
            f"raise p (connectivity needs roughly p > ln(n)/n = {math.log(max(n, 2)) / n:.3g}) or max_tries"
        )

    # -------------------------------------------------------------- accessors

    @property
    def n(self) -> int:
        """Number of agents."""
        return self._W.shape[0]

    @property
    def W(self) -> Tensor:
        """The mixing matrix (float64 [n, n]); a copy, so callers cannot mutate the topology."""
        return self._W.clone()

    @property
    def name(self) -> str:
        return self._name

    @property
    def params(self) -> dict[str, Any]:
        """Constructor parameters worth reporting (e.g. torus rows/cols, Erdos-Renyi p and seed)."""
        return dict(self._params)

    def _agent(self, i: int) -> int:
        i = check_int(i, "agent id")
        if not 0 <= i < self.n:
            raise TopologyError(f"agent {i} does not exist; agents are 0..{self.n - 1}")
        return i

    def in_neighbors(self, i: int) -> list[int]:
        """Agents that i receives from (W[i, j] > 0, j != i), sorted."""
        return list(self._in[self._agent(i)])

    neighbors = in_neighbors

    def out_neighbors(self, i: int) -> list[int]:
        """Agents that receive from i (W[j, i] > 0, j != i), sorted."""
        return list(self._out[self._agent(i)])

    def in_degree(self, i: int) -> int:
        return len(self._in[self._agent(i)])

    degree = in_degree

    def out_degree(self, i: int) -> int:
        return len(self._out[self._agent(i)])

    @property
    def in_degrees(self) -> list[int]:
        return [len(x) for x in self._in]

    @property
    def out_degrees(self) -> list[int]:
        return [len(x) for x in self._out]

    @property
    def edges(self) -> list[tuple[int, int]]:
        """Directed edges (src, dst) with W[dst, src] > 0, src != dst, sorted by (dst, src)."""
        return [(s, d) for d in range(self.n) for s in self._in[d]]

    @property
    def is_directed(self) -> bool:
        """True if some edge lacks its reverse (the sparsity pattern is not symmetric)."""
        return any(set(a) != set(b) for a, b in zip(self._in, self._out))

    @property
    def is_symmetric(self) -> bool:
        """W == W^T within 1e-12 (then W is also doubly stochastic)."""
        return bool(((self._W - self._W.T).abs() <= SYM_TOL).all())

    @property
    def stochastic(self) -> str:
        """Which sums of W the topology was validated for: "row" (the default) or "column" (push-sum)."""
        return self._stochastic

    @property
    def is_row_stochastic(self) -> bool:
        """Rows sum to 1 (within 1e-9): each agent averages what it receives, as every method but push-sum needs."""
        return bool(((self._W.sum(1) - 1).abs() <= ROW_TOL).all())

    @property
    def is_column_stochastic(self) -> bool:
        """Columns sum to 1 (within 1e-9): each agent splits what it sends, so gossip preserves the network's sum."""
        return bool(((self._W.sum(0) - 1).abs() <= ROW_TOL).all())

    @property
    def is_doubly_stochastic(self) -> bool:
        """Rows and columns sum to 1 (within 1e-9): plain averaging then preserves the network mean."""
        return self.is_row_stochastic and self.is_column_stochastic

    @property
    def is_regular(self) -> bool:
        """Every agent has the same in-degree and out-degree k."""
        degs = set(self.in_degrees) | set(self.out_degrees)
        return len(degs) == 1

    @property
    def spectral_gap(self) -> float:
        """1 - |lambda_2|, lambda_2 the eigenvalue of W of second-largest modulus (1.0 for n = 1).

        Larger means faster consensus; 0 means averaging with W need not converge.
        """
        if self._gap is None:
            if self.n == 1:
                gap = 1.0
            else:
                mods = np.sort(np.abs(np.linalg.eigvals(self._W.numpy())))[::-1]
                gap = float(min(max(1.0 - mods[1], 0.0), 1.0))
            object.__setattr__(self, "_gap", gap)
        return self._gap

    def consensus_warning(self, gamma: float = 1.0) -> str | None:
        """Why gossip with this W at gossip rate `gamma` never reaches consensus, or None.

        A spectral gap of 0 means W has an eigenvalue of modulus 1 besides the 1 of consensus (W = [[0, 1],
        [1, 0]] swaps two models forever). Gossip mixes with (1 - gamma) I + gamma W, which for gamma < 1
        moves such an eigenvalue inside the unit circle, so only gamma = 1 is hopeless.
        """
        if self.spectral_gap > 1e-9 or gamma < 1:
            return None
        return (f"W of {self.name} (n={self.n}) has spectral gap 0: an eigenvalue of modulus 1 besides consensus, "
                "so gossip with gamma=1 never averages the agents; use algorithm.gamma < 1 or weights with "
                "self-loops")

    def summary(self) -> dict[str, Any]:
        """Plain-data description for logs and reports."""
        return {
            "name": self.name,
            "n": self.n,
            "params": self.params,
            "n_edges": len(self.edges),
            "directed": self.is_directed,
            "symmetric": self.is_symmetric,
            "row_stochastic": self.is_row_stochastic,
            "column_stochastic": self.is_column_stochastic,
            "doubly_stochastic": self.is_doubly_stochastic,
            "regular": self.is_regular,
            "spectral_gap": self.spectral_gap,
            "in_degrees": self.in_degrees,
            "out_degrees": self.out_degrees,
        }

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self._params.items())
        return (f"Topology(name={self.name!r}, n={self.n}{extra}, edges={len(self.edges)}, "
                f"directed={self.is_directed}, spectral_gap={self.spectral_gap:.4g})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return self._W.shape == other._W.shape and bool(torch.equal(self._W, other._W))

    def __hash__(self) -> int:
        return hash((self.n, self._W.numpy().tobytes()))

