"""The engine's pieces: gossip weights, algorithm hyperparameters, typed state, snapshots, non-finite modes."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import crossgrad as cg
from crossgrad.algorithms import DSGD, algorithm_options
from crossgrad.comm.local import LocalComm
from crossgrad.topology import Topology
from tiny import make_batches, tiny_model


def simulator(name: str, topo: Topology | None = None, **kw) -> cg.Simulator:
    return cg.Simulator(tiny_model(), topo or Topology.ring(4), cg.make_algorithm(name, **kw))


def tensors_of(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_of(v)]
    return []


# ----------------------------------------------------------------------------------------------
# Gossip always mixes with W (bug 1)
# ----------------------------------------------------------------------------------------------

def test_gossip_uses_W_even_when_the_combine_uses_uniform_weights():
    topo = Topology.star(5, weights="metropolis")  # irregular: uniform pi differs from W everywhere
    gamma = 0.5
    spread = torch.randn(5, sum(p.numel() for p in tiny_model().parameters()), dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))

    def gossiped(name, **kw):
        algo = cg.make_algorithm(name, lr=0.1, gamma=gamma, momentum=0.0, **kw)
        # a loss without gradient: the step is the gossip alone
        sim = cg.Simulator(tiny_model(), topo, algo, loss_fn=lambda out, y: 0.0 * out.sum())
        sim.engine.x.copy_(spread)
        sim.step(make_batches(5, 1)[0])
        return sim.params

    expected = (1 - gamma) * spread + gamma * topo.W.double() @ spread
    uniform = gossiped("ngc", weights="uniform")
    torch.testing.assert_close(uniform, expected, rtol=0, atol=1e-12)
    assert torch.equal(uniform, gossiped("dsgd"))


# ----------------------------------------------------------------------------------------------
# Hyperparameters: one source of defaults, validation, codec as a field
# ----------------------------------------------------------------------------------------------

#: algorithms whose method fixes some common options otherwise (D²: no momentum, exact diffusion's (I + W) / 2)
OWN_DEFAULTS = {"d2": dict(gamma=0.5, momentum=0.0, nesterov=False),
                "choco": dict(gamma=0.5),  # compressed gossip needs a consensus step below 1
                "gut": dict(momentum=0.0, nesterov=False),  # the authors' GUT (QG-GUTm: momentum 0.9, mu 0.06)
                "momentum_tracking": dict(nesterov=False),  # their momentum is heavy ball
                "decentlam": dict(nesterov=False)}


def test_defaults_are_the_papers_setting_for_every_algorithm():
    for name in cg.ALGORITHMS:
        opts = algorithm_options(name)
        common = dict(lr=0.01, gamma=1.0, momentum=0.9, nesterov=True, qgm=False, weight_decay=0.0)
        assert {k: opts[k] for k in common} == {**common, **OWN_DEFAULTS.get(name, {})}, name
        assert cg.make_algorithm(name).hyperparameters() == opts


def test_algorithm_options_lists_each_algorithms_keys():
    assert algorithm_options("compngc")["codec"] == "sign" and algorithm_options("compngc")["compress_self"] is True
    assert algorithm_options("ngc")["codec"] is None and algorithm_options("ngc")["alpha"] == 1.0
    assert {"margin", "eps", "codec"} <= set(algorithm_options("cga"))
    assert "codec" not in algorithm_options("dsgd") and "alpha" not in algorithm_options("dsgd")
    with pytest.raises(cg.ConfigError, match="available: " + ", ".join(sorted(cg.ALGORITHMS))):
        algorithm_options("sgd")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(cg.ConfigError, match="its options: alpha, codec, compress_self, gamma"):
        cg.make_algorithm("ngc", margin=0.5)


def test_codec_on_an_algorithm_without_cross_gradients_is_refused():
    with pytest.raises(cg.ConfigError, match="dsgd does not take codec .*no cross-gradients"):
        cg.make_algorithm("dsgd", codec="sign")
    with pytest.raises(cg.ConfigError, match="unknown codec 'bits'"):
        cg.make_algorithm("ngc", codec="bits")
    with pytest.raises(cg.ConfigError, match="compress_self"):
        cg.make_algorithm("cga", compress_self=False)


@pytest.mark.parametrize("key", ["lr", "gamma", "momentum", "weight_decay", "alpha", "margin", "eps"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_hyperparameters_are_refused(key, value):
    name = "ngc" if key == "alpha" else "cga"
    with pytest.raises(cg.ConfigError, match=key):
        cg.make_algorithm(name, **{key: value})


@pytest.mark.parametrize("kw", [dict(margin=-0.1), dict(eps=-1e-12), dict(nesterov="yes"), dict(lr="0.1"),
                                dict(weights="pi")])
def test_out_of_range_or_mistyped_hyperparameters_are_refused(kw):
    with pytest.raises(cg.ConfigError):
        cg.make_algorithm("cga", **kw)


@pytest.mark.parametrize("plain,compressed,extra", [("ngc", "compngc", dict(alpha=0.5)), ("cga", "compcga", {})])
def test_comp_variants_are_the_plain_algorithm_with_the_sign_codec(plain, compressed, extra):
    batches = make_batches(4, 4)
    kw = dict(lr=0.1, gamma=0.5, weight_decay=1e-3, **extra)
    a = simulator(plain, codec="sign", **kw)
    b = simulator(compressed, **kw)
    for step in batches:
        a.step(step)
        b.step(step)
        assert torch.equal(a.params, b.params)
    assert torch.equal(a.stats["bytes_sent"], b.stats["bytes_sent"])
    c = simulator(plain, **kw)
    for step in batches:
        c.step(step)
    assert not torch.equal(c.params, b.params)
    assert b.engine.algorithm.describe().startswith(f"{compressed}(lr=0.1")


# ----------------------------------------------------------------------------------------------
# Engine state: pieces, snapshots (bug 8), device and dtype on load (bug 7), counters
# ----------------------------------------------------------------------------------------------

def test_state_dict_holds_each_piece_by_role():
    sim = simulator("compcga", weight_decay=1e-3)
    sim.step(make_batches(4, 1)[0])
    state = sim.state_dict()
    assert set(state) == {"x", "buffers", "lr", "gamma", "transforms", "codec", "algorithm", "bytes_sent", "stats"}
    assert set(state["codec"]) == {"edge", "self"}
    assert set(state["algorithm"]) == {"v", "qp_failures"}
    assert state["transforms"]["kinds"] == ["WeightDecay", "Momentum"]
    assert simulator("dsgd", momentum=0.0).state_dict()["codec"] == {}


@pytest.mark.parametrize("name,kw", [("compngc", dict(alpha=0.5)), ("compcga", dict(qgm=True)),
                                     ("dsgd", dict(nesterov=False))])
def test_state_dict_is_independent_of_further_training(name, kw):
    sim = simulator(name, lr=0.1, **kw)
    batches = make_batches(4, 3)
    sim.step(batches[0])
    state = sim.state_dict()
    frozen = [t.clone() for t in tensors_of(state)]
    for step in batches[1:]:
        sim.step(step)
    assert all(torch.equal(t, f) for t, f in zip(tensors_of(state), frozen))
    # and it still resumes: a fresh run from the snapshot equals the original from there
    again = simulator(name, lr=0.1, **kw)
    again.load_state_dict(state)
    for step in batches[1:]:
        again.step(step)
    assert torch.equal(again.params, sim.params)


def test_loaded_state_lands_on_the_runs_dtype_and_device():
    """A state saved elsewhere (here: float32 tensors) is copied onto the run's own tensors.

    A wrong device cannot be produced on a CPU-only machine; a wrong dtype goes through the same
    code path (a saved tensor adopted as is instead of copied in), so it stands in for it.
    """
    sim = simulator("compcga", qgm=True)
    sim.step(make_batches(4, 1)[0])
    state = sim.state_dict()
    as_float = {**state, "algorithm": {**state["algorithm"], "v": state["algorithm"]["v"].float()},
                "codec": {k: {"memory": v["memory"].float()} for k, v in state["codec"].items()},
                "x": state["x"].float()}
    other = simulator("compcga", qgm=True)
    other.load_state_dict(as_float)
    e = other.engine
    assert e.algo_state.v.dtype == torch.float64 and e.algo_state.v.device == e.device
    assert e.edge_codec.memory.dtype == e.self_codec.memory.dtype == e.x.dtype == torch.float64
    assert all(t.device == e.device for t in tensors_of(other.state_dict()))


def test_state_of_another_configuration_is_refused():
    state = simulator("compngc").state_dict()
    with pytest.raises(ValueError, match="error memories"):
        simulator("ngc").load_state_dict(state)
    with pytest.raises(ValueError, match="do not match"):
        simulator("compngc", qgm=True).load_state_dict(state)
    with pytest.raises(ValueError, match="no state"):
        simulator("dsgd").load_state_dict({**simulator("dsgd").state_dict(), "algorithm": {"v": 1}})


class CountingState:
    def __init__(self):
        self.events = 0

    def state_dict(self) -> dict[str, Any]:
        return {"events": self.events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = state["events"]

    def counters(self) -> dict[str, int]:
        return {"events": self.events}


@dataclass
class CountingDSGD(DSGD):
    name: ClassVar[str] = "counting"

    def init_state(self, ctx, device):
        return CountingState()

    def combine(self, ctx, g_self, mv, dv, state, view=None):
        state.events += 2
        return g_self


def test_algorithm_counters_reach_the_stats_without_the_engine_knowing_them():
    topo = Topology.ring(4)
    sim = cg.Simulator(tiny_model(), topo, CountingDSGD(lr=0.1))
    for step in make_batches(4, 3):
        sim.step(step)
    assert sim.engine.stats.counters == {"events": 6} and sim.engine.stats.qp_failures == 0
    resumed = cg.Simulator(tiny_model(), topo, CountingDSGD(lr=0.1))
    resumed.load_state_dict(sim.state_dict())
    assert resumed.engine.stats.counters == {"events": 6}
    cga = simulator("cga")
    cga.step(make_batches(4, 1)[0])
    assert cga.engine.stats.counters == {"qp_failures": 0}


# ----------------------------------------------------------------------------------------------
# Non-finite values: raise (default) or record and finish the step
# ----------------------------------------------------------------------------------------------

def poisoned_batches(agent: int) -> list[tuple]:
    batches = make_batches(4, 1)[0]
    batches[agent] = (torch.full_like(batches[agent][0], math.nan), batches[agent][1])
    return batches


def engine_on(name: str, on_nonfinite: str, **kw) -> cg.Engine:
    topo = Topology.ring(4)
    comm = LocalComm(topo.edges, topo.n)
    return cg.Engine(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, **kw), comm,
                     nn.functional.cross_entropy, on_nonfinite=on_nonfinite)


def test_nonfinite_raises_by_default():
    engine = engine_on("ngc", "raise")
    with pytest.raises(cg.NonFiniteError, match="non-finite loss at step 0, agent 2"):
        engine.step(poisoned_batches(2))
    assert engine.nonfinite is None


@pytest.mark.parametrize("name", ["ngc", "compcga"])
def test_nonfinite_recorded_and_the_step_completes(name):
    engine = engine_on(name, "record")
    clean = engine_on(name, "record")
    engine.step(poisoned_batches(2))
    clean.step(make_batches(4, 1)[0])
    assert isinstance(engine.nonfinite, cg.NonFiniteError)
    assert str(engine.nonfinite) == "non-finite loss at step 0, agent 2"
    assert engine.stats.steps == 1
    # both rounds ran in full: the same bytes as a clean step, and the NaN reached the neighbours
    assert torch.equal(engine.comm.bytes_sent, clean.comm.bytes_sent)
    assert not torch.isfinite(engine.x[2]).all()
    engine.step(make_batches(4, 1)[0])
    assert str(engine.nonfinite) == "non-finite loss at step 0, agent 2"  # the first one is kept
    assert not torch.isfinite(engine.x).all(dim=1).any()
    assert "nonfinite" not in engine.state_dict()


def test_on_nonfinite_must_be_known():
    with pytest.raises(ValueError, match="on_nonfinite"):
        engine_on("dsgd", "ignore")
