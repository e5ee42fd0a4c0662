"""Minibatches for a simulator from Python: every agent draws from its own shard, as the runner does.

    train, test = load_dataset("fashion_mnist", "../shared/data")
    batches = BatchStreams(train, partition(train.y, 5, "label_sorted"), batch_size=32, seed=0)
    sim.step(next(batches))          # one (inputs, targets) pair per agent

The inputs are normalised with the dataset's per-channel statistics (crossgrad.data.normalized);
evaluate on `normalized(test)` or with crossgrad.evaluate, which does it for you.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crossgrad.data.augment import dataset_stats, normalize
from crossgrad.data.datasets import Dataset


def normalized(ds: Dataset) -> Tensor:
    """A dataset's inputs as float32, scaled by its per-channel mean and std (what models are trained on)."""
    x = normalize(ds.x, dataset_stats(ds.name)).float()
    # row-major strides for certain: with one channel, channels-last strides also count as "contiguous",
    # and GroupNorm under vmap (evaluation) refuses them
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def agent_seeds(seed: int, n: int, stream: int) -> list[int]:
    """Independent 63-bit seeds for n agents, from the run seed and a stream id."""
    ss = np.random.SeedSequence([int(seed), int(stream)])
    return [int(s) for s in ss.generate_state(n, dtype=np.uint64) >> np.uint64(1)]


class AgentStream:
    """An endless, reshuffling stream of one agent's sample indices.

    The shuffling runs on the CPU (the same order on every device); each permutation is then moved to
    `device` once, so drawing a batch is a slice there, with no host-to-device copy per step.
    """

    def __init__(self, indices: Tensor, seed: int, device: torch.device | str = "cpu"):
        self.indices = indices.to("cpu")
        self.device = torch.device(device)
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = self._shuffle()
        self.pos = 0

    def _shuffle(self) -> Tensor:
        return self.indices[torch.randperm(len(self.indices), generator=self.gen)].to(self.device)

    def next(self, size: int) -> Tensor:
        parts, need = [], size
        while need > 0:
            if self.pos >= len(self.perm):
                self.perm, self.pos = self._shuffle(), 0
            take = self.perm[self.pos : self.pos + need]
            self.pos += len(take)
            need -= len(take)
            parts.append(take)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def peek(self, size: int) -> Tensor:
        """`size` indices without drawing them: the stream stays where it is (an absent agent's batch)."""
        ahead = self.perm[self.pos :] if self.pos < len(self.perm) else self.perm
        reps = -(-size // len(ahead))  # a shard smaller than the batch repeats
        return (ahead.repeat(reps) if reps > 1 else ahead)[:size]

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "perm": self.perm.to("cpu", copy=True), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.perm = state["perm"].to(self.device, copy=True)
        self.pos = int(state["pos"])


class BatchStreams:
    """Endless minibatches for n agents: `next(streams)` gives agent i its batch at position i.

    Agent i walks `parts[i]` in its own seeded order (an `AgentStream`) and reshuffles when it runs out, so every
    agent gets a full batch at every step (the runner's streams, with the same seeds).
    """

    def __init__(self, dataset: Dataset, parts: Sequence[Tensor], batch_size: int, seed: int = 0,
                 device: torch.device | str = "cpu"):
        self.x, self.y = normalized(dataset).to(device), dataset.y.long().to(device)
        self.batch_size = batch_size
        seeds = agent_seeds(seed, len(parts), 1)
        self.streams = [AgentStream(torch.as_tensor(p, dtype=torch.long), s) for p, s in zip(parts, seeds, strict=True)]

    def __iter__(self) -> BatchStreams:
        return self

    def __next__(self) -> list[tuple[Tensor, Tensor]]:
        out = []
        for stream in self.streams:
            idx = stream.next(self.batch_size).to(self.x.device)
            out.append((self.x.index_select(0, idx), self.y.index_select(0, idx)))
        return out
