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

import copy
import functools
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from crossgrad.algorithms import Algorithm, CombineContext, combine_weights
from crossgrad.algorithms.base import StepView, add_weighted_edges, edges_per_agent
from crossgrad.codecs import Codec, ErrorFeedback, Payload, make_codec
from crossgrad.comm.base import Comm, EdgePlan, SharedMemoryComm
from crossgrad.flat import ParamLayout
from crossgrad.topology import Topology, is_time_varying
from crossgrad.transforms import transforms_for

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


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


@dataclass(frozen=True)
class PairRows:
    """The parameter row of every (model, minibatch) pair of a step, without stacking them.

    Pair k < n is own[k] (a local agent's gossiped model); pair n + e is other[index[e]] (the model
    that arrived on in-edge e: a row of the shared x in-process, a received row otherwise).
    """

    own: Tensor
    other: Tensor | None = None
    index: Tensor | None = None

    def __len__(self) -> int:
        return len(self.own) + (0 if self.index is None else len(self.index))

    def __getitem__(self, k: int) -> Tensor:
        n = len(self.own)
        return self.own[k] if k < n else self.other[self._index_list[k - n]]

    @functools.cached_property
    def _index_list(self) -> list[int]:
        return [] if self.index is None else self.index.tolist()

    def stacked(self) -> Tensor:
        """All rows as one [K, P] tensor (one gather; the batched evaluator needs it)."""
        if self.index is None:
            return self.own
        return torch.cat([self.own, self.other.index_select(0, self.index)])


class LoopEvaluator:
    """Evaluates gradients of many (parameter row, minibatch) pairs with one worker module.

    The worker's parameters are pointed at views of each pair's row in turn: nothing is copied in,
    and the per-pair overhead stays small next to the forward/backward pass itself.
    """

    def __init__(self, model: nn.Module, layout: ParamLayout, loss_fn: LossFn):
        self.worker = copy.deepcopy(model).train()
        self.layout = layout
        self.params = list(self.worker.parameters())
        self.buffers = list(self.worker.buffers())
        self.loss_fn = loss_fn

    def __call__(
        self,
        rows: PairRows,
        data: Sequence[int],
        batches: Sequence[Batch],
        out: Tensor,
        buffers: list[Tensor] | None = None,
        owners: Sequence[int] | None = None,
        keep_buffers: int = 0,
    ) -> Tensor:
        """Gradient of loss(row k on batches[data[k]]) into out[k]; returns the losses [K].

        With per-agent buffers, pair k runs with agent owners[k]'s buffers; the first
        `keep_buffers` pairs write their buffer updates back (the self-gradient passes).
        """
        losses = torch.empty(len(data), dtype=out.dtype, device=out.device)
        for k, b in enumerate(data):
            for p, view in zip(self.params, self.layout.views(rows[k])):
                p.data = view
            if self.buffers:
                for mine, theirs in zip(self.buffers, buffers):
                    mine.copy_(theirs[owners[k]])
            inputs, targets = batches[b]
            loss = self.loss_fn(self.worker(inputs), targets)
            grads = torch.autograd.grad(loss, self.params)
            torch.cat([g.reshape(-1) for g in grads], out=out[k])
            losses[k] = loss.detach()
            if self.buffers and k < keep_buffers:
                for mine, theirs in zip(self.buffers, buffers):
                    theirs[owners[k]].copy_(mine)
        return losses


