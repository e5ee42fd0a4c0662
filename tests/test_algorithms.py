"""Each algorithm against an independent, per-agent re-computation of ARCHITECTURE.md section 1.

The reference below loops over agents and edges with plain autograd and solves CGA's QPs with
quadprog (via qpsolvers), sharing nothing with the engine but the model and the topology.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import crossgrad as cg
from crossgrad.topology import Topology
from tiny import tiny_model


def make_batches(n: int, steps: int, seed: int = 1, same: bool = False) -> list[list[tuple]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(n):
            if same and step:
                step.append(step[0])
                continue
            x = torch.randn(6, 3, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (6,), generator=g)
            step.append((x, y))
        out.append(step)
    return out


# ----------------------------------------------------------------------------------------------
# Independent reference
# ----------------------------------------------------------------------------------------------

def grad_at(model: nn.Module, theta: list[torch.Tensor], batch) -> list[torch.Tensor]:
    params = {name: t.clone().requires_grad_(True) for (name, _), t in zip(model.named_parameters(), theta)}
    out = torch.func.functional_call(model, params, (batch[0],))
    loss = nn.functional.cross_entropy(out, batch[1])
    return list(torch.autograd.grad(loss, list(params.values())))


def sign_compress(v: torch.Tensor) -> torch.Tensor:
    scale = v.abs().sum() / v.numel()
    scale = scale.to(torch.float32).to(v.dtype)
    return torch.where(v < 0, -scale, scale)


def qp_quadprog(Q: np.ndarray, c: np.ndarray, margin: float) -> np.ndarray:
    import qpsolvers

    k = len(c)
    return qpsolvers.solve_qp(Q, c, -np.eye(k), -margin * np.ones(k), solver="quadprog")


def reference_run(model, W, batches, algo: str, *, lr, gamma, beta, nesterov, qgm, wd, alpha=1.0,
                  compress_self=True, margin=0.5, eps=1e-12, lr_schedule=None):
    W = torch.as_tensor(W, dtype=torch.float64)
    n = W.shape[0]
    nbrs = [[j for j in range(n) if j != i and W[i, j] > 0] for i in range(n)]  # in-neighbours
    outs = [[j for j in range(n) if j != i and W[j, i] > 0] for i in range(n)]
    directed = any(i not in nbrs[j] for i in range(n) for j in nbrs[i])

    def dv_weight(i, j):
        if not directed:
            return W[i, j]
        return (1 - W[i, i]) * W[j, i] / sum(W[k, i] for k in outs[i])

    theta0 = [p.detach().clone() for p in model.parameters()]
    x = [[t.clone() for t in theta0] for _ in range(n)]
    m = [[torch.zeros_like(t) for t in theta0] for _ in range(n)]
    m_hat = [[torch.zeros_like(t) for t in theta0] for _ in range(n)]
    x_prev = [[t.clone() for t in theta0] for _ in range(n)]
    lr_prev = lr
    mem_edge = {}  # (sender, receiver) -> list of tensors
    mem_self = [[torch.zeros_like(t) for t in theta0] for _ in range(n)]
    compressed = algo in ("compngc", "compcga")
    for t, step_batches in enumerate(batches):
        eta = lr_schedule(t) if lr_schedule else lr
        x_half = []
        for i in range(n):
            mixed = [sum(W[i, j] * x[j][l] for j in range(n)) for l in range(len(theta0))]
            x_half.append([(1 - gamma) * x[i][l] + gamma * mixed[l] for l in range(len(theta0))])
        # cross[(j, i)] = grad of model j (pre-gossip) on i's batch, computed at i and sent i -> j
        cross = {}
        for i in range(n):
            for j in nbrs[i]:
                g = grad_at(model, x[j], step_batches[i])
                if compressed:
                    key = (i, j)
                    mem = mem_edge.setdefault(key, [torch.zeros_like(a) for a in g])
                    c = []
                    for l in range(len(g)):
                        corr = mem[l] + g[l]
                        c.append(sign_compress(corr))
                        mem[l] = corr - c[-1]
                    g = c
                cross[(j, i)] = g
        new_x = []
        for i in range(n):
            g_self = grad_at(model, x_half[i], step_batches[i])
            if compressed and compress_self:
                c = []
                for l in range(len(g_self)):
                    corr = mem_self[i][l] + g_self[l]
                    c.append(sign_compress(corr))
                    mem_self[i][l] = corr - c[-1]
                g_self = c
            if algo == "dsgd":
                comb = g_self
            elif algo in ("ngc", "compngc"):
                comb = []
                for l in range(len(theta0)):
                    v = W[i, i] * g_self[l]
                    for j in nbrs[i]:
                        v = v + (1 - alpha) * W[i, j] * cross[(j, i)][l]
                    for j in outs[i]:
                        v = v + alpha * dv_weight(i, j) * cross[(i, j)][l]
                    comb.append(v)
            else:  # cga / compcga
                comb = []
                for l in range(len(theta0)):
                    g = (W[i, i] * g_self[l]).reshape(-1)
                    rows = [(dv_weight(i, j) * cross[(i, j)][l]).reshape(-1) for j in outs[i]]
                    rows = [r for r in rows if r.abs().sum() > 0]
                    if rows:
                        M = torch.stack(rows).numpy()
                        Q = M @ M.T + eps * np.eye(len(rows))
                        v = qp_quadprog(Q, M @ g.numpy(), margin)
                        g = g + torch.from_numpy(M.T @ v)
                    comb.append(g.reshape(theta0[l].shape))
            d = [comb[l] + wd * x_half[i][l] for l in range(len(theta0))]
            if qgm:
                for l in range(len(d)):
                    m_hat[i][l] = beta * m_hat[i][l] + (1 - beta) * (x_prev[i][l] - x_half[i][l]) / lr_prev
                    x_prev[i][l] = x_half[i][l].clone()
                    mm = beta * m_hat[i][l] + d[l]
                    d[l] = d[l] + beta * mm if nesterov else mm
            elif beta > 0:
                for l in range(len(d)):
                    m[i][l] = beta * m[i][l] + d[l]
                    d[l] = d[l] + beta * m[i][l] if nesterov else m[i][l]
            new_x.append([x_half[i][l] - eta * d[l] for l in range(len(d))])
        x = new_x
        lr_prev = eta
    return torch.stack([torch.cat([t.reshape(-1) for t in xi]) for xi in x])


def run_sim(model, topo, batches, name, lr_schedule=None, **kw):
    sim = cg.Simulator(model, topo, cg.make_algorithm(name, **kw))
    for t, b in enumerate(batches):
        if lr_schedule:
            sim.set_lr(lr_schedule(t))
        sim.step(b)
    return sim


MOMENTA = {
    "none": dict(momentum=0.0, nesterov=False, qgm=False),
    "heavy_ball": dict(momentum=0.9, nesterov=False, qgm=False),
    "nesterov": dict(momentum=0.9, nesterov=True, qgm=False),
    "qgm": dict(momentum=0.9, nesterov=False, qgm=True),
    "qgm_nesterov": dict(momentum=0.8, nesterov=True, qgm=True),
}
ALGOS = {
    "dsgd": ("dsgd", {}),
    "ngc_a1": ("ngc", dict(alpha=1.0)),
    "ngc_a0": ("ngc", dict(alpha=0.0)),
    "ngc_a03": ("ngc", dict(alpha=0.3)),
    "compngc": ("compngc", dict(alpha=1.0)),
    "compngc_noself_a05": ("compngc", dict(alpha=0.5, compress_self=False)),
    "cga": ("cga", {}),
    "compcga": ("compcga", {}),
}


def _reference_kwargs(kw):
    return {k: v for k, v in kw.items() if k in ("alpha", "compress_self")}


@pytest.mark.parametrize("mom", list(MOMENTA))
@pytest.mark.parametrize("algo", list(ALGOS))
def test_matches_hand_computed_update(algo, mom):
    name, extra = ALGOS[algo]
    mo = MOMENTA[mom]
    topo = Topology.ring(4)
    batches = make_batches(4, 3)
    schedule = (0.1, 0.05, 0.02).__getitem__  # lr changes every step: exercises QGM's eta_prev
    hp = dict(lr=0.1, gamma=0.7, weight_decay=1e-3, **mo)
    sim = run_sim(tiny_model(), topo, batches, name, lr_schedule=schedule, **hp, **extra)
    ref = reference_run(tiny_model(), topo.W, batches, name, lr=0.1, gamma=0.7, beta=mo["momentum"],
                        nesterov=mo["nesterov"], qgm=mo["qgm"], wd=1e-3, lr_schedule=schedule,
                        **_reference_kwargs(extra))
    tol = 1e-8 if "cga" in name else 1e-10
    torch.testing.assert_close(sim.params, ref, rtol=0, atol=tol)


@pytest.mark.parametrize("algo", ["ngc_a1", "ngc_a03", "compngc", "cga"])
@pytest.mark.parametrize("graph", ["directed_ring", "star", "chain"])
def test_irregular_and_directed_graphs(algo, graph):
    name, extra = ALGOS[algo]
    topo = {"directed_ring": lambda: Topology.directed_ring(4), "star": lambda: Topology.star(5),
            "chain": lambda: Topology.chain(4)}[graph]()
    batches = make_batches(topo.n, 3, seed=3)
    sim = run_sim(tiny_model(), topo, batches, name, lr=0.05, gamma=1.0, momentum=0.9, nesterov=True, **extra)
    ref = reference_run(tiny_model(), topo.W, batches, name, lr=0.05, gamma=1.0, beta=0.9, nesterov=True,
                        qgm=False, wd=0.0, **_reference_kwargs(extra))
    torch.testing.assert_close(sim.params, ref, rtol=0, atol=1e-8 if "cga" in name else 1e-10)


# ----------------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_ngc_equals_dsgd_with_identical_data(alpha):
    topo = Topology.ring(5)
    batches = make_batches(5, 3, same=True)
    hp = dict(lr=0.1, gamma=1.0, momentum=0.9, nesterov=True)
    ngc = run_sim(tiny_model(), topo, batches, "ngc", alpha=alpha, **hp)
    dsgd = run_sim(tiny_model(), topo, batches, "dsgd", **hp)
    torch.testing.assert_close(ngc.params, dsgd.params, rtol=0, atol=1e-12)


def test_ngc_alpha0_sends_nothing_in_round2():
    topo = Topology.ring(5)
    sim = run_sim(tiny_model(), topo, make_batches(5, 2), "ngc", alpha=0.0, lr=0.1)
    sent = sim.stats["bytes_sent"]
    assert torch.all(sent[:, 1] == 0)
    P = sim.params.shape[1]
    assert torch.all(sent[:, 0] == 2 * 2 * P * 8)  # 2 steps x 2 neighbours x P float64


def test_compressed_message_bytes():
    topo = Topology.ring(5)
    model = tiny_model()
    sim = run_sim(model, topo, make_batches(5, 3), "compngc", lr=0.1)
    per_message = sum(math.ceil(p.numel() / 8) + 4 for p in model.parameters())
    assert torch.all(sim.stats["bytes_sent"][:, 1] == 3 * 2 * per_message)
    full = run_sim(tiny_model(), topo, make_batches(5, 3), "ngc", lr=0.1)
    assert torch.all(full.stats["bytes_sent"][:, 1] == 3 * 2 * sim.params.shape[1] * 8)


def test_full_graph_gamma1_identical_data_keeps_agents_equal():
    topo = Topology.full(4)
    batches = make_batches(4, 3, same=True)
    for name in ("dsgd", "ngc", "cga"):
        sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, gamma=1.0, momentum=0.9))
        for b in batches:
            sim.step(b)
            assert torch.allclose(sim.params, sim.params[:1].expand_as(sim.params), atol=1e-14, rtol=0)


def test_grad_eval_counts():
    topo = Topology.ring(5)
    dsgd = run_sim(tiny_model(), topo, make_batches(5, 2), "dsgd", lr=0.1)
    ngc = run_sim(tiny_model(), topo, make_batches(5, 2), "ngc", lr=0.1)
    assert dsgd.stats["grad_evals_per_agent_per_step"] == 1
    assert ngc.stats["grad_evals_per_agent_per_step"] == 3


def test_state_dict_resume_is_bit_exact():
    topo = Topology.ring(4)
    batches = make_batches(4, 6)
    for name, extra in (("compcga", {}), ("dsgd", dict(qgm=True)), ("compngc", dict(alpha=0.5))):
        kw = dict(lr=0.1, gamma=0.5, momentum=0.9, nesterov=True, **extra)
        full = run_sim(tiny_model(), topo, batches, name, **kw)
        first = run_sim(tiny_model(), topo, batches[:3], name, **kw)
        state = first.state_dict()
        resumed = cg.Simulator(tiny_model(), topo, cg.make_algorithm(name, **kw))
        resumed.load_state_dict(state)
        for b in batches[3:]:
            resumed.step(b)
        assert torch.equal(full.params, resumed.params)
        assert torch.equal(full.stats["bytes_sent"], resumed.stats["bytes_sent"])


def test_float32_runs_and_nonfinite_loss_is_named():
    model = tiny_model().float()
    topo = Topology.ring(3)
    sim = cg.Simulator(model, topo, cg.make_algorithm("ngc", lr=0.1))
    assert sim.params.dtype == torch.float32
    batches = [(x.float(), y) for x, y in make_batches(3, 1)[0]]
    sim.step(batches)
    bad = list(batches)
    bad[2] = (torch.full_like(bad[2][0], float("nan")), bad[2][1])
    with pytest.raises(cg.NonFiniteError, match="agent 2"):
        sim.step(bad)


@pytest.mark.parametrize("kw", [dict(alpha=1.5), dict(alpha=-0.1), dict(gamma=0.0), dict(gamma=1.2),
                                dict(lr=-1.0), dict(momentum=1.0), dict(bogus=1)])
def test_bad_hyperparameters_are_clear_errors(kw):
    with pytest.raises(cg.ConfigError):
        cg.make_algorithm("ngc", **kw)


def test_unknown_algorithm():
    with pytest.raises(cg.ConfigError, match="available"):
        cg.make_algorithm("nope")


@pytest.mark.parametrize("name", ["ngc", "cga", "dsgd"])
def test_vmap_evaluator_matches_loop(name):
    topo = Topology.ring(4)
    batches = make_batches(4, 3)
    kw = dict(lr=0.1, gamma=0.5, momentum=0.9, nesterov=True)
    loop = cg.Simulator(tiny_model(), topo, cg.make_algorithm(name, **kw), evaluator="loop")
    vmap = cg.Simulator(tiny_model(), topo, cg.make_algorithm(name, **kw), evaluator="vmap")
    assert vmap.engine.evaluate_batched is not None
    for b in batches:
        loop.step(b)
        vmap.step(b)
    torch.testing.assert_close(vmap.params, loop.params, rtol=0, atol=1e-12)


class PoisonedRound2:
    """A LocalComm seen as a plain Comm (messages copied, as on torch.distributed) that, once armed,
    delivers an infinite first round-2 message: agent 0 hears it from its first out-neighbour."""

    def __init__(self, comm):
        self.inner, self.plan, self.bytes_sent = comm, comm.plan, comm.bytes_sent
        self.armed = False

    def exchange(self, x):
        return self.inner.exchange(x)

    def exchange_edges(self, payload):
        out = self.inner.exchange_edges(payload)
        if self.armed:
            out[0][0].fill_(float("inf"))
        return out


def test_nonfinite_received_message_is_named_with_its_round():
    from crossgrad.comm.local import LocalComm
    from crossgrad.engine import Engine

    topo = Topology.ring(4)
    comm = PoisonedRound2(LocalComm(topo.edges, topo.n))
    sim = Engine(tiny_model(), topo, cg.make_algorithm("ngc", lr=0.1), comm, nn.functional.cross_entropy)
    batches = make_batches(4, 2)
    sim.step(batches[0])
    comm.armed = True
    expected = r"non-finite cross-gradient received from agent 1 in round 2 at step 1, agent 0"
    with pytest.raises(cg.NonFiniteError, match=expected):
        sim.step(batches[1])


def test_nonfinite_relayed_message_is_named_with_its_sender():
    from crossgrad.comm.local import LocalComm
    from crossgrad.engine import Engine
    from crossgrad.topology import make_topology

    chain = make_topology("chain", 4)
    comm = PoisonedRound2(LocalComm(chain.edges, chain.n))  # RelaySGD's one exchange goes through exchange_edges
    sim = Engine(tiny_model(), chain, cg.make_algorithm("relaysgd", lr=0.1), comm, nn.functional.cross_entropy)
    batches = make_batches(4, 2)
    sim.step(batches[0])
    comm.armed = True
    with pytest.raises(cg.NonFiniteError, match=r"non-finite relayed message received from agent 1 at step 1, agent 0"):
        sim.step(batches[1])
