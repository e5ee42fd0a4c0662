"""Choco-SGD against an independent per-agent re-computation, and its bytes, state and refusals.

The reference keeps, for every agent, its own copy of each public model x̂ it tracks (no pooling), and
compresses with codecs written out here from their definitions (random-k's draws with a pure-Python
splitmix64), sharing nothing with the engine but the model and the topology.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import crossgrad as cg
from crossgrad.topology import Topology
from device_guard import no_implicit_device
from tiny import make_batches, tiny_model

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


# -- the reference's codecs, from their definitions ----------------------------------------------

def splitmix(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def fmix32(z: int) -> int:
    z &= 0xFFFFFFFF
    z = ((z ^ (z >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    z = ((z ^ (z >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    return z ^ (z >> 16)


def signed32(z: int) -> int:
    return z - (1 << 32) if z >= 1 << 31 else z


def kept(numel: int, ratio: float) -> int:
    return min(numel, max(1, math.floor(ratio * numel + 0.5)))


def compress(v: torch.Tensor, sizes: list[int], codec: str, ratio: float, agent: int, draw: int) -> torch.Tensor:
    """C(v) of one agent's flat row, tensor by tensor."""
    out, start = torch.zeros_like(v), 0
    if codec == "random-k":
        base = splitmix(splitmix(0) * GOLDEN + splitmix(draw))
        key = splitmix(agent * GOLDEN + base)
        low, odd = key & 0x7FFFFFFF, (key >> 32) & 0x7FFFFFFF | 1
    for size in sizes:
        part = v[start:start + size]
        if codec == "sign":
            scale = (part.abs().sum() / size).float().double()
            out[start:start + size] = torch.where(part < 0, -scale, scale)
        elif codec == "identity":
            out[start:start + size] = part
        else:
            k = kept(size, ratio)
            if codec == "top-k":
                order = sorted(range(size), key=lambda p: -abs(float(part[p])))
            else:
                order = sorted(range(size), key=lambda p: -signed32(fmix32(((start + p) ^ low) * odd)))
            for p in order[:k]:
                out[start + p] = part[p]
        start += size
    return out


def grad_at(model: nn.Module, row: torch.Tensor, batch) -> torch.Tensor:
    params, start = {}, 0
    for name, p in model.named_parameters():
        params[name] = row[start:start + p.numel()].view(p.shape).clone().requires_grad_(True)
        start += p.numel()
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])


