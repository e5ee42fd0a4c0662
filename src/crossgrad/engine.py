"""The synchronous iteration of the contract (ARCHITECTURE.md section 1), written once against `Comm`.

The engine owns the local agents' parameters x [n_local, P] and buffers (e.g. batch-norm statistics,
per agent) as flat rows, and the stateful pieces of the iteration: the direction transforms (steps
7-8), the error-feedback codecs and the algorithm's own state. Its state_dict is theirs, assembled
without knowing what is inside. It asks the backend to move tensors and a gradient evaluator to run
(model, minibatch) pairs.

On parameter-heavy models every pass over [n, P] costs about as much as a forward/backward pass, so
the step makes as few as it can: in-process (a `SharedMemoryComm`) neighbours' rows are never copied
(gossip is one product over x, cross-gradients read x's rows), x and x_half alternate between two
buffers, the last direction transform is fused with the update, and round-2 and decoded messages
land in buffers kept across steps. One host synchronisation per step remains: the finiteness check.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from crossgrad.algorithms import Algorithm, CombineContext
from crossgrad.algorithms.base import StepView
from crossgrad.codecs import ErrorFeedback, Payload, make_codec
from crossgrad.comm.base import Comm, EdgePlan
from crossgrad.comm.network import NetworkModel
from crossgrad.evaluators import Batch, LoopEvaluator, LossFn, PairRows, VmapEvaluator
from crossgrad.flat import ParamLayout
from crossgrad.topology import Topology
from crossgrad.transforms import transforms_for
from crossgrad.wiring import CommFactory, Wiring, WiringCache


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nest of dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite; names the step and the agent."""

    def __init__(self, step: int, agent: int, what: str):
        super().__init__(f"non-finite {what} at step {step}, agent {agent}")
        self.step, self.agent, self.what = step, agent, what


class PhaseClock:
    """Wall time per phase of a step, off by default; on CUDA it synchronises to measure truly."""

    def __init__(self, device: torch.device):
        self.enabled = False
        self.totals: dict[str, float] = {}
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._last = 0.0

    def start(self) -> None:
        if self.enabled:
            self._sync()
            self._last = time.perf_counter()

    def tick(self, phase: str) -> None:
        if self.enabled:
            self._sync()
            now = time.perf_counter()
            self.totals[phase] = self.totals.get(phase, 0.0) + now - self._last
            self._last = now

    def reset(self) -> None:
        self.totals.clear()



@dataclass
class StepStats:
    """Counters since the start of the run (restored with the engine's state).

    `counters` are the algorithm state's own (e.g. CGA's qp_failures), copied after every step.
    """

    steps: int = 0
    grad_evals: int = 0
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def qp_failures(self) -> int:
        """CGA's solver failures (0 for other algorithms): a column of every run's metrics."""
        return self.counters.get("qp_failures", 0)


