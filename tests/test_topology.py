"""Tests for crossgrad.topology: neighbour sets, mixing matrices, spectra and every error path."""
from __future__ import annotations

import copy
import math
import pickle
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossgrad.topology import TOPOLOGIES, Topology, TopologyError, make_topology


def nbrs(topo: Topology, i: int) -> set[int]:
    return set(topo.in_neighbors(i))


def assert_row_stochastic(topo: Topology) -> None:
    W = topo.W
    assert W.dtype == torch.float64 and W.shape == (topo.n, topo.n)
    assert (W >= 0).all()
    torch.testing.assert_close(W.sum(1), torch.ones(topo.n, dtype=torch.float64), rtol=0, atol=1e-12)


ALL_BUILDERS = {
    "ring": lambda n: Topology.ring(n),
    "directed_ring": lambda n: Topology.directed_ring(n),
    "torus": lambda n: Topology.torus(n),
    "full": lambda n: Topology.full(n),
    "chain": lambda n: Topology.chain(n),
    "star": lambda n: Topology.star(n),
    "exponential": lambda n: Topology.exponential(n),
    "exponential_directed": lambda n: Topology.exponential(n, directed=True),
    "erdos_renyi": lambda n: Topology.erdos_renyi(n, 0.5, seed=3),
}


# ------------------------------------------------------------------ neighbour sets and degrees


def test_ring_neighbours():
    t = Topology.ring(6)
    assert t.n == 6 and t.name == "ring"
    assert t.in_neighbors(0) == [1, 5] and t.neighbors(3) == [2, 4]
    assert all(t.degree(i) == 2 for i in range(6))
    assert t.out_neighbors(0) == [1, 5]
    assert not t.is_directed and t.is_regular


def test_ring_degenerate_cases():
    one = Topology.ring(1)
    assert one.n == 1 and one.edges == [] and one.W.tolist() == [[1.0]]
    assert one.spectral_gap == 1.0 and one.is_regular and one.in_neighbors(0) == []
    two = Topology.ring(2)
    assert two.edges == [(1, 0), (0, 1)]
    assert two.W.tolist() == [[0.5, 0.5], [0.5, 0.5]]
    three = Topology.ring(3)
    assert three.W.equal(Topology.full(3).W)


def test_directed_ring():
    t = Topology.directed_ring(5)
    for i in range(5):
        assert t.in_neighbors(i) == [(i - 1) % 5]
        assert t.out_neighbors(i) == [(i + 1) % 5]
        assert t.W[i, i] == 0.5 and t.W[i, (i - 1) % 5] == 0.5
    assert t.is_directed and not t.is_symmetric and t.is_doubly_stochastic and t.is_regular
    assert t.edges == [(4, 0), (0, 1), (1, 2), (2, 3), (3, 4)]
    assert Topology.directed_ring(1).W.tolist() == [[1.0]]
    assert not Topology.directed_ring(2).is_directed


def test_torus_3x4():
    t = Topology.torus(3, 4)
    assert t.n == 12 and t.params == {"rows": 3, "cols": 4}
    # corner agent 0 = (0, 0): right (0,1)=1, left wraps (0,3)=3, down (1,0)=4, up wraps (2,0)=8
    assert nbrs(t, 0) == {1, 3, 4, 8}
    # agent 11 = (2, 3): left 10, right wraps 8, up 7, down wraps 3
    assert nbrs(t, 11) == {10, 8, 7, 3}
    # interior agent 5 = (1, 1)
    assert nbrs(t, 5) == {4, 6, 1, 9}
    assert all(t.degree(i) == 4 for i in range(12)) and t.is_regular


def test_torus_4x4():
    t = Topology.torus(4, 4)
    assert nbrs(t, 0) == {1, 3, 4, 12}
    assert nbrs(t, 15) == {14, 12, 11, 3}
    assert nbrs(t, 5) == {1, 4, 6, 9}
    assert Topology.torus(16).W.equal(t.W)


