"""Throughput of the simulator against the compute bound, per-phase overheads, and scaling in n.

The *bound* is a plain PyTorch loop doing exactly the simulator's forward/backward passes (same
model, batch size and number of passes per step) on one model and nothing else; the ratio
simulator samples/s / bound samples/s says how close the simulator is to pure gradient work.
"""
from __future__ import annotations

import gc
import resource
import time
from dataclasses import dataclass

import torch
from torch import nn

from crossgrad.algorithms import make_algorithm
from crossgrad.models import make_model
from crossgrad.simulator import Simulator
from crossgrad.topology import make_topology

#: the algorithm settings the bench compares, by label
BENCH_ALGORITHMS: dict[str, tuple[str, dict]] = {
    "dsgd": ("dsgd", dict(momentum=0.9, nesterov=True)),
    "qgm": ("dsgd", dict(momentum=0.9, qgm=True)),
    "ngc(a=1)": ("ngc", dict(alpha=1.0, momentum=0.9, nesterov=True)),
    "ngc(a=0)": ("ngc", dict(alpha=0.0, momentum=0.9, nesterov=True)),
    "compngc": ("compngc", dict(momentum=0.9, nesterov=True)),
    "cga": ("cga", dict(momentum=0.9, nesterov=True)),
    "compcga": ("compcga", dict(momentum=0.9, nesterov=True)),
}


