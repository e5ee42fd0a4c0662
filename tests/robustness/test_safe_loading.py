"""Checkpoints, dataset pickles and archives are loaded as data, never as code."""
from __future__ import annotations

import io
import pickle
import tarfile

import pytest

from crossgrad.config import load_config
from crossgrad.data import DataError
from crossgrad.data.datasets import _read_cifar_batch, _safe_extract
from crossgrad.experiment import CHECKPOINT, resume_experiment, run_experiment


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file when unpickled


def test_malicious_checkpoint_is_refused_and_not_executed(tmp_path):
    cfg = load_config(None, [f'output.out_dir="{tmp_path}"', 'output.name="r"', "training.steps=4",
                             "training.checkpoint_every=1", "training.threads=1", 'model.name="mlp"'])
    run_experiment(cfg, quiet=True, stop_after=2)
    marker = tmp_path / "pwned"
    with open(tmp_path / "r" / CHECKPOINT, "wb") as f:
        pickle.dump({"x": Evil(marker)}, f)
    with pytest.raises(Exception, match="cannot read"):
        resume_experiment(tmp_path / "r", quiet=True)
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
