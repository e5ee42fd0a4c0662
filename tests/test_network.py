"""The unreliable network (crossgrad.comm.network): counter-based drops, what each algorithm does with a
missing message (against a float64 per-agent recomputation), push-sum's mass, link failures, simulated
time by hand, bit-identity with a network that loses nothing, resume, the config's refusals and
torch.distributed losing the same messages as the simulator."""
from __future__ import annotations

import copy
import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import crossgrad as cg
from crossgrad.cli import main
from crossgrad.comm.network import NETWORK_KEYS, NetworkConfig, NetworkModel, uniforms
from crossgrad.errors import ConfigError
from crossgrad.run import resume_experiment, run_experiment
from crossgrad.run.config import load_config
from crossgrad.run.evaluate import TIMING_KEYS
from crossgrad.run.rundir import METRICS
from device_guard import no_implicit_device
from test_dist import _init, _spawn, free_port, rank_errors

N = 5


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def batches_for(n: int, steps: int) -> list[list[tuple]]:
    g = torch.Generator().manual_seed(3)
    return [[(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
             for _ in range(n)] for _ in range(steps)]


def simulator(topo, name: str, network: NetworkConfig | None = None, seed: int = 0, **kw) -> cg.Simulator:
    net = None if network is None else NetworkModel(copy.deepcopy(network), topo, seed)
    return cg.Simulator(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, **kw), network=net)


def run(sim: cg.Simulator, batches) -> cg.Simulator:
    for b in batches:
        sim.step(b)
    return sim


# ---------------------------------------------------------------------------------------------- the draws
def test_the_draw_is_a_pure_function_of_seed_step_round_sender_and_receiver():
    src, dst = np.array([0, 1, 2, 3]), np.array([1, 2, 3, 0])
    u = uniforms(7, 12, 1, src, dst)
    assert np.array_equal(u, uniforms(7, 12, 1, src, dst))
    assert ((u >= 0) & (u < 1)).all()
    # any one counter changed gives other draws; so does swapping sender and receiver
    for other in (uniforms(8, 12, 1, src, dst), uniforms(7, 13, 1, src, dst), uniforms(7, 12, 2, src, dst),
                  uniforms(7, 12, 1, dst, src)):
        assert not np.isin(u, other).any()
    assert uniforms(7, 12, 1, src[2:], dst[2:]).tolist() == u[2:].tolist()  # an edge's draw ignores the others


@pytest.mark.parametrize("name,p", [("dsgd", 0.1), ("ngc", 0.3)])
def test_drop_counts_are_binomial(name, p):
    topo, steps = cg.Topology.exponential(8), 40
    sim = run(simulator(topo, name, NetworkConfig(drop_prob=p)), batches_for(8, steps))
    m = sim.engine.network.metrics()
    e = len(topo.edges) * steps
    # round 1: e messages; round 2 (ngc): one per model that arrived, each lost with p again
    round1_lost = sum(int((uniforms(0, t, 1, *map(np.array, zip(*topo.edges))) < p).sum()) for t in range(steps))
    sent = e + (e - round1_lost if name == "ngc" else 0)
    assert m["messages_sent"] == sent
    sd = math.sqrt(sent * p * (1 - p))
    assert abs(m["messages_dropped"] - sent * p) < 4 * sd, (m, sent * p, sd)


# -------------------------------------------------------------------------------------- bit-identity
@pytest.mark.parametrize("name,kw", [("dsgd", {}), ("ngc", dict(alpha=0.5)), ("compngc", {}), ("cga", {}),
                                     ("sgp", {}), ("gt", {}), ("d2", {}), ("choco", {}), ("gut", {}),
                                     ("momentum_tracking", {}), ("decentlam", {})])
def test_a_network_that_loses_nothing_is_bit_identical(name, kw):
    topo, batches = cg.Topology.ring(N), batches_for(N, 3)
    plain = run(simulator(topo, name, **kw), batches)
    costly = NetworkConfig(drop_prob=0.0, compute_ms=4.0, latency_ms=3.0, bandwidth_mbps=10.0,
                           stragglers=[1, 2, 1, 1, 3])
    for cfg in (NetworkConfig(), costly):
        sim = run(simulator(topo, name, cfg, **kw), batches)
        assert torch.equal(sim.params, plain.params), (name, cfg)
        assert torch.equal(sim.stats["bytes_sent"], plain.stats["bytes_sent"])
        assert sim.engine.network.metrics()["messages_dropped"] == 0


