"""Checkpoints: versioned, validated before anything is restored, written atomically, loaded as data only.

A checkpoint holds the run's progress (step, metrics, elapsed time, the resolved config) and one
*part* per process: that process's engine, batch streams, random generators and running totals.
A run on one process (the simulator) keeps its part at the top level; a run on several processes
(torch.distributed, a block of agents per rank) keeps them under "ranks", in rank order.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossgrad.comm.base import agent_blocks
from crossgrad.files import atomic_write
from crossgrad.run.config import saved_config_data
from crossgrad.run.rundir import RunError, comparable_config, one_line

#: 2: the engine's state is assembled from its pieces (transforms, codecs, algorithm state)
CHECKPOINT_VERSION = 2
#: what every process's part holds
PART_KEYS = ("sim", "streams", "aug_gens", "torch_rng", "acc")


def to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def pack(common: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The checkpoint of a run whose processes' parts are `parts` (in process order)."""
    layout = parts[0] if len(parts) == 1 else {"ranks": parts}
    return {"version": CHECKPOINT_VERSION, **common, **layout}


def split(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The parts of a checkpoint, one per process that wrote it (inverse of `pack`)."""
    return list(state["ranks"]) if "ranks" in state else [state]


def environment(device: torch.device) -> dict[str, Any]:
    """What besides the state decides the last bits of the numbers: torch's version, its threads, the device."""
    return {"torch": str(torch.__version__), "threads": torch.get_num_threads(), "device": str(device)}


def environment_changes(saved: Any, now: dict[str, Any]) -> list[str]:
    """How `now` differs from the environment a checkpoint was written in, as "threads 2 -> 1" items."""
    if not isinstance(saved, dict):
        return ["an unrecorded environment"]
    return [f"{k} {saved.get(k)} -> {v}" for k, v in now.items() if saved.get(k) != v]


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f), what="checkpoint")


def read_checkpoint(path: Path, cfg_dict: dict[str, Any], total_steps: int, n: int) -> dict[str, Any]:
    """Load and check a checkpoint of this run (config, step range, one part per process that wrote it, each
    with its agents' entries); RunError otherwise. It may come from any number of processes (see reblock)."""
    if not path.is_file():
        raise RunError(f"nothing to resume in {path.parent} (no {path.name})")
    try:  # data only: a checkpoint whose pickle refers to any code is refused, never executed
        with warnings.catch_warnings():  # torch's note on pickle protocols is noise next to our verdict
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem means a bad file
        text = str(e)
        if "Weights only load failed" in text:
            # torch's text ends by suggesting weights_only=False, i.e. running the file: never pass that on
            glob = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            name = glob.group(1) if glob else _first_global(path)
            m = re.search(r"WeightsUnpickler error:\s*([^\n]*)", text)
            detail = f"it refers to {name}" if name else (m.group(1) if m else "unsupported pickle content")
            raise RunError(
                f"cannot read {path}: it holds objects other than tensors and plain data "
                f"({one_line(detail, 200)}); refusing to load it (nothing in it was run)"
            ) from None
        reason = one_line(text, 200) or "empty file"
        raise RunError(f"cannot read {path}: corrupt or truncated ({reason})") from None
    if not isinstance(state, dict):
        raise RunError(f"cannot read {path}: not a crossgrad checkpoint")
    _check(state, path, cfg_dict, total_steps, n)
    return state


def _first_global(path: Path) -> str | None:
    """The first function or class a plain pickle file names (what it would import and call), if any."""
    import pickletools

    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):  # reads opcodes only; nothing is imported or run
                if op.name in ("GLOBAL", "INST"):
                    return str(arg).replace(" ", ".")
                if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return ".".join(strings[-2:])
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - a malformed pickle just has no name to report
        return None
    return None


def _check(state: dict[str, Any], path: Path, cfg_dict: dict[str, Any], total_steps: int, n: int) -> None:
    """Refuse a checkpoint that is not this run's, before touching any state."""
    version = state.get("version")
    if version != CHECKPOINT_VERSION:
        older = isinstance(version, int) and version < CHECKPOINT_VERSION
        raise RunError(
            f"cannot resume from {path}: checkpoint version {version!r} "
            f"({'an older crossgrad' if older else 'not this crossgrad'}'s format) is not supported; this crossgrad "
            f"reads version {CHECKPOINT_VERSION}: finish the run with the crossgrad that wrote it, or start it again"
        )
    mine, theirs = comparable_config(cfg_dict), comparable_config(saved_config_data(state.get("config")))
    if theirs is None:  # without it an edited config.toml would silently continue someone else's run
        raise RunError(f"cannot resume from {path}: it holds no configuration to check against this run's")
    if mine != theirs:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise RunError(
            f"cannot resume from {path}: it was written by another configuration "
            f"(differs in {', '.join(diff[:6])}{', ...' if len(diff) > 6 else ''})"
        )
    layout = ("ranks",) if "ranks" in state else PART_KEYS
    missing = [k for k in ("step", "metrics", *layout) if k not in state]
    if missing:
        raise RunError(f"cannot resume from {path}: not a complete checkpoint (missing {', '.join(missing)})")
    step = state["step"]
    if not isinstance(step, int) or not 0 <= step <= total_steps:
        raise RunError(f"cannot resume from {path}: step {step!r} is outside this run's 0..{total_steps}")
    written_by = len(state["ranks"]) if isinstance(state.get("ranks"), (list, tuple)) else 1
    if "ranks" in state and not 1 < written_by <= n:
        raise RunError(f"cannot resume from {path}: it does not hold one state per process (1 < processes <= {n})")
    for part, block in zip(split(state), agent_blocks(n, written_by)):
        if not isinstance(part, dict) or any(k not in part for k in PART_KEYS):
            raise RunError(f"cannot resume from {path}: not a complete checkpoint (a rank's state is incomplete)")
        for key in ("streams", "aug_gens"):
            if not isinstance(part[key], (list, tuple)) or len(part[key]) != len(block):
                raise RunError(f"cannot resume from {path}: {key} is not one entry per agent ({n})")
