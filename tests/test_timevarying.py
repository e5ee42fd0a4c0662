"""Time-varying topologies: the graphs themselves, the engine on them against a plain per-agent
re-computation, byte accounting per step's edges, bit-exact resume mid-period, the simulator against
torch.distributed with blocks of agents, and a run from the command line."""
from __future__ import annotations

import copy
import json
import math
import os
import pickle

import pytest
import torch
from torch import nn

import crossgrad as cg
from crossgrad.errors import ConfigError
from crossgrad.topology import (
    OnePeerExponential,
    RandomMatching,
    Topology,
    TopologyError,
    is_time_varying,
    make_topology,
)
from tiny import small_batches as make_batches
from tiny import small_model as tiny_model


def shift_matrix(n: int, s: int) -> torch.Tensor:
    """P[i, j] = 1 where agent i receives from agent j = i - s (mod n), written out plainly."""
    P = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        P[i, (i - s) % n] = 1
    return P


# -- the graphs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 17])
def test_one_peer_exponential_cycles_through_the_powers_of_two(n):
    topo = OnePeerExponential(n)
    tau = max(1, math.ceil(math.log2(n)))
    assert topo.period == tau
    for t in range(3 * tau):
        W = topo.at(t).W
        s = 2 ** (t % tau)
        assert torch.equal(W, (torch.eye(n, dtype=torch.float64) + shift_matrix(n, s)) / 2), (n, t)
        assert torch.allclose(W.sum(0), torch.ones(n, dtype=torch.float64))  # doubly stochastic
        assert torch.allclose(W.sum(1), torch.ones(n, dtype=torch.float64))
        if n > 1:  # one peer each way: agent i sends to i + 2^k only
            assert topo.at(t).out_degrees == [1] * n
            assert all(topo.at(t).out_neighbors(i) == [(i + s) % n] for i in range(n))
        assert topo.at(t) == topo.at(t + tau)  # the period
    assert topo.is_doubly_stochastic and topo.is_directed == (n > 2)


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32])
def test_one_period_of_gossip_averages_exactly_when_n_is_a_power_of_two(n):
    topo = OnePeerExponential(n)
    x = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = x.clone()
    for t in range(topo.period):
        y = topo.at(t).W @ y
    assert torch.equal(topo.mixing_matrix(), torch.full((n, n), 1 / n, dtype=torch.float64))
    torch.testing.assert_close(y, x.mean(0).expand(n, 3), rtol=0, atol=1e-15)
    assert topo.spectral_gap == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n", [3, 5, 6, 7, 12])
def test_other_n_do_not_average_in_one_period_but_converge(n):
    topo = OnePeerExponential(n)
    product = topo.mixing_matrix()
    average = torch.full((n, n), 1 / n, dtype=torch.float64)
    assert not torch.allclose(product, average, atol=1e-3)
    assert bool((product > 0).all())  # every agent reaches every other within one period
    assert 0 < topo.spectral_gap < 1
    assert torch.allclose(torch.linalg.matrix_power(product, 60), average, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 9])
