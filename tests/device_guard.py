"""Catch tensors created on the wrong device without a GPU.

Inside `no_implicit_device()` every factory call that names no device (torch.tensor, arange, zeros, ...)
lands on the "meta" device, and the mode below fails the moment such a tensor comes out of any torch
function. On CUDA the same line would build a CPU tensor and crash (or silently copy) when mixed with the
run's tensors; here it fails on every machine, naming the call in the traceback.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


class _RefuseMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
                raise AssertionError(f"torch.{name} made a tensor without naming its device")
        return out


@contextlib.contextmanager
def no_implicit_device():
    with torch.device("meta"), _RefuseMeta():
        yield