def test_relaysgd_on_a_lossless_network_times_its_per_edge_messages():
    """relaysgd sends its own message on every tree edge after the local step (no round 1): bit-identical
    training, one message per edge and step, and the round's link time in the simulated time."""
    topo, batches = cg.Topology.chain(N), batches_for(N, 3)
    plain = run(simulator(topo, "relaysgd"), batches)
    sim = run(simulator(topo, "relaysgd", NetworkConfig(compute_ms=1.0, latency_ms=4.0)), batches)
    assert torch.equal(sim.params, plain.params)
    assert sim.engine.network.messages_sent == 3 * len(topo.edges)
    assert sim.engine.network.sim_time_s == pytest.approx(3 * (1.0 + 4.0) / 1000, rel=1e-12)


# ------------------------------------------------------------------- per-agent recomputation in float64
def grad_at(row: torch.Tensor, batch: tuple) -> torch.Tensor:
    """The gradient of agent data `batch`'s loss at flat parameters `row`, with a fresh model (no engine code)."""
    model = tiny_model()
    params = list(model.parameters())
    at = 0
    with torch.no_grad():
        for p in params:
            p.copy_(row[at: at + p.numel()].view_as(p))
            at += p.numel()
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def arrived(seed: int, step: int, rnd: int, src: int, dst: int, p: float) -> bool:
    return bool(uniforms(seed, step, rnd, np.array([src]), np.array([dst]))[0] >= p)


@pytest.mark.parametrize("name,alpha,graph", [("dsgd", None, "ring"), ("ngc", 1.0, "ring"), ("ngc", 0.5, "ring"),
                                              ("ngc", 0.0, "ring"), ("ngc", 1.0, "star"), ("dsgd", None, "star")])
def test_lossy_steps_equal_a_per_agent_recomputation(name, alpha, graph):
    """Each receiver's gossip row and combine weights over what arrived, recomputed agent by agent."""
    p, gamma, lr, steps = 0.4, 0.7, 0.1, 3
    topo = cg.Topology.ring(N) if graph == "ring" else cg.Topology.star(N, weights="metropolis")
    kw = dict(momentum=0.0, nesterov=False, gamma=gamma) | ({} if alpha is None else dict(alpha=alpha))
    batches = batches_for(N, steps)
    sim = run(simulator(topo, name, NetworkConfig(drop_prob=p), seed=5, **kw), batches)
    assert sim.engine.network.messages_dropped > 0
    W = topo.W.double()
    x = [row.clone() for row in tiny_model_rows()]
    nbrs = [[j for j in range(N) if j != i and W[i, j] > 0] for i in range(N)]
    for t in range(steps):
        a1 = {(j, i): arrived(5, t, 1, j, i, p) for i in range(N) for j in nbrs[i]}  # j's model reached i
        half = []
        for i in range(N):
            keep = W[i, i] + sum(W[i, j] for j in nbrs[i] if a1[j, i])
            row = W[i, i] / keep * x[i] + sum(W[i, j] / keep * x[j] for j in nbrs[i] if a1[j, i])
            half.append((1 - gamma) * x[i] + gamma * row)
        new = []
        for i in range(N):
            g, total = W[i, i] * grad_at(half[i], batches[t][i]), W[i, i].clone()
            if name == "ngc":
                for j in nbrs[i]:
                    # cross-gradients are taken at the models received in round 1 (before their gossip)
                    if alpha < 1 and a1[j, i]:  # j's model on i's data
                        g = g + (1 - alpha) * W[i, j] * grad_at(x[j], batches[t][i])
                        total += (1 - alpha) * W[i, j]
                    if alpha > 0 and a1[i, j] and arrived(5, t, 2, j, i, p):  # i's model on j's data, sent back
                        g = g + alpha * W[i, j] * grad_at(x[i], batches[t][j])
                        total += alpha * W[i, j]
                g = g / total
            else:
                g = grad_at(half[i], batches[t][i])
            new.append(half[i] - lr * g)
        x = new
    torch.testing.assert_close(sim.params, torch.stack(x), rtol=0, atol=1e-12)


def tiny_model_rows() -> list[torch.Tensor]:
    row = torch.cat([p.detach().reshape(-1) for p in tiny_model().parameters()])
    return [row] * N