def test_torus_2xc_has_degree_three():
    t = Topology.torus(2, 5)
    assert t.n == 10
    # agent 0 = (0, 0): up and down are both agent 5 = (1, 0); left 4, right 1
    assert nbrs(t, 0) == {1, 4, 5}
    assert nbrs(t, 7) == {6, 8, 2}
    assert all(t.degree(i) == 3 for i in range(10))
    assert t.W[0, 5] == pytest.approx(0.25)
    assert t.is_symmetric


def test_torus_2x2_is_a_4_cycle():
    t = Topology.torus(2, 2)
    assert all(t.degree(i) == 2 for i in range(4))
    assert nbrs(t, 0) == {1, 2}


@pytest.mark.parametrize("n,shape", [(9, (3, 3)), (12, (3, 4)), (16, (4, 4)), (18, (3, 6)),
                                     (36, (6, 6)), (8, (2, 4)), (10, (2, 5)), (4, (2, 2)), (6, (2, 3))])
def test_torus_factorisation(n, shape):
    t = Topology.torus(n)
    assert (t.params["rows"], t.params["cols"]) == shape and t.n == n


def test_torus_n10_is_not_the_reference_circulant():
    t = Topology.torus(10)  # the reference's C_10(1, 5) gave agent 0 the neighbours {1, 9, 5}
    assert nbrs(t, 0) == {1, 4, 5}


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 11, 13])
def test_torus_not_factorable(n):
    with pytest.raises(TopologyError, match=rf"n={n} cannot be arranged as an r x c torus \(needs r, c >= 2"):
        Topology.torus(n)


def test_full():
    t = Topology.full(5)
    assert torch.allclose(t.W, torch.full((5, 5), 0.2, dtype=torch.float64))
    assert t.spectral_gap == pytest.approx(1.0)
    assert t.in_neighbors(2) == [0, 1, 3, 4]


def test_chain():
    t = Topology.chain(5)
    assert t.in_neighbors(0) == [1] and t.in_neighbors(4) == [3] and t.in_neighbors(2) == [1, 3]
    assert [t.degree(i) for i in range(5)] == [1, 2, 2, 2, 1]
    assert not t.is_regular and not t.is_symmetric and not t.is_directed
    assert t.W[0].tolist() == [0.5, 0.5, 0, 0, 0]


def test_star():
    t = Topology.star(6)
    assert t.in_neighbors(0) == [1, 2, 3, 4, 5]
    assert all(t.in_neighbors(i) == [0] for i in range(1, 6))
    assert t.degree(0) == 5 and t.degree(3) == 1
    assert torch.allclose(t.W[0], torch.full((6,), 1 / 6, dtype=torch.float64))
    assert t.W[4, 0] == 0.5 and t.W[4, 4] == 0.5


def test_exponential_8():
    t = Topology.exponential(8)
    assert nbrs(t, 0) == {1, 7, 2, 6, 4}
    assert nbrs(t, 3) == {2, 4, 1, 5, 7}
    assert all(t.degree(i) == 5 for i in range(8)) and t.is_symmetric


def test_exponential_16():
    t = Topology.exponential(16)
    assert nbrs(t, 0) == {1, 15, 2, 14, 4, 12, 8}
    assert all(t.degree(i) == 7 for i in range(16))


def test_exponential_directed():
    t = Topology.exponential(8, directed=True)
    assert t.out_neighbors(0) == [1, 2, 4]
    assert t.in_neighbors(0) == [4, 6, 7]
    assert t.is_directed and t.is_regular and t.is_doubly_stochastic
    assert Topology.exponential(16, directed=True).in_degree(5) == 4


# ------------------------------------------------------------------ mixing matrices


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 9, 12])
def test_row_stochastic_everywhere(name, n):
    if name == "torus" and n in (1, 2, 3):
        pytest.skip("not factorable")
    t = ALL_BUILDERS[name](n)
    assert t.n == n
    assert_row_stochastic(t)
    assert t.edges == sorted(t.edges, key=lambda e: (e[1], e[0]))
    assert all(s != d and t.W[d, s] > 0 for s, d in t.edges)
    assert 0.0 <= t.spectral_gap <= 1.0


