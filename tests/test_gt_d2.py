"""Gradient tracking (`gt`) and D² (`d2`): exactness on heterogeneous quadratics, hand-checked updates,
resume, bytes, and what each refuses.

The reference re-computations below loop over agents and neighbours with plain autograd and share
nothing with the engine but the model and the mixing matrix.
"""
from __future__ import annotations

import pytest
import torch

import crossgrad as cg
from crossgrad.run import load_config
from crossgrad.topology import OnePeerExponential, RandomMatching, Topology, is_time_varying
from quadratics import Point, half_squared_distance
from tiny import grad_at, make_batches, run_sim, tiny_model

# ----------------------------------------------------------------------------------------------
# Independent reference
# ----------------------------------------------------------------------------------------------

def gossip(W, gamma: float, rows: list[list[torch.Tensor]], i: int) -> list[torch.Tensor]:
    """(1 - gamma) row_i + gamma sum_j w_ij row_j, j over i and its in-neighbours."""
    n = len(rows)
    return [(1 - gamma) * rows[i][l] + gamma * sum(W[i, j] * rows[j][l] for j in range(n) if W[i, j] > 0)
            for l in range(len(rows[i]))]


def flat(x: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.cat([t.reshape(-1) for t in xi]) for xi in x])


def reference_gt(model, W_at, batches, *, lr, gamma, beta, nesterov, qgm, wd, schedule=None, diging=False,
                 track_wd=False) -> torch.Tensor:
    """x_half = W_t x; y = W_t y + g(x_half) - g_prev; x = x_half - lr T(y + wd x_half), T the momentum form.

    W_at(t) is step t's mixing matrix. diging: g at x (before the gossip) instead of x_half; track_wd: g + wd p
    (p where g was taken) is tracked, and no decay is added to y."""
    n = W_at(0).shape[0]
    theta0 = [p.detach().clone() for p in model.parameters()]
    zeros = lambda: [torch.zeros_like(t) for t in theta0]  # noqa: E731
    x = [[t.clone() for t in theta0] for _ in range(n)]
    y, g_prev, m, m_hat = ([zeros() for _ in range(n)] for _ in range(4))
    x_prev = [[t.clone() for t in theta0] for _ in range(n)]
    lr_prev = lr
    for t, step_batches in enumerate(batches):
        eta = schedule(t) if schedule else lr
        W = torch.as_tensor(W_at(t), dtype=torch.float64)
        x_half = [gossip(W, gamma, x, i) for i in range(n)]
        y_mixed = [gossip(W, gamma, y, i) for i in range(n)]
        new_x = []
        for i in range(n):
            at = x[i] if diging else x_half[i]
            g = grad_at(model, at, step_batches[i])
            if track_wd:
                g = [g[l] + wd * at[l] for l in range(len(g))]
            y[i] = [y_mixed[i][l] + g[l] - g_prev[i][l] for l in range(len(g))]
            g_prev[i] = g
            d = [y[i][l] + (0.0 if track_wd else wd) * x_half[i][l] for l in range(len(g))]
            for l in range(len(d)):
                if qgm:
                    m_hat[i][l] = beta * m_hat[i][l] + (1 - beta) * (x_prev[i][l] - x_half[i][l]) / lr_prev
                    x_prev[i][l] = x_half[i][l].clone()
                    mm = beta * m_hat[i][l] + d[l]
                    d[l] = d[l] + beta * mm if nesterov else mm
                elif beta > 0:
                    m[i][l] = beta * m[i][l] + d[l]
                    d[l] = d[l] + beta * m[i][l] if nesterov else m[i][l]
            new_x.append([x_half[i][l] - eta * d[l] for l in range(len(d))])
        x = new_x
        lr_prev = eta
    return flat(x)


def reference_d2(model, W, batches, *, lr, gamma, wd, schedule=None) -> torch.Tensor:
    """D² as published, on the gossiped iterate m: m_t = W h_{t-1}, d_t = g(m_t) + wd m_t,
    h_t = 2 m_t - m_{t-1} - lr_t d_t + lr_{t-1} d_{t-1} (h_0 = m_0 - lr_0 d_0)."""
    W = torch.as_tensor(W, dtype=torch.float64)
    n = W.shape[0]
    h = [[p.detach().clone() for p in model.parameters()] for _ in range(n)]
    m_prev = d_prev = eta_prev = None
    for t, step_batches in enumerate(batches):
        eta = schedule(t) if schedule else lr
        m = [gossip(W, gamma, h, i) for i in range(n)]
        d = []
        for i in range(n):
            g = grad_at(model, m[i], step_batches[i])
            d.append([g[l] + wd * m[i][l] for l in range(len(g))])
        if t == 0:
            h = [[m[i][l] - eta * d[i][l] for l in range(len(m[i]))] for i in range(n)]
        else:
            h = [[2 * m[i][l] - m_prev[i][l] - eta * d[i][l] + eta_prev * d_prev[i][l] for l in range(len(m[i]))]
                 for i in range(n)]
        m_prev, d_prev, eta_prev = m, d, eta
    return flat(h)


