"""The config schema end to end: algorithm options resolved from the algorithm, compression, and graphs
given as an edge list or a W file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossgrad.algorithms import algorithm_options
from crossgrad.run import load_config, run_experiment
from crossgrad.run.config import ConfigError, method_label, read_toml

TINY = '[training]\nsteps = 2\nthreads = 1\neval_every_steps = 2\n[data]\nname = "synthetic"\n'


def test_resolved_config_lists_every_hyperparameter_and_labels_use_it(tmp_path):
    cfg = load_config(None, ["algorithm.name=dsgd", "algorithm.momentum=0", f'output.out_dir="{tmp_path}"',
                             "training.steps=1", "training.threads=1"])
    assert method_label(cfg) == "DSGD"
    result = run_experiment(cfg, quiet=True)
    written = read_toml(result.run_dir / "config.toml")["algorithm"]
    assert written == {"name": "dsgd", **{k: v for k, v in algorithm_options("dsgd").items() if v is not None},
                       "momentum": 0.0}


def test_sign_codec_on_ngc_is_compressed_ngc(tmp_path):
    cfg = load_config(None, ["algorithm.name=ngc", 'algorithm.codec="sign"'])
    assert cfg.algorithm.params["codec"] == "sign" and method_label(cfg) == "CompNGC"
    with pytest.raises(ConfigError, match="dsgd does not take codec|unknown key algorithm.codec"):
        load_config(None, ["algorithm.name=dsgd", 'algorithm.codec="sign"'])


def test_topology_from_an_edge_list_trains(tmp_path):
    f = tmp_path / "edges.toml"
    f.write_text(TINY + '[topology]\nname = "edges"\nn_agents = 4\n'
                 "options = {edges = [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]], directed = false}\n"
                 f'[output]\nout_dir = "{tmp_path / "out"}"\nname = "e"\n')
    result = run_experiment(load_config(f), quiet=True)
    assert result.status == "completed"
    assert json.loads((result.run_dir / "summary.json").read_text())["setting"].endswith("/edges-4")


def test_topology_from_a_w_file_is_found_next_to_the_config(tmp_path, monkeypatch):
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "W.txt").write_text("0.5 0.5 0\n0.25 0.5 0.25\n0 0.5 0.5\n")
    f = folder / "file.toml"
    f.write_text(TINY + '[topology]\nname = "file"\nn_agents = 3\noptions = {path = "W.txt"}\n'
                 f'[output]\nout_dir = "{tmp_path / "out"}"\nname = "w"\n')
    monkeypatch.chdir(tmp_path)  # elsewhere: the path is relative to the config file, not to the cwd
    cfg = load_config(f)
    assert cfg.topology.options["path"] == str(folder / "W.txt")
    result = run_experiment(cfg, quiet=True)
    assert result.status == "completed"
    saved = read_toml(result.run_dir / "config.toml")["topology"]["options"]["path"]
    assert Path(saved).is_absolute() and Path(saved) == folder / "W.txt"
    assert load_config(result.run_dir / "config.toml") == cfg  # the resolved config reloads as it is


def test_a_run_directory_written_before_algorithms_owned_their_options_still_reads(tmp_path):
    """Old config.toml files list every algorithm's keys (alpha, margin ... on DSGD); the runner passed only
    the ones the algorithm takes, so those are what the run trained with."""
    from crossgrad.run.rundir import load_run_config

    (tmp_path / "config.toml").write_text(
        '[algorithm]\nname = "dsgd"\nlr = 0.05\nmomentum = 0.9\nnesterov = true\nalpha = 1.0\nmargin = 0.5\n'
        'eps = 1e-12\ncompress_self = true\n')
    cfg = load_run_config(tmp_path)
    assert cfg.algorithm.params == {**algorithm_options("dsgd"), "lr": 0.05, "momentum": 0.9, "nesterov": True}
    with pytest.raises(ConfigError, match="unknown key algorithm.alpha"):  # a new config is still strict
        load_config(tmp_path / "config.toml")
