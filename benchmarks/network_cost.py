"""What the network model (crossgrad.comm.network) costs a step: off, drops, drops + churn, in alternating rounds.

    python benchmarks/network_cost.py [--agents 16] [--topology ring] [--algorithm dsgd] [--steps 40]
        [--repeats 5] [--variants off,drops,churn] [--threads 1] [--json]

Variants: `off` no [network] section; `drops` drop_prob = 0.1; `churn` drop_prob = 0.1 and churn
{rate = 0.01, mean_absence = 20} (about one agent in six away at a time). Every variant's simulator is built
once, warmed up, then timed `--steps` steps per round, the variants taking turns round after round, so that
background load hits them alike. Printed per variant: the median ms per step over the rounds and their range,
the process's CPU time per step (one thread: on a shared machine far less exposed to other jobs than the wall
clock), and the network model's own CPU time per step (its `begin` and `end`: drawing, re-weighting, counting,
timing) with its share of the step's CPU time. The last line gives the peak resident memory of the process and
the network model's time per edge and step. `--json` prints one JSON object instead (for scripts that aggregate
runs of several processes, e.g. this code against an older checkout: `off` runs on any version of crossgrad).

The default model is tiny on purpose (a 43-parameter MLP on 6 features, batch 8, float32): the network model's
cost does not depend on the model, so this is where its share of a step is largest; `--model mlp:1x28x28` (or
any registry model, batch 32) shows a step of real size.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch
from torch import nn

import crossgrad as cg
from crossgrad.topology import make_topology

VARIANTS = {
    "off": None,
    "drops": {"drop_prob": 0.1},
    "churn": {"drop_prob": 0.1, "churn": {"rate": 0.01, "mean_absence": 20}},
}


def make_model(spec: str) -> tuple[nn.Module, tuple[int, ...], int]:
    """The model, its input shape and its classes: "tiny" (43 parameters) or a registry model "name:CxHxW"."""
    torch.manual_seed(0)
    if spec == "tiny":
        return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)), (6,), 3
    from crossgrad.models import make_model as registry_model

    name, _, shape = spec.partition(":")
    input_shape = tuple(int(d) for d in shape.split("x"))
    return registry_model(name, input_shape=input_shape, num_classes=10), input_shape, 10


def build(variant: str, topo, algorithm: str, model: str = "tiny") -> tuple[cg.Simulator, list[float]]:
    """The variant's simulator and the accumulator its network model's begin and end add their CPU seconds to."""
    spent = [0.0]
    spec = VARIANTS[variant]
    if spec is None:
        return cg.Simulator(make_model(model)[0], topo, cg.make_algorithm(algorithm, lr=0.05)), spent
    from crossgrad.comm.network import NetworkConfig, NetworkModel

    net = NetworkModel(NetworkConfig(**spec), topo, 0)
    for name in ("begin", "end"):
        inner = getattr(net, name)

        def timed(*args, _inner=inner, **kw):
            t = time.process_time()
            out = _inner(*args, **kw)
            spent[0] += time.process_time() - t
            return out

        setattr(net, name, timed)
    return cg.Simulator(make_model(model)[0], topo, cg.make_algorithm(algorithm, lr=0.05), network=net), spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--topology", default="ring")
    ap.add_argument("--algorithm", default="dsgd")
    ap.add_argument("--model", default="tiny", help='"tiny" (43 parameters, batch 8) or name:CxHxW (batch 32)')
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default="off,drops,churn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    variants = a.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad or min(a.agents, a.steps, a.repeats) < 1:
        print(f"network_cost: error: variants are {', '.join(VARIANTS)}; agents, steps, repeats >= 1", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(a.threads)
    topo = make_topology(a.topology, a.agents)
    g = torch.Generator().manual_seed(1)
    _, shape, classes = make_model(a.model)
    batch = 8 if a.model == "tiny" else 32
    pool = [[(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
             for _ in range(a.agents)] for _ in range(4)]
    sims = {v: build(v, topo, a.algorithm, a.model) for v in variants}
    for sim, _ in sims.values():
        for s in range(a.warmup):
            sim.step(pool[s % len(pool)])
    step_ms: dict[str, list[float]] = {v: [] for v in variants}
    cpu_ms: dict[str, list[float]] = {v: [] for v in variants}
    net_ms: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(a.repeats):
        for v in variants:
            sim, spent = sims[v]
            before, t, c = spent[0], time.perf_counter(), time.process_time()
            for s in range(a.steps):
                sim.step(pool[s % len(pool)])
            step_ms[v].append((time.perf_counter() - t) * 1e3 / a.steps)
            cpu_ms[v].append((time.process_time() - c) * 1e3 / a.steps)
            net_ms[v].append((spent[0] - before) * 1e3 / a.steps)
    edges = len(topo.edges)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"agents": a.agents, "topology": a.topology, "algorithm": a.algorithm, "model": a.model, "edges": edges,
           "steps": a.steps, "repeats": a.repeats, "peak_rss_mib": round(rss_mib, 1),
           "step_ms": step_ms, "cpu_ms": cpu_ms, "network_ms": net_ms}
    if a.json:
        print(json.dumps(out))
        return
    print(f"{a.algorithm}, {a.model} model, {a.agents} agents, {a.topology} ({edges} edges), {a.steps} steps x "
          f"{a.repeats} rounds")
    print("| variant | wall ms/step (median) | range | CPU ms/step (median) | range | network model CPU ms/step "
          "| share |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        wall, cpu, net = (statistics.median(t[v]) for t in (step_ms, cpu_ms, net_ms))
        print(f"| {v} | {wall:.2f} | {min(step_ms[v]):.2f}-{max(step_ms[v]):.2f} | {cpu:.2f} "
              f"| {min(cpu_ms[v]):.2f}-{max(cpu_ms[v]):.2f} | {net:.3f} | {100 * net / cpu:.1f} % |")
    last = variants[-1]
    per_edge = statistics.median(net_ms[last]) * 1e3 / edges
    print(f"peak RSS {rss_mib:.0f} MiB; network model ({last}): {per_edge:.3f} us per edge and step")


if __name__ == "__main__":
    main()
