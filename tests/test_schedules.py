"""Averaging-rate schedules (ARS) and local steps: hand-checked updates, bytes, the run's records, refusals.

The reference loops over agents with plain autograd and shares nothing with the engine but the model and W.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import crossgrad as cg
from crossgrad.errors import ConfigError
from crossgrad.run import load_config, run_experiment
from crossgrad.run.rundir import METRICS
from crossgrad.run.schedule import gamma_at
from crossgrad.topology import OnePeerExponential, make_topology
from tiny import small_batches as make_batches
from tiny import small_model as tiny_model


def grad_at(model: nn.Module, theta: torch.Tensor, batch) -> torch.Tensor:
    shapes = [p.shape for p in model.parameters()]
    parts = torch.split(theta, [math.prod(s) for s in shapes])
    params = {name: t.reshape(s).clone().requires_grad_(True)
              for (name, _), t, s in zip(model.named_parameters(), parts, shapes)}
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])


def reference_dsgd(model, W_at, batches, lr, gammas, communicate) -> torch.Tensor:
    """Plain D-PSGD (no momentum): x_half = (1 - g_t) x + g_t W_t x on communicating steps, x otherwise;
    x = x_half - lr grad(x_half)."""
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    n = len(batches[0])
    x = [theta0.clone() for _ in range(n)]
    for t, step in enumerate(batches):
        if communicate(t):
            W, g = torch.as_tensor(W_at(t), dtype=torch.float64), gammas(t)
            x_half = [(1 - g) * x[i] + g * sum(W[i, j] * x[j] for j in range(n) if W[i, j] > 0) for i in range(n)]
        else:
            x_half = [xi.clone() for xi in x]
        x = [x_half[i] - lr * grad_at(model, x_half[i], step[i]) for i in range(n)]
    return torch.stack(x)


def test_gamma_schedules_by_hand():
    ars = {"gamma": 0.09, "gamma_schedule": "exponential", "gamma_growth": 1.01}
    assert [gamma_at(ars, e, 300) for e in range(3)] == [0.09 * 1.01, 0.09 * 1.01 ** 2, 0.09 * 1.01 ** 3]
    assert gamma_at(ars, 299, 300) == 1.0  # 0.09 * 1.01 ** 300 > 1: capped
    cos = {"gamma": 0.2, "gamma_schedule": "cosine", "gamma_growth": 1.01}
    values = [gamma_at(cos, e, 5) for e in range(5)]
    assert values[0] == pytest.approx(0.2) and values[-1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(0.6)  # half way along the half cosine
    assert all(a < b for a, b in zip(values, values[1:]))
    assert gamma_at({"gamma": 0.3}, 7, 10) == 0.3


def test_set_gamma_changes_the_gossip_as_by_hand():
    topo = cg.Topology.ring(4)
    batches = make_batches(4, 4)
    sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm("dsgd", lr=0.1, momentum=0.0, gamma=0.5))
    for t, b in enumerate(batches):
        sim.set_gamma([0.5, 0.5, 0.8, 1.0][t])
        sim.step(b)
    assert sim.gamma == 1.0
    ref = reference_dsgd(tiny_model(), lambda t: topo.W, batches, 0.1, lambda t: [0.5, 0.5, 0.8, 1.0][t],
                         lambda t: True)
    torch.testing.assert_close(sim.params, ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="gamma"):
        sim.set_gamma(0.0)


@pytest.mark.parametrize("name, topology, needle", [
    ("gut", cg.Topology.ring(4), "P x\\^t - P x\\^\\(t-1\\)"),
    ("choco", cg.Topology.ring(4), "consensus step size"),
    ("relaysgd", "chain", "no averaging rate"),
])
def test_set_gamma_is_refused_where_a_gamma_schedule_is(name, topology, needle):
    # the config refuses their schedules; the Python API must not let the same change in by another door
    topo = make_topology("chain", 4) if topology == "chain" else topology
    sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm(name, lr=0.1))
    sim.set_gamma(sim.gamma)  # the rate in force is no change
    with pytest.raises(ValueError, match=f"{name} cannot change its gamma during a run: .*{needle}"):
        sim.set_gamma(0.7)


def test_a_time_varying_graph_met_after_set_gamma_uses_the_rate_in_force():
    topo = OnePeerExponential(8)
    batches = make_batches(8, 5)
    late = cg.Simulator(tiny_model(), topo, cg.make_algorithm("dsgd", lr=0.1, momentum=0.0, gamma=1.0))
    late.set_gamma(0.6)  # before any step: graphs 1, 2 are built later, and must gossip at 0.6 too
    built = cg.Simulator(tiny_model(), topo, cg.make_algorithm("dsgd", lr=0.1, momentum=0.0, gamma=0.6))
    for b in batches:
        late.step(b)
        built.step(b)
    assert torch.equal(late.params, built.params)


def test_local_steps_skip_the_gossip_and_its_bytes():
    topo = cg.Topology.ring(5)
    batches = make_batches(5, 6)
    H = 3
    sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm("dsgd", lr=0.1, momentum=0.0, gamma=0.7))
    every = cg.Simulator(tiny_model(), topo, cg.make_algorithm("dsgd", lr=0.1, momentum=0.0, gamma=0.7))
    for t, b in enumerate(batches):
        sim.step(b, communicate=t % H == 0)
        every.step(b)
    ref = reference_dsgd(tiny_model(), lambda t: topo.W, batches, 0.1, lambda t: 0.7, lambda t: t % H == 0)
    torch.testing.assert_close(sim.params, ref, rtol=0, atol=1e-12)
    # two communicating steps of six: a third of the bytes, every gradient still counted
    assert sim.stats["bytes_sent"].sum() * 3 == every.stats["bytes_sent"].sum() > 0
    assert sim.stats["grad_evals"] == every.stats["grad_evals"] == 30


def test_local_steps_are_refused_by_methods_that_need_every_round():
    sim = cg.Simulator(tiny_model(), cg.Topology.ring(4), cg.make_algorithm("ngc"))
    with pytest.raises(ValueError, match="ngc cannot make local steps: its cross-gradients"):
        sim.step(make_batches(4, 1)[0], communicate=False)
    for name, needle in [("ngc", "cross-gradients"), ("gt", "every communication round"), ("sgp", "push-sum")]:
        with pytest.raises(ConfigError, match=f"training.local_steps=2 .*{name} cannot: .*{needle}"):
            load_config(None, [f"algorithm.name={name}", "training.local_steps=2"])
    load_config(None, ["algorithm.name=dsgd", "algorithm.qgm=true", "training.local_steps=4"])  # accepted


@pytest.mark.parametrize("overrides, needle", [
    (["training.local_steps=0"], "training.local_steps must be >= 1"),
    (["training.local_steps=1.5"], "training.local_steps"),
    (["algorithm.gamma_schedule=linear"], "gamma_schedule must be one of constant, exponential, cosine"),
    (["algorithm.gamma_growth=0"], "gamma_growth must be a positive number"),
    (["algorithm.gamma_growth=true"], "gamma_growth must be a number"),
    (["algorithm.name=choco", "algorithm.gamma_schedule=cosine"], "choco takes no gamma_schedule .*step size"),
])
def test_bad_schedule_and_local_step_options(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides).validate()


def test_d2_checks_the_largest_rate_a_schedule_reaches():
    cg.make_algorithm("d2", gamma=0.5).check_topology(cg.Topology.ring(6))
    # at gamma 0.5 an even ring passes, but the schedule reaches 1, where lambda_min = -1/3
    with pytest.raises(ConfigError, match="gamma=1 \\(which gamma_schedule='exponential' reaches\\)"):
        cg.make_algorithm("d2", gamma=0.5, gamma_schedule="exponential").check_topology(cg.Topology.ring(6))
    with pytest.raises(ConfigError, match="gamma_growth must be finite"):
        cg.make_algorithm("dsgd", gamma_growth=float("nan"))


def test_a_run_records_the_rate_in_force_at_each_evaluation(tmp_path):
    cfg = load_config(None, ["training.threads=1", f'output.out_dir="{tmp_path}"', "output.name=r",
                             "algorithm.name=dsgd", "algorithm.gamma=0.3", "algorithm.gamma_schedule=exponential",
                             "algorithm.gamma_growth=1.5", "training.epochs=3", "training.local_steps=2"])
    result = run_experiment(cfg, quiet=True)
    records = [json.loads(line) for line in (result.run_dir / METRICS).read_text().splitlines()]
    # step 0's record (before training) shows the rate built in; each epoch's end, the rate of that epoch
    assert [r["gamma"] for r in records] == [0.3, 0.3 * 1.5, 0.3 * 1.5 ** 2, min(1.0, 0.3 * 1.5 ** 3)]
    assert result.summary["method"] == "DSGDm-N, γ exponential, H=2"
