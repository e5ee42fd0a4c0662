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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from crossgrad.algorithms import ConfigError
from crossgrad.data.streams import AgentStream, agent_seeds
from crossgrad.run.config import Config, warmup_error


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
    #: the run's NetworkModel (crossgrad.comm.network), None without a [network] section
    network: Any = None


def prepare(cfg: Config, device: torch.device, quiet: bool = False) -> Prepared:
    """Load data, partition it, build model, topology and algorithm. Raises user errors only for bad input."""
    from crossgrad import console
    from crossgrad.comm.network import NetworkModel
    from crossgrad.data import load_dataset, normalized, partition
    from crossgrad.models import make_model
    from crossgrad.run.inputs import check_inputs
    from crossgrad.run.schedule import run_length

    topo, algorithm = check_inputs(cfg)  # before the data loads
    network = None if cfg.network is None else NetworkModel(cfg.network, topo, cfg.training.seed)
    d = cfg.data
    train, test = load_dataset(d.name, d.data_dir, progress=not quiet and console.bars_wanted(),
                               **d.loader_options())
    shards = partition(
        train.y, topo.n, d.partition, cfg.training.seed, beta=d.beta, shards_per_agent=d.shards_per_agent,
        classes_per_agent=d.classes_per_agent,
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
    total = run_length(cfg, shards)[1]
    if cfg.training.warmup_steps > total:
        raise ConfigError(warmup_error(cfg.training.warmup_steps, total))
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
    if cfg.training.eval_subset is not None and cfg.training.eval_subset < len(test.y):
        # seeded and fixed for the run: every evaluation scores the same samples, and a class-sorted
        # test set (the CIFAR-10 JPEG copy) still gives every class its share
        keep = torch.randperm(len(test.y), generator=torch.Generator().manual_seed(cfg.training.seed))
        test = test.subset(keep[: cfg.training.eval_subset].sort().values)
    augment = None
    if d.augment:
        from crossgrad.data.augment import Augment

        augment = Augment.for_dataset(d.name) if hasattr(Augment, "for_dataset") else Augment()
    return Prepared(
        cfg,
        normalized(train).to(device),
        train.y.long().to(device),
        normalized(test).to(device),
        test.y.long().to(device),
        shards,
        input_shape,
        train.num_classes,
        model.to(device),
        topo,
        algorithm,
        device,
        augment,
        network,
    )


class AgentBatches:
    """The minibatches of some agents (`local`, global indices): one stream and one augmentation generator each.

    Batches are gathered from the device-resident training set by device-resident index streams, so
    nothing crosses from the host per step (the augmentation's random draws aside).
    """

    def __init__(self, p: Prepared, local: list[int], batch_size: int):
        seed, n = p.cfg.training.seed, len(p.shards)
        stream_seeds, aug_seeds = agent_seeds(seed, n, 1), agent_seeds(seed, n, 2)
        self.p, self.batch_size = p, batch_size
        self.streams = [AgentStream(p.shards[i], stream_seeds[i], p.device) for i in local]
        self.aug_gens = [torch.Generator().manual_seed(aug_seeds[i]) for i in local]

    def next(self, hold: Sequence[bool] | None = None) -> list[tuple[Tensor, Tensor]]:
        """Every local agent's minibatch, gathered from the device-resident data in one index_select.

        hold[k]: local agent k is absent this step (network churn): it gets a batch of the right shape, but its
        stream and augmentation generator do not move, so it loses no sample and its draws resume on return."""
        p, b = self.p, self.batch_size
        held = [False] * len(self.streams) if hold is None else hold
        idx = torch.cat([s.peek(b) if h else s.next(b) for s, h in zip(self.streams, held, strict=True)])
        xs, ys = p.x_train.index_select(0, idx), p.y_train.index_select(0, idx)
        out = []
        for k, gen in enumerate(self.aug_gens):
            xb, yb = xs[k * b : (k + 1) * b], ys[k * b : (k + 1) * b]
            if p.augment is not None and not held[k]:
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
