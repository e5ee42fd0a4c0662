"""The synchronous iteration of the contract (ARCHITECTURE.md section 1), written once against `Comm`.

The engine owns the local agents' parameters x [n_local, P] and buffers (e.g. batch-norm statistics,
per agent) as flat rows, and the stateful pieces of the iteration: the direction transforms (steps
7-8), the error-feedback codecs and the algorithm's own state. Its state_dict is theirs, assembled
without knowing what is inside. It asks the backend to move tensors and a gradient evaluator to run
(model, minibatch) pairs.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from crossgrad.algorithms import Algorithm, CombineContext, combine_weights
from crossgrad.codecs import ErrorFeedback, make_codec
from crossgrad.comm.base import Comm
from crossgrad.flat import ParamLayout
from crossgrad.topology import Topology
from crossgrad.transforms import transforms_for

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite; names the step and the agent."""

    def __init__(self, step: int, agent: int, what: str):
        super().__init__(f"non-finite {what} at step {step}, agent {agent}")
        self.step, self.agent, self.what = step, agent, what


class LoopEvaluator:
    """Evaluates gradients of many (parameter row, minibatch) pairs with one worker module.

    The worker's parameters are views into one flat buffer, so loading a row is a single copy and
    the per-pair overhead stays small next to the forward/backward pass itself.
    """

    def __init__(self, model: nn.Module, layout: ParamLayout, loss_fn: LossFn):
        self.worker = copy.deepcopy(model).train()
        self.flat = layout.flatten(model).clone()
        self.params = list(self.worker.parameters())
        for p, view in zip(self.params, layout.views(self.flat)):
            p.data = view
        self.buffers = list(self.worker.buffers())
        self.loss_fn = loss_fn

    def __call__(
        self,
        rows: Tensor,
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
            self.flat.copy_(rows[k])
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

    @staticmethod
    def supports(model: nn.Module, batches: Sequence[Batch]) -> bool:
        if any(True for _ in model.buffers()):
            return False
        shapes = {(tuple(x.shape), tuple(y.shape)) for x, y in batches}
        return len(shapes) == 1

    def __call__(self, rows: Tensor, data: Sequence[int], batches: Sequence[Batch], out: Tensor,
                 buffers: list[Tensor] | None = None, owners: Sequence[int] | None = None,
                 keep_buffers: int = 0) -> Tensor:
        index = torch.as_tensor(data, device=rows.device)
        inputs = torch.stack([b[0] for b in batches]).index_select(0, index)
        targets = torch.stack([b[1] for b in batches]).index_select(0, index)
        grads, losses = self._grad(rows, inputs, targets)
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
        comm: Comm,
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
        self.comm = comm
        self.plan = plan = comm.plan
        self.layout = layout = ParamLayout.of(model)
        first = next(model.parameters())
        self.device = dev = torch.device(device) if device is not None else first.device
        self.dtype = first.dtype
        self.on_nonfinite = on_nonfinite
        #: the first NonFiniteError of the run with on_nonfinite="record" (never checkpointed)
        self.nonfinite: NonFiniteError | None = None
        model = model.to(dev)
        n = plan.n_local
        self.x = layout.flatten(model).to(dev).repeat(n, 1)
        self.buffer_names = [name for name, _ in model.named_buffers()]
        self.buffers = [b.detach().unsqueeze(0).repeat(n, *([1] * b.dim())).clone() for b in model.buffers()]
        self.lr = algorithm.lr
        self.transforms = transforms_for(algorithm, self.x, self.lr)
        directed = topology.is_directed
        # gossip (step 2) always mixes with W; only the combine (step 6) may use other weights
        gossip_self, gossip_in, _ = combine_weights(topology.W, plan, "mixing", directed)
        self_w, in_w, out_w = combine_weights(topology.W, plan, algorithm.weights, directed)
        self.ctx = CombineContext(
            plan=type(plan)(plan.n, plan.local, *(t.to(dev) for t in (plan.in_src, plan.in_dst, plan.out_dst,
                                                                          plan.out_src))),
            layout=layout, self_w=self_w.to(dev), in_w=in_w.to(dev), out_w=out_w.to(dev),
        )
        gamma = algorithm.gamma
        self.gossip_self = (1 - gamma + gamma * gossip_self).to(self.dtype).to(dev)
        self.gossip_in = (gamma * gossip_in).to(self.dtype).to(dev)
        self.algo_state = algorithm.init_state(self.ctx, dev)
        #: error-feedback codecs of the cross-gradient messages (one memory row per in-edge) and of
        #: the self-gradient (one per agent); None where the algorithm compresses nothing there
        self.edge_codec: ErrorFeedback | None = None
        self.self_codec: ErrorFeedback | None = None
        if algorithm.codec is not None:
            self.edge_codec = ErrorFeedback(make_codec(algorithm.codec, layout))
            self.edge_codec.init((len(plan.in_src), layout.size), self.dtype, dev)
            if algorithm.compress_self:
                self.self_codec = ErrorFeedback(make_codec(algorithm.codec, layout))
                self.self_codec.init(self.x.shape, self.dtype, dev)
        self.evaluate = LoopEvaluator(model, layout, loss_fn)
        self.evaluate_batched: VmapEvaluator | None = None
        has_buffers = bool(self.buffers)
        if evaluator == "vmap" and has_buffers:
            raise ValueError("evaluator='vmap' needs a model without buffers (use norm 'evonorm', 'group' or 'none')")
        if evaluator == "vmap" or (evaluator == "auto" and dev.type == "cuda" and not has_buffers):
            self.evaluate_batched = VmapEvaluator(model, layout, loss_fn)
        n_pairs = n + (len(plan.in_src) if algorithm.cross_gradients else 0)
        self.grads = torch.empty(n_pairs, layout.size, dtype=self.dtype, device=dev)
        self._pair_data = list(range(n)) + (plan.in_dst.tolist() if algorithm.cross_gradients else [])
        self.stats = StepStats()
        self.clock = PhaseClock(dev)
        #: the last step's self, model-variant and data-variant gradients (for diagnostics)
        self.last: dict[str, Tensor | None] = {}

    def set_lr(self, lr: float) -> None:
        if not (lr > 0 and lr < float("inf")):
            raise ValueError(f"learning rate must be a positive finite number, not {lr}")
        self.lr = float(lr)

    def step(self, batches: Sequence[Batch]) -> Tensor:
        """One synchronous iteration on every local agent; batches[k] is local agent k's minibatch."""
        algo, plan = self.algorithm, self.ctx.plan
        n = plan.n_local
        if len(batches) != n:
            raise ValueError(f"step() needs one minibatch per agent: got {len(batches)}, expected {n}")
        clock = self.clock
        clock.start()
        x = self.x
        neighbours = self.comm.exchange(x)  # round 1: x_j^t for every in-edge
        clock.tick("exchange")
        x_half = x * self.gossip_self.unsqueeze(1)
        x_half.index_add_(0, plan.in_dst, neighbours * self.gossip_in.unsqueeze(1))
        rows = torch.cat([x_half, neighbours]) if algo.cross_gradients else x_half
        clock.tick("gossip")
        evaluate = self.evaluate
        if self.evaluate_batched is not None and VmapEvaluator.supports(self.evaluate.worker, batches):
            evaluate = self.evaluate_batched
        losses = evaluate(rows, self._pair_data, batches, self.grads, self.buffers,
                          owners=self._pair_data, keep_buffers=n)
        bad_loss = ~torch.isfinite(losses[:n])
        if bad_loss.any():
            self._fail(lambda: self._diagnose_loss(int(bad_loss.nonzero()[0, 0]), neighbours))
        clock.tick("gradients")
        g_self, mv = self.grads[:n], (self.grads[n:] if algo.cross_gradients else None)
        dv = None
        if self.edge_codec is not None:
            payload, mv = self.edge_codec.encode(mv)
            if self.self_codec is not None:
                g_self = self.self_codec.roundtrip(g_self)
            clock.tick("compress")
            if algo.round2:
                received = self.comm.exchange_edges(payload)
                clock.tick("exchange")
                dv = self.edge_codec.codec.decode(received, self.dtype)
                clock.tick("compress")
        elif algo.round2:
            dv = self.comm.exchange_edges((mv,))[0]
            clock.tick("exchange")
        self.last = {"g_self": g_self, "mv": mv, "dv": dv}
        d = algo.combine(self.ctx, g_self, mv, dv, self.algo_state)
        clock.tick("combine")
        d = self.transforms.update(d, x_half, self.lr)
        bad = ~torch.isfinite(d).all(dim=1)
        if bad.any():  # one reduction per step; the diagnosis only runs on failure
            self._fail(lambda: self._diagnose_update(int(bad.nonzero()[0, 0]), neighbours, g_self, mv, dv))
        self.x = x_half.sub_(d, alpha=self.lr)
        clock.tick("update")
        self.stats.steps += 1
        self.stats.grad_evals += len(self._pair_data)
        self.stats.counters = self.algo_state.counters()
        return losses[:n]

    def _fail(self, diagnose: Callable[[], NonFiniteError]) -> None:
        """Raise or record what `diagnose` finds; once recorded, later failures are not diagnosed again."""
        if self.on_nonfinite == "raise":
            raise diagnose()
        if self.nonfinite is None:
            self.nonfinite = diagnose()

    def _diagnose_loss(self, k: int, neighbours: Tensor) -> NonFiniteError:
        """Local agent k's loss is not finite: blame a received model if one is, else the loss."""
        plan, agent = self.ctx.plan, self.plan.local[k]
        for e in (plan.in_dst == k).nonzero().flatten().tolist():
            if not torch.isfinite(neighbours[e]).all():  # the cause, not the symptom
                return NonFiniteError(self.stats.steps, agent,
                                      f"model received from agent {int(plan.in_src[e])} in round 1")
        return NonFiniteError(self.stats.steps, agent, "loss")

    def _diagnose_update(self, k: int, neighbours: Tensor, g_self: Tensor, mv: Tensor | None,
                         dv: Tensor | None) -> NonFiniteError:
        """Name what made local agent k's update non-finite: a received message, or its own gradient."""
        plan, step = self.ctx.plan, self.stats.steps
        agent = self.plan.local[k]
        for e in (plan.in_dst == k).nonzero().flatten().tolist():
            if not torch.isfinite(neighbours[e]).all():
                return NonFiniteError(step, agent, f"model received from agent {int(plan.in_src[e])} in round 1")
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
