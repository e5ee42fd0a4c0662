"""Bad input through the CLI: one line on stderr naming the problem, exit code 2 (1 for divergence)."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from crossgrad.cli import main

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(["run", *args, "--quiet"])
    err = capsys.readouterr().err.strip()
    return rc, err


def corrupt_mnist(tmp_path: Path, how: str) -> Path:
    d = tmp_path / "mnist"
    d.mkdir()
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for n in names:  # tiny but well-formed files, then break one
        dims = (3, 28, 28) if "images" in n else (3,)
        header = bytes([0, 0, 8, len(dims)]) + b"".join(k.to_bytes(4, "big") for k in dims)
        payload = bytes(3 * 28 * 28) if "images" in n else bytes([1, 2, 3])
        (d / n).write_bytes(header + payload)
    target = d / "train-images-idx3-ubyte"
    raw = target.read_bytes()
    if how == "truncated":
        target.write_bytes(raw[:-10])
    elif how == "magic":
        target.write_bytes(b"\x01\x02" + raw[2:])
    elif how == "dims":
        target.write_bytes(raw[:3] + b"\x07" + raw[4:])
    elif how == "gzip":
        target.unlink()
        (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:40])
    elif how == "label":
        (d / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 42]))
    return tmp_path


@pytest.mark.parametrize("how,expect", [("truncated", "truncated"), ("magic", "magic"), ("dims", "header"),
                                        ("gzip", "corrupt"), ("label", "out of range")])
def test_corrupt_idx_through_the_cli(tmp_path, capsys, how, expect):
    root = corrupt_mnist(tmp_path, how)
    # verification by md5 would catch these first; the structural checks are what protects files
    # whose md5 is unknown, so the test exercises them through the loader directly as well
    rc, err = run_cli(capsys, "--set", "data.name=mnist", "--set", f'data.data_dir="{root}"',
                      "--out-dir", str(tmp_path / "o"))
    assert rc == 2 and err.startswith("crossgrad: error:") and "\n" not in err
    assert "md5" in err or expect in err
    from crossgrad.data import DataError, load_dataset

    with pytest.raises(DataError, match=expect):
        load_dataset("mnist", root, verify=False)


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="../shared/data not present")
def test_truncated_real_file_is_named(tmp_path, capsys):
    d = tmp_path / "mnist"
    shutil.copytree(SHARED / "mnist", d)
    f = d / "t10k-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:1000])
    rc, err = run_cli(capsys, "--set", "data.name=mnist", "--set", f'data.data_dir="{tmp_path}"',
                      "--out-dir", str(tmp_path / "o"))
    assert rc == 2 and "t10k-labels-idx1-ubyte.gz" in err


@pytest.mark.parametrize("args,expect", [
    (["--set", "algorithm.alpha=1.5"], "alpha must be in [0, 1]"),
    (["--set", "algorithm.gamma=0"], "gamma"),
    (["--set", "algorithm.name=sgd"], "unknown algorithm"),
    (["--set", "topology.name=torus", "--set", "topology.n_agents=7"], "torus"),
    (["--set", "topology.n_agents=2000"], "cannot split"),
    (["--set", "model.name=vgg11"], "does not fit"),
    (["--set", "training.bogus=1"], "unknown key"),
    (["--set", "data.name=cifar10", "--set", 'data.data_dir="/nonexistent"'], "found under"),
])
def test_bad_configs(tmp_path, capsys, args, expect):
    rc, err = run_cli(capsys, *args, "--out-dir", str(tmp_path))
    assert rc == 2 and expect in err and "Traceback" not in err


def test_divergence_exits_1_and_names_step_and_agent(tmp_path, capsys):
    rc, err = run_cli(capsys, "--set", "algorithm.lr=1e9", "--set", "training.epochs=1", "--out-dir", str(tmp_path))
    assert rc == 1 and "non-finite" in err and "step" in err and "agent" in err


def test_corrupt_data_dir_through_a_real_process(tmp_path):
    """What a user at a shell sees: exactly one line on stderr, exit code 2, nothing else."""
    import subprocess
    import sys

    root = corrupt_mnist(tmp_path, "truncated")
    proc = subprocess.run([sys.executable, "-m", "crossgrad", "run", "--quiet", "--set", "data.name=mnist",
                           "--set", f"data.data_dir={root}", "--out-dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("crossgrad: error: ") and "train-images-idx3-ubyte" in lines[0]
    assert not (tmp_path / "o").exists()  # nothing written for a run that never started
