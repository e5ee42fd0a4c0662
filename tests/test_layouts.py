"""Float32 runs are bit-identical however the agents are placed on processes (issue 29 item 4).

Six agents in float32, every algorithm family, on the simulator (one process) and on torch.distributed with 2
processes (blocks of 3 + 3 and of 4 + 2) and with 3 processes (2 + 2 + 2): the parameters after every step
and the runner's metrics records (run/evaluate.py: accuracies, losses, consensus distance, bias) must be
equal with torch.equal, not close. One launch per number of processes runs every case on each of its
placements (start-up dominates).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import crossgrad as cg
from crossgrad.topology import Topology
from crossgrad.topology.trees import binary_tree
from test_dist import _init, _spawn, free_port, rank_errors

N = 6
STEPS = 8
EVAL_EVERY = 4
#: the placements of the 6 agents on processes: blocks of agents per rank
LAYOUTS = {"3+3": (3, 3), "4+2": (4, 2), "2+2+2": (2, 2, 2)}
#: (label, topology, algorithm, options): a ring unless the method needs another graph
CASES = [
    ("dsgd", "ring", "dsgd", dict(momentum=0.9, nesterov=True)),
    ("qgm", "ring", "dsgd", dict(momentum=0.9, qgm=True, weight_decay=1e-3)),
    ("ngc_a0", "ring", "ngc", dict(alpha=0.0, momentum=0.9)),
    ("ngc_a1", "ring", "ngc", dict(alpha=1.0, momentum=0.9, nesterov=True)),
    ("ngc_a0.5_star", "star", "ngc", dict(alpha=0.5)),  # irregular: the hub holds 5 in-edges, a leaf 1
    ("compngc", "ring", "compngc", dict(alpha=1.0, momentum=0.9)),
    ("cga", "ring", "cga", dict(momentum=0.9)),
    ("compcga", "ring", "compcga", dict()),
    ("gt", "ring", "gt", dict(momentum=0.9, nesterov=True)),
    ("d2", "ring", "d2", dict(weight_decay=1e-3)),
    ("choco", "ring", "choco", dict(codec="sign", momentum=0.9)),
    ("sgp", "ring", "sgp", dict(momentum=0.9, nesterov=True)),
    ("gut", "ring", "gut", dict(mu=0.5, momentum=0.9, gamma=0.7)),
    ("momentum_tracking", "ring", "momentum_tracking", dict(weight_decay=1e-3)),
    ("decentlam", "ring", "decentlam", dict(gamma=0.8)),
    ("relaysgd_tree", "tree", "relaysgd", dict()),
    # irregular graphs: a block's own agents may all have the same degree while the graph's do not
    ("ngc_a0.5_chain", "chain", "ngc", dict(alpha=0.5, momentum=0.9)),
    ("cga_star", "star", "cga", dict()),
    ("choco_star", "star", "choco", dict(codec="top-k", ratio=0.3)),
    # the sparse products of graphs beyond mixing.DENSE_MAX_AGENTS
    ("dsgd_sparse", "ring", "dsgd", dict(momentum=0.9)),
    ("choco_sparse", "chain", "choco", dict(codec="sign")),
    # a lossy network: the steps that lose messages gossip and combine with re-weighted matrices
    ("ngc_a0.5_drops", "ring", "ngc", dict(alpha=0.5)),
    ("dsgd_churn", "ring", "dsgd", dict(momentum=0.9)),
]
#: the network of the cases that have one (comm/network.py), by label
NETWORKS = {"ngc_a0.5_drops": dict(drop_prob=0.2), "dsgd_churn": dict(churn={"rate": 0.2, "mean_absence": 2})}
GRAPHS = {"ring": lambda: Topology.ring(N), "star": lambda: Topology.star(N), "tree": lambda: binary_tree(N),
          "chain": lambda: Topology.chain(N)}


def network(label: str, topology):
    from crossgrad.comm.network import NetworkConfig, NetworkModel

    cfg = NETWORKS.get(label)
    return None if cfg is None else NetworkModel(NetworkConfig(**cfg), topology, seed=0)


@contextlib.contextmanager
def products(label: str):
    """The sparse mixing products for the cases labelled so, the dense ones otherwise."""
    import crossgrad.mixing as mixing

    dense = mixing.DENSE_MAX_AGENTS
    mixing.DENSE_MAX_AGENTS = 2 if label.endswith("_sparse") else dense
    try:
        yield
    finally:
        mixing.DENSE_MAX_AGENTS = dense


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3))  # 131 parameters: vector tails too


def batches() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(7)
    return [[(torch.randn(6, 3, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(N)]
            for _ in range(STEPS)]


def inputs() -> SimpleNamespace:
    """What run/evaluate.py reads of a run's inputs: the model and the test set."""
    g = torch.Generator().manual_seed(9)
    return SimpleNamespace(model=model(), x_test=torch.randn(40, 3, generator=g),
                           y_test=torch.randint(0, 3, (40,), generator=g))


class OneProcess:
    """The simulator's cluster (run/cluster.py's LocalCluster): every collective is the identity."""

    def gather(self, t):
        return t


class Ranks:
    """DistCluster's gather over a process group whose blocks the test chooses."""

    def gather(self, t):
        from crossgrad.distributed import gather_rows

        return gather_rows(t)


