"""Direction transforms (contract steps 7-8) against their formulas, their chain, and their state."""
import pytest
import torch

import crossgrad as cg
from crossgrad.transforms import QGM, Chain, Momentum, WeightDecay, chain, transforms_for


def rows(seed, n=3, p=5):
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_weight_decay():
    d, x = rows(0), rows(1)
    torch.testing.assert_close(WeightDecay(0.1).update(d, x, 0.5), d + 0.1 * x, rtol=0, atol=1e-15)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_formula(nesterov):
    beta, x0 = 0.9, rows(0)
    t = Momentum(x0, beta, nesterov)
    m = torch.zeros_like(x0)
    for k in range(3):
        d = rows(10 + k)
        out = t.update(d, x0, 0.1)
        m = beta * m + d
        torch.testing.assert_close(out, d + beta * m if nesterov else m, rtol=0, atol=1e-15)


@pytest.mark.parametrize("nesterov", [False, True])
def test_qgm_formula(nesterov):
    beta, x0 = 0.8, rows(0)
    t = QGM(x0, beta, nesterov, lr=0.1)
    m_hat, x_prev, lr_prev = torch.zeros_like(x0), x0.clone(), 0.1
    for k, lr in enumerate((0.1, 0.05, 0.02)):
        d, x_half = rows(10 + k), rows(20 + k)
        out = t.update(d, x_half, lr)
        m_hat = beta * m_hat + (1 - beta) * (x_prev - x_half) / lr_prev
        x_prev, lr_prev = x_half, lr
        m = beta * m_hat + d
        torch.testing.assert_close(out, d + beta * m if nesterov else m, rtol=0, atol=1e-12)


def test_chain_applies_in_order():
    x0, d, x = rows(0), rows(1), rows(2)
    c = chain(WeightDecay(0.5), Momentum(x0, 0.9, nesterov=False))
    torch.testing.assert_close(c.update(d, x, 0.1), d + 0.5 * x, rtol=0, atol=1e-15)  # m = 0.9 * 0 + d'


@pytest.mark.parametrize("kw,kinds", [
    (dict(momentum=0.0), []),
    (dict(momentum=0.9, weight_decay=1e-4), ["WeightDecay", "Momentum"]),
    (dict(momentum=0.9, qgm=True), ["QGM"]),
])
def test_transforms_for_follows_the_hyperparameters(kw, kinds):
    c = transforms_for(cg.make_algorithm("dsgd", **kw), rows(0), 0.1)
    assert [type(t).__name__ for t in c.transforms] == kinds


@pytest.mark.parametrize("make", [lambda x0: Momentum(x0, 0.9, True), lambda x0: QGM(x0, 0.9, True, 0.1)])
def test_state_dict_is_a_snapshot(make):
    t = make(rows(0))
    t.update(rows(1), rows(2), 0.1)
    state = t.state_dict()
    frozen = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    t.update(rows(3), rows(4), 0.05)
    for k, v in frozen.items():
        assert torch.equal(state[k], v) if isinstance(v, torch.Tensor) else state[k] == v


def test_load_state_dict_resumes_exactly_onto_own_dtype():
    x0 = rows(0)
    a = chain(WeightDecay(0.1), QGM(x0, 0.9, True, 0.1))
    a.update(rows(1), rows(2), 0.1)
    state = a.state_dict()
    b = chain(WeightDecay(0.1), QGM(x0, 0.9, True, 0.1))
    b.load_state_dict(state)
    assert torch.equal(a.update(rows(3), rows(4), 0.05), b.update(rows(3), rows(4), 0.05))
    c = chain(WeightDecay(0.1), QGM(x0, 0.9, True, 0.1))
    c.load_state_dict({**state, "states": [{}, {k: v.float() if isinstance(v, torch.Tensor) else v
                                                for k, v in state["states"][1].items()}]})
    assert c.transforms[1].m_hat.dtype == torch.float64 and c.transforms[1].x_prev.dtype == torch.float64


def test_load_state_dict_refuses_another_configuration():
    x0 = rows(0)
    state = chain(Momentum(x0, 0.9, True)).state_dict()
    with pytest.raises(ValueError, match="do not match"):
        chain(QGM(x0, 0.9, True, 0.1)).load_state_dict(state)
    with pytest.raises(ValueError, match="does not fit"):
        Momentum(rows(0, n=4), 0.9, True).load_state_dict(state["states"][0])
    assert isinstance(chain(), Chain)
