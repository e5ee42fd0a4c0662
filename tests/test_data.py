import gzip
import importlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from crossgrad.data import (
    Augment,
    DataError,
    PartitionError,
    class_histogram,
    format_histogram,
    load_dataset,
    normalize,
    partition,
    read_cifar_jpeg_tar,
    read_idx,
)
from crossgrad.data.augment import random_crop, random_hflip

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="../shared/data not present")


def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train=20, n_test=10, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28))
        labels = np.arange(n) % 10
        for kind, arr in (("images-idx3", imgs), ("labels-idx1", labels)):
            raw = idx_bytes(arr)
            name = f"{split}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)


@needs_shared
@pytest.mark.parametrize("name,counts", [
    ("mnist", [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]),
    ("fashion_mnist", [6000] * 10),
])
def test_real_idx_datasets(name, counts):
    train, test = load_dataset(name, SHARED)
    assert train.x.shape == (60000, 1, 28, 28) and train.x.dtype == torch.uint8
    assert test.x.shape == (10000, 1, 28, 28)
    assert train.class_counts().tolist() == counts
    assert len(train.classes) == 10


@needs_shared
def test_cifar_jpeg_reader_matches_lossless_subset_on_a_few_images(tmp_path):
    """Re-pack the first train images of the real tarball into a small one and compare pixels."""
    from PIL import Image

    src = SHARED / "cifar10-jpeg" / "cifar-10-images-jpg.tar.gz"
    order = (SHARED / "cifar10-jpeg" / "train_order.csv").read_text().splitlines()
    wanted = [line.split(",")[4] for line in order[1:9]]
    small = tmp_path / "small.tar"
    with tarfile.open(src) as tar, tarfile.open(small, "w") as out:
        for m in tar.getmembers():
            if m.name in wanted or (m.name.startswith("CIFAR-10-images/test/cat/000") and m.name.endswith(".jpg")):
                out.addfile(m, tar.extractfile(m))
    csv = tmp_path / "order.csv"
    csv.write_text("\n".join(order[:9]) + "\n")
    train, test = read_cifar_jpeg_tar(small, csv)
    exact = np.array(Image.open(SHARED / "cifar10-lossless-subset" / "cifar10_batch_0.png")).reshape(1000, 32, 32, 3)
    got = train.x.permute(0, 2, 3, 1).numpy().astype(float)
    err = np.abs(got - exact[:8]).mean() / 255
    assert err < 15 / 255, err
    assert train.y.tolist() == [int(line.split(",")[3]) for line in order[1:9]]
    assert set(test.y.tolist()) == {3}


def test_synthetic_jpeg_tarball(tmp_path):
    from PIL import Image

    tar_path = tmp_path / "c.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for split in ("train", "test"):
            for cls in ("cat", "ship"):
                for k in range(2):
                    buf = io.BytesIO()
                    Image.new("RGB", (32, 32), (10 * k, 100, 200)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"CIFAR-10-images/{split}/{cls}/{k:04d}.jpg")
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))
        bad = tarfile.TarInfo("CIFAR-10-images/train/cat/0009.jpg")
        bad.size = 5
        tar.addfile(bad, io.BytesIO(b"notjp"))
    with pytest.raises(DataError, match="0009.jpg"):
        read_cifar_jpeg_tar(tar_path, None)


def test_idx_loader_and_errors(tmp_path):
    write_idx_set(tmp_path / "mnist")
    train, test = load_dataset("mnist", tmp_path, verify=False)
    assert train.x.shape == (20, 1, 28, 28) and test.y.tolist() == list(range(10))
    with pytest.raises(DataError, match="md5"):
        load_dataset("mnist", tmp_path)  # not the official files
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_dataset("mnist", tmp_path, verify=False)
    path.write_bytes(path.read_bytes()[:50])  # broken gzip stream
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path, verify=False)


@pytest.mark.parametrize("blob,msg", [
    (b"\x01\x02\x08\x01\x00\x00\x00\x01\x05", "magic"),
    (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x05", "element type"),
    (b"\x00\x00\x08\x03\x00\x00", "header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01", "truncated"),
])
def test_read_idx_rejects_bad_files(tmp_path, blob, msg):
    p = tmp_path / "x-idx"
    p.write_bytes(blob)
    with pytest.raises(DataError, match=msg):
        read_idx(p)


def test_label_out_of_range(tmp_path):
    write_idx_set(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(10, 12)))
    with pytest.raises(DataError, match="out of range"):
        load_dataset("mnist", tmp_path, verify=False)


