"""Churn (network.churn): an absent agent neither computes nor communicates and its state is kept, its
neighbours re-weight as for drops, a returning agent resumes its own state or copies a neighbour's model
(against a float64 per-agent recomputation), push-sum keeps the mass, the draws are a pure function of the
seed and resume bit-exactly, held batch streams lose no sample, agents_present, the config's refusals.
The simulator and torch.distributed agree under churn in tests/test_network.py."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import crossgrad as cg
from crossgrad.cli import main
from crossgrad.comm.network import NetworkConfig, NetworkModel, uniforms
from crossgrad.data.streams import AgentStream
from crossgrad.errors import ConfigError
from crossgrad.run import resume_experiment, run_experiment
from crossgrad.run.config import load_config
from crossgrad.run.data import AgentBatches
from crossgrad.run.evaluate import TIMING_KEYS
from crossgrad.run.rundir import METRICS
from test_network import N, arrived, batches_for, grad_at, run, simulator, tiny_model_rows

#: agent 2 is away for steps 1-2 (back at 3), agent 0 for steps 2-3 (back at 4)
SCHEDULE = [[2, 1, 3], [0, 2, 4]]


def away_at(t: int) -> set[int]:
    return {a for a, start, end in SCHEDULE if start <= t < end}


# ------------------------------------------------------------------- per-agent recomputation in float64
@pytest.mark.parametrize("name,alpha,rejoin", [("dsgd", None, "own"), ("dsgd", None, "neighbor"),
                                               ("ngc", 0.5, "neighbor")])
def test_churn_equals_a_per_agent_recomputation(name, alpha, rejoin):
    """Absent agents keep their models and send nothing; the others re-weight over what arrived; a returning
    agent copies its lowest-numbered neighbour whose model reached it (rejoin = "neighbor")."""
    p, gamma, lr, steps, seed = 0.3, 0.7, 0.1, 5, 5
    topo = cg.Topology.ring(N)
    kw = dict(momentum=0.0, nesterov=False, gamma=gamma) | ({} if alpha is None else dict(alpha=alpha))
    cfg = NetworkConfig(drop_prob=p, churn={"schedule": SCHEDULE, "rejoin": rejoin})
    batches = batches_for(N, steps)
    sim = run(simulator(topo, name, cfg, seed=seed, **kw), batches)
    W = topo.W.double()
    x = [row.clone() for row in tiny_model_rows()]
    nbrs = [[j for j in range(N) if j != i and W[i, j] > 0] for i in range(N)]
    copied = 0
    for t in range(steps):
        away = away_at(t)
        a1 = {(j, i): j not in away and i not in away and arrived(seed, t, 1, j, i, p)
              for i in range(N) for j in nbrs[i]}
        half = []
        for i in range(N):
            keep = W[i, i] + sum(W[i, j] for j in nbrs[i] if a1[j, i])
            row = W[i, i] / keep * x[i] + sum(W[i, j] / keep * x[j] for j in nbrs[i] if a1[j, i])
            got = [j for j in nbrs[i] if a1[j, i]]
            if rejoin == "neighbor" and i in away_at(t - 1) - away and got:
                half.append(x[min(got)])  # the returning agent starts from that neighbour's model
                copied += 1
            else:
                half.append((1 - gamma) * x[i] + gamma * row)
        new = []
        for i in range(N):
            if i in away:
                new.append(x[i])
                continue
            g = grad_at(half[i], batches[t][i])
            if name == "ngc":
                g, total = W[i, i] * g, W[i, i].clone()
                for j in nbrs[i]:
                    if a1[j, i]:  # j's model on i's data
                        g = g + (1 - alpha) * W[i, j] * grad_at(x[j], batches[t][i])
                        total += (1 - alpha) * W[i, j]
                    if a1[i, j] and arrived(seed, t, 2, j, i, p):  # i's model on j's data, sent back
                        g = g + alpha * W[i, j] * grad_at(x[i], batches[t][j])
                        total += alpha * W[i, j]
                g = g / total
            new.append(half[i] - lr * g)
        x = new
    assert copied == (2 if rejoin == "neighbor" else 0)
    torch.testing.assert_close(sim.params, torch.stack(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,kw", [("dsgd", dict(momentum=0.9)), ("dsgd", dict(momentum=0.9, qgm=True)),
                                     ("compngc", {}), ("cga", dict(momentum=0.9)), ("decentlam", {})])
def test_an_absent_agent_keeps_its_whole_state(name, kw):
    """Its model, momentum, error memories (its own and those of the cross-gradients it would encode) and the
    algorithm's rows stay as they were, bit for bit, while the others move."""
    topo = cg.Topology.ring(N)
    sim = simulator(topo, name, NetworkConfig(churn={"schedule": SCHEDULE}), **kw)
    engine = sim.engine
    for t, b in enumerate(batches_for(N, 5)):
        away = torch.tensor(sorted(away_at(t)), dtype=torch.long)
        before = {k: v.index_select(d, i).clone() for k, (v, d, i) in engine._agent_rows(away).items()} \
            if len(away) else {}
        x0 = engine.x.clone()
        sim.step(b)
        for k, (v, d, i) in (engine._agent_rows(away).items() if len(away) else ()):
            if k in before:
                assert torch.equal(v.index_select(d, i), before[k]), (name, t, k)
        moved = [a for a in range(N) if a not in away_at(t)]
        assert not torch.equal(engine.x[moved], x0[moved])
    want = {"dsgd": {"transform0.m"}, "compngc": {"transform0.m", "self_memory", "edge_memory"},
            "cga": {"transform0.m", "state.v"}, "decentlam": {"state.m"}}[name]
    if kw.get("qgm"):
        want = {"transform0.m_hat", "transform0.x_prev"}
    assert {"x", *want} <= set(engine._agent_rows(torch.tensor([0]))), name  # what the check above covered


