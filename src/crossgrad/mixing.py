"""Products of a mixing matrix with agents' rows that are the same bit for bit however the agents are placed.

The engine's gossip (x_half = G x) and Choco's consensus step (x + M x̂) each compute, for every local agent,
a weighted sum of rows of other agents. Summed in an order, or by a kernel, that depends on which agents
share a process, float32 results drift apart between the simulator and torch.distributed (and between two
process counts). `MixingProduct` runs the same product on the same numbers on every layout:

- up to DENSE_MAX_AGENTS agents, one dense [n, n] x [n, P] product: the matrix has a row per agent of the
  graph (zero for agents held elsewhere) and the pool a row per agent (zero for agents neither held nor
  heard from). A row of the product depends on that row of the matrix alone, but BLAS picks its kernel by
  the matrix sizes (a block of one agent, [1, n], takes another kernel than [n, n]), so every process
  uses the graph's sizes;
- beyond, a sparse CSR product over the local rows and a pool of the rows they need in global agent order:
  each row adds its terms in increasing column order, which is global agent order on every layout.

The dense product over all n rows costs a process holding a block of m agents n / m times its share of the
gossip's multiply-adds (tiny next to the gradients at these n); the simulator holds every agent and pays
nothing extra.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: up to this many agents the product is one dense [n, n] x [n, P] product (the fastest at these sizes: one
#: read of the rows, one write of the result); beyond, a sparse one, whose cost grows with the edges, not n^2
DENSE_MAX_AGENTS = 64


class MixingProduct:
    """out = M pool (or base + M pool) for the local agents `local` (global indices, ascending) of n.

    M's entries are (row: local index, column: global agent, value), repeats summed in the values' dtype
    (in the order given) and the result cast to `dtype`. `pool_agents`: the agents whose rows a sparse
    product reads (ascending); a dense one reads a row per agent of the graph.
    """

    def __init__(self, n: int, local: Sequence[int], rows: Tensor, cols: Tensor, values: Tensor,
                 pool_agents: Tensor, dtype: torch.dtype):
        dev = values.device
        self.n, self.full = n, n <= DENSE_MAX_AGENTS
        local_t = torch.tensor(list(local), dtype=torch.long, device=dev)
        rows, cols = rows.to(dev), cols.to(dev)
        #: the local agents' rows of a dense product that has others (None: its rows are the local agents)
        self.rows: Tensor | None = None if tuple(local) == tuple(range(n)) else local_t
        self.pool_agents = pool_agents.to(dev)
        if self.full:
            M = torch.zeros(n, n, dtype=values.dtype, device=dev)
            M.index_put_((local_t[rows], cols), values, accumulate=True)
            self.M = M.to(dtype)
            return
        # straight from the entries, never through a dense [n, n] block: a lossy step (network.py) builds its
        # own M, and at 4,096 agents the dense block cost more than the step's gossip. Zeros dropped, columns
        # sorted within each row, repeats summed
        column = torch.full((n,), -1, dtype=torch.long, device=dev)
        column[self.pool_agents] = torch.arange(len(pool_agents), device=dev)
        shape = (len(local_t), len(pool_agents))
        # ("sparse CSR support is in beta", "invariant checks are disabled": built and used for products only)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            M = torch.sparse_coo_tensor(torch.stack([rows, column[cols]]), values, shape, device=dev).coalesce()
            keep = M.values() != 0
            self.M = torch.sparse_coo_tensor(M.indices()[:, keep], M.values()[keep].to(dtype), shape, device=dev,
                                             is_coalesced=True).to_sparse_csr()

    def reader(self, agents: Tensor) -> Callable[[Tensor], Tensor]:
        """What turns rows [R, P] of the agents `agents` (global indices, each once; the same every call) into
        the pool this product reads: the rows themselves when they already are in its order (in-process)."""
        agents = agents.to(self.pool_agents.device)
        if self.full:
            if torch.equal(agents, torch.arange(self.n, device=agents.device)):
                return lambda rows: rows
            return lambda rows: rows.new_zeros(self.n, rows.shape[1]).index_copy_(0, agents, rows)
        if torch.equal(agents, self.pool_agents):
            return lambda rows: rows
        position = torch.full((self.n,), -1, dtype=torch.long, device=agents.device)
        position[agents] = torch.arange(len(agents), device=agents.device)
        order = position[self.pool_agents]
        return lambda rows: rows.index_select(0, order)

    def __call__(self, pool: Tensor, out: Tensor, base: Tensor | None = None) -> Tensor:
        """M pool, or base + M pool with `base` [n_local, P], into `out` [n_local, P]."""
        if self.M.layout != torch.strided:
            if base is None:
                return torch.addmm(out, self.M, pool, beta=0, out=out)
            return torch.addmm(base, self.M, pool, out=out)
        if self.rows is None:
            return torch.mm(self.M, pool, out=out) if base is None else torch.addmm(base, self.M, pool, out=out)
        if base is None:
            whole = torch.mm(self.M, pool)
        else:  # the graph's shape for the added rows too: BLAS adds them inside the product
            whole = torch.addmm(pool.new_zeros(self.n, pool.shape[1]).index_copy_(0, self.rows, base), self.M, pool)
        return torch.index_select(whole, 0, self.rows, out=out)
