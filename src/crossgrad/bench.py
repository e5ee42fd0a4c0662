"""Throughput of the simulator against the compute bound, per-phase overheads, and scaling in n.

The *bound* is a plain PyTorch loop doing exactly the simulator's forward/backward passes (same
model, batch size and number of passes per step) on one model and nothing else; the ratio
simulator samples/s / bound samples/s says how close the simulator is to pure gradient work.
The *ideal* is one model doing ONE forward/backward on a batch holding every pass's samples (the
same FLOPs): what a GPU can reach at best. `runner_vs_engine` times `crossgrad run` against the
engine alone on the same configuration.
"""
from __future__ import annotations

import gc
import resource
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from crossgrad.algorithms import ConfigError, make_algorithm
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
    # on the bench's ring (doubly stochastic) the push-sum weights stay 1, but every step still pays
    # for them: the weights' gossip and the de-biasing pass x / w
    "sgp": ("sgp", dict(momentum=0.9, nesterov=True)),
    "gt": ("gt", dict(momentum=0.9, nesterov=True)),  # a second round-1 message per edge: the tracked y
    # its own defaults (no momentum, gamma=0.5), which pass D²'s condition on every symmetric W
    "d2": ("d2", dict()),
    # round 1 carries compressed differences: the codec's cost (per-tensor top-k / random-k selection) shows
    "choco": ("choco", dict(momentum=0.9, nesterov=True)),
    "choco(top-k)": ("choco", dict(codec="top-k", gamma=0.05, momentum=0.9, nesterov=True)),
    "choco(random-k)": ("choco", dict(codec="random-k", gamma=0.05, momentum=0.9, nesterov=True)),
    # own momentum in combine: the passes over [n, P] of the recovered neighbour steps and the buffer
    "gut": ("gut", dict()),
    "qg-gutm": ("gut", dict(momentum=0.9, mu=0.06)),
    "momentum_tracking": ("momentum_tracking", dict()),  # a second round-1 message per edge: c - m
    "decentlam": ("decentlam", dict()),  # round 1 carries the local step z instead of the model
    # no gossip: the local step, then a message per tree edge (a row and a count), on the graph below
    "relaysgd(chain)": ("relaysgd", dict()),
}
#: labels that run only on a spanning tree: the per-algorithm table runs them on this graph of the same agents
BENCH_TREES: dict[str, str] = {"relaysgd(chain)": "chain"}


#: models the bench can name beyond the registry's: (registry name, norm, options)
BENCH_MODELS: dict[str, tuple[str, str, dict]] = {
    # parameter-heavy and FLOP-light at small inputs: where the engine's [n, P] passes show
    "cnn5-1m": ("cnn5", "group", dict(widths=(64, 128, 256, 320))),
}


def bench_model(name: str, input_shape: tuple[int, ...], num_classes: int = 10) -> nn.Module:
    """A registry model with its default norm, or one of BENCH_MODELS."""
    if name in BENCH_MODELS:
        base, norm, options = BENCH_MODELS[name]
        return make_model(base, input_shape=input_shape, num_classes=num_classes, norm=norm, **options)
    return make_model(name, input_shape=input_shape, num_classes=num_classes)


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


class BigBatch:
    """The ideal: one model, one forward/backward per step on all of a step's samples at once."""

    def __init__(self, model: nn.Module, batches: list, passes: int, device):
        self.model = model.to(device).train()
        flat = [b for step in batches for b in step][: len(batches[0])] * passes
        self.x = torch.cat([x for x, _ in flat])
        self.y = torch.cat([y for _, y in flat])

    def run(self, steps: int) -> int:
        for _ in range(steps):
            self.model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        return steps * len(self.y)


def _timed(fn, device) -> tuple[float, int]:
    _sync(device)
    start = time.perf_counter()
    samples = fn()
    _sync(device)
    return time.perf_counter() - start, samples