def test_missing_files_and_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="not found.*data_dir"):
        load_dataset("fashion_mnist", tmp_path)
    with pytest.raises(DataError, match="cifar10"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


def test_digits_and_synthetic():
    train, test = load_dataset("digits")
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == torch.uint8
    assert len(train) + len(test) == 1797
    assert (test.class_counts() > 30).all()
    a, _ = load_dataset("synthetic", seed=3, n_train=50)
    b, _ = load_dataset("synthetic", seed=3, n_train=50)
    c, _ = load_dataset("synthetic", seed=4, n_train=50)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)


def test_label_sorted_gives_two_classes_per_agent():
    y = torch.arange(1000) % 10
    parts = partition(y, 5, "label_sorted", seed=0)
    hist = class_histogram(y, parts, 10)
    assert ((hist > 0).sum(1) == 2).all()
    assert hist.sum() == 1000
    assert "total" in format_histogram(hist)


@pytest.mark.parametrize("method,kw", [("iid", {}), ("dirichlet", {"beta": 0.3}), ("shards", {"shards_per_agent": 3}),
                                       ("label_sorted", {})])
def test_partitions_cover_everything_once_and_are_seeded(method, kw):
    y = torch.arange(600) % 10
    parts = partition(y, 6, method, seed=1, **kw)
    flat = torch.cat(parts).sort().values
    assert torch.equal(flat, torch.arange(600))
    again = partition(y, 6, method, seed=1, **kw)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    if method == "iid":
        assert (class_histogram(y, parts, 10) > 0).all()


def test_partition_errors():
    y = torch.arange(10) % 2
    with pytest.raises(PartitionError, match="without data"):
        partition(y, 10, "dirichlet", seed=0, beta=0.01)
    with pytest.raises(PartitionError):
        partition(y, 20, "iid")
    with pytest.raises(PartitionError, match="unknown partition"):
        partition(y, 2, "bogus")
    with pytest.raises(PartitionError):
        partition(y, 2, "dirichlet", beta=0)