def test_push_sum_keeps_the_mass_under_churn():
    """Nothing goes to or from an absent agent: the senders keep their shares, Σ w = n, Σ x moves only by the
    present agents' steps."""
    topo = cg.Topology.from_edges(N, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0), (0, 2), (3, 1)], directed=True,
                                  weights="out_uniform")
    sim = simulator(topo, "sgp", NetworkConfig(drop_prob=0.2, churn={"rate": 0.3, "mean_absence": 2}),
                    momentum=0.0, nesterov=False)
    e, absences = sim.engine, 0
    for t, b in enumerate(batches_for(N, 12)):
        present = torch.from_numpy(~e.network.absent(t).copy())
        absences += int((~present).sum())
        before = e.x.sum(0).clone()
        sim.step(b)
        torch.testing.assert_close(e.x.sum(0) + 0.1 * e.last["g_self"][present].sum(0), before, rtol=0, atol=1e-13)
        assert abs(float(e.algo_state.w.sum()) - N) < 1e-12
    assert absences > 0


# ------------------------------------------------------------------------------------- draws and resume
def test_churn_is_a_markov_chain_drawn_from_the_hash():
    topo, rate, mean = cg.Topology.ring(8), 0.2, 3.0
    net = NetworkModel(NetworkConfig(churn={"rate": rate, "mean_absence": mean}), topo, 4)
    agents, away, seen = np.arange(8), np.zeros(8, dtype=bool), 0
    for t in range(30):
        leave = uniforms(4, t, 5, agents, agents) < rate
        back = uniforms(4, t, 6, agents, agents) < 1 / mean
        away = np.where(away, ~back, leave)
        assert np.array_equal(net.absent(t), away)
        assert np.array_equal(net.absent(t), away)  # asked again at the same step: the same answer
        seen += int(away.sum())
    assert 0 < seen < 8 * 30
    assert net.metrics()["agents_present"] == 8 - int(away.sum())
    with pytest.raises(ValueError, match="has passed"):
        net.absent(3)


@pytest.mark.parametrize("name,kw,rejoin", [("ngc", dict(alpha=0.5), "neighbor"), ("dsgd", dict(momentum=0.9), "own"),
                                            ("compngc", {}, "neighbor")])
def test_resume_across_an_absence_is_bit_exact(name, kw, rejoin):
    topo, batches = cg.Topology.ring(N), batches_for(N, 9)
    cfg = NetworkConfig(drop_prob=0.1, churn={"rate": 0.25, "mean_absence": 3, "rejoin": rejoin})
    full = simulator(topo, name, cfg, **kw)
    run(full, batches[:4])
    assert full.engine.network.absent(3).any()  # the state is saved while an agent is away
    state = copy.deepcopy(full.state_dict())
    run(full, batches[4:])
    resumed = simulator(topo, name, cfg, **kw)
    resumed.load_state_dict(state)
    run(resumed, batches[4:])
    assert torch.equal(resumed.params, full.params)
    assert resumed.engine.network.metrics() == full.engine.network.metrics()


