"""What float32 gossip identical on every layout costs a process holding a block of agents (issue 29 item 4).

    python benchmarks/layout_cost.py [--agents 16] [--sizes 61706,1112394] [--blocks 8,4,2,1] [--repeats 15]

The local computation of a torch.distributed rank's gossip for a block of m of n agents on a ring (the
messages themselves are the same before and after), one torch thread, median ms of interleaved repeats:

  before   the rows per in-edge gathered from round 1's pool, x_half = w_ii x + (one batched product over each
           agent's k in-edge rows): another kernel and order than the simulator's, so float32 drifted;
  after    one dense product over round 1's pool in global agent order, G [m, K] x pool [K, P] (K: the agents
           the block holds or hears from), as the simulator's G [n, n] x x (crossgrad.mixing.MixingProduct;
           a block of one agent is padded to two rows).

The simulator (m = n) runs the same product over x as before the change and is not timed here (see
`crossgrad bench`). P: 61,706 is lenet5, 1,112,394 cnn5-1m.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from crossgrad.algorithms.base import add_weighted_edges
from crossgrad.comm.base import EdgePlan
from crossgrad.mixing import MixingProduct
from crossgrad.topology import Topology


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--sizes", default="61706,1112394")
    ap.add_argument("--blocks", default="8,4,2,1")
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(1)
    n, topo = a.agents, Topology.ring(a.agents)
    print(f"{n} agents on a ring, float32, 1 thread, median of {a.repeats} interleaved repeats (ms)")
    print("| P | block of m agents | before | after | after / before |")
    print("|---|---|---|---|---|")
    for size in [int(s) for s in a.sizes.split(",")]:
        x_all = torch.randn(n, size)
        for m in [int(b) for b in a.blocks.split(",")]:
            ms = measure(x_all, topo, m, a.repeats)
            print(f"| {size:,} | {m} | {ms['before']:.2f} | {ms['after']:.2f} | {ms['after'] / ms['before']:.2f} |")


def measure(x_all: torch.Tensor, topo: Topology, m: int, repeats: int) -> dict[str, float]:
    """Median ms of the two gossips of the block of agents 0..m-1, in interleaved repeats."""
    n, size = x_all.shape
    plan = EdgePlan.build(topo.edges, n, list(range(m)))
    gossip_self = torch.full((m,), 1 / 3)
    gossip_in = torch.full((len(plan.in_src),), 1 / 3)
    rows = torch.cat([torch.arange(m), plan.in_dst])
    cols = torch.cat([torch.tensor(plan.local), plan.in_src])
    product = MixingProduct(n, plan.local, rows, cols, torch.cat([gossip_self, gossip_in]), plan.pool_agents,
                            torch.float32)
    pool = x_all[plan.pool_agents].clone()  # what round 1 received, in agent order
    index = torch.searchsorted(plan.pool_agents, plan.in_src)
    x, out = x_all[:m].clone(), torch.empty(m, size)
    k = len(plan.in_src) // m

    def before() -> None:
        received = pool.index_select(0, index)
        torch.mul(x, gossip_self.unsqueeze(1), out=out)
        add_weighted_edges(out, received, plan.in_dst, gossip_in, k, alpha=1.0)

    def after() -> None:
        product(pool, out)

    times: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(repeats):
        for key, fn in ((("before", before), ("after", after)) if r % 2 == 0 else
                        (("after", after), ("before", before))):
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: 1e3 * statistics.median(v) for key, v in times.items()}


if __name__ == "__main__":
    main()
