"""Steps/s of the torch.distributed backend (one process per agent, gloo) vs the in-process simulator.

    python benchmarks/dist_vs_sim.py [--agents 4] [--steps 20] [--rounds 3] [--model lenet5]

Both run the same engine on the same model, batch size (32 per agent) and ring topology. The
distributed run uses one torch thread per process; the simulator runs with torch's default
number of threads and with one. Each figure is the best of `--rounds` timed blocks of `--steps`
steps (after 2 warm-up steps), so that a burst of background load on a shared machine does not
decide the result.
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import crossgrad as cg

SHAPE = (1, 28, 28)
BATCH = 32
ALGOS = {
    "dsgd": dict(momentum=0.9, nesterov=True),
    "ngc": dict(alpha=1.0, momentum=0.9, nesterov=True),
    "compngc": dict(alpha=1.0, momentum=0.9, nesterov=True),
    "cga": dict(momentum=0.9),
}


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    try:
        from crossgrad.models import make_model

        return make_model(name, input_shape=SHAPE)
    except (ImportError, ValueError, KeyError):  # no model registry: a lenet-sized stand-in
        nn = torch.nn
        return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
                             nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def batches(n: int, steps: int):
    g = torch.Generator().manual_seed(0)
    return [[(torch.randn(BATCH, *SHAPE, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
             for _ in range(n)] for _ in range(steps)]


def best_rate(step, data, steps: int, rounds: int, sync=lambda: None) -> float:
    for t in range(2):  # warm-up
        step(data[t])
    best = 0.0
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for t in range(steps):
            step(data[2 + t])
        sync()
        best = max(best, steps / (time.perf_counter() - start))
    return best


def worker(rank: int, world: int, port: int, model_name: str, algo: str, steps: int, rounds: int, out: str) -> None:
    from crossgrad.distributed import make_engine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    engine = make_engine(build_model(model_name), cg.Topology.ring(world),
                         cg.make_algorithm(algo, lr=0.01, **ALGOS[algo]), timeout=120)
    data = [[b[rank]] for b in batches(world, steps + 2)]
    rate = best_rate(engine.step, data, steps, rounds, sync=dist.barrier)
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(rate))
    dist.destroy_process_group()


def dist_steps_per_s(world: int, model_name: str, algo: str, steps: int, rounds: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "rate")
    mp.start_processes(worker, args=(world, port, model_name, algo, steps, rounds, out), nprocs=world,
                       start_method="spawn")
    return float(open(out).read())


def sim_steps_per_s(world: int, model_name: str, algo: str, steps: int, rounds: int, threads: int) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sim = cg.Simulator(build_model(model_name), cg.Topology.ring(world),
                           cg.make_algorithm(algo, lr=0.01, **ALGOS[algo]))
        return best_rate(sim.step, batches(world, steps + 2), steps, rounds)
    finally:
        torch.set_num_threads(before)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="lenet5")
    p.add_argument("--algorithms", default=",".join(ALGOS))
    args = p.parse_args()
    threads = torch.get_num_threads()
    print(f"{args.model} {SHAPE}, {args.agents} agents on a ring, batch {BATCH} per agent, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}; best of {args.rounds} x {args.steps} steps")
    print(f"| algorithm | simulator ({threads} threads) steps/s | simulator (1 thread) steps/s "
          f"| distributed ({args.agents} gloo processes x 1 thread) steps/s | dist / best sim |")
    print("|---|---|---|---|---|")
    for algo in args.algorithms.split(","):
        s = sim_steps_per_s(args.agents, args.model, algo, args.steps, args.rounds, threads)
        s1 = sim_steps_per_s(args.agents, args.model, algo, args.steps, args.rounds, 1)
        d = dist_steps_per_s(args.agents, args.model, algo, args.steps, args.rounds)
        print(f"| {algo} | {s:.2f} | {s1:.2f} | {d:.2f} | {d / max(s, s1):.2f} |", flush=True)


if __name__ == "__main__":
    main()
