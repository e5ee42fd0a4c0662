"""A run's inputs: data, partition, model, topology and algorithm built from a config, and the agents' batches.

The training set is normalised once into a float tensor on the run's device; each agent draws
minibatches from its own shard by index, shuffled by its own `torch.Generator` (seeded from the
run seed and the agent's index, so an agent gets the same samples on every backend). An *epoch*
is one pass over the LARGEST shard: ceil(largest shard / batch_size) steps. Every agent always
gets a full `batch_size` minibatch; an agent whose shard runs out (a smaller shard, or the tail of
its current permutation) reshuffles and continues, so its stream never stops and no sample is
dropped. The seed fixes the model initialisation, the partition, every agent's batch order and
the augmentation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crossgrad.algorithms import ConfigError
from crossgrad.run.config import Config


@dataclass
class Prepared:
    """Everything a run needs, built and validated from a config before any training."""

    cfg: Config
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    shards: list[Tensor]
    input_shape: tuple[int, ...]
    num_classes: int
    model: torch.nn.Module
    topology: Any
    algorithm: Any
    device: torch.device
    augment: Any = None


def resolve_device(name: str) -> torch.device:
    """training.device as a torch device; asking for CUDA where there is none is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device={name!r} but CUDA is not available")
    return dev


def _normalised(ds: Any, name: str) -> Tensor:
    from crossgrad.data import augment as aug

    return aug.normalize(ds.x, aug.dataset_stats(name)).float().contiguous()


def prepare(cfg: Config, device: torch.device) -> Prepared:
    """Load data, partition it, build model, topology and algorithm. Raises user errors only for bad input."""
    from crossgrad.data import load_dataset, partition
    from crossgrad.models import make_model
    from crossgrad.topology import make_topology

    cfg.validate()
    topo = make_topology(
        cfg.topology.name, cfg.topology.n_agents, weights=cfg.topology.weights, **cfg.topology.options
    )
    algorithm = cfg.make_algorithm()
    d = cfg.data
    train, test = load_dataset(d.name, d.data_dir)
    shards = partition(
        train.y, topo.n, d.partition, cfg.training.seed, beta=d.beta, shards_per_agent=d.shards_per_agent
    )
    if cfg.training.batch_size > len(train.y):
        raise ConfigError(
            f"training.batch_size={cfg.training.batch_size} is larger than the whole {d.name} training set "
            f"({len(train.y)} samples)"
        )
    shards = [torch.as_tensor(s, dtype=torch.long) for s in shards]
    empty = [i for i, s in enumerate(shards) if len(s) == 0]
    if empty:
        raise ConfigError(
            f"the {d.partition} partition of {d.name} leaves agent(s) "
            f"{', '.join(map(str, empty))} without any training sample; use fewer agents "
            "or another partition"
        )
    input_shape = tuple(int(s) for s in train.input_shape)
    torch.manual_seed(cfg.training.seed)  # fixes the initialisation
    try:
        model = make_model(
            cfg.model.name, input_shape, train.num_classes, cfg.model.norm, **cfg.model.options
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"model {cfg.model.name!r} does not fit {d.name} "
            f"(input {'x'.join(map(str, input_shape))}, {train.num_classes} classes): {e}"
        ) from None
    augment = None
    if d.augment:
        from crossgrad.data.augment import Augment

        augment = Augment.for_dataset(d.name) if hasattr(Augment, "for_dataset") else Augment()
    return Prepared(
        cfg,
        _normalised(train, d.name).to(device),
        train.y.long().to(device),
        _normalised(test, d.name).to(device),
        test.y.long().to(device),
        shards,
        input_shape,
        train.num_classes,
        model.to(device),
        topo,
        algorithm,
        device,
        augment,
    )


def agent_seeds(seed: int, n: int, stream: int) -> list[int]:
    """Independent 63-bit seeds for n agents, from the run seed and a stream id."""
    ss = np.random.SeedSequence([int(seed), int(stream)])
    return [int(s) for s in ss.generate_state(n, dtype=np.uint64) >> np.uint64(1)]


class AgentStream:
    """An endless, reshuffling stream of one agent's sample indices."""

    def __init__(self, indices: Tensor, seed: int):
        self.indices = indices
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = self._shuffle()
        self.pos = 0

    def _shuffle(self) -> Tensor:
        return self.indices[torch.randperm(len(self.indices), generator=self.gen)]

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

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])


class AgentBatches:
    """The minibatches of some agents (`local`, global indices): one stream and one augmentation generator each.

    Batches are gathered from the device-resident training set, so nothing is copied per step but
    the index vector.
    """

    def __init__(self, p: Prepared, local: list[int], batch_size: int):
        seed, n = p.cfg.training.seed, len(p.shards)
        stream_seeds, aug_seeds = agent_seeds(seed, n, 1), agent_seeds(seed, n, 2)
        self.p, self.batch_size = p, batch_size
        self.streams = [AgentStream(p.shards[i].to("cpu"), stream_seeds[i]) for i in local]
        self.aug_gens = [torch.Generator().manual_seed(aug_seeds[i]) for i in local]

    def next(self) -> list[tuple[Tensor, Tensor]]:
        p, out = self.p, []
        for stream, gen in zip(self.streams, self.aug_gens, strict=True):
            idx = stream.next(self.batch_size).to(p.device)
            xb, yb = p.x_train.index_select(0, idx), p.y_train.index_select(0, idx)
            if p.augment is not None:
                xb = p.augment(xb, generator=gen)
            out.append((xb, yb))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"streams": [s.state_dict() for s in self.streams], "aug_gens": [g.get_state() for g in self.aug_gens]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, st in zip(self.streams, state["streams"], strict=True):
            s.load_state_dict(st)
        for g, st in zip(self.aug_gens, state["aug_gens"], strict=True):
            g.set_state(st)
