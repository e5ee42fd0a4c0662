"""Issue #14: the engine's copy-free in-process paths, the fused update, and the runner feeding the device.

Each fast path is checked against the plain one it replaces (float64, so only rounding may differ); the
`cuda` tests repeat the device-specific ones on a GPU (benchmarks/gpu_check.sh runs them).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import crossgrad as cg
import crossgrad.mixing as mixing_module
from crossgrad import transforms as transforms_module
from crossgrad.codecs import ErrorFeedback, ScaledSign
from crossgrad.comm.local import LocalComm
from crossgrad.engine import Engine
from crossgrad.flat import ParamLayout
from crossgrad.run.config import load_config
from crossgrad.run.data import AgentBatches, prepare
from crossgrad.run.trainer import run_experiment
from crossgrad.transforms import QGM, Momentum, WeightDecay, chain
from device_guard import no_implicit_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class GatheringComm:
    """LocalComm seen through the plain Comm interface only: received rows are copies, as on torch.distributed."""

    def __init__(self, comm: LocalComm):
        self.inner, self.plan, self.bytes_sent = comm, comm.plan, comm.bytes_sent

    def exchange(self, x):
        return self.inner.exchange(x)

    def exchange_edges(self, payload):
        return self.inner.exchange_edges(payload)


def _problem(n: int, device: str = "cpu"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().to(device)
    g = torch.Generator().manual_seed(1)
    batches = [[(torch.randn(5, 3, generator=g, dtype=torch.float64).to(device),
                 torch.randint(0, 3, (5,), generator=g).to(device)) for _ in range(n)] for _ in range(3)]
    return model, batches


def _train(name: str, topo: cg.Topology, shared: bool, device: str = "cpu", guard: bool = False, **kw) -> Engine:
    model, batches = _problem(topo.n, device)
    algo = cg.make_algorithm(name, lr=0.05, gamma=0.7, **kw)
    with no_implicit_device() if guard else torch.device(device):
        comm = LocalComm(topo.edges, topo.n, device=device)
        engine = Engine(model, topo, algo, comm if shared else GatheringComm(comm), nn.functional.cross_entropy,
                        device=device)
        assert engine.shared == shared
        for b in batches:
            engine.step(b)
    return engine


CASES = [("dsgd", {}), ("dsgd", {"qgm": True}), ("ngc", {"alpha": 0.5}), ("compngc", {}), ("cga", {}),
         ("dsgd", {"weight_decay": 0.01, "nesterov": False})]


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("name,kw", CASES)
def test_in_place_rows_equal_received_copies(monkeypatch, name, kw, dense):
    """Gossip as one product over x and cross-gradients read from x's rows == the gathering path."""
    if not dense:  # the sparse product, which larger graphs use
        monkeypatch.setattr(mixing_module, "DENSE_MAX_AGENTS", 2)
    topo = cg.Topology.star(5)  # irregular: in-degrees 4 and 1
    shared, gathered = _train(name, topo, True, **kw), _train(name, topo, False, **kw)
    assert shared.wiring.gossip.G.layout == (torch.strided if dense else torch.sparse_csr)
    torch.testing.assert_close(shared.x, gathered.x, rtol=0, atol=1e-12)
    assert torch.equal(shared.comm.bytes_sent, gathered.comm.inner.bytes_sent)


def test_sparse_gossip_creates_tensors_on_the_runs_device(monkeypatch):
    monkeypatch.setattr(mixing_module, "DENSE_MAX_AGENTS", 2)
    plain = _train("ngc", cg.Topology.ring(4), True)
    guarded = _train("ngc", cg.Topology.ring(4), True, guard=True)
    assert torch.equal(plain.x, guarded.x)


@pytest.mark.parametrize("make", [
    lambda x: Momentum(x, 0.9, nesterov=True), lambda x: Momentum(x, 0.9, nesterov=False),
    lambda x: QGM(x, 0.9, True, lr=0.1), lambda x: QGM(x, 0.8, False, lr=0.1), lambda x: WeightDecay(0.1),
])
def test_fused_apply_equals_update_then_step(make):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 7, dtype=torch.float64, generator=g)
    fused, plain = chain(WeightDecay(0.01), make(x0)), chain(WeightDecay(0.01), make(x0))
    xf, xp = x0.clone(), x0.clone()
    for lr in (0.1, 0.05, 0.05):
        d = torch.randn(3, 7, dtype=torch.float64, generator=g)
        fused.apply(d.clone(), xf, lr)
        xp = xp - lr * plain.update(d, xp, lr)
    torch.testing.assert_close(xf, xp, rtol=0, atol=1e-14)
    for a, b in zip(fused.state_dict()["states"], plain.state_dict()["states"]):
        for key in a:
            torch.testing.assert_close(torch.as_tensor(a[key]), torch.as_tensor(b[key]), rtol=0, atol=1e-14)


