"""What every algorithm shares: hyperparameters and their defaults, validation, state, combine weights.

An algorithm *declares* what it computes and exchanges (cross-gradients or not, a second round or
not, which codec) and how it combines gradients; the engine carries that out on any backend. Each
algorithm dataclass is the one source of its hyperparameters and their defaults.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, ClassVar, Protocol, get_type_hints

import torch
from torch import Tensor

from crossgrad.codecs import CODECS
from crossgrad.comm.base import EdgePlan
from crossgrad.comm.network import Delivery, MixWeights
from crossgrad.errors import ConfigError
from crossgrad.flat import ParamLayout
from crossgrad.topology.checks import ROW_TOL
from crossgrad.transforms import _load_rows

GAMMA_SCHEDULES = ("constant", "exponential", "cosine")


@dataclass
class CombineContext:
    """Per-run constants the combine step needs, derived once from the topology and the layout.

    self_w[i]: weight of agent i's self-gradient; in_w[e]: weight of the model-variant gradient on
    in-edge e; out_w[e]: weight of the data-variant gradient arriving on out-edge e. in_k / out_k: the
    number of in- / out-edges of every agent of the graph when they all have the same (a regular graph),
    else None (even where the local agents have the same: every layout then adds with the same kernel).
    dtype: the dtype of the parameter rows, for algorithm state kept in rows (init_state).
    topology: the step's graph, for algorithms that need more of it than W (RelaySGD's spanning trees).
    """

    plan: EdgePlan
    layout: ParamLayout
    self_w: Tensor
    in_w: Tensor
    out_w: Tensor
    in_k: int | None = None
    out_k: int | None = None
    dtype: torch.dtype = torch.float32
    topology: Any = None


@dataclass(frozen=True)
class StepView:
    """What an algorithm may use of the current step beyond its gradients (see Algorithm.combine).

    x_half: the gossiped rows [n_local, P] (step 2's output); the update (step 9) lands in them in
    place. mix(rows, out=None): gossips another block of rows [n_local, P] with the step's mixing
    matrix, as step 2 does x (one more round-1 message per edge, counted), and returns the mixed rows.
    direction: a block shaped like x_half, kept across steps, that combine may write its result into
    (on a big model a fresh block of that size costs page faults on every step). x: the rows before
    this step's gossip (the stored models), for the forms that take the gradient there (DIGing, Choco's
    overlap); read-only, and dead once the step ends. mean(rows): the mean over all n agents of a block
    [n_local, P], as [1, P] (one collective under torch.distributed; not in the byte counters, which count
    messages along edges).
    """

    x_half: Tensor
    lr: float
    step: int
    mix: Callable[..., Tensor]
    direction: Tensor | None = None
    x: Tensor | None = None
    mean: Callable[[Tensor], Tensor] | None = None


def nothing_received(ctx: CombineContext, x: Tensor) -> tuple[Tensor, Tensor]:
    """What Algorithm.gossip returns for a step that sends nothing (the published forms whose first step is a
    local step alone): one finite row of zeros that every in-edge points at, so no sender is ever blamed."""
    return x.new_zeros(1, x.shape[1]), torch.zeros(len(ctx.plan.in_src), dtype=torch.long, device=x.device)


def weighted_self(g_self: Tensor, ctx: CombineContext, view: StepView | None) -> Tensor:
    """w_ii g_ii for every local agent: the start of a combined gradient, in view.direction when given."""
    w = ctx.self_w.to(g_self.dtype).unsqueeze(1)
    out = None if view is None else view.direction
    return torch.mul(g_self, w) if out is None else torch.mul(g_self, w, out=out)


def edges_per_agent(index: Tensor, n: int) -> int | None:
    """k when each of the n local agents owns exactly k of the edges in `index`, else None."""
    counts = torch.bincount(index.cpu(), minlength=n)
    return int(counts[0]) if n and bool((counts == counts[0]).all()) else None


def add_weighted_edges(out: Tensor, rows: Tensor, owner: Tensor, weights: Tensor, k: int | None,
                       alpha: float) -> None:
    """out[owner[e]] += alpha * weights[e] * rows[e] for every edge e, in place.

    Edges are grouped by owner (the plan sorts them so); with k edges per owner this is one batched
    product that reads each row once, instead of materialising the weighted [E, P] rows first.
    """
    w = weights.to(rows.dtype)
    if k:
        out.unsqueeze(1).baddbmm_(w.view(-1, 1, k), rows.reshape(-1, k, rows.shape[1]), alpha=alpha)
    elif len(owner):
        out.index_add_(0, owner, rows * w.unsqueeze(1), alpha=alpha)


def combine_weights(W: Tensor, plan: EdgePlan, mode: str, directed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Self, model-variant and data-variant weights for the local agents.

    mode "mixing" uses W; "uniform" uses pi = 1/(k+1) for every neighbour, as the reference code
    does (the two agree on regular graphs with uniform weights). On an undirected graph the
    data-variant gradient from j gets the same weight as j's model-variant gradient. On a directed
    graph the data-variant gradients arrive from out-neighbours instead; they share the weight
    1 - w_ii in proportion to the weight each out-neighbour gives agent i, which reduces to w_ij
    whenever W is symmetric.
    """
    W = W.to(torch.float64)
    if mode == "uniform":
        mask = (W > 0).to(torch.float64)
        mask.fill_diagonal_(1.0)
        W = mask / mask.sum(1, keepdim=True)
    elif mode != "mixing":
        raise ConfigError(f"weights must be 'mixing' or 'uniform', not {mode!r}")
    local = torch.tensor(plan.local, dtype=torch.long, device=plan.in_src.device)
    self_w = W[local, local]
    in_w = W[local[plan.in_dst], plan.in_src]
    if not directed:
        out_w = W[local[plan.out_src], plan.out_dst]
    else:
        given = W[plan.out_dst, local[plan.out_src]]
        total = torch.zeros(plan.n_local, dtype=torch.float64, device=given.device)
        total.index_add_(0, plan.out_src, given)
        out_w = (1 - self_w[plan.out_src]) * given / total[plan.out_src]
    return self_w, in_w, out_w


