"""Cross-gradient aggregation (CGA) and CompCGA: a per-layer QP projection of the self-gradient.

Per local agent and parameter tensor l: g = w_ii g_ii^l, M = rows w_ij g_ij^l over the received
data-variant cross-gradients (all-zero rows dropped),
    v* = argmin_v 1/2 v^T (M M^T + eps I) v + (M g)^T v   s.t.  v >= margin,
and g~^l = g + M^T v*. All (agent, layer) QPs of a step are solved in one batched call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from crossgrad.algorithms.base import CombineContext, ConfigError, CrossGradientAlgorithm, StepView, weighted_self
from crossgrad.qp import solve_box_qp


@dataclass
class CGAState:
    """The QP solution of the last step per (layer, agent), reused where a solve fails, and the failures.

    slot and kmax describe where each out-edge's message sits in its sender's padded [kmax] row; they
    follow from the graph and are not saved. kmax is the graph's largest out-degree, not the block's: the
    Gram products and the QPs then have the same shapes on every placement of the agents (their kernels
    depend on the shapes), so float32 CGA is bit-identical on all of them.
    """

    slot: Tensor
    kmax: int
    v: Tensor
    qp_failures: int = 0
    margin: float = 0.5  # the multipliers' lower bound (the padding's value), not saved

    #: v is [layers, n_local, kmax]; slot is per out-edge (Engine._agent_rows: what churn keeps per agent)
    agent_dims: ClassVar[dict[str, int | None]] = {"v": 1, "slot": None}

    def state_dict(self) -> dict[str, Any]:
        return {"v": self.v.clone(), "qp_failures": self.qp_failures}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        v = state["v"]
        if v.dim() == 3 and tuple(v.shape[:2]) == tuple(self.v.shape[:2]) and v.shape[2] < self.kmax:
            # saved when the slots were padded to the block's largest out-degree: the padding is never read
            v = torch.cat([v, v.new_full((*v.shape[:2], self.kmax - v.shape[2]), self.margin)], 2)
        if tuple(v.shape) != tuple(self.v.shape):
            raise ValueError(f"CGA state v of shape {tuple(v.shape)} does not fit this run's {tuple(self.v.shape)}")
        self.v = v.to(device=self.v.device, dtype=self.v.dtype, copy=True)
        self.qp_failures = int(state["qp_failures"])

    def counters(self) -> dict[str, int]:
        return {"qp_failures": self.qp_failures}


@dataclass
class CGA(CrossGradientAlgorithm):
    """Cross-gradient aggregation: per layer, a QP projects the own gradient to agree with the cross-gradients."""

    margin: float = 0.5
    eps: float = 1e-12

    name: ClassVar[str] = "cga"

    def validate(self) -> None:
        super().validate()
        if self.margin < 0:
            raise ConfigError(f"margin must be >= 0, not {self.margin}")
        if self.eps < 0:
            raise ConfigError(f"eps must be >= 0, not {self.eps}")

    @property
    def round2(self) -> bool:
        return True

    def check_topology(self, topology: Any) -> None:
        super().check_topology(topology)
        if callable(getattr(topology, "at", None)):
            raise ConfigError(
                f"{self.name} needs one fixed graph: where a QP solve fails it reuses the previous step's "
                "multipliers v, one per neighbour, and on a time-varying topology the neighbours change every "
                "step; use ngc or dsgd on it")

    def init_state(self, ctx: CombineContext, device: torch.device) -> CGAState:
        plan = ctx.plan
        out_src = plan.out_src.to(device)
        counts = torch.bincount(out_src, minlength=plan.n_local)
        senders = torch.tensor([s for s, _ in ctx.topology.edges], dtype=torch.long, device="cpu")
        kmax = int(torch.bincount(senders, minlength=plan.n).max()) if len(senders) else 0
        # slot of out-edge e in its sender's padded row: senders are sorted, so rank within the run
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(out_src), device=device) - starts[out_src]
        return CGAState(
            slot=slot, kmax=kmax, margin=self.margin,
            v=torch.full((ctx.layout.num_tensors, plan.n_local, kmax), self.margin, dtype=torch.float64,
                         device=device),
        )

    def combine(
        self, ctx: CombineContext, g_self: Tensor, mv: Tensor | None, dv: Tensor | None, state: CGAState,
        view: StepView | None = None,
    ) -> Tensor:
        plan, kmax = ctx.plan, state.kmax
        g = weighted_self(g_self, ctx, view)
        if kmax == 0:
            return g
        # M = diag(w) D with D the received rows: the weights are folded into the k x k systems and into
        # v instead of being multiplied into a weighted copy of all [E, P] rows
        w = torch.zeros(plan.n_local, kmax, dtype=g.dtype, device=g.device)
        w[plan.out_src, state.slot] = ctx.out_w.to(g.dtype)
        if ctx.out_k:  # out-edges are sorted by sender, kmax each: already [n, k, P]
            rows = dv.view(plan.n_local, kmax, -1)
        else:
            rows = torch.zeros(plan.n_local, kmax, g.shape[1], dtype=g.dtype, device=g.device)
            rows[plan.out_src, state.slot] = dv
        ww = (w.unsqueeze(2) * w.unsqueeze(1)).to(torch.float64)
        slices = ctx.layout.slices()
        w64 = w.to(torch.float64)
        Q, c = [], []
        for s in slices:
            # Gram matrices in the compute dtype (float32 is ample for a k x k system); the QP is float64
            m = rows[:, :, s]
            Q.append((m @ m.transpose(1, 2)).to(torch.float64) * ww)
            # M g as the row g^T M^T: the batched matrix-vector product runs ~3.5x slower on CPU (1.1M-parameter model)
            c.append(torch.bmm(g[:, s].unsqueeze(1), m.transpose(1, 2)).squeeze(1).to(torch.float64) * w64)
        Q = torch.stack(Q)  # [L, n_local, k, k]
        c = torch.stack(c)
        diag = Q.diagonal(dim1=-2, dim2=-1)
        active = diag > 0
        Q = Q + self.eps * torch.eye(kmax, dtype=Q.dtype, device=Q.device)
        L, n = Q.shape[:2]
        v, ok = solve_box_qp(Q.reshape(L * n, kmax, kmax), c.reshape(L * n, kmax), self.margin,
                             active=active.reshape(L * n, kmax))
        v, ok = v.reshape(L, n, kmax), ok.reshape(L, n)
        failed = ~ok
        if failed.any():
            state.qp_failures += int(failed.sum())
            v = torch.where(failed.unsqueeze(-1), state.v, v)
        state.v = v
        v = (torch.where(active, v, torch.zeros_like(v)) * w64).to(g.dtype)  # M^T v = D^T (w v)
        for l, s in enumerate(slices):  # added in place: a [n, 1, numel] product per tensor would be fresh memory
            g[:, s].unsqueeze(1).baddbmm_(v[l].unsqueeze(1), rows[:, :, s])
        return g


@dataclass
class CompCGA(CGA):
    """CGA with codec="sign" (scaled-sign cross-gradients with error feedback), as in CompNGC."""

    codec: str | None = "sign"

    name: ClassVar[str] = "compcga"