@dataclass
class SimResult:
    label: str
    samples_per_s: float  # the best round's
    bound_samples_per_s: float
    #: simulator / bound throughput of each pair of adjacent rounds, ascending: on a shared or virtual
    #: machine whose speed drifts over seconds, the median of these is steadier than a ratio of two bests
    ratios: list[float]
    step_s: float
    passes_per_step: int
    phases: dict[str, float]  # fraction of step time
    ideal_samples_per_s: float | None  # CUDA only
    state_bytes_per_agent: float
    peak_device_bytes: int | None  # CUDA only: the simulator's peak allocated memory


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
    model = bench_model(model_name, input_shape)
    sim = Simulator(model, topology, make_algorithm(name, lr=0.01, **kw), device=device, evaluator=evaluator)
    sim.step(batches[0])  # warm-up
    passes = sim.stats["grad_evals"] // n
    torch.manual_seed(0)
    bound = BoundLoop(bench_model(model_name, input_shape), batches, n * passes, device)
    bound.run(1)
    # the ideal is a GPU's: on a CPU one huge batch runs far slower than the same passes in a loop
    # (7x for cnn5-1m at 3x8x8: 36 s vs 4.8 s for 16 x 32 samples), so it is not timed there
    ideal = None
    if device.type == "cuda":
        torch.manual_seed(0)
        ideal = BigBatch(bench_model(model_name, input_shape), batches, n * passes, device)
        ideal.run(1)
    engine = sim.engine
    engine.clock.enabled = device.type != "cuda"  # its synchronisations would slow the GPU down
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def sim_round() -> int:
        evals = engine.stats.grad_evals
        for t in range(steps):
            sim.step(batches[t % len(batches)])
        return (engine.stats.grad_evals - evals) * batch

    best_sim = best_bound = best_ideal = float("inf")
    sim_samples = bound_samples = 0
    best_phases: dict[str, float] = {}
    ratios = []

    def sim_timed() -> float:
        nonlocal best_sim, best_phases, sim_samples
        engine.clock.reset()
        elapsed, sim_samples = _timed(sim_round, device)
        if elapsed < best_sim:
            best_sim = elapsed
            total = sum(engine.clock.totals.values()) or 1.0
            best_phases = {k: v / total for k, v in engine.clock.totals.items()}
        return elapsed

    def bound_timed() -> float:
        nonlocal best_bound, bound_samples
        elapsed, bound_samples = _timed(lambda: bound.run(steps), device)
        best_bound = min(best_bound, elapsed)
        return elapsed

    for r in range(repeats):
        if r % 2 == 0:  # the order alternates, so that neither side always runs right after the other
            t_sim = sim_timed()
            t_bound = bound_timed()
        else:
            t_bound = bound_timed()
            t_sim = sim_timed()
        ratios.append((sim_samples / t_sim) / (bound_samples / t_bound))
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        if ideal is not None:
            elapsed, ideal_samples = _timed(lambda: ideal.run(steps), device)
            best_ideal = min(best_ideal, elapsed)
    return SimResult(label, sim_samples / best_sim, bound_samples / best_bound, sorted(ratios), best_sim / steps,
                     passes, best_phases, None if ideal is None else ideal_samples / best_ideal,
                     state_bytes(sim) / n, peak)


def throughput_table(model_name: str, input_shape: tuple[int, ...], n: int = 16, batch: int = 32,
                     steps: int = 3, repeats: int = 3, topology: str = "ring",
                     algorithms: list[str] | None = None, device: str = "cpu",
                     evaluator: str = "auto") -> list[dict]:
    """Simulator vs bound for each algorithm; one row each."""
    dev = torch.device(device)
    topo = make_topology(topology, n)
    rows = []
    for label in algorithms or list(BENCH_ALGORITHMS):
        graph = make_topology(BENCH_TREES[label], n) if label in BENCH_TREES else topo
        res = measure(model_name, input_shape, graph, label, batch, steps, repeats, dev, evaluator)
        rows.append({
            "model": model_name, "algorithm": label, "agents": n, "passes/agent/step": res.passes_per_step,
            "sim samples/s": res.samples_per_s, "bound samples/s": res.bound_samples_per_s,
            "ratio": statistics.median(res.ratios), "ratio min": res.ratios[0], "ratio max": res.ratios[-1],
            **({} if res.ideal_samples_per_s is None else {
                "ideal samples/s": res.ideal_samples_per_s, "of ideal": res.samples_per_s / res.ideal_samples_per_s}),
            "step ms": res.step_s * 1e3, "state MiB/agent": res.state_bytes_per_agent / 2**20,
            **({} if res.peak_device_bytes is None else {"peak GPU MiB": res.peak_device_bytes / 2**20}),
            **{f"{k} %": 100 * v for k, v in sorted(res.phases.items()) if k != "gradients"},
        })
        gc.collect()
    return rows