# ------------------------------------------------------------------------------------- counts and time
def test_an_absent_agent_sends_nothing_computes_nothing_and_waits_for_no_link(tmp_path):
    """Its edges carry no message (neither sent nor dropped, no bytes) and its compute does not count."""
    topo = cg.Topology.ring(4)
    (tmp_path / "lat.txt").write_text("0 1 9\n1 2 1\n2 3 1\n3 0 9\n")
    cfg = NetworkConfig(compute_ms=2.0, latency_ms=str(tmp_path / "lat.txt"), stragglers=[5.0, 1, 1, 1],
                        churn={"schedule": [[0, 0, 1]]})
    sim = run(simulator(topo, "ngc", cfg), batches_for(4, 1))
    net = sim.engine.network
    assert net.messages_sent == 2 * (len(topo.edges) - 4) and net.messages_dropped == 0
    # round 1 and 2 over the links 1-2 and 2-3 only; agents 1 and 3 have one model, agent 2 two
    assert net.sim_time_s == pytest.approx((1 + 3 * 2.0 + 1) / 1000, rel=1e-12)
    plain = run(simulator(topo, "ngc"), batches_for(4, 1))
    row = plain.stats["bytes_sent"][1, 0] / 2  # one message
    assert sim.stats["bytes_sent"][0].tolist() == [0, 0]
    assert sim.stats["bytes_sent"][1].tolist() == [row, row]  # agent 1 sends only to agent 2, both rounds


def _prepared(n: int, shard: int, augment=None) -> SimpleNamespace:
    data = torch.arange(n * shard, dtype=torch.float64).view(-1, 1)
    return SimpleNamespace(cfg=SimpleNamespace(training=SimpleNamespace(seed=3)), device=torch.device("cpu"),
                           shards=[torch.arange(i * shard, (i + 1) * shard) for i in range(n)], x_train=data,
                           y_train=torch.zeros(n * shard, dtype=torch.long), augment=augment)


def test_held_batch_streams_lose_no_sample():
    """An absent agent's stream and augmentation draws stand still: over the run it sees the samples an agent
    that never left sees in its first present steps, in the same order and with the same augmentation."""
    def noise(xb, generator):
        return xb + torch.rand(xb.shape, generator=generator, dtype=xb.dtype)

    held = AgentBatches(_prepared(3, 7), [0, 1, 2], 3)
    held.p.augment = noise
    steady = AgentBatches(_prepared(3, 7, noise), [0, 1, 2], 3)
    pattern = [[False, True, False], [False, True, True], [False, False, True], [False, False, False]] * 3
    seen: list[list] = [[], [], []]
    for hold in pattern:
        out = held.next(hold)
        assert [len(b[0]) for b in out] == [3, 3, 3]
        for k, h in enumerate(hold):
            if not h:
                seen[k].append(out[k][0])
    for k in range(3):
        want = [steady.next()[k][0] for _ in range(len(seen[k]))]
        steady = AgentBatches(_prepared(3, 7, noise), [0, 1, 2], 3)
        assert torch.equal(torch.cat(seen[k]), torch.cat(want)), k
    stream = AgentStream(torch.arange(2), seed=1)
    state = stream.state_dict()
    assert stream.peek(5).tolist() == stream.perm.repeat(3)[:5].tolist()
    assert stream.state_dict()["pos"] == state["pos"] and torch.equal(stream.state_dict()["gen"], state["gen"])


