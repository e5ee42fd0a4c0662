"""The torch.distributed backend (gloo) against the in-process simulator.

One launch of 4 processes (one agent each) runs every algorithm on every graph (start-up
dominates on CI), then the tests compare its results with the simulator's in this process. One
launch of 3 processes does the same with uneven blocks of 7-8 agents per rank, and checks the
messages between ranks and how a hung rank is named. Two more launches kill or hang a rank
mid-run and check that its neighbours fail fast, naming it.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import crossgrad as cg
from crossgrad.topology import OnePeerExponential, RandomMatching, Topology
from crossgrad.topology.trees import binary_tree, double_binary_trees

WORLD = 4
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
    ("choco", dict(codec="sign", momentum=0.9)),
    ("choco", dict(codec="top-k", ratio=0.3, public_init="zero")),
    ("choco", dict(codec="random-k", ratio=0.3)),
    ("ngc", dict(alpha=0.5, codec="random-k")),  # random-k draws per edge, named alike on every backend
]
GRAPHS = {
    "ring": lambda: Topology.ring(WORLD),
    "directed_ring": lambda: Topology.directed_ring(WORLD),
    "star": lambda: Topology.star(WORLD),
    "chain": lambda: Topology.chain(WORLD),
}
WIDE = 512  # hidden width of the float32 model of the compression byte check
#: push-sum (sgp) on column-stochastic graphs (each agent splits its mass over its out-neighbours), irregular so
#: that the weights move off 1; one agent per rank here, uneven blocks in BLOCK_PUSH_GRAPHS
PUSH_CASES = [("sgp", dict(momentum=0.9, nesterov=True)), ("sgp", dict(qgm=True, weight_decay=1e-3))]
PUSH_GRAPHS = {
    "push_directed": lambda: Topology.from_edges(WORLD, [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)], directed=True,
                                                 weights="out_uniform"),
}
#: gradient tracking, D², GUT, Momentum Tracking (its first step's global average included), DecentLaM and RelaySGD
#: on graphs they accept (gt: doubly stochastic W, also directed or time-varying; d2: symmetric W; relaysgd:
#: trees): (label, topology, algorithm, options), one agent per rank
TRACKING_RUNS = [
    ("gt_ring", lambda: Topology.ring(WORLD), "gt", dict(momentum=0.9, nesterov=True)),
    ("gt_directed_ring", lambda: Topology.directed_ring(WORLD), "gt", dict(qgm=True, weight_decay=1e-3)),
    ("gt_one_peer_exponential", lambda: OnePeerExponential(WORLD), "gt", dict(momentum=0.9, nesterov=False)),
    ("d2_ring", lambda: Topology.ring(WORLD), "d2", dict(weight_decay=1e-3)),
    ("d2_chain_metropolis", lambda: Topology.chain(WORLD, weights="metropolis"), "d2", dict()),
    ("gut_ring", lambda: Topology.ring(WORLD), "gut", dict(mu=0.5, momentum=0.9, nesterov=True, gamma=0.7)),
    ("momentum_tracking_ring", lambda: Topology.ring(WORLD), "momentum_tracking", dict(weight_decay=1e-3)),
    ("decentlam_directed_ring", lambda: Topology.directed_ring(WORLD), "decentlam", dict(gamma=0.8)),
    ("relaysgd_chain", lambda: Topology.chain(WORLD), "relaysgd", dict()),
    ("relaysgd_grad_double_binary_trees", lambda: double_binary_trees(WORLD), "relaysgd",
     dict(relay="grad")),
]

#: the baselines' published forms (docs/algorithms.md), run and checked as TRACKING_RUNS are
PUBLISHED_RUNS = [
    ("gt_diging_ring", lambda: Topology.ring(WORLD), "gt", dict(variant="diging", qgm=True)),
    ("gt_tracked_wd_one_peer_exponential", lambda: OnePeerExponential(WORLD), "gt",
     dict(variant="diging", track_weight_decay=True, weight_decay=0.05)),
    ("choco_paper_star", lambda: Topology.star(WORLD), "choco", dict(variant="paper", public_init="zero")),
    ("choco_authors_code_directed_ring", lambda: Topology.directed_ring(WORLD), "choco",
     dict(variant="authors_code", codec="random-k", ratio=0.3, overlap=True)),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def wide_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, WIDE), nn.Tanh(), nn.Linear(WIDE, 3))


def batches_for(n: int, steps: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    return [[(torch.randn(6, 3, generator=g, dtype=dtype), torch.randint(0, 3, (6,), generator=g))
             for _ in range(n)] for _ in range(steps)]


@contextlib.contextmanager
def rank_errors(rank: int, out_dir: str):
    """A worker's body: an exception is written to out_dir/error{rank}.txt, where the parent reads the first
    rank's traceback to fail with, then raised again."""
    try:
        yield
    except Exception:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _init(rank: int, world: int, port: int, timeout: float) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))