def pcode_dirichlet(y, n_agents, alpha, seed):
    """The pcode partitioner as the issue describes it, written out loop by loop (an independent re-derivation)."""
    rs = np.random.RandomState(seed)
    rows = np.stack([np.arange(len(y)), y], axis=1)
    rs.shuffle(rows)  # shuffle (index, label) pairs, as the reference does
    n_groups = -(-n_agents // 10)
    lists = []
    start = 0
    for g in range(n_groups):
        m = min(10, n_agents - 10 * g)
        stop = len(y) if g == n_groups - 1 else start + int(10 / n_agents * len(y))
        chunk = rows[start:stop]
        start = stop
        smallest = 0
        while smallest < int(0.5 * len(chunk) / m):
            agents = [[] for _ in range(m)]
            for c in range(int(y.max()) + 1):
                of_c = [int(i) for i, label in chunk if label == c]
                p = rs.dirichlet([alpha] * m)
                p = np.array([p[a] if len(agents[a]) < len(chunk) / m else 0.0 for a in range(m)])
                if p.sum() == 0:
                    continue
                ends = [int(v) for v in np.cumsum(p / p.sum()) * len(of_c)]
                begin = 0
                for a in range(m):
                    end = len(of_c) if a == m - 1 else ends[a]
                    agents[a] += of_c[begin:end]
                    begin = max(begin, end)
            smallest = min(len(a) for a in agents)
        lists += agents
    flat = [i for a in lists for i in a]
    out, total = [], len(flat)
    for a in range(n_agents):  # contiguous slices; the first N mod n take one sample more (as relaysgd cuts)
        size = total // n_agents + (a < total % n_agents)
        out.append(sorted(flat[:size]))
        flat = flat[size:]
    return out


@pytest.mark.parametrize("n_samples,n_agents,alpha,seed", [(600, 4, 0.3, 0), (1000, 16, 0.1, 12), (999, 25, 1.0, 3)])
def test_dirichlet_even_is_the_pcode_partition(n_samples, n_agents, alpha, seed):
    y = np.random.default_rng(seed).integers(0, 10, n_samples)
    parts = partition(y, n_agents, "dirichlet_even", seed, beta=alpha)
    assert [p.tolist() for p in parts] == pcode_dirichlet(y, n_agents, alpha, seed)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n_samples  # N/n each (999 = 24 x 40 + 39)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(n_samples))
    again = partition(y, n_agents, "dirichlet_even", seed, beta=alpha)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(y, n_agents, "dirichlet_even", seed + 1, beta=alpha)
    assert any(not torch.equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_even_skews_classes_and_refuses_the_impossible(monkeypatch):
    y = np.repeat(np.arange(10), 100)
    skewed = class_histogram(y, partition(y, 10, "dirichlet_even", 0, beta=0.05), 10)
    even = class_histogram(y, partition(y, 10, "dirichlet_even", 0, beta=1000.0), 10)
    assert (skewed.sum(1) == 100).all() and (even.sum(1) == 100).all()
    # an agent's largest class: about half its data at beta 0.05, near the 1/10 of a uniform mix at beta 1000
    assert skewed.max(1).values.float().mean() > 40 and (even.max(1).values < 25).all()
    monkeypatch.setattr(importlib.import_module("crossgrad.data.partition"), "_MAX_DRAWS", 50)  # (10000: 1 s)
    with pytest.raises(PartitionError, match="dirichlet_even: 50 draws.*larger beta"):
        partition(np.zeros(40, np.int64), 4, "dirichlet_even", 0, beta=0.01)  # one class: no draw is balanced
    for beta in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(PartitionError, match="dirichlet_even beta must be a positive number"):
            partition(y, 2, "dirichlet_even", beta=beta)
    assert len(partition(y, 3, "dirichlet_even", 2**40)) == 3  # seeds past RandomState's 32 bits


@pytest.mark.parametrize("n_agents,k", [(8, 4), (5, 2), (3, 10), (12, 1)])
def test_classes_gives_every_agent_exactly_k_classes(n_agents, k):
    y = torch.arange(1200) % 10
    parts = partition(y, n_agents, "classes", seed=4, classes_per_agent=k)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(1200))
    hist = class_histogram(y, parts, 10)
    assert ((hist > 0).sum(1) == k).all()
    holders = (hist > 0).sum(0)
    assert holders.min() == n_agents * k // 10 and holders.max() == -(-n_agents * k // 10)
    for c in range(10):  # a class's 120 samples split evenly among its holders
        shares = hist[:, c][hist[:, c] > 0]
        assert shares.sum() == 120 and shares.max() - shares.min() <= 1
    again = partition(y, n_agents, "classes", seed=4, classes_per_agent=k)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


def test_classes_errors():
    y = torch.arange(100) % 10
    with pytest.raises(PartitionError, match="classes_per_agent=11 exceeds the 10 classes"):
        partition(y, 2, "classes", classes_per_agent=11)
    with pytest.raises(PartitionError, match="4 agents x classes_per_agent=2 cover only 8 of the 10 classes"):
        partition(y, 4, "classes", classes_per_agent=2)
    with pytest.raises(PartitionError, match="class 0 has 10 samples for the 20 agents"):
        partition(y, 20, "classes", classes_per_agent=10)
    with pytest.raises(PartitionError, match="needs classes_per_agent"):
        partition(y, 2, "classes")
    for bad in (0, -1, True, 2.5):
        with pytest.raises(PartitionError, match="classes_per_agent must be a positive integer"):
            partition(y, 2, "classes", classes_per_agent=bad)


def test_augment_is_seeded_and_correct():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)
    flipped = random_hflip(x, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(flipped, x.flip(-1))
    aug = Augment(crop_padding=2, hflip=True)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    # every crop is a shifted window of the zero-padded image
    cropped = random_crop(x, 1, torch.Generator().manual_seed(2))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        assert any(torch.equal(cropped[i], padded[i, :, r:r + 4, c:c + 4]) for r in range(3) for c in range(3))


def test_normalize():
    x = torch.full((2, 1, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x, ((0.5,), (0.25,)))
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, 2.0))


