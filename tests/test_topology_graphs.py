"""The named graphs from the literature (Petersen, Dyck and LCF graphs, circulants, Base-(k+1) graphs),
each against invariants known independently of its construction: sizes, degrees, diameter, girth,
spectra, exact averaging; then the Base-(k+1) graph in the engine and on the command line."""
from __future__ import annotations

import copy
import math
import pickle
from collections import deque

import numpy as np
import pytest
import torch
from torch import nn

import crossgrad as cg
from crossgrad.cli import main
from crossgrad.topology import BaseGraph, Topology, TopologyError, make_topology
from tiny import small_batches as make_batches
from tiny import small_model as tiny_model

# -- graph invariants, computed plainly from the sparsity pattern of W ------------------------------


def adjacency(topo: Topology) -> dict[int, set[int]]:
    pos = topo.W.numpy() > 0
    return {i: {j for j in range(topo.n) if pos[i, j] and j != i} for i in range(topo.n)}


def distances(adj: dict[int, set[int]], root: int) -> dict[int, int]:
    dist = {root: 0}
    queue = deque([root])
    while queue:
        u = queue.popleft()
        for v in adj[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def diameter(adj: dict[int, set[int]]) -> int:
    out = 0
    for r in adj:
        dist = distances(adj, r)
        assert len(dist) == len(adj), "not connected"
        out = max(out, max(dist.values()))
    return out


def girth(adj: dict[int, set[int]]) -> int:
    """Shortest cycle: from every root, a non-tree edge (u, v) of the BFS closes a cycle of at most
    d(u) + d(v) + 1, and the root on a shortest cycle gets exactly its length."""
    best = math.inf
    for r in adj:
        dist, parent = {r: 0}, {r: None}
        queue = deque([r])
        while queue:
            u = queue.popleft()
            for v in adj[u]:
                if v not in dist:
                    dist[v], parent[v] = dist[u] + 1, u
                    queue.append(v)
                elif parent[u] != v:
                    best = min(best, dist[u] + dist[v] + 1)
    return best


def is_bipartite(adj: dict[int, set[int]]) -> bool:
    dist = distances(adj, 0)
    return all((dist[u] - dist[v]) % 2 for u in adj for v in adj[u])


def adjacency_spectrum(topo: Topology) -> np.ndarray:
    A = (topo.W.numpy() > 0).astype(np.float64)
    np.fill_diagonal(A, 0)
    return np.sort(np.linalg.eigvalsh(A))


def assert_regular_uniform(topo: Topology, degree: int) -> None:
    """Every agent has `degree` neighbours, and uniform weights are then 1 / (degree + 1) everywhere."""
    adj = adjacency(topo)
    assert all(len(adj[i]) == degree for i in adj)
    A = torch.tensor([[float(j in adj[i]) for j in range(topo.n)] for i in range(topo.n)], dtype=torch.float64)
    torch.testing.assert_close(topo.W, (torch.eye(topo.n, dtype=torch.float64) + A) / (degree + 1), rtol=0, atol=1e-15)
    assert topo.is_symmetric and topo.is_doubly_stochastic and not topo.is_directed


# -- Petersen, Dyck, LCF ----------------------------------------------------------------------------


def test_petersen_is_the_strongly_regular_graph_10_3_0_1():
    """srg(10, 3, 0, 1) (adjacent agents share no neighbour, non-adjacent ones exactly one) is the
    Petersen graph and no other; it has diameter 2, girth 5 and adjacency spectrum 3, 1^5, (-2)^4."""
    topo = make_topology("petersen", 10)
    assert topo.n == 10 and len(topo.edges) == 2 * 15 and topo.name == "petersen"
    assert_regular_uniform(topo, 3)
    adj = adjacency(topo)
    for i in range(10):
        for j in range(i + 1, 10):
            assert len(adj[i] & adj[j]) == (0 if j in adj[i] else 1), (i, j)
    assert diameter(adj) == 2 and girth(adj) == 5
    np.testing.assert_allclose(adjacency_spectrum(topo), [-2] * 4 + [1] * 5 + [3], atol=1e-12)
    assert make_topology("petersen", 10, weights="metropolis") == topo  # regular: both schemes agree


def test_dyck_graph_invariants():
    """32 agents, cubic, bipartite, diameter 5, girth 6; characteristic polynomial
    (x - 3)(x + 3)(x - 1)^9 (x + 1)^9 (x^2 - 5)^6."""
    topo = make_topology("dyck", 32)
    assert topo.n == 32 and len(topo.edges) == 2 * 48
    assert_regular_uniform(topo, 3)
    adj = adjacency(topo)
    assert diameter(adj) == 5 and girth(adj) == 6 and is_bipartite(adj)
    r5 = math.sqrt(5)
    np.testing.assert_allclose(adjacency_spectrum(topo), sorted([3, -3] + [1] * 9 + [-1] * 9 + [r5, -r5] * 6),
                               atol=1e-12)
    # the Hamiltonian cycle of the LCF notation is there
    assert all((i + 1) % 32 in adj[i] for i in range(32))


@pytest.mark.parametrize("repeats, n_diameter", [(7, 3), (8, 4)])
def test_lcf_builds_heawood_and_moebius_kantor(repeats, n_diameter):
    """[5, -5]^7 is the Heawood graph (14 agents, diameter 3), [5, -5]^8 the Moebius-Kantor graph
    (16 agents, diameter 4); both cubic with girth 6."""
    topo = Topology.lcf([5, -5], repeats)
    assert topo.n == 2 * repeats
    assert_regular_uniform(topo, 3)
    adj = adjacency(topo)
    assert diameter(adj) == n_diameter and girth(adj) == 6


@pytest.mark.parametrize("jumps, repeats, match", [
    ([5, -5, 13], 8, r"is not a graph: agent 0 jumps 5 to 5, but 5 jumps 13"),
    ([1, -1], 4, r"LCF jump 1 at agent 0 lands on 1"),
    ([0], 6, r"LCF jump 0 at agent 0 lands on 0"),
    ([], 3, r"non-empty list"),
    ([5, -5], 0, r"LCF repeats must be >= 1"),
    ([2.5], 4, r"every LCF jump must be an integer"),
])
def test_bad_lcf_notation_is_one_line_error(jumps, repeats, match):
    with pytest.raises(TopologyError, match=match):
        Topology.lcf(jumps, repeats)


@pytest.mark.parametrize("name, n", [("petersen", 9), ("petersen", 32), ("dyck", 10), ("dyck", 33)])
def test_fixed_size_graphs_refuse_other_n(name, n):
    with pytest.raises(TopologyError, match=rf"has exactly (10|32) agents, not n={n}"):
        make_topology(name, n)


# -- circulant --------------------------------------------------------------------------------------


def circulant_distance(n: int, offsets: list[int], d: int) -> int:
    """Fewest hops ±o (o in offsets) from 0 to d, by brute force over hop counts."""
    best = math.inf
    span = range(-n, n + 1)
    if len(offsets) == 1:
        return min(abs(a) for a in span if (a * offsets[0] - d) % n == 0)
    for a in span:
        for b in span:
            if (a * offsets[0] + b * offsets[1] - d) % n == 0:
                best = min(best, abs(a) + abs(b))
    return best


@pytest.mark.parametrize("n, offsets", [(16, [1, 4]), (10, [1, 5]), (9, [2]), (12, [1, 5]), (2, [1]), (7, [3, 1])])
def test_circulant_links_every_offset_both_ways(n, offsets):
    topo = make_topology("circulant", n, offsets=offsets)
    adj = adjacency(topo)
    for i in range(n):
        assert adj[i] == {(i + s * o) % n for o in offsets for s in (1, -1)}, i
    # o = n / 2 reaches one agent both ways
    assert_regular_uniform(topo, sum(1 if 2 * o == n else 2 for o in offsets))
    assert diameter(adj) == max(circulant_distance(n, offsets, d) for d in range(n))
    assert topo.params == {"offsets": offsets}


def test_circulant_of_one_offset_is_the_ring():
    assert make_topology("circulant", 11, offsets=[1]) == Topology.ring(11)
    assert Topology.circulant(8, [1, 4], weights="metropolis") == Topology.circulant(8, [1, 4])


@pytest.mark.parametrize("n, kw, match", [
    (8, {}, r"circulant needs offsets, e.g. offsets=\[1, 4\]"),
    (8, {"offsets": [-1]}, r"circulant offset -1 is outside 1 \.\. n // 2 = 4"),
    (8, {"offsets": [0, 1]}, r"circulant offset 0 is outside"),
    (8, {"offsets": [1, 5]}, r"circulant offset 5 is outside 1 \.\. n // 2 = 4 \(n=8; offsets o and n - o"),
    (8, {"offsets": [1, 1]}, r"circulant offset 1 is given twice"),
    (8, {"offsets": 4}, r"offsets must be a non-empty list of integers"),
    (8, {"offsets": []}, r"offsets must be a non-empty list of integers"),
    (8, {"offsets": [1.5]}, r"every circulant offset must be an integer"),
    (1, {"offsets": [1]}, r"a circulant graph needs n >= 2 agents"),
    (12, {"offsets": [2, 4]}, r"C_12\(2, 4\) is not connected: every offset and n share the factor 2"),
])
def test_bad_circulant_options_are_one_line_errors(n, kw, match):
    with pytest.raises(TopologyError, match=match) as err:
        make_topology("circulant", n, **kw)
    assert "\n" not in str(err.value)


# -- Base-(k+1) graphs -----------------------------------------------------------------------------

BASE_SIZES = list(range(1, 21)) + [23, 25, 27, 29, 31, 37, 45, 49, 63, 64, 97]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_base_graph_averages_exactly_after_one_period_with_at_most_k_peers(k):
    for n in BASE_SIZES:
        topo = make_topology("base_graph", n, k=k)
        J = torch.full((n, n), 1 / n, dtype=torch.float64)
        product = torch.eye(n, dtype=torch.float64)
        for t in range(topo.period):
            step = topo.at(t)
            W = step.W
            assert (W >= 0).all() and (torch.diagonal(W) > 0).all(), (n, k, t)
            torch.testing.assert_close(W, W.T, rtol=0, atol=0)
            for sums in (W.sum(0), W.sum(1)):
                torch.testing.assert_close(sums, torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
            assert max(step.in_degrees) <= k, (n, k, t, step.in_degrees)
            assert topo.at(t + topo.period) == step  # the period
            product = W @ product  # x <- W_t x, step after step
        torch.testing.assert_close(product, J, rtol=0, atol=1e-12, msg=f"n={n}, k={k}")
        torch.testing.assert_close(topo.mixing_matrix(), product, rtol=0, atol=0)
        # the length bound the authors' tests check; a power of k + 1 is the hyper-hypercube of log_{k+1} n rounds
        assert topo.period <= 2 * math.log(n, k + 1) + 2, (n, k, topo.period)
        p = round(math.log(n, k + 1))
        if (k + 1) ** p == n:
            assert topo.period == max(p, 1), (n, k)
        assert not topo.is_directed and topo.is_symmetric and topo.is_doubly_stochastic
        assert topo.spectral_gap == pytest.approx(1.0, abs=1e-9) and topo.consensus_warning() is None


def test_base_graph_of_prime_n_links_across_groups():
    """n = 5, k = 1: products of matrices with entries in {0, 1/2, 1} have dyadic entries and 1/5 is
    not one, so exact averaging with one peer per step needs a link whose weight is not 1/2."""
    topo = BaseGraph(5, k=1)
    weights = {round(float(w), 12) for t in range(topo.period) for w in topo.at(t).W.flatten() if 0 < w < 1}
    assert weights - {0.5}, weights


def test_base_graph_with_k_of_n_minus_1_or_more_is_full_averaging_one_agent_is_alone_and_it_pickles():
    for k in (4, 9):
        topo = BaseGraph(5, k=k)
        assert topo.period == 1 and topo.params == {"k": k}
        torch.testing.assert_close(topo.at(0).W, torch.full((5, 5), 0.2, dtype=torch.float64), rtol=0, atol=1e-15)
    assert BaseGraph(1).period == 1 and torch.equal(BaseGraph(1).at(3).W, torch.ones(1, 1, dtype=torch.float64))
    topo = BaseGraph(7, k=2)
    again = pickle.loads(pickle.dumps(topo))
    assert again.period == topo.period and all(again.at(t) == topo.at(t) for t in range(topo.period))


@pytest.mark.parametrize("kw, match", [
    ({"k": 0}, r"k \(the most peers of an agent per step\) must be >= 1, got 0"),
    ({"k": -2}, r"must be >= 1, got -2"),
    ({"k": 1.5}, r"must be an integer, got 1.5"),
    ({"k": True}, r"must be an integer, got True"),
    ({"weights": "metropolis"}, r"weights='metropolis' does not apply to topology 'base_graph'"),
    ({"seed": 1}, r"unknown option\(s\) seed for topology 'base_graph'; accepted: k, weights"),
])
def test_bad_base_graph_options_are_one_line_errors(kw, match):
    with pytest.raises(TopologyError, match=match):
        make_topology("base_graph", 6, **kw)
    with pytest.raises(TopologyError, match="step must be >= 0"):
        BaseGraph(6).at(-1)


# -- the engine on a Base-(k+1) graph ---------------------------------------------------------------


def grad_at(model: nn.Module, theta: torch.Tensor, batch) -> torch.Tensor:
    worker = copy.deepcopy(model)
    nn.utils.vector_to_parameters(theta.clone(), worker.parameters())
    loss = nn.functional.cross_entropy(worker(batch[0]), batch[1])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(worker.parameters()))])