def test_decentlam_mixes_its_local_steps_over_what_arrived():
    """DecentLaM sends z = x - lr g instead of its model: the row over the z that arrived, momentum on top."""
    p, gamma, lr, beta, steps = 0.4, 0.7, 0.1, 0.9, 3
    topo, batches = cg.Topology.ring(N), batches_for(N, steps)
    sim = run(simulator(topo, "decentlam", NetworkConfig(drop_prob=p), seed=2, gamma=gamma, momentum=beta), batches)
    W = topo.W.double()
    x, m = tiny_model_rows(), [torch.zeros_like(tiny_model_rows()[0])] * N
    for t in range(steps):
        z = [x[i] - lr * grad_at(x[i], batches[t][i]) for i in range(N)]
        new_x, new_m = [], []
        for i in range(N):
            got = [j for j in range(N) if j != i and W[i, j] > 0 and arrived(2, t, 1, j, i, p)]
            keep = W[i, i] + sum(W[i, j] for j in got)
            mixed = (1 - gamma) * z[i] + gamma * (W[i, i] / keep * z[i] + sum(W[i, j] / keep * z[j] for j in got))
            new_m.append(beta * m[i] + (x[i] - mixed) / lr)
            new_x.append(x[i] - lr * new_m[i])
        x, m = new_x, new_m
    assert sim.engine.network.messages_dropped > 0
    torch.testing.assert_close(sim.params, torch.stack(x), rtol=0, atol=1e-12)


def test_cga_gives_a_missing_cross_gradient_no_row_in_its_qp():
    """CGA's weights over what arrived: the lost rows are inactive and the rest is CGA on fewer neighbours."""
    topo, p = cg.Topology.ring(N), 0.4
    batches = batches_for(N, 2)
    sim = run(simulator(topo, "cga", NetworkConfig(drop_prob=p), momentum=0.0, nesterov=False), batches[:1])
    net, engine = sim.engine.network, sim.engine
    wiring, info = net.begin(1, engine.wiring, engine.algorithm)
    d = info["delivery"]
    plan = wiring.ctx.plan
    for e in range(len(plan.out_src)):
        i = int(plan.out_src[e])
        kept = float(engine.wiring.ctx.self_w[i]) + float((engine.wiring.ctx.out_w * d.out2)[plan.out_src == i].sum())
        want = float(engine.wiring.ctx.out_w[e]) / kept if d.out2[e] else 0.0
        assert float(wiring.ctx.out_w[e]) == pytest.approx(want, rel=1e-15, abs=0)
    assert (wiring.ctx.out_w == 0).sum() == (~d.out2).sum() > 0


def test_push_sum_keeps_the_mass_under_drops():
    """A lost message's share stays with its sender: the weights sum to n and the numerators move only by the steps."""
    topo = cg.Topology.from_edges(N, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0), (0, 2), (3, 1)], directed=True,
                                  weights="out_uniform")
    sim = simulator(topo, "sgp", NetworkConfig(drop_prob=0.35), momentum=0.0, nesterov=False)
    e = sim.engine
    for b in batches_for(N, 12):
        before = e.x.sum(0).clone()
        sim.step(b)
        torch.testing.assert_close(e.x.sum(0) + 0.1 * e.last["g_self"].sum(0), before, rtol=0, atol=1e-13)
        assert abs(float(e.algo_state.w.sum()) - N) < 1e-12
    assert e.network.messages_dropped > 0
    assert float(e.algo_state.w.min()) < 1 - 1e-3 < 1 + 1e-3 < float(e.algo_state.w.max())  # the weights moved


@pytest.mark.parametrize("name", ["gt", "d2", "choco", "gut", "momentum_tracking", "relaysgd"])
def test_methods_with_no_sound_behaviour_under_loss_are_refused(name):
    topo = cg.Topology.chain(N) if name == "relaysgd" else cg.Topology.ring(N)  # relaysgd relays over a tree
    with pytest.raises(ConfigError, match=f"{name} cannot run on a lossy network"):
        simulator(topo, name, NetworkConfig(drop_prob=0.1))
    with pytest.raises(ConfigError, match="lossy network"):
        load_config(None, [f"algorithm.name={name}", f"topology.name={topo.name}", "network.link_failures.rate=0.1",
                           "network.link_failures.mean_down=3"])
    simulator(topo, name, NetworkConfig(compute_ms=1.0))  # a slow network that loses nothing is fine