def state_bytes(sim: Simulator) -> int:
    """Bytes of the engine's per-agent tensors kept across steps (see Engine.memory_bytes)."""
    return sim.engine.memory_bytes()


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
            model = bench_model(model_name, input_shape)
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


#: `crossgrad bench --runner` by default: 16 agents, ring, NGC, the parameter-heavy GroupNorm cnn5 on digits
RUNNER_SETTINGS = ("topology.n_agents=16", "topology.name=\"ring\"", "algorithm.name=\"ngc\"",
                   "model.name=\"cnn5\"", "model.norm=\"group\"", "model.options.widths=[64, 128, 256, 320]")


def runner_vs_engine(sets: list[str], steps: int = 20, repeats: int = 2, device: str = "cpu") -> dict:
    """Steps/s of `crossgrad run` (data streams, bookkeeping, sync points: everything but evaluation) against
    the engine alone stepping on ready-made batches of the same run.

    The runner's step time is the difference of two runs of `steps` and `2 * steps` steps, which cancels
    its set-up, final evaluation and checkpoint. Rounds alternate runner and engine; the best of each is kept.
    """
    import tempfile

    from crossgrad.run.cluster import LocalCluster
    from crossgrad.run.config import load_config
    from crossgrad.run.data import AgentBatches, prepare
    from crossgrad.run.trainer import run_experiment

    dev = torch.device(device)
    fixed = [f"training.device=\"{device}\"", "training.eval_at_start=false", "training.checkpoint_every=0",
             "training.eval_subset=64", f"training.eval_every_steps={10 * steps}"]
    base = load_config(None, [*sets, *fixed])
    prepared = prepare(base, dev)
    engine = LocalCluster(base).build_engine(prepared)
    pool = AgentBatches(prepared, list(range(base.topology.n_agents)), base.training.batch_size)
    batches = [pool.next() for _ in range(2)]
    engine.step(batches[0])  # warm-up

    def engine_round() -> None:
        for t in range(steps):
            engine.step(batches[t % 2])

    best_runner = best_engine = float("inf")
    with tempfile.TemporaryDirectory() as out:
        def runner(k: int, tag: str) -> float:
            cfg = load_config(None, [*sets, *fixed, f"training.steps={k}", f"output.out_dir=\"{out}\"",
                                     f"output.name=\"{tag}\""])
            start = time.perf_counter()
            result = run_experiment(cfg, quiet=True)
            _sync(dev)
            if result.status != "completed":
                raise RuntimeError(f"bench run ended {result.status}: {result.message}")
            return time.perf_counter() - start

        for r in range(repeats):
            short, long = runner(steps, f"short{r}"), runner(2 * steps, f"long{r}")
            best_runner = min(best_runner, max(long - short, 1e-9) / steps)
            best_engine = min(best_engine, _timed(engine_round, dev)[0] / steps)
    return {"agents": base.topology.n_agents, "algorithm": base.algorithm.name,
            "params": engine.layout.size, "runner steps/s": 1 / best_runner,
            "engine steps/s": 1 / best_engine, "runner / engine": best_engine / best_runner}


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


