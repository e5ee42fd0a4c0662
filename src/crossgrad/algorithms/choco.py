"""Choco-SGD (Koloskova, Stich, Jaggi, ICML 2019): gossip of compressed model differences.

Every agent keeps public copies x̂: its own and its in-neighbours'. The copies of one agent are the
same everywhere, since all are updated with the same compressed messages. The engine stores x after
the local step (the paper's x^{t+1/2}), so in its order a step of agent i is

    q_i  = C(x_i - x̂_i)                              round 1: q_i goes to the out-neighbours
    x̂_j += q_j                                       for i itself and every in-neighbour j
    m_i  = x_i + gamma * sum_j w_ij (x̂_j - x̂_i)      the consensus step (the gossiped rows)
    x_i  = m_i - lr * T(grad f_i(m_i))               the engine's steps 3-9, momentum included

Round 1 carries the codec's payload instead of the model, and is what its bytes count. The copies start
at the initial model (every agent starts from the same weights, so all know it and nothing is sent for
it); public_init="zero" starts them at 0 as the paper does, which costs the first steps re-sending the
model itself.

The published codes order a step gradient, local step, gossip: the loop above from its second step on,
so they are crossgrad's with a first step that sends nothing (a local step from x0):

    variant="paper"          Algorithm 1 of the paper as epfml/powergossip runs it: the recursion above
    variant="authors_code"   epfml/ChocoSGD: the consensus step with the copies as they were, then
                             q_i = C(m_i - x̂_i) of the post-consensus model, x̂_j += q_j
    variant="gossip_first"   the default: the recursion above from the first step, whose round carries
                             C(x0 - x̂0) before any local step
    overlap=true             the gradient at the rows before the gossip, applied to the gossiped ones
                             (the PowerGossip code's default, there with variant="gossip_first")
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from crossgrad.algorithms.base import Algorithm, AlgorithmState, CombineContext, ConfigError, StepView, nothing_received
from crossgrad.codecs import CODECS, SPARSE_CODECS, Codec, RandomK, make_codec
from crossgrad.comm.base import Comm
from crossgrad.mixing import MixingProduct
from crossgrad.transforms import _load_rows

#: the orders of a step (see the module docstring); the first is the default
VARIANTS = ("gossip_first", "paper", "authors_code")

@dataclass
class ChocoState:
    """The public copies x̂ [R, P] this block of agents keeps: the local agents' own first, in order, then
    those of the other agents they receive from, ascending (the pool order of Comm.exchange_payload).

    codec: the compressor; steps: the steps made (random-k's draw); mixing: gamma (W - I) as a product
    over the copies (`consensus_product`), built at the first round and not saved (it follows from the
    graph); scratch: variant="authors_code"'s block for the compressed difference, [n_local, P], not saved.
    """

    x_hat: Tensor
    codec: Codec
    steps: int = 0
    mixing: MixingProduct | None = None
    scratch: Tensor | None = None
    #: whose copy each row of x_hat is (copy_agents), not saved
    agents: Tensor | None = None
    #: x_hat as the pool `mixing` reads (MixingProduct.reader), built with it and not saved
    pool: Callable[[Tensor], Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"x_hat": self.x_hat.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load_rows(self.x_hat, state["x_hat"], "Choco public copies")
        self.steps = int(state["steps"])

    def counters(self) -> dict[str, int]:
        return {}


def copy_agents(ctx: CombineContext, device: torch.device) -> Tensor:
    """Whose public copy each row of x̂ is, in Comm.exchange_payload's pool order: the local agents in order,
    then the other agents they receive from, ascending."""
    local = list(ctx.plan.local)
    others = sorted(set(ctx.plan.in_src.tolist()) - set(local))
    return torch.tensor(local + others, dtype=torch.long, device=device)


def pool_index(ctx: CombineContext, device: torch.device) -> Tensor:
    """In-edge e's sender as a row of the copies (copy_agents' order): what the exchange returns, known
    before any exchange."""
    row = {int(g): k for k, g in enumerate(copy_agents(ctx, torch.device("cpu")))}
    return torch.tensor([row[g] for g in ctx.plan.in_src.tolist()], dtype=torch.long, device=device)


def consensus_product(ctx: CombineContext, gamma: float, dtype: torch.dtype, device: torch.device) -> MixingProduct:
    """M with (M x̂)_i = gamma * sum_j w_ij (x̂_j - x̂_i) for every local agent i, as a `MixingProduct` over
    the copies in global agent order (the same product on every placement of the agents).

    M's entries are formed in float64 and rounded once: gamma w_ij per in-edge, and on the diagonal minus
    their sum, added in in-edge order (by sender), which is the same on every layout.
    """
    plan = ctx.plan
    n = plan.n_local
    w = ctx.in_w.to(device=device, dtype=torch.float64) * gamma
    own = torch.arange(n, device=device)
    diagonal = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, plan.in_dst.to(device), w)
    local = torch.tensor(plan.local, dtype=torch.long, device=device)
    rows = torch.cat([plan.in_dst.to(device), own])
    cols = torch.cat([plan.in_src.to(device), local])
    return MixingProduct(plan.n, plan.local, rows, cols, torch.cat([w, -diagonal]), plan.pool_agents, dtype)


@dataclass
class Choco(Algorithm):
    """Choco-SGD: compressed gossip of x - x̂ with consensus step size gamma (0 < gamma <= 1).

    codec: the compressor C ("sign": scaled sign, "top-k", "random-k", "identity": no compression,
    which makes Choco DSGD); ratio: the fraction of each parameter tensor's entries top-k and random-k
    keep (unused by the others); public_init: where the public copies start, "model" (the initial
    weights) or "zero" (the paper's). Compression needs gamma well below 1 (the paper's theory: of the
    order of the codec's contraction times the spectral gap); the default 0.5 suits the sign codec.
    variant: "gossip_first", "paper" or "authors_code" (the module docstring); overlap: the gradient at
    the rows before the gossip.
    """

    gamma: float = 0.5
    codec: str = "sign"
    ratio: float = 0.01
    public_init: str = "model"
    variant: str = "gossip_first"
    overlap: bool = False

    name: ClassVar[str] = "choco"
    gamma_schedule_refusal: ClassVar[str | None] = (
        "its gamma is its consensus step size, tuned to the codec's contraction, not an averaging rate that can "
        "grow to 1")
    loss_refusal: ClassVar[str | None] = (
        "each receiver updates its public copy of a neighbour with the compressed differences it receives, so "
        "one lost difference leaves that copy out of step with the sender's own for the rest of the run; use "
        "dsgd, ngc or compngc")

    def validate(self) -> None:
        super().validate()
        if self.codec not in CODECS:
            raise ConfigError(f"choco's codec must be one of {', '.join(sorted(CODECS))}, not {self.codec!r}")
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio (the fraction of entries top-k and random-k keep) must be in (0, 1], "
                              f"not {self.ratio}")
        if self.public_init not in ("model", "zero"):
            raise ConfigError(f"public_init must be 'model' (the initial weights) or 'zero' (the paper's), "
                              f"not {self.public_init!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"choco's variant must be one of {', '.join(repr(v) for v in VARIANTS)}, "
                              f"not {self.variant!r}")

    def check_topology(self, topology: Any) -> None:
        if callable(getattr(topology, "at", None)):
            raise ConfigError(
                "choco needs one fixed graph: an agent's public copy of a neighbour is built up from every "
                "compressed difference that neighbour has sent, so a neighbour that appears mid-run has no copy "
                "to start from (and one that leaves stops being tracked); use dsgd or gt on time-varying graphs")

    def init_state(self, ctx: CombineContext, device: torch.device) -> ChocoState:
        senders = torch.tensor(ctx.plan.local, dtype=torch.long, device=device)  # random-k draws per sender
        codec = make_codec(self.codec, ctx.layout, ratio=self.ratio if self.codec in SPARSE_CODECS else None,
                           streams=senders)
        copies = copy_agents(ctx, device)
        x_hat = torch.zeros(len(copies), ctx.layout.size, dtype=ctx.dtype, device=device)
        return ChocoState(x_hat=x_hat, codec=codec, agents=copies)

    def gossip(self, ctx: CombineContext, comm: Comm, x: Tensor, out: Tensor,
               state: ChocoState) -> tuple[Tensor, Tensor]:
        n, x_hat = len(x), state.x_hat
        if state.steps == 0 and self.public_init == "model":  # every agent starts from the same weights: row 0's
            x_hat.copy_(x[:1].expand_as(x_hat))
        if state.steps == 0 and self.variant != "gossip_first":  # the published first step: a local step alone
            state.steps += 1
            out.copy_(x)
            return nothing_received(ctx, x)
        if state.mixing is None:
            state.mixing = consensus_product(ctx, self.gamma, x.dtype, x.device)
            state.pool = state.mixing.reader(state.agents)
        mixing, copies = state.mixing, state.pool
        if self.variant == "authors_code":  # the consensus step with the copies as they were, then its model is sent
            mixing(copies(x_hat), out, base=x)
            if state.scratch is None:
                state.scratch = torch.empty_like(x)
            diff = torch.sub(out, x_hat[:n], out=state.scratch)
        else:
            diff = torch.sub(x, x_hat[:n], out=out)  # `out` is scratch until it receives m
        if isinstance(state.codec, RandomK):
            state.codec.draw = state.steps
        state.steps += 1
        payload, own = state.codec.encode_roundtrip(diff, out=diff)
        pool, index = comm.exchange_payload(payload)
        x_hat[:n] += own  # the sender's roundtrip is what its receivers decode, bit for bit
        if len(x_hat) > n:
            x_hat[n:] += state.codec.decode(tuple(t[n:] for t in pool), x.dtype)
        if self.variant != "authors_code":
            mixing(copies(x_hat), out, base=x)
        return x_hat, index

    def gradient_rows(self, ctx: CombineContext, view: StepView, state: AlgorithmState) -> Tensor:
        return view.x if self.overlap else view.x_half
