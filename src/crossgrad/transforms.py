"""Direction transforms: weight decay, momentum (heavy ball, Nesterov) and QGM, on flat rows [n, P].

Contract steps 7-8 (ARCHITECTURE.md section 1). Each transform turns the combined gradient into a
direction with `update(d, x_half, lr)`, owns its state (created from the initial rows x0) and saves
and restores it, so any chain of them resumes bit-exactly. `Chain.apply` also takes step 9, the
last transform fused with it, so that no [n, P] direction is ever materialised: on parameter-heavy
models each pass over the rows costs as much as a small model's forward pass.
`transforms_for(algorithm, x0, lr)` builds the chain an algorithm's hyperparameters ask for.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from crossgrad.algorithms.base import Algorithm


class Transform(Protocol):
    def update(self, d: Tensor, x_half: Tensor, lr: float) -> Tensor:
        """The new direction for combined gradient d at the gossiped rows x_half; updates own state."""
        ...

    def apply(self, d: Tensor, x_half: Tensor, lr: float) -> None:
        """Steps 8-9 in place: x_half <- x_half - lr * update(d, x_half, lr); d may be overwritten."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: on CPU a fused update walks its rows in flat chunks of this many elements, so that its several passes
#: over a chunk hit the cache, not memory: 20 % faster on [16, 1.1M] rows (benchmarks/RESULTS.md)
CHUNK = 1 << 16


def _chunks(*tensors: Tensor):
    """The same flat chunk of each tensor in turn (contiguous CPU tensors of one shape), else the tensors
    whole, e.g. on a GPU, where one kernel over everything is fastest. Elementwise work gives the same
    values either way."""
    first = tensors[0]
    if first.device.type != "cpu" or not all(t.is_contiguous() and t.shape == first.shape for t in tensors):
        yield tensors
        return
    flats = [t.view(-1) for t in tensors]
    for a in range(0, first.numel(), CHUNK):
        yield tuple(f[a : a + CHUNK] for f in flats)


def _load_rows(mine: Tensor, theirs: Tensor, what: str) -> None:
    """Copy a saved tensor into a live one: onto its device and dtype, refusing another shape."""
    if tuple(theirs.shape) != tuple(mine.shape):
        raise ValueError(f"{what} of shape {tuple(theirs.shape)} does not fit this run's {tuple(mine.shape)}")
    mine.copy_(theirs)


class WeightDecay:
    """d + lambda * x_half (step 7); stateless."""

    def __init__(self, weight_decay: float):
        self.weight_decay = weight_decay

    def update(self, d: Tensor, x_half: Tensor, lr: float) -> Tensor:
        return d.add(x_half, alpha=self.weight_decay)

    def apply(self, d: Tensor, x_half: Tensor, lr: float) -> None:
        x_half.mul_(1 - lr * self.weight_decay).sub_(d, alpha=lr)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Momentum:
    """m <- beta m + d; the direction is m (heavy ball) or d + beta m (Nesterov)."""

    def __init__(self, x0: Tensor, beta: float, nesterov: bool):
        self.beta, self.nesterov = beta, nesterov
        self.m = torch.zeros_like(x0)

    def update(self, d: Tensor, x_half: Tensor, lr: float) -> Tensor:
        torch.add(d, self.m, alpha=self.beta, out=self.m)
        return torch.add(d, self.m, alpha=self.beta) if self.nesterov else self.m

    def apply(self, d: Tensor, x_half: Tensor, lr: float) -> None:
        beta = self.beta
        for dc, mc, xc in _chunks(d, self.m, x_half):
            torch.add(dc, mc, alpha=beta, out=mc)
            if self.nesterov:
                xc.sub_(dc, alpha=lr).sub_(mc, alpha=lr * beta)
            else:
                xc.sub_(mc, alpha=lr)

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load_rows(self.m, state["m"], "momentum buffer")