def reference_choco(model, W, batches, *, codec, ratio, lr, gamma, beta, nesterov, wd, public_init):
    """Every agent i: its own copies hat[i][j] of x̂_j for itself and each in-neighbour j."""
    W = torch.as_tensor(W, dtype=torch.float64)
    n = W.shape[0]
    sizes = [p.numel() for p in model.parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    nbrs = [[j for j in range(n) if j != i and W[i, j] > 0] for i in range(n)]
    x = [x0.clone() for _ in range(n)]
    start = x0 if public_init == "model" else torch.zeros_like(x0)
    hat = [{j: start.clone() for j in [i, *nbrs[i]]} for i in range(n)]
    buf = [torch.zeros_like(x0) for _ in range(n)]
    for t, step in enumerate(batches):
        q = [compress(x[i] - hat[i][i], sizes, codec, ratio, i, t) for i in range(n)]
        for i in range(n):
            for j in hat[i]:
                hat[i][j] = hat[i][j] + q[j]
        for i in range(n):
            m = x[i] + gamma * sum(W[i, j] * (hat[i][j] - hat[i][i]) for j in nbrs[i])
            d = grad_at(model, m, step[i]) + wd * m
            if beta > 0:
                buf[i] = beta * buf[i] + d
                d = d + beta * buf[i] if nesterov else buf[i]
            x[i] = m - lr * d
    return torch.stack(x), hat


def run_choco(topo, batches, guard: bool = False, **kw):
    model = tiny_model()
    with no_implicit_device() if guard else torch.device("cpu"):
        sim = cg.Simulator(model, topo, cg.make_algorithm("choco", **kw))
        for b in batches:
            sim.step(b)
    return sim


GRAPHS = {"ring": lambda: Topology.ring(4), "star": lambda: Topology.star(5),
          "directed_ring": lambda: Topology.directed_ring(4)}
HAND_CASES = [
    ("sign", 0.01, "ring", "model", dict(momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("sign", 0.01, "star", "zero", dict(momentum=0.0, nesterov=False)),
    ("top-k", 0.3, "star", "model", dict(momentum=0.9, nesterov=False)),
    ("top-k", 0.5, "directed_ring", "zero", dict(momentum=0.9, nesterov=True)),
    ("random-k", 0.3, "ring", "zero", dict(momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("random-k", 0.2, "directed_ring", "model", dict(momentum=0.0, nesterov=False)),
    ("identity", 0.01, "star", "model", dict(momentum=0.9, nesterov=True)),
]


@pytest.mark.parametrize("codec,ratio,graph,init,mo", HAND_CASES)
def test_matches_hand_computed_update(codec, ratio, graph, init, mo):
    topo = GRAPHS[graph]()
    batches = make_batches(topo.n, 4)
    hp = dict(lr=0.1, gamma=0.6, codec=codec, ratio=ratio, public_init=init, **mo)
    sim = run_choco(topo, batches, **hp)
    ref, hat = reference_choco(tiny_model(), topo.W, batches, codec=codec, ratio=ratio, lr=0.1, gamma=0.6,
                               beta=mo["momentum"], nesterov=mo["nesterov"], wd=mo.get("weight_decay", 0.0),
                               public_init=init)
    torch.testing.assert_close(sim.params, ref, rtol=0, atol=1e-12)
    x_hat = sim.engine.algo_state.x_hat  # in-process: one public copy per agent
    for i in range(topo.n):
        for j, copy in hat[i].items():
            torch.testing.assert_close(x_hat[j], copy, rtol=0, atol=1e-12)


def local_step(model, x, batch, buf, *, at, lr, beta, nesterov, wd):
    """x - lr T(g(at) + wd x): one agent's SGD step with momentum buffer buf (updated in place)."""
    d = grad_at(model, at, batch) + wd * x
    if beta > 0:
        buf.mul_(beta).add_(d)
        d = d + beta * buf if nesterov else buf.clone()
    return x - lr * d


def reference_published_choco(model, W, batches, *, variant, codec, ratio, lr, gamma, beta, nesterov, wd,
                              public_init):
    """The published codes' order, agent by agent: gradient at x and the local step, then the gossip:
    "paper" (Algorithm 1, epfml/powergossip without overlap): q = C(x - x̂), x̂ += q, x += gamma sum w (x̂_j - x̂_i);
    "authors_code" (epfml/ChocoSGD): x += gamma sum w (x̂_j - x̂_i) with the copies as they were, then q = C(x - x̂).
    Returns the models after the last step's local step (its gossip opens crossgrad's next step); the round
    after step t's local step is random-k's draw t + 1."""
    W = torch.as_tensor(W, dtype=torch.float64)
    n = W.shape[0]
    sizes = [p.numel() for p in model.parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    nbrs = [[j for j in range(n) if j != i and W[i, j] > 0] for i in range(n)]
    x = [x0.clone() for _ in range(n)]
    start = x0 if public_init == "model" else torch.zeros_like(x0)
    hat = [{j: start.clone() for j in [i, *nbrs[i]]} for i in range(n)]
    buf = [torch.zeros_like(x0) for _ in range(n)]

    def consensus(i):
        return x[i] + gamma * sum(W[i, j] * (hat[i][j] - hat[i][i]) for j in nbrs[i])

    for t, step in enumerate(batches):
        x = [local_step(model, x[i], step[i], buf[i], at=x[i], lr=lr, beta=beta, nesterov=nesterov, wd=wd)
             for i in range(n)]
        if t == len(batches) - 1:
            break
        if variant == "authors_code":
            x = [consensus(i) for i in range(n)]
        q = [compress(x[i] - hat[i][i], sizes, codec, ratio, i, t + 1) for i in range(n)]
        for i in range(n):
            for j in hat[i]:
                hat[i][j] = hat[i][j] + q[j]
        if variant == "paper":
            x = [consensus(i) for i in range(n)]
    return torch.stack(x), hat


def reference_overlap_choco(model, W, batches, *, variant, codec, ratio, lr, gamma, beta, nesterov, wd,
                            public_init):
    """The PowerGossip code's overlapping order: the gradient at x, the gossip of x, the step applied to the
    gossiped model (weight decay there too). variant as in crossgrad; the first round is skipped unless it
    is "gossip_first"."""
    W = torch.as_tensor(W, dtype=torch.float64)
    n = W.shape[0]
    sizes = [p.numel() for p in model.parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    nbrs = [[j for j in range(n) if j != i and W[i, j] > 0] for i in range(n)]
    x = [x0.clone() for _ in range(n)]
    start = x0 if public_init == "model" else torch.zeros_like(x0)
    hat = [{j: start.clone() for j in [i, *nbrs[i]]} for i in range(n)]
    buf = [torch.zeros_like(x0) for _ in range(n)]

    def mix(rows, i):
        return rows[i] + gamma * sum(W[i, j] * (hat[i][j] - hat[i][i]) for j in nbrs[i])

    for t, step in enumerate(batches):
        m = [xi.clone() for xi in x]
        if t > 0 or variant == "gossip_first":
            if variant == "authors_code":
                m = [mix(x, i) for i in range(n)]
            sent = m if variant == "authors_code" else x
            q = [compress(sent[i] - hat[i][i], sizes, codec, ratio, i, t) for i in range(n)]
            for i in range(n):
                for j in hat[i]:
                    hat[i][j] = hat[i][j] + q[j]
            if variant != "authors_code":
                m = [mix(x, i) for i in range(n)]
        x = [local_step(model, m[i], step[i], buf[i], at=x[i], lr=lr, beta=beta, nesterov=nesterov, wd=wd)
             for i in range(n)]
    return torch.stack(x), hat


PUBLISHED_CASES = [
    ("paper", "sign", 0.01, "ring", "zero", dict(momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("paper", "random-k", 0.3, "directed_ring", "model", dict(momentum=0.0, nesterov=False)),
    ("authors_code", "top-k", 0.3, "star", "zero", dict(momentum=0.9, nesterov=False, weight_decay=1e-3)),
    ("authors_code", "random-k", 0.3, "ring", "model", dict(momentum=0.9, nesterov=True)),
]


@pytest.mark.parametrize("variant,codec,ratio,graph,init,mo", PUBLISHED_CASES)
def test_published_orders_match_hand_computed_updates(variant, codec, ratio, graph, init, mo):
    topo = GRAPHS[graph]()
    batches = make_batches(topo.n, 4)
    hp = dict(lr=0.1, gamma=0.6, codec=codec, ratio=ratio, public_init=init, **mo)
    sim = run_choco(topo, batches, variant=variant, **hp)
    ref, hat = reference_published_choco(tiny_model(), topo.W, batches, variant=variant, codec=codec, ratio=ratio,
                                         lr=0.1, gamma=0.6, beta=mo["momentum"], nesterov=mo["nesterov"],
                                         wd=mo.get("weight_decay", 0.0), public_init=init)
    torch.testing.assert_close(sim.params, ref, rtol=0, atol=1e-12)
    for i in range(topo.n):
        for j, copy in hat[i].items():
            torch.testing.assert_close(sim.engine.algo_state.x_hat[j], copy, rtol=0, atol=1e-12)
    default = run_choco(topo, batches, **hp)
    if variant == "paper" and init == "model":  # the default's extra first round carries C(x0 - x0) = 0
        torch.testing.assert_close(sim.params, default.params, rtol=0, atol=1e-15)
        assert torch.equal(sim.stats["bytes_sent"][:, 0] * 4, default.stats["bytes_sent"][:, 0] * 3)  # 3 rounds, 4
    else:
        assert (sim.params - default.params).abs().max() > 1e-6  # not the default's order


@pytest.mark.parametrize("variant,codec,init", [("gossip_first", "sign", "zero"), ("paper", "top-k", "model"),
                                                ("authors_code", "random-k", "zero")])
def test_overlap_matches_hand_computed_update(variant, codec, init):
    topo = Topology.ring(4)
    batches = make_batches(4, 4)
    hp = dict(lr=0.1, gamma=0.6, codec=codec, ratio=0.3, public_init=init, momentum=0.9, weight_decay=1e-3)
    sim = run_choco(topo, batches, variant=variant, overlap=True, **hp)
    ref, _ = reference_overlap_choco(tiny_model(), topo.W, batches, variant=variant, codec=codec, ratio=0.3,
                                     lr=0.1, gamma=0.6, beta=0.9, nesterov=True, wd=1e-3, public_init=init)
    torch.testing.assert_close(sim.params, ref, rtol=0, atol=1e-12)


def test_published_first_step_sends_nothing():
    """paper and authors_code: the first step is a local step from x0; from the second on one message a step."""
    topo, batches = Topology.ring(4), make_batches(4, 3)
    for variant in ("paper", "authors_code"):
        sim = run_choco(topo, batches[:1], variant=variant, lr=0.1)
        assert sim.stats["bytes_sent"].eq(0).all()
        sent = run_choco(topo, batches, variant=variant, lr=0.1).stats["bytes_sent"][:, 0]
        assert torch.equal(sent, run_choco(topo, batches[:2], lr=0.1).stats["bytes_sent"][:, 0])


def test_identity_codec_is_dsgd():
    """With nothing lost to compression x̂ = x after the update, and the consensus step is DSGD's gossip."""
    topo, batches = Topology.star(5), make_batches(5, 4)
    choco = run_choco(topo, batches, lr=0.1, gamma=0.7, codec="identity")
    dsgd = cg.Simulator(tiny_model(), topo, cg.make_algorithm("dsgd", lr=0.1, gamma=0.7))
    for b in batches:
        dsgd.step(b)
    torch.testing.assert_close(choco.params, dsgd.params, rtol=0, atol=1e-12)


@pytest.mark.parametrize("codec,ratio", [("sign", 0.01), ("top-k", 0.3), ("random-k", 0.2)])
def test_round1_bytes_are_the_compressed_payload(codec, ratio):
    topo = Topology.star(5)  # out-degrees 4 and 1
    steps = 3
    sim = run_choco(topo, make_batches(5, steps), lr=0.1, codec=codec, ratio=ratio)
    sizes = [p.numel() for p in tiny_model().parameters()]
    if codec == "sign":
        message = sum(math.ceil(k / 8) + 4 for k in sizes)  # packed bits + a float32 scale per tensor
    else:
        message = sum(kept(k, ratio) for k in sizes) * (4 + 8)  # int32 position + float64 value
    out_degree = torch.tensor([4.0, 1, 1, 1, 1], dtype=torch.float64)
    sent = sim.stats["bytes_sent"]
    assert torch.equal(sent[:, 0], steps * out_degree * message)
    assert torch.all(sent[:, 1] == 0)


@pytest.mark.parametrize("codec,init,form", [("random-k", "zero", {}), ("top-k", "model", {}), ("sign", "model", {}),
                                             ("random-k", "model", dict(variant="authors_code", overlap=True)),
                                             ("sign", "zero", dict(variant="paper"))])
def test_resume_is_bit_exact(codec, init, form):
    topo, batches = Topology.ring(4), make_batches(4, 5)
    kw = dict(lr=0.1, gamma=0.5, codec=codec, ratio=0.3, public_init=init, **form)
    whole = run_choco(topo, batches, **kw)
    first = run_choco(topo, batches[:2], **kw)
    saved = first.state_dict()
    first.step(batches[2])  # the saved state is a snapshot: later steps do not change it
    resumed = cg.Simulator(tiny_model(), topo, cg.make_algorithm("choco", **kw))
    resumed.load_state_dict(saved)
    for b in batches[2:]:
        resumed.step(b)
    assert torch.equal(resumed.params, whole.params)
    assert torch.equal(resumed.engine.algo_state.x_hat, whole.engine.algo_state.x_hat)
    assert torch.equal(resumed.stats["bytes_sent"], whole.stats["bytes_sent"])


@pytest.mark.parametrize("codec", ["sign", "top-k", "random-k"])
def test_creates_tensors_on_the_runs_device(codec, monkeypatch):
    import crossgrad.mixing as mixing

    monkeypatch.setattr(mixing, "DENSE_MAX_AGENTS", 2)  # the sparse consensus product too
    topo, batches = Topology.star(5), make_batches(5, 3)
    kw = dict(lr=0.1, gamma=0.5, codec=codec, ratio=0.3)
    plain = run_choco(topo, batches, **kw)
    guarded = run_choco(topo, batches, guard=True, **kw)
    assert guarded.engine.algo_state.mixing.M.layout == torch.sparse_csr
    torch.testing.assert_close(guarded.params, plain.params, rtol=0, atol=1e-12)


def test_sparse_consensus_product_equals_the_dense_one(monkeypatch):
    import crossgrad.mixing as mixing

    topo, batches = Topology.star(5), make_batches(5, 3)
    dense = run_choco(topo, batches, lr=0.1, codec="top-k", ratio=0.3)
    monkeypatch.setattr(mixing, "DENSE_MAX_AGENTS", 2)
    sparse = run_choco(topo, batches, lr=0.1, codec="top-k", ratio=0.3)
    assert dense.engine.algo_state.mixing.M.layout == torch.strided
    torch.testing.assert_close(sparse.params, dense.params, rtol=0, atol=1e-12)


def test_options_are_validated():
    with pytest.raises(cg.ConfigError, match="choco's codec must be one of"):
        cg.make_algorithm("choco", codec="topk")
    with pytest.raises(cg.ConfigError, match=r"ratio .* must be in \(0, 1\]"):
        cg.make_algorithm("choco", codec="top-k", ratio=0.0)
    with pytest.raises(cg.ConfigError, match="public_init must be"):
        cg.make_algorithm("choco", public_init="random")
    with pytest.raises(cg.ConfigError, match=r"gamma .* must be in \(0, 1\]"):
        cg.make_algorithm("choco", gamma=1.5)
    with pytest.raises(cg.ConfigError, match="choco's variant must be one of 'gossip_first', 'paper', "
                                             "'authors_code', not 'powergossip'"):
        cg.make_algorithm("choco", variant="powergossip")
    with pytest.raises(cg.ConfigError, match="overlap must be true or false"):
        cg.make_algorithm("choco", overlap="yes")


def test_time_varying_topologies_are_refused():
    class Alternating:  # anything with at(step) is a time-varying topology to the engine
        n = 4

        def at(self, step):
            return Topology.ring(4) if step % 2 else Topology.full(4)

    with pytest.raises(cg.ConfigError, match="choco needs one fixed graph"):
        cg.make_algorithm("choco").check_topology(Alternating())


def test_choco_is_configured_by_name():
    from crossgrad.run.config import load_config

    cfg = load_config(None, ['algorithm.name="choco"', 'algorithm.codec="random-k"', "algorithm.ratio=0.05"])
    algo = cfg.make_algorithm()
    assert isinstance(algo, cg.ALGORITHMS["choco"])
    assert (algo.codec, algo.ratio, algo.gamma, algo.public_init) == ("random-k", 0.05, 0.5, "model")
    with pytest.raises(cg.ConfigError, match="choco's codec must be one of"):
        load_config(None, ['algorithm.name="choco"', 'algorithm.codec="zip"'])