SCHEDULE = (0.1, 0.05, 0.02, 0.08).__getitem__  # lr changes every step: exercises lr_{t-1} and QGM's eta_prev
MOMENTA = {
    "none": dict(momentum=0.0, nesterov=False, qgm=False),
    "heavy_ball": dict(momentum=0.9, nesterov=False, qgm=False),
    "nesterov": dict(momentum=0.9, nesterov=True, qgm=False),
    "qgm": dict(momentum=0.9, nesterov=False, qgm=True),
    "qgm_nesterov": dict(momentum=0.8, nesterov=True, qgm=True),
}


@pytest.mark.parametrize("mom", list(MOMENTA))
def test_gt_matches_hand_computed_update(mom):
    mo = MOMENTA[mom]
    topo = Topology.ring(4)
    batches = make_batches(4, 4)
    sim = run_sim(topo, batches, "gt", SCHEDULE, lr=0.1, gamma=0.7, weight_decay=1e-3, **mo)
    ref = reference_gt(tiny_model(), lambda t: topo.W, batches, lr=0.1, gamma=0.7, beta=mo["momentum"],
                       nesterov=mo["nesterov"], qgm=mo["qgm"], wd=1e-3, schedule=SCHEDULE)
    torch.testing.assert_close(sim.params, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("graph", ["directed_ring", "star_metropolis", "exponential", "one_peer_exponential",
                                   "random_matching"])
def test_gt_on_directed_irregular_and_time_varying_doubly_stochastic_graphs(graph):
    topo = {"directed_ring": lambda: Topology.directed_ring(4),
            "star_metropolis": lambda: Topology.star(5, weights="metropolis"),
            "exponential": lambda: Topology.exponential(6, directed=True),
            "one_peer_exponential": lambda: OnePeerExponential(5),
            "random_matching": lambda: RandomMatching(6)}[graph]()
    W_at = (lambda t: topo.at(t).W) if is_time_varying(topo) else (lambda t: topo.W)
    batches = make_batches(topo.n, 4, seed=3)
    sim = run_sim(topo, batches, "gt", lr=0.05, gamma=1.0)
    ref = reference_gt(tiny_model(), W_at, batches, lr=0.05, gamma=1.0, beta=0.9, nesterov=True, qgm=False, wd=0.0)
    torch.testing.assert_close(sim.params, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant,track,mom", [("diging", False, "none"), ("diging", False, "qgm_nesterov"),
                                               ("dsgt", True, "nesterov"), ("diging", True, "heavy_ball")])
def test_gt_published_forms_match_hand_computed_updates(variant, track, mom):
    mo = MOMENTA[mom]
    topo = Topology.ring(4)
    batches = make_batches(4, 4)
    sim = run_sim(topo, batches, "gt", SCHEDULE, lr=0.1, gamma=0.7, weight_decay=0.05, variant=variant,
                  track_weight_decay=track, **mo)
    ref = reference_gt(tiny_model(), lambda t: topo.W, batches, lr=0.1, gamma=0.7, beta=mo["momentum"],
                       nesterov=mo["nesterov"], qgm=mo["qgm"], wd=0.05, schedule=SCHEDULE,
                       diging=variant == "diging", track_wd=track)
    torch.testing.assert_close(sim.params, ref, rtol=0, atol=1e-10)
    other = reference_gt(tiny_model(), lambda t: topo.W, batches, lr=0.1, gamma=0.7, beta=mo["momentum"],
                         nesterov=mo["nesterov"], qgm=mo["qgm"], wd=0.05, schedule=SCHEDULE)
    assert (sim.params - other).abs().max() > 1e-6  # the form is not today's default