@pytest.mark.parametrize("name", ["ngc", "sgp", "decentlam"])
def test_a_lossy_step_names_the_device_of_every_tensor_it_makes(name):
    """Under the device guard (tests/device_guard.py): what would land on the CPU beside a GPU run fails here."""
    topo = cg.Topology.ring(N)
    cfg = NetworkConfig(drop_prob=0.4, compute_ms=1.0, link_failures={"rate": 0.3, "mean_down": 2},
                        churn={"rate": 0.3, "mean_absence": 2, "rejoin": "neighbor" if name == "ngc" else "own"})
    model, batches, algo = tiny_model(), batches_for(N, 3), cg.make_algorithm(name, lr=0.1)
    with no_implicit_device():
        sim = run(cg.Simulator(model, topo, algo, network=NetworkModel(cfg, topo)), batches[:2])
        state = sim.state_dict()
        sim.load_state_dict(state)
        sim.step(batches[2])
    assert sim.engine.network.messages_dropped > 0


# ------------------------------------------------------------------------------------------ link failures
def test_a_scheduled_link_failure_loses_every_message_on_the_link_both_ways():
    topo = cg.Topology.ring(N)
    sim = run(simulator(topo, "ngc", NetworkConfig(link_failures={"schedule": [[1, 0, 2, 4]]})), batches_for(N, 5))
    m = sim.engine.network.metrics()
    # steps 2 and 3: 0 -> 1 and 1 -> 0 lost in round 1, so neither sends a round-2 reply
    assert m["messages_dropped"] == 2 * 2
    assert m["messages_sent"] == 5 * 2 * len(topo.edges) - 2 * 2


def test_markov_link_failures_resume_bit_exactly():
    topo, batches = cg.Topology.ring(N), batches_for(N, 8)
    cfg = NetworkConfig(drop_prob=0.1, link_failures={"rate": 0.3, "mean_down": 3})
    full = run(simulator(topo, "ngc", cfg), batches)
    part = run(simulator(topo, "ngc", cfg), batches[:3])
    state = copy.deepcopy(part.state_dict())
    resumed = simulator(topo, "ngc", cfg)
    resumed.load_state_dict(state)
    run(resumed, batches[3:])
    assert torch.equal(resumed.params, full.params)
    assert resumed.engine.network.metrics() == full.engine.network.metrics()
    assert torch.equal(torch.from_numpy(resumed.engine.network.down), torch.from_numpy(full.engine.network.down))


# ------------------------------------------------------------------------------------------ simulated time
def test_simulated_time_is_round1_then_the_slowest_compute_then_round2(tmp_path):
    topo = cg.Topology.ring(4)
    (tmp_path / "lat.txt").write_text("# i j ms\n0 1 5\n1 2 1\n2 3 1\n3 0 2.5\n")
    factors = [1.0, 3.0, 1.0, 1.5]
    cfg = NetworkConfig(compute_ms=2.0, latency_ms=str(tmp_path / "lat.txt"), bandwidth_mbps=8.0,
                        stragglers=factors, drop_prob=0.3)
    steps, p = 4, 0.3
    sim = run(simulator(topo, "ngc", cfg), batches_for(4, steps))
    size = sum(q.numel() for q in tiny_model().parameters()) * 8  # one float64 row per message
    transfer = size * 8 / 8e6 * 1e3  # ms at 8 Mbit/s
    expected = 0.0
    for t in range(steps):
        a1 = {(s, d): arrived(0, t, 1, s, d, p) for s, d in topo.edges}
        evals = [1 + sum(a1[s, d] for s, d in topo.edges if d == i) for i in range(4)]
        latency = {(0, 1): 5, (1, 2): 1, (2, 3): 1, (3, 0): 2.5}
        link = {(s, d): latency.get((s, d), latency.get((d, s))) + transfer for s, d in topo.edges}
        round1 = max(link.values())  # every message takes its link's time, lost or not
        round2 = max([link[e] for e in topo.edges if a1[e]], default=0.0)  # a reply per model that arrived
        expected += round1 + max(k * 2.0 * f for k, f in zip(evals, factors)) + round2
    assert sim.engine.network.sim_time_s == pytest.approx(expected / 1000, rel=1e-12)


