"""The torch.distributed backend (gloo, one process per agent) against the in-process simulator."""
from __future__ import annotations

import os
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import crossgrad as cg
from crossgrad.topology import Topology

STEPS = 3
CASES = [
    ("dsgd", dict(momentum=0.9, nesterov=True)),
    ("dsgd", dict(momentum=0.9, qgm=True)),
    ("ngc", dict(alpha=1.0, momentum=0.9, nesterov=True)),
    ("ngc", dict(alpha=0.0, momentum=0.9)),
    ("ngc", dict(alpha=0.5)),
    ("compngc", dict(alpha=1.0, momentum=0.9, nesterov=True)),
    ("cga", dict(momentum=0.9)),
    ("compcga", dict()),
]
GRAPHS = {"ring": lambda: Topology.ring(4), "directed_ring": lambda: Topology.directed_ring(4),
          "star": lambda: Topology.star(4)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def batches_for(n: int, steps: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    return [[(torch.randn(6, 3, generator=g, dtype=dtype), torch.randint(0, 3, (6,), generator=g))
             for _ in range(n)] for _ in range(steps)]


def _init(rank: int, world: int, port: int, timeout: float) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))


def _equivalence_worker(rank: int, world: int, port: int, graph: str, out_dir: str) -> None:
    import torch.distributed as dist

    from crossgrad.distributed import gather_rows, make_engine

    try:
        _init(rank, world, port, 30)
        topo = GRAPHS[graph]()
        batches = batches_for(world, STEPS)
        results = {}
        for k, (name, kw) in enumerate(CASES):
            engine = make_engine(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, gamma=0.5, **kw), timeout=20)
            for t in range(STEPS):
                engine.step([batches[t][rank]])
            params = gather_rows(engine.x[0])
            sent = gather_rows(engine.comm.bytes_sent[0])
            if rank == 0:
                results[k] = (params, sent)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _spawn(target, world: int, args: tuple, join_timeout: float) -> list:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, *args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + join_timeout
    try:
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return procs


@pytest.mark.timeout(240)
@pytest.mark.parametrize("graph", ["ring", "directed_ring", "star"])
def test_distributed_equals_simulator(graph, tmp_path):
    world = 4
    procs = _spawn(_equivalence_worker, world, (free_port(), graph, str(tmp_path)), join_timeout=200)
    errors = [p.read_text() for p in tmp_path.glob("error*.txt")]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = torch.load(tmp_path / "result.pt", weights_only=True)
    topo = GRAPHS[graph]()
    batches = batches_for(world, STEPS)
    for k, (name, kw) in enumerate(CASES):
        sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, gamma=0.5, **kw))
        for b in batches:
            sim.step(b)
        params, sent = results[k]
        torch.testing.assert_close(params, sim.params, rtol=0, atol=1e-6, msg=f"{name} {kw}")
        assert torch.equal(sent, sim.stats["bytes_sent"]), (name, kw)


def _compression_bytes_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from crossgrad.distributed import gather_rows, make_engine

    _init(rank, world, port, 30)
    batches = batches_for(world, 2, torch.float32)
    sent = {}
    for name in ("ngc", "compngc"):
        model = nn.Sequential(nn.Linear(3, 512), nn.Tanh(), nn.Linear(512, 3))
        engine = make_engine(model, Topology.ring(world), cg.make_algorithm(name, lr=0.1), timeout=20)
        for t in range(2):
            engine.step([batches[t][rank]])
        sent[name] = gather_rows(engine.comm.bytes_sent[0])
    if rank == 0:
        torch.save(sent, os.path.join(out_dir, "bytes.pt"))


@pytest.mark.timeout(120)
def test_compngc_round2_is_about_32x_smaller(tmp_path):
    _spawn(_compression_bytes_worker, 3, (free_port(), str(tmp_path)), join_timeout=100)
    sent = torch.load(tmp_path / "bytes.pt", weights_only=True)
    numels = (3 * 512, 512, 512 * 3, 3)
    per_message = sum((k + 7) // 8 + 4 for k in numels)
    assert torch.all(sent["compngc"][:, 1] == 2 * 2 * per_message)  # 2 steps x 2 neighbours
    assert torch.all(sent["ngc"][:, 1] == 2 * 2 * 4 * sum(numels))
    # float32: 1 bit instead of 32 per element, plus a 4-byte scale and byte alignment per tensor
    ratio = sent["compngc"][:, 1] / sent["ngc"][:, 1]
    assert torch.all((ratio > 1 / 32) & (ratio < 1 / 32 * 1.05)), ratio
    assert torch.equal(sent["compngc"][:, 0], sent["ngc"][:, 0])


def _timeout_worker(rank: int, world: int, port: int, out_dir: str, timeout: float, mode: str) -> None:
    from crossgrad.distributed import CommTimeoutError, make_engine

    _init(rank, world, port, 30)
    batches = batches_for(world, 5)
    engine = make_engine(tiny_model(), Topology.ring(world), cg.make_algorithm("ngc", lr=0.1), timeout=timeout)
    start = None
    try:
        for t in range(5):
            if rank == 2 and t == 2:
                if mode == "die":
                    os._exit(0)  # dies without a word, mid-run
                time.sleep(120)  # hangs: alive, connected, silent
            start = time.monotonic()
            engine.step([batches[t][rank]])
    except CommTimeoutError as e:
        with open(os.path.join(out_dir, f"timeout{rank}.txt"), "w") as f:
            f.write(f"{time.monotonic() - start:.3f}\n{e.peers}\n{e}")
        os._exit(3)
    os._exit(0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_dead_or_hung_peer_is_named_within_the_timeout(tmp_path, mode):
    timeout = 3.0
    procs = _spawn(_timeout_worker, 3, (free_port(), str(tmp_path), timeout, mode), join_timeout=25)
    reports = {int(p.stem[-1]): p.read_text().splitlines() for p in tmp_path.glob("timeout*.txt")}
    assert set(reports) == {0, 1}, (reports, [p.exitcode for p in procs])
    for _rank, (elapsed, peers, message) in reports.items():
        assert float(elapsed) < timeout + 2.0
        assert "2" in peers
        assert "peer(s) 2" in message
        if mode == "hang":
            assert f"no answer within {timeout:g} s" in message
    assert procs[0].exitcode == 3 and procs[1].exitcode == 3