@pytest.mark.parametrize("build", [
    lambda: Topology.ring(7), lambda: Topology.torus(3, 4), lambda: Topology.torus(2, 5),
    lambda: Topology.full(6), lambda: Topology.exponential(8), lambda: Topology.exponential(16),
])
def test_uniform_regular_undirected_is_symmetric(build):
    t = build()
    assert t.is_regular and t.is_symmetric and t.is_doubly_stochastic and not t.is_directed


@pytest.mark.parametrize("build", [
    lambda w: Topology.star(6, weights=w), lambda w: Topology.chain(5, weights=w),
    lambda w: Topology.ring(6, weights=w), lambda w: Topology.erdos_renyi(12, 0.3, seed=2, weights=w),
    lambda w: Topology.torus(2, 3, weights=w), lambda w: Topology.from_edges(4, [(0, 1), (1, 2), (1, 3)], weights=w),
])
def test_metropolis_symmetric_doubly_stochastic(build):
    t = build("metropolis")
    assert_row_stochastic(t)
    assert t.is_symmetric and t.is_doubly_stochastic
    uni = build("uniform")
    assert (t.W > 0).equal(uni.W > 0)  # same graph, different weights


def test_metropolis_values():
    t = Topology.star(4, weights="metropolis")  # hub degree 3, leaves degree 1
    assert t.W[1, 0] == pytest.approx(0.25) and t.W[1, 1] == pytest.approx(0.75)
    assert t.W[0, 0] == pytest.approx(0.25)


def test_uniform_irregular_not_doubly_stochastic():
    t = Topology.star(5)
    assert not t.is_doubly_stochastic and not t.is_symmetric


@pytest.mark.parametrize("n", [3, 4, 5, 6, 8, 10, 17, 32])
def test_ring_spectral_gap(n):
    expected = 1 - (1 + 2 * math.cos(2 * math.pi / n)) / 3
    assert Topology.ring(n).spectral_gap == pytest.approx(expected, abs=1e-10)


def test_spectral_gap_zero_for_periodic_matrix():
    t = Topology.from_weights([[0, 1], [1, 0]])  # no self-weight allowed; oscillates forever
    assert t.spectral_gap == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------ from_weights / from_edges


def test_from_weights_accepts_formats_and_copies():
    W = np.array([[0.5, 0.5, 0], [0.25, 0.5, 0.25], [0, 0.5, 0.5]])
    for src in (W, W.tolist(), torch.tensor(W, dtype=torch.float32)):
        t = Topology.from_weights(src, name="mine")
        assert t.W.dtype == torch.float64 and t.name == "mine"
        assert t.edges == [(1, 0), (0, 1), (2, 1), (1, 2)]
    tens = torch.tensor(W)
    t = Topology.from_weights(tens)
    tens[0, 0] = 7.0
    t.W[0, 0] = 9.0
    assert t.W[0, 0] == 0.5
    with pytest.raises(AttributeError):
        t.name = "x"  # type: ignore[misc]
    assert Topology(W).W.equal(t.W)