def _batches(n: int, batch: int, input_shape: tuple[int, ...], classes: int, pool: int, device) -> list:
    g = torch.Generator().manual_seed(0)
    return [
        [(torch.randn(batch, *input_shape, generator=g).to(device),
          torch.randint(0, classes, (batch,), generator=g).to(device)) for _ in range(n)]
        for _ in range(pool)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class BoundLoop:
    """A plain loop: the same number of forward/backward passes per step on one model, nothing else."""

    def __init__(self, model: nn.Module, batches: list, passes: int, device):
        self.model = model.to(device).train()
        self.flat = [b for step in batches for b in step]
        self.passes = passes
        self.k = 0

    def run(self, steps: int) -> int:
        for _ in range(steps * self.passes):
            x, y = self.flat[self.k % len(self.flat)]
            self.k += 1
            self.model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(self.model(x), y).backward()
        return steps * self.passes * self.flat[0][0].shape[0]


def _timed(fn, device) -> tuple[float, int]:
    _sync(device)
    start = time.perf_counter()
    samples = fn()
    _sync(device)
    return time.perf_counter() - start, samples


@dataclass
class SimResult:
    label: str
    samples_per_s: float
    bound_samples_per_s: float
    step_s: float
    passes_per_step: int
    phases: dict[str, float]  # fraction of step time


def measure(model_name: str, input_shape: tuple[int, ...], topology, label: str, batch: int, steps: int,
            repeats: int, device, evaluator: str = "auto") -> SimResult:
    """Simulator and bound, measured in alternating rounds on the same data; the best round of each.

    Alternating and taking the best round keeps other load on a shared machine from landing on
    one side of the ratio only.
    """
    name, kw = BENCH_ALGORITHMS[label]
    n = topology.n
    batches = _batches(n, batch, input_shape, 10, pool=2, device=device)
    torch.manual_seed(0)
    model = make_model(model_name, input_shape=input_shape, num_classes=10)
    sim = Simulator(model, topology, make_algorithm(name, lr=0.01, **kw), device=device, evaluator=evaluator)
    sim.step(batches[0])  # warm-up
    passes = sim.stats["grad_evals"] // n
    torch.manual_seed(0)
    bound = BoundLoop(make_model(model_name, input_shape=input_shape, num_classes=10), batches, n * passes, device)
    bound.run(1)
    engine = sim.engine
    engine.clock.enabled = True

    def sim_round() -> int:
        evals = engine.stats.grad_evals
        for t in range(steps):
            sim.step(batches[t % len(batches)])
        return (engine.stats.grad_evals - evals) * batch

    best_sim = best_bound = float("inf")
    sim_samples = bound_samples = 0
    best_phases: dict[str, float] = {}
    for _ in range(repeats):
        engine.clock.reset()
        elapsed, sim_samples = _timed(sim_round, device)
        if elapsed < best_sim:
            best_sim = elapsed
            total = sum(engine.clock.totals.values()) or 1.0
            best_phases = {k: v / total for k, v in engine.clock.totals.items()}
        elapsed, bound_samples = _timed(lambda: bound.run(steps), device)
        best_bound = min(best_bound, elapsed)
    return SimResult(label, sim_samples / best_sim, bound_samples / best_bound, best_sim / steps, passes,
                     best_phases)


def throughput_table(model_name: str, input_shape: tuple[int, ...], n: int = 16, batch: int = 32,
                     steps: int = 3, repeats: int = 3, topology: str = "ring",
                     algorithms: list[str] | None = None, device: str = "cpu",
                     evaluator: str = "auto") -> list[dict]:
    """Simulator vs bound for each algorithm; one row each."""
    dev = torch.device(device)
    topo = make_topology(topology, n)
    rows = []
    for label in algorithms or list(BENCH_ALGORITHMS):
        res = measure(model_name, input_shape, topo, label, batch, steps, repeats, dev, evaluator)
        rows.append({
            "model": model_name, "algorithm": label, "agents": n, "passes/agent/step": res.passes_per_step,
            "sim samples/s": res.samples_per_s, "bound samples/s": res.bound_samples_per_s,
            "ratio": res.samples_per_s / res.bound_samples_per_s, "step ms": res.step_s * 1e3,
            **{f"{k} %": 100 * v for k, v in sorted(res.phases.items()) if k != "gradients"},
        })
        gc.collect()
    return rows


def state_bytes(sim: Simulator) -> int:
    """Bytes of the engine's per-agent tensors: its whole state (parameters, buffers, momentum, error
    memories, the algorithm's own) and the gradient buffer."""
    e = sim.engine
    return _tensor_bytes(e.state_dict()) + e.grads.numel() * e.grads.element_size()


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor in a nest of dicts and lists."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def scaling_table(model_name: str = "lenet5", input_shape: tuple[int, ...] = (1, 28, 28),
                  sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256), topologies: tuple[str, ...] = ("ring",),
                  label: str = "ngc(a=1)", batch: int = 32, window: float = 10.0,
                  device: str = "cpu") -> list[dict]:
    """Mean step time per forward/backward pass, and state memory, as n grows.

    Every size is timed over the same wall-clock `window` (seconds; at least one step). A fixed
    number of steps, or the best of a few short rounds, would time small n over a fraction of a
    second and large n over minutes: on a shared or virtual machine the short windows catch its
    quiet moments and the long ones average over its noise, which once made 256 agents look 30 %
    slower per pass than 16 (re-timed over equal 25 s windows: 3.1 vs 3.1 ms per pass).
    """
    dev = torch.device(device)
    rows = []
    for topo_name in topologies:
        for n in sizes:
            topo = make_topology(topo_name, n)
            torch.manual_seed(0)
            model = make_model(model_name, input_shape=input_shape, num_classes=10)
            batches = _batches(n, batch, input_shape, 10, pool=1, device=dev)
            name, kw = BENCH_ALGORITHMS[label]
            sim = Simulator(model, topo, make_algorithm(name, lr=0.01, **kw), device=dev)
            sim.step(batches[0])
            _sync(dev)
            start, done = time.perf_counter(), 0
            while done == 0 or time.perf_counter() - start < window:
                sim.step(batches[0])
                _sync(dev)
                done += 1
            step_s = (time.perf_counter() - start) / done
            passes = sim.stats["grad_evals"] // sim.stats["steps"]
            rows.append({
                "topology": topo_name, "agents": n, "passes/step": passes, "step s": step_s,
                "steps timed": done, "ms per pass": 1e3 * step_s / passes, "state MiB": state_bytes(sim) / 2**20,
                "state KiB/agent": state_bytes(sim) / n / 2**10,
                "peak RSS MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            })
            del sim, batches
            gc.collect()
    return rows


def format_rows(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cols = [[k] + [cell(r.get(k, "")) for r in rows] for k in keys]
    widths = [max(len(c) for c in col) for col in cols]
    lines = [" | ".join(col[i].rjust(w) for col, w in zip(cols, widths)) for i in range(len(rows) + 1)]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`crossgrad bench`: throughput vs bound per algorithm, overheads, and a scaling table."""
    import argparse
    import platform

    p = argparse.ArgumentParser(prog="crossgrad bench", description=main.__doc__)
    p.add_argument("--models", default="lenet5:1x28x28,cnn5:3x32x32",
                   help="comma-separated name:CxHxW (default: %(default)s)")
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the best is kept")
    p.add_argument("--algorithms", default=",".join(BENCH_ALGORITHMS), help="default: all")
    p.add_argument("--scaling", default="8,16,32,64,128,256", help="agent counts for the scaling table ('' skips)")
    p.add_argument("--scaling-topologies", default="ring,exponential")
    p.add_argument("--scaling-window", type=float, default=10.0,
                   help="seconds each scaling size is timed for (the same for every size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--evaluator", default="auto", choices=["auto", "loop", "vmap"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [a for a in args.algorithms.split(",") if a not in BENCH_ALGORITHMS]
    if unknown:
        p.error(f"unknown algorithm label(s) {unknown}; choose from {list(BENCH_ALGORITHMS)}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {args.device}, torch {torch.__version__}")
    for spec in args.models.split(","):
        name, _, shape = spec.partition(":")
        input_shape = tuple(int(v) for v in shape.split("x"))
        rows = throughput_table(name, input_shape, n=args.agents, batch=args.batch, steps=args.steps,
                                repeats=args.repeats, algorithms=args.algorithms.split(","), device=args.device,
                                evaluator=args.evaluator)
        print(f"\n{name} {shape}, {args.agents} agents on a ring, batch {args.batch} per agent "
              f"(ratio = simulator samples/s / bound samples/s; % = share of step time)")
        print(format_rows(rows))
    if args.scaling:
        sizes = tuple(int(v) for v in args.scaling.split(","))
        rows = scaling_table(sizes=sizes, topologies=tuple(args.scaling_topologies.split(",")),
                             batch=args.batch, window=args.scaling_window, device=args.device)
        print(f"\nscaling: lenet5 1x28x28, ngc(a=1), each size timed over {args.scaling_window:g} s")
        print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