def test_random_matching_pairs_everyone_but_one_when_odd(n):
    topo = RandomMatching(n, seed=3)
    seen = set()
    for t in range(20):
        W = topo.at(t).W
        assert torch.equal(W, W.T)
        assert torch.allclose(W.sum(0), torch.ones(n, dtype=torch.float64))
        matched = [i for i in range(n) if W[i, i] == 0.5]
        assert len(matched) == 2 * (n // 2)  # perfect for even n, one left alone for odd n
        for i in range(n):
            partners = [j for j in range(n) if j != i and W[i, j] > 0]
            assert len(partners) == (1 if i in matched else 0)
            assert W[i, i] == (0.5 if partners else 1.0)
        seen.add(tuple(map(tuple, topo.pairs(t))))
    assert n < 4 or len(seen) > 10  # not the same matching every step


def test_random_matching_is_a_function_of_seed_and_step():
    a, b = RandomMatching(10, seed=7), RandomMatching(10, seed=7)
    later = b.at(123)  # without drawing the earlier steps: what a resumed run or another process does
    for t in range(130):
        a.at(t)
    assert a.at(123) == later
    assert a.pairs(5) == RandomMatching(10, seed=7).pairs(5)
    assert RandomMatching(10, seed=8).pairs(5) != a.pairs(5)
    assert pickle.loads(pickle.dumps(a)).pairs(40) == a.pairs(40)


def test_random_matching_expected_mixing_matches_its_draws():
    for n in (4, 5):
        topo = RandomMatching(n, seed=0)
        mean = sum(topo.at(t).W for t in range(1500)) / 1500
        torch.testing.assert_close(mean, topo.mixing_matrix(), rtol=0, atol=0.04)
        assert torch.allclose(topo.mixing_matrix().sum(1), torch.ones(n, dtype=torch.float64))


def test_registry_names_options_and_errors():
    topo = make_topology("one-peer-exponential", 8, weights="metropolis")
    assert isinstance(topo, OnePeerExponential) and is_time_varying(topo) and not is_time_varying(Topology.ring(4))
    assert make_topology("random_matching", 6, seed=4).pairs(0) == RandomMatching(6, seed=4).pairs(0)
    with pytest.raises(TopologyError, match="unknown option"):
        make_topology("one_peer_exponential", 8, seed=1)
    with pytest.raises(TopologyError, match="seed must be >= 0"):
        make_topology("random_matching", 8, seed=-1)
    with pytest.raises(TopologyError, match="weights must be"):
        make_topology("random_matching", 8, weights="nope")
    with pytest.raises(TopologyError, match="step must be >= 0"):
        OnePeerExponential(4).at(-1)
    step = OnePeerExponential(8).at(1)  # one step's graph is not connected, and pickles as such
    assert pickle.loads(pickle.dumps(step)) == step
    summary = RandomMatching(6).summary()
    assert summary["time_varying"] and summary["period"] is None and summary["n_edges"] == 6


# -- the engine on time-varying graphs, against a plain re-computation --------------------------


def grad_at(model: nn.Module, theta: torch.Tensor, batch) -> torch.Tensor:
    """The gradient of the loss of the model with flat parameters theta on one batch, flat."""
    worker = copy.deepcopy(model)
    nn.utils.vector_to_parameters(theta.clone(), worker.parameters())
    loss = nn.functional.cross_entropy(worker(batch[0]), batch[1])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(worker.parameters()))])


def peers_at(topo, t: int, i: int) -> tuple[list[int], list[int]]:
    """(agents i receives from, agents i sends to) at step t, from the graphs' definitions."""
    n = topo.n
    if isinstance(topo, OnePeerExponential):
        s = 2 ** (t % max(1, math.ceil(math.log2(n))))
        src, dst = (i - s) % n, (i + s) % n
        return ([src] if src != i else []), ([dst] if dst != i else [])
    partner = [b if a == i else a for a, b in topo.pairs(t) if i in (a, b)]
    return partner, partner


def reference_run(model, topo, batches, *, alpha: float | None, lr: float, gamma: float, beta: float):
    """DSGD (alpha None) or NGC with Nesterov momentum, one agent and one neighbour at a time.

    Every W_t here gives 1/2 to oneself and to the one peer of the step (1 when alone), so NGC's
    combine is g_ii / 2 + (alpha g_ij + (1 - alpha) g_ji) / 2 with g_ij from the agent i sends to.
    """
    n = topo.n
    x0 = nn.utils.parameters_to_vector(model.parameters()).detach()
    x = [x0.clone() for _ in range(n)]
    m = [torch.zeros_like(x0) for _ in range(n)]
    for t, b in enumerate(batches):
        new = []
        for i in range(n):
            ins, outs = peers_at(topo, t, i)
            w = 0.5 if ins else 1.0
            mixed = w * x[i] + sum(0.5 * x[j] for j in ins)
            half = (1 - gamma) * x[i] + gamma * mixed
            g = grad_at(model, half, b[i])
            if alpha is not None:
                g = w * g
                for j in outs:  # data-variant: my pre-gossip model on the data of the agent I send to
                    g = g + 0.5 * alpha * grad_at(model, x[i], b[j])
                for j in ins:  # model-variant: the model I received, on my data
                    g = g + 0.5 * (1 - alpha) * grad_at(model, x[j], b[i])
            m[i] = beta * m[i] + g
            new.append(half - lr * (g + beta * m[i]))
        x = new
    return torch.stack(x)


GRAPHS = {
    "one_peer_8": lambda: OnePeerExponential(8),
    "one_peer_6": lambda: OnePeerExponential(6),
    "matching_5": lambda: RandomMatching(5, seed=2),
}


@pytest.mark.parametrize("graph, name, alpha", [(g, "dsgd", None) for g in GRAPHS] + [
    ("one_peer_8", "ngc", 1.0), ("matching_5", "ngc", 1.0), ("one_peer_6", "ngc", 0.5), ("matching_5", "ngc", 0.0)])
