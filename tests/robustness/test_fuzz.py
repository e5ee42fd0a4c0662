"""Property-based fuzzing of the user-facing surface: a valid object or one documented error, never
another exception and never a hang."""
from __future__ import annotations

import math

import numpy as np
import torch
from _fuzz_settings import FUZZ
from hypothesis import given
from hypothesis import strategies as st

from crossgrad.algorithms import ConfigError
from crossgrad.data import PartitionError, partition
from crossgrad.run.config import load_config
from crossgrad.topology import Topology, TopologyError, make_topology

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                   st.sampled_from([0.0, 1.0, 0.5, -0.5, 1 / 3]))


@FUZZ
@given(st.integers(1, 6).flatmap(lambda n: st.lists(st.lists(floats, min_size=n, max_size=n), min_size=n,
                                                    max_size=n)))
def test_weight_matrices(rows):
    try:
        topo = Topology.from_weights(rows)
    except TopologyError:
        return
    W = topo.W
    assert torch.isfinite(W).all() and (W >= 0).all()
    assert torch.allclose(W.sum(1), torch.ones(len(W), dtype=W.dtype), atol=1e-8)


@FUZZ
@given(st.sampled_from(["ring", "directed_ring", "torus", "full", "chain", "star", "exponential", "erdos_renyi",
                        "bogus"]),
       st.integers(-2, 40), st.dictionaries(st.sampled_from(["p", "seed", "rows", "cols", "weights", "x"]),
                                            st.one_of(st.integers(-3, 12), st.floats(-1, 2), st.text(max_size=5)),
                                            max_size=2))
def test_topology_factory(name, n, kw):
    try:
        topo = make_topology(name, n, **kw)
    except TopologyError:
        return
    assert topo.n == n and torch.allclose(topo.W.sum(1), torch.ones(n, dtype=topo.W.dtype))


@FUZZ
@given(st.integers(1, 60), st.integers(-1, 70),
       st.sampled_from(["iid", "label_sorted", "dirichlet", "shards", "classes", "?"]),
       st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0.01, 10)), st.integers(-1, 5))
def test_partitions(n_samples, n_agents, method, beta, shards):
    labels = torch.arange(n_samples) % 7
    try:
        parts = partition(labels, n_agents, method, seed=0, beta=beta, shards_per_agent=shards,
                          classes_per_agent=shards)
    except PartitionError:
        return
    assert len(parts) == n_agents and all(len(p) > 0 for p in parts)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(n_samples))


keys = st.sampled_from(["algorithm.alpha", "algorithm.gamma", "algorithm.lr", "algorithm.name", "training.epochs",
                        "training.batch_size", "topology.n_agents", "topology.name", "data.partition", "data.beta",
                        "model.name", "backend", "nosection.x", "algorithm.bogus", "training", ""])
values = st.one_of(st.integers(-5, 50).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(['"ngc"', "cga", '"ring"', "true", "[1, 2]", "{a = 1}", '"', "nan", "inf",
                                    '"label_sorted"', '"lenet5"']),
                   st.text(max_size=8))


@FUZZ
@given(st.lists(st.tuples(keys, values), max_size=4))
def test_config_overrides(pairs):
    try:
        cfg = load_config(None, [f"{k}={v}" for k, v in pairs]).validate()
    except ConfigError:
        return
    a = cfg.algorithm.params
    assert 0 <= a.get("alpha", 0) <= 1 and 0 < a["gamma"] <= 1 and math.isfinite(a["lr"]) and a["lr"] > 0
    assert cfg.training.batch_size >= 1 and cfg.topology.n_agents >= 1
    np.testing.assert_(isinstance(cfg.algorithm.name, str))


# ------------------------------------------------------------------ hostile element types in edge lists
_ids = st.one_of(st.integers(-3, 9), st.sampled_from([2**70, 1.0, 1.5, float("nan"), "1", None, True, b"\x01"]))
_edges = st.one_of(
    st.lists(st.tuples(_ids, _ids), max_size=12),
    st.lists(st.one_of(st.tuples(_ids), st.tuples(_ids, _ids, _ids), st.just(()), st.integers(), st.text(max_size=3)),
             max_size=5),
    st.sampled_from([None, 5, "0-1,1-2", b"\x00\x01"]),
)


@FUZZ
@given(st.one_of(st.integers(-2, 8), st.sampled_from([2.0, 2.5, "3", None, True, 2**70])), _edges, st.booleans(),
       st.sampled_from(["uniform", "metropolis", "bogus", "", None, 3]))
def test_hostile_edge_lists(n, edges, directed, weights):
    try:
        topo = Topology.from_edges(n, edges, directed=directed, weights=weights)
    except TopologyError:
        return
    assert topo.n == n and torch.allclose(topo.W.sum(1), torch.ones(n, dtype=topo.W.dtype))
    assert (topo.W >= 0).all() and torch.isfinite(topo.W).all()


# ------------------------------------------------- --set strings of any shape; valid configs round-trip
def _roundtrip(cfg) -> None:
    from crossgrad.run.config import config_from_dict, dump_toml, tomllib

    assert config_from_dict(tomllib.loads(dump_toml(cfg.to_dict()))) == cfg


@FUZZ
@given(st.lists(st.text(max_size=24), max_size=3))
def test_arbitrary_set_strings(texts):
    try:
        cfg = load_config(None, texts)
    except ConfigError as e:
        assert str(e)
        return
    _roundtrip(cfg)


_string_fields = st.sampled_from(["output.name", "output.out_dir", "data.data_dir", "training.device", "data.name",
                                  "model.norm", "topology.weights"])


@FUZZ
@given(_string_fields, st.text(max_size=12))
def test_string_values_with_any_character(key, text):
    from crossgrad.run.config import _toml_value

    try:
        cfg = load_config(None, [f"{key}={_toml_value(text)}"])
    except ConfigError as e:
        assert key in str(e) or "must be" in str(e) or "unknown" in str(e)
        return
    assert not any(ord(c) < 32 for c in text)  # control characters never reach a path or a file
    _roundtrip(cfg)


@FUZZ
@given(keys, values)
def test_valid_overrides_roundtrip_through_the_run_config_file(key, value):
    try:
        cfg = load_config(None, [f"{key}={value}"])
    except ConfigError:
        return
    _roundtrip(cfg)
