"""Where a DSGD step's time goes on a parameter-heavy model, and the best ratio any engine could reach.

    python benchmarks/step_floor.py [--model cnn5-1m:3x8x8] [--agents 16] [--threads 1] [--repeats 7]

Times, in alternating rounds on the same data (median ms per step):
  bound        `crossgrad bench`'s bound: the step's passes on ONE model (nothing else);
  rows         the same passes with each agent's parameters read from its own row of x (no copy);
  rows + copy  and each gradient copied into its row of the [n, P] block, as the engine's loop does;
  gossip, update, check   the engine's other phases alone (x_half = G x; Nesterov momentum fused with
               the step; the finiteness check's row sums);
  step         a whole engine step.
The last line is the ratio bound / (rows + gossip + update): what an engine with no overhead at all
beyond one gossip product and the fused update would reach against the bound.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from crossgrad.algorithms import ConfigError, make_algorithm
from crossgrad.bench import BoundLoop, _batches, bench_model, parse_model_spec
from crossgrad.simulator import Simulator
from crossgrad.topology import make_topology


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn5-1m:3x8x8")
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    try:
        for opt, low in (("agents", 2), ("batch", 1), ("threads", 1), ("repeats", 1)):
            if getattr(a, opt) < low:
                raise ConfigError(f"--{opt} must be >= {low}, not {getattr(a, opt)}")
        name, shape = parse_model_spec(a.model, "--model")
    except ConfigError as e:
        print(f"step_floor: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    torch.set_num_threads(a.threads)
    n = a.agents
    batches = _batches(n, a.batch, shape, 10, pool=2, device="cpu")
    torch.manual_seed(0)
    sim = Simulator(bench_model(name, shape), make_topology("ring", n),
                    make_algorithm("dsgd", lr=0.01, momentum=0.9, nesterov=True))
    sim.step(batches[0])
    engine = sim.engine
    torch.manual_seed(0)
    bound = BoundLoop(bench_model(name, shape), batches, n, "cpu")
    bound.run(1)
    worker, params, layout = engine.evaluate.worker, engine.evaluate.params, engine.layout
    loss_fn = torch.nn.functional.cross_entropy

    def passes(step_batches, copy: bool) -> None:
        for i in range(n):
            for p, view in zip(params, layout.views(engine.x[i])):
                p.data = view
            inputs, targets = step_batches[i]
            grads = torch.autograd.grad(loss_fn(worker(inputs), targets), params)
            if copy:
                torch.cat([g.reshape(-1) for g in grads], out=engine.grads[i])

    parts = {
        "bound": lambda b: bound.run(1),
        "rows": lambda b: passes(b, False),
        "rows + copy": lambda b: passes(b, True),
        "gossip": lambda b: engine.wiring.gossip(engine.x, out=engine._spare),
        "update": lambda b: engine.transforms.apply(engine.grads[:n], engine._spare, engine.lr),
        "check": lambda b: bool((~torch.isfinite(engine._spare.sum(1))).any()),
        "step": lambda b: sim.step(b),
    }
    times: dict[str, list[float]] = {k: [] for k in parts}
    for r in range(a.repeats):
        for key in (parts if r % 2 == 0 else reversed(parts)):
            start = time.perf_counter()
            parts[key](batches[r % 2])
            times[key].append(time.perf_counter() - start)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(f"{a.model}, {n} agents on a ring, batch {a.batch}, {a.threads} thread(s), median of {a.repeats}")
    for key, value in ms.items():
        print(f"  {key:12s} {value:8.1f} ms")
    print(f"  step / bound: {ms['bound'] / ms['step']:.3f}; "
          f"best possible (rows + gossip + update): {ms['bound'] / (ms['rows'] + ms['gossip'] + ms['update']):.3f}")


if __name__ == "__main__":
    main()