# ------------------------------------------------------------------------------ CIFAR-100 and Imagenette
def write_cifar100(root: Path, n_train=6, n_test=4) -> tuple[np.ndarray, list[int]]:
    """The official layout (cifar-100-python/{train,test,meta}) with tiny batches; returns train's data and labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = None
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        (folder / split).write_bytes(pickle.dumps({b"filenames": [b"x.png"] * n, b"batch_label": b"b",
                                                  b"fine_labels": fine, b"coarse_labels": [v // 5 for v in fine],
                                                  b"data": data}, protocol=2))
        out = out or (data, fine)
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                                b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}))
    return out


def test_cifar100_reads_the_official_batches_with_fine_labels(tmp_path):
    data, fine = write_cifar100(tmp_path)
    train, test = load_dataset("cifar100", tmp_path)
    assert train.x.shape == (6, 3, 32, 32) and len(test) == 4 and train.num_classes == 100
    assert train.classes[:2] == ["c0", "c1"] and train.y.tolist() == fine
    # row-major 3072 bytes: the 1024 red values, then green, then blue, each 32 rows of 32
    assert train.x[1, 2, 3, 4] == data[1, 2048 + 3 * 32 + 4] and train.x[0, 0, 0, 31] == data[0, 31]
    assert load_dataset("cifar-100", tmp_path / "cifar-100-python")[0].y.tolist() == fine  # the folder itself


def test_cifar100_refuses_bad_files_without_running_them(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    with pytest.raises(DataError, match="cifar-100-python/.train,test,meta. .official python batches. not found"):
        load_dataset("cifar100", tmp_path)
    write_cifar100(tmp_path)
    folder = tmp_path / "cifar-100-python"
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": Evil()}))
    with pytest.raises(DataError, match="meta: not a readable CIFAR-100 meta file .*refusing to load"):
        load_dataset("cifar100", tmp_path)
    assert not (tmp_path / "pwned").exists()
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"a"] * 20}))
    with pytest.raises(DataError, match="meta: not a CIFAR-100 meta file"):
        load_dataset("cifar100", tmp_path)
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"a"] * 100}))
    (folder / "test").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [100]}))
    with pytest.raises(DataError, match="test: label out of range 0..99"):
        load_dataset("cifar100", tmp_path)
    (folder / "test").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [1]}))
    with pytest.raises(DataError, match="test: not a readable CIFAR-100 batch .KeyError"):
        load_dataset("cifar100", tmp_path)
    (folder / "train").write_bytes(b"\x80\x02truncated")
    with pytest.raises(DataError, match="train: not a readable CIFAR-100 batch"):
        load_dataset("cifar100", tmp_path)


def write_imagenette(root: Path) -> Path:
    """train/ and val/ with two WordNet-id class folders of tiny JPEGs; the tench images are 40x20 and striped
    red | green (the middle half) | blue, the springer images solid grey."""
    from PIL import Image

    folder = root / "imagenette2-160"
    stripes = np.zeros((20, 40, 3), np.uint8)
    stripes[:, :10, 0] = stripes[:, 10:30, 1] = stripes[:, 30:, 2] = 255
    for split, n in (("train", 3), ("val", 1)):
        grey = Image.new("RGB", (24, 30), (128, 128, 128))
        for wnid, img in (("n01440764", Image.fromarray(stripes)), ("n02102040", grey)):
            (folder / split / wnid).mkdir(parents=True)
            for k in range(n):
                img.save(folder / split / wnid / f"{k}.JPEG", quality=95)
    (folder / "train" / "n01440764" / "notes.txt").write_text("not an image: ignored")
    return folder


def test_imagenette_decodes_resizes_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSGRAD_CACHE", str(tmp_path / "cache"))
    folder = write_imagenette(tmp_path)
    train, test = load_dataset("imagenette", tmp_path, image_size=8)
    assert train.x.shape == (6, 3, 8, 8) and train.x.dtype == torch.uint8 and test.x.shape == (2, 3, 8, 8)
    assert train.y.tolist() == [0, 0, 0, 1, 1, 1] and test.y.tolist() == [0, 1]
    assert train.classes == ["tench", "English springer"]
    # shorter side to 8, then the centre 8x8: of the striped 40x20 image, the green middle half only
    tench = train.x[0].int()
    assert (tench[1] > 200).all() and (tench[0] < 60).all() and (tench[2] < 60).all()
    assert ((train.x[3].int() - 128).abs() <= 3).all()
    assert len(list((tmp_path / "cache").iterdir())) == 1
    datasets = importlib.import_module("crossgrad.data.datasets")
    with monkeypatch.context() as m:
        m.setattr(datasets, "_open_rgb", lambda *a: pytest.fail("decoded again"))
        cached = load_dataset("imagenette", tmp_path, image_size=8)  # the cache, not one JPEG opened
        assert torch.equal(cached[0].x, train.x) and torch.equal(cached[1].y, test.y)
        (folder / "train" / "n01440764" / "0.JPEG").unlink()
        with pytest.raises(pytest.fail.Exception, match="decoded again"):  # a changed tree is never served stale
            load_dataset("imagenette", tmp_path, image_size=8)
    again = load_dataset("imagenette", tmp_path, image_size=8)
    assert len(again[0]) == 5 and len(list((tmp_path / "cache").iterdir())) == 2
    for f in (tmp_path / "cache").iterdir():
        f.write_bytes(b"broken")  # a broken cache is rebuilt
    assert torch.equal(load_dataset("imagenette", folder, image_size=8)[0].x, again[0].x)
    big = load_dataset("imagenette", tmp_path, image_size=24)[0]
    assert big.x.shape == (5, 3, 24, 24)


def test_imagenette_refuses_bad_trees_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSGRAD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="imagenette: no folder with train/ and val/"):
        load_dataset("imagenette", tmp_path)
    folder = write_imagenette(tmp_path)
    for bad in (0, -3, 2.5, True, "big"):
        with pytest.raises(DataError, match="image_size must be a positive integer"):
            load_dataset("imagenette", tmp_path, image_size=bad)
    with pytest.raises(DataError, match="takes only the option image_size"):
        load_dataset("imagenette", tmp_path, size=8)
    with pytest.raises(DataError, match="cifar10 takes no options"):
        load_dataset("cifar10", tmp_path, image_size=8)
    (folder / "val" / "n09999999").mkdir()
    with pytest.raises(DataError, match="n09999999: class folder not in the training split"):
        load_dataset("imagenette", tmp_path)
    (folder / "val" / "n09999999").rmdir()
    (folder / "train" / "n03000684").mkdir()
    with pytest.raises(DataError, match="n03000684: holds no .JPEG"):
        load_dataset("imagenette", tmp_path)
    (folder / "train" / "n03000684" / "0.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(DataError, match=r"n03000684/0.JPEG: JPEG cannot be decoded") as e:
        load_dataset("imagenette", tmp_path)
    assert "\n" not in str(e.value)
    good = (folder / "train" / "n01440764" / "0.JPEG").read_bytes()
    (folder / "train" / "n03000684" / "0.JPEG").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DataError, match=r"n03000684/0.JPEG: JPEG cannot be decoded"):
        load_dataset("imagenette", tmp_path)


@pytest.mark.parametrize("name,extra", [("cifar100", []), ("imagenette", ["data.image_size=16"])])
def test_new_datasets_train_with_crossgrad_run(tmp_path, monkeypatch, name, extra):
    from crossgrad.run import run_experiment
    from crossgrad.run.config import load_config

    monkeypatch.setenv("CROSSGRAD_CACHE", str(tmp_path / "cache"))
    (write_cifar100 if name == "cifar100" else write_imagenette)(tmp_path / "data")
    cfg = load_config(None, [f"data.name={name}", f'data.data_dir="{tmp_path / "data"}"', "data.augment=true",
                             "data.partition=iid", "topology.n_agents=2", "training.batch_size=2",
                             "training.steps=2", "training.threads=1", "model.name=mlp",
                             f'output.out_dir="{tmp_path / "runs"}"', *extra])
    result = run_experiment(cfg, quiet=True)
    assert result.summary["status"] == "completed"
    assert 0 <= result.summary["final"]["consensus_acc"] <= 1
