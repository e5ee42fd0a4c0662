"""training.final_gossip_rounds: gossip-only rounds after training, against P^K computed by hand, and what
the runner records of them.

The references build the gossip matrices from the topology's W and multiply them out in float64; they share
nothing with the engine's wiring.
"""
from __future__ import annotations

import json

import pytest
import torch

import crossgrad as cg
from crossgrad.run.evaluate import gossiped_models
from crossgrad.topology import OnePeerExponential, Topology
from tiny import tiny_model


def trained(topo, name: str, steps: int = 3, **kw) -> cg.Simulator:
    g = torch.Generator().manual_seed(1)
    sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, **kw))
    for _ in range(steps):
        sim.step([(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
                  for _ in range(topo.n)])
    return sim


def gossip_matrix(W: torch.Tensor, gamma: float) -> torch.Tensor:
    W = torch.as_tensor(W, dtype=torch.float64)
    return (1 - gamma) * torch.eye(len(W), dtype=torch.float64) + gamma * W


def test_k_rounds_are_the_runs_gossip_matrix_to_the_k_and_leave_the_engine_alone():
    topo = Topology.ring(5)
    sim = trained(topo, "dsgd", gamma=0.7)
    x, sent = sim.engine.x.clone(), sim.stats["bytes_sent"].clone()
    models = gossiped_models(sim.engine, 4)
    torch.testing.assert_close(models, torch.linalg.matrix_power(gossip_matrix(topo.W, 0.7), 4) @ x,
                               rtol=0, atol=1e-13)
    assert torch.equal(sim.engine.x, x) and torch.equal(sim.stats["bytes_sent"], sent)
    assert not torch.allclose(models, x)  # the rounds did something


def test_a_time_varying_topology_continues_with_the_graphs_of_the_next_steps():
    """One-peer exponential on 4 agents: any two consecutive graphs multiply to J/4, the exact average."""
    topo = OnePeerExponential(4)
    sim = trained(topo, "dsgd", steps=3)
    x = sim.engine.x.clone()
    models = gossiped_models(sim.engine, 2)
    by_hand = topo.at(4).W.double() @ topo.at(3).W.double() @ x
    torch.testing.assert_close(models, by_hand, rtol=0, atol=1e-13)
    torch.testing.assert_close(models, x.mean(0).expand_as(x), rtol=0, atol=1e-13)
    assert (sim.engine.x - x.mean(0)).abs().max() > 1e-3 and torch.equal(sim.engine.x, x)


def test_push_sum_gossips_its_weights_along():
    topo = Topology.from_edges(4, [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)], directed=True, weights="out_uniform")
    sim = trained(topo, "sgp", gamma=0.5)
    x, w = sim.engine.x.clone(), sim.engine.algo_state.w.clone()
    P3 = torch.linalg.matrix_power(gossip_matrix(topo.W, 0.5), 3)
    torch.testing.assert_close(gossiped_models(sim.engine, 3), (P3 @ x) / (P3 @ w), rtol=0, atol=1e-13)
    assert torch.equal(sim.engine.algo_state.w, w)


def test_choco_gossips_the_models_uncompressed():
    topo = Topology.star(5, weights="metropolis")
    sim = trained(topo, "choco", variant="paper")
    x = sim.engine.x.clone()
    torch.testing.assert_close(gossiped_models(sim.engine, 2),
                               torch.linalg.matrix_power(gossip_matrix(topo.W, 0.5), 2) @ x, rtol=0, atol=1e-13)


def test_the_runner_records_the_post_gossip_evaluation_with_k(tmp_path):
    """The last metrics record and summary.json carry K and every agent's post-gossip accuracy; the consensus
    distance is that of P x from the checkpoint's (untouched) rows; bytes per step are training's only."""
    from crossgrad.run import run_experiment
    from crossgrad.run.config import load_config
    from crossgrad.run.rundir import CHECKPOINT, METRICS

    cfg = load_config(None, ["training.threads=1", "training.steps=4", "training.eval_every_steps=2",
                             "training.final_gossip_rounds=1", "algorithm.momentum=0",
                             f'output.out_dir="{tmp_path}"', "output.name=g"])
    result = run_experiment(cfg, quiet=True)
    assert result.status == "completed"
    records = [json.loads(line) for line in (result.run_dir / METRICS).read_text().splitlines()]
    assert all("final_gossip_rounds" not in r for r in records[:-1])
    last = records[-1]
    assert last["final_gossip_rounds"] == 1 and len(last["final_gossip_acc"]) == 5
    assert last["final_gossip_acc_min"] == min(last["final_gossip_acc"])
    assert last["final_gossip_acc_mean"] == pytest.approx(sum(last["final_gossip_acc"]) / 5)
    x = torch.load(result.run_dir / CHECKPOINT, weights_only=True)["sim"]["x"].double()
    y = gossip_matrix(Topology.ring(5).W, 1.0) @ x
    distance = float(((y - y.mean(0)) ** 2).sum(1).mean())
    assert last["final_gossip_consensus_distance"] == pytest.approx(distance, rel=1e-4)
    assert last["final_gossip_consensus_distance"] < last["consensus_distance"]
    s = result.summary
    assert s["final_gossip_rounds"] == 1 and s["final_gossip_acc_mean"] == last["final_gossip_acc_mean"]
    assert "final_gossip_acc" not in s["final"]
    assert s["bytes_per_agent_per_step"][0] == 2 * x.shape[1] * 4  # two float32 rows a step, no more