def test_from_weights_zero_diagonal_allowed():
    t = Topology.from_weights([[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    assert t.is_symmetric and t.in_neighbors(0) == [1, 2]


@pytest.mark.parametrize("W,match", [
    ([[0.5, 0.4], [0.5, 0.5]], r"row 0 of W sums to 0\.9, not 1"),
    ([[0.5, 0.5], [0.5, 0.5], [1, 0]], r"square"),
    ([1.0, 0.0], r"square"),
    ([[1.5, -0.5], [0.5, 0.5]], r"W\[0, 1\] = -0\.5 is negative"),
    ([[float("nan"), 1], [0.5, 0.5]], r"W\[0, 0\] is nan"),
    ([[float("inf"), 1], [0.5, 0.5]], r"finite"),
    (np.zeros((0, 0)), r"at least one agent"),
    ([[1, 0], [0, 1]], r"not connected: agents \{1\} cannot be reached from agent 0"),
    ([[1, 0], [0.5, 0.5]], r"not strongly connected: agent 0 cannot be reached from agents \{1\}"),
    ([[1, 0], [1]], r"cannot be read"),
    ([["a", "b"], ["c", "d"]], r"W"),
    ([[1 + 0j]], r"real"),
])
def test_from_weights_errors(W, match):
    with pytest.raises(TopologyError, match=match):
        Topology.from_weights(W)


def test_row_sum_tolerance():
    Topology.from_weights([[0.5 + 1e-12, 0.5], [0.5, 0.5]])
    with pytest.raises(TopologyError, match="row 1"):
        Topology.from_weights([[0.5, 0.5], [0.5, 0.5 + 1e-7]])


def test_from_weights_disconnected_message_lists_agents():
    W = torch.eye(6, dtype=torch.float64)
    W[:4, :4] = 0.25
    W[4:, 4:] = 0.5
    with pytest.raises(TopologyError, match=r"graph is not connected: agents \{4, 5\} cannot be reached from agent 0"):
        Topology.from_weights(W)
    assert issubclass(TopologyError, ValueError)


def test_from_edges_directed_and_undirected():
    t = Topology.from_edges(3, [(0, 1), (1, 2)], name="path")
    assert t.name == "path" and t.W.equal(Topology.chain(3).W)
    d = Topology.from_edges(3, [(0, 1), (1, 2), (2, 0)], directed=True)
    assert d.W.equal(Topology.directed_ring(3).W)
    assert d.in_neighbors(1) == [0] and d.out_neighbors(1) == [2]
    # a directed edge list that happens to be symmetric is an undirected graph
    s = Topology.from_edges(2, [(0, 1), (1, 0)], directed=True, weights="metropolis")
    assert not s.is_directed


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=3, edges=[(0, 1), (1, 1), (1, 2)]), r"self-loop"),
    (dict(n=3, edges=[(0, 1), (0, 1), (1, 2)]), r"duplicate edge \(0, 1\)"),
    (dict(n=3, edges=[(0, 1), (1, 0), (1, 2)]), r"edge \(1, 0\) duplicates edge \(0, 1\).*undirected"),
    (dict(n=3, edges=[(0, 1), (0, 1), (1, 2), (2, 0)], directed=True), r"duplicate edge \(0, 1\)"),
    (dict(n=3, edges=[(0, 1), (1, 3)]), r"agent 3.*0\.\.2"),
    (dict(n=3, edges=[(0, 1), (-1, 2)]), r"agent -1"),
    (dict(n=4, edges=[(0, 1), (2, 3)]), r"not connected: agents \{2, 3\} cannot be reached from agent 0"),
    (dict(n=3, edges=[(0, 1), (1, 2)], directed=True), r"not strongly connected"),
    (dict(n=3, edges=[(0, 1), (1, 2), (2, 0)], directed=True, weights="metropolis"), r"metropolis.*undirected"),
    (dict(n=3, edges=[(0, 1), (1, 2)], weights="max-degree"), r"weights must be 'uniform' or 'metropolis'"),
    (dict(n=0, edges=[]), r"n \(number of agents\) must be >= 1"),
    (dict(n=2.0, edges=[(0, 1)]), r"integer"),
    (dict(n=3, edges=[(0, 1, 2)]), r"not a \(src, dst\) pair"),
    (dict(n=3, edges=[(0, 1.5)]), r"integer"),
    (dict(n=3, edges=5), r"iterable"),
])
def test_from_edges_errors(kwargs, match):
    with pytest.raises(TopologyError, match=match):
        Topology.from_edges(**kwargs)


def test_metropolis_on_directed_constructors():
    with pytest.raises(TopologyError, match="metropolis"):
        Topology.directed_ring(4, weights="metropolis")
    with pytest.raises(TopologyError, match="metropolis"):
        Topology.exponential(8, directed=True, weights="metropolis")


@pytest.mark.parametrize("bad", [0, -3, 2.5, "4", True, None])
def test_constructors_validate_n(bad):
    for build in (Topology.ring, Topology.full, Topology.chain, Topology.star, Topology.exponential,
                  Topology.directed_ring):
        with pytest.raises(TopologyError):
            build(bad)


def test_agent_index_errors():
    t = Topology.ring(4)
    with pytest.raises(TopologyError, match="agent 4 does not exist"):
        t.in_neighbors(4)
    with pytest.raises(TopologyError):
        t.out_degree(-1)


# ------------------------------------------------------------------ Erdős–Rényi


