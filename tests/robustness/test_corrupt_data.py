"""Corrupt, truncated and hostile data files: one DataError that names the file, whatever the bytes."""
from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from _fuzz_settings import FUZZ
from hypothesis import given
from hypothesis import strategies as st

from crossgrad.data import DataError, load_dataset
from crossgrad.data.datasets import _read_cifar_batch, read_cifar_jpeg_tar, read_idx

IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def idx(dims: tuple[int, ...], payload: bytes | None = None) -> bytes:
    head = bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", k) for k in dims)
    return head + (bytes(int(np.prod(dims))) if payload is None else payload)


def mnist_dir(root: Path, train=((3, 28, 28), (3,)), test=((2, 28, 28), (2,))) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, (img, lab) in (("train", train), ("t10k", test)):
        (root / f"{split}-images-idx3-ubyte").write_bytes(idx(img))
        (root / f"{split}-labels-idx1-ubyte").write_bytes(idx(lab))
    return root


@pytest.mark.parametrize("train,test,file,needle", [
    (((0, 28, 28), (0,)), ((2, 28, 28), (2,)), IMAGES, "holds no data"),
    (((3, 0, 0), (3,)), ((2, 28, 28), (2,)), IMAGES, "holds no data"),
    (((3, 28, 28), (4,)), ((2, 28, 28), (2,)), LABELS, "do not match"),
    (((3, 28, 28), (3, 1)), ((2, 28, 28), (2,)), LABELS, "do not match"),
    (((3, 784), (3,)), ((2, 28, 28), (2,)), IMAGES, "3 dimensions"),
    (((3, 28, 28), (3,)), ((2, 5, 5), (2,)), "t10k-images-idx3-ubyte", "training images 28x28"),
    (((2**31,) * 4, (3,)), ((2, 28, 28), (2,)), IMAGES, "truncated"),  # no int64 overflow
])
def test_inconsistent_idx_files_are_named(tmp_path, train, test, file, needle):
    root = mnist_dir(tmp_path / "m", train, test)
    with pytest.raises(DataError, match=needle) as e:
        load_dataset("mnist", root, verify=False)
    assert file in str(e.value)


@FUZZ
@given(st.binary(max_size=64), st.sampled_from([IMAGES, LABELS, "t10k-labels-idx1-ubyte"]))
def test_random_bytes_in_an_idx_file(tmp_path_factory, blob, name):
    root = mnist_dir(tmp_path_factory.mktemp("m"))
    (root / name).write_bytes(blob)
    try:
        load_dataset("mnist", root, verify=False)
    except DataError as e:
        assert name in str(e)


@FUZZ
@given(st.binary(max_size=64))
def test_read_idx_random_headers(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("i") / "x-idx1-ubyte"
    path.write_bytes(blob)
    try:
        arr = read_idx(path)
    except DataError as e:
        assert str(path) in str(e)
    else:
        assert arr.dtype == np.uint8 and arr.size == len(blob) - 4 - 4 * arr.ndim


def test_gzip_with_garbage_inside(tmp_path):
    import gzip

    root = mnist_dir(tmp_path / "m")
    (root / IMAGES).unlink()
    (root / f"{IMAGES}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03garbage"))
    with pytest.raises(DataError, match=f"{IMAGES}.gz.*header"):
        load_dataset("mnist", root, verify=False)


# ------------------------------------------------------------------------------------- CIFAR-10
_pickles = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.binary(max_size=8), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.binary(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


@FUZZ
@given(st.one_of(_pickles.map(pickle.dumps), st.binary(max_size=200),
                 st.fixed_dictionaries({b"data": _pickles, b"labels": _pickles}).map(pickle.dumps)))
def test_cifar_batch_random_content(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("c") / "data_batch_1"
    path.write_bytes(blob)
    with pytest.raises(DataError, match="data_batch_1"):
        _read_cifar_batch(path)


@pytest.mark.parametrize("data,labels,needle", [
    (np.zeros((2, 3072), np.uint8), [0, 10], "label out of range"),
    (np.zeros((2, 3072), np.uint8), [0, -1], "label out of range"),
    (np.zeros((2, 100), np.uint8), [0, 1], "shape"),
    (np.zeros((2, 3072), np.uint8), [0], "shape"),
    ("not an array", [0], "not a readable"),
])
def test_cifar_batch_bad_contents(tmp_path, data, labels, needle):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": data, b"labels": labels}))
    with pytest.raises(DataError, match=needle):
        _read_cifar_batch(path)


def test_cifar_batch_good_roundtrip(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072),
                                   b"labels": [3, 9]}))
    x, y = _read_cifar_batch(path)
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [3, 9]


def _jpeg_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg(size=(32, 32)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("blob,needle", [
    (b"\xff\xd8\xff\xe0 definitely not a jpeg", "cannot be decoded"),
    (_jpeg()[:40], "cannot be decoded"),
    (_jpeg((16, 16)), "expected 32x32"),
])
def test_bad_jpeg_in_the_tarball_is_named(tmp_path, blob, needle):
    tar = _jpeg_tar(tmp_path / "cifar-10-images-jpg.tar.gz", {
        "cifar10/train/cat/0001.jpg": _jpeg(),
        "cifar10/train/cat/0002.jpg": blob,
        "cifar10/test/dog/0001.jpg": _jpeg(),
    })
    with pytest.raises(DataError, match=needle) as e:
        read_cifar_jpeg_tar(tar, None)
    assert "cat/0002.jpg" in str(e.value)


def test_truncated_tarball(tmp_path):
    tar = _jpeg_tar(tmp_path / "cifar-10-images-jpg.tar.gz", {f"c/train/cat/{k:04d}.jpg": _jpeg() for k in range(5)})
    tar.write_bytes(tar.read_bytes()[:300])
    with pytest.raises(DataError, match="cifar-10-images-jpg.tar.gz"):
        read_cifar_jpeg_tar(tar, None)


def test_unknown_class_folder(tmp_path):
    tar = _jpeg_tar(tmp_path / "x.tar.gz", {"c/train/unicorn/0001.jpg": _jpeg()})
    with pytest.raises(DataError, match="unknown class folder 'unicorn'"):
        read_cifar_jpeg_tar(tar, None)


@pytest.mark.parametrize("blob", [
    b"\x8d\x00\x00\x00\x00\x00\x00\x00\x01",  # BINUNICODE8 declaring an impossible length: MemoryError inside
    b"\x80\x02cnumpy\nload\nq\x00.",  # a numpy function that is not on the allow-list
    b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00bogus\x86R.",  # LookupError inside
    b"",
])
def test_cifar_batch_hostile_pickles(tmp_path, blob):
    path = tmp_path / "data_batch_1"
    path.write_bytes(blob)
    with pytest.raises(DataError, match="data_batch_1: not a readable CIFAR-10 batch"):
        _read_cifar_batch(path)
