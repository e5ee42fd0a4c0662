"""The methods since NGC (issue 26): `gut` (GUT, QG-GUTm), `momentum_tracking` and `decentlam`.

Each update is checked against a float64 re-computation that loops over agents and neighbours with plain
autograd and writes the method as its paper / its authors' code states it (GUT with the neighbours' steps
themselves, not recovered from the gossiped rows as the engine does); then GUT's invariants, exactness of
Momentum Tracking on heterogeneous quadratics, bytes, resume and the refusals.
"""
from __future__ import annotations

import pytest
import torch

import crossgrad as cg
from crossgrad.run import load_config
from crossgrad.topology import RandomMatching, Topology
from quadratics import Point, half_squared_distance
from tiny import grad_at, make_batches, run_sim, tiny_model

# ----------------------------------------------------------------------------------------------
# Independent references (lists of per-layer tensors per agent)
# ----------------------------------------------------------------------------------------------

def gossip(W, gamma: float, rows, i: int) -> list[torch.Tensor]:
    """(1 - gamma) row_i + gamma sum_j w_ij row_j, j over i and its in-neighbours."""
    return [(1 - gamma) * rows[i][l] + gamma * sum(W[i, j] * rows[j][l] for j in range(len(rows)) if W[i, j] > 0)
            for l in range(len(rows[i]))]


def flat(x) -> torch.Tensor:
    return torch.stack([torch.cat([t.reshape(-1) for t in xi]) for xi in x])


def lin(*terms):
    """sum of coef * tensor-list, layer by layer: lin((1, a), (-2, b))."""
    return [sum(c * t[l] for c, t in terms) for l in range(len(terms[0][1]))]


def start(model, n):
    theta0 = [p.detach().clone() for p in model.parameters()]
    return [[t.clone() for t in theta0] for _ in range(n)], lambda: [[torch.zeros_like(t) for t in theta0]
                                                                      for _ in range(n)]


def reference_gut(model, W, batches, *, lr, gamma, mu, beta, nesterov, wd, schedule=None) -> torch.Tensor:
    """y = g - r/lr_t + mu [sum_j p_ij s_j^{t-1} - g^{t-1} - (b-1) r^{t-1}/lr_{t-1}], g = grad + wd x~ at x~ = P x,
    r = x~ - x; m = beta m + y; x <- x - lr_t s, s = m or y + beta m; b - 1 = beta (+ beta^2 with Nesterov)."""
    W = torch.as_tensor(W, dtype=torch.float64)
    n = W.shape[0]
    x, zeros = start(model, n)
    m, s_prev, g_prev, r_prev = zeros(), zeros(), zeros(), zeros()
    b1 = beta + beta * beta if nesterov else beta
    eta_prev = None
    for t, step_batches in enumerate(batches):
        eta = schedule(t) if schedule else lr
        x_half = [gossip(W, gamma, x, i) for i in range(n)]
        s = []
        for i in range(n):
            g = lin((1, grad_at(model, x_half[i], step_batches[i])), (wd, x_half[i]))
            r = lin((1, x_half[i]), (-1, x[i]))
            y = lin((1, g), (-1 / eta, r))
            if t > 0:
                bracket = lin((1, gossip(W, gamma, s_prev, i)), (-1, g_prev[i]), (-b1 / eta_prev, r_prev[i]))
                y = lin((1, y), (mu, bracket))
            m[i] = lin((beta, m[i]), (1, y))
            s.append(lin((1, y), (beta, m[i])) if nesterov else m[i])
            g_prev[i], r_prev[i] = g, r
        x = [lin((1, x[i]), (-eta, s[i])) for i in range(n)]
        s_prev, eta_prev = s, eta
    return flat(x)