def test_engine_matches_per_agent_recomputation(graph, name, alpha):
    topo = GRAPHS[graph]()
    batches = make_batches(topo.n, 4)
    kw = {} if alpha is None else {"alpha": alpha}
    algo = cg.make_algorithm(name, lr=0.1, gamma=0.7, momentum=0.9, nesterov=True, **kw)
    sim = cg.Simulator(tiny_model(), topo, algo)
    for b in batches:
        sim.step(b)
    expected = reference_run(tiny_model(), topo, batches, alpha=alpha, lr=0.1, gamma=0.7, beta=0.9)
    torch.testing.assert_close(sim.params, expected, rtol=0, atol=1e-12)


def test_bytes_are_counted_on_each_steps_edges():
    """One-peer exponential: one model and one cross-gradient per agent and step; random matching:
    only the steps an agent was matched."""
    P8 = sum(p.numel() for p in tiny_model().parameters()) * 8
    steps = 5
    for topo in (OnePeerExponential(8), RandomMatching(5, seed=2)):
        sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm("ngc", lr=0.1, alpha=1.0))
        for b in make_batches(topo.n, steps):
            sim.step(b)
        matched = torch.tensor([sum(len(peers_at(topo, t, i)[1]) for t in range(steps)) for i in range(topo.n)],
                               dtype=torch.float64)
        sent = sim.stats["bytes_sent"]
        assert torch.equal(sent[:, 0], matched * P8) and torch.equal(sent[:, 1], matched * P8), (topo, sent)
        if isinstance(topo, OnePeerExponential):
            assert torch.all(matched == steps)
        else:
            assert matched.sum() == steps * 4 and bool((matched < steps).any())  # one agent out per step


@pytest.mark.parametrize("name, kw", [("ngc", dict(alpha=0.5)), ("dsgd", dict(qgm=True))])
@pytest.mark.parametrize("graph", ["one_peer_8", "matching_5"])
def test_resume_in_the_middle_of_a_period_is_bit_exact(graph, name, kw):
    """Stopped at step 4 (one-peer exponential with n=8 has period 3) and resumed on a fresh
    topology object, which has drawn none of the earlier graphs."""
    topo = GRAPHS[graph]()
    batches = make_batches(topo.n, 7)
    algo = lambda: cg.make_algorithm(name, lr=0.1, gamma=0.7, momentum=0.9, **kw)  # noqa: E731
    whole = cg.Simulator(tiny_model(), topo, algo())
    for b in batches:
        whole.step(b)
    first = cg.Simulator(tiny_model(), GRAPHS[graph](), algo())
    for b in batches[:4]:
        first.step(b)
    state = first.state_dict()
    second = cg.Simulator(tiny_model(seed=5), GRAPHS[graph](), algo())
    second.load_state_dict(state)
    for b in batches[4:]:
        second.step(b)
    assert torch.equal(second.params, whole.params)
    assert torch.equal(second.stats["bytes_sent"], whole.stats["bytes_sent"])


@pytest.mark.parametrize("name", ["cga", "compcga", "compngc"])
def test_algorithms_with_per_edge_state_refuse_time_varying_graphs(name):
    with pytest.raises(ConfigError, match="needs one fixed graph"):
        cg.Simulator(tiny_model(), OnePeerExponential(4), cg.make_algorithm(name, lr=0.1))
    with pytest.raises(ConfigError, match="needs one fixed graph"):
        cg.make_algorithm("ngc", lr=0.1, codec="sign").check_topology(RandomMatching(4))


def test_random_matchings_keep_a_bounded_cache_of_wirings():
    from crossgrad.wiring import WIRING_CACHE

    engine = cg.Simulator(tiny_model(), RandomMatching(8, seed=1), cg.make_algorithm("dsgd", lr=0.1)).engine
    for t in range(2 * WIRING_CACHE):
        engine.wiring = engine.wirings.at(t, current=engine.wiring)  # what a step does first
    assert len(engine.wirings) == WIRING_CACHE  # 105 matchings of 8 agents, 32 draws


def test_a_period_longer_than_the_cache_is_kept_whole(monkeypatch):
    import crossgrad.wiring as wiring_module
    from crossgrad.topology import BaseGraph

    monkeypatch.setattr(wiring_module, "WIRING_CACHE", 2)  # shorter than the period, which then sets the size
    topo = BaseGraph(10, k=1)
    engine = cg.Simulator(tiny_model(), topo, cg.make_algorithm("dsgd", lr=0.1)).engine
    built = []
    for t in range(3 * topo.period):
        engine.wiring = engine.wirings.at(t, current=engine.wiring)
        built += [w for w in engine.wirings.wirings.values() if all(w is not b for b in built)]
    distinct = {topo.at(t).W.numpy().tobytes() for t in range(topo.period)}
    assert len(distinct) > 2  # more graphs than WIRING_CACHE
    assert len(built) == len(engine.wirings) == len(distinct)  # each graph wired once, none rebuilt


