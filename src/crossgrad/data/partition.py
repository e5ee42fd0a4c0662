"""Seeded partitions of a labelled dataset into per-agent index lists (the non-IID part)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


class PartitionError(ValueError):
    """A partition is impossible or leaves an agent without data."""


PARTITIONS = ("iid", "label_sorted", "dirichlet", "dirichlet_even", "shards", "classes")

#: dirichlet_even: the agents are drawn for in groups of at most this many (pcode's "auxiliary workers")
_GROUP = 10
#: dirichlet_even: draws for one group before the partition is declared impossible (the reference loops
#: forever); CIFAR-10 at beta 0.01 on 10 agents needed a median of 122 and at most 663 in 20 seeds
_MAX_DRAWS = 10_000


def _by_class_shuffled(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices sorted by label, shuffled within each class (so file order does not matter)."""
    order = rng.permutation(len(labels))
    return order[np.argsort(labels[order], kind="stable")]


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PartitionError(f"{name} must be a positive integer, not {value!r}")


def _dirichlet_even(y: np.ndarray, n_agents: int, beta: float, seed: int) -> list[np.ndarray]:
    """Tao Lin's pcode partitioner (as epfml/relaysgd runs it), draw for draw, then cut into equal slices."""
    # the reference's legacy generator, so that a seed gives the partition the published code gives;
    # RandomState takes 32-bit seeds, larger ones (crossgrad allows < 2**63) as two words
    rs = np.random.RandomState(seed if seed < 2**32 else [seed & 0xFFFFFFFF, seed >> 32])
    n = len(y)
    order = rs.permutation(n)
    classes = np.unique(y)
    n_groups = math.ceil(n_agents / _GROUP)
    full = int(_GROUP / n_agents * n)  # a full group's share of the samples, rounded as the reference does
    bounds = [g * full for g in range(n_groups)] + [n]
    lists: list[np.ndarray] = []
    for g in range(n_groups):
        chunk = order[bounds[g]:bounds[g + 1]]
        m = min(_GROUP, n_agents - g * _GROUP)
        lists += _dirichlet_group(chunk, [chunk[y[chunk] == c] for c in classes], m, beta, rs)
    # the group lists concatenated and cut into contiguous slices: every agent holds N/n samples (pcode drops
    # the N mod n left over; they are kept here, as in relaysgd, so slices differ by at most one sample)
    return [np.sort(p) for p in np.array_split(np.concatenate(lists), n_agents)]


def _dirichlet_group(chunk: np.ndarray, by_class: list[np.ndarray], m: int, beta: float,
                     rs: np.random.RandomState) -> list[np.ndarray]:
    """Deal one group's chunk to its m agents: per class Dir(beta) shares, redrawn until none is below half the mean."""
    mean = len(chunk) / m
    for _ in range(_MAX_DRAWS):
        lists: list[list[np.ndarray]] = [[] for _ in range(m)]
        sizes = np.zeros(m, dtype=np.int64)
        for idx in by_class:
            draw = rs.dirichlet(np.full(m, beta))
            if not np.isfinite(draw).all():
                # for beta below about 0.001 every gamma variate of a draw can underflow, and Dir gives 0/0;
                # the reference's NaN cut points then hand the whole class to the group's last agent
                pieces = [idx[:0]] * (m - 1) + [idx]
            else:
                share = draw * (sizes < mean)  # agents already above the mean size take no more
                total = share.sum()
                if total == 0:  # every agent at the mean: the chunk is dealt, no sample of this class is left
                    continue
                pieces = np.split(idx, (np.cumsum(share / total) * len(idx)).astype(np.int64)[:-1])
            for a, piece in enumerate(pieces):
                lists[a].append(piece)
                sizes[a] += len(piece)
        if sizes.min() >= int(0.5 * len(chunk) / m):
            return [np.concatenate(p) if p else np.zeros(0, np.int64) for p in lists]
    raise PartitionError(f"dirichlet_even: {_MAX_DRAWS} draws of Dir({beta}) over {m} agents all left an agent "
                         "below half the mean size; use a larger beta or fewer agents")