def reference_momentum_tracking(model, W, batches, *, lr, gamma, beta, wd, init, schedule=None) -> torch.Tensor:
    """The authors' order: (step 0, global_mean: c = m = (g - mean g)/(1 - beta)); m = beta m + g + wd x with g at
    x; x <- P x - lr (m - c); c <- P (c - m) + m."""
    W = torch.as_tensor(W, dtype=torch.float64)
    n = W.shape[0]
    x, zeros = start(model, n)
    m, c = zeros(), zeros()
    for t, step_batches in enumerate(batches):
        eta = schedule(t) if schedule else lr
        g = [grad_at(model, x[i], step_batches[i]) for i in range(n)]
        if t == 0 and init == "global_mean":
            mean = lin(*((1 / n, gi) for gi in g))
            m = [lin((1 / (1 - beta), g[i]), (-1 / (1 - beta), mean)) for i in range(n)]
            c = [list(mi) for mi in m]
        m = [lin((beta, m[i]), (1, g[i]), (wd, x[i])) for i in range(n)]
        x = [lin((1, gossip(W, gamma, x, i)), (-eta, m[i]), (eta, c[i])) for i in range(n)]
        diff = [lin((1, c[i]), (-1, m[i])) for i in range(n)]
        c = [lin((1, gossip(W, gamma, diff, i)), (1, m[i])) for i in range(n)]
    return flat(x)


def reference_decentlam(model, W, batches, *, lr, gamma, beta, wd, schedule=None) -> torch.Tensor:
    """z = x - lr (g + wd x) with g at x; m = beta m + (x - P z)/lr; x <- x - lr m."""
    W = torch.as_tensor(W, dtype=torch.float64)
    n = W.shape[0]
    x, zeros = start(model, n)
    m = zeros()
    for t, step_batches in enumerate(batches):
        eta = schedule(t) if schedule else lr
        z = [lin((1 - eta * wd, x[i]), (-eta, grad_at(model, x[i], step_batches[i]))) for i in range(n)]
        m = [lin((beta, m[i]), (1 / eta, x[i]), (-1 / eta, gossip(W, gamma, z, i))) for i in range(n)]
        x = [lin((1, x[i]), (-eta, m[i])) for i in range(n)]
    return flat(x)


SCHEDULE = (0.1, 0.05, 0.02, 0.08).__getitem__  # a new lr every step: exercises lr_{t-1} against lr_t

GUT_CASES = {
    "gut": dict(mu=0.9, momentum=0.0),
    "qg_gutm": dict(mu=0.5, momentum=0.9, nesterov=False),
    "qg_gutm_nesterov": dict(mu=0.5, momentum=0.8, nesterov=True),
    "qg_dsgdm": dict(mu=0.0, momentum=0.9),
}


@pytest.mark.parametrize("case", list(GUT_CASES))
@pytest.mark.parametrize("graph,gamma", [("ring", 0.7), ("star_metropolis", 1.0)])
def test_gut_matches_hand_computed_update(case, graph, gamma):
    kw = GUT_CASES[case]
    topo = Topology.ring(4) if graph == "ring" else Topology.star(5, weights="metropolis")
    batches = make_batches(topo.n, 4)
    sim = run_sim(topo, batches, "gut", SCHEDULE, lr=0.1, gamma=gamma, weight_decay=1e-2, **kw)
    ref = reference_gut(tiny_model(), topo.W, batches, lr=0.1, gamma=gamma, mu=kw["mu"], beta=kw["momentum"],
                        nesterov=kw.get("nesterov", False), wd=1e-2, schedule=SCHEDULE)
    torch.testing.assert_close(sim.params, ref, rtol=0, atol=1e-10)


def test_gut_gamma_is_gossip_with_the_averaged_matrix():
    """gamma < 1 scales the gossip once, everywhere (crossgrad's choice; the authors' code scales it twice): GUT
    at gamma on W runs as GUT at gamma = 1 on P = (1 - gamma) I + gamma W."""
    W = Topology.ring(5).W.to(torch.float64)
    P = 0.4 * torch.eye(5, dtype=torch.float64) + 0.6 * W
    batches = make_batches(5, 4)
    kw = dict(lr=0.1, mu=0.5, momentum=0.9, nesterov=True)
    on_w = run_sim(Topology.ring(5), batches, "gut", gamma=0.6, **kw)
    on_p = run_sim(Topology.from_weights(P), batches, "gut", gamma=1.0, **kw)
    torch.testing.assert_close(on_w.params, on_p.params, rtol=0, atol=1e-13)