def test_erdos_renyi_deterministic_and_connected():
    for seed in range(5):
        a = Topology.erdos_renyi(15, 0.25, seed=seed)
        b = Topology.erdos_renyi(15, 0.25, seed=seed)
        assert a == b and a.edges == b.edges
        assert not a.is_directed
        assert_row_stochastic(a)
    graphs = {tuple(Topology.erdos_renyi(15, 0.25, seed=s).edges) for s in range(5)}
    assert len(graphs) > 1
    assert Topology.erdos_renyi(6, 1.0, seed=0).W.equal(Topology.full(6).W)
    assert Topology.erdos_renyi(1, 0.5).n == 1


@pytest.mark.parametrize("p", [0, -0.1, 1.5, float("nan"), "0.5"])
def test_erdos_renyi_bad_p(p):
    with pytest.raises(TopologyError, match="p must be"):
        Topology.erdos_renyi(5, p)


def test_erdos_renyi_gives_up():
    with pytest.raises(TopologyError, match=r"no connected Erdos-Renyi graph G\(n=40, p=0.01\) in 3 draws"):
        Topology.erdos_renyi(40, 0.01, seed=0, max_tries=3)
    with pytest.raises(TopologyError, match="max_tries"):
        Topology.erdos_renyi(5, 0.5, max_tries=0)


# ------------------------------------------------------------------ summary, repr, factory, pickling


def test_summary_and_repr():
    t = Topology.torus(3, 4)
    s = t.summary()
    assert s["name"] == "torus" and s["n"] == 12 and s["n_edges"] == 48
    assert s["params"] == {"rows": 3, "cols": 4}
    assert s["directed"] is False and s["symmetric"] is True and s["doubly_stochastic"] is True
    assert s["regular"] is True and s["in_degrees"] == [4] * 12 and s["out_degrees"] == [4] * 12
    assert s["spectral_gap"] == pytest.approx(t.spectral_gap)
    r = repr(t)
    assert r.startswith("Topology(name='torus', n=12") and "rows=3" in r


def test_pickle_and_copy_roundtrip():
    t = Topology.erdos_renyi(8, 0.5, seed=4, weights="metropolis")
    for u in (pickle.loads(pickle.dumps(t)), copy.deepcopy(t), copy.copy(t)):
        assert u == t and u.name == t.name and u.params == t.params and hash(u) == hash(t)


def test_make_topology(tmp_path):
    assert set(TOPOLOGIES) == {"ring", "directed_ring", "torus", "full", "chain", "star", "exponential",
                               "erdos_renyi", "circulant", "petersen", "dyck", "edges", "file",
                               "one_peer_exponential", "random_matching", "base_graph",
                               "binary_tree", "double_binary_trees"}
    assert make_topology("ring", 5) == Topology.ring(5)
    assert make_topology("Directed-Ring", 4) == Topology.directed_ring(4)
    assert make_topology("torus", 12) == Topology.torus(3, 4)
    assert make_topology("torus", 12, rows=2, cols=6) == Topology.torus(2, 6)
    assert make_topology("torus", 12, cols=6).params == {"rows": 2, "cols": 6}
    assert make_topology("exponential", 8, directed=True).is_directed
    assert make_topology("star", 5, weights="metropolis").is_symmetric
    assert make_topology("erdos_renyi", 10, p=0.4, seed=7) == Topology.erdos_renyi(10, 0.4, seed=7)
    needs = {"erdos_renyi": {"p": 0.6}, "edges": {"edges": [[i, (i + 1) % 9] for i in range(9)]},
             "file": {"path": tmp_path / "W.npy"}, "circulant": {"offsets": [1, 3]}}
    sizes = {"petersen": 10, "dyck": 32}  # graphs of one size only
    np.save(tmp_path / "W.npy", Topology.ring(9).W.numpy())
    for name in TOPOLOGIES:
        n = sizes.get(name, 9)
        assert make_topology(name, n, **needs.get(name, {})).n == n