def test_runs_record_agents_present_and_resume_across_an_absence(tmp_path):
    common = ["training.threads=1", f'output.out_dir="{tmp_path}"', "model.name=mlp", "training.steps=8",
              "training.eval_every_steps=2", "training.eval_subset=50", "training.eval_at_start=false",
              "network.drop_prob=0.1", "network.churn.rate=0.2", "network.churn.mean_absence=3",
              'network.churn.rejoin="neighbor"']
    full = run_experiment(load_config(None, [*common, "output.name=full"]), quiet=True)
    part = run_experiment(load_config(None, [*common, "output.name=part"]), quiet=True, stop_after=5)
    done = resume_experiment(part.run_dir, quiet=True)

    def records(run_dir):
        lines = (run_dir / METRICS).read_text().splitlines()
        return [{k: v for k, v in json.loads(r).items() if k not in TIMING_KEYS} for r in lines]

    assert records(full.run_dir) == records(done.run_dir)
    present = [r["agents_present"] for r in records(full.run_dir)]
    assert min(present) < N and all(0 <= a <= N for a in present), present  # the default run: 5 agents
    # every agent's stream has moved by one batch per step it was present, none while away
    cfg = load_config(None, common)
    net = NetworkModel(cfg.network, cg.Topology.ring(N), cfg.training.seed)
    steps_present = sum(~net.absent(t) for t in range(8))
    streams = torch.load(full.run_dir / "checkpoint.pt", weights_only=True)["streams"]  # one process
    batch = cfg.training.batch_size
    assert steps_present.min() < 8
    for a, st in enumerate(streams):
        shard = len(st["perm"])
        assert st["pos"] % shard == steps_present[a] * batch % shard, a


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("setting,needle", [
    ("network.churn.rate=-0.1", "network.churn needs both rate and mean_absence"),
    ("network.churn={rate = -0.1, mean_absence = 3}", "network.churn.rate must be a finite number >= 0 and <= 1"),
    ("network.churn={rate = 1.5, mean_absence = 3}", "network.churn.rate must be a finite number >= 0 and <= 1"),
    ("network.churn={rate = nan, mean_absence = 3}", "network.churn.rate must be a finite number"),
    ('network.churn={rate = "0.1", mean_absence = 3}', "network.churn.rate must be a number"),
    ("network.churn={rate = 0.1, mean_absence = 0.5}", "network.churn.mean_absence must be a finite number >= 1"),
    ("network.churn={rate = 0.1, mean_absence = inf}", "network.churn.mean_absence must be a finite number"),
    ("network.churn={rate = 0.1, mean_absence = true}", "network.churn.mean_absence must be a number"),
    ("network.churn={rate = 0.1, mean_absence = 3, rejoin = \"peer\"}", "network.churn.rejoin must be 'own' or"),
    ("network.churn={rate = 0.1, mean_absence = 3, rejoin = 1}", "network.churn.rejoin must be 'own' or"),
    ('network.churn={rejoin = "neighbor"}', "network.churn needs both rate and mean_absence"),
    ("network.churn=0.1", "network.churn must be a table"),
    ("network.churn={rate = 0.1, mean_absence = 3, every = 2}", "unknown key network.churn.every"),
    ("network.churn.schedule=[[9, 1, 2]]", "agent out of range"),
    ("network.churn.schedule=[[0, 3, 2]]", "start must be before its end"),
    ("network.churn.schedule=[[0, -1, 2]]", "must be an integer >= 0"),
    ("network.churn.schedule=[[0, 1]]", "every row must be [agent, start, end]"),
    ("network.churn={schedule = [[0, 1, 2]], rate = 0.1}", "either a schedule or rate and mean_absence"),
])
def test_every_bad_churn_value_is_one_line_and_exit_2(capsys, setting, needle):
    assert main(["config", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crossgrad: error: ") and needle in err and err.count("\n") == 1, err


@pytest.mark.parametrize("name", ["gt", "d2", "choco", "gut", "momentum_tracking", "relaysgd"])
def test_methods_that_refuse_loss_refuse_churn(name):
    topo = cg.Topology.chain(N) if name == "relaysgd" else cg.Topology.ring(N)
    with pytest.raises(ConfigError, match=f"{name} cannot run on a lossy network .*churn"):
        simulator(topo, name, NetworkConfig(churn={"schedule": [[0, 1, 2]]}))


@pytest.mark.parametrize("name", ["sgp", "decentlam"])
def test_methods_that_send_no_plain_model_refuse_rejoin_neighbor(name, capsys):
    topo = cg.Topology.ring(N)
    with pytest.raises(ConfigError, match=f"{name} cannot take network.churn.rejoin = 'neighbor'"):
        simulator(topo, name, NetworkConfig(churn={"schedule": [[0, 1, 2]], "rejoin": "neighbor"}))
    simulator(topo, name, NetworkConfig(churn={"schedule": [[0, 1, 2]]}))  # rejoining with its own state is fine


def test_rejoin_neighbor_needs_a_round_1_at_every_step(capsys):
    assert main(["config", "--set", "training.local_steps=2", "--set", "network.churn.schedule=[[0, 1, 2]]",
                 "--set", 'network.churn.rejoin="neighbor"', "--set", "algorithm.name=dsgd"]) == 2
    assert "needs training.local_steps = 1" in capsys.readouterr().err