@pytest.mark.parametrize("schedule", [None, SCHEDULE])
def test_gut_without_momentum_moves_the_network_mean_by_minus_lr_mean_gradient(schedule):
    """beta = 0, doubly stochastic W: mean_i x_i^{t+1} - mean_i x_i^t = -lr_t mean_i g_i^t at every step (so the
    tracking only redistributes the update), under a constant lr and right after every lr change."""
    topo = Topology.star(5, weights="metropolis")
    sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm("gut", lr=0.1, mu=0.9, momentum=0.0))
    moved = 0.0
    for t, b in enumerate(make_batches(5, 4)):
        if schedule:
            sim.set_lr(schedule(t))
        before = sim.params.mean(0)
        sim.step(b)
        step = sim.params.mean(0) - before
        torch.testing.assert_close(step, -sim.lr * sim.engine.last["g_self"].mean(0), rtol=0, atol=1e-14)
        moved = max(moved, float((sim.params - sim.params.mean(0)).abs().max()))
    assert moved > 1e-3  # the agents disagree: the tracking term is not zero


@pytest.mark.parametrize("schedule", [None, SCHEDULE])
def test_gut_with_mu_0_and_no_momentum_is_dsgd_bit_for_bit(schedule):
    """Also across lr changes: the current gossip displacement is divided by the current lr, so it enters the
    step in full (the authors' code divides it by the previous lr)."""
    topo, batches = Topology.ring(5), make_batches(5, 4)
    gut = run_sim(topo, batches, "gut", schedule, lr=0.1, gamma=0.5, mu=0.0, momentum=0.0)
    dsgd = run_sim(topo, batches, "dsgd", schedule, lr=0.1, gamma=0.5, momentum=0.0)
    assert torch.equal(gut.params, dsgd.params)
    assert torch.equal(gut.stats["bytes_sent"], dsgd.stats["bytes_sent"])


@pytest.mark.parametrize("init", ["global_mean", "zero"])
@pytest.mark.parametrize("graph", ["ring", "exponential"])
def test_momentum_tracking_matches_hand_computed_update(init, graph):
    topo = Topology.ring(4) if graph == "ring" else Topology.exponential(6)
    batches = make_batches(topo.n, 4)
    sim = run_sim(topo, batches, "momentum_tracking", SCHEDULE, lr=0.1, gamma=0.8, weight_decay=1e-2, init=init)
    ref = reference_momentum_tracking(tiny_model(), topo.W, batches, lr=0.1, gamma=0.8, beta=0.9, wd=1e-2,
                                      init=init, schedule=SCHEDULE)
    torch.testing.assert_close(sim.params, ref, rtol=0, atol=1e-10)


def test_momentum_tracking_first_step_is_the_global_mean_gradient():
    """With init global_mean every agent's first step is -lr times the mean of all agents' gradients."""
    topo = Topology.ring(6)
    sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm("momentum_tracking", lr=0.1))
    x0 = sim.params.clone()
    sim.step(make_batches(6, 1)[0])
    mean_g = sim.engine.last["g_self"].mean(0)
    torch.testing.assert_close(sim.params, (x0 - 0.1 * mean_g).expand_as(x0), rtol=0, atol=1e-14)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("graph", ["ring", "star_metropolis"])
def test_decentlam_matches_hand_computed_update(momentum, graph):
    topo = Topology.ring(4) if graph == "ring" else Topology.star(5, weights="metropolis")
    batches = make_batches(topo.n, 4)
    sim = run_sim(topo, batches, "decentlam", SCHEDULE, lr=0.1, gamma=0.7, weight_decay=1e-2, momentum=momentum)
    ref = reference_decentlam(tiny_model(), topo.W, batches, lr=0.1, gamma=0.7, beta=momentum, wd=1e-2,
                              schedule=SCHEDULE)
    torch.testing.assert_close(sim.params, ref, rtol=0, atol=1e-10)


def test_new_methods_run_on_time_varying_graphs_where_they_can():
    """momentum_tracking and decentlam gossip with the step's W_t (doubly stochastic here); gut refuses."""
    topo = RandomMatching(4)
    for name in ("momentum_tracking", "decentlam"):
        sim = run_sim(topo, make_batches(4, 3), name, lr=0.1)
        assert torch.isfinite(sim.params).all()
    with pytest.raises(cg.ConfigError, match="gut needs one fixed graph"):
        cg.Simulator(tiny_model(), topo, cg.make_algorithm("gut"))


# ----------------------------------------------------------------------------------------------
# Exact on heterogeneous objectives: f_i(x) = 1/2 ||x - c_i||^2
# ----------------------------------------------------------------------------------------------

