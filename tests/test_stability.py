"""The stability analysis behind experiments/REPORT.md's NGC alpha = 0 result, checked on the real engine.

experiments/alpha0_stability.py predicts, from the contract's update written as a linear map, the
largest stable lr x curvature per method. Here the simulator trains agents with quadratic losses
a/2 (w - c_i)^2 below and above that bound: below, the agents' disagreement settles; above, it
grows without limit. If the engine's update order or weights differed from the analysed
map, the bound would land elsewhere and one side would fail.
"""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import crossgrad as cg
from crossgrad.topology import Topology

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "alpha0_stability.py"


def load_script():
    spec = importlib.util.spec_from_file_location("alpha0_stability", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def disagreement(algorithm: str, alpha: float, curvature: float, checkpoints: tuple[int, ...],
                 lr: float = 0.01) -> list[float]:
    """Consensus distance after each number of steps in `checkpoints`."""
    torch.manual_seed(0)
    topo = Topology.ring(5)
    model = torch.nn.Linear(1, 1, bias=False).double()
    kw = {"alpha": alpha} if algorithm == "ngc" else {}
    algo = cg.make_algorithm(algorithm, lr=lr, gamma=0.1, momentum=0.9, nesterov=True, **kw)

    def loss_fn(out, target):  # a/2 (w - c_i)^2 for an input of 1
        return 0.5 * curvature * ((out - target) ** 2).mean()

    sim = cg.Simulator(model, topo, algo, loss_fn=loss_fn)
    targets = torch.linspace(-1, 1, 5, dtype=torch.float64)
    batches = [(torch.ones(1, 1, dtype=torch.float64), targets[i].view(1, 1)) for i in range(5)]
    out = []
    for t in range(1, max(checkpoints) + 1):
        try:
            sim.step(batches)
        except cg.NonFiniteError:  # overflowed: grown without limit
            return out + [math.inf] * (len(checkpoints) - len(out))
        if t in checkpoints:
            out.append(sim.consensus_distance())
    return out


def test_dsgd_bound_is_the_momentum_bound():
    """With identical curvature everywhere DSGDm-N's bound is plain Nesterov's, 2(1+β)/(1+2β)."""
    mod = load_script()
    W = Topology.ring(5).W.double().numpy()
    h = mod.largest_stable_h(W, 0.1, 0.9, mod.combine_matrix(W, 0.1, "dsgd"))
    assert h == pytest.approx(2 * 1.9 / 2.8, rel=1e-6)


@pytest.mark.parametrize("algorithm,alpha", [("ngc", 0.0), ("ngc", 1.0), ("dsgd", 0.0)])
def test_engine_is_stable_exactly_below_the_predicted_bound(algorithm, alpha):
    mod = load_script()
    W = Topology.ring(5).W.double().numpy()
    h = mod.largest_stable_h(W, 0.1, 0.9, mod.combine_matrix(W, 0.1, algorithm, alpha))
    lr = 0.01
    # the agents start equal and their optima differ, so disagreement first grows in every case:
    # below the bound it settles at a fixed point, above it keeps growing geometrically
    b400, b800 = disagreement(algorithm, alpha, 0.7 * h / lr, (400, 800))
    a400, a800 = disagreement(algorithm, alpha, 1.3 * h / lr, (400, 800))
    assert b800 < 1.01 * b400
    assert not math.isfinite(a800) or a800 > 100 * a400


def test_alpha0_bound_is_far_below_alpha1():
    mod = load_script()
    W = Topology.ring(5).W.double().numpy()
    h0 = mod.largest_stable_h(W, 0.1, 0.9, mod.combine_matrix(W, 0.1, "ngc", 0.0))
    h1 = mod.largest_stable_h(W, 0.1, 0.9, mod.combine_matrix(W, 0.1, "ngc", 1.0))
    assert h0 < h1 / 20