def check_args(args) -> list[tuple[str, tuple[int, ...]]]:
    """The bench's options checked before anything runs (a ConfigError names the bad one); its (model, shape)s."""
    from crossgrad.devices import resolve_device

    for opt, low in (("agents", 2), ("batch", 1), ("steps", 1), ("repeats", 1), ("threads", 1)):
        value = getattr(args, opt)
        if value is not None and value < low:
            raise ConfigError(f"--{opt} must be >= {low}, not {value}")
    if not args.scaling_window > 0:
        raise ConfigError(f"--scaling-window must be a positive number of seconds, not {args.scaling_window}")
    sizes = args.scaling.split(",") if args.scaling else []
    if not all(v.strip().isdigit() and int(v) >= 2 for v in sizes):
        raise ConfigError(f"--scaling takes agent counts >= 2 separated by commas (8,16,32), not {args.scaling!r}")
    resolve_device(args.device, "--device")
    return [parse_model_spec(spec, "--models") for spec in args.models.split(",")]


def parse_model_spec(spec: str, option: str) -> tuple[str, tuple[int, ...]]:
    """A name:CxHxW model entry as (name, input shape), checked by building the model (a ConfigError names it)."""
    name, _, shape = spec.partition(":")
    dims = shape.split("x")
    if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise ConfigError(f"{option} takes name:CxHxW entries (e.g. lenet5:1x28x28), not {spec!r}")
    input_shape = tuple(int(d) for d in dims)
    try:
        bench_model(name, input_shape)
    except ValueError as e:  # an unknown model, or one that does not fit the input
        raise ConfigError(f"{option} {spec!r}: {e}") from None
    return name, input_shape


def main(argv: list[str] | None = None) -> int:
    """`crossgrad bench`: throughput vs bound per algorithm, overheads, and a scaling table."""
    import argparse
    import platform

    p = argparse.ArgumentParser(prog="crossgrad bench", description=main.__doc__)
    p.add_argument("--models", default="lenet5:1x28x28,cnn5:3x32x32",
                   help="comma-separated name:CxHxW (default: %(default)s)")
    p.add_argument("--agents", type=int, default=16,
                   help="agents on a ring for the per-algorithm table (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="minibatch size per agent (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds of simulator and bound, alternating; ratio: the median over the rounds")
    p.add_argument("--algorithms", default=",".join(BENCH_ALGORITHMS),
                   help="comma-separated labels to time (default: all of %(default)s)")
    p.add_argument("--scaling", default="8,16,32,64,128,256", help="agent counts for the scaling table ('' skips)")
    p.add_argument("--scaling-topologies", default="ring,exponential",
                   help="comma-separated topologies of the scaling table (default: %(default)s)")
    p.add_argument("--scaling-window", type=float, default=10.0,
                   help="seconds each scaling size is timed for (the same for every size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to time on (default: %(default)s)")
    p.add_argument("--evaluator", default="auto", choices=["auto", "loop", "vmap"],
                   help="how gradients are evaluated: loop over (model, batch) pairs (CPU), vmap them "
                        "with torch.func (GPU), or auto by device (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--runner", action="store_true",
                   help="time `crossgrad run` against the engine alone instead (--set, --runner-steps apply)")
    p.add_argument("--runner-steps", type=int, default=10, help="steps of the shorter of the two timed runs")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config overrides for --runner, after its defaults: " + " ".join(RUNNER_SETTINGS))
    args = p.parse_args(argv)
    models = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.runner:
        row = runner_vs_engine([*RUNNER_SETTINGS, *args.sets], steps=args.runner_steps, repeats=args.repeats,
                               device=args.device)
        print(f"runner vs engine, device {args.device}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        print(format_rows([row]))
        return 0
    unknown = [a for a in args.algorithms.split(",") if a not in BENCH_ALGORITHMS]
    if unknown:
        p.error(f"unknown algorithm label(s) {unknown}; choose from {list(BENCH_ALGORITHMS)}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {args.device}, torch {torch.__version__}")
    for name, input_shape in models:
        shape = "x".join(map(str, input_shape))
        rows = throughput_table(name, input_shape, n=args.agents, batch=args.batch, steps=args.steps,
                                repeats=args.repeats, algorithms=args.algorithms.split(","), device=args.device,
                                evaluator=args.evaluator)
        print(f"\n{name} {shape}, {args.agents} agents on a ring, batch {args.batch} per agent (ratio = simulator "
              f"samples/s / bound samples/s, median over {args.repeats} pairs of rounds; % = share of step time)")
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
