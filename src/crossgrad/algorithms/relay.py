"""RelaySGD (Vogels, He, Koloskova, Karimireddy, Lin, Stich, Jaggi, NeurIPS 2021): exact averaging over a
spanning tree by relaying sums and counts, as the authors' code (epfml/relaysgd, `algorithms.py` and
`utils/communication.py`) runs it.

A step of agent i, with R_i[j] and c_i[j] what i received from tree neighbour j at the previous step
(0 before the first):

    v_i        = x_i - lr * T(grad f_i(x_i))             the local step (the engine's steps 3-9, momentum
                                                         and weight decay included), no gossip before it
    to each j:   m_ij = v_i + sum_{k != j} R_i[k],   c_ij = 1 + sum_{k != j} c_i[k]
    R_i[j], c_i[j] <- m_ji, c_ji                         what arrived from j
    x_i        = (v_i + sum_j R_i[j] + (n - count_i) x0) / n,   count_i = 1 + sum_j c_i[j]

x0 is the initial model: it stands in for the agents whose contributions have not arrived yet (the fill
vanishes once count_i = n, after diameter - 1 steps). relay="grad" is RelaySum/Grad: v_i is the update
x_i^{t+1/2} - x_i^t, nothing fills in, and x_i += (v_i + sum_j R_i[j]) / n. On several trees (double binary
trees) tree t relays the coordinates t, t + K, t + 2K, ... of the K trees, with its own messages and counts.

Every edge carries its own message (a row and a count each way), sent by `exchange_edges` after the
local step; there is no round 1, so all of relaysgd's bytes are in the per-edge column (round 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from crossgrad.algorithms.base import Algorithm, CombineContext, ConfigError, StepView, nothing_received
from crossgrad.comm.base import Comm, EdgePlan
from crossgrad.topology.trees import Pairs, relay_trees
from crossgrad.transforms import _load_rows

#: what the refusal of another graph proposes
ACCEPTED = "chain, binary_tree, double_binary_trees, star, or any tree given as edges"


def _directed(pairs: Pairs) -> list[tuple[int, int]]:
    return sorted({e for a, b in pairs for e in ((a, b), (b, a))})


@dataclass
class RelayState:
    """What each tree's relay keeps, per tree t (lists in tree order), saved and restored with the run.

    received[t]: [E_t, C_t] the message that arrived on each of the local agents' edges of tree t at the
    previous step (in the tree's edge order: by local agent, then neighbour), C_t its coordinates;
    counts[t]: [E_t] int64, their counts. x0: [P] the initial model (the fill of relay="model"; empty
    for "grad"), taken at the first step. steps: the steps made. trees: each tree's undirected pairs;
    owners[t]: [E_t] the local agent at each edge of tree t (its receiving end, which is also the sending
    end of the message back); senders[t]: [E_t] the agent at its other end; comms: each tree's Comm, made
    from the engine's at the first step. trees, owners, senders and comms follow from the graph and are not
    saved.
    """

    received: list[Tensor]
    counts: list[Tensor]
    x0: Tensor
    trees: list[Pairs]
    owners: list[Tensor]
    senders: list[Tensor]
    steps: int = 0
    comms: list[Comm] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"received": [r.clone() for r in self.received], "counts": [c.clone() for c in self.counts],
                "x0": self.x0.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["received"]) != len(self.received):
            raise ValueError(f"checkpoint relays over {len(state['received'])} trees, this run over "
                             f"{len(self.received)}")
        for mine, theirs in zip(self.received, state["received"]):
            _load_rows(mine, theirs, "RelaySGD received messages")
        for mine, theirs in zip(self.counts, state["counts"]):
            _load_rows(mine, theirs, "RelaySGD received counts")
        _load_rows(self.x0, state["x0"], "RelaySGD initial model")
        self.steps = int(state["steps"])

    def counters(self) -> dict[str, int]:
        return {}


@dataclass
class RelaySGD(Algorithm):
    """RelaySGD over the spanning tree(s) of the topology; relay: "model" (RelaySum/Model, the paper's
    RelaySGD) or "grad" (RelaySum/Grad: relay the update, apply the average).

    The local step is Nesterov SGD by default, as in the authors' code; weight decay is inside the gradient.
    There is no gossip, so gamma (fixed at 1) and W play no part, and QGM is refused (it is a gossip method's
    momentum); the topology must be a tree or the double binary trees.
    """

    relay: str = "model"

    name: ClassVar[str] = "relaysgd"
    gamma_schedule_refusal: ClassVar[str | None] = "it does not gossip, so it has no averaging rate to schedule"
    loss_refusal: ClassVar[str | None] = (
        "every message carries the relayed sum of all the agents beyond its edge, so one lost message drops "
        "their contributions from the receiver's average and from every sum it relays on; use dsgd or ngc")
    local_steps_refusal: ClassVar[str | None] = (
        "its relay sends every agent's contribution along the tree one hop per step, so a step without the "
        "messages would stall the sums and counts in flight")

    def validate(self) -> None:
        super().validate()
        if self.relay not in ("model", "grad"):
            raise ConfigError(f"relay must be 'model' (RelaySum/Model, RelaySGD) or 'grad' (RelaySum/Grad), "
                              f"not {self.relay!r}")
        if self.gamma != 1:
            raise ConfigError(f"relaysgd takes no gamma (got {self.gamma:g}): it does not gossip, it averages "
                              "exactly over a tree; leave gamma at 1")
        if self.qgm:
            raise ConfigError("relaysgd takes no qgm: quasi-global momentum corrects gossip's averaging, and "
                              "relaysgd averages exactly; use momentum (local Nesterov momentum, as the authors)")

    def check_topology(self, topology: Any) -> None:
        if relay_trees(topology) is None:
            raise ConfigError(f"relaysgd relays over a spanning tree, and the {topology.name} topology is not one "
                              f"(nor the double binary trees); use {ACCEPTED}")

    def check_mixing(self, topology: Any) -> None:
        """W is never used: any weights will do."""

    def init_state(self, ctx: CombineContext, device: torch.device) -> RelayState:
        trees = relay_trees(ctx.topology)
        assert trees is not None  # check_topology refused the rest
        # the plans the trees' comms will have (EdgePlan.build is what every backend orders its edges with)
        plans = [EdgePlan.build(_directed(t), ctx.plan.n, ctx.plan.local) for t in trees]
        for plan in plans:  # undirected: in-edge e and out-edge e join the same two agents
            assert torch.equal(plan.in_dst, plan.out_src) and torch.equal(plan.in_src, plan.out_dst)
        P, K = ctx.layout.size, len(trees)
        sizes = [len(range(t, P, K)) for t in range(K)]
        return RelayState(
            received=[torch.zeros(len(p.in_src), c, dtype=ctx.dtype, device=device) for p, c in zip(plans, sizes)],
            counts=[torch.zeros(len(p.in_src), dtype=torch.long, device=device) for p in plans],
            x0=torch.zeros(P if self.relay == "model" else 0, dtype=ctx.dtype, device=device),
            trees=trees, owners=[p.in_dst.to(device) for p in plans], senders=[p.in_src for p in plans])

    def gossip(self, ctx: CombineContext, comm: Comm, x: Tensor, out: Tensor,
               state: RelayState) -> tuple[Tensor, Tensor]:
        """No round 1: the gradient is taken at the agent's own model."""
        if state.steps == 0 and len(state.x0):  # every agent starts from the same weights
            state.x0.copy_(x[0])
        out.copy_(x)
        return nothing_received(ctx, x)

    def nonfinite_received(self, ctx: CombineContext, state: RelayState, k: int) -> str | None:
        for t, (received, owner, sender) in enumerate(zip(state.received, state.owners, state.senders)):
            for e in (owner == k).nonzero().flatten().tolist():
                if not torch.isfinite(received[e]).all():
                    tree = f" over tree {t}" if len(state.trees) > 1 else ""
                    return f"relayed message received from agent {int(sender[e])}{tree}"
        return None

    def exchange_after_update(self, ctx: CombineContext, comm: Comm, view: StepView, state: RelayState) -> None:
        x = view.x
        assert x is not None  # the engine always passes the rows before the step
        if not state.comms:
            state.comms = [comm] if len(state.trees) == 1 else [comm.restrict(_directed(t)) for t in state.trees]
        x_half, n, K = view.x_half, ctx.plan.n, len(state.trees)
        model = self.relay == "model"
        sent = x_half if model else torch.sub(x_half, x)  # what each agent contributes: model or update
        for t, (sub, owner) in enumerate(zip(state.comms, state.owners)):
            received, counts = state.received[t], state.counts[t]
            v = sent[:, t::K]
            relayed = torch.zeros_like(v).index_add_(0, owner, received)
            relayed_count = torch.zeros(len(v), dtype=torch.long, device=x.device).index_add_(0, owner, counts)
            # to neighbour j: v_i and everything received but what came from j
            message = (v + relayed).index_select(0, owner).sub_(received)
            count = (1 + relayed_count).index_select(0, owner).sub_(counts).unsqueeze(1)
            arrived, arrived_count = sub.exchange_edges((message, count))
            received.copy_(arrived)
            counts.copy_(arrived_count.squeeze(1))
            total = v.clone().index_add_(0, owner, received)
            seen = (1 + torch.zeros_like(relayed_count).index_add_(0, owner, counts)).unsqueeze(1)
            if model:  # the agents not heard from yet count as x0
                total.addcmul_((n - seen).to(total.dtype), state.x0[t::K].unsqueeze(0))
                x_half[:, t::K] = total.div_(n)
            else:
                x_half[:, t::K] = total.div_(n).add_(x[:, t::K])
        state.steps += 1