def test_dsgd_on_base_graph_matches_per_agent_recomputation_and_resumes_mid_period():
    """n = 6, k = 1 (period 4): one agent at a time, x_i <- (1 - gamma) x_i + gamma sum_j W_t[i, j] x_j,
    then a Nesterov step at that point; past the end of one period, and resumed at step 3."""
    topo = BaseGraph(6, k=1)
    steps = topo.period + 2
    batches = make_batches(6, steps)
    algo = lambda: cg.make_algorithm("dsgd", lr=0.1, gamma=0.7, momentum=0.9, nesterov=True)  # noqa: E731
    sim = cg.Simulator(tiny_model(), topo, algo())
    for b in batches:
        sim.step(b)
    x0 = nn.utils.parameters_to_vector(tiny_model().parameters()).detach()
    x, m = [x0.clone() for _ in range(6)], [torch.zeros_like(x0) for _ in range(6)]
    for t, b in enumerate(batches):
        W = topo.at(t).W
        new = []
        for i in range(6):
            half = 0.3 * x[i] + 0.7 * sum(W[i, j] * x[j] for j in range(6))
            g = grad_at(tiny_model(), half, b[i])
            m[i] = 0.9 * m[i] + g
            new.append(half - 0.1 * (g + 0.9 * m[i]))
        x = new
    torch.testing.assert_close(sim.params, torch.stack(x), rtol=0, atol=1e-12)
    first = cg.Simulator(tiny_model(), BaseGraph(6, k=1), algo())
    for b in batches[:3]:
        first.step(b)
    second = cg.Simulator(tiny_model(seed=5), BaseGraph(6, k=1), algo())
    second.load_state_dict(first.state_dict())
    for b in batches[3:]:
        second.step(b)
    assert torch.equal(second.params, sim.params)
    assert torch.equal(second.stats["bytes_sent"], sim.stats["bytes_sent"])


# -- the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, lines", [
    (["petersen", "10"], ["topology          petersen", "agents            10", "in-degree         3",
                          "regular           yes"]),
    (["dyck", "32"], ["topology          dyck", "agents            32", "edges             96"]),
    (["circulant", "16", "--option", "offsets=[1,4]"], ["topology          circulant (offsets=[1, 4])",
                                                         "in-degree         4"]),
    (["base_graph", "12", "--option", "k=2"], ["topology          base_graph (k=2)", "period 3",
                                               "spectral gap      1 (of one period's product of W_t)"]),
])
def test_topology_command_describes_the_new_graphs(capsys, argv, lines):
    assert main(["topology", *argv]) == 0
    out = capsys.readouterr().out
    for line in lines:
        assert line in out, (line, out)


@pytest.mark.parametrize("argv, message", [
    (["petersen", "12"], "the Petersen graph has exactly 10 agents, not n=12"),
    (["circulant", "8", "--option", "offsets=[-1]"], "circulant offset -1 is outside"),
    (["base_graph", "8", "--option", "k=0"], "must be >= 1, got 0"),
])
def test_topology_command_refuses_bad_options_in_one_line(capsys, argv, message):
    assert main(["topology", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crossgrad: error: ") and message in err and err.count("\n") == 1
