"""What a run is built from, checked before any data loads: `crossgrad config` and `crossgrad run` refuse the same.

`Config.validate` checks each value on its own; `check_inputs` builds what the values name (the topology,
the algorithm on that graph, the model on the dataset's known input shape) and so finds what only the
builders know: an unknown model or norm, a model option its builder does not take, a model that does
not fit the inputs, topology options, more agents than a dense W allows. The model is built on torch's
meta device: shapes only, no memory and no random draws.
"""
from __future__ import annotations

import types
import typing
from typing import Any

import torch

from crossgrad.algorithms import Algorithm, ConfigError
from crossgrad.run.config import Config, _coerce, _toml_value


def check_inputs(cfg: Config) -> tuple[Any, Algorithm]:
    """The run's topology and algorithm, built and checked against each other, after checking its model."""
    from crossgrad.topology import is_time_varying, make_topology

    cfg.validate()
    topo = make_topology(
        cfg.topology.name, cfg.topology.n_agents, weights=cfg.topology.weights, **cfg.topology.options
    )
    algorithm = cfg.make_algorithm()
    # what the algorithm refuses of this graph (cga on a time-varying one, d2 on a non-symmetric W); the
    # engine checks every later graph of a time-varying topology as it meets it
    algorithm.check_topology(topo)
    algorithm.check_mixing(topo.at(0) if is_time_varying(topo) else topo)
    check_model(cfg)
    if cfg.network is not None:  # a per-link file that misses one of the graph's links
        from crossgrad.comm.network import NetworkModel

        NetworkModel(cfg.network, topo, cfg.training.seed)
    return topo, algorithm


def check_model(cfg: Config) -> None:
    """The model's name, norm and options are known to its builder, and it fits the dataset's inputs."""
    from crossgrad.data.datasets import dataset_shape
    from crossgrad.models import get_model_spec, make_model, model_options
    from crossgrad.models.norms import check_norm

    m, name = cfg.model, cfg.data.name
    for key, check in (("name", get_model_spec), ("norm", check_norm)):
        try:
            check(getattr(m, key))
        except ValueError as e:
            raise ConfigError(f"model.{key}: {e}") from None
    taken = model_options(m.name)
    unknown = sorted(set(m.options) - set(taken))
    if unknown:
        raise ConfigError(f"model.options: {m.name} does not take {', '.join(unknown)}; "
                          f"its options: {', '.join(taken) or 'none'}")
    hints = typing.get_type_hints(get_model_spec(m.name).builder)
    for key, value in m.options.items():  # width = "wide": said here, not as the builder's TypeError
        if _scalar(hints[key]):
            _coerce(f"model.options.{key}", value, hints[key])
    shape, classes = dataset_shape(name, **cfg.data.loader_options())
    what = (f"model {m.name!r} with options {_toml_value(m.options)} cannot be built for" if m.options
            else f"model {m.name!r} does not fit")
    try:
        with torch.device("meta"):
            make_model(m.name, shape, classes, m.norm, **m.options)
    except (ValueError, TypeError) as e:  # the builders' "needs inputs of at least ...", "width must be positive"
        raise ConfigError(f"{what} {name} (input {'x'.join(map(str, shape))}, {classes} classes): {e}") from None


def _scalar(hint: Any) -> bool:
    """A bool, int, float or str hint, or an optional one: checked here (a sequence, mlp's hidden sizes, is
    left to its builder)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return {a for a in (typing.get_args(hint) if union else (hint,)) if a is not type(None)} <= {bool, int, float, str}
