"""docs/robustness.md quotes what crossgrad prints: every quoted message of a row below is produced here and
must match (issue 30.7: the page had drifted from the code).

A row's messages are the backtick spans of its second column that contain a space, outside "(was: ...)"
and "(were: ...)", which quote old behaviour. In a quote, `…` stands for any text and DIR for a path.
Rows whose inputs take a real process, a peer or a signal are checked by the tests named in ELSEWHERE.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import pickle
import re
import struct
import tarfile
from pathlib import Path

import pytest

from crossgrad.cli import main

DOC = Path(__file__).parents[2] / "docs" / "robustness.md"


def rows() -> dict[str, str]:
    """First column -> second column of the table."""
    out = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 2 and not set(cells[0]) <= set("-") and cells[0] != "bad input":
            out[cells[0]] = cells[1]
    return out


def quoted(cell: str) -> list[str]:
    cell = re.sub(r"\((was|were|or)[: ][^()]*(\([^()]*\)[^()]*)*\)", "", cell)
    return [q for q in re.findall(r"`([^`]+)`", cell) if " " in q and not re.fullmatch(r"crossgrad \w+", q)]


def matches(quote: str, message: str) -> bool:
    parts = re.split(r"…|\bDIR\b", quote)
    return re.search(".*?".join(re.escape(p) for p in parts), message) is not None


def error(call) -> str:
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        return str(e)
    raise AssertionError("no error")


def cli(*argv: str) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        main(list(argv))
    return err.getvalue()


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


TINY = sets("model.name=mlp", "topology.n_agents=3", "training.batch_size=8", "training.steps=2",
            "training.threads=1")


# ------------------------------------------------------------------------------ the rows' inputs
def idx(dims: tuple[int, ...], payload: bytes | None = None, magic: bytes = b"\x00\x00\x08") -> bytes:
    size = 1
    for k in dims:
        size *= k
    return magic + bytes([len(dims)]) + b"".join(struct.pack(">I", k) for k in dims) + (
        bytes(size) if payload is None else payload)


def idx_files(tmp: Path) -> list[str]:
    from crossgrad.data.datasets import read_idx

    d = tmp / "idx"
    d.mkdir()
    cases = {"train-images-idx3-ubyte": idx((3, 28, 28))[:-10], "magic": b"\x01\x02" + idx((1,))[2:],
             "type": idx((1,), magic=b"\x00\x00\x0d"), "dims": idx((1,) * 7), "huge": idx((2**31,) * 4, b"")}
    out = []
    for name, blob in cases.items():
        (d / name).write_bytes(blob)
        out.append(error(lambda p=d / name: read_idx(p)))
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx((3, 28, 28)))[:40])
    out.append(error(lambda: read_idx(d / "train-images-idx3-ubyte.gz")))
    return out


def mnist_dir(root: Path, train=((3, 28, 28), (3,)), test=((3, 28, 28), (3,)), labels=None) -> Path:
    root.mkdir(parents=True)
    for split, (img, lab) in (("train", train), ("t10k", test)):
        (root / f"{split}-images-idx3-ubyte").write_bytes(idx(img))
        (root / f"{split}-labels-idx1-ubyte").write_bytes(idx(lab, labels if split == "t10k" else None))
    return root


def idx_sets(tmp: Path) -> list[str]:
    from crossgrad.data import load_dataset

    def load(name, **kw):
        return error(lambda: load_dataset("mnist", mnist_dir(tmp / name, **kw), verify=False))

    return [load("label", labels=bytes([1, 42, 3])), load("count", train=((3, 28, 28), (4,))),
            load("size", test=((3, 5, 5), (3,))), load("empty", train=((0, 28, 28), (0,)))]


def missing_files(tmp: Path) -> list[str]:
    from crossgrad.data import load_dataset

    return [error(lambda: load_dataset("mnist", tmp))]


def cifar_pickle(tmp: Path) -> list[str]:
    from crossgrad.data.datasets import _read_cifar_batch

    class Opens:
        def __reduce__(self):
            return open, ("/nonexistent",)

    (tmp / "data_batch_1").write_bytes(pickle.dumps(Opens()))
    return [error(lambda: _read_cifar_batch(tmp / "data_batch_1"))]


def unsafe_tar(tmp: Path) -> list[str]:
    from crossgrad.data.datasets import _safe_extract, read_cifar_jpeg_tar

    member = tarfile.TarInfo("../escape.txt")
    member.size = 1
    with tarfile.open(tmp / "x.tar.gz", "w:gz") as tar:
        tar.addfile(member, io.BytesIO(b"x"))
    (tmp / "not").mkdir()
    (tmp / "not" / "x.tar.gz").write_bytes(b"not a tar archive")
    return [error(lambda: _safe_extract(tmp / "x.tar.gz", tmp / "out")),
            error(lambda: _safe_extract(tmp / "not" / "x.tar.gz", tmp / "out")),
            error(lambda: read_cifar_jpeg_tar(tmp / "not" / "x.tar.gz", None, progress=False))]


def truncated_checkpoint(tmp: Path) -> list[str]:
    from crossgrad.run.checkpoint import read_checkpoint

    (tmp / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    return [error(lambda: read_checkpoint(tmp / "checkpoint.pt", {}, 4, 3))]


def config_values(tmp: Path) -> list[str]:
    return [cli("run", *sets(s)) for s in (
        "algorithm.name=sgd", "training.bogus=1", "training.seed=-1", "training.threads=100000",
        'output.name="a\\u0000b"', "training.batch_size=99999999999", "algorithm.alpha=1.5", "algorithm.gamma=0",
        "topology.n_agents=2000", "model.name=vgg11", 'training.device="mps"', 'training.device="tpu"',
        'training.device="cuda:7"', "algorithm.weight_decay=nan", "algorithm.weight_decay=inf")] + [
        cli("run", *sets("algorithm.name=cga", s)) for s in ("algorithm.margin=nan", "algorithm.margin=inf",
                                                             "algorithm.eps=nan", "algorithm.margin=-1")] + [
        cli("config", "--set", s) for s in ("nokey", "training=3")]


def topologies(tmp: Path) -> list[str]:
    from crossgrad.topology import make_topology

    return [error(lambda: make_topology("petersen", 12)), error(lambda: make_topology("circulant", 8, offsets=[-1])),
            error(lambda: make_topology("circulant", 12, offsets=[2, 4])),
            error(lambda: make_topology("base_graph", 8, k=0)),
            error(lambda: make_topology("torus", 7)), error(lambda: make_topology("ring", 100000)),
            error(lambda: make_topology("erdos_renyi", 5, p=0.5, seed=-1)),
            error(lambda: make_topology("edges", 3, edges=[(0, 1, 2)])),
            error(lambda: make_topology("edges", 3, edges=[(0, "1")]))]


def partitions(tmp: Path) -> list[str]:
    from crossgrad.data import partition

    y = [c for c in range(10) for _ in range(10)]
    return [cli("run", *sets("topology.n_agents=2000")), error(lambda: partition(y, 2000, "iid", 0)),
            error(lambda: partition(y, 30, "dirichlet", 0, beta=0.01))]


def diverging(tmp: Path) -> list[str]:
    from unittest import mock

    import torch

    from crossgrad.run.data import AgentBatches

    original, calls = AgentBatches.next, []

    def poisoned(self):  # step 12, in the second epoch (digits, 5 agents, batch 32: 9 steps per epoch)
        calls.append(1)
        batches = original(self)
        return [(torch.full_like(x, float("nan")), y) for x, y in batches] if len(calls) == 12 else batches

    early = cli("run", "--quiet", "--out-dir", str(tmp), "--name", "a", *TINY,
                *sets("algorithm.lr=1e9", "training.steps=20"))
    with mock.patch.object(AgentBatches, "next", poisoned):
        late = cli("run", "--quiet", "--out-dir", str(tmp), "--name", "b",
                   *sets("model.name=mlp", "training.epochs=2", "training.threads=1"))
    return [early, late]


def lock_links(tmp: Path) -> list[str]:
    run = tmp / "r"
    run.mkdir()
    (tmp / "victim").write_text("")
    (run / ".lock").symlink_to(tmp / "victim")
    (tmp / "hard" / "r").mkdir(parents=True)
    (tmp / "hard" / "r" / ".lock").hardlink_to(tmp / "victim")
    return [cli("run", "--out-dir", str(tmp), "--name", "r", *TINY),
            cli("run", "--out-dir", str(tmp / "hard"), "--name", "r", *TINY)]


def out_paths(tmp: Path) -> list[str]:
    from unittest import mock

    def refuse(self, *args, **kwargs):  # what a read-only folder does to a non-root user
        raise PermissionError(13, "Permission denied", str(self))

    (tmp / "afile").write_text("")
    (tmp / "d" / "r" / ".lock").mkdir(parents=True)
    assert main(["run", "--quiet", "--out-dir", str(tmp / "done"), *TINY]) == 0
    with mock.patch.object(Path, "mkdir", refuse):
        unwritable = cli("run", "--out-dir", str(tmp / "ro"), *TINY)
    return [cli("run", "--out-dir", str(tmp / "afile"), *TINY),
            cli("run", "--out-dir", str(tmp), "--name", "x" * 300, *TINY), unwritable,
            cli("run", "--out-dir", str(tmp / "d"), "--name", "r", *TINY),
            cli("report", str(tmp / "done"), "--out", str(tmp / "afile")),
            cli("plot", str(tmp / "done"), "--out", str(tmp / "afile" / "sub"))]


def bench_options(tmp: Path) -> list[str]:
    return [cli("bench", *a) for a in (["--agents", "-1"], ["--batch", "0"], ["--scaling", "0"],
                                       ["--scaling-window", "-1"], ["--models", "bogus:1x8x8"],
                                       ["--models", "lenet5:1x8"], ["--models", "vgg11:1x8x8"], ["--device", "tpu"])]


def cli_numbers(tmp: Path) -> list[str]:
    return [cli("run", "--stop-after", "-1"), cli("models", "--num-classes", "-3"),
            cli("models", "--input-shape", "0,8,8")]


def spectral_gap(tmp: Path) -> list[str]:
    (tmp / "W.txt").write_text("0 1\n1 0\n")
    return [cli("topology", "file", "2", "--option", f'path="{tmp / "W.txt"}"')]


def second_hour(tmp: Path) -> list[str]:
    f = tmp / "ngc.toml"
    f.write_text('[algorithm]\nname = "ngc"\nalpha = 1.0\n')
    switched = cli("config", str(f), "--set", "algorithm.name=dsgd")
    f.write_text('[algorithm]\nname = "ngc"\nalpah = 1.0\n')
    run = ["run", "--quiet", "--out-dir", str(tmp), "--name", "digits-ngc", *TINY]
    assert main(run) == 0
    return [switched, cli("config", str(f), "--set", "algorithm.name=dsgd"), cli(*run)] + [
        cli("config", *TINY, *sets(*bad)) for bad in (
            ["topology.n_agents=1"], ["model.name=lenet"], ["model.norm=layer"],
            ["model.name=lenet5", "model.options.widht=0.5"], ["model.name=lenet5", 'model.options.padding1="x"'],
            ["training.steps=6", "training.warmup_steps=7"], ["output.out_dir=''"])]


def unfinished(tmp: Path) -> list[str]:
    import os
    import signal
    from unittest import mock

    from crossgrad.run.data import AgentBatches

    original, calls = AgentBatches.next, []

    def terminated(self, *args):  # SIGTERM while step 4's batches are drawn: the step completes, then it stops
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)

    run = ["run", "--quiet", "--out-dir", str(tmp), *TINY, *sets("training.steps=6")]
    stopped = cli(*run, "--name", "s", "--stop-after", "2")
    with mock.patch.object(AgentBatches, "next", terminated):
        term = cli(*run, "--name", "t")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["report", str(tmp)])
    return [stopped, term, (tmp / "t" / "status.json").read_text(), out.getvalue()]


def presets(tmp: Path) -> list[str]:
    return [cli("run", "x.toml", "--preset", "relaysgd-cifar10-vgg11-full16-iid-allreduce"),  # refused unread
            cli("run", "--preset", "x")]


#: row (the start of its first column) -> what produces its messages
CASES = {
    "IDX file truncated": idx_files,
    "IDX file with a wrong magic number": idx_files,
    "gzip stream cut short": idx_files,
    "IDX header whose dimensions": idx_files,
    "label out of range": idx_sets,
    "IDX files that disagree": idx_sets,
    "data directory without the files": missing_files,
    "CIFAR pickle batch": cifar_pickle,
    "tar archive with": unsafe_tar,
    "tar archive that is not one": unsafe_tar,
    "checkpoint truncated or empty": truncated_checkpoint,
    "unknown algorithm": config_values,
    "`--preset NAME` with a config file": presets,
    "negative or": config_values,
    "switching algorithm on the command line": second_hour,
    "one agent": second_hour,
    "running a finished run again": second_hour,
    "unknown model, norm or model option": second_hour,
    "a warm-up longer than the run": second_hour,
    "a control character": config_values,
    "batch size larger": config_values,
    "`--set` strings": config_values,
    "alpha outside": config_values,
    "`training.device": config_values,
    "NaN / Inf `algorithm.weight_decay`": config_values,
    "torus with a prime": topologies,
    "`petersen` / `dyck`": topologies,
    "more than 4096 agents": topologies,
    "edge lists with": topologies,
    "more agents than samples": partitions,
    "model that does not fit": config_values,
    "NaN / Inf loss": diverging,
    "a symbolic link planted": lock_links,
    "a hard link planted": lock_links,
    "`output.out_dir` is a regular file": out_paths,
    "`report`, `plot` or `quickstart --out`": out_paths,
    "`crossgrad bench --agents": bench_options,
    "`crossgrad bench --models": bench_options,
    "`crossgrad run --stop-after -1`": cli_numbers,
    "`crossgrad models --num-classes -3`": cli_numbers,
    "a mixing matrix with spectral gap 0": spectral_gap,
    "a run stopped before its end": unfinished,
}

#: rows checked by other tests (they take real processes, signals, peers, real data or hostile pickles)
ELSEWHERE = {
    "a real file modified or truncated": "test_bad_inputs_cli.py::test_truncated_real_file_is_named",
    "JPEG that does not decode": "test_corrupt_data.py::test_bad_jpeg_in_the_tarball_is_named",
    "image that does not decode": "tests/test_data.py::test_imagenette_refuses_bad_trees_in_one_line",
    "CIFAR-100 `meta`": "tests/test_data.py::test_cifar100_refuses_bad_files_without_running_them",
    "a `classes` partition": "tests/test_data.py::test_classes_errors, test_dirichlet_even_skews_classes_and_…",
    "checkpoint that would run code": "test_safe_loading.py::test_malicious_checkpoint_is_refused_and_not_executed",
    "checkpoint without its embedded": "test_safe_loading.py::test_tampered_checkpoint_is_one_clear_error",
    "resuming with another thread count": "test_kill_resume.py",
    "checkpoint that is data but not": "test_safe_loading.py::test_tampered_checkpoint_is_one_clear_error",
    "config file with code in it": "test_safe_loading.py::test_toml_config_is_data_only",
    "disconnected graph": "tests/test_topology.py",
    "NaN / Inf in a received message": "test_numerical_faults.py",
    "a run killed with SIGKILL": "test_kill_resume.py, tests/test_run_status.py (status.json, report)",
    "a torchrun group killed": "tests/test_elastic.py::test_a_killed_group_leaves_the_record_and_every_survivor_…",
    "two sweeps writing": "test_concurrent_sweeps.py, test_run_dir_lock.py",
    "a different sweep": "test_concurrent_sweeps.py",
    "a distributed peer": "tests/test_dist.py",
    "disk full (or": "test_hostile_round2.py::test_disk_full_keeps_the_previous_checkpoint_and_says_so",
    "disk full while `metrics.jsonl`": "tests/test_second_hour.py (a full disk at an evaluation)",
    "`crossgrad config` with any bad": "tests/test_second_hour.py (config refuses what run refuses)",
    "any other `OSError`": "test_hostile_round2.py",
    "Ctrl-C before the first training step": "tests/test_day_one.py",
    "Ctrl-C while Python imports torch": "tests/test_cli.py",
    "a sweep (`--jobs 2`) killed": "test_concurrent_sweeps.py",
}


def _keys(row: str) -> list[str]:
    return [k for k in (*CASES, *ELSEWHERE) if row.startswith(k)]


def test_every_row_is_checked_here_or_named_elsewhere():
    found = rows()
    assert len(found) > 40
    for row in found:
        assert len(_keys(row)) == 1, f"docs/robustness.md row {row!r}: add it to CASES or ELSEWHERE ({_keys(row)})"
    assert {_keys(row)[0] for row in found} == set(CASES) | set(ELSEWHERE)  # and no entry names a row that is gone


@pytest.fixture(scope="module")
def printed(tmp_path_factory):
    """What each input of CASES prints, produced once for all the rows that quote it."""
    cache: dict = {}

    def get(make) -> list[str]:
        if make not in cache:
            cache[make] = make(tmp_path_factory.mktemp(make.__name__))
        return cache[make]

    return get


@pytest.mark.parametrize("row", [r for r in rows() if len(_keys(r)) == 1 and _keys(r)[0] in CASES])
def test_the_quoted_messages_are_what_crossgrad_prints(printed, row):
    messages = printed(CASES[_keys(row)[0]])
    quotes = quoted(rows()[row])
    assert quotes
    for quote in quotes:
        assert any(matches(quote, m) for m in messages), f"{quote!r} is not printed; got:\n" + "\n".join(messages)
