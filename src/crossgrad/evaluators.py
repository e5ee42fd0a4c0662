"""Gradient evaluators: the gradients of many (parameter row, minibatch) pairs, written into rows of one block.

`LoopEvaluator` runs one worker module over the pairs in turn (any model, any device); `VmapEvaluator`
runs them all at once with torch.func (GPUs, models without buffers). Both read each pair's parameter row
in place through `PairRows`, so a step never stacks the models it evaluates unless a batched kernel needs it.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from crossgrad.flat import ParamLayout

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

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