def quadratic_error(name: str, lr: float, steps: int, **kw) -> float:
    """max_i ||x_i - mean(c)||_inf after `steps` at a constant lr, 5 agents on a ring, distinct c_i in R^3."""
    n = 5
    c = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batches = [(torch.zeros(1, 1, dtype=torch.float64), c[i:i + 1]) for i in range(n)]
    sim = run_sim(Topology.ring(n), [batches] * steps, name, model=Point(3), loss_fn=half_squared_distance,
                  lr=lr, **kw)
    return float((sim.params - c.mean(0)).abs().max())


@pytest.mark.parametrize("init", ["global_mean", "zero"])
def test_momentum_tracking_reaches_the_mean_of_heterogeneous_optima_with_momentum(init):
    assert quadratic_error("momentum_tracking", 0.02, 600, momentum=0.9, init=init) < 1e-10
    # DSGD with the same heavy ball keeps a bias of order lr / (1 - beta)
    assert quadratic_error("dsgd", 0.02, 600, momentum=0.9, nesterov=False) > 0.05


def test_gut_shrinks_dsgds_heterogeneity_bias_by_about_1_minus_mu():
    """Not exact, but the tracking removes most of the bias: on the same quadratics at a constant lr GUT with
    mu = 0.9 settles about (1 - mu) times as far from the optimum as DSGD, and QG-DSGDm (mu = 0, heavy ball on the
    whole displacement) keeps DSGD's bias where local heavy ball multiplies it."""
    dsgd = quadratic_error("dsgd", 0.02, 400, momentum=0.0)
    gut = quadratic_error("gut", 0.02, 400, mu=0.9)
    assert 0.05 < gut / dsgd < 0.2
    qg_dsgdm = quadratic_error("gut", 0.02, 400, mu=0.0, momentum=0.9)
    heavy_ball = quadratic_error("dsgd", 0.02, 400, momentum=0.9, nesterov=False)
    assert abs(qg_dsgdm / dsgd - 1) < 0.1 and heavy_ball > 4 * dsgd


# ----------------------------------------------------------------------------------------------
# State, bytes, configuration
# ----------------------------------------------------------------------------------------------

RESUME_CASES = [("gut", dict(mu=0.5, momentum=0.9, nesterov=True, weight_decay=1e-3)), ("gut", dict()),
                ("momentum_tracking", dict(weight_decay=1e-3)), ("decentlam", dict())]


@pytest.mark.parametrize("name,kw", RESUME_CASES)
@pytest.mark.parametrize("stop", [0, 2])
def test_resume_from_state_dict_is_bit_exact(name, kw, stop):
    topo, batches = Topology.ring(5), make_batches(5, 4)
    full = run_sim(topo, batches, name, SCHEDULE, lr=0.1, **kw)
    first = run_sim(topo, batches[:stop], name, SCHEDULE, lr=0.1, **kw)
    resumed = cg.Simulator(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, **kw))
    resumed.load_state_dict(first.state_dict())
    for t, b in enumerate(batches[stop:], start=stop):
        resumed.set_lr(SCHEDULE(t))
        resumed.step(b)
    assert torch.equal(full.params, resumed.params)
    assert torch.equal(full.stats["bytes_sent"], resumed.stats["bytes_sent"])


def test_bytes_gut_and_decentlam_send_one_row_momentum_tracking_two():
    topo = Topology.ring(5)
    P = sum(p.numel() for p in tiny_model().parameters())
    dsgd = run_sim(topo, make_batches(5, 3), "dsgd", lr=0.1).stats["bytes_sent"]
    assert torch.all(dsgd[:, 0] == 3 * 2 * P * 8)  # 3 steps x 2 neighbours x float64 rows
    for name, rows in (("gut", 1), ("decentlam", 1), ("momentum_tracking", 2)):
        sim = run_sim(topo, make_batches(5, 3), name, lr=0.1)
        assert torch.equal(sim.stats["bytes_sent"][:, 0], rows * dsgd[:, 0]), name
        assert torch.all(sim.stats["bytes_sent"][:, 1] == 0), name
        assert sim.stats["grad_evals_per_agent_per_step"] == 1