def test_a_step_that_sends_nothing_loses_nothing_and_waits_for_no_link():
    """A local step (training.local_steps) and push-sum's first step send no message: only compute counts."""
    topo, b = cg.Topology.ring(N), batches_for(N, 2)
    cfg = NetworkConfig(drop_prob=0.5, compute_ms=2.0, latency_ms=7.0)
    sim = simulator(topo, "dsgd", cfg)
    sim.engine.step(b[0], communicate=False)
    assert sim.engine.network.metrics() | {"sim_time_s": 0} == {"sim_time_s": 0, "messages_sent": 0,
                                                                 "messages_dropped": 0, "links_down": 0,
                                                                 "agents_present": N}
    assert sim.engine.network.sim_time_s == pytest.approx(2.0 / 1000, rel=1e-15)
    sim.step(b[1])
    assert sim.engine.network.messages_sent == len(topo.edges)
    push = run(simulator(topo, "sgp", cfg), b[:1])
    assert push.engine.network.messages_sent == 0 and push.engine.network.sim_time_s == pytest.approx(2e-3, rel=1e-15)


# -------------------------------------------------------------------------------- the runner and the CLI
def test_runs_record_the_network_and_resume_bit_exactly(tmp_path):
    common = ["training.threads=1", f'output.out_dir="{tmp_path}"', "model.name=mlp", "training.steps=8",
              "training.eval_every_steps=4", "training.eval_subset=50", "training.eval_at_start=false",
              "network.drop_prob=0.2", "network.compute_ms=2", "network.latency_ms=1",
              "network.link_failures.rate=0.2", "network.link_failures.mean_down=2"]
    full = run_experiment(load_config(None, [*common, "output.name=full"]), quiet=True)
    part = run_experiment(load_config(None, [*common, "output.name=part"]), quiet=True, stop_after=5)
    done = resume_experiment(part.run_dir, quiet=True)

    def records(run_dir):
        lines = (run_dir / METRICS).read_text().splitlines()
        return [{k: v for k, v in json.loads(r).items() if k not in TIMING_KEYS} for r in lines]

    assert records(full.run_dir) == records(done.run_dir)
    last = records(full.run_dir)[-1]
    assert last["messages_dropped"] > 0 and last["sim_time_s"] > 0 and set(NETWORK_KEYS) <= set(last)
    assert "network" not in load_config(None, common[:7]).to_dict()  # no section: the run's files do not change

    # crossgrad report --target: the first simulated time at which the consensus accuracy reached it
    recs = records(full.run_dir)
    target = 100 * max(r["consensus_acc"] for r in recs)
    first = next(r["sim_time_s"] for r in recs if r["consensus_acc"] >= target / 100)
    assert main(["report", str(full.run_dir), "--out", str(tmp_path / "rep"), "--target", repr(target)]) == 0
    row = next(csv.DictReader((tmp_path / "rep" / "report.csv").open()))
    assert float(row["time_to_target_mean"]) == pytest.approx(first, rel=1e-9)
    assert main(["report", str(full.run_dir), "--target", "120"]) == 2
    # crossgrad plot: the cost figure gains a panel against simulated time
    assert main(["plot", str(full.run_dir), "--out", str(tmp_path / "fig")]) == 0
    assert "simulated time (s)" in next((tmp_path / "fig").glob("cost_*.svg")).read_text()


