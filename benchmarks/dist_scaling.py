"""Many agents per process on torch.distributed: steps/s and bytes on the wire per rank vs the simulator.

    python benchmarks/dist_scaling.py [--agents 64,256] [--processes 2,4] [--graphs ring,exponential]
                                      [--steps 10] [--rounds 2]

n agents in contiguous blocks over P gloo processes (one torch thread each) run NGC (alpha = 1,
both rounds) with a tiny MLP (16 -> 32 -> 10, batch 16 per agent), so that the run takes minutes
and the exchange is visible next to the gradients. The simulator runs the same engine on all n
agents in one process, with one torch thread like each distributed process. Per rank and step
the table gives the messages it sends (one per peer rank and round) and the bytes it puts on the
wire (rows bound for other ranks only); "per agent" is the simulator's counter (every edge,
in-rank ones included). Each steps/s is the best of `--rounds` timed blocks of `--steps` steps
after 2 warm-up steps: the machine may be shared, so also note its load (printed).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import crossgrad as cg

FEATURES, HIDDEN, CLASSES, BATCH = 16, 32, 10, 16


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def topology(graph: str, n: int) -> cg.Topology:
    return cg.Topology.exponential(n) if graph == "exponential" else cg.Topology.ring(n)


def algorithm():
    return cg.make_algorithm("ngc", alpha=1.0, lr=0.01, momentum=0.9, nesterov=True)


def batches(agents: list[int], steps: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Step t's minibatch of each agent in `agents`, the same whichever process draws it."""
    out = []
    for t in range(steps):
        row = []
        for a in agents:
            g = torch.Generator().manual_seed(t * 100_003 + a)
            row.append((torch.randn(BATCH, FEATURES, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)))
        out.append(row)
    return out


def best_rate(step, data, steps: int, rounds: int, sync=lambda: None) -> float:
    for t in range(2):  # warm-up
        step(data[t])
    best = 0.0
    for r in range(rounds):
        sync()
        start = time.perf_counter()
        for t in range(steps):
            step(data[2 + r * steps + t])
        sync()
        best = max(best, steps / (time.perf_counter() - start))
    return best


def worker(rank: int, world: int, port: int, graph: str, n: int, steps: int, rounds: int, out: str) -> None:
    from crossgrad.distributed import make_engine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    engine = make_engine(tiny_model(), topology(graph, n), algorithm(), timeout=300)
    total = 2 + rounds * steps
    rate = best_rate(engine.step, batches(list(engine.plan.local), total), steps, rounds, sync=dist.barrier)
    comm = engine.comm
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rate": rate, "peers": len(comm.peers), "wire": (comm.wire_bytes / total).tolist(),
                   "per_agent": (comm.bytes_sent.sum(1) / total).tolist()}, f)
    dist.destroy_process_group()


def run_dist(graph: str, n: int, world: int, steps: int, rounds: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mkdtemp()
    mp.start_processes(worker, args=(world, port, graph, n, steps, rounds, out), nprocs=world, start_method="spawn")
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


def run_sim(graph: str, n: int, steps: int, rounds: int) -> tuple[float, float]:
    torch.set_num_threads(1)
    sim = cg.Simulator(tiny_model(), topology(graph, n), algorithm())
    total = 2 + rounds * steps
    rate = best_rate(sim.step, batches(list(range(n)), total), steps, rounds)
    return rate, float(sim.stats["bytes_sent"].sum(1).mean()) / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", default="64,256")
    p.add_argument("--processes", default="2,4")
    p.add_argument("--graphs", default="ring,exponential")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    load = os.getloadavg()
    print(f"NGC alpha=1, MLP {FEATURES}-{HIDDEN}-{CLASSES} ({sum(q.numel() for q in tiny_model().parameters())} "
          f"float32 parameters), batch {BATCH} per agent; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start; torch {torch.__version__}; "
          f"best of {args.rounds} x {args.steps} steps")
    print("| graph | agents | backend | steps/s | peer ranks per rank | messages sent per rank per step "
          "| wire bytes sent per rank per step (mean, max) | bytes sent per agent per step |")
    print("|---|---|---|---|---|---|---|---|")
    for graph in args.graphs.split(","):
        for n in map(int, args.agents.split(",")):
            rate, per_agent = run_sim(graph, n, args.steps, args.rounds)
            print(f"| {graph} | {n} | simulator (1 thread) | {rate:.2f} | - | 0 | 0 "
                  f"| {per_agent:.0f} |", flush=True)
            for world in map(int, args.processes.split(",")):
                ranks = run_dist(graph, n, world, args.steps, args.rounds)
                wire = [sum(r["wire"]) for r in ranks]
                peers = [r["peers"] for r in ranks]
                rounds_used = sum(1 for b in ranks[0]["wire"] if b > 0)
                agent = sum(sum(r["per_agent"]) for r in ranks) / n
                print(f"| {graph} | {n} | {world} gloo processes | {min(r['rate'] for r in ranks):.2f} "
                      f"| {min(peers)}-{max(peers)} | {rounds_used * max(peers)} "
                      f"| {sum(wire) / world:.0f}, {max(wire):.0f} | {agent:.0f} |", flush=True)
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