def test_defaults_and_config():
    assert {k: cg.algorithm_options("gut")[k] for k in ("mu", "momentum", "nesterov", "gamma")} == \
        dict(mu=0.9, momentum=0.0, nesterov=False, gamma=1.0)
    for name in ("momentum_tracking", "decentlam"):
        opts = cg.algorithm_options(name)
        assert (opts["momentum"], opts["nesterov"], opts["gamma"]) == (0.9, False, 1.0)
    assert cg.algorithm_options("momentum_tracking")["init"] == "global_mean"
    cfg = load_config(None, ['algorithm.name="momentum_tracking"', 'algorithm.init="zero"'])
    assert cfg.algorithm.params["init"] == "zero" and cfg.algorithm.params["nesterov"] is False


@pytest.mark.parametrize("name,kw,match", [
    ("gut", dict(mu=-0.1), r"mu \(GUT's tracking scale\) must be in \[0, 1\], not -0.1"),
    ("gut", dict(mu=1.5), r"must be in \[0, 1\], not 1.5"),
    ("gut", dict(mu=float("nan")), "mu must be finite"),
    ("gut", dict(mu="high"), "mu must be a number"),
    ("gut", dict(momentum=0.9, qgm=True), "gut takes no qgm"),
    ("momentum_tracking", dict(nesterov=True), "momentum_tracking has its own heavy-ball momentum"),
    ("momentum_tracking", dict(qgm=True), "takes neither nesterov nor qgm"),
    ("momentum_tracking", dict(init="mean"), "init must be 'global_mean' .* or 'zero', not 'mean'"),
    ("momentum_tracking", dict(init=0), "init must be a string"),
    ("decentlam", dict(nesterov=True), "decentlam has its own heavy-ball momentum"),
    ("decentlam", dict(init="zero"), "decentlam does not take init"),
    ("gut", dict(alpha=1.0), "gut does not take alpha"),
    ("gut", dict(gamma=0.09, gamma_schedule="exponential"), "gut takes no gamma_schedule"),
])
def test_bad_options_are_one_line_config_errors(name, kw, match):
    with pytest.raises(cg.ConfigError, match=match) as e:
        cg.make_algorithm(name, **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["gut", "momentum_tracking"])
def test_tracking_methods_need_a_doubly_stochastic_W(name):
    with pytest.raises(cg.ConfigError, match=rf"{name} needs a doubly stochastic W.*star topology's W \(n=5\)"):
        cg.Simulator(tiny_model(), Topology.star(5), cg.make_algorithm(name))
    cg.Simulator(tiny_model(), Topology.star(5), cg.make_algorithm("decentlam"))  # row-stochastic is enough


@pytest.mark.parametrize("name", ["gut", "momentum_tracking", "decentlam"])
def test_local_steps_are_refused_with_a_reason(name):
    with pytest.raises(cg.ConfigError, match=f"training.local_steps=2 .*{name} cannot"):
        load_config(None, [f'algorithm.name="{name}"', "training.local_steps=2"])


def test_bad_option_on_the_command_line_is_one_line(capsys):
    from crossgrad.cli import main

    assert main(["config", "--set", 'algorithm.name="gut"', "--set", "algorithm.mu=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crossgrad: error:") and "mu (GUT's tracking scale)" in err and "\n" not in err


def test_report_labels():
    from crossgrad.run.config import method_label

    def label(*sets):
        return method_label(load_config(None, list(sets)))

    assert label("algorithm.name=gut") == "GUT"
    assert label("algorithm.name=gut", "algorithm.momentum=0.9", "algorithm.mu=0.06") == "QG-GUTm"
    assert label("algorithm.name=gut", "algorithm.momentum=0.9", "algorithm.nesterov=true") == "QG-GUTm-N"
    assert label("algorithm.name=gut", "algorithm.momentum=0.9", "algorithm.mu=0") == "QG-DSGDm"
    assert label("algorithm.name=momentum_tracking") == "Momentum Tracking"
    assert label("algorithm.name=decentlam") == "DecentLaM"


def test_a_nan_in_decentlam_is_named_without_a_round_1_of_models():
    """DecentLaM sends no models, so a non-finite loss is blamed on the agent's own loss, not on a sender."""
    from crossgrad.engine import NonFiniteError

    batches = make_batches(4, 1)[0]
    batches[2] = (torch.full_like(batches[2][0], float("nan")), batches[2][1])
    sim = cg.Simulator(tiny_model(), Topology.ring(4), cg.make_algorithm("decentlam", lr=0.1))
    with pytest.raises(NonFiniteError, match="non-finite loss at step 0, agent 2"):
        sim.step(batches)