@pytest.mark.parametrize("setting,needle", [
    ("network.drop_prob=-0.1", "network.drop_prob must be a finite number >= 0 and <= 1"),
    ("network.drop_prob=1.5", "network.drop_prob must be a finite number >= 0 and <= 1"),
    ("network.drop_prob=nan", "network.drop_prob must be a number, not 'nan'"),
    ("network.drop_prob=true", "network.drop_prob must be a number"),
    ('network.drop_prob="0.1"', "network.drop_prob must be a number"),
    ("network.compute_ms=-1", "network.compute_ms must be a finite number >= 0"),
    ("network.latency_ms=inf", "network.latency_ms: cannot read"),
    ("network.bandwidth_mbps=0", "network.bandwidth_mbps must be a finite number > 0"),
    ("network.stragglers=[1, -2, 1, 1, 1]", "network.stragglers[1] must be a finite number > 0"),
    ("network.stragglers=[1, 2]", "network.stragglers lists 2 factors for 5 agents"),
    ("network.stragglers.distribution=pareto", "network.stragglers.distribution must be 'lognormal' or 'uniform'"),
    ("network.link_failures.rate=2", "needs both rate and mean_down"),
    ("network.link_failures={rate = 2, mean_down = 3}", "network.link_failures.rate must be a finite number >= 0"),
    ("network.link_failures={rate = 0.1, mean_down = 0.5}", "network.link_failures.mean_down must be"),
    ("network.link_failures.schedule=[[0, 9, 1, 2]]", "agent out of range"),
    ("network.link_failures.schedule=[[0, 1, 3, 2]]", "start must be before its end"),
    ("network.seed=-1", "network.seed must be an integer >= 0"),
    ("network.jitter=1", "unknown key network.jitter"),
])
def test_every_bad_network_value_is_one_line_and_exit_2(capsys, setting, needle):
    assert main(["config", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crossgrad: error: ") and needle in err and err.count("\n") == 1, err


def test_a_nan_or_a_missing_link_from_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("[network]\ndrop_prob = nan\n")
    assert main(["config", str(tmp_path / "c.toml")]) == 2
    assert "network.drop_prob must be a finite number" in capsys.readouterr().err
    (tmp_path / "bw.txt").write_text("0 1 10\n")
    with pytest.raises(ConfigError, match="network.bandwidth_mbps: the file gives no value for the link"):
        NetworkModel(NetworkConfig(bandwidth_mbps=str(tmp_path / "bw.txt")), cg.Topology.ring(N))


# ----------------------------------------------------------------------------- torch.distributed
DIST_NET = NetworkConfig(drop_prob=0.3, compute_ms=1.0, latency_ms=2.0, bandwidth_mbps=50.0,
                         link_failures={"rate": 0.2, "mean_down": 2})
PUSH = dict(edges=[(0, 1), (1, 2), (2, 3), (3, 4), (4, 0), (0, 2), (3, 1)], directed=True, weights="out_uniform")


def churned(rejoin: str) -> NetworkConfig:
    """DIST_NET with agents leaving (seed 0 has agents away and returning within the 4 steps)."""
    return NetworkConfig(**{**DIST_NET.to_dict(), "churn": {"rate": 0.3, "mean_absence": 2, "rejoin": rejoin}})


def dist_runs() -> list[tuple[str, dict, cg.Topology, NetworkConfig]]:
    ring, push = cg.Topology.ring(N), cg.Topology.from_edges(N, **PUSH)
    runs = [(name, kw, ring, DIST_NET) for name, kw in [("dsgd", {}), ("ngc", dict(alpha=0.5)), ("compngc", {}),
                                                        ("cga", {})]]
    runs += [("sgp", {}, push, DIST_NET), ("ngc", dict(alpha=0.5), ring, churned("neighbor")),
             ("compngc", {}, ring, churned("neighbor")), ("dsgd", dict(momentum=0.9), ring, churned("own")),
             ("sgp", {}, push, churned("own"))]
    return runs


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from crossgrad.distributed import gather_state, make_engine

    with rank_errors(rank, out_dir):
        _init(rank, world, port, 30)
        results = {}
        batches = batches_for(N, 4)
        for k, (name, kw, topo, cfg) in enumerate(dist_runs()):
            net = NetworkModel(copy.deepcopy(cfg), topo, 0)
            engine = make_engine(tiny_model(), topo, cg.make_algorithm(name, lr=0.1, **kw), timeout=20, network=net)
            for b in batches:
                engine.step([b[a] for a in engine.plan.local])
            state = gather_state(engine)
            if rank == 0:
                results[k] = (state["models"], state["bytes_sent"], net.metrics())
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        dist.destroy_process_group()


@pytest.mark.timeout(200)
def test_distributed_loses_the_same_messages_as_the_simulator(tmp_path):
    """2 ranks holding 3 and 2 agents: the same models, bytes and network counters as the simulator, with churn
    (agents away on either rank, returning ones copying a neighbour's model across ranks) too."""
    procs = _spawn(_dist_worker, 2, (free_port(), str(tmp_path)), join_timeout=150)
    errors = [p.read_text() for p in tmp_path.glob("error*.txt")]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs)
    results = torch.load(tmp_path / "result.pt", weights_only=False)
    for k, (name, kw, topo, cfg) in enumerate(dist_runs()):
        sim = run(simulator(topo, name, cfg, **kw), batches_for(N, 4))
        models, sent, metrics = results[k]
        torch.testing.assert_close(models, sim.params, rtol=1e-12, atol=1e-12, msg=name)
        assert torch.equal(sent, sim.stats["bytes_sent"]), name
        assert metrics == sim.engine.network.metrics() and metrics["messages_dropped"] > 0, name
