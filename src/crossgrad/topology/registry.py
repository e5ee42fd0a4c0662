"""Topologies by name, for configs and the command line: :data:`TOPOLOGIES` and :func:`make_topology`.

Besides the named graphs, two builders take the graph from the user:

* ``"edges"``: ``make_topology("edges", 4, edges=[[0, 1], [1, 2], [2, 3]], directed=False)``, an
  edge list of ``[src, dst]`` pairs (``dst`` receives from ``src``) with uniform or Metropolis weights.
* ``"file"``: ``make_topology("file", 4, path="W.txt")``, a mixing matrix read from a text file
  (one row per line, entries separated by commas and/or whitespace, ``#`` starts a comment line)
  or a NumPy ``.npy`` file. A relative path is relative to the working directory. Its rows must sum
  to 1, or its columns with ``stochastic="column"`` (a push-sum W, for algorithm ``sgp``).

Every graph built from edges also takes ``weights="out_uniform"``: each agent splits its mass
uniformly over itself and its out-neighbours, a column-stochastic W for push-sum
(``make_topology("exponential", 6, directed=True, weights="out_uniform")``).
"""
from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crossgrad.topology.basegraph import BaseGraph
from crossgrad.topology.checks import MAX_AGENTS, TopologyError, check_int
from crossgrad.topology.graph import Topology
from crossgrad.topology.timevarying import OnePeerExponential, RandomMatching, TimeVaryingTopology
from crossgrad.topology.trees import binary_tree, double_binary_trees


def _make_ring(n: int, weights: str = "uniform") -> Topology:
    return Topology.ring(n, weights=weights)


def _make_directed_ring(n: int, weights: str = "uniform") -> Topology:
    return Topology.directed_ring(n, weights=weights)