class QGM:
    """Quasi-global momentum: the buffer follows the model's own displacement, not the gradients.

    m_hat <- beta m_hat + (1 - beta)(x_prev - x_half) / lr_prev; x_prev <- x_half; m = beta m_hat + d;
    the direction is m, or d + beta m with Nesterov. x_prev starts at x0 and lr_prev at the initial lr.
    """

    def __init__(self, x0: Tensor, beta: float, nesterov: bool, lr: float):
        self.beta, self.nesterov = beta, nesterov
        self.m_hat = torch.zeros_like(x0)
        self.x_prev = x0.clone()
        self.lr_prev = float(lr)

    def _follow(self, x_prev: Tensor, m_hat: Tensor, x_half: Tensor) -> None:
        """m_hat and x_prev (or a chunk of them) after this step's displacement (x_prev doubles as scratch)."""
        x_prev.sub_(x_half)
        m_hat.mul_(self.beta).add_(x_prev, alpha=(1 - self.beta) / self.lr_prev)
        x_prev.copy_(x_half)

    def update(self, d: Tensor, x_half: Tensor, lr: float) -> Tensor:
        self._follow(self.x_prev, self.m_hat, x_half)
        self.lr_prev = lr
        m = torch.add(d, self.m_hat, alpha=self.beta)
        return torch.add(d, m, alpha=self.beta) if self.nesterov else m

    def apply(self, d: Tensor, x_half: Tensor, lr: float) -> None:
        # m = d + beta m_hat; Nesterov's d + beta m = (1 + beta) d + beta^2 m_hat
        beta = self.beta
        for dc, pc, mc, xc in _chunks(d, self.x_prev, self.m_hat, x_half):
            self._follow(pc, mc, xc)
            if self.nesterov:
                xc.sub_(dc, alpha=lr * (1 + beta)).sub_(mc, alpha=lr * beta * beta)
            else:
                xc.sub_(dc, alpha=lr).sub_(mc, alpha=lr * beta)
        self.lr_prev = lr

    def state_dict(self) -> dict[str, Any]:
        return {"m_hat": self.m_hat.clone(), "x_prev": self.x_prev.clone(), "lr_prev": self.lr_prev}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load_rows(self.m_hat, state["m_hat"], "QGM buffer m_hat")
        _load_rows(self.x_prev, state["x_prev"], "QGM x_prev")
        self.lr_prev = float(state["lr_prev"])


class Chain:
    """Applies transforms in order; its state is theirs, by position."""

    def __init__(self, *transforms: Transform):
        self.transforms = transforms

    def update(self, d: Tensor, x_half: Tensor, lr: float) -> Tensor:
        for t in self.transforms:
            d = t.update(d, x_half, lr)
        return d

    def apply(self, d: Tensor, x_half: Tensor, lr: float) -> None:
        """Steps 7-9 in place on x_half, the last transform fused with the step."""
        if not self.transforms:
            x_half.sub_(d, alpha=lr)
            return
        for t in self.transforms[:-1]:
            d = t.update(d, x_half, lr)
        self.transforms[-1].apply(d, x_half, lr)

    def state_dict(self) -> dict[str, Any]:
        return {"kinds": [type(t).__name__ for t in self.transforms],
                "states": [t.state_dict() for t in self.transforms]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kinds = [type(t).__name__ for t in self.transforms]
        if list(state["kinds"]) != kinds:
            raise ValueError(f"saved transforms {list(state['kinds'])} do not match this run's {kinds} "
                             "(weight decay / momentum / QGM settings differ)")
        for t, s in zip(self.transforms, state["states"]):
            t.load_state_dict(s)


def chain(*transforms: Transform) -> Chain:
    return Chain(*transforms)


def transforms_for(algorithm: Algorithm, x0: Tensor, lr: float) -> Chain:
    """Steps 7-8 as the algorithm's weight_decay, momentum, nesterov and qgm ask: decay, then momentum or QGM
    (none for an algorithm with its own momentum, Algorithm.own_momentum)."""
    a = algorithm
    parts: list[Transform] = []
    if a.own_momentum:  # its momentum and weight decay are in its combine
        return chain()
    if a.transform_weight_decay:
        parts.append(WeightDecay(a.transform_weight_decay))
    if a.qgm:
        parts.append(QGM(x0, a.momentum, a.nesterov, lr))
    elif a.momentum > 0:
        parts.append(Momentum(x0, a.momentum, a.nesterov))
    return chain(*parts)