class Engine:
    """One synchronous iteration of `algorithm` for the agents `comm` holds.

    `comm` is the backend's Comm for a static topology. A time-varying topology (one with an
    `at(step)` method returning the step's Topology) needs `comm` to be a factory instead: a callable
    that builds the Comm of an edge list, called once per distinct graph; every Comm it builds shares
    the first one's byte counters.

    on_nonfinite: "raise" raises NonFiniteError as soon as a loss or update is NaN or infinite;
    "record" never raises mid-step: it keeps the first such error in `nonfinite` and completes the
    step, every communication round included, so that peers on another process are never left
    waiting (the values just become NaN). The caller decides when to stop.

    network: a `NetworkModel` (crossgrad.comm.network) that decides which messages of each step arrive, and
    counts messages and simulated time; None (the default) is a perfect network.
    """

    def __init__(
        self,
        model: nn.Module,
        topology: Topology,
        algorithm: Algorithm,
        comm: Comm | CommFactory,
        loss_fn: LossFn,
        device: torch.device | str | None = None,
        evaluator: str = "auto",
        on_nonfinite: Literal["raise", "record"] = "raise",
        network: NetworkModel | None = None,
    ):
        if evaluator not in ("auto", "loop", "vmap"):
            raise ValueError(f"evaluator must be 'auto', 'loop' or 'vmap', not {evaluator!r}")
        if on_nonfinite not in ("raise", "record"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'record', not {on_nonfinite!r}")
        self.algorithm = algorithm
        self.topology = topology
        self.layout = layout = ParamLayout.of(model)
        first = next(model.parameters())
        self.device = dev = torch.device(device) if device is not None else first.device
        self.dtype = first.dtype
        self.on_nonfinite = on_nonfinite
        #: the first NonFiniteError of the run with on_nonfinite="record" (never checkpointed)
        self.nonfinite: NonFiniteError | None = None
        algorithm.check_topology(topology)
        self.network = network
        if network is not None:
            network.check(algorithm)
        self.time_varying = callable(getattr(topology, "at", None))
        if self.time_varying == hasattr(comm, "plan"):
            raise TypeError("a time-varying topology needs a comm factory (edges -> Comm), a static one a Comm")
        #: the wirings of a time-varying topology's graphs (None for a static one: its one wiring is fixed)
        self.wirings = WiringCache(topology, comm, algorithm, layout, dev, self.dtype) if self.time_varying else None
        self.wiring = self.wirings.at(0) if self.time_varying else \
            Wiring(topology, comm, algorithm, layout, dev, self.dtype)
        n = self.plan.n_local
        model = model.to(dev)
        self.x = layout.flatten(model).to(dev).repeat(n, 1)
        self.buffer_names = [name for name, _ in model.named_buffers()]
        self.buffers = [b.detach().unsqueeze(0).repeat(n, *([1] * b.dim())).clone() for b in model.buffers()]
        self.lr = algorithm.lr
        self.transforms = transforms_for(algorithm, self.x, self.lr)
        # x and the next step's x_half alternate between two buffers, so no [n, P] block is allocated per step
        self._spare = torch.empty_like(self.x)
        # the combined gradient of the methods that build one, written into the same block every step
        self._direction = torch.empty_like(self.x) if algorithm.direction_block else None
        self.algo_state = algorithm.init_state(self.ctx, dev)
        #: error-feedback codecs of the cross-gradient messages (one memory row per in-edge) and of
        #: the self-gradient (one per agent); None where the algorithm compresses nothing there
        self.edge_codec: ErrorFeedback | None = None
        self.self_codec: ErrorFeedback | None = None
        if algorithm.codec is not None and algorithm.cross_gradients:  # (Choco's codec compresses models)
            # random-k draws per message stream, named alike on every backend: agent a's own is a, edge j -> i's
            # n + j n + i
            plan = self.ctx.plan
            agents = torch.tensor(plan.local, dtype=torch.long, device=dev)
            edge_streams = plan.n * (1 + plan.in_src) + agents[plan.in_dst]
            self.edge_codec = ErrorFeedback(make_codec(algorithm.codec, layout, streams=edge_streams))
            self.edge_codec.init((len(self.plan.in_src), layout.size), self.dtype, dev)
            if algorithm.compress_self:
                self.self_codec = ErrorFeedback(make_codec(algorithm.codec, layout, streams=agents))
                self.self_codec.init(self.x.shape, self.dtype, dev)
        self.evaluate = LoopEvaluator(model, layout, loss_fn)
        self.evaluate_batched: VmapEvaluator | None = None
        has_buffers = bool(self.buffers)
        if evaluator == "vmap" and has_buffers:
            raise ValueError("evaluator='vmap' needs a model without buffers (use norm 'evonorm', 'group' or 'none')")
        if evaluator == "vmap" or (evaluator == "auto" and dev.type == "cuda" and not has_buffers):
            self.evaluate_batched = VmapEvaluator(model, layout, loss_fn)
        self.grads = torch.empty(len(self.wiring.pair_data), layout.size, dtype=self.dtype, device=dev)
        # round 2's arriving rows, decoded or read in place (allocated at the first step that needs them)
        self._decoded = torch.empty(0, layout.size, dtype=self.dtype, device=dev)
        self.stats = StepStats()
        self.clock = PhaseClock(dev)
        #: the last step's self, model-variant and data-variant gradients (for diagnostics)
        self.last: dict[str, Tensor | None] = {}

    # the current step's graph: fixed for a static topology
    @property
    def comm(self) -> Comm:
        return self.wiring.comm

    @property
    def plan(self) -> EdgePlan:
        return self.wiring.comm.plan

    @property
    def ctx(self) -> CombineContext:
        return self.wiring.ctx

    @property
    def shared(self) -> bool:
        return self.wiring.shared

    def models(self) -> Tensor:
        """The local agents' models [n_local, P], what evaluation, the consensus model and the simulator's
        params mean by an agent's model: the rows x themselves (no copy) for every method that keeps its
        models in them; push-sum keeps numerators in x and returns the de-biased x / w."""
        return self.algorithm.models(self.x, self.algo_state)

    def set_lr(self, lr: float) -> None:
        if not (lr > 0 and lr < float("inf")):
            raise ValueError(f"learning rate must be a positive finite number, not {lr}")
        self.lr = float(lr)

    @property
    def gamma(self) -> float:
        """The averaging rate the gossip uses now (the algorithm's gamma until set_gamma changes it)."""
        return self.wiring.gamma

    def set_gamma(self, gamma: float) -> None:
        """Gossip with averaging rate `gamma` from the next step on, on every graph of the topology."""
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma (gossip rate) must be in (0, 1], not {gamma}")
        if gamma != self.gamma and self.algorithm.gamma_schedule_refusal is not None:
            raise ValueError(f"{self.algorithm.name} cannot change its gamma during a run: "
                             f"{self.algorithm.gamma_schedule_refusal}")
        if gamma != self.gamma:
            (self.wirings or self.wiring).set_gamma(float(gamma))

    def step(self, batches: Sequence[Batch], communicate: bool = True) -> Tensor:
        """One synchronous iteration on every local agent; batches[k] is local agent k's minibatch.

        communicate=False makes it a local step (training.local_steps): no message, no gossip, gradients at
        the agents' own models; only for algorithms whose `local_steps_refusal` is None (no cross-gradients).
        """
        algo = self.algorithm
        if self.time_varying:
            self.wiring = self.wirings.at(self.stats.steps, current=self.wiring)
        wiring, lossy = self.wiring, None
        if self.network is not None:  # the step's wiring: re-weighted over the messages that arrive
            wiring, lossy = self.network.begin(self.stats.steps, wiring, algo)
        ctx, plan = wiring.ctx, wiring.plan
        n = plan.n_local
        if len(batches) != n:
            raise ValueError(f"step() needs one minibatch per agent: got {len(batches)}, expected {n}")
        # churn: the local agents away this step run the step like the others (one shape for every kernel) and
        # then get their state back, as if they had not stepped at all
        away = None if lossy is None else lossy.get("away")
        kept = None if away is None else {k: t.index_select(d, i) for k, (t, d, i) in self._agent_rows(away).items()}
        if len(self.grads) != len(wiring.pair_data):
            self.grads = self.grads.new_empty(len(wiring.pair_data), self.layout.size)
        clock = self.clock
        clock.start()
        x, x_half = self.x, self._spare
        if not communicate:
            if algo.local_steps_refusal is not None:
                raise ValueError(f"{algo.name} cannot make local steps: {algo.local_steps_refusal}")
            received, index = None, None
            x_half.copy_(x)
        else:
            own = algo.gossip(ctx, wiring.comm, x, x_half, self.algo_state)  # Choco: its compressed round 1
            # round 1 and gossip (steps 1-2)
            received, index = own if own is not None else wiring.round1(x, out=x_half)
            rejoin = None if lossy is None else lossy.get("rejoin")
            if rejoin is not None:  # a returning agent starts from the model its chosen neighbour sent
                k, e = rejoin
                x_half.index_copy_(0, k, received.index_select(0, index.index_select(0, e)))
        view = StepView(x_half=x_half, lr=self.lr, step=self.stats.steps, mix=wiring.mix, direction=self._direction,
                        x=x, mean=wiring.global_mean)
        at = algo.gradient_rows(ctx, view, self.algo_state)  # x_half itself, but push-sum's x_half / w
        rows = PairRows(at, received, index) if algo.cross_gradients else PairRows(at)
        clock.tick("gossip")
        evaluate = self.evaluate
        if self.evaluate_batched is not None and VmapEvaluator.supports(self.evaluate.worker, batches):
            evaluate = self.evaluate_batched
        losses = evaluate(rows, wiring.pair_data, batches, self.grads, self.buffers,
                          owners=wiring.pair_data, keep_buffers=n)
        clock.tick("gradients")
        g_self, mv = self.grads[:n], (self.grads[n:] if algo.cross_gradients else None)
        dv = None
        codec = None
        payload: Payload = (mv,)
        if self.edge_codec is not None:
            codec = self.edge_codec.codec
            # the raw gradients are dead once corrected: their compressed values overwrite them
            payload, mv = self.edge_codec.encode(mv, out=mv)
            if self.self_codec is not None:
                g_self = self.self_codec.roundtrip(g_self, out=g_self)
            clock.tick("compress")
        if algo.round2:
            if (wiring.shared or codec is not None) and len(self._decoded) != len(plan.out_dst):
                self._decoded = self._decoded.new_empty(len(plan.out_dst), self.layout.size)
            # into a buffer reused every step
            dv = wiring.round2(payload, mv, codec, out=self._decoded)
            clock.tick("exchange")
        self.last = {"g_self": g_self, "mv": mv, "dv": dv}
        d = algo.combine(ctx, g_self, mv, dv, self.algo_state, view)
        clock.tick("combine")
        self.transforms.apply(d, x_half, self.lr)
        algo.after_update(ctx, view, self.algo_state)
        if communicate:
            algo.exchange_after_update(ctx, wiring.comm, view, self.algo_state)  # RelaySGD's relay
        if kept is not None:
            for key, (t, d, i) in self._agent_rows(away, x_half).items():
                if key in kept:  # (not a work buffer the step has just made, such as push-sum's first z)
                    t.index_copy_(d, i, kept[key])
        # one host sync per step: a NaN or Inf anywhere in a loss or a row makes its sum non-finite
        bad_loss = ~torch.isfinite(losses[:n])
        bad_row = ~torch.isfinite(x_half.sum(1))
        if (bad_loss | bad_row).any():  # the diagnosis only runs on failure
            if bad_loss.any():
                ks = bad_loss.nonzero().flatten().tolist()
                self._fail(lambda: self._diagnose_loss(ks, received, index))
            else:
                ks = bad_row.nonzero().flatten().tolist()
                self._fail(lambda: self._diagnose_update(ks, received, index, g_self, mv, dv))
        self.x, self._spare = x_half, x
        clock.tick("update")
        if lossy is not None:
            self.network.end(wiring, lossy)
        self.stats.steps += 1
        self.stats.grad_evals += len(wiring.pair_data)
        self.stats.counters = self.algo_state.counters()
        return losses[:n]

    def _agent_rows(self, away: Tensor, x: Tensor | None = None) -> dict[str, tuple[Tensor, int, Tensor]]:
        """What a step must leave as it was for the absent local agents `away`, by name: every block of the
        state with rows of local agents, as (block, the dimension that indexes them, the away agents' indices
        there), and the error memories of their in-edges (they encode no cross-gradient). `x`: the parameter
        rows (the step's new ones). Algorithm state is read by attribute, anew each time (a step may replace a
        tensor rather than write into it): every tensor with n_local rows along dimension 0, unless the
        state's `agent_dims` names another dimension (None: not per agent)."""
        n = self.plan.n_local
        out = {"x": (self.x if x is None else x, 0, away)}
        out.update((f"buffer{k}", (b, 0, away)) for k, b in enumerate(self.buffers))
        out.update((f"transform{k}.{name}", (t, 0, away)) for k, tr in enumerate(self.transforms.transforms)
                   for name, t in vars(tr).items() if isinstance(t, Tensor))
        if self.self_codec is not None:
            out["self_memory"] = (self.self_codec.memory, 0, away)
        dims = getattr(self.algo_state, "agent_dims", {})
        for name, t in vars(self.algo_state).items():
            d = dims.get(name, 0)
            if isinstance(t, Tensor) and d is not None and t.dim() > d and t.shape[d] == n:
                out[f"state.{name}"] = (t, d, away)
        if self.edge_codec is not None:
            edges = torch.isin(self.plan.in_dst.to(away.device), away).nonzero().flatten()
            out["edge_memory"] = (self.edge_codec.memory, 0, edges)
        return out

    def _fail(self, diagnose: Callable[[], NonFiniteError]) -> None:
        """Raise or record what `diagnose` finds; once recorded, later failures are not diagnosed again."""
        if self.on_nonfinite == "raise":
            raise diagnose()
        if self.nonfinite is None:
            self.nonfinite = diagnose()

    def _received_culprit(self, ks: list[int], received: Tensor | None, index: Tensor | None) -> NonFiniteError | None:
        """The first of local agents ks that received a non-finite model in round 1, blamed on its sender.

        Received models are checked first: they are the cause, a bad loss or update the symptom (and
        with dense gossip a bad row reaches every agent, not only the sender's neighbours).
        """
        if received is None:  # a local step received nothing
            return None
        plan = self.ctx.plan
        for k in ks:
            for e in (plan.in_dst == k).nonzero().flatten().tolist():
                if not torch.isfinite(received[index[e]]).all():
                    return NonFiniteError(self.stats.steps, self.plan.local[k],
                                          f"model received from agent {int(plan.in_src[e])} in round 1")
        return None

    def _diagnose_loss(self, ks: list[int], received: Tensor, index: Tensor) -> NonFiniteError:
        """The losses of local agents ks are not finite: blame a received model if one is, else the loss."""
        culprit = self._received_culprit(ks, received, index)
        return culprit or NonFiniteError(self.stats.steps, self.plan.local[ks[0]], "loss")

    def _diagnose_update(self, ks: list[int], received: Tensor, index: Tensor, g_self: Tensor, mv: Tensor | None,
                         dv: Tensor | None) -> NonFiniteError:
        """Name what made the updates of local agents ks non-finite: a received message, or an own gradient."""
        culprit = self._received_culprit(ks, received, index)
        if culprit is not None:
            return culprit
        plan, step = self.ctx.plan, self.stats.steps
        k = ks[0]
        agent = self.plan.local[k]
        if dv is not None:
            for e in (plan.out_src == k).nonzero().flatten().tolist():
                if not torch.isfinite(dv[e]).all():
                    return NonFiniteError(step, agent,
                                          f"cross-gradient received from agent {int(plan.out_dst[e])} in round 2")
        if not torch.isfinite(g_self[k]).all():
            return NonFiniteError(step, agent, "self-gradient")
        if mv is not None:
            for e in (plan.in_dst == k).nonzero().flatten().tolist():
                if not torch.isfinite(mv[e]).all():
                    return NonFiniteError(step, agent, f"cross-gradient of agent {int(plan.in_src[e])}'s model")
        relayed = self.algorithm.nonfinite_received(self.ctx, self.algo_state, k)
        if relayed is not None:
            return NonFiniteError(step, agent, relayed)
        return NonFiniteError(step, agent, "update (overflow in combine or momentum)")

    def _codecs(self) -> dict[str, ErrorFeedback]:
        return {k: c for k, c in (("edge", self.edge_codec), ("self", self.self_codec)) if c is not None}

    def memory_bytes(self) -> int:
        """Bytes of the tensors kept across steps: the whole state (parameters, buffers, momentum, error
        memories, the algorithm's own, its scratch blocks included) and the work buffers (gradients, the
        second parameter block, decoded messages, the combined gradient). Counted in place, nothing copied."""
        return _tensor_bytes([
            self.x, self.buffers, self.grads, self._spare, self._decoded, self._direction,
            [vars(t) for t in self.transforms.transforms], [c.memory for c in self._codecs().values()],
            vars(self.algo_state),
        ])

    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs, as independent copies (later steps do not change it)."""
        network = {} if self.network is None else {"network": self.network.state_dict()}
        return {
            **network,
            "x": self.x.clone(),
            "buffers": [b.clone() for b in self.buffers],
            "lr": self.lr,
            "gamma": self.gamma,
            "transforms": self.transforms.state_dict(),
            "codec": {k: c.state_dict() for k, c in self._codecs().items()},
            "algorithm": self.algo_state.state_dict(),
            "bytes_sent": self.comm.bytes_sent.clone(),
            "stats": {"steps": self.stats.steps, "grad_evals": self.stats.grad_evals},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict, each piece onto this run's device and dtype; refuses another configuration."""
        if state["x"].shape != self.x.shape:
            raise ValueError(f"checkpoint holds parameters of shape {tuple(state['x'].shape)}, "
                             f"this run has {tuple(self.x.shape)}")
        codecs = self._codecs()
        if set(state["codec"]) != set(codecs):
            raise ValueError(f"checkpoint holds error memories {sorted(state['codec'])}, this run has "
                             f"{sorted(codecs)} (codec / compress_self settings differ)")
        if len(state["buffers"]) != len(self.buffers):
            raise ValueError(f"checkpoint holds {len(state['buffers'])} buffers, the model has {len(self.buffers)}")
        self.x.copy_(state["x"])
        for mine, theirs in zip(self.buffers, state["buffers"]):
            mine.copy_(theirs)
        self.lr = float(state["lr"])
        self.set_gamma(float(state.get("gamma", self.algorithm.gamma)))  # (checkpoints before gamma schedules)
        self.transforms.load_state_dict(state["transforms"])
        for key, codec in codecs.items():
            codec.load_state_dict(state["codec"][key])
        self.algo_state.load_state_dict(state["algorithm"])
        self.comm.bytes_sent.copy_(state["bytes_sent"])
        self.stats.steps = int(state["stats"]["steps"])
        self.stats.grad_evals = int(state["stats"]["grad_evals"])
        self.stats.counters = self.algo_state.counters()
        if self.network is not None:
            self.network.load_state_dict(state["network"])