# -- torch.distributed: blocks of agents over 3 ranks -------------------------------------------

DIST_WORLD = 3
DIST_STEPS = 4
DIST_GRAPHS = {  # 8 agents -> blocks 3, 3, 2; 7 -> 3, 2, 2
    "one_peer_8": lambda: OnePeerExponential(8),
    "one_peer_7": lambda: OnePeerExponential(7),
    "matching_7": lambda: RandomMatching(7, seed=2),
}
DIST_CASES = [("dsgd", dict(momentum=0.9)), ("ngc", dict(alpha=1.0, momentum=0.9)), ("ngc", dict(alpha=0.5))]


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from crossgrad.distributed import gather_state, make_engine
    from test_dist import _init, rank_errors

    with rank_errors(rank, out_dir):
        _init(rank, world, port, 30)
        results = {}
        for graph, build in DIST_GRAPHS.items():
            topo = build()
            batches = make_batches(topo.n, DIST_STEPS)
            for k, (name, kw) in enumerate(DIST_CASES):
                engine = make_engine(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, gamma=0.7, **kw), timeout=20)
                for b in batches:
                    engine.step([b[a] for a in engine.plan.local])
                state = gather_state(engine)
                if rank == 0:
                    results[graph, k] = (state["x"], state["bytes_sent"])
            # one comm per graph, one set of counters and one failure state for all of them
            comms = [w.comm for w in engine.wirings.wirings.values()]
            results["shared", graph, rank] = len(comms) > 1 and all(
                c.bytes_sent is comms[0].bytes_sent and c.wire_bytes is comms[0].wire_bytes
                and c.failed is comms[0].failed for c in comms)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    from test_dist import _run_workers

    out = _run_workers(_dist_worker, DIST_WORLD, tmp_path_factory.mktemp("tv_dist"))
    return torch.load(out / "result.pt", weights_only=True)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("graph", list(DIST_GRAPHS))
def test_distributed_blocks_equal_the_simulator(graph, dist_results):
    topo = DIST_GRAPHS[graph]()
    batches = make_batches(topo.n, DIST_STEPS)
    for k, (name, kw) in enumerate(DIST_CASES):
        sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, gamma=0.7, **kw))
        for b in batches:
            sim.step(b)
        params, sent = dist_results[graph, k]
        torch.testing.assert_close(params, sim.params, rtol=1e-12, atol=1e-12, msg=f"{graph} {name} {kw}")
        assert torch.equal(sent, sim.stats["bytes_sent"]), (graph, name, kw)
    assert dist_results["shared", graph, 0]


# -- configs and the command line ---------------------------------------------------------------


def test_cli_runs_and_resumes_on_a_time_varying_topology(capsys, tmp_path):
    from crossgrad.cli import main

    base = ["run", "--out-dir", str(tmp_path), "--quiet", "--set", "training.steps=6", "--set", "training.threads=1",
            "--set", "topology.n_agents=4", "--set", "algorithm.name=ngc"]
    whole = [*base, "--name", "whole", "--set", 'topology.name="one_peer_exponential"']
    assert main(whole) == 0
    part = [*base, "--name", "part", "--set", 'topology.name="one_peer_exponential"']
    assert main([*part, "--stop-after", "3"]) == 0  # period 2: stopped in the middle of one
    assert main(["run", "--resume", str(tmp_path / "part"), "--quiet"]) == 0
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("whole", "part"))
    assert a["status"] == b["status"] == "completed" and a["steps"] == 6
    assert a["bytes_per_agent_per_step"] == b["bytes_per_agent_per_step"]
    xa, xb = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True)["sim"]["x"] for r in ("whole", "part"))
    assert torch.equal(xa, xb)
    assert main([*base, "--name", "m", "--set", 'topology.name="random_matching"',
                 "--set", "topology.options.seed=3"]) == 0
    capsys.readouterr()
    assert main([*base, "--name", "c", "--set", 'topology.name="random_matching"', "--set", "algorithm.name=cga"]) == 2
    assert "cga needs one fixed graph" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before the data loads and before the run folder exists
    assert main(["topology", "one_peer_exponential", "8"]) == 0
    out = capsys.readouterr().out
    assert "period 3" in out and "spectral gap      1 (of one period's product of W_t)" in out


def test_matchings_are_the_same_on_every_machine():
    """Recorded draws: numpy's seeded generator (PCG64 and its permutation) is stable across versions and
    platforms, which is what lets every process and a resumed run draw the graphs without sharing them."""
    assert RandomMatching(6, seed=0).pairs(0) == [(3, 2), (5, 4), (0, 1)]
    assert RandomMatching(7, seed=11).pairs(3) == [(0, 1), (4, 6), (2, 3)]