def _spawn(target, world: int, args: tuple, join_timeout: float, wait_for: list[int] | None = None) -> list:
    """Start `world` processes; join those in `wait_for` (all by default) and kill whatever is left."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, *args)) for r in range(world)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + join_timeout
        for r in (range(world) if wait_for is None else wait_for):
            procs[r].join(max(0.1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
    return procs


# -- equivalence with the simulator ------------------------------------------------------------


def _equivalence_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from crossgrad.comm.dist import DistComm
    from crossgrad.distributed import gather_rows, gather_state, make_engine

    with rank_errors(rank, out_dir):
        _init(rank, world, port, 30)
        results = {}
        batches = batches_for(world, STEPS)
        for graph, make_topology in GRAPHS.items():
            topo = make_topology()
            for k, (name, kw) in enumerate(CASES):
                algo = cg.make_algorithm(name, lr=0.1, gamma=0.5, **kw)
                engine = make_engine(tiny_model(), topo, algo, timeout=20)
                for t in range(STEPS):
                    engine.step([batches[t][rank]])
                state = gather_state(engine)
                if rank == 0:
                    results[graph, k] = (state["x"], state["bytes_sent"])
        _push_sum_runs(rank, PUSH_GRAPHS, results)
        _tracking_runs(rank, TRACKING_RUNS + PUBLISHED_RUNS, results)
        # float32 payloads for the compression ratio
        batches = batches_for(world, 2, torch.float32)
        for name in ("ngc", "compngc"):
            engine = make_engine(wide_model(), Topology.ring(world), cg.make_algorithm(name, lr=0.1), timeout=20)
            for t in range(2):
                engine.step([batches[t][rank]])
            sent = gather_rows(engine.comm.bytes_sent)
            if rank == 0:
                results["bytes", name] = sent
        # misuse is reported, not hung on
        try:
            make_engine(tiny_model(seed=rank // 2), Topology.ring(world), cg.make_algorithm("dsgd", lr=0.1))
            results["seed_error"] = ""
        except ValueError as e:
            results["seed_error"] = str(e)
        try:
            DistComm(Topology.ring(world - 1).edges, world - 1)
            results["size_error"] = ""
        except ValueError as e:
            results["size_error"] = str(e)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        dist.destroy_process_group()


def _run_workers(worker, world: int, out: Path) -> Path:
    """Run `worker` on `world` gloo ranks writing into `out`; fail with the first rank's traceback."""
    procs = _spawn(worker, world, (free_port(), str(out)), join_timeout=150)
    errors = [p.read_text() for p in out.glob("error*.txt")]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return out


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = _run_workers(_equivalence_worker, WORLD, tmp_path_factory.mktemp("dist"))
    return torch.load(out / "result.pt", weights_only=True)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_distributed_equals_simulator(graph, dist_results):
    topo = GRAPHS[graph]()
    batches = batches_for(WORLD, STEPS)
    for k, (name, kw) in enumerate(CASES):
        sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, gamma=0.5, **kw))
        for b in batches:
            sim.step(b)
        params, sent = dist_results[graph, k]
        torch.testing.assert_close(params, sim.params, rtol=0, atol=1e-6, msg=f"{graph} {name} {kw}")
        assert torch.equal(sent, sim.stats["bytes_sent"]), (graph, name, kw, sent, sim.stats["bytes_sent"])
        if name == "ngc" and kw["alpha"] == 0:
            assert torch.all(sent[:, 1] == 0)  # no round 2 at all


