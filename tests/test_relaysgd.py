"""RelaySGD (`relaysgd`, RelaySum/Model and RelaySum/Grad) and its trees (`binary_tree`, `double_binary_trees`):
per-agent re-computation, exactness on heterogeneous quadratics, exact averaging of relayed values, resume,
bytes, tree invariants and what it refuses.

The reference below loops over agents and tree neighbours with dictionaries of received messages, as the
authors' RelayMechanism does, and shares nothing with the engine but the model.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import crossgrad as cg
from crossgrad.cli import main
from crossgrad.run import load_config
from crossgrad.topology import RandomMatching, Topology, make_topology
from crossgrad.topology.trees import binary_tree_pairs, double_binary_tree_pairs, relay_trees
from quadratics import Point, half_squared_distance
from tiny import small_batches as make_batches
from tiny import small_model as tiny_model


def run_sim(topo, batches, model=None, loss_fn=None, **kw) -> cg.Simulator:
    extra = {} if loss_fn is None else {"loss_fn": loss_fn}
    sim = cg.Simulator(model or tiny_model(), topo, cg.make_algorithm("relaysgd", **kw), **extra)
    for b in batches:
        sim.step(b)
    return sim


# ----------------------------------------------------------------------------------------------
# Independent reference
# ----------------------------------------------------------------------------------------------

def flat_grad(model: nn.Module, theta: torch.Tensor, batch) -> torch.Tensor:
    params, at = {}, 0
    for name, p in model.named_parameters():
        params[name] = theta[at:at + p.numel()].view_as(p).clone().requires_grad_(True)
        at += p.numel()
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])


def reference(model, n: int, trees: list[list[tuple[int, int]]], batches, *, lr, beta, nesterov, wd,
              relay) -> torch.Tensor:
    """Each agent: a local SGD step (wd in the gradient, torch's momentum forms), then per tree t, on the
    coordinates t::K: send to each neighbour j its value plus what the others sent last step, and a count;
    average what arrived, filling the agents not heard from with x0 (model) or nothing (grad)."""
    K = len(trees)
    nbrs = [{i: sorted({b for a, b in tr if a == i} | {a for a, b in tr if b == i}) for i in range(n)}
            for tr in trees]
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x = [x0.clone() for _ in range(n)]
    m = [torch.zeros_like(x0) for _ in range(n)]
    R = [{(i, j): torch.zeros_like(x0[t::K]) for i in range(n) for j in nbrs[t][i]} for t in range(K)]
    C = [{(i, j): 0 for i in range(n) for j in nbrs[t][i]} for t in range(K)]
    for step_batches in batches:
        v = []
        for i in range(n):
            g = flat_grad(model, x[i], step_batches[i]) + wd * x[i]
            m[i] = beta * m[i] + g
            d = (g + beta * m[i]) if nesterov else m[i]
            v.append(x[i] - lr * d)
        contrib = v if relay == "model" else [v[i] - x[i] for i in range(n)]
        new = [torch.empty_like(x0) for _ in range(n)]
        for t in range(K):
            msg, cnt = {}, {}
            for i in range(n):
                for j in nbrs[t][i]:
                    msg[i, j] = contrib[i][t::K] + sum((R[t][i, k] for k in nbrs[t][i] if k != j),
                                                       torch.zeros_like(x0[t::K]))
                    cnt[i, j] = 1 + sum(C[t][i, k] for k in nbrs[t][i] if k != j)
            for i in range(n):
                for j in nbrs[t][i]:
                    R[t][i, j], C[t][i, j] = msg[j, i], cnt[j, i]
                total = contrib[i][t::K] + sum((R[t][i, j] for j in nbrs[t][i]), torch.zeros_like(x0[t::K]))
                count = 1 + sum(C[t][i, j] for j in nbrs[t][i])
                if relay == "model":
                    if count < n:
                        total = total + (n - count) * x0[t::K]
                    new[i][t::K] = total / n
                else:
                    new[i][t::K] = x[i][t::K] + total / n
        x = new
    return torch.stack(x)


CASES = [
    ("chain", 5, dict(relay="model")),
    ("binary_tree", 6, dict(relay="grad", weight_decay=1e-2)),
    ("double_binary_trees", 7, dict(relay="model", nesterov=False, weight_decay=1e-2)),
    ("double_binary_trees", 6, dict(relay="grad")),
    ("star", 5, dict(relay="model", momentum=0.0)),
]


@pytest.mark.parametrize("graph,n,kw", CASES)
def test_matches_the_per_agent_recomputation(graph, n, kw):
    topo = make_topology(graph, n)
    batches = make_batches(n, 4)
    sim = run_sim(topo, batches, lr=0.1, **kw)
    a = cg.make_algorithm("relaysgd", lr=0.1, **kw)
    ref = reference(tiny_model(), n, relay_trees(topo), batches, lr=0.1, beta=a.momentum, nesterov=a.nesterov,
                    wd=a.weight_decay, relay=a.relay)
    torch.testing.assert_close(sim.params, ref, rtol=1e-12, atol=1e-12)


def test_bytes_are_a_row_and_a_count_per_edge_each_tree_half_the_coordinates():
    P = sum(p.numel() for p in tiny_model().parameters())  # 31: 16 coordinates on the first tree, 15 on the second
    for graph in ("chain", "double_binary_trees"):
        topo = make_topology(graph, 7)
        sim = run_sim(topo, make_batches(7, 3), lr=0.1)
        trees = relay_trees(topo)
        per_step = torch.zeros(7, dtype=torch.float64)
        for t, tree in enumerate(trees):
            row = 8 * len(range(t, P, len(trees))) + 8  # float64 coordinates + an int64 count
            for a, b in tree:
                per_step[a] += row
                per_step[b] += row
        sent = sim.stats["bytes_sent"]
        assert torch.equal(sent[:, 0], torch.zeros(7))  # no round 1: nothing is gossiped
        assert torch.equal(sent[:, 1], 3 * per_step), graph


# ----------------------------------------------------------------------------------------------
# Exactness: f_i(x) = 1/2 ||x - c_i||^2, and the relayed average of constant inputs
# ----------------------------------------------------------------------------------------------

def linear(out: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (out * c).sum(1).mean()  # gradient c_i, the same at every x


def targets(n: int) -> torch.Tensor:
    return torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def point_run(topo, c, steps, name="relaysgd", loss_fn=half_squared_distance, **kw) -> cg.Simulator:
    batches = [(torch.zeros(1, 1, dtype=torch.float64), c[i:i + 1]) for i in range(topo.n)]
    sim = cg.Simulator(Point(3), topo, cg.make_algorithm(name, **kw), loss_fn=loss_fn)
    for _ in range(steps):
        sim.step(batches)
    return sim


@pytest.mark.parametrize("graph,kw,lr,steps", [
    ("chain", dict(momentum=0.0), 0.5, 150), ("chain", dict(), 0.2, 300),  # Nesterov 0.9, the default: slower
    ("double_binary_trees", dict(momentum=0.0), 0.5, 150), ("double_binary_trees", dict(), 0.2, 300),
])
def test_relaysgd_reaches_the_mean_of_heterogeneous_optima_at_a_constant_lr(graph, kw, lr, steps):
    c = targets(6)
    sim = point_run(make_topology(graph, 6), c, steps, lr=lr, **kw)
    assert float((sim.params - c.mean(0)).abs().max()) < 1e-10


def test_dsgd_keeps_its_bias_on_the_same_chain():
    c = targets(6)
    sim = point_run(Topology.chain(6), c, 150, name="dsgd", lr=0.5, momentum=0.0)
    assert float((sim.params - c.mean(0)).abs().max()) > 0.05


def test_relay_averages_constant_updates_exactly_after_diameter_steps():
    """RelaySum/Grad on linear losses (constant gradients c_i, no momentum): from step D - 1 on (D the tree's
    diameter) every agent moves by exactly -lr mean(c); before, the far agents' updates are missing."""
    n, lr = 6, 0.1
    c = targets(n)
    for graph, diameter in (("chain", 5), ("double_binary_trees", 3)):  # both trees: depth 3 from 0 or 5
        topo = make_topology(graph, n)
        batches = [(torch.zeros(1, 1, dtype=torch.float64), c[i:i + 1]) for i in range(n)]
        sim = cg.Simulator(Point(3), topo, cg.make_algorithm("relaysgd", lr=lr, momentum=0.0, relay="grad"),
                           loss_fn=linear)
        moves = []
        for _ in range(diameter + 2):
            before = sim.params.clone()
            sim.step(batches)
            moves.append(sim.params - before)
        exact = (-lr * c.mean(0)).expand(n, -1)
        assert not torch.allclose(moves[diameter - 2], exact, rtol=0, atol=1e-6), graph
        for move in moves[diameter - 1:]:
            torch.testing.assert_close(move, exact, rtol=0, atol=1e-15)


def test_counts_reach_n_and_the_x0_fill_stops_after_diameter_steps():
    n = 7
    topo = Topology.chain(n)  # diameter 6
    sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm("relaysgd", lr=0.1))
    state = sim.engine.algo_state
    for step in range(1, 7):
        sim.step(make_batches(n, 1, seed=step)[0])
        seen = 1 + torch.zeros(n, dtype=torch.long).index_add_(0, state.owners[0], state.counts[0])
        expected = torch.tensor([min(n, 1 + min(i, step) + min(n - 1 - i, step)) for i in range(n)])
        assert torch.equal(seen, expected), step
    assert bool((seen == n).all())