def row_reweighted(self_w: Tensor, parts: list[tuple[Tensor, Tensor, Tensor, float]]) -> tuple[Tensor, list[Tensor]]:
    """Rows over what arrived: self_w [n_local] and, per part (weights [E], arrived [E] bool, owner [E]: the
    local agent whose row each edge's weight is in, share: the part's factor in that row), the arrived
    weights, every row divided by its remaining total self_w + sum of share * arrived weights."""
    kept = [torch.where(arrived, weights, torch.zeros_like(weights)) for weights, arrived, _, _ in parts]
    total = self_w.clone()
    for k, (_, _, owner, share) in zip(kept, parts):
        total.index_add_(0, owner, k, alpha=share)
    return self_w / total, [k / total[owner] for k, (_, _, owner, _) in zip(kept, parts)]


class AlgorithmState(Protocol):
    """An algorithm's own state across steps: saved and restored with the run, and its counters."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def counters(self) -> dict[str, int]:
        """Events worth reporting (e.g. solver failures), counted since the start of the run."""
        ...


class NoState:
    """The state of an algorithm that keeps none."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"this algorithm keeps no state, but the saved one has {sorted(state)}")

    def counters(self) -> dict[str, int]:
        return {}


class RowState:
    """Base of a dataclass state made of [n_local, P] row blocks and plain values.

    Fields without a default are row blocks, made as zeros by `zeros`; `saved` names those a checkpoint
    keeps, each with the words a checkpoint of the wrong shape is refused with (the others are scratch
    within a step). Fields with a default (a flag, the last lr) are saved as they are.
    """

    saved: ClassVar[dict[str, str]] = {}

    @classmethod
    def zeros(cls, ctx: CombineContext, device: torch.device) -> Any:
        shape = (ctx.plan.n_local, ctx.layout.size)
        return cls(**{f.name: torch.zeros(shape, dtype=ctx.dtype, device=device) for f in fields(cls)
                      if f.default is MISSING})

    def _values(self) -> list[Any]:
        return [f for f in fields(self) if f.default is not MISSING]

    def state_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k).clone() for k in self.saved},
                **{f.name: getattr(self, f.name) for f in self._values()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, what in self.saved.items():
            _load_rows(getattr(self, k), state[k], what)
        for f in self._values():
            setattr(self, f.name, type(f.default)(state[f.name]))

    def counters(self) -> dict[str, int]:
        return {}


def _check_types(algo: Algorithm) -> None:
    """Every field holds a value of its declared kind, and every float is finite."""
    for name, kind in get_type_hints(type(algo)).items():
        if name not in algo.__dataclass_fields__:
            continue
        value = getattr(algo, name)
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, not {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be finite, not {value}")
        elif kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, not {value!r}")
        elif kind is str and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, not {value!r}")


@dataclass
class Algorithm:
    """Hyperparameters common to every algorithm (contract steps 2, 7, 8, 9); defaults are the paper's."""

    lr: float = 0.01
    gamma: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True
    qgm: bool = False
    weight_decay: float = 0.0
    #: the averaging rate over the run (ARS, Aketi et al. 2024): "constant" (gamma throughout),
    #: "exponential" (min(1, gamma * gamma_growth ** (e + 1)) in epoch e) or "cosine" (gamma to 1)
    gamma_schedule: str = "constant"
    gamma_growth: float = 1.01

    name: ClassVar[str] = ""
    #: computes model-variant cross-gradients (neighbour models on own data)
    cross_gradients: ClassVar[bool] = False
    #: combine weights: "mixing" (W) or "uniform" (pi = 1/(k+1)); a field on algorithms that combine
    weights: ClassVar[str] = "mixing"
    #: codec of the cross-gradient messages (with error feedback); None sends them uncompressed
    codec: ClassVar[str | None] = None
    #: with a codec, pass the self-gradient through it too (with its own error memory)
    compress_self: ClassVar[bool] = False
    #: combine builds a new [n_local, P] direction: the engine keeps a block for it (StepView.direction)
    direction_block: ClassVar[bool] = False
    #: why the method cannot make local steps without communication (training.local_steps > 1), or None
    #: when it can; the default is refusal, so a new method opts in
    local_steps_refusal: ClassVar[str | None] = (
        "its update needs every communication round (a tracked or corrected quantity goes stale between them)")
    #: the algorithm keeps its own momentum and weight decay (GUT, Momentum Tracking, DecentLaM): the engine
    #: builds no direction transforms and applies what combine returns as it is, x_half <- x_half - lr d
    #: (d is not modified, so it may be the algorithm's own state)
    own_momentum: ClassVar[bool] = False
    #: why the method cannot run when messages are lost (a lossy [network] is refused with it); None: it can
    loss_refusal: ClassVar[str | None] = None
    #: why the method's gamma cannot change during a run (a gamma_schedule, or Engine.set_gamma, is refused
    #: with it); None: it can
    gamma_schedule_refusal: ClassVar[str | None] = None
    #: why a returning agent cannot copy a neighbour's model (network.churn.rejoin = "neighbor" is refused with
    #: it); None: the engine copies the round-1 row of the chosen neighbour into the returning agent's row
    rejoin_refusal: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_types(self)
        if not self.lr > 0:
            raise ConfigError(f"lr must be a positive finite number, not {self.lr}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma (gossip rate) must be in (0, 1], not {self.gamma}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), not {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, not {self.weight_decay}")
        if self.qgm and self.momentum == 0:
            raise ConfigError("qgm=True needs momentum > 0 (QGM is a momentum method)")
        if self.gamma_schedule not in GAMMA_SCHEDULES:
            raise ConfigError(f"gamma_schedule must be one of {', '.join(GAMMA_SCHEDULES)}, "
                              f"not {self.gamma_schedule!r}")
        if not self.gamma_growth > 0:
            raise ConfigError(f"gamma_growth must be a positive number, not {self.gamma_growth}")
        if self.gamma_schedule != "constant" and self.gamma_schedule_refusal is not None:
            raise ConfigError(f"{self.name} takes no gamma_schedule (got {self.gamma_schedule!r}): "
                              f"{self.gamma_schedule_refusal}; use gamma_schedule = 'constant'")

    @property
    def gamma_max(self) -> float:
        """The largest averaging rate the run's schedule can reach (what check_mixing must accept)."""
        if self.gamma_schedule == "constant":
            return self.gamma
        if self.gamma_schedule == "exponential" and self.gamma_growth < 1:
            return min(1.0, self.gamma * self.gamma_growth)
        return 1.0

    @property
    def transform_weight_decay(self) -> float:
        """The weight decay the direction transforms add (step 7): weight_decay, unless the algorithm applies
        it elsewhere (gradient tracking with track_weight_decay tracks it with the gradient)."""
        return self.weight_decay

    @property
    def round2(self) -> bool:
        """Whether cross-gradients are sent back to their models' owners (the second round)."""
        return False

    def check_topology(self, topology: Any) -> None:
        """Raise ConfigError if the method cannot run on `topology` (a Topology, or a time-varying one
        with an `at(step)` method); called once when the engine is built."""

    def check_mixing(self, topology: Any) -> None:
        """Raise ConfigError if the method cannot gossip with this graph's W (one Topology); the engine
        calls it for every graph it wires, each graph of a time-varying topology included.

        Every method but push-sum averages what an agent receives, which keeps the network's mean
        model only when each agent's weights over itself and its in-neighbours sum to 1.
        """
        if not topology.is_row_stochastic:
            sums = topology.W.sum(1)
            i = int(((sums - 1).abs() > ROW_TOL).nonzero()[0])  # the first offending row, as Topology names it
            raise ConfigError(
                f"{self.name} needs a row-stochastic W (each agent's weights over itself and its in-neighbours "
                f"sum to 1), but row {i} of the {topology.name} topology's W sums to {sums[i].item():.6g} (a "
                "column-stochastic, push-sum W); use algorithm 'sgp' (push-sum undoes the bias of such a W) or "
                "row-stochastic weights (topology.weights = 'uniform' or 'metropolis')")

    def gradient_rows(self, ctx: CombineContext, view: StepView, state: AlgorithmState) -> Tensor:
        """The rows [n_local, P] the self-gradients are taken at (step 3), after the gossip: view.x_half
        itself by default. Push-sum keeps numerators in the rows and de-biases them here (x_half / w)."""
        return view.x_half

    def models(self, x: Tensor, state: AlgorithmState) -> Tensor:
        """The agents' models given the engine's rows x [n_local, P] (see Engine.models): x itself by
        default, push-sum's de-biased x / w."""
        return x

    def gossip_only(self, x: Tensor, state: AlgorithmState, mixes: Iterable[Callable[[Tensor], Tensor]]) -> Tensor:
        """The agents' models after gossip-only rounds from the engine's rows x, one round x <- mix(x) per entry of
        `mixes` (each a step's wiring.mix), leaving x and state as they are: what training.final_gossip_rounds
        evaluates. Push-sum gossips its weights along."""
        for mix in mixes:
            x = mix(x)
        return self.models(x, state)

    def init_state(self, ctx: CombineContext, device: torch.device) -> AlgorithmState:
        """The state at the first step; every tensor of it on `device`."""
        return NoState()

    def gossip(self, ctx: CombineContext, comm: Any, x: Tensor, out: Tensor,
               state: AlgorithmState) -> tuple[Tensor, Tensor] | None:
        """Steps 1-2 done by the algorithm itself, for methods that send something other than their
        models in round 1 (Choco sends compressed differences through comm.exchange_payload): write
        the rows the gradients are taken at into `out` and return (rows, index) as the engine's round
        1 does: in-edge e's sender as this agent knows it is rows[index[e]] (read to blame a
        non-finite step on a sender). None, the default: the engine exchanges and gossips x itself."""
        return None

    def combine(
        self, ctx: CombineContext, g_self: Tensor, mv: Tensor | None, dv: Tensor | None, state: AlgorithmState,
        view: StepView | None = None,
    ) -> Tensor:
        """Contract step 6: the combined gradient per local agent, [n_local, P].

        `view` gives the step's gossiped rows, lr and a way to gossip more rows, for algorithms whose
        direction needs them (gradient tracking); the engine always passes it.
        """
        return g_self

    def after_update(self, ctx: CombineContext, view: StepView, state: AlgorithmState) -> None:
        """Runs after step 9, when view.x_half holds the updated rows: algorithms that correct the
        update (D²) do it here, in place."""

    def exchange_after_update(self, ctx: CombineContext, comm: Any, view: StepView, state: AlgorithmState) -> None:
        """Runs after after_update on a communicating step, for methods whose local step comes before their
        communication (RelaySGD): exchange through `comm` (a Comm) what the update made and write the step's
        result into view.x_half in place (view.x: the rows before the step). Nothing by default."""

    def nonfinite_received(self, ctx: CombineContext, state: AlgorithmState, k: int) -> str | None:
        """What local agent k received in exchange_after_update that is not finite, named for the user
        ("... from agent j"), or None: the engine asks when k's update is not finite and neither round 1,
        round 2 nor its own gradients explain it."""
        return None

    def reweight(self, ctx: CombineContext, w: MixWeights, delivery: Delivery) -> MixWeights:
        """What a missing message means: the step's weights given which messages arrived (the network model,
        crossgrad.comm.network, calls it only for a step that lost some; W's entries before the gossip rate).

        Every row-stochastic method re-weights each receiver's row over what arrived: a lost model gets
        weight 0 and the row is divided by the weight that remains (w_ii plus the arrived w_ij), so the
        mixing stays row-stochastic and an agent that heard from nobody keeps its own model. The combine
        weights are re-weighted alike (`CrossGradientAlgorithm`); DSGD combines only its own gradient.
        """
        mix_self, (mix_in,) = row_reweighted(w.mix_self, [(w.mix_in, delivery.in1, ctx.plan.in_dst, 1.0)])
        return replace(w, mix_self=mix_self, mix_in=mix_in)

    def hyperparameters(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{self.name}({args})"


@dataclass
class CrossGradientAlgorithm(Algorithm):
    """An algorithm that computes cross-gradients, combines them with weights and may compress them.

    codec: None sends cross-gradients as they are; a codec name ("sign": scaled sign) compresses
    each with sender-side error feedback. compress_self (default true, only used with a codec) also
    passes the self-gradient through the codec, with its own error memory, as the reference does.
    """

    weights: str = "mixing"
    codec: str | None = None
    compress_self: bool = True

    cross_gradients: ClassVar[bool] = True
    direction_block: ClassVar[bool] = True
    local_steps_refusal: ClassVar[str | None] = (
        "its cross-gradients need the neighbours' current models at every step")

    @property
    def data_variant_share(self) -> float:
        """The share of a neighbour's weight its data-variant (round-2) cross-gradient gets; the rest goes to
        the model-variant one (NGC's alpha; CGA combines data-variant ones only)."""
        return 1.0

    def reweight(self, ctx: CombineContext, w: MixWeights, delivery: Delivery) -> MixWeights:
        """The gossip as every method's; the combined gradient over the cross-gradients that exist: a model
        that did not arrive gives its receiver no model-variant cross-gradient, a data-variant one arrives
        only if the model reached its receiver and the reply came back. Each missing one gets weight 0 and
        the agent's combine weights are divided by what remains (w_ii plus the arrived terms' weights)."""
        w = super().reweight(ctx, w, delivery)
        plan, a = ctx.plan, self.data_variant_share
        self_w, (in_w, out_w) = row_reweighted(
            w.self_w, [(w.in_w, delivery.in1, plan.in_dst, 1 - a), (w.out_w, delivery.out2, plan.out_src, a)])
        return replace(w, self_w=self_w, in_w=in_w, out_w=out_w)

    def validate(self) -> None:
        super().validate()
        if self.weights not in ("mixing", "uniform"):
            raise ConfigError(f"weights must be 'mixing' or 'uniform', not {self.weights!r}")
        if self.codec is not None and (not isinstance(self.codec, str) or self.codec not in CODECS):
            raise ConfigError(f"unknown codec {self.codec!r}; available: {', '.join(sorted(CODECS))} "
                              "(or none for uncompressed)")
        if self.codec is None and not self.compress_self:
            raise ConfigError("compress_self=false only applies with a codec (this algorithm compresses nothing)")

    def check_topology(self, topology: Any) -> None:
        super().check_topology(topology)
        if self.codec is not None and callable(getattr(topology, "at", None)):
            raise ConfigError(
                f"{self.name} with codec={self.codec!r} needs one fixed graph: the sender keeps an error memory per "
                "edge, and on a time-varying topology an edge comes back only every few steps (or at random), so "
                "its memory would carry a stale residual; use ngc without a codec, or a static graph")