@pytest.mark.parametrize("args,kw,match", [
    (("hypercube", 8), {}, r"unknown topology 'hypercube'; choose one of base_graph, .*chain, circulant, directed_"),
    (("ring", 5), {"p": 0.3}, r"unknown option\(s\) p for topology 'ring'; accepted: weights"),
    (("erdos_renyi", 5), {}, r"needs an edge probability p"),
    (("torus", 12), {"rows": 3, "cols": 5}, r"3 x 5 has 15 agents, not n=12"),
    (("torus", 12), {"rows": 5}, r"side of 5"),
    (("torus", 7), {}, r"n=7 cannot be arranged"),
    (("ring", 0), {}, r">= 1"),
    ((3, 5), {}, r"name must be a string"),
])
def test_make_topology_errors(args, kw, match):
    with pytest.raises(TopologyError, match=match):
        make_topology(*args, **kw)


# ------------------------------------------------------------------ graphs given by the user: edges, file


def test_make_topology_edges_matches_from_edges():
    pairs = [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]]
    t = make_topology("edges", 4, edges=pairs)
    assert t == Topology.from_edges(4, pairs) and t.name == "edges"
    assert set(t.edges) == {(s, d) for s, d in pairs} | {(d, s) for s, d in pairs}
    assert make_topology("edges", 4, edges=pairs, weights="metropolis").is_symmetric
    directed = make_topology("edges", 3, edges=[[0, 1], [1, 2], [2, 0]], directed=True)
    assert directed.is_directed and directed.in_neighbors(0) == [2]


@pytest.mark.parametrize("kw,match", [
    ({}, r"topology 'edges' needs an edge list"),
    ({"edges": [[0, 1], [1, 5]]}, r"edge #1 \(1, 5\) names agent 5, but agents are 0..3"),
    ({"edges": [[0, 1], [-1, 2]]}, r"names agent -1"),
    ({"edges": [[0, 1], [2, 2]]}, r"edge #1 \(2, 2\) is a self-loop"),
    ({"edges": [[0, 1], [1, 2, 3]]}, r"edge #1 \(\[1, 2, 3\]\) is not a \(src, dst\) pair"),
    ({"edges": [[0, 1], [1.0, 2]]}, r"source of edge #1 must be an integer, got 1.0"),
    ({"edges": [[0, 1], 7]}, r"edge #1 \(7\) is not a \(src, dst\) pair"),
    ({"edges": "0-1"}, r"got a string"),
    ({"edges": [[0, 1], [1, 2]]}, r"agents \{3\} cannot be reached"),
    ({"edges": [[0, 1], [1, 2], [2, 3]], "directed": "yes"}, r"directed must be true or false, got 'yes'"),
    ({"edges": [[0, 1], [1, 2], [2, 3], [3, 0]], "directed": True, "weights": "metropolis"},
     r"metropolis weights need an undirected graph"),
])
def test_make_topology_edges_errors(kw, match):
    with pytest.raises(TopologyError, match=match):
        make_topology("edges", 4, **kw)


W_TEXT = """# a ring of 4, written by hand
0.5, 0.25, 0, 0.25
0.25 0.5 0.25 0

0    0.25  0.5  0.25
0.25,0,0.25,0.5
"""


def test_make_topology_file_text_npy_and_csv(tmp_path):
    lazy = 0.5 * np.eye(4) + 0.25 * (np.roll(np.eye(4), 1, axis=1) + np.roll(np.eye(4), -1, axis=1))
    (tmp_path / "W.txt").write_text(W_TEXT)
    t = make_topology("file", 4, path=str(tmp_path / "W.txt"))
    assert t == Topology(lazy) and t.name == "file" and t.params == {"path": str(tmp_path / "W.txt")}
    ring = Topology.ring(4)
    np.savetxt(tmp_path / "W.csv", ring.W.numpy(), delimiter=",")
    assert make_topology("file", 4, path=tmp_path / "W.csv") == ring
    np.save(tmp_path / "W.npy", Topology.exponential(8, directed=True).W.numpy())
    assert make_topology("file", 8, path=tmp_path / "W.npy") == Topology.exponential(8, directed=True)


