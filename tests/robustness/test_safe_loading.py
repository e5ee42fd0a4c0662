"""Checkpoints, dataset pickles and archives are loaded as data, never as code."""
from __future__ import annotations

import io
import pickle
import tarfile

import pytest

from crossgrad.data import DataError
from crossgrad.data.datasets import _read_cifar_batch, _safe_extract
from crossgrad.run import RunError, resume_experiment, run_experiment
from crossgrad.run.config import load_config
from crossgrad.run.rundir import CHECKPOINT


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file when unpickled


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_checkpoint_is_refused_and_not_executed(tmp_path, protocol):
    cfg = load_config(None, [f'output.out_dir="{tmp_path}"', 'output.name="r"', "training.steps=4",
                             "training.checkpoint_every=1", "training.threads=1", 'model.name="mlp"'])
    run_experiment(cfg, quiet=True, stop_after=2)
    marker = tmp_path / "pwned"
    with open(tmp_path / "r" / CHECKPOINT, "wb") as f:
        pickle.dump({"x": Evil(marker)}, f, protocol=protocol)
    with pytest.raises(RunError, match="cannot read .*checkpoint.pt: it holds objects other than tensors") as e:
        resume_experiment(tmp_path / "r", quiet=True)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)  # never a hint to load it unsafely
    assert "it refers to io.open" in str(e.value)  # named for every pickle protocol
    assert not marker.exists()


def test_cifar_batch_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil(marker), b"labels": [0]}))
    with pytest.raises(DataError, match="refusing"):
        _read_cifar_batch(path)
    assert not marker.exists()


def _tar_with(tmp_path, member: tarfile.TarInfo, data: bytes = b"x"):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


@pytest.mark.parametrize("make", [
    lambda: tarfile.TarInfo("../escape.txt"),
    lambda: tarfile.TarInfo("/abs/escape.txt"),
    lambda: _link("evil", "/etc/passwd", tarfile.SYMTYPE),
    lambda: _link("evil", "../../x", tarfile.LNKTYPE),
])
def test_safe_extract_refuses_unsafe_members(tmp_path, make):
    archive = _tar_with(tmp_path, make())
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(DataError, match="unsafe"):
        _safe_extract(archive, dest)
    assert not (tmp_path / "escape.txt").exists() and not list(dest.iterdir())


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def test_toml_config_is_data_only(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[algorithm]\nname = "__import__(\'os\').system(\'touch pwned\')"\n')
    from crossgrad.algorithms import ConfigError

    with pytest.raises(ConfigError, match="unknown algorithm"):
        load_config(p, []).validate()
    assert not (tmp_path / "pwned").exists()


def test_safe_extract_extracts_a_plain_archive(tmp_path):
    path = tmp_path / "ok.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ("d", "d/a.txt"):
            info = tarfile.TarInfo(name)
            if name == "d":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = 2
                tar.addfile(info, io.BytesIO(b"hi"))
    dest = tmp_path / "out"
    dest.mkdir()
    _safe_extract(path, dest)
    assert (dest / "d" / "a.txt").read_text() == "hi"


def test_safe_extract_refuses_devices_and_fifos(tmp_path):
    for kind in (tarfile.FIFOTYPE, tarfile.CHRTYPE):
        info = tarfile.TarInfo("dev")
        info.type = kind
        with pytest.raises(DataError, match="unsafe"):
            _safe_extract(_tar_with(tmp_path, info), tmp_path)


def test_safe_extract_corrupt_archive(tmp_path):
    path = tmp_path / "bad.tar.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    with pytest.raises(DataError, match="bad.tar.gz"):
        _safe_extract(path, tmp_path)


# ----------------------------------------------------------------- checkpoints that are data but wrong
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after 2 of 4 steps: its config and checkpoint, to be tampered with."""
    import torch

    root = tmp_path_factory.mktemp("ck")
    cfg = load_config(None, [f'output.out_dir="{root}"', 'output.name="r"', "training.steps=4",
                             "training.threads=1", 'model.name="mlp"'])
    run_experiment(cfg, quiet=True, stop_after=2)
    run = root / "r"
    return (run / "config.toml").read_text(), torch.load(run / CHECKPOINT, weights_only=True)


def _tampered(state):
    import torch

    state = dict(state)
    return {
        "list": [1, 2],
        "old version": {**state, "version": 0},
        "missing keys": {"version": state["version"], "step": 1},
        "wrong shape": {**state, "sim": {**state["sim"], "x": state["sim"]["x"][:, :10]}},
        "step past the end": {**state, "step": 10**9},
        "negative step": {**state, "step": -1},
        "agent streams missing": {**state, "streams": state["streams"][:2]},
        "bad rng state": {**state, "torch_rng": torch.zeros(3, dtype=torch.uint8)},
        "no config": {k: v for k, v in state.items() if k != "config"},
        "other config": {**state, "config": {**state["config"],
                                             "algorithm": {**state["config"]["algorithm"], "lr": 0.5}}},
    }


@pytest.mark.parametrize("case", ["list", "old version", "missing keys", "wrong shape", "step past the end",
                                  "negative step", "agent streams missing", "bad rng state", "no config",
                                  "other config",
                                  "truncated", "empty"])
def test_tampered_checkpoint_is_one_clear_error(tmp_path, stopped_run, case):
    import torch

    config_text, state = stopped_run
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.toml").write_text(config_text)
    if case in ("truncated", "empty"):
        buf = io.BytesIO()
        torch.save(state, buf)
        blob = buf.getvalue()
        (run / CHECKPOINT).write_bytes(blob[: len(blob) // 2] if case == "truncated" else b"")
    else:
        torch.save(_tampered(state)[case], run / CHECKPOINT)
    with pytest.raises(RunError, match="checkpoint") as e:
        resume_experiment(run, quiet=True)
    assert str(run / CHECKPOINT) in str(e.value) and "\n" not in str(e.value)
    if case == "other config":
        assert "algorithm.lr" in str(e.value)
    if case == "no config":  # was: no check at all, so an edited config.toml went on with this state
        assert "holds no configuration" in str(e.value)


def test_untampered_checkpoint_resumes(tmp_path, stopped_run):
    import torch

    config_text, state = stopped_run
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.toml").write_text(config_text)
    torch.save(state, run / CHECKPOINT)
    assert resume_experiment(run, quiet=True).status == "completed"
