"""The `crossgrad` command line: exit codes, one-line errors, subcommands, quickstart smoke test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crossgrad.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "algorithm.name=adam"], "unknown algorithm 'adam'"),
        (["--set", "algorithm.foo=1"], "unknown key algorithm.foo"),
        (["--set", "optim.lr=1"], "unknown section"),
        (["--set", "algorithm.alpha=2"], "alpha must be in [0, 1]"),
        (["--set", "algorithm.gamma=0"], "gamma"),
        (["--set", "model.name=vgg11"], "vgg11"),  # needs 32x32, digits are 8x8
        (["--set", "topology.n_agents=2000"], "agent"),  # more agents than samples: empty shards
        (["--set", "topology.name=moebius"], "unknown topology"),
        (["--backend", "dist"], "launch it with torchrun"),
    ],
)
def test_run_config_errors_exit_2_without_traceback(capsys, tmp_path, args, needle):
    rc, out, err = run_cli(capsys, "run", "--out-dir", str(tmp_path), "--quiet", *args)
    assert rc == 2
    assert needle in err and "Traceback" not in err
    assert err.startswith("crossgrad: error: ") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # nothing written for an invalid config


def test_data_dir_without_files(capsys, tmp_path):
    rc, _, err = run_cli(
        capsys,
        "run",
        "--out-dir",
        str(tmp_path / "o"),
        "--set",
        "data.name=mnist",
        "--set",
        f'data.data_dir="{tmp_path}"',
    )
    assert rc == 2 and "Traceback" not in err and err.startswith("crossgrad: error: ")


def test_bad_config_file(capsys, tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[training]\nepochs = -1\n")
    rc, _, err = run_cli(capsys, "run", str(f))
    assert rc == 2 and "training.epochs" in err
    rc, _, err = run_cli(capsys, "run", str(tmp_path / "nope.toml"))
    assert rc == 2 and "does not exist" in err


def test_run_stop_resume_through_cli(capsys, tmp_path):
    base = [
        "--out-dir",
        str(tmp_path),
        "--name",
        "r",
        "--quiet",
        "--set",
        "training.steps=6",
        "--set",
        "training.threads=1",
    ]
    rc, _, err = run_cli(capsys, "run", *base, "--stop-after", "3")
    assert rc == 0 and "crossgrad: stopped: stopped at step 3 of 6" in err
    assert "resume with: crossgrad run --resume" in err
    rc, _, err = run_cli(capsys, "run", *base)
    assert rc == 2 and "--resume" in err  # an unfinished run is not silently restarted
    rc, out, _ = run_cli(capsys, "run", "--resume", str(tmp_path / "r"))
    assert rc == 0 and "completed" in out
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["steps"] == 6 and s["status"] == "completed"
    rc, _, err = run_cli(capsys, "run", "--resume", str(tmp_path / "r"))
    assert rc == 2 and "already finished" in err
    rc, _, err = run_cli(capsys, "run", "--resume", str(tmp_path / "missing"))
    assert rc == 2


def test_diverged_run_exit_1(capsys, tmp_path):
    rc, _, err = run_cli(
        capsys,
        "run",
        "--out-dir",
        str(tmp_path),
        "--quiet",
        "--set",
        "algorithm.lr=1e6",
        "--set",
        "training.epochs=2",
        "--set",
        "training.threads=1",
    )
    assert rc == 1 and "non-finite" in err and "agent" in err and "Traceback" not in err


def test_topology_and_models_commands(capsys):
    rc, out, _ = run_cli(capsys, "topology", "ring", "8")
    assert rc == 0
    assert "spectral gap" in out and "doubly stochastic yes" in out and "in-degree         2" in out
    rc, out, _ = run_cli(capsys, "topology", "erdos_renyi", "10", "--option", "p=0.5", "--matrix")
    assert rc == 0 and "W =" in out
    rc, _, err = run_cli(capsys, "topology", "nope", "4")
    assert rc == 2 and "unknown topology" in err
    rc, out, _ = run_cli(capsys, "models")
    assert rc == 0 and "lenet5" in out and "resnet20" in out


def test_sweep_cli_and_parallel_jobs(capsys, tmp_path):
    f = tmp_path / "sw.toml"
    f.write_text(f"""
[training]
steps = 2
threads = 1
[output]
out_dir = "{tmp_path / "out"}"
[sweep]
algorithms = ["ngc", {{name = "dsgd", qgm = true}}]
""")
    rc, out, _ = run_cli(capsys, "sweep", str(f), "--dry-run")
    assert rc == 0 and "0 already done, 2 to run" in out
    rc, out, err = run_cli(capsys, "sweep", str(f), "--jobs", "2")
    assert rc == 0, err
    assert len(list((tmp_path / "out").glob("*/summary.json"))) == 2
    assert not list((tmp_path / "out").glob("*/sweep-config-*"))  # each run keeps only its config.toml
    rc, out, _ = run_cli(capsys, "sweep", str(f), "--jobs", "2")
    assert rc == 0 and "2 already done, 0 to run" in out
    rc, out, _ = run_cli(capsys, "report", str(tmp_path / "out"))
    assert rc == 0 and "QGM" in out and "NGC (α=1)" in out


def test_sweep_checks_every_entry_as_run_does_before_any_run_starts(capsys, tmp_path):
    f = tmp_path / "sw.toml"
    f.write_text(f"""
[model]
name = "mlp"
[training]
steps = 2
threads = 1
[output]
out_dir = "{tmp_path / "out"}"
[sweep]
algorithms = ["dsgd", {{name = "d2", momentum = 0.0}}]
topologies = [{{name = "ring", n_agents = 4}}, {{name = "directed_ring", n_agents = 4}}]
""")
    rc, _, err = run_cli(capsys, "sweep", str(f))
    # d2 on the directed ring is the sweep's last entry: refused up front, naming the entry, nothing run
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "algorithm.name=d2" in err and "topology.name=directed_ring" in err and "undirected" in err
    assert not (tmp_path / "out").exists()


def test_quickstart_smoke(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "quickstart", "--epochs", "1", "--out", str(tmp_path / "qs"), "--quiet")
    assert rc == 0, err
    assert "NGC (α=1)" in out and "DSGDm-N" in out
    assert (tmp_path / "qs" / "report.md").exists()
    assert list((tmp_path / "qs").glob("curves_*.png")) and list((tmp_path / "qs").glob("curves_*.svg"))


def test_python_m_crossgrad_help():
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "crossgrad", "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0
    for cmd in ("run", "sweep", "report", "plot", "models", "topology", "quickstart"):
        assert cmd in proc.stdout


def test_no_command_prints_help(capsys):
    rc, out, _ = run_cli(capsys)
    assert rc == 2 and "quickstart" in out


def test_bench_prints_ratio_overheads_and_scaling(capsys):
    rc, out, err = run_cli(capsys, "bench", "--models", "lenet5:1x28x28", "--agents", "3", "--batch", "4",
                           "--steps", "1", "--repeats", "1", "--algorithms", "dsgd,compngc", "--scaling", "2,4",
                           "--scaling-topologies", "ring", "--scaling-window", "0.01", "--threads", "1")
    assert rc == 0, err
    assert "ratio" in out and "compngc" in out and "dsgd" in out
    scaling = out.split("scaling:")[1]
    assert "ms per pass" in scaling and "steps timed" in scaling
    assert "ring" in scaling and len([ln for ln in scaling.splitlines() if ln.strip().startswith("ring")]) == 2