def test_diging_is_bluefogs_recursion():
    """Written as Bluefog's example writes DIGing (no momentum, gamma 1): w <- W w - lr q, then
    q <- W q + g(w_new) - g(w_old), with q = g(w0) before the first step."""
    topo = Topology.ring(5)
    W = topo.W.to(torch.float64)
    batches = make_batches(5, 5, seed=2)
    sim = run_sim(topo, batches, "gt", lr=0.1, momentum=0.0, nesterov=False, variant="diging")
    model = tiny_model()
    w = flat([[p.detach().clone() for p in model.parameters()] for _ in range(5)])
    sizes = [p.numel() for p in model.parameters()]

    def grads(rows, step):
        out = []
        for i in range(5):
            theta = [r.view(p.shape) for r, p in zip(torch.split(rows[i], sizes), model.parameters())]
            out.append([g.reshape(-1) for g in grad_at(model, theta, batches[step][i])])
        return flat(out)

    g_old = grads(w, 0)
    q = g_old.clone()
    for t in range(len(batches)):
        w = W @ w - 0.1 * q
        if t + 1 < len(batches):
            g_new = grads(w, t + 1)
            q = W @ q + g_new - g_old
            g_old = g_new
    torch.testing.assert_close(sim.params, w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("graph,gamma", [("ring4", 0.5), ("ring5", 1.0), ("star_metropolis", 0.8)])
def test_d2_matches_hand_computed_update(graph, gamma):
    topo = {"ring4": lambda: Topology.ring(4), "ring5": lambda: Topology.ring(5),
            "star_metropolis": lambda: Topology.star(5, weights="metropolis")}[graph]()
    batches = make_batches(topo.n, 4)
    sim = run_sim(topo, batches, "d2", SCHEDULE, lr=0.1, gamma=gamma, weight_decay=1e-3)
    ref = reference_d2(tiny_model(), topo.W, batches, lr=0.1, gamma=gamma, wd=1e-3, schedule=SCHEDULE)
    torch.testing.assert_close(sim.params, ref, rtol=0, atol=1e-10)


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


@pytest.mark.parametrize("name,kw,lr,steps", [
    ("gt", dict(momentum=0.0), 0.2, 150),
    ("gt", dict(), 0.1, 300),  # Nesterov 0.9, gt's default: oscillates longer
    ("gt", dict(momentum=0.9, qgm=True), 0.2, 200),
    ("gt", dict(momentum=0.0, variant="diging"), 0.2, 150),
    ("d2", dict(), 0.2, 150),
    ("d2", dict(gamma=1.0), 0.2, 150),
])
def test_gt_and_d2_reach_the_mean_of_heterogeneous_optima_at_a_constant_lr(name, kw, lr, steps):
    assert quadratic_error(name, lr, steps, **kw) < 1e-10


def test_dsgd_keeps_a_bias_of_order_lr_on_the_same_problem():
    big, small = quadratic_error("dsgd", 0.2, 150, momentum=0.0), quadratic_error("dsgd", 0.1, 150, momentum=0.0)
    assert big > 0.1 and small > 0.05
    assert 1.5 < big / small < 2.5  # halving lr about halves the bias


# ----------------------------------------------------------------------------------------------
# State, bytes, configuration
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw", [("gt", dict(momentum=0.9, nesterov=True)), ("gt", dict(qgm=True)),
                                     ("d2", dict(weight_decay=1e-3))])
@pytest.mark.parametrize("stop", [0, 1, 3])
def test_resume_from_state_dict_is_bit_exact(name, kw, stop):
    topo = Topology.ring(5)
    batches = make_batches(5, 5)
    full = run_sim(topo, batches, name, lr=0.1, **kw)
    first = run_sim(topo, batches[:stop], name, lr=0.1, **kw)
    resumed = cg.Simulator(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, **kw))
    resumed.load_state_dict(first.state_dict())
    for b in batches[stop:]:
        resumed.step(b)
    assert torch.equal(full.params, resumed.params)
    assert torch.equal(full.stats["bytes_sent"], resumed.stats["bytes_sent"])


def test_round1_bytes_gt_sends_x_and_y_d2_sends_x():
    topo = Topology.ring(5)
    P = sum(p.numel() for p in tiny_model().parameters())
    for name, rows in (("gt", 2), ("d2", 1)):
        sent = run_sim(topo, make_batches(5, 3), name, lr=0.1).stats["bytes_sent"]
        assert torch.all(sent[:, 0] == 3 * 2 * rows * P * 8), name  # 3 steps x 2 neighbours x rows x float64
        assert torch.all(sent[:, 1] == 0), name
        assert run_sim(topo, make_batches(5, 1), name, lr=0.1).stats["grad_evals_per_agent_per_step"] == 1


