"""Products of a mixing matrix with agents' rows that are the same bit for bit however the agents are placed.

The engine's gossip (x_half = G x) and Choco's consensus step (x + M x̂) each compute, for every local agent,
a weighted sum of rows of other agents. Summed in an order, or by a kernel, that depends on which agents
share a process, float32 results drift apart between the simulator and torch.distributed (and between two
process counts). `MixingProduct` computes every local agent's row from a pool of the rows it needs in
global agent order, with the same kernel on every layout:

- up to DENSE_MAX_AGENTS agents, one dense product M [m, K] x pool [K, P] over the m local agents' rows and
  the K agents they read (all n in-process). BLAS adds each output's terms one after the other in column
  order, and a term a row does not have is a zero that leaves its sum as it is, so a row's result does not
  depend on which other rows and columns the product holds: measured bit for bit over n = 2..64, every
  block, P from 2 to 61,706 (MKL, 1 and 2 threads). Two shapes take other kernels and are avoided: a single
  row (m = 1: padded with a zero row) and a single column (P = 1, SGP's weights: padded with a zero
  column); and an added base (Choco's x) is added after the product, not inside it (measured to differ
  for a padded single row);
- beyond, a sparse CSR product over the local rows and the same pool: each row adds its terms in
  increasing column order, which is global agent order on every layout.

tests/test_layouts.py checks every algorithm family on 1, 2 and 3 processes, bit for bit.
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
    (in the order given) and the result cast to `dtype`. `pool_agents`: the agents whose rows the product
    reads (ascending): every agent the local ones are or read.
    """

    def __init__(self, n: int, local: Sequence[int], rows: Tensor, cols: Tensor, values: Tensor,
                 pool_agents: Tensor, dtype: torch.dtype):
        dev = values.device
        self.n, self.m = n, len(local)
        self.pool_agents = pool_agents.to(dev)
        column = torch.full((n,), -1, dtype=torch.long, device=dev)
        column[self.pool_agents] = torch.arange(len(pool_agents), device=dev)
        rows, cols = rows.to(dev), column[cols.to(dev)]
        shape = (self.m, len(pool_agents))
        if n <= DENSE_MAX_AGENTS:
            # a single row would take BLAS's matrix-vector kernel: a zero row makes it the matrix product's
            M = torch.zeros(max(self.m, 2), shape[1], dtype=values.dtype, device=dev)
            M.index_put_((rows, cols), values, accumulate=True)
            self.M = M.to(dtype)
            return
        # straight from the entries, never through a dense [n, n] block: a lossy step (network.py) builds its
        # own M, and at 4,096 agents the dense block cost more than the step's gossip. Zeros dropped, columns
        # sorted within each row, repeats summed
        # ("sparse CSR support is in beta", "invariant checks are disabled": built and used for products only)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            M = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, device=dev).coalesce()
            keep = M.values() != 0
            self.M = torch.sparse_coo_tensor(M.indices()[:, keep], M.values()[keep].to(dtype), shape, device=dev,
                                             is_coalesced=True).to_sparse_csr()

    def reader(self, agents: Tensor) -> Callable[[Tensor], Tensor]:
        """What turns rows [R, P] of the agents `agents` (global indices, each once; the same every call) into
        the pool this product reads, in global agent order: the rows themselves when they already are in it."""
        agents = agents.to(self.pool_agents.device)
        if torch.equal(agents, self.pool_agents):
            return lambda rows: rows
        position = torch.full((self.n,), -1, dtype=torch.long, device=agents.device)
        position[agents] = torch.arange(len(agents), device=agents.device)
        order = position[self.pool_agents]
        return lambda rows: rows.index_select(0, order)

    def __call__(self, pool: Tensor, out: Tensor, base: Tensor | None = None) -> Tensor:
        """M pool, or base + M pool with `base` [m, P], into `out` [m, P]; pool: the rows of `pool_agents`."""
        if self.M.layout != torch.strided:
            if base is None:
                return torch.addmm(out, self.M, pool, beta=0, out=out)
            return torch.addmm(base, self.M, pool, out=out)
        if pool.shape[1] == 1:  # a single column would take the matrix-vector kernel: a zero column avoids it
            out.copy_(torch.mm(self.M, torch.cat([pool, torch.zeros_like(pool)], 1))[: self.m, :1])
        elif len(self.M) != self.m:
            out.copy_(torch.mm(self.M, pool)[: self.m])
        else:
            torch.mm(self.M, pool, out=out)
        return out if base is None else out.add_(base)
