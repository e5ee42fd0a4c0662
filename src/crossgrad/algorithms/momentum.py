"""Weight decay, momentum (none, heavy ball, Nesterov, QGM) and the step, on flat [n, P] rows.

Steps 7-9 of the contract; shared by every algorithm so each momentum form works with each.
"""
from __future__ import annotations

import torch
from torch import Tensor


class MomentumState:
    """Per-agent optimizer state. QGM keeps m_hat, x_prev and the previous step's learning rate."""

    def __init__(self, x0: Tensor, beta: float, nesterov: bool, qgm: bool, lr: float):
        self.beta, self.nesterov, self.qgm = beta, nesterov, qgm
        self.m = torch.zeros_like(x0) if beta > 0 and not qgm else None
        self.m_hat = torch.zeros_like(x0) if qgm else None
        self.x_prev = x0.clone() if qgm else None
        self.lr_prev = lr

    def direction(self, d: Tensor, x_half: Tensor, lr: float) -> Tensor:
        """Turn the (decayed) combined gradient d into the step direction; updates state in place."""
        beta = self.beta
        if self.qgm:
            self.m_hat.mul_(beta).add_(self.x_prev - x_half, alpha=(1 - beta) / self.lr_prev)
            self.x_prev.copy_(x_half)
            self.lr_prev = lr
            m = torch.add(d, self.m_hat, alpha=beta)
            return torch.add(d, m, alpha=beta) if self.nesterov else m
        if self.m is None:
            return d
        self.m.mul_(beta).add_(d)
        return torch.add(d, self.m, alpha=beta) if self.nesterov else self.m

    def state_dict(self) -> dict:
        return {"m": self.m, "m_hat": self.m_hat, "x_prev": self.x_prev, "lr_prev": self.lr_prev}

    def load_state_dict(self, state: dict) -> None:
        for key in ("m", "m_hat", "x_prev"):
            mine, theirs = getattr(self, key), state[key]
            if (mine is None) != (theirs is None):
                raise ValueError(f"momentum state {key!r} does not match this algorithm's configuration")
            if mine is not None:
                mine.copy_(theirs)
        self.lr_prev = float(state["lr_prev"])