@pytest.mark.parametrize("make", [
    lambda x: Momentum(x, 0.9, nesterov=True), lambda x: Momentum(x, 0.9, nesterov=False),
    lambda x: QGM(x, 0.9, True, lr=0.1), lambda x: QGM(x, 0.8, False, lr=0.1),
])
def test_update_by_chunks_equals_update_whole(monkeypatch, make):
    """On CPU the fused update walks the rows in flat chunks; every value is the one-pass update's."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 100, generator=g)
    ds = [torch.randn(3, 100, generator=g) for _ in range(3)]

    def run():
        t, x = make(x0), x0.clone()
        for lr, d in zip((0.1, 0.05, 0.05), ds):
            t.apply(d.clone(), x, lr)
        return x, t.state_dict()

    whole = run()
    monkeypatch.setattr(transforms_module, "CHUNK", 64)  # 300 elements: four chunks and a short one
    chunked = run()
    assert torch.equal(whole[0], chunked[0])
    for key, value in whole[1].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(chunked[1][key]))


def test_error_feedback_writing_over_its_input_equals_a_fresh_output():
    layout = ParamLayout.of(nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2)))
    a, b = ErrorFeedback(ScaledSign(layout)), ErrorFeedback(ScaledSign(layout))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        rows = torch.randn(4, layout.size, generator=g)
        (bits_a, scales_a), c_a = a.encode(rows.clone())
        inout = rows.clone()
        (bits_b, scales_b), c_b = b.encode(inout, out=inout)
        assert c_b is inout
        assert torch.equal(c_a, c_b) and torch.equal(bits_a, bits_b) and torch.equal(scales_a, scales_b)
        assert torch.equal(a.memory, b.memory)
        assert torch.equal(a.roundtrip(rows.clone()), b.roundtrip(rows.clone(), out=rows.clone()))


def test_group_norm_model_on_one_channel_data_is_evaluated(tmp_path):
    """Regression: one-channel data had channels-last strides, which GroupNorm under vmap refused."""
    cfg = load_config(None, ['model.name="cnn5"', 'model.norm="group"', "training.steps=1",
                             "training.threads=1", "topology.n_agents=2", f'output.out_dir="{tmp_path}"'])
    result = run_experiment(cfg, quiet=True)
    assert result.status == "completed" and result.summary["consensus_acc"] is not None


def _batches_by_agent(device: str):
    cfg = load_config(None, ["topology.n_agents=3", "training.batch_size=7", "data.augment=true"])
    p = prepare(cfg, torch.device(device))
    return p, AgentBatches(p, [0, 2], 7)


def test_one_gather_per_step_gives_each_agent_its_own_stream():
    p, batches = _batches_by_agent("cpu")
    _, reference = _batches_by_agent("cpu")
    for _ in range(60):  # past the end of the shards: reshuffles included
        got = batches.next()
        for (xb, yb), stream, gen in zip(got, reference.streams, reference.aug_gens):
            idx = stream.next(7)
            assert torch.equal(yb, p.y_train[idx])
            assert torch.equal(xb, p.augment(p.x_train[idx], generator=gen))


@pytest.mark.cuda
@cuda
def test_cuda_batches_equal_cpu_batches_and_resume_across_devices():
    _, on_cpu = _batches_by_agent("cpu")
    _, on_gpu = _batches_by_agent("cuda")
    for _ in range(30):
        for (xc, yc), (xg, yg) in zip(on_cpu.next(), on_gpu.next()):
            assert torch.equal(yc, yg.cpu())
            torch.testing.assert_close(xg.cpu(), xc)
    state = on_gpu.state_dict()
    assert all(s["perm"].device.type == "cpu" for s in state["streams"])
    on_cpu.load_state_dict(state)
    for (_, yc), (_, yg) in zip(on_cpu.next(), on_gpu.next()):
        assert torch.equal(yc, yg.cpu())


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dense", [True, False])
def test_cuda_in_place_rows_equal_cpu(monkeypatch, dense):
    if not dense:
        monkeypatch.setattr(mixing_module, "DENSE_MAX_AGENTS", 2)
    for name, kw in CASES:
        on_gpu = _train(name, cg.Topology.star(5), True, device="cuda", **kw)
        on_cpu = _train(name, cg.Topology.star(5), True, **kw)
        torch.testing.assert_close(on_gpu.x.cpu(), on_cpu.x, rtol=0, atol=1e-10)


def test_bench_runner_mode_times_the_runner_against_the_engine(capsys):
    from crossgrad.cli import main

    rc = main(["bench", "--runner", "--runner-steps", "1", "--repeats", "1", "--threads", "1", "--device", "cpu",
               "--set", "topology.n_agents=2", "--set", "model.options.widths=[4, 4, 4, 4]"])
    out = capsys.readouterr().out
    assert rc == 0 and "runner / engine" in out and "engine steps/s" in out


@pytest.mark.cuda
@cuda
def test_sweep_runs_sharing_a_gpu_are_capped_at_their_share(monkeypatch):
    from crossgrad.run.trainer import GPU_SHARE_ENV, share_gpu

    dev = torch.device("cuda")
    monkeypatch.setenv(GPU_SHARE_ENV, "2")
    share_gpu(dev)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(0.6 * torch.cuda.get_device_properties(dev).total_memory), dtype=torch.uint8,
                        device=dev)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
