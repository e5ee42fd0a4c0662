"""Dataset loaders for the standard on-disk formats, with integrity checks and clear errors.

Every loader returns `(train, test)` as `Dataset`s holding uint8 images [N, C, H, W] (float32 for
`synthetic`) and int64 labels. Files are verified against the official md5s where they are known;
a missing, truncated or corrupt file raises `DataError` naming the file, never a numpy traceback.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from crossgrad.files import OutputError, atomic_write, make_dir


class DataError(ValueError):
    """A dataset file is missing, corrupt or not what it claims to be."""


@dataclass
class Dataset:
    x: Tensor  # uint8 [N, C, H, W] for image sets, float32 for synthetic data
    y: Tensor  # int64 [N]
    classes: list[str]
    name: str

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"{self.name}: {len(self.x)} inputs but {len(self.y)} labels")
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes)):
            raise DataError(f"{self.name}: labels outside 0..{len(self.classes) - 1}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: Tensor) -> Dataset:
        return Dataset(self.x[idx], self.y[idx], self.classes, self.name)

    def class_counts(self) -> Tensor:
        return torch.bincount(self.y, minlength=self.num_classes)


# ------------------------------------------------------------------------------------------------
# integrity
# ------------------------------------------------------------------------------------------------

_md5_cache: dict[tuple[str, int, int], str] = {}


def md5sum(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _md5_cache:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _md5_cache[key] = h.hexdigest()
    return _md5_cache[key]


def check_md5(path: Path, expected: str | None) -> None:
    if expected is None:
        return
    got = md5sum(path)
    if got != expected:
        raise DataError(f"{path}: md5 {got} does not match the official {expected}; the file is corrupt, "
                        "truncated or a different dataset")


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot be read or decompressed ({e}); the file is corrupt or truncated") from None


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) holding unsigned bytes, checking header and size."""
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: IDX element type 0x{dtype_code:02x} is not unsigned byte (0x08)")
    if not 1 <= ndim <= 4 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions; the header is corrupt or truncated")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = math.prod(dims)  # exact: a corrupt header must not overflow into a plausible size
    payload = len(raw) - 4 - 4 * ndim
    if payload != expected:
        raise DataError(f"{path}: header promises {expected} bytes of data for shape {dims}, file holds "
                        f"{payload}; the file is {'truncated' if payload < expected else 'corrupt'}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


# ------------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST
# ------------------------------------------------------------------------------------------------

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")

# (gzip md5, raw md5) of the official files
_IDX_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
        "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    },
}
_IDX_DIRS = {"mnist": ("mnist", "MNIST/raw", "mnist/raw"),
             "fashion_mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "fashion-mnist/raw")}
_IDX_URLS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
_CLASSES = {
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


def default_data_dir() -> Path:
    return Path(os.environ.get("CROSSGRAD_DATA", "data"))


def _find_idx(name: str, root: Path) -> dict[str, Path] | None:
    for folder in [root / d for d in _IDX_DIRS[name]] + [root]:
        found = {}
        for f in _IDX_FILES:
            for candidate in (folder / f"{f}.gz", folder / f):
                if candidate.is_file():
                    found[f] = candidate
                    break
        if len(found) == len(_IDX_FILES):
            return found
    return None


def _load_idx(name: str, root: Path, download: bool, verify: bool) -> tuple[Dataset, Dataset]:
    files = _find_idx(name, root)
    if files is None and download:
        target = root / _IDX_DIRS[name][0]
        for f in _IDX_FILES:
            _download([u + f + ".gz" for u in _IDX_URLS[name]], target / f"{f}.gz", _IDX_MD5[name][f][0])
        files = _find_idx(name, root)
    if files is None:
        searched = ", ".join(str(root / d) for d in _IDX_DIRS[name]) + f", {root}"
        raise DataError(f"{name}: IDX files ({', '.join(_IDX_FILES)}, optionally .gz) not found in {searched}; "
                        "point data.data_dir at them (or fetch them with "
                        f"crossgrad.data.load_dataset('{name}', DIR, download=True))")
    arrays = {}
    for f, path in files.items():
        if verify:
            gz_md5, raw_md5 = _IDX_MD5[name][f]
            check_md5(path, gz_md5 if path.suffix == ".gz" else raw_md5)
        arrays[f] = read_idx(path)
    out = []
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        img_file, lab_file = files[f"{split}-images-idx3-ubyte"], files[f"{split}-labels-idx1-ubyte"]
        if images.ndim != 3:
            raise DataError(f"{img_file}: images must have 3 dimensions (count, rows, cols), not {images.shape}")
        if labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{lab_file}: labels of shape {labels.shape} do not match the {len(images)} "
                            f"images of {img_file}")
        if len(labels) == 0 or images.shape[1] == 0 or images.shape[2] == 0:
            raise DataError(f"{img_file}: holds no data (shape {images.shape})")
        if out and images.shape[1:] != tuple(out[0].x.shape[2:]):
            raise DataError(f"{img_file}: images are {images.shape[1]}x{images.shape[2]}"
                            f", the training images {out[0].x.shape[2]}x{out[0].x.shape[3]}")
        if labels.max() >= 10:
            raise DataError(f"{lab_file}: label {labels.max()} out of range 0..9")
        x = torch.from_numpy(images.copy()).unsqueeze(1)
        out.append(Dataset(x, torch.from_numpy(labels.astype(np.int64)), _CLASSES[name], name))
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------
# CIFAR-10: official python batches or the JPEG tarball
# ------------------------------------------------------------------------------------------------

CIFAR_PY_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_JPEG_MD5 = "85831f2b9a6b0de08b6d8fd7386ffa93"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: plain containers and numpy arrays, no other code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _unpickle_data(path: Path, what: str) -> dict:
    """A CIFAR pickle's dict, loaded by _BatchUnpickler (no code runs); any failure is a one-line DataError."""
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - a hostile pickle can raise almost anything (even MemoryError
        # for a huge declared length); for a 30 MB batch file, every one of them means "bad file"
        raise DataError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a readable {what} (holds a {type(d).__name__}, not a dict)")
    return d


def _read_cifar_batch(path: Path, labels_key: bytes = b"labels", num_classes: int = 10,
                      what: str = "CIFAR-10") -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle_data(path, f"{what} batch")
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[labels_key], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - missing keys, ragged or non-numeric contents: all "bad file"
        raise DataError(f"{path}: not a readable {what} batch ({type(e).__name__}: {e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(data) != len(labels):
        raise DataError(f"{path}: unexpected {what} batch shape {data.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: label out of range 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar_py(folder: Path) -> tuple[Dataset, Dataset]:
    parts = [_read_cifar_batch(folder / f"data_batch_{k}") for k in range(1, 6)]
    test = _read_cifar_batch(folder / "test_batch")
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    classes = _CLASSES["cifar10"]
    return (Dataset(x, y, classes, "cifar10"),
            Dataset(torch.from_numpy(test[0].copy()), torch.from_numpy(test[1]), classes, "cifar10"))


# ------------------------------------------------------------------------------------------------
# CIFAR-100: official python batches (train, test, meta), fine labels
# ------------------------------------------------------------------------------------------------

CIFAR100_PY_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def _read_cifar100_names(path: Path) -> list[str]:
    d = _unpickle_data(path, "CIFAR-100 meta file")
    names = d.get(b"fine_label_names")
    if not isinstance(names, list) or len(names) != 100 or not all(isinstance(v, (bytes, str)) for v in names):
        raise DataError(f"{path}: not a CIFAR-100 meta file (no list of 100 fine_label_names)")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in names]


def _load_cifar100(root: Path, download: bool) -> tuple[Dataset, Dataset]:
    folder = next((f for f in (root / "cifar-100-python", root) if (f / "meta").is_file()), None)
    if folder is None and download:
        archive = root / "cifar-100-python.tar.gz"
        _download([CIFAR100_URL], archive, CIFAR100_PY_MD5)
        _safe_extract(archive, root)
        folder = root / "cifar-100-python"
    if folder is None:
        raise DataError(f"cifar100: cifar-100-python/{{train,test,meta}} (official python batches) not found under "
                        f"{root}; point data.data_dir at them (or fetch them with "
                        "crossgrad.data.load_dataset('cifar100', DIR, download=True))")
    classes = _read_cifar100_names(folder / "meta")
    out = []
    for split in ("train", "test"):
        x, y = _read_cifar_batch(folder / split, b"fine_labels", 100, "CIFAR-100")
        out.append(Dataset(torch.from_numpy(x.copy()), torch.from_numpy(y), classes, "cifar100"))
    return out[0], out[1]


def _cache_dir() -> Path:
    return Path(os.environ.get("CROSSGRAD_CACHE", Path.home() / ".cache" / "crossgrad"))


def _open_rgb(source: bytes | Path, where: str):
    """A decoded RGB PIL image; a file that is not an image (or a decompression bomb) is a DataError."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise DataError(f"{where}: JPEG cannot be decoded ({e})") from None


def _decode_jpeg(data: bytes, where: str) -> np.ndarray:
    img = np.asarray(_open_rgb(data, where))
    if img.shape != (32, 32, 3):
        raise DataError(f"{where}: image is {img.shape}, expected 32x32 RGB")
    return img


def read_cifar_jpeg_tar(tar_path: Path, order_csv: Path | None, progress: bool = True) -> tuple[Dataset, Dataset]:
    """Decode the JPEG copy of CIFAR-10 straight from its tarball (nothing is extracted).

    Train images are put in the original data_batch_1..5 order using `order_csv`; test images are
    ordered by class, then file number (the global test order is not recoverable from the JPEGs).
    """
    from tqdm import tqdm

    classes = _CLASSES["cifar10"]
    images: dict[str, np.ndarray] = {}
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
            for m in tqdm(members, desc=f"decoding {tar_path.name}", unit="img", leave=False,
                          disable=not progress or len(members) < 1000):
                f = tar.extractfile(m)
                images[m.name] = _decode_jpeg(f.read(), f"{tar_path}:{m.name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{tar_path}: cannot read the tar archive ({' '.join(str(e).split())})") from None

    def split(name: str) -> tuple[list[str], list[int]]:
        keys = sorted(k for k in images if k.split("/")[-3:-2] == [name])
        labels = []
        for k in keys:
            cls = k.split("/")[-2]
            if cls not in classes:
                raise DataError(f"{tar_path}:{k}: unknown class folder {cls!r}")
            labels.append(classes.index(cls))
        return keys, labels

    train_keys, train_labels = split("train")
    if order_csv is not None and order_csv.is_file():
        try:
            with open(order_csv, newline="") as f:
                rows = sorted(csv.DictReader(f), key=lambda r: int(r["index"]))
            train_keys = [r["path"] for r in rows]
            train_labels = [int(r["label"]) for r in rows]
        except (KeyError, ValueError, OSError) as e:
            raise DataError(f"{order_csv}: not a valid train_order.csv ({e})") from None
        missing = [k for k in train_keys if k not in images]
        if missing:
            raise DataError(f"{order_csv}: refers to {len(missing)} images missing from {tar_path}, e.g. {missing[0]}")
    test_keys, test_labels = split("test")

    def build(keys: list[str], labels: list[int]) -> Dataset:
        x = torch.from_numpy(np.stack([images[k] for k in keys])).permute(0, 3, 1, 2).contiguous()
        return Dataset(x, torch.tensor(labels, dtype=torch.long), classes, "cifar10")

    return build(train_keys, train_labels), build(test_keys, test_labels)


def _load_cifar_jpeg(tar_path: Path, verify: bool, progress: bool) -> tuple[Dataset, Dataset]:
    if verify:
        check_md5(tar_path, CIFAR_JPEG_MD5)
    cache = _cache_dir() / f"cifar10-jpeg-{md5sum(tar_path)}.pt"
    if cache.is_file():
        try:
            d = torch.load(cache, weights_only=True)
            classes = _CLASSES["cifar10"]
            return (Dataset(d["x_train"], d["y_train"], classes, "cifar10"),
                    Dataset(d["x_test"], d["y_test"], classes, "cifar10"))
        except Exception:  # a broken cache is rebuilt, never trusted
            pass
    train, test = read_cifar_jpeg_tar(tar_path, tar_path.parent / "train_order.csv", progress)
    with contextlib.suppress(OutputError):  # no writable cache (or a link planted in it): decode again next time
        atomic_write(make_dir(cache.parent) / cache.name,
                     lambda f: torch.save({"x_train": train.x, "y_train": train.y, "x_test": test.x,
                                           "y_test": test.y}, f))
    return train, test


def _load_cifar10(root: Path, download: bool, verify: bool, progress: bool) -> tuple[Dataset, Dataset]:
    for folder in (root / "cifar-10-batches-py", root):
        if (folder / "data_batch_1").is_file():
            return _load_cifar_py(folder)
    for tar in (root / "cifar10-jpeg" / "cifar-10-images-jpg.tar.gz", root / "cifar-10-images-jpg.tar.gz"):
        if tar.is_file():
            return _load_cifar_jpeg(tar, verify, progress)
    if download:
        archive = root / "cifar-10-python.tar.gz"
        _download([CIFAR_URL], archive, CIFAR_PY_MD5)
        _safe_extract(archive, root)
        return _load_cifar_py(root / "cifar-10-batches-py")
    raise DataError(f"cifar10: neither cifar-10-batches-py/ (official python batches) nor "
                    f"cifar10-jpeg/cifar-10-images-jpg.tar.gz found under {root}; point data.data_dir at them "
                    "(or fetch them with crossgrad.data.load_dataset('cifar10', DIR, download=True))")


# ------------------------------------------------------------------------------------------------
# Imagenette: an ImageFolder tree (train/ and val/, one folder per class), resized and cached
# ------------------------------------------------------------------------------------------------

IMAGENETTE_DIRS = ("imagenette2-320", "imagenette2-160", "imagenette2", "imagenette")
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
#: the readable names of Imagenette's ten ImageNet classes (its folders are WordNet ids)
_IMAGENETTE_NAMES = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn", "n03417042": "garbage truck",
    "n03425413": "gas pump", "n03445777": "golf ball", "n03888605": "parachute",
}


def _image_folder(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[Path], list[int]]:
    """(class folders, image files, labels) of one split, in sorted order; `classes` fixes the train split's."""
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(f"{split_dir}: no class folders")
    if classes is None:
        classes = found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(f"{split_dir / unknown[0]}: class folder not in the training split")
    files, labels = [], []
    for c in found:
        imgs = sorted(f for f in (split_dir / c).iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES)
        if not imgs:
            raise DataError(f"{split_dir / c}: holds no .JPEG, .jpg or .png image")
        files += imgs
        labels += [classes.index(c)] * len(imgs)
    return classes, files, labels


def _square(img, size: int) -> np.ndarray:
    """The shorter side resized to `size` (bilinear, antialiased), then the centre size x size crop: HWC uint8."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((w2, h2), Image.Resampling.BILINEAR)
    left, top = (w2 - size) // 2, (h2 - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def _load_imagenette(root: Path, image_size: int, progress: bool) -> tuple[Dataset, Dataset]:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"imagenette: image_size must be a positive integer, not {image_size!r}")
    folder = next((f for f in [root / d for d in IMAGENETTE_DIRS] + [root]
                   if (f / "train").is_dir() and (f / "val").is_dir()), None)
    if folder is None:
        raise DataError(f"imagenette: no folder with train/ and val/ (one subfolder per class) among "
                        f"{', '.join(str(root / d) for d in IMAGENETTE_DIRS)}, {root}; point data.data_dir at it")
    classes, train_files, train_labels = _image_folder(folder / "train", None)
    _, test_files, test_labels = _image_folder(folder / "val", classes)
    names = [_IMAGENETTE_NAMES.get(c, c) for c in classes]
    # the cache is keyed by every file's path, size and mtime (cheap to read, changes when the tree does)
    # and by the image size; hashing 1.5 GB of JPEGs on every start would cost more than it protects
    h = hashlib.md5(f"imagenette v1 {image_size}\n".encode())
    for f in train_files + test_files:
        st = f.stat()
        h.update(f"{f.relative_to(folder)} {st.st_size} {st.st_mtime_ns}\n".encode())
    cache = _cache_dir() / f"imagenette-{image_size}px-{h.hexdigest()}.pt"
    if cache.is_file():
        try:
            d = torch.load(cache, weights_only=True)
            return (Dataset(d["x_train"], d["y_train"], names, "imagenette"),
                    Dataset(d["x_test"], d["y_test"], names, "imagenette"))
        except Exception:  # a broken cache is rebuilt, never trusted
            pass
    from tqdm import tqdm

    def decode(files: list[Path], labels: list[int], split: str) -> Dataset:
        x = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
        for i, f in enumerate(tqdm(files, desc=f"decoding imagenette {split}", unit="img", leave=False,
                                   disable=not progress or len(files) < 1000)):
            x[i] = _square(_open_rgb(f, str(f)), image_size)
        return Dataset(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels, dtype=torch.long),
                       names, "imagenette")

    train, test = decode(train_files, train_labels, "train"), decode(test_files, test_labels, "val")
    with contextlib.suppress(OutputError):  # no writable cache (or a link planted in it): decode again next time
        atomic_write(make_dir(cache.parent) / cache.name,
                     lambda f: torch.save({"x_train": train.x, "y_train": train.y, "x_test": test.x,
                                           "y_test": test.y}, f))
    return train, test


# ------------------------------------------------------------------------------------------------
# embedded and synthetic data
# ------------------------------------------------------------------------------------------------

def _load_digits() -> tuple[Dataset, Dataset]:
    """scikit-learn's 8x8 digits (ships with the package): a seeded, stratified 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test_idx.append(rng.permutation(idx)[: round(0.2 * len(idx))])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    classes = [str(i) for i in range(10)]
    return (Dataset(torch.from_numpy(x[~test_mask]), torch.from_numpy(y[~test_mask]), classes, "digits"),
            Dataset(torch.from_numpy(x[test_mask]), torch.from_numpy(y[test_mask]), classes, "digits"))


def make_synthetic(n_train: int = 1000, n_test: int = 200, num_classes: int = 10,
                   input_shape: tuple[int, ...] = (1, 8, 8), seed: int = 0,
                   noise: float = 1.0) -> tuple[Dataset, Dataset]:
    """Gaussian clusters: one random mean per class plus isotropic noise; learnable and seeded."""
    g = torch.Generator().manual_seed(seed)
    dim = int(np.prod(input_shape))
    means = torch.randn(num_classes, dim, generator=g) * 2.0

    def draw(n: int) -> Dataset:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = means[y] + noise * torch.randn(n, dim, generator=g)
        return Dataset(x.reshape(n, *input_shape).float(), y, [str(i) for i in range(num_classes)], "synthetic")

    return draw(n_train), draw(n_test)


# ------------------------------------------------------------------------------------------------
# downloads (never used by the tests)
# ------------------------------------------------------------------------------------------------

def _download(urls: list[str] | tuple[str, ...], target: Path, md5: str) -> None:
    if target.is_file() and md5sum(target) == md5:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
            if md5sum(Path(tmp)) != md5:
                raise DataError(f"{url}: downloaded file has the wrong md5")
            os.replace(tmp, target)
            return
        except (OSError, DataError) as e:
            errors.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DataError(f"could not download {target.name}: " + "; ".join(errors))


def _safe_extract(archive: Path, root: Path) -> None:
    """Extract a tar archive, refusing absolute paths, '..' and links."""
    base = root.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar.getmembers():
                dest = (base / m.name).resolve()
                if m.issym() or m.islnk() or not (m.isfile() or m.isdir()) or not dest.is_relative_to(base):
                    raise DataError(f"{archive}: refusing to extract unsafe member {m.name!r}")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the standard library checks again
                tar.extractall(base, filter="data")
            else:  # pragma: no cover
                tar.extractall(base)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        # tarfile's "could not be opened" lists one line per method it tried: one line here
        raise DataError(f"{archive}: cannot extract the archive ({' '.join(str(e).split())})") from None


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------

DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagenette", "digits", "synthetic")
_ALIASES = {"fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100"}


#: each dataset's (input shape, class count), known without reading it, so a config is checked before its
#: data loads (synthetic: make_synthetic's defaults, which is what a config gets; imagenette: its 10 classes
#: at the default image_size, see `dataset_shape`)
SHAPES = {"mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10),
          "cifar100": ((3, 32, 32), 100), "imagenette": ((3, 32, 32), 10), "digits": ((1, 8, 8), 10),
          "synthetic": ((1, 8, 8), 10)}


def dataset_shape(name: str, image_size: int | None = None) -> tuple[tuple[int, int, int], int]:
    """(input shape, class count) of dataset `name` loaded with these options, without loading it."""
    key = dataset_key(name)
    shape, classes = SHAPES[key]
    if image_size is None:
        return shape, classes
    if key != "imagenette":
        raise DataError(f"{key} takes no options, got ['image_size']")
    return (shape[0], image_size, image_size), classes


def available_datasets() -> list[str]:
    return list(DATASETS)


def dataset_key(name: str) -> str:
    """The registered name of dataset `name` (case and aliases such as "fashion-mnist" allowed), or a DataError."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    return key


def load_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = False, verify: bool = True,
                 progress: bool = True, **options) -> tuple[Dataset, Dataset]:
    """(train, test) of a named dataset. `synthetic` takes make_synthetic's options, `imagenette` an
    `image_size` (the side of its square images in pixels, 32 by default; the GUT setting uses 224).

    `progress=False` silences the bar of the slow step, decoding JPEGs (CIFAR-10's tarball, Imagenette) on first use.
    """
    key = dataset_key(name)
    if key == "synthetic":
        return make_synthetic(**options)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if key == "imagenette":
        if set(options) - {"image_size"}:
            raise DataError(f"imagenette takes only the option image_size, got {sorted(options)}")
        return _load_imagenette(root, options.get("image_size", 32), progress)
    if options:
        raise DataError(f"{key} takes no options, got {sorted(options)}")
    if key == "digits":
        return _load_digits()
    if key == "cifar100":
        return _load_cifar100(root, download)
    if key == "cifar10":
        return _load_cifar10(root, download, verify, progress)
    return _load_idx(key, root, download, verify)