@pytest.mark.parametrize("content,n,match", [
    (W_TEXT, 5, r"holds a 4 x 4 matrix, but n=5 agents"),
    ("1 0\n0 1 0\n", 2, r"line 2: 3 entries, but line 1 has 2"),
    ("0.5 0.5\n0.5 abc\n", 2, r"line 2: 'abc' is not a number"),
    ("0.5,,0.5\n0.5,0.5\n", 2, r"line 1: '' is not a number"),
    ("# nothing\n\n", 2, r"holds no matrix"),
    ("0.5 0.5 0\n0.5 0.5 0\n", 2, r"W must be a square n x n matrix, got shape \(2, 3\)"),
    ("0.5 0.6\n0.5 0.5\n", 2, r"row 0 of W sums to 1.1"),
    ("1.5 -0.5\n0.5 0.5\n", 2, r"W\[0, 1\] = -0.5 is negative"),
    ("1 0\n0 1\n", 2, r"graph is not connected"),
    ("nan 1\n0.5 0.5\n", 2, r"W\[0, 0\] is nan"),
])
def test_make_topology_file_bad_contents(tmp_path, content, n, match):
    path = tmp_path / "W.txt"
    path.write_text(content)
    with pytest.raises(TopologyError, match=match) as err:
        make_topology("file", n, path=str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_make_topology_file_bad_files(tmp_path):
    cases = {
        "does not exist": {"path": str(tmp_path / "missing.txt")},
        "is not a file": {"path": str(tmp_path)},
        "needs path=": {},
        "path must name a file": {"path": 3},
        "does not apply to topology 'file'": {"path": str(tmp_path / "W.txt"), "weights": "metropolis"},
    }
    (tmp_path / "bad.npy").write_bytes(b"not numpy at all")
    cases["is not a readable .npy array"] = {"path": str(tmp_path / "bad.npy")}
    (tmp_path / "latin1.txt").write_bytes(b"0.5 \xe9\n")
    cases["cannot read mixing matrix file"] = {"path": str(tmp_path / "latin1.txt")}
    np.save(tmp_path / "obj.npy", np.array([[0.5, None]], dtype=object), allow_pickle=True)
    cases["obj.npy' is not a readable .npy array"] = {"path": str(tmp_path / "obj.npy")}
    np.save(tmp_path / "big.npy", Topology.ring(6).W.numpy())
    cases["holds a 6 x 6 matrix, but n=4"] = {"path": str(tmp_path / "big.npy")}
    for match, kw in cases.items():
        with pytest.raises(TopologyError, match=re.escape(match)):
            make_topology("file", 4, **kw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet="0123456789.,-+e #\nnaif\t", max_size=80), st.binary(max_size=120),
       st.integers(1, 4))
def test_hostile_matrix_files_give_a_topology_or_a_topology_error(tmp_path, text, blob, n):
    (tmp_path / "W.txt").write_text(text)
    (tmp_path / "W.npy").write_bytes(b"\x93NUMPY\x01\x00" + blob)
    for name in ("W.txt", "W.npy"):
        try:
            t = make_topology("file", n, path=tmp_path / name)
        except TopologyError as err:
            assert "\n" not in str(err)
            continue
        assert t.n == n
        assert_row_stochastic(t)


# ------------------------------------------------------------------ property test


edge_lists = st.integers(min_value=1, max_value=7).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(st.tuples(st.integers(-1, n), st.integers(-1, n)), max_size=3 * n),
        st.booleans(),
        st.sampled_from(["uniform", "metropolis"]),
    )
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edge_lists)
def test_random_edge_lists_valid_or_topology_error(case):
    n, edges, directed, weights = case
    try:
        t = Topology.from_edges(n, edges, directed=directed, weights=weights)
    except TopologyError:
        return
    assert t.n == n
    assert_row_stochastic(t)
    # strongly connected: every agent reaches every other through powers of (W > 0)
    A = (t.W > 0).to(torch.float64) + torch.eye(n, dtype=torch.float64)
    reach = torch.linalg.matrix_power(A, max(n - 1, 1))
    assert (reach > 0).all()
    if weights == "metropolis":
        assert t.is_symmetric
    expected = {(s, d) for s, d in edges} | (set() if directed else {(d, s) for s, d in edges})
    assert set(t.edges) == expected
    assert 0.0 <= t.spectral_gap <= 1.0