@pytest.mark.timeout(200)
def test_compngc_round2_is_about_32x_smaller(dist_results):
    ngc, comp = dist_results["bytes", "ngc"], dist_results["bytes", "compngc"]
    numels = (3 * WIDE, WIDE, WIDE * 3, 3)
    per_message = sum((k + 7) // 8 + 4 for k in numels)  # packed bits + one float32 scale per tensor
    assert torch.all(comp[:, 1] == 2 * 2 * per_message)  # 2 steps x 2 neighbours
    assert torch.all(ngc[:, 1] == 2 * 2 * 4 * sum(numels))
    ratio = comp[:, 1] / ngc[:, 1]
    assert torch.all((ratio > 1 / 32) & (ratio < 1 / 32 * 1.05)), ratio
    assert torch.equal(comp[:, 0], ngc[:, 0])  # models are never compressed


@pytest.mark.timeout(200)
def test_misuse_is_reported_on_every_rank(dist_results):
    assert "start from other weights" in dist_results["seed_error"]
    assert "agents [2, 3]" in dist_results["seed_error"]
    assert "3 agents but the process group has 4 ranks" in dist_results["size_error"]


# -- blocks of agents per rank ---------------------------------------------------------------

def test_agent_blocks_are_contiguous_and_at_most_one_apart():
    from crossgrad.comm.base import agent_blocks

    assert agent_blocks(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert agent_blocks(4, 4) == [range(r, r + 1) for r in range(4)]  # one agent per rank: rank r = agent r
    assert [len(b) for b in agent_blocks(256, 4)] == [64] * 4
    with pytest.raises(ValueError, match="every process needs at least one agent"):
        agent_blocks(3, 4)


def test_a_message_of_several_tensors_unpacks_to_them():
    """Round 2's payload (e.g. packed sign bits and float32 scales) travels as the bytes of one buffer."""
    from crossgrad.comm.dist import _pack, _receive_buffer, _unpack

    like = (torch.zeros(5, 3, dtype=torch.uint8), torch.zeros(5, 2), torch.zeros(5, dtype=torch.float64))
    parts = [torch.randint(0, 255, (2, 3), dtype=torch.uint8), torch.randn(2, 2), torch.randn(2, dtype=torch.float64)]
    message = _pack(parts)
    assert message.dtype == torch.uint8 and message.shape == _receive_buffer(like, 2).shape
    for got, sent in zip(_unpack(message, like, 2), parts, strict=True):
        assert got.dtype == sent.dtype and torch.equal(got, sent)
    assert _pack(parts[1:2]) is parts[1]  # one tensor goes as it is


BLOCK_WORLD = 3
BLOCK_GRAPHS = {  # uneven blocks over 3 ranks: 7 agents -> 3, 2, 2; 8 -> 3, 3, 2
    "ring": lambda: Topology.ring(7),
    "torus": lambda: Topology.torus(2, 4),
    "exponential": lambda: Topology.exponential(8),
    "star": lambda: Topology.star(7),
    "directed_exponential": lambda: Topology.exponential(7, directed=True),
}
FLOAT32_CASES = [("ngc", dict(alpha=1.0, momentum=0.9, nesterov=True)), ("compngc", dict(alpha=1.0)),
                 ("compcga", dict())]
BLOCK_PUSH_GRAPHS = {  # 7 agents -> 3, 2, 2 per rank; out-degrees 1 to 4
    "push_erdos_renyi": lambda: Topology.erdos_renyi(7, 0.3, seed=2, directed=True, weights="out_uniform"),
}
BLOCK_PUBLISHED_RUNS = [  # as PUBLISHED_RUNS, 7 or 8 agents over 3 ranks (remote public copies included)
    ("gt_tracked_wd_random_matching", lambda: RandomMatching(8), "gt",
     dict(track_weight_decay=True, weight_decay=0.05)),
    ("choco_authors_code_star", lambda: Topology.star(7), "choco", dict(variant="authors_code", codec="top-k",
                                                                        ratio=0.3)),
    ("choco_paper_overlap_exponential", lambda: Topology.exponential(7, directed=True), "choco",
     dict(variant="paper", overlap=True, public_init="zero")),
]
BLOCK_TRACKING_RUNS = [  # as TRACKING_RUNS, 7 or 8 agents over 3 ranks
    ("gt_ring", lambda: Topology.ring(7), "gt", dict(momentum=0.9, nesterov=True)),
    ("gt_directed_exponential", lambda: Topology.exponential(7, directed=True), "gt", dict(qgm=True)),
    ("gt_random_matching", lambda: RandomMatching(8), "gt", dict()),
    ("d2_torus", lambda: Topology.torus(2, 4), "d2", dict(weight_decay=1e-3)),
    # a message per tree edge, int64 counts packed with the rows; the two trees cross the ranks differently
    ("relaysgd_binary_tree", lambda: binary_tree(7), "relaysgd", dict(nesterov=False)),
    ("relaysgd_double_binary_trees", lambda: double_binary_trees(8), "relaysgd",
     dict(weight_decay=1e-3)),
    ("relaysgd_grad_double_binary_trees", lambda: double_binary_trees(7), "relaysgd",
     dict(relay="grad")),
    ("d2_star_metropolis", lambda: Topology.star(7, weights="metropolis"), "d2", dict(gamma=0.9)),
    ("gut_torus", lambda: Topology.torus(2, 4), "gut", dict(weight_decay=1e-3)),
    ("momentum_tracking_ring", lambda: Topology.ring(7), "momentum_tracking", dict(gamma=0.6)),
    ("momentum_tracking_random_matching", lambda: RandomMatching(8), "momentum_tracking", dict(init="zero")),
    ("decentlam_star", lambda: Topology.star(7), "decentlam", dict(weight_decay=1e-3)),
]


def _blocks_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from crossgrad.distributed import CommTimeoutError, gather_state, make_engine

    with rank_errors(rank, out_dir):
        _init(rank, world, port, 30)
        results = {}
        for graph, make_topology in BLOCK_GRAPHS.items():
            topo = make_topology()
            batches = batches_for(topo.n, STEPS)
            for k, (name, kw) in enumerate(CASES):
                engine = make_engine(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, gamma=0.5, **kw), timeout=20)
                for t in range(STEPS):
                    engine.step([batches[t][a] for a in engine.plan.local])
                state = gather_state(engine)
                if rank == 0:
                    results[graph, k] = (state["x"], state["bytes_sent"])
                results["wire", graph, k] = (len(engine.comm.peers), engine.comm.wire_bytes.clone())
        _push_sum_runs(rank, BLOCK_PUSH_GRAPHS, results)
        _tracking_runs(rank, BLOCK_TRACKING_RUNS + BLOCK_PUBLISHED_RUNS, results)
        for label, make_topology in RATE_GRAPHS.items():
            topo = make_topology()
            engine = make_engine(tiny_model(), topo, cg.make_algorithm("dsgd", lr=0.1, gamma=0.5), timeout=20)
            _rates_and_local_steps(engine, [[b[a] for a in engine.plan.local] for b in batches_for(topo.n, 4)])
            state = gather_state(engine)
            if rank == 0:
                results["rates", label] = (state["x"], state["bytes_sent"])
        topo = Topology.ring(7)
        batches = batches_for(topo.n, STEPS, torch.float32)
        for k, (name, kw) in enumerate(FLOAT32_CASES):
            engine = make_engine(wide_model(), topo, cg.make_algorithm(name, lr=0.1, **kw), timeout=20)
            for t in range(STEPS):
                engine.step([batches[t][a] for a in engine.plan.local])
            state = gather_state(engine)
            if rank == 0:
                results["float32", k] = (state["x"], state["bytes_sent"])
        try:
            make_engine(tiny_model(seed=rank // 2), Topology.ring(7), cg.make_algorithm("dsgd", lr=0.1))
            results["seed_error"] = ""
        except ValueError as e:
            results["seed_error"] = str(e)
        try:  # a hung rank is named by its agents
            engine = make_engine(tiny_model(), Topology.ring(7), cg.make_algorithm("dsgd", lr=0.1), timeout=1)
            if rank == 2:  # silent, but alive until the others have published their failures
                dist.distributed_c10d._get_default_store().wait(["crossgrad/failed/0", "crossgrad/failed/1"])
            else:
                engine.step([batches_for(7, 1)[0][a] for a in engine.plan.local])
            results["hang_error"] = ""
        except CommTimeoutError as e:
            results["hang_error"] = str(e)
        torch.save(results, os.path.join(out_dir, f"result{rank}.pt"))


#: an averaging rate that changes mid-run (ARS) and local steps, over uneven blocks (a time-varying graph too)
RATE_GRAPHS = {"ring": lambda: Topology.ring(7), "one_peer_exponential": lambda: OnePeerExponential(8)}


def _rates_and_local_steps(engine, batches) -> None:
    for t, b in enumerate(batches):
        engine.set_gamma([0.5, 0.8, 0.8, 1.0][t])
        engine.step(b, communicate=t % 2 == 0)


@pytest.fixture(scope="module")
def block_results(tmp_path_factory):
    out = _run_workers(_blocks_worker, BLOCK_WORLD, tmp_path_factory.mktemp("blocks"))
    return [torch.load(out / f"result{r}.pt", weights_only=True) for r in range(BLOCK_WORLD)]


def simulate(model: nn.Module, topo: Topology, algo, batches) -> cg.Simulator:
    sim = cg.Simulator(model, topo, algo)
    for b in batches:
        sim.step(b)
    return sim


@pytest.mark.timeout(200)
@pytest.mark.parametrize("graph", list(BLOCK_GRAPHS))
def test_blocks_of_agents_per_rank_equal_the_simulator(graph, block_results):
    """Every algorithm, uneven blocks over 3 ranks: the simulator's parameters to float64 rounding, bytes exactly."""
    topo = BLOCK_GRAPHS[graph]()
    batches = batches_for(topo.n, STEPS)
    for k, (name, kw) in enumerate(CASES):
        sim = simulate(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, gamma=0.5, **kw), batches)
        params, sent = block_results[0][graph, k]
        torch.testing.assert_close(params, sim.params, rtol=1e-12, atol=1e-12, msg=f"{graph} {name} {kw}")
        assert torch.equal(sent, sim.stats["bytes_sent"]), (graph, name, kw)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("graph", list(RATE_GRAPHS))
def test_rate_changes_and_local_steps_equal_the_simulator(graph, block_results):
    topo = RATE_GRAPHS[graph]()
    sim = cg.Simulator(tiny_model(), topo, cg.make_algorithm("dsgd", lr=0.1, gamma=0.5))
    _rates_and_local_steps(sim, batches_for(topo.n, 4))
    params, sent = block_results[0]["rates", graph]
    torch.testing.assert_close(params, sim.params, rtol=1e-12, atol=1e-12)
    assert torch.equal(sent, sim.stats["bytes_sent"])


@pytest.mark.timeout(200)
def test_blocks_in_float32_equal_the_simulator_bit_for_bit(block_results):
    """7 agents in blocks of 3, 2, 2 with a 512-wide model: float32 is the simulator's exactly (tests/test_layouts.py
    checks every family on 6 agents)."""
    topo = Topology.ring(7)
    batches = batches_for(topo.n, STEPS, torch.float32)
    for k, (name, kw) in enumerate(FLOAT32_CASES):
        sim = simulate(wide_model(), topo, cg.make_algorithm(name, lr=0.1, **kw), batches)
        params, sent = block_results[0]["float32", k]
        assert torch.equal(params, sim.params), (name, float((params - sim.params).abs().max()))
        assert torch.equal(sent, sim.stats["bytes_sent"]), name


@pytest.mark.timeout(200)
def test_one_message_per_peer_rank_and_round(block_results):
    """What goes between ranks grows with the peer ranks, not the agents: a 7-agent ring over 3 ranks
    exchanges with 2 peers, and each sends only the boundary rows (one model row to each neighbour rank)."""
    P = sum(p.numel() for p in tiny_model().parameters())
    ring_ngc = next(k for k, (name, kw) in enumerate(CASES) if name == "ngc" and kw["alpha"] == 1.0)
    for rank in range(BLOCK_WORLD):
        peers, wire = block_results[rank]["wire", "ring", ring_ngc]
        assert peers == 2
        # per step: one row to each of the 2 neighbouring ranks (round 1) and one cross-gradient back each
        assert wire.tolist() == [STEPS * 2 * P * 8, STEPS * 2 * P * 8]


@pytest.mark.timeout(200)
def test_choco_sends_its_compressed_payload_once_per_peer_rank(block_results):
    """Choco's round 1 between ranks is the codec's payload: a 7-agent ring over 3 ranks sends one
    boundary agent's message to each of its 2 neighbouring ranks per step, and no round 2. (Between
    ranks each tensor of a message starts on an 8-byte boundary.)"""
    from crossgrad.codecs import kept_per_tensor

    def aligned(size: int) -> int:
        return -(-size // 8) * 8

    numels = tuple(p.numel() for p in tiny_model().parameters())
    kept = sum(kept_per_tensor(numels, 0.3))
    messages = {"sign": aligned(sum((k + 7) // 8 for k in numels)) + aligned(4 * len(numels)),  # bits, scales
                "top-k": aligned(4 * kept) + aligned(8 * kept)}  # int32 positions, float64 values
    for k, (name, kw) in enumerate(CASES):
        if name != "choco" or kw["codec"] not in messages:
            continue
        for rank in range(BLOCK_WORLD):
            peers, wire = block_results[rank]["wire", "ring", k]
            assert peers == 2
            assert wire.tolist() == [STEPS * 2 * messages[kw["codec"]], 0], (kw, rank)


@pytest.mark.timeout(200)
def test_blocks_misuse_and_hangs_name_ranks_and_agents(block_results):
    assert "rank 2 (agents 5-6) start from other weights than rank 0 (agents 0-2)" in block_results[0]["seed_error"]
    for rank in (0, 1):
        error = block_results[rank]["hang_error"]
        assert "round 1 (models) with peer(s)" in error and "rank 2 (agents 5-6) is silent" in error, error


# -- push-sum on column-stochastic graphs ------------------------------------------------------


def _push_sum_runs(rank: int, graphs: dict, results: dict) -> None:
    """sgp on each graph: the rows x, the models x / w, the weights and the bytes, gathered on rank 0, then the
    models after 3 final gossip-only rounds (training.final_gossip_rounds)."""
    from crossgrad.distributed import gather_rows, gather_state, make_engine
    from crossgrad.run.evaluate import gossiped_models

    for graph, make_topology in graphs.items():
        topo = make_topology()
        batches = batches_for(topo.n, STEPS)
        for k, (name, kw) in enumerate(PUSH_CASES):
            engine = make_engine(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, gamma=0.5, **kw), timeout=20)
            for t in range(STEPS):
                engine.step([batches[t][a] for a in engine.plan.local])
            gossiped = gather_rows(gossiped_models(engine, 3))
            state = gather_state(engine)
            w = gather_rows(engine.algo_state.w)
            if rank == 0:
                results["push", graph, k] = (state["x"], state["models"], w, state["bytes_sent"], gossiped)


def _check_push_sum(topo: Topology, result: tuple, case: tuple) -> None:
    name, kw = case
    sim = simulate(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, gamma=0.5, **kw),
                   batches_for(topo.n, STEPS))
    from crossgrad.run.evaluate import gossiped_models

    x, models, w, sent, gossiped = result
    assert (w - 1).abs().max() > 0.05  # the weights moved: the de-biasing is exercised
    torch.testing.assert_close(gossiped, gossiped_models(sim.engine, 3), rtol=1e-12, atol=1e-12, msg=f"{name} {kw}")
    torch.testing.assert_close(w, sim.engine.algo_state.w, rtol=1e-12, atol=1e-12, msg=f"{name} {kw}")
    torch.testing.assert_close(x, sim.engine.x, rtol=1e-12, atol=1e-12, msg=f"{name} {kw}")
    torch.testing.assert_close(models, sim.params, rtol=1e-12, atol=1e-12, msg=f"{name} {kw}")
    assert torch.equal(sent, sim.stats["bytes_sent"]), (name, kw)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("graph", list(PUSH_GRAPHS))
def test_push_sum_distributed_equals_simulator(graph, dist_results):
    for k, case in enumerate(PUSH_CASES):
        _check_push_sum(PUSH_GRAPHS[graph](), dist_results["push", graph, k], case)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("graph", list(BLOCK_PUSH_GRAPHS))
def test_push_sum_in_blocks_of_agents_equals_simulator(graph, block_results):
    for k, case in enumerate(PUSH_CASES):
        _check_push_sum(BLOCK_PUSH_GRAPHS[graph](), block_results[0]["push", graph, k], case)


# -- gradient tracking and D² ------------------------------------------------------------------


def _tracking_runs(rank: int, runs: list, results: dict) -> None:
    """Each of `runs` for STEPS steps; rank 0 keeps the gathered rows and bytes under ("tracking", label)."""
    from crossgrad.distributed import gather_state, make_engine

    for label, make_topology, name, kw in runs:
        topo = make_topology()
        batches = batches_for(topo.n, STEPS)
        engine = make_engine(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, **kw), timeout=20)
        for t in range(STEPS):
            engine.step([batches[t][a] for a in engine.plan.local])
        state = gather_state(engine)
        if rank == 0:
            results["tracking", label] = (state["x"], state["bytes_sent"])


def _check_tracking_runs(runs: list, results: dict) -> None:
    for label, make_topology, name, kw in runs:
        topo = make_topology()
        sim = simulate(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, **kw), batches_for(topo.n, STEPS))
        params, sent = results["tracking", label]
        torch.testing.assert_close(params, sim.params, rtol=1e-12, atol=1e-12, msg=label)
        assert torch.equal(sent, sim.stats["bytes_sent"]), label


@pytest.mark.timeout(200)
def test_gt_and_d2_distributed_equal_the_simulator(dist_results):
    """gt's extra round-1 message (y), d2's correction, GUT's recovered steps, Momentum Tracking's c and its first
    step's all-reduce, DecentLaM's z, relaysgd's per-edge relay: one agent per rank, static and time-varying
    graphs."""
    _check_tracking_runs(TRACKING_RUNS, dist_results)


@pytest.mark.timeout(200)
def test_gt_and_d2_in_blocks_of_agents_equal_the_simulator(block_results):
    _check_tracking_runs(BLOCK_TRACKING_RUNS, block_results[0])


@pytest.mark.timeout(200)
def test_published_forms_distributed_equal_the_simulator(dist_results, block_results):
    """DIGing, tracked weight decay, Choco's paper and authors' orders and overlap: one agent per rank and blocks."""
    _check_tracking_runs(PUBLISHED_RUNS, dist_results)
    _check_tracking_runs(BLOCK_PUBLISHED_RUNS, block_results[0])


# -- a dead or hung peer -----------------------------------------------------------------------


def _timeout_worker(rank: int, world: int, port: int, out_dir: str, timeout: float, mode: str,
                    graph: str = "ring", culprit: int = 2) -> None:
    from crossgrad.distributed import CommTimeoutError, make_engine

    _init(rank, world, port, 30)
    batches = batches_for(world, 5)
    topo = Topology.chain(world) if graph == "chain" else Topology.ring(world)
    engine = make_engine(tiny_model(), topo, cg.make_algorithm("ngc", lr=0.1), timeout=timeout)
    start = None
    try:
        for t in range(5):
            if rank == culprit and t == 2:
                if mode == "die":
                    os._exit(0)  # dies without a word, mid-run
                time.sleep(60)  # hangs: alive, connected, silent (the test kills it)
            start = time.monotonic()
            engine.step([batches[t][rank]])
    except CommTimeoutError as e:
        with open(os.path.join(out_dir, f"timeout{rank}.txt"), "w") as f:
            f.write(f"{time.monotonic() - start:.3f}\n{e.peers}\n{e}")
        try:
            engine.step([batches[0][rank]])
        except CommTimeoutError as again:  # a broken comm refuses to go on, at once
            assert "an earlier round failed" in str(again)
        raise SystemExit(3) from None  # a normal exit: the process group must not keep it alive
    raise SystemExit(0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_dead_or_hung_peer_is_named_within_the_timeout(tmp_path, mode):
    timeout = 3.0
    procs = _spawn(_timeout_worker, 3, (free_port(), str(tmp_path), timeout, mode), join_timeout=30,
                   wait_for=[0, 1])
    reports = {int(p.stem[-1]): p.read_text().splitlines() for p in tmp_path.glob("timeout*.txt")}
    assert set(reports) == {0, 1}, (reports, [p.exitcode for p in procs])
    for rank, (elapsed, peers, message, *_) in reports.items():
        assert float(elapsed) < timeout + 2.0
        # the other survivor may exit on its own failure before this one's message to it has gone
        # through; then it is listed too, and named as a failure further away, never as the cause
        assert peers in ("[2]", f"[{1 - rank}, 2]"), peers
        if peers == "[2]":
            assert "peer(s) 2 failed" in message
        else:
            assert f"agent {1 - rank} stopped after its own failure" in message, message
        assert "round 1 (models)" in message
        if mode == "hang":
            assert f"no answer within {timeout:g} s" in message
    assert procs[0].exitcode == 3 and procs[1].exitcode == 3


@pytest.mark.timeout(60)
def test_a_hung_peer_further_away_is_not_blamed_on_a_live_neighbour(tmp_path):
    """Chain 0-1-2-3 with agent 3 hung: agent 2 names it silent; agents 1 and 0, whose neighbours are
    alive but stop after their own failure, say the cause is further away and quote the first failure."""
    timeout = 2.0
    procs = _spawn(_timeout_worker, WORLD, (free_port(), str(tmp_path), timeout, "hang", "chain", 3),
                   join_timeout=40, wait_for=[0, 1, 2])
    reports = {int(p.stem[-1]): "\n".join(p.read_text().splitlines()[2:]) for p in tmp_path.glob("timeout*.txt")}
    assert set(reports) == {0, 1, 2}, (reports, [p.exitcode for p in procs])
    assert "agent 3 is silent: no answer within 2 s" in reports[2], reports
    for rank in (0, 1):
        assert f"agent {rank + 1} stopped after its own failure, so the cause is further away" in reports[rank]
        assert "first failure: agent 2: round 1 (models) with peer(s) 3 failed" in reports[rank], reports
        assert f"agent {rank + 1} is silent" not in reports[rank]