@pytest.mark.parametrize("kw", [dict(), dict(relay="grad", weight_decay=1e-3)])
@pytest.mark.parametrize("stop", [0, 2])
def test_resume_from_state_dict_is_bit_exact(kw, stop):
    topo = make_topology("double_binary_trees", 6)
    batches = make_batches(6, 4)
    full = run_sim(topo, batches, lr=0.1, **kw)
    first = run_sim(topo, batches[:stop], lr=0.1, **kw)
    resumed = cg.Simulator(tiny_model(), topo, cg.make_algorithm("relaysgd", lr=0.1, **kw))
    resumed.load_state_dict(first.state_dict())
    for b in batches[stop:]:
        resumed.step(b)
    assert torch.equal(full.params, resumed.params)
    assert torch.equal(full.stats["bytes_sent"], resumed.stats["bytes_sent"])


# ----------------------------------------------------------------------------------------------
# The trees
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_binary_tree_is_the_authors_heap_with_agent_0_below_agent_1(n):
    topo = make_topology("binary_tree", n)
    assert len(topo.edges) == 2 * (n - 1) and not topo.is_directed  # n - 1 undirected edges; connected (validated)
    for w in range(n):
        # the authors' neighbours: agent 0 hangs below 1; agent w >= 1 has parent w // 2, children 2w, 2w + 1
        expected = ({1} if n > 1 else set()) if w == 0 else {w // 2} | {c for c in (2 * w, 2 * w + 1) if c < n}
        assert set(topo.neighbors(w)) == expected, w
    assert relay_trees(topo) == [sorted(binary_tree_pairs(n))]


@pytest.mark.parametrize("n", [2, 4, 7, 16])
def test_double_binary_trees_are_a_tree_and_its_mirror(n):
    topo = make_topology("double_binary_trees", n)
    first, mirror = relay_trees(topo)
    assert first == sorted(binary_tree_pairs(n))
    assert sorted((min(a, b), max(a, b)) for a, b in double_binary_tree_pairs(n)[1]) == mirror
    assert {(n - 1 - max(a, b), n - 1 - min(a, b)) for a, b in first} == set(mirror)
    for tree in (first, mirror):
        assert len(tree) == n - 1
        Topology.from_edges(n, tree)  # connected, or it raises
    assert {(min(s, d), max(s, d)) for s, d in topo.edges} == set(first) | set(mirror)
    if n >= 4:  # agent 0 is a leaf of the first tree, agent n - 1 of the mirror, and the union is no tree
        assert sum(0 in e for e in first) == 1 and sum(n - 1 in e for e in mirror) == 1
        union = sorted(set(first) | set(mirror))
        assert len(union) > n - 1 and relay_trees(Topology.from_edges(n, union)) is None


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

def test_graphs_that_are_not_trees_are_refused_naming_the_accepted_ones():
    relay = cg.make_algorithm("relaysgd")
    for bad in (Topology.ring(5), Topology.directed_ring(4), RandomMatching(4), Topology.full(4)):
        with pytest.raises(cg.ConfigError, match="not one .*use chain, binary_tree, double_binary_trees") as err:
            cg.Simulator(tiny_model(), bad, relay)
        assert "\n" not in str(err.value)
    for ok in (Topology.chain(4), Topology.star(4, weights="out_uniform"), Topology.from_edges(4, [(0, 1), (1, 2),
                                                                                                  (1, 3)])):
        cg.Simulator(tiny_model(), ok, relay)  # any tree, any weights: W is never used


@pytest.mark.parametrize("setting,message", [
    ('algorithm.relay="sum"', "relay must be 'model'"),
    ("algorithm.gamma=0.5", "relaysgd takes no gamma"),
    ("algorithm.qgm=true", "relaysgd takes no qgm"),
    ('algorithm.gamma_schedule="cosine"', "relaysgd takes no gamma_schedule"),
    ("training.local_steps=2", "relaysgd cannot: its relay sends"),
])
def test_bad_options_are_one_line_errors(setting, message, capsys):
    with pytest.raises(cg.ConfigError, match=message):
        load_config(None, ['algorithm.name="relaysgd"', setting])
    assert main(["config", "--set", 'algorithm.name="relaysgd"', "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crossgrad: error:") and message in err and "\n" not in err


def test_defaults_and_report_label():
    from crossgrad.run.config import method_label

    opts = cg.algorithm_options("relaysgd")
    assert (opts["relay"], opts["momentum"], opts["nesterov"], opts["gamma"]) == ("model", 0.9, True, 1.0)
    assert method_label(load_config(None, ['algorithm.name="relaysgd"'])) == "RelaySGD"
    assert method_label(load_config(None, ['algorithm.name="relaysgd"', 'algorithm.relay="grad"'])) == "RelaySum/Grad"
