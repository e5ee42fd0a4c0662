"""The synchronous iteration of the contract (ARCHITECTURE.md section 1), written once against `Comm`.

The engine owns the local agents' state as flat rows: parameters x [n_local, P], buffers (e.g.
batch-norm statistics, per agent), momentum, error memories and the algorithm's own state. It asks
the backend to move tensors and a gradient evaluator to run (model, minibatch) pairs.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from crossgrad.algorithms import Algorithm, CombineContext, combine_weights
from crossgrad.algorithms.momentum import MomentumState
from crossgrad.comm.base import Comm
from crossgrad.compress import Compressor, error_feedback, make_compressor
from crossgrad.flat import ParamLayout
from crossgrad.topology import Topology

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
    """Counters since the start of the run (restored with the engine's state)."""

    steps: int = 0
    grad_evals: int = 0
    qp_failures: int = 0
    last_losses: list[float] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        model: nn.Module,
        topology: Topology,
        algorithm: Algorithm,
        comm: Comm,
        loss_fn: LossFn,
        device: torch.device | str | None = None,
        evaluator: str = "auto",
    ):
        if evaluator not in ("auto", "loop", "vmap"):
            raise ValueError(f"evaluator must be 'auto', 'loop' or 'vmap', not {evaluator!r}")
        self.algorithm = algorithm
        self.topology = topology
        self.comm = comm
        self.plan = plan = comm.plan
        self.layout = layout = ParamLayout.of(model)
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = first.dtype
        model = model.to(self.device)
        n = plan.n_local
        self.x = layout.flatten(model).to(self.device).repeat(n, 1)
        self.buffer_names = [name for name, _ in model.named_buffers()]
        self.buffers = [b.detach().unsqueeze(0).repeat(n, *([1] * b.dim())).clone() for b in model.buffers()]
        self.lr = algorithm.lr
        self.momentum = MomentumState(self.x, algorithm.momentum, algorithm.nesterov, algorithm.qgm, self.lr)
        self_w, in_w, out_w = combine_weights(topology.W, plan, algorithm.weights, topology.is_directed)
        dev = self.device
        self.ctx = CombineContext(
            plan=type(plan)(plan.n, plan.local, *(t.to(dev) for t in (plan.in_src, plan.in_dst, plan.out_dst,
                                                                          plan.out_src))),
            layout=layout, self_w=self_w.to(dev), in_w=in_w.to(dev), out_w=out_w.to(dev),
        )
        self.gossip_self = (1 - algorithm.gamma + algorithm.gamma * self_w).to(self.dtype).to(dev)
        self.gossip_in = (algorithm.gamma * in_w).to(self.dtype).to(dev)
        self.algo_state = algorithm.init_state(self.ctx, self.dtype, dev)
        self.compressor: Compressor | None = None
        self.edge_memory = self.self_memory = None
        if algorithm.compression is not None:
            self.compressor = make_compressor(algorithm.compression, layout)
            self.edge_memory = torch.zeros(len(plan.in_src), layout.size, dtype=self.dtype, device=dev)
            if algorithm.compress_self:
                self.self_memory = torch.zeros_like(self.x)
        self.evaluate = LoopEvaluator(model, layout, loss_fn)
        self.evaluate_batched: VmapEvaluator | None = None
        has_buffers = bool(self.buffers)
        if evaluator == "vmap" and has_buffers:
            raise ValueError("evaluator='vmap' needs a model without buffers (use norm 'evonorm', 'group' or 'none')")
        if evaluator == "vmap" or (evaluator == "auto" and self.device.type == "cuda" and not has_buffers):
            self.evaluate_batched = VmapEvaluator(model, layout, loss_fn)
        n_pairs = n + (len(plan.in_src) if algorithm.cross_gradients else 0)
        self.grads = torch.empty(n_pairs, layout.size, dtype=self.dtype, device=dev)
        self._pair_data = list(range(n)) + (plan.in_dst.tolist() if algorithm.cross_gradients else [])
        self.stats = StepStats()
        self.clock = PhaseClock(self.device)
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
        self._check_finite(losses[:n], "loss", neighbours)
        clock.tick("gradients")
        g_self, mv = self.grads[:n], (self.grads[n:] if algo.cross_gradients else None)
        dv = None
        if self.compressor is not None:
            payload, mv = error_feedback(self.compressor, mv, self.edge_memory)
            if self.self_memory is not None:
                g_self = error_feedback(self.compressor, g_self, self.self_memory, send=False)[1]
            clock.tick("compress")
            if algo.round2:
                received = self.comm.exchange_edges(payload)
                clock.tick("exchange")
                dv = self.compressor.decode(received, self.dtype)
                clock.tick("compress")
        elif algo.round2:
            dv = self.comm.exchange_edges((mv,))[0]
            clock.tick("exchange")
        self.last = {"g_self": g_self, "mv": mv, "dv": dv}
        d = algo.combine(self.ctx, g_self, mv, dv, self.algo_state)
        clock.tick("combine")
        if algo.weight_decay:
            d = d.add(x_half, alpha=algo.weight_decay)
        d = self.momentum.direction(d, x_half, self.lr)
        bad = ~torch.isfinite(d).all(dim=1)
        if bad.any():  # one reduction per step; the diagnosis only runs on failure
            self._raise_nonfinite(int(bad.nonzero()[0, 0]), neighbours, g_self, mv, dv)
        self.x = x_half.sub_(d, alpha=self.lr)
        clock.tick("update")
        self.stats.steps += 1
        self.stats.grad_evals += len(self._pair_data)
        self.stats.qp_failures = self.algo_state.get("qp_failures", 0)
        return losses[:n]

    def _raise_nonfinite(self, k: int, neighbours: Tensor, g_self: Tensor, mv: Tensor | None,
                         dv: Tensor | None) -> None:
        """Name what made local agent k's update non-finite: a received message, or its own gradient."""
        plan, step = self.ctx.plan, self.stats.steps
        agent = self.plan.local[k]
        for e in (plan.in_dst == k).nonzero().flatten().tolist():
            if not torch.isfinite(neighbours[e]).all():
                raise NonFiniteError(step, agent, f"model received from agent {int(plan.in_src[e])} in round 1")
        if dv is not None:
            for e in (plan.out_src == k).nonzero().flatten().tolist():
                if not torch.isfinite(dv[e]).all():
                    raise NonFiniteError(step, agent,
                                         f"cross-gradient received from agent {int(plan.out_dst[e])} in round 2")
        if not torch.isfinite(g_self[k]).all():
            raise NonFiniteError(step, agent, "self-gradient")
        if mv is not None:
            for e in (plan.in_dst == k).nonzero().flatten().tolist():
                if not torch.isfinite(mv[e]).all():
                    raise NonFiniteError(step, agent, f"cross-gradient of agent {int(plan.in_src[e])}'s model")
        raise NonFiniteError(step, agent, "update (overflow in combine or momentum)")

    def _check_finite(self, values: Tensor, what: str, neighbours: Tensor | None = None) -> None:
        bad = ~torch.isfinite(values)
        if bad.any():
            k = int(bad.nonzero()[0, 0])
            agent, plan = self.plan.local[k], self.ctx.plan
            for e in ((plan.in_dst == k).nonzero().flatten().tolist() if neighbours is not None else []):
                if not torch.isfinite(neighbours[e]).all():  # the cause, not the symptom
                    raise NonFiniteError(self.stats.steps, agent,
                                         f"model received from agent {int(plan.in_src[e])} in round 1")
            raise NonFiniteError(self.stats.steps, agent, what)

    def state_dict(self) -> dict[str, Any]:
        return {
            "x": self.x.clone(),
            "buffers": [b.clone() for b in self.buffers],
            "lr": self.lr,
            "momentum": self.momentum.state_dict(),
            "edge_memory": self.edge_memory,
            "self_memory": self.self_memory,
            "algo_state": {k: v for k, v in self.algo_state.items() if k in ("v", "qp_failures")},
            "bytes_sent": self.comm.bytes_sent.clone(),
            "stats": {"steps": self.stats.steps, "grad_evals": self.stats.grad_evals},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["x"].shape != self.x.shape:
            raise ValueError(f"checkpoint holds parameters of shape {tuple(state['x'].shape)}, "
                             f"this run has {tuple(self.x.shape)}")
        self.x.copy_(state["x"])
        for mine, theirs in zip(self.buffers, state["buffers"]):
            mine.copy_(theirs)
        self.lr = float(state["lr"])
        self.momentum.load_state_dict(state["momentum"])
        for key in ("edge_memory", "self_memory"):
            if getattr(self, key) is not None:
                getattr(self, key).copy_(state[key])
        self.algo_state.update(state["algo_state"])
        self.comm.bytes_sent.copy_(state["bytes_sent"])
        self.stats.steps = int(state["stats"]["steps"])
        self.stats.grad_evals = int(state["stats"]["grad_evals"])
        self.stats.qp_failures = int(self.algo_state.get("qp_failures", 0))
