"""Seeded partitions of a labelled dataset into per-agent index lists (the non-IID part)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class PartitionError(ValueError):
    """A partition is impossible or leaves an agent without data."""


PARTITIONS = ("iid", "label_sorted", "dirichlet", "shards")


def _by_class_shuffled(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices sorted by label, shuffled within each class (so file order does not matter)."""
    order = rng.permutation(len(labels))
    return order[np.argsort(labels[order], kind="stable")]


def partition(labels: Tensor | np.ndarray, n_agents: int, method: str = "iid", seed: int = 0, *,
              beta: float = 0.5, shards_per_agent: int = 2) -> list[Tensor]:
    """Index lists, one per agent.

    - ``iid``: a seeded random split into near-equal parts.
    - ``label_sorted``: the paper's full label skew: sort by label and give agent r the r-th
      contiguous chunk (5 agents on a balanced 10-class set: 2 classes each).
    - ``dirichlet``: per class, proportions over agents drawn from Dir(beta); small beta = more skew.
    - ``shards``: sort by label, cut into n_agents * shards_per_agent shards, deal them at random.
    """
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).astype(np.int64).reshape(-1)
    n = len(y)
    if isinstance(n_agents, bool) or not isinstance(n_agents, (int, np.integer)) or n_agents < 1:
        raise PartitionError(f"n_agents must be a positive integer, not {n_agents!r}")
    if n_agents > n:
        raise PartitionError(f"cannot split {n} samples among {n_agents} agents")
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = np.array_split(rng.permutation(n), n_agents)
    elif method == "label_sorted":
        parts = np.array_split(_by_class_shuffled(y, rng), n_agents)
    elif method == "dirichlet":
        if not (beta > 0 and np.isfinite(beta)):
            raise PartitionError(f"dirichlet beta must be a positive number, not {beta}")
        buckets: list[list[np.ndarray]] = [[] for _ in range(n_agents)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_agents, beta))) * len(idx)).astype(np.int64)[:-1]
            for a, chunk in enumerate(np.split(idx, cuts)):
                buckets[a].append(chunk)
        parts = [np.sort(np.concatenate(b)) for b in buckets]
    elif method == "shards":
        if isinstance(shards_per_agent, bool) or not isinstance(shards_per_agent, (int, np.integer)) \
                or shards_per_agent < 1:
            raise PartitionError(f"shards_per_agent must be a positive integer, not {shards_per_agent!r}")
        total = n_agents * shards_per_agent
        if total > n:
            raise PartitionError(f"{total} shards ({n_agents} agents x {shards_per_agent}) exceed {n} samples")
        shards = np.array_split(_by_class_shuffled(y, rng), total)
        deal = rng.permutation(total).reshape(n_agents, shards_per_agent)
        parts = [np.sort(np.concatenate([shards[s] for s in row])) for row in deal]
    else:
        raise PartitionError(f"unknown partition {method!r}; available: {', '.join(PARTITIONS)}")
    empty = [a for a, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise PartitionError(f"the {method} partition leaves agent(s) {empty} without data; "
                             "use fewer agents" + (" or a larger beta" if method == "dirichlet" else ""))
    return [torch.from_numpy(np.asarray(p, dtype=np.int64)) for p in parts]


def class_histogram(labels: Tensor | np.ndarray, parts: list[Tensor], num_classes: int) -> Tensor:
    """[n_agents, num_classes]: how many samples of each class every agent holds."""
    y = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels), dtype=torch.long)
    return torch.stack([torch.bincount(y[p], minlength=num_classes) for p in parts])


def format_histogram(hist: Tensor, classes: list[str] | None = None) -> str:
    """A small text table: one row per agent, one column per class, plus the total."""
    n, c = hist.shape
    names = [str(k) for k in (classes or range(c))]
    width = max(max(len(s) for s in names), len(str(int(hist.max()))) if hist.numel() else 1)
    head = "agent | " + " ".join(s[:width].rjust(width) for s in names) + " |  total"
    lines = [head, "-" * len(head)]
    for a in range(n):
        row = " ".join(str(int(v)).rjust(width) for v in hist[a])
        lines.append(f"{a:5d} | {row} | {int(hist[a].sum()):6d}")
    return "\n".join(lines)