class VmapEvaluator:
    """Evaluates all pairs at once with torch.func: vmap over (parameters, minibatch) of grad(loss).

    Made for GPUs, where one batched kernel beats many small ones. It needs a model without
    buffers (EvoNorm, GroupNorm or no norm) and minibatches of one shape; `supports` says so.
    """

    def __init__(self, model: nn.Module, layout: ParamLayout, loss_fn: LossFn):
        self.model = copy.deepcopy(model).train()
        self.layout = layout
        names = layout.names

        def loss_of(row: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
            params = dict(zip(names, layout.views(row)))
            out = torch.func.functional_call(self.model, params, (inputs,))
            return loss_fn(out, targets)

        self._grad = torch.func.vmap(torch.func.grad_and_value(loss_of))
        self._data: tuple[int, ...] = ()
        self._index: Tensor | None = None

    @staticmethod
    def supports(model: nn.Module, batches: Sequence[Batch]) -> bool:
        if any(True for _ in model.buffers()):
            return False
        shapes = {(tuple(x.shape), tuple(y.shape)) for x, y in batches}
        return len(shapes) == 1

    def __call__(self, rows: PairRows, data: Sequence[int], batches: Sequence[Batch], out: Tensor,
                 buffers: list[Tensor] | None = None, owners: Sequence[int] | None = None,
                 keep_buffers: int = 0) -> Tensor:
        if tuple(data) != self._data:  # the same every step of a run: one host-to-device copy in all
            self._data, self._index = tuple(data), torch.as_tensor(data, device=out.device)
        inputs = torch.stack([b[0] for b in batches]).index_select(0, self._index)
        targets = torch.stack([b[1] for b in batches]).index_select(0, self._index)
        grads, losses = self._grad(rows.stacked(), inputs, targets)
        out.copy_(grads)
        return losses.detach()


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


#: up to this many agents gossip is one dense [n, n] x [n, P] product (the fastest at these sizes: one
#: read of x, one write of x_half); beyond, a sparse one, whose cost grows with the edges instead of n^2
DENSE_GOSSIP_MAX_AGENTS = 64


class SharedGossip:
    """Step 2 for agents that share memory: x_half = G x, one product over the rows, nothing gathered.

    G = diag(1 - gamma + gamma w_ii) + gamma * (w_ij on the in-edges).
    """

    def __init__(self, n: int, gossip_self: Tensor, gossip_in: Tensor, dst: Tensor, src: Tensor):
        G = torch.diag(gossip_self)
        G.index_put_((dst, src), gossip_in, accumulate=True)
        if n > DENSE_GOSSIP_MAX_AGENTS:
            with warnings.catch_warnings():  # "sparse CSR support is in beta": used for plain products only
                warnings.simplefilter("ignore", UserWarning)
                G = G.to_sparse_csr()
        self.G = G

    def __call__(self, x: Tensor, out: Tensor) -> Tensor:
        if self.G.layout == torch.strided:
            return torch.mm(self.G, x, out=out)
        return torch.addmm(out, self.G, x, beta=0, out=out)


#: a time-varying topology with no period (e.g. random matchings) keeps this many graphs' wirings
WIRING_CACHE = 16

CommFactory = Callable[[list[tuple[int, int]]], Comm]
#: what the comms of one run's graphs share: the byte counters, and a failed round (after it the peers'
#: message streams are out of step, whichever graph the next step uses)
RUN_WIDE = ("bytes_sent", "wire_bytes", "failed")


def comm_for(topology: Any, make: CommFactory) -> Comm | CommFactory:
    """What `Engine` takes for `topology`: the Comm of its edges, or for a time-varying topology the
    factory itself, which the engine calls with each distinct graph's edges."""
    return make if is_time_varying(topology) else make(topology.edges)


class Wiring:
    """Everything about one step that follows from its graph: the backend's comm and edge plan, the
    combine context, the gossip weights and which model and data each gradient pair uses.

    A static topology has one for the whole run; a time-varying one has one per distinct graph.
    """

    def __init__(self, topology: Topology, comm: Comm, algorithm: Algorithm, layout: ParamLayout,
                 dev: torch.device, dtype: torch.dtype):
        algorithm.check_mixing(topology)  # each graph's W, a time-varying topology's included
        self.comm = comm
        plan = comm.plan
        directed = topology.is_directed
        # gossip (step 2) always mixes with W; only the combine (step 6) may use other weights
        gossip_self, gossip_in, _ = combine_weights(topology.W, plan, "mixing", directed)
        self_w, in_w, out_w = combine_weights(topology.W, plan, algorithm.weights, directed)
        self.ctx = CombineContext(
            plan=EdgePlan(plan.n, plan.local, *(t.to(dev) for t in (plan.in_src, plan.in_dst, plan.out_dst,
                                                                     plan.out_src))),
            layout=layout, self_w=self_w.to(dev), in_w=in_w.to(dev), out_w=out_w.to(dev),
            in_k=edges_per_agent(plan.in_dst, plan.n_local), out_k=edges_per_agent(plan.out_src, plan.n_local),
            dtype=dtype,
        )
        gamma = algorithm.gamma
        self.gossip_self = (1 - gamma + gamma * gossip_self).to(dtype).to(dev)
        self.gossip_in = (gamma * gossip_in).to(dtype).to(dev)
        #: in-process backends: neighbours' rows are read in place (see SharedMemoryComm)
        self.shared = isinstance(comm, SharedMemoryComm)
        self.shared_gossip = (SharedGossip(plan.n_local, self.gossip_self, self.gossip_in, self.ctx.plan.in_dst,
                                           comm.sources) if self.shared else None)
        n = plan.n_local
        self.pair_data = list(range(n)) + (plan.in_dst.tolist() if algorithm.cross_gradients else [])
        self.edges = torch.arange(len(plan.in_src), device=dev)  # received row e is in-edge e's

    @property
    def plan(self) -> EdgePlan:
        return self.ctx.plan

    def round1(self, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """Exchange rows x [n_local, P] and gossip them into `out`; returns (received rows, index): in-edge
        e's row is received[index[e]]."""
        if self.shared:
            models = self.comm.share(x)  # every agent reads its neighbours' rows of x in place
            self.shared_gossip(models, out=out)
            return models, self.comm.sources
        received = self.comm.exchange(x)
        torch.mul(x, self.gossip_self.unsqueeze(1), out=out)
        add_weighted_edges(out, received, self.plan.in_dst, self.gossip_in, self.ctx.in_k, alpha=1.0)
        return received, self.edges

    def round2(self, payload: Payload, sent: Tensor, codec: Codec | None, out: Tensor) -> Tensor:
        """Send payload row e back along in-edge e; returns the arriving rows per out-edge, decoded, in `out`.

        sent[e] is payload row e's decoded value as its sender knows it. In-process the receiver reads
        that row in place: the payload is still built and counted, and a codec's roundtrip is its
        decode(encode()) bit for bit, so decoding it again would give the same rows.
        """
        if self.shared:
            return torch.index_select(sent, 0, self.comm.share_edges(payload), out=out)
        arrived = self.comm.exchange_edges(payload)
        return arrived[0] if codec is None else codec.decode(arrived, out.dtype, out=out)

    def mix(self, rows: Tensor, out: Tensor | None = None) -> Tensor:
        """Gossip another block of rows [n_local, P] with this step's matrix (one more round-1 message),
        into `out` if given (not rows itself)."""
        out = torch.empty_like(rows) if out is None else out
        self.round1(rows, out)
        return out


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
        self.time_varying = callable(getattr(topology, "at", None))
        if self.time_varying == hasattr(comm, "plan"):
            raise TypeError("a time-varying topology needs a comm factory (edges -> Comm), a static one a Comm")
        self._make_comm: CommFactory | None = comm if self.time_varying else None
        self._wirings: dict[Any, Wiring] = {}
        self.wiring = self._wiring_at(0) if self.time_varying else \
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

    def _wiring_at(self, step: int) -> Wiring:
        """The wiring of a time-varying topology's graph at `step`, built the first time that graph occurs."""
        topology = self.topology.at(step)
        key = topology.W.numpy().tobytes()
        wiring = self._wirings.get(key)
        if wiring is None:
            comm = self._make_comm(topology.edges)
            if self._wirings:  # one set of counters, and one failure state (DistComm), for the whole run
                first = next(iter(self._wirings.values())).comm
                for name in RUN_WIDE:
                    if hasattr(first, name):
                        setattr(comm, name, getattr(first, name))
            wiring = Wiring(topology, comm, self.algorithm, self.layout, self.device, self.dtype)
            if len(self._wirings) >= WIRING_CACHE:
                self._wirings.pop(next(k for k in self._wirings if self._wirings[k] is not self.wiring))
            self._wirings[key] = wiring
        return wiring

    def set_lr(self, lr: float) -> None:
        if not (lr > 0 and lr < float("inf")):
            raise ValueError(f"learning rate must be a positive finite number, not {lr}")
        self.lr = float(lr)

    def step(self, batches: Sequence[Batch]) -> Tensor:
        """One synchronous iteration on every local agent; batches[k] is local agent k's minibatch."""
        algo = self.algorithm
        if self.time_varying:
            self.wiring = self._wiring_at(self.stats.steps)
        wiring = self.wiring
        plan = wiring.plan
        n = plan.n_local
        if len(batches) != n:
            raise ValueError(f"step() needs one minibatch per agent: got {len(batches)}, expected {n}")
        if len(self.grads) != len(wiring.pair_data):
            self.grads = self.grads.new_empty(len(wiring.pair_data), self.layout.size)
        clock = self.clock
        clock.start()
        x, x_half = self.x, self._spare
        own = algo.gossip(self.ctx, wiring.comm, x, x_half, self.algo_state)  # Choco: its compressed round 1
        received, index = own if own is not None else wiring.round1(x, out=x_half)  # round 1 and gossip (steps 1-2)
        view = StepView(x_half=x_half, lr=self.lr, step=self.stats.steps, mix=wiring.mix, direction=self._direction)
        at = algo.gradient_rows(self.ctx, view, self.algo_state)  # x_half itself, but push-sum's x_half / w
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
        d = algo.combine(self.ctx, g_self, mv, dv, self.algo_state, view)
        clock.tick("combine")
        self.transforms.apply(d, x_half, self.lr)
        algo.after_update(self.ctx, view, self.algo_state)
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
        self.stats.steps += 1
        self.stats.grad_evals += len(wiring.pair_data)
        self.stats.counters = self.algo_state.counters()
        return losses[:n]

    def _fail(self, diagnose: Callable[[], NonFiniteError]) -> None:
        """Raise or record what `diagnose` finds; once recorded, later failures are not diagnosed again."""
        if self.on_nonfinite == "raise":
            raise diagnose()
        if self.nonfinite is None:
            self.nonfinite = diagnose()

    def _received_culprit(self, ks: list[int], received: Tensor, index: Tensor) -> NonFiniteError | None:
        """The first of local agents ks that received a non-finite model in round 1, blamed on its sender.

        Received models are checked first: they are the cause, a bad loss or update the symptom (and
        with dense gossip a bad row reaches every agent, not only the sender's neighbours).
        """
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
        return {
            "x": self.x.clone(),
            "buffers": [b.clone() for b in self.buffers],
            "lr": self.lr,
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
        self.transforms.load_state_dict(state["transforms"])
        for key, codec in codecs.items():
            codec.load_state_dict(state["codec"][key])
        self.algo_state.load_state_dict(state["algorithm"])
        self.comm.bytes_sent.copy_(state["bytes_sent"])
        self.stats.steps = int(state["stats"]["steps"])
        self.stats.grad_evals = int(state["stats"]["grad_evals"])
        self.stats.counters = self.algo_state.counters()