def test_memory_counts_every_kept_block_scratch_included():
    """D² keeps p_{t-1} and a correction block; gt the tracked y, the previous gradient, the momentum and
    the direction block; against plain D-PSGD (x, the spare block, the gradients)."""
    topo = Topology.ring(4)
    block = 4 * sum(p.numel() for p in tiny_model().parameters()) * 8  # [4, P] float64
    plain = run_sim(topo, make_batches(4, 1), "dsgd", lr=0.1, momentum=0.0).engine.memory_bytes()
    assert plain == 3 * block
    assert run_sim(topo, make_batches(4, 1), "d2", lr=0.1).engine.memory_bytes() - plain == 2 * block
    assert run_sim(topo, make_batches(4, 1), "gt", lr=0.1).engine.memory_bytes() - plain == 4 * block


def test_d2_defaults_and_momentum_refused():
    opts = cg.algorithm_options("d2")
    assert (opts["momentum"], opts["nesterov"], opts["gamma"]) == (0.0, False, 0.5)
    for kw in (dict(momentum=0.9), dict(momentum=0.5, qgm=True)):
        with pytest.raises(cg.ConfigError, match="d2 takes no momentum"):
            cg.make_algorithm("d2", **kw)
    cfg = load_config(None, ['algorithm.name="d2"'])
    assert cfg.algorithm.params["momentum"] == 0.0 and cfg.algorithm.params["gamma"] == 0.5
    with pytest.raises(cg.ConfigError, match="d2 takes no momentum"):
        load_config(None, ['algorithm.name="d2"', "algorithm.momentum=0.9"])
    assert load_config(None, ['algorithm.name="gt"']).algorithm.params["momentum"] == 0.9


def test_d2_refuses_graphs_outside_its_condition():
    d2 = cg.make_algorithm("d2", gamma=1.0)
    with pytest.raises(cg.ConfigError, match=r"ring \(n=4\) with gamma=1 has -0.3333. Lower algorithm.gamma below 1"):
        d2.check_topology(Topology.ring(4))  # exactly on the bound -1/3: refused
    with pytest.raises(cg.ConfigError, match=r"torus \(n=16\) with gamma=1 has -0.6. Lower .*gamma below 0.833"):
        d2.check_topology(Topology.torus(4, 4))
    cg.make_algorithm("d2", gamma=0.8).check_topology(Topology.torus(4, 4))
    d2.check_topology(Topology.ring(5))
    with pytest.raises(cg.ConfigError, match="directed"):
        d2.check_topology(Topology.directed_ring(4))
    with pytest.raises(cg.ConfigError, match="needs a symmetric W.*metropolis"):
        d2.check_topology(Topology.star(5))
    d2.check_topology(Topology.star(5, weights="metropolis"))
    with pytest.raises(cg.ConfigError, match="time-varying"):
        d2.check_topology(RandomMatching(4))
    with pytest.raises(cg.ConfigError, match="lambda_min"):  # refused when the engine is built
        cg.Simulator(tiny_model(), Topology.ring(4), d2)


def test_gt_needs_a_doubly_stochastic_W():
    gt = cg.make_algorithm("gt")
    with pytest.raises(cg.ConfigError, match=r"doubly stochastic.*star topology's W \(n=5\) sum to 0.7 to 2.2"):
        cg.Simulator(tiny_model(), Topology.star(5), gt)
    with pytest.raises(cg.ConfigError, match="row-stochastic"):  # a push-sum W: columns sum to 1, rows do not
        cg.Simulator(tiny_model(), Topology.star(5, weights="out_uniform"), gt)
    for ok in (Topology.chain(4, weights="metropolis"), Topology.directed_ring(4), Topology.ring(4)):
        gt.check_mixing(ok)


def test_report_labels_name_the_momentum_form():
    from crossgrad.run.config import method_label

    def label(*sets):
        return method_label(load_config(None, list(sets)))

    assert label("algorithm.name=gt") == "GTm-N"
    assert label("algorithm.name=gt", "algorithm.momentum=0") == "GT"
    assert label("algorithm.name=gt", "algorithm.nesterov=false") == "GTm"
    assert label("algorithm.name=gt", "algorithm.qgm=true") == "GT (QGM)"
    assert label("algorithm.name=d2") == "D²"
    assert label("algorithm.name=gt", "algorithm.variant=diging", "algorithm.momentum=0") == "DIGing"
    assert label("algorithm.name=gt", "algorithm.track_weight_decay=true", "algorithm.weight_decay=1e-4") == \
        "GTm-N (tracked wd)"
    with pytest.raises(cg.ConfigError, match="gt's variant must be 'dsgt' .* or 'diging'"):
        cg.make_algorithm("gt", variant="atc")