def _by_classes(y: np.ndarray, n_agents: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each agent holds exactly k classes; a class's samples are split evenly among the agents that hold it."""
    classes = np.unique(y)
    c = len(classes)
    if k > c:
        raise PartitionError(f"classes_per_agent={k} exceeds the {c} classes in the data")
    if n_agents * k < c:
        raise PartitionError(f"{n_agents} agents x classes_per_agent={k} cover only {n_agents * k} of the {c} "
                             "classes; use more agents or more classes per agent")
    # each agent in turn takes the k classes held by the fewest agents so far, ties broken at random: so every
    # class goes to floor(nk/c) or ceil(nk/c) agents; the turns go in a seeded order, so that which agents
    # share classes does not follow their index (their neighbours on a ring)
    held = np.empty((n_agents, k), dtype=classes.dtype)
    count = np.zeros(c, dtype=np.int64)
    for a in rng.permutation(n_agents):
        pick = np.lexsort((rng.random(c), count))[:k]
        held[a] = classes[pick]
        count[pick] += 1
    lists: list[list[np.ndarray]] = [[] for _ in range(n_agents)]
    for cls in classes:
        holders = np.flatnonzero((held == cls).any(axis=1))
        idx = rng.permutation(np.flatnonzero(y == cls))
        if len(idx) < len(holders):
            raise PartitionError(f"class {cls} has {len(idx)} samples for the {len(holders)} agents that hold it; "
                                 "use fewer agents or fewer classes_per_agent")
        for a, piece in zip(holders, np.array_split(idx, len(holders)), strict=True):
            lists[a].append(piece)
    return [np.sort(np.concatenate(p)) for p in lists]


def partition(labels: Tensor | np.ndarray, n_agents: int, method: str = "iid", seed: int = 0, *,
              beta: float = 0.5, shards_per_agent: int = 2, classes_per_agent: int | None = None) -> list[Tensor]:
    """Index lists, one per agent.

    - ``iid``: a seeded random split into near-equal parts.
    - ``label_sorted``: the paper's full label skew: sort by label and give agent r the r-th
      contiguous chunk (5 agents on a balanced 10-class set: 2 classes each).
    - ``dirichlet``: per class, proportions over agents drawn from Dir(beta); small beta = more skew.
    - ``dirichlet_even``: Tao Lin's pcode partitioner, used by the papers since 2021 (QGM, RelaySGD, GUT, ...):
      shuffle; split the data into ceil(n/10) chunks and the agents into groups of at most 10; per group and
      class Dir(beta) shares, agents above the mean size zeroed, redrawn until every agent has half the mean;
      then all lists concatenated and cut into n contiguous slices of N/n samples each (so the class mix
      varies, the sizes do not). The same seed gives the reference code's partition.
    - ``shards``: sort by label, cut into n_agents * shards_per_agent shards, deal them at random.
    - ``classes``: each agent holds exactly ``classes_per_agent`` classes (the Momentum Tracking paper's
      setting), every class held by floor or ceil of n * k / C agents, its samples split evenly among them.
    """
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).astype(np.int64).reshape(-1)
    n = len(y)
    _positive_int("n_agents", n_agents)
    if n_agents > n:
        raise PartitionError(f"cannot split {n} samples among {n_agents} agents")
    if method in ("dirichlet", "dirichlet_even") and not (beta > 0 and np.isfinite(beta)):
        raise PartitionError(f"{method} beta must be a positive number, not {beta}")
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = np.array_split(rng.permutation(n), n_agents)
    elif method == "label_sorted":
        parts = np.array_split(_by_class_shuffled(y, rng), n_agents)
    elif method == "dirichlet":
        buckets: list[list[np.ndarray]] = [[] for _ in range(n_agents)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_agents, beta))) * len(idx)).astype(np.int64)[:-1]
            for a, chunk in enumerate(np.split(idx, cuts)):
                buckets[a].append(chunk)
        parts = [np.sort(np.concatenate(b)) for b in buckets]
    elif method == "dirichlet_even":
        parts = _dirichlet_even(y, n_agents, beta, seed)
    elif method == "shards":
        _positive_int("shards_per_agent", shards_per_agent)
        total = n_agents * shards_per_agent
        if total > n:
            raise PartitionError(f"{total} shards ({n_agents} agents x {shards_per_agent}) exceed {n} samples")
        shards = np.array_split(_by_class_shuffled(y, rng), total)
        deal = rng.permutation(total).reshape(n_agents, shards_per_agent)
        parts = [np.sort(np.concatenate([shards[s] for s in row])) for row in deal]
    elif method == "classes":
        if classes_per_agent is None:
            raise PartitionError("the classes partition needs classes_per_agent (the classes each agent holds)")
        _positive_int("classes_per_agent", classes_per_agent)
        parts = _by_classes(y, n_agents, int(classes_per_agent), rng)
    else:
        raise PartitionError(f"unknown partition {method!r}; available: {', '.join(PARTITIONS)}")
    empty = [a for a, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise PartitionError(f"the {method} partition leaves agent(s) {empty} without data; "
                             "use fewer agents" + (" or a larger beta" if method.startswith("dirichlet") else ""))
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