def trajectory(engine, p, cluster) -> dict:
    """Every step's parameters (all agents, on the main process) and a metrics record every EVAL_EVERY steps,
    computed by the runner's own evaluation."""
    from crossgrad.run.evaluate import TIMING_KEYS, TrainTotals, evaluate

    out: dict = {"x": [], "records": []}
    totals = TrainTotals(engine.plan.n_local, engine.x.device)
    data = batches()
    local = engine.plan.local
    for step, b in enumerate(data):
        losses = engine.step([b[a] for a in local])
        totals.add(losses, engine)
        x = cluster.gather(engine.models())
        if x is not None:
            out["x"].append(x.clone())
        if (step + 1) % EVAL_EVERY == 0:
            result = evaluate(engine, p, cluster, totals, batch_size=16)
            totals.reset()
            if result is not None:
                ev, stats = result
                out["records"].append({**{k: v for k, v in ev.items() if k not in TIMING_KEYS},
                                       "bytes": stats.bytes_sent.clone(), "qp_failures": stats.qp_failures})
    return out


def simulate(label: str, topology: str, name: str, kw: dict) -> dict:
    with products(label):
        topo = GRAPHS[topology]()
        sim = cg.Simulator(model(), topo, cg.make_algorithm(name, lr=0.1, **kw), network=network(label, topo))
        return trajectory(sim.engine, inputs(), OneProcess())


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Every case on every layout of `world` processes (one process group: the blocks are the engine's)."""
    import torch.distributed as dist

    from crossgrad.distributed import make_engine

    with rank_errors(rank, out_dir):
        _init(rank, world, port, 60)
        results = {}
        for layout, sizes in LAYOUTS.items():
            if len(sizes) != world:
                continue
            for label, topology, name, kw in CASES:
                with products(label):
                    topo = GRAPHS[topology]()
                    engine = make_engine(model(), topo, cg.make_algorithm(name, lr=0.1, **kw), timeout=30,
                                         sizes=sizes, network=network(label, topo))
                    results[layout, label] = trajectory(engine, inputs(), Ranks())
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def placed(tmp_path_factory) -> dict:
    """Every layout's results, by (layout, case): one launch per number of processes."""
    results = {}
    for world in sorted({len(sizes) for sizes in LAYOUTS.values()}):
        out = tmp_path_factory.mktemp(f"world{world}")
        procs = _spawn(_worker, world, (free_port(), str(out)), join_timeout=240)
        errors = [p.read_text() for p in Path(out).glob("error*.txt")]
        assert not errors, errors[0]
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        results.update(torch.load(out / "result.pt", weights_only=False))
    return results


@pytest.fixture(scope="module")
def simulated() -> dict:
    return {label: simulate(label, topology, name, kw) for label, topology, name, kw in CASES}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [c[0] for c in CASES])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_float32_trajectories_are_identical_on_every_layout(layout, case, placed, simulated):
    sim, dist = simulated[case], placed[layout, case]
    assert sim["x"][0].dtype == torch.float32 and len(sim["x"]) == STEPS
    assert not torch.equal(sim["x"][0], sim["x"][-1])  # it trained
    for step, (a, b) in enumerate(zip(sim["x"], dist["x"], strict=True)):
        assert torch.equal(a, b), (case, layout, step, float((a - b).abs().max()))
    assert len(sim["records"]) == STEPS // EVAL_EVERY
    for a, b in zip(sim["records"], dist["records"], strict=True):
        differ = sorted(k for k in a if not _same(a[k], b.get(k)))
        assert not differ, (case, layout, differ, {k: (a[k], b.get(k)) for k in differ})


def test_checkpoints_from_before_per_agent_bias_sums_and_graph_wide_cga_slots_still_load():
    """A checkpoint written before this change holds one bias total per process and CGA multipliers padded to
    the block's largest out-degree: they load (the total on the first agent, the slots padded with the
    margin) and re-cut (the totals summed onto the first new process)."""
    from crossgrad.run.evaluate import TrainTotals
    from crossgrad.run.reblock import reblock

    totals = TrainTotals(3, torch.device("cpu"))
    old = {"loss": torch.zeros(3, dtype=torch.float64), "steps": 2, "bias_mv": torch.tensor(1.5, dtype=torch.float64),
           "bias_mv_n": 10, "bias_dv": torch.tensor(0.25, dtype=torch.float64), "bias_dv_n": 4}
    totals.load_state_dict(old)
    assert totals.bias[0].tolist() == [1.5, 0.0, 0.0] and totals.bias[2].tolist() == [0.25, 0.0, 0.0]
    parts = [{"acc": {**old, "loss": torch.zeros(3, dtype=torch.float64)}},
             {"acc": {**old, "loss": torch.zeros(3, dtype=torch.float64), "bias_mv": torch.tensor(2.0)}}]
    merged = reblock(parts, 6, Topology.ring(6).edges, 1)[0]["acc"]
    assert float(merged["bias_mv"]) == 3.5 and merged["bias_mv_n"] == 20
    sim = cg.Simulator(model(), Topology.star(N), cg.make_algorithm("cga", lr=0.1, margin=0.3))
    state = sim.engine.algo_state
    assert state.kmax == N - 1  # the hub's out-degree
    narrow = {"v": torch.full((state.v.shape[0], N, 2), 0.7, dtype=torch.float64), "qp_failures": 1}
    state.load_state_dict(narrow)
    assert torch.equal(state.v[:, :, :2], narrow["v"]) and bool((state.v[:, :, 2:] == 0.3).all())


def test_the_training_loss_total_is_the_same_on_any_split_of_the_agents():
    """steps.csv's loss is the sum of every agent's; per-process partial sums round differently on each
    layout (here 1e16 + 1 rounds away the 1), the exact total does not."""
    from crossgrad.run.trainer import agents_total

    agents = [1e16, 1.0, -1e16, 1.0]
    splits = [[agents], [agents[:2], agents[2:]], [agents[:1], agents[1:3], agents[3:]]]
    assert [agents_total(blocks) for blocks in splits] == [2.0, 2.0, 2.0]
    assert sum(sum(block) for block in splits[1]) != 2.0  # what adding per-process sums gives
