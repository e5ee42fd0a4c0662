"""Which device a run uses: a name from a config or a command line, checked against this machine."""
from __future__ import annotations

import torch

from crossgrad.errors import ConfigError


def resolve_device(name: str, option: str = "training.device") -> torch.device:
    """The device named by `option` as a torch device; one this machine or torch build lacks is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option}={name!r} is not a device torch knows "
                          "(use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}={name!r} but CUDA is not available")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{option}={name!r} but this machine has {torch.cuda.device_count()} GPU(s)")
    try:  # a backend this torch build or machine lacks (mps on Linux): its own error is a long blurb
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError):
        raise ConfigError(f"{option}={name!r} is not available with this torch build on this machine "
                          "(use auto, cpu, cuda or cuda:N)") from None
    return dev
