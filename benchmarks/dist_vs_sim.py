"""Steps/s of the torch.distributed backend (one process per agent, gloo) vs the in-process simulator.

    python benchmarks/dist_vs_sim.py [--agents 4] [--steps 20] [--model lenet5]

Both run the same engine on the same model, batch size (32 per agent) and ring topology. The
distributed run uses one torch thread per process; the simulator uses torch's default threads.
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
from crossgrad.models import make_model

SHAPE = (1, 28, 28)


def batches(n: int, steps: int):
    g = torch.Generator().manual_seed(0)
    return [[(torch.randn(32, *SHAPE, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(n)]
            for _ in range(steps)]


def worker(rank: int, world: int, port: int, model_name: str, algo: str, steps: int, out: str) -> None:
    from crossgrad.distributed import make_engine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    engine = make_engine(make_model(model_name, input_shape=SHAPE), cg.Topology.ring(world),
                         cg.make_algorithm(algo, lr=0.01, momentum=0.9, nesterov=True))
    data = batches(world, steps + 2)
    for t in range(2):
        engine.step([data[t][rank]])
    dist.barrier()
    start = time.perf_counter()
    for t in range(steps):
        engine.step([data[t + 2][rank]])
    dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(steps / (time.perf_counter() - start)))
    dist.destroy_process_group()


def dist_steps_per_s(world: int, model_name: str, algo: str, steps: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "rate")
    mp.start_processes(worker, args=(world, port, model_name, algo, steps, out), nprocs=world,
                       start_method="spawn")
    return float(open(out).read())


def sim_steps_per_s(world: int, model_name: str, algo: str, steps: int) -> float:
    torch.manual_seed(0)
    sim = cg.Simulator(make_model(model_name, input_shape=SHAPE), cg.Topology.ring(world),
                       cg.make_algorithm(algo, lr=0.01, momentum=0.9, nesterov=True))
    data = batches(world, steps + 2)
    for t in range(2):
        sim.step(data[t])
    start = time.perf_counter()
    for t in range(steps):
        sim.step(data[t + 2])
    return steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default="lenet5")
    args = p.parse_args()
    print(f"{args.model} {SHAPE}, {args.agents} agents on a ring, batch 32 per agent, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    print("algorithm | simulator steps/s | distributed (gloo) steps/s | dist / sim")
    for algo in ("dsgd", "ngc", "compngc"):
        s = sim_steps_per_s(args.agents, args.model, algo, args.steps)
        d = dist_steps_per_s(args.agents, args.model, algo, args.steps)
        print(f"{algo:9s} | {s:17.2f} | {d:26.2f} | {d / s:.2f}")


if __name__ == "__main__":
    main()