def _make_torus(n: int, rows: int | None = None, cols: int | None = None, weights: str = "uniform") -> Topology:
    n = check_int(n, "n (number of agents)", 1, MAX_AGENTS)
    if rows is None and cols is None:
        return Topology.torus(n, weights=weights)
    if rows is None or cols is None:
        side = check_int(rows if rows is not None else cols, "rows" if rows is not None else "cols", 1)
        if n % side:
            raise TopologyError(f"n={n} agents cannot fill a torus with a side of {side}")
        rows, cols = (side, n // side) if rows is not None else (n // side, side)
    topo = Topology.torus(rows, cols, weights=weights)
    if topo.n != n:
        raise TopologyError(f"torus {rows} x {cols} has {topo.n} agents, not n={n}")
    return topo


def _make_full(n: int, weights: str = "uniform") -> Topology:
    return Topology.full(n, weights=weights)


def _make_chain(n: int, weights: str = "uniform") -> Topology:
    return Topology.chain(n, weights=weights)


def _make_star(n: int, weights: str = "uniform") -> Topology:
    return Topology.star(n, weights=weights)


def _make_exponential(n: int, directed: bool = False, weights: str = "uniform") -> Topology:
    return Topology.exponential(n, directed=directed, weights=weights)


def _make_circulant(n: int, offsets: Sequence[int] | None = None, weights: str = "uniform") -> Topology:
    if offsets is None:
        raise TopologyError("circulant needs offsets, e.g. offsets=[1, 4]: agent i is linked to i ± each offset")
    return Topology.circulant(n, offsets, weights=weights)


def _fixed_size(name: str, size: int, build: Callable[[str], Topology]) -> Callable[..., Topology]:
    """Builder of a named graph that exists for one number of agents only."""

    def make(n: int, weights: str = "uniform") -> Topology:
        if check_int(n, "n (number of agents)", 1, MAX_AGENTS) != size:
            raise TopologyError(f"the {name} graph has exactly {size} agents, not n={n}")
        return build(weights)

    return make


def _make_erdos_renyi(n: int, p: float | None = None, seed: int | None = 0, max_tries: int = 100,
                      weights: str = "uniform", directed: bool = False) -> Topology:
    if p is None:
        raise TopologyError("erdos_renyi needs an edge probability p in (0, 1], e.g. p=0.3")
    return Topology.erdos_renyi(n, p, seed=seed, max_tries=max_tries, weights=weights, directed=directed)




def _make_edges(n: int, edges: Sequence[Sequence[int]] | None = None, directed: bool = False,
                weights: str = "uniform") -> Topology:
    if edges is None:
        raise TopologyError("topology 'edges' needs an edge list, e.g. edges=[[0, 1], [1, 2], [2, 0]]")
    if not isinstance(directed, bool):
        raise TopologyError(f"directed must be true or false, got {directed!r}")
    return Topology.from_edges(n, edges, directed=directed, weights=weights, name="edges")


# a comma with optional spaces, or a run of whitespace: "1,,2" leaves an empty entry and is an error
_SEPARATORS = re.compile(r"\s*,\s*|\s+")


def _parse_text_matrix(text: str, where: str) -> np.ndarray:
    """Rows of numbers, one per line; blank lines and ``#`` comment lines are skipped."""
    rows: list[list[float]] = []
    first_line = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        row = []
        for token in _SEPARATORS.split(line):
            try:
                row.append(float(token))
            except ValueError:
                raise TopologyError(f"{where}, line {lineno}: {token!r} is not a number") from None
        if rows and len(row) != len(rows[0]):
            raise TopologyError(
                f"{where}, line {lineno}: {len(row)} entries, but line {first_line} has {len(rows[0])}; "
                "every row of W needs one entry per agent"
            )
        if not rows:
            first_line = lineno
        rows.append(row)
    if not rows:
        raise TopologyError(f"{where} holds no matrix (only blank or comment lines)")
    return np.array(rows, dtype=np.float64)


def load_mixing_matrix(path: str | os.PathLike[str]) -> np.ndarray:
    """Read W from a ``.npy`` file or a text file; any problem is a one-line :class:`TopologyError`."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TopologyError(f"path must name a file holding the mixing matrix W, got {path!r}")
    p = Path(path)
    where = f"mixing matrix file {str(p)!r}"
    if not p.is_file():
        raise TopologyError(f"{where} {'is not a file' if p.exists() else 'does not exist'}")
    if p.suffix.lower() == ".npy":
        try:
            # memory-mapped: a wrong-sized file is rejected without reading it all
            return np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise TopologyError(f"{where} is not a readable .npy array: {err}") from None
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TopologyError(f"cannot read {where}: {err}") from None
    return _parse_text_matrix(text, where)


def _make_file(n: int, path: str | os.PathLike[str] | None = None, weights: str = "uniform",
               stochastic: str = "row") -> Topology:
    # configs always pass their weights scheme; only a non-default one is a mistake here
    if weights != "uniform":
        raise TopologyError(f"weights={weights!r} does not apply to topology 'file': the file gives W itself")
    if path is None:
        raise TopologyError("topology 'file' needs path=... naming a file that holds the mixing matrix W")
    n = check_int(n, "n (number of agents)", 1, MAX_AGENTS)
    W = load_mixing_matrix(path)
    where = f"mixing matrix file {str(path)!r}"
    if W.ndim == 2 and W.shape[0] == W.shape[1] and W.shape[0] != n:
        raise TopologyError(f"{where} holds a {W.shape[0]} x {W.shape[1]} matrix, but n={n} agents")
    try:
        return Topology(np.array(W), name="file", stochastic=stochastic, _params={"path": str(path)})
    except TopologyError as err:
        raise TopologyError(f"{where}: {err}") from None


#: name -> builder(n, **options); used by configs through :func:`make_topology`.
TOPOLOGIES: dict[str, Callable[..., Topology | TimeVaryingTopology]] = {
    "ring": _make_ring,
    "directed_ring": _make_directed_ring,
    "torus": _make_torus,
    "full": _make_full,
    "chain": _make_chain,
    "star": _make_star,
    # RelaySGD's spanning trees (crossgrad.topology.trees)
    "binary_tree": binary_tree,
    "double_binary_trees": double_binary_trees,
    "exponential": _make_exponential,
    "erdos_renyi": _make_erdos_renyi,
    "circulant": _make_circulant,
    "petersen": _fixed_size("Petersen", 10, Topology.petersen),
    "dyck": _fixed_size("Dyck", 32, Topology.dyck),
    "edges": _make_edges,
    "file": _make_file,
    # time-varying: a graph per step (crossgrad.topology.timevarying)
    "one_peer_exponential": OnePeerExponential,
    "random_matching": RandomMatching,
    "base_graph": BaseGraph,
}


def make_topology(name: str, n: int, **kw: Any) -> Topology | TimeVaryingTopology:
    """Build a named topology of n agents, e.g. ``make_topology("erdos_renyi", 8, p=0.4, seed=1)``.

    Names are case-insensitive and ``-`` may stand for ``_``. Unknown names or options raise
    :class:`TopologyError` listing what is accepted, so config typos fail loudly.
    """
    if not isinstance(name, str):
        raise TopologyError(f"topology name must be a string, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key not in TOPOLOGIES:
        raise TopologyError(f"unknown topology {name!r}; choose one of {', '.join(sorted(TOPOLOGIES))}")
    builder = TOPOLOGIES[key]
    accepted = [p for p in inspect.signature(builder).parameters if p != "n"]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise TopologyError(
            f"unknown option(s) {', '.join(unknown)} for topology {key!r}; accepted: {', '.join(accepted)}"
        )
    return builder(n, **kw)
