"""Push-sum / SGP on column-stochastic graphs: the topologies, the algorithm against a per-agent
re-computation, the bias it removes, resume, the refusals, and the runner's evaluation of x / w."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import crossgrad as cg
from crossgrad.errors import ConfigError
from crossgrad.topology import Topology, TopologyError, make_topology
from tiny import make_batches, tiny_model

#: irregular and directed: out-degrees 3, 1, 2, 1, 1, so a column-stochastic W is not row-stochastic
EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0), (0, 2), (0, 3), (2, 4)]


def push_graph() -> Topology:
    return Topology.from_edges(5, EDGES, directed=True, weights="out_uniform")


# ------------------------------------------------------------------------------------ topologies

def test_out_uniform_weights_split_each_agents_mass_over_its_out_neighbours():
    t = push_graph()
    W = t.W
    for j in range(5):
        outs = [i for i, _ in enumerate(W[:, j]) if i != j and W[i, j] > 0]
        assert outs == t.out_neighbors(j)
        for i in [j, *outs]:
            assert W[i, j] == 1 / (len(outs) + 1)
    assert t.stochastic == "column" and t.is_column_stochastic and not t.is_row_stochastic
    assert not t.is_doubly_stochastic
    s = t.summary()
    assert s["column_stochastic"] and not s["row_stochastic"] and not s["doubly_stochastic"]
    # on a regular graph splitting and averaging coincide: doubly stochastic
    assert Topology.directed_ring(4, weights="out_uniform") == Topology.directed_ring(4)
    assert Topology.ring(5, weights="out_uniform").is_doubly_stochastic


def test_column_stochastic_matrices_are_validated_and_survive_pickling(tmp_path):
    W = push_graph().W
    with pytest.raises(TopologyError, match=r"row 0 of W sums to 0\.75, not 1 \(W must be row-stochastic"):
        Topology(W)  # the default stays row-stochastic, with the message it always had
    t = Topology.from_weights(W, stochastic="column")
    assert t == push_graph() and t.stochastic == "column"
    bad = W.clone()
    bad[1, 0] += 0.25
    with pytest.raises(TopologyError, match=r"column 0 of W sums to 1\.25, not 1 \(a column-stochastic W"):
        Topology(bad, stochastic="column")
    with pytest.raises(TopologyError, match="stochastic must be 'row'"):
        Topology(W, stochastic="both")
    u = pickle.loads(pickle.dumps(t))
    assert u == t and u.stochastic == "column"
    np.save(tmp_path / "W.npy", W.numpy())
    assert make_topology("file", 5, path=tmp_path / "W.npy", stochastic="column") == t
    with pytest.raises(TopologyError, match="row 0 of W sums to 0.75"):
        make_topology("file", 5, path=tmp_path / "W.npy")


def test_named_graphs_take_out_uniform_weights_and_erdos_renyi_can_be_directed():
    t = make_topology("exponential", 6, directed=True, weights="out_uniform")
    assert t.is_directed and t.is_column_stochastic and t.stochastic == "column"
    er = make_topology("erdos_renyi", 8, p=0.3, seed=1, directed=True, weights="out_uniform")
    assert er.is_directed and er.stochastic == "column" and len(set(er.out_degrees)) > 1
    assert er == Topology.erdos_renyi(8, 0.3, seed=1, directed=True, weights="out_uniform")
    # the undirected draw is unchanged by the directed option
    assert Topology.erdos_renyi(10, 0.4, seed=7).params == {"p": 0.4, "seed": 7, "tries": 1}
    with pytest.raises(TopologyError, match="directed must be true or false"):
        Topology.erdos_renyi(5, 0.5, directed="yes")
    with pytest.raises(TopologyError, match="'out_uniform' \\(column-stochastic W, for push-sum"):
        make_topology("ring", 4, weights="push")


# ------------------------------------------------------------------------------------ the update

def grad_at(model: nn.Module, theta: list[torch.Tensor], batch) -> list[torch.Tensor]:
    params = {name: t.clone().requires_grad_(True) for (name, _), t in zip(model.named_parameters(), theta)}
    out = torch.func.functional_call(model, params, (batch[0],))
    return list(torch.autograd.grad(nn.functional.cross_entropy(out, batch[1]), list(params.values())))


def reference_push_sum(model, W, batches, *, lrs, gamma, beta, nesterov, qgm, wd):
    """SGP as published (Assran et al., Algorithm 1), agent by agent: the gradient at z = x / w (w = 1 at the
    first step), weight decay and momentum on the numerators, the local step, then gossip of numerators and
    weights over in-neighbours. Returns (x [n, P], w [n]) after the last step's local step: its gossip is
    the first thing the next step would do."""
    n = W.shape[0]
    P = [[(1 - gamma) * (i == j) + gamma * float(W[i, j]) for j in range(n)] for i in range(n)]
    senders = [[j for j in range(n) if P[i][j] > 0] for i in range(n)]  # itself and its in-neighbours
    theta0 = [p.detach().clone() for p in model.parameters()]
    L = len(theta0)
    x = [[t.clone() for t in theta0] for _ in range(n)]
    w = [1.0] * n
    m = [[torch.zeros_like(t) for t in theta0] for _ in range(n)]
    m_hat = [[torch.zeros_like(t) for t in theta0] for _ in range(n)]
    x_prev = [[t.clone() for t in theta0] for _ in range(n)]
    lr_prev = lrs[0]
    for t, step_batches in enumerate(batches):
        eta = lrs[t]
        if t > 0:  # the previous step's gossip
            x = [[sum(P[i][j] * x[j][l] for j in senders[i]) for l in range(L)] for i in range(n)]
            w = [sum(P[i][j] * w[j] for j in senders[i]) for i in range(n)]
        new_x = []
        for i in range(n):
            z = [x[i][l] / w[i] for l in range(L)]
            g = grad_at(model, z, step_batches[i])
            d = [g[l] + wd * x[i][l] for l in range(L)]
            for l in range(L):
                if qgm:
                    m_hat[i][l] = beta * m_hat[i][l] + (1 - beta) * (x_prev[i][l] - x[i][l]) / lr_prev
                    x_prev[i][l] = x[i][l].clone()
                    mm = beta * m_hat[i][l] + d[l]
                    d[l] = d[l] + beta * mm if nesterov else mm
                elif beta > 0:
                    m[i][l] = beta * m[i][l] + d[l]
                    d[l] = d[l] + beta * m[i][l] if nesterov else m[i][l]
            new_x.append([x[i][l] - eta * d[l] for l in range(L)])
        x, lr_prev = new_x, eta
    flat = torch.stack([torch.cat([t.reshape(-1) for t in xi]) for xi in x])
    return flat, torch.tensor(w, dtype=torch.float64)


MOMENTA = {
    "none": dict(momentum=0.0, nesterov=False, qgm=False),
    "heavy_ball": dict(momentum=0.9, nesterov=False, qgm=False),
    "nesterov": dict(momentum=0.9, nesterov=True, qgm=False),
    "qgm_nesterov": dict(momentum=0.8, nesterov=True, qgm=True),
}


@pytest.mark.parametrize("mom", list(MOMENTA))
def test_matches_hand_computed_push_sum(mom):
    mo = MOMENTA[mom]
    topo = push_graph()
    batches = make_batches(5, 4)
    lrs = (0.1, 0.05, 0.02, 0.08)  # the lr changes every step: exercises QGM's eta_prev
    sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm("sgp", lr=lrs[0], gamma=0.7, weight_decay=1e-3, **mo))
    for t, b in enumerate(batches):
        sim.set_lr(lrs[t])
        sim.step(b)
    x, w = reference_push_sum(tiny_model(), topo.W, batches, lrs=lrs, gamma=0.7, beta=mo["momentum"],
                              nesterov=mo["nesterov"], qgm=mo["qgm"], wd=1e-3)
    assert (w - 1).abs().min() > 0.01  # the weights moved: the test sees the de-biasing
    torch.testing.assert_close(sim.engine.algo_state.w.squeeze(1), w, rtol=0, atol=1e-12)
    torch.testing.assert_close(sim.engine.x, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(sim.params, x / w.unsqueeze(1), rtol=0, atol=1e-10)  # the agents' models
    torch.testing.assert_close(sim.consensus(), (x / w.unsqueeze(1)).mean(0), rtol=0, atol=1e-10)


def test_weights_travel_in_round_one():
    """Each step but the first (a local step from x0, as published) sends every out-neighbour the model row
    and one scalar weight, nothing in round 2."""
    topo = push_graph()
    sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm("sgp", lr=0.1))
    sim.step(make_batches(5, 1)[0])
    assert sim.stats["bytes_sent"].eq(0).all()
    for b in make_batches(5, 2):
        sim.step(b)
    P = sum(p.numel() for p in tiny_model().parameters())
    sent = sim.stats["bytes_sent"]
    assert sent[:, 0].tolist() == [2 * d * (P + 1) * 8 for d in topo.out_degrees]
    assert sent[:, 1].eq(0).all() and sim.stats["grad_evals_per_agent_per_step"] == 1


def test_equals_dsgd_on_a_doubly_stochastic_graph():
    batches = make_batches(4, 3)
    hp = dict(lr=0.1, gamma=1.0, momentum=0.9, nesterov=True)
    sgp = cg.Simulator(tiny_model(), Topology.ring(4), cg.make_algorithm("sgp", **hp))
    dsgd = cg.Simulator(tiny_model(), Topology.ring(4), cg.make_algorithm("dsgd", **hp))
    for b in batches:
        sgp.step(b)
        dsgd.step(b)
    torch.testing.assert_close(sgp.params, dsgd.params, rtol=0, atol=1e-13)
    torch.testing.assert_close(sgp.engine.algo_state.w, torch.ones(4, 1, dtype=torch.float64), rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------ the bias it removes

def _no_gradient(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return out.sum() * 0.0


def test_push_sum_reaches_the_exact_average_where_plain_gossip_does_not():
    """Average consensus (zero gradients): the numerators alone are plain gossip with the column-stochastic
    W, which never agrees (agent i tends to n pi_i times the mean, pi W's Perron vector); their ratio to the
    weights reaches the exact mean of the starting models."""
    topo = push_graph()
    sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm("sgp", lr=0.1, gamma=1.0, momentum=0.0),
                       loss_fn=_no_gradient)
    start = torch.randn(5, sim.engine.x.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sim.engine.x.copy_(start)
    batches = make_batches(5, 1)[0]
    for _ in range(120):
        sim.step(batches)
    mean = start.mean(0)
    torch.testing.assert_close(sim.params, mean.expand(5, -1), rtol=0, atol=1e-10)
    assert sim.consensus_distance() < 1e-20
    plain = sim.engine.x  # = W^t start: what gossip without weights computes
    torch.testing.assert_close(plain.sum(0), start.sum(0), rtol=0, atol=1e-10)  # the sum is kept ...
    w = sim.engine.algo_state.w  # -> n pi: agent i's numerator is n pi_i times the mean, not the mean
    torch.testing.assert_close(plain, w * mean, rtol=0, atol=1e-10)
    assert (w - 1).abs().max() > 0.4 and (w - 1).abs().min() > 0.05, w


def test_push_sum_sgd_agrees_near_the_mean_where_plain_gossip_sgd_scales_each_agent():
    """Quadratics f_i(z) = |z - c_i|^2 / 2 at a constant lr: gossip keeps the sum of the numerators, so at
    SGP's fixed point the gradients at the de-biased points z_i sum to zero, sum_i (z_i - c_i) = 0: their
    mean is mean(c) exactly, and they agree up to O(lr). Plain gossip SGD with the same W (the numerators
    without weights, written out below) leaves agent i near n pi_i mean(c), however small the lr."""
    topo = push_graph()
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()  # out = weight^T on the identity input: the model is z
    c = torch.randn(5, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 2.0
    batches = [(torch.eye(3, dtype=torch.float64), c[i].view(3, 1)) for i in range(5)]

    def half_square(out, target):
        return 0.5 * ((out - target) ** 2).sum()

    lr = 0.1
    sim = cg.Simulator(model, topo, cg.make_algorithm("sgp", lr=lr, momentum=0.0), loss_fn=half_square)
    for _ in range(600):
        sim.step(batches)
    z = sim.engine.algo_state.z  # the last step's gradient points x_half / w
    torch.testing.assert_close(z.mean(0), c.mean(0), rtol=0, atol=1e-12)
    assert (z - c.mean(0)).abs().max() < 0.2  # consensus up to O(lr)
    P, x = topo.W, model.weight.detach().expand(5, -1).clone()
    for _ in range(600):  # plain gossip SGD: x <- P x - lr (P x - c)
        x = P @ x - lr * (P @ x - c)
    torch.testing.assert_close(x.mean(0), c.mean(0), rtol=0, atol=1e-12)  # the sum is right ...
    assert (x - c.mean(0)).abs().max() > 1.0  # ... each agent is not


# ------------------------------------------------------------------------------------ resume

def test_resume_from_state_dict_is_bit_exact():
    topo = push_graph()
    batches = make_batches(5, 6, seed=4)

    def fresh():
        return cg.Simulator(tiny_model(), topo, cg.make_algorithm("sgp", lr=0.1, gamma=0.6, qgm=True))

    full = fresh()
    for b in batches:
        full.step(b)
    part = fresh()
    for b in batches[:3]:
        part.step(b)
    state = pickle.loads(pickle.dumps(part.state_dict()))
    assert torch.equal(state["algorithm"]["w"], part.engine.algo_state.w)
    resumed = fresh()
    resumed.load_state_dict(state)
    for b in batches[3:]:
        resumed.step(b)
    assert torch.equal(resumed.engine.x, full.engine.x)
    assert torch.equal(resumed.engine.algo_state.w, full.engine.algo_state.w)
    assert torch.equal(resumed.params, full.params)
    assert torch.equal(resumed.stats["bytes_sent"], full.stats["bytes_sent"])
    with pytest.raises(ValueError, match="push-sum weights of shape"):
        cg.Simulator(tiny_model(), Topology.directed_ring(3, weights="out_uniform"),
                     cg.make_algorithm("sgp")).engine.algo_state.load_state_dict(state["algorithm"])


# ------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("name", ["dsgd", "ngc", "cga"])
def test_other_algorithms_refuse_a_column_stochastic_w(name):
    with pytest.raises(ConfigError, match=rf"{name} needs a row-stochastic W .* row 0 .* sums to 0.75 .* "
                                          "use algorithm 'sgp'"):
        cg.Simulator(tiny_model(), push_graph(), cg.make_algorithm(name))


def test_sgp_refuses_a_w_that_is_only_row_stochastic():
    with pytest.raises(ConfigError, match=r"sgp \(push-sum\) needs a column-stochastic W .* column 0 of the star "
                                          r"topology's W sums to 1\.75; use topology.weights = 'out_uniform'"):
        cg.Simulator(tiny_model(), Topology.star(4), cg.make_algorithm("sgp"))
    cg.Simulator(tiny_model(), Topology.star(4, weights="metropolis"), cg.make_algorithm("sgp"))  # doubly: fine


def test_registered_with_the_common_defaults():
    from crossgrad.algorithms import algorithm_options

    assert "sgp" in cg.ALGORITHMS
    assert algorithm_options("sgp") == dict(lr=0.01, gamma=1.0, momentum=0.9, nesterov=True, qgm=False,
                                            weight_decay=0.0, gamma_schedule="constant", gamma_growth=1.01)
    with pytest.raises(ConfigError, match="sgp does not take codec"):
        cg.make_algorithm("sgp", codec="sign")


# ------------------------------------------------------------------------------------ the runner

PUSH_RUN = ["training.threads=1", "training.checkpoint_every=1", "algorithm.name=sgp",
            "topology.name=erdos_renyi", "topology.weights=out_uniform", "topology.options.p=0.4",
            "topology.options.directed=true", "training.eval_every_steps=3", "training.steps=6"]


def test_runner_evaluates_the_debiased_models_and_resumes_bit_exactly(tmp_path):
    """Metrics are of x / w (the consensus distance from the checkpoint's rows and weights), and a run
    stopped and resumed ends in the uninterrupted run's state."""
    from crossgrad.run import resume_experiment, run_experiment
    from crossgrad.run.config import load_config
    from crossgrad.run.rundir import CHECKPOINT, METRICS

    def cfg(name):
        return load_config(None, [*PUSH_RUN, f'output.out_dir="{tmp_path}"', f"output.name={name}"])

    full = run_experiment(cfg("full"), quiet=True)
    assert full.status == "completed" and full.summary["method"] == "SGP"
    part = run_experiment(cfg("part"), quiet=True, stop_after=4)
    assert part.status == "stopped"
    done = resume_experiment(part.run_dir, quiet=True)
    assert done.status == "completed"
    a = torch.load(full.run_dir / CHECKPOINT, weights_only=True)["sim"]
    b = torch.load(done.run_dir / CHECKPOINT, weights_only=True)["sim"]
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["algorithm"]["w"], b["algorithm"]["w"])
    assert not torch.allclose(a["algorithm"]["w"], torch.ones_like(a["algorithm"]["w"]))
    z = a["x"] / a["algorithm"]["w"]
    last = [json.loads(line) for line in (full.run_dir / METRICS).read_text().splitlines()][-1]
    expected = float(((z - z.mean(0)) ** 2).sum(1).mean())
    assert last["consensus_distance"] == pytest.approx(expected, rel=1e-6)
    raw = float(((a["x"] - a["x"].mean(0)) ** 2).sum(1).mean())
    assert last["consensus_distance"] != pytest.approx(raw, rel=1e-3)  # not the numerators' spread
