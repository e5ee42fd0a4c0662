"""Device correctness: every tensor is created on the run's device.

On a CPU-only machine a tensor made on the wrong device cannot crash, so CI could never see the class of
bug that made CGA fail on CUDA (a CPU `arange` mixed with the plan's GPU tensors). `no_implicit_device`
(tests/device_guard.py) turns every factory call that names no device into a test failure, on any machine.
The tests marked `cuda` run the same algorithms on a GPU and compare with the CPU; they skip without one.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import crossgrad as cg
from crossgrad.algorithms import ALGORITHMS
from crossgrad.topology import OnePeerExponential, RandomMatching
from crossgrad.topology.trees import double_binary_trees
from device_guard import no_implicit_device

TOPOLOGIES = {"ring": lambda: cg.Topology.ring(4), "star": lambda: cg.Topology.star(4),
              "directed_ring": lambda: cg.Topology.directed_ring(4),
              # column-stochastic (push-sum, sgp only): the hub splits its mass 4 ways, the leaves 2 ways
              "star_out": lambda: cg.Topology.star(4, weights="out_uniform"),
              # symmetric and doubly stochastic on an irregular graph (gt and d2 need one)
              "star_metropolis": lambda: cg.Topology.star(4, weights="metropolis"),
              # time-varying: every step's graph and wiring is built while the run steps
              "one_peer_exponential": lambda: OnePeerExponential(4), "random_matching": lambda: RandomMatching(4),
              # two spanning trees (relaysgd only): per-tree comms, messages and counts
              "double_binary_trees": lambda: double_binary_trees(4)}


def _problem(device: str = "cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(device, dtype)
    g = torch.Generator().manual_seed(1)
    batches = [[(torch.randn(4, 3, generator=g, dtype=dtype).to(device),
                 torch.randint(0, 3, (4,), generator=g).to(device)) for _ in range(4)] for _ in range(3)]
    return model, batches


def _train(name: str, topo: cg.Topology, evaluator: str, device: str = "cpu", guard: bool = False):
    model, batches = _problem(device)
    with no_implicit_device() if guard else torch.device(device):
        gamma = {} if name == "relaysgd" else dict(gamma=0.5)  # relaysgd does not gossip: it takes no gamma
        sim = cg.Simulator(model, topo, cg.make_algorithm(name, lr=0.05, **gamma), device=device,
                           evaluator=evaluator)
        for b in batches[:2]:
            sim.step(b)
        state = sim.state_dict()
        sim.step(batches[2])
        sim.load_state_dict(state)  # restored pieces must land on the run's device too
        sim.step(batches[2])
    return sim.params.cpu(), sim.stats["bytes_sent"].cpu()


def test_the_guard_catches_a_tensor_made_without_a_device():
    x = torch.ones(3)
    with pytest.raises(AssertionError, match="without naming its device"), no_implicit_device():
        x + torch.arange(3)


# every algorithm with both evaluators on a regular graph; the irregular and directed paths (padded QP rows,
# directed data-variant weights) with the algorithms that have them
CASES = [(name, "double_binary_trees" if name == "relaysgd" else "ring", ev) for name in sorted(ALGORITHMS)
         for ev in ("loop", "vmap")]
CASES += [(name, topo, "loop") for name in ("ngc", "cga", "compcga") for topo in ("star", "directed_ring")]
CASES += [("sgp", "star_out", "loop")]  # push-sum weights that move off 1
CASES += [(name, topo, "loop") for name in ("dsgd", "ngc", "gt")
          for topo in ("one_peer_exponential", "random_matching")]
CASES += [(name, "star_metropolis", "loop") for name in ("gt", "d2")]


@pytest.mark.parametrize("name,topo,evaluator", CASES)
def test_every_algorithm_creates_tensors_on_the_runs_device(name, topo, evaluator):
    guarded = _train(name, TOPOLOGIES[topo](), evaluator, guard=True)
    plain = _train(name, TOPOLOGIES[topo](), evaluator)
    for a, b in zip(guarded, plain):
        assert torch.equal(a, b)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_cuda_matches_cpu(name):
    # push-sum needs a column-stochastic W, gt and d2 a doubly stochastic one
    star = TOPOLOGIES[{"sgp": "star_out", "gt": "star_metropolis", "d2": "star_metropolis"}.get(name, "star")]
    for evaluator in ("loop", "vmap"):
        on_gpu, bytes_gpu = _train(name, star(), evaluator, device="cuda")
        on_cpu, bytes_cpu = _train(name, star(), evaluator)
        torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-5)
        assert torch.equal(bytes_gpu, bytes_cpu)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("topo", ["one_peer_exponential", "random_matching"])
def test_cuda_matches_cpu_on_time_varying_graphs(topo):
    for name in ("dsgd", "ngc"):
        on_gpu, bytes_gpu = _train(name, TOPOLOGIES[topo](), "loop", device="cuda")
        on_cpu, bytes_cpu = _train(name, TOPOLOGIES[topo](), "loop")
        torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-5)
        assert torch.equal(bytes_gpu, bytes_cpu)
