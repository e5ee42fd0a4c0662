"""Hostile inputs, round 2 (issue 16): planted links, bad output paths, bad values, signals.

Each test names the item of the issue it covers. Through the CLI every one of these is one line on
stderr and exit code 2 (130 for Ctrl-C, 75 for runs still running elsewhere), never a traceback, and
nothing is written outside the run directory.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from crossgrad.cli import main
from crossgrad.files import OutputError, atomic_write_text, open_append
from crossgrad.run.rundir import CHECKPOINT

TINY = ["--set", "training.steps=4", "--set", "topology.n_agents=2", "--set", "training.threads=1",
        "--set", 'model.name="mlp"', "--quiet"]


def cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return rc, err


def one_error(rc: int, err: str, *expect: str) -> None:
    assert rc == 2 and err.startswith("crossgrad: error: ") and "\n" not in err, err
    for e in expect:
        assert e in err, err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A folder holding one finished tiny run."""
    out = tmp_path_factory.mktemp("finished")
    assert main(["run", *TINY, "--out-dir", str(out), "--name", "r"]) == 0
    return out


# ------------------------------------------------------------------ 1: never write through a planted link
def test_planted_lock_symlink_is_refused_and_its_target_untouched(tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "o" / "r").mkdir(parents=True)
    (tmp_path / "o" / "r" / ".lock").symlink_to(victim)
    one_error(*cli(capsys, "run", *TINY, "--out-dir", str(tmp_path / "o"), "--name", "r"), "symbolic link")
    assert victim.read_text() == "precious"


def test_planted_lock_hard_link_is_refused(tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "o" / "r").mkdir(parents=True)
    os.link(victim, tmp_path / "o" / "r" / ".lock")
    one_error(*cli(capsys, "run", *TINY, "--out-dir", str(tmp_path / "o"), "--name", "r"), "hard link")
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("name", ["metrics.jsonl", "steps.csv"])
def test_resume_refuses_planted_run_file_links(tmp_path, capsys, name):
    assert main(["run", *TINY, "--out-dir", str(tmp_path), "--name", "r", "--stop-after", "2"]) == 0
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "r" / name).unlink()
    (tmp_path / "r" / name).symlink_to(victim)
    capsys.readouterr()
    one_error(*cli(capsys, "run", "--resume", str(tmp_path / "r"), "--quiet"), "symbolic link", name)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("command,name", [("report", "report.md"), ("report", "report.csv"),
                                          ("plot", "curves_digits-label_sorted-ring-2.svg")])
def test_report_and_plot_refuse_planted_links(tmp_path, capsys, finished, command, name):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = finished / name
    link.unlink(missing_ok=True)
    link.symlink_to(victim)
    try:
        one_error(*cli(capsys, command, str(finished)), "symbolic link", name)
    finally:
        link.unlink()
    assert victim.read_text() == "precious"


def test_file_writers_never_follow_links(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "cfg.toml").symlink_to(victim)
    (tmp_path / "run.log").symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        atomic_write_text(tmp_path / "cfg.toml", "x")  # sweep config copies, summaries, metrics, caches
    with pytest.raises(OutputError, match="symbolic link"):
        open_append(tmp_path / "run.log")  # the sweep's per-run log
    assert victim.read_text() == "precious"
    atomic_write_text(tmp_path / "plain.txt", "a")
    atomic_write_text(tmp_path / "plain.txt", "b")
    assert (tmp_path / "plain.txt").read_text() == "b" and sorted(p.name for p in tmp_path.iterdir()) == [
        "cfg.toml", "plain.txt", "run.log", "victim"]  # no temporary file left behind


# ------------------------------------------------------------------ 2: bad output paths
def test_bad_output_paths_are_one_line(tmp_path, capsys, finished):
    afile = tmp_path / "afile"
    afile.write_text("")
    one_error(*cli(capsys, "run", *TINY, "--out-dir", str(afile)), "not a directory")
    one_error(*cli(capsys, "run", *TINY, "--out-dir", str(tmp_path), "--name", "x" * 300), "file name too long")
    (tmp_path / "d" / "r" / ".lock").mkdir(parents=True)
    one_error(*cli(capsys, "run", *TINY, "--out-dir", str(tmp_path / "d"), "--name", "r"), ".lock")
    one_error(*cli(capsys, "report", str(finished), "--out", str(afile)), str(afile))
    one_error(*cli(capsys, "plot", str(finished), "--out", str(afile / "sub")), "not a directory")
    one_error(*cli(capsys, "quickstart", "--epochs", "1", "--quiet", "--out", str(afile)), str(afile))


def test_unwritable_folder_is_one_line(tmp_path, capsys, monkeypatch):
    def refuse(self, *args, **kwargs):  # what a read-only folder does to a non-root user
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    one_error(*cli(capsys, "run", *TINY, "--out-dir", str(tmp_path / "ro")), "permission denied")


DISK_FULL = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    from crossgrad.cli import main
    sys.exit(main(["run", "--resume", sys.argv[1], "--quiet"]))
""")


def test_disk_full_keeps_the_previous_checkpoint_and_says_so(tmp_path, capsys):
    assert main(["run", *TINY, "--out-dir", str(tmp_path), "--name", "r", "--stop-after", "2"]) == 0
    before = (tmp_path / "r" / CHECKPOINT).read_bytes()
    assert len(before) > 20000
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path / "r")], capture_output=True, text=True,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "file too large" in lines[0] and "the previous checkpoint is untouched" in lines[0]
    assert (tmp_path / "r" / CHECKPOINT).read_bytes() == before
    assert [p.name for p in (tmp_path / "r").glob(".*.tmp*")] == []


# ------------------------------------------------------------------ 3, 4, 7, 13: bad values
@pytest.mark.parametrize("device", ["mps", "tpu", "cuda:7"])
def test_missing_device_is_one_line(tmp_path, capsys, device):
    one_error(*cli(capsys, "run", *TINY, "--out-dir", str(tmp_path), "--set", f'training.device="{device}"'),
              "training.device", repr(device))


@pytest.mark.parametrize("args,expect", [
    (["--agents", "-1"], "--agents"), (["--batch", "0"], "--batch"), (["--steps", "0"], "--steps"),
    (["--models", "bogus:1x8x8"], "unknown model 'bogus'"), (["--models", "lenet5:1x8"], "name:CxHxW"),
    (["--models", "vgg11:1x8x8"], "32x32"), (["--device", "tpu"], "'tpu'"), (["--scaling", "0"], "--scaling"),
    (["--repeats", "0"], "--repeats"), (["--scaling-window", "-1"], "--scaling-window"),
])
def test_bench_checks_its_options(capsys, args, expect):
    one_error(*cli(capsys, "bench", *args), expect)


@pytest.mark.parametrize("sets,expect", [
    (["algorithm.weight_decay=nan"], "weight_decay"), (["algorithm.weight_decay=inf"], "weight_decay"),
    (['algorithm.name="cga"', "algorithm.margin=nan"], "margin"),
    (['algorithm.name="cga"', "algorithm.margin=inf"], "margin"),
    (['algorithm.name="cga"', "algorithm.margin=-1"], "margin"),
    (['algorithm.name="cga"', "algorithm.eps=nan"], "eps"),
])
def test_non_finite_hyperparameters_are_config_errors(tmp_path, capsys, sets, expect):
    args = [a for s in sets for a in ("--set", s)]
    one_error(*cli(capsys, "run", *TINY, "--out-dir", str(tmp_path), *args), expect)


def test_negative_stop_after_and_num_classes(tmp_path, capsys):
    one_error(*cli(capsys, "run", *TINY, "--out-dir", str(tmp_path), "--stop-after", "-1"), "--stop-after")
    assert not tmp_path.joinpath("ngc-a-1_digits_label_sorted_ring-2_s0").exists()
    one_error(*cli(capsys, "models", "--num-classes", "-3"), "--num-classes")
    one_error(*cli(capsys, "models", "--input-shape", "0,8,8"), "--input-shape")


# ------------------------------------------------------------------ 5, 6: what a checkpoint must carry
def test_resume_in_another_environment_warns(tmp_path, capsys):
    assert main(["run", *TINY, "--out-dir", str(tmp_path), "--name", "r", "--stop-after", "2"]) == 0
    path = tmp_path / "r" / CHECKPOINT
    state = torch.load(path, weights_only=True)
    assert state["environment"] == {"torch": str(torch.__version__), "threads": 1, "device": "cpu"}
    state["environment"]["threads"] = 64
    torch.save(state, path)
    rc, err = cli(capsys, "run", "--resume", str(tmp_path / "r"), "--quiet")
    assert rc == 0 and "crossgrad: warning: resuming with threads 64 -> 1" in err and "last bits" in err


# (a checkpoint without its config: see "no config" in test_safe_loading.py)


# ------------------------------------------------------------------ 8: Ctrl-C outside the training loop
def test_ctrl_c_before_the_first_step_says_there_is_nothing_to_resume(tmp_path, capsys, monkeypatch):
    import crossgrad.run.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Trainer, "train", interrupted)  # e.g. during the first evaluation
    rc, err = cli(capsys, "run", *TINY, "--out-dir", str(tmp_path), "--name", "r")
    assert rc == 130 and "nothing to resume: run the same command again" in err
    monkeypatch.undo()
    assert main(["run", *TINY, "--out-dir", str(tmp_path), "--name", "r"]) == 0  # which works


def test_ctrl_c_while_resuming_points_to_the_kept_checkpoint(tmp_path, capsys, monkeypatch):
    import crossgrad.run.trainer as trainer

    assert main(["run", *TINY, "--out-dir", str(tmp_path), "--name", "r", "--stop-after", "2"]) == 0
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "prepare", interrupted)  # while the data loads
    rc, err = cli(capsys, "run", "--resume", str(tmp_path / "r"), "--quiet")
    assert rc == 130 and f"resume with: crossgrad run --resume {tmp_path / 'r'}" in err


def test_ctrl_c_while_torch_is_imported_is_no_traceback(capsys, monkeypatch):
    class Interrupting:  # a Ctrl-C that lands while the runner (and torch under it) is being imported
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "crossgrad.run":
                raise KeyboardInterrupt

    for mod in [m for m in sys.modules if m == "crossgrad.run" or m.startswith("crossgrad.run.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    rc = main(["run", "--quiet"])
    assert rc == 130 and capsys.readouterr().err.strip() == "crossgrad: interrupted"


def test_ctrl_c_that_a_library_turns_into_another_error_is_still_an_interrupt(tmp_path, capsys, monkeypatch):
    import crossgrad.run.trainer as trainer

    def half_imported(*args, **kwargs):  # what numpy does when a Ctrl-C lands inside one of its lazy imports
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            raise AttributeError("module 'numpy' has no attribute 'nonzero'") from None

    monkeypatch.setattr(trainer, "prepare", half_imported)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a shell's background job
    rc = main(["run", *TINY, "--out-dir", str(tmp_path)])
    assert rc == 130 and capsys.readouterr().err.strip() == "crossgrad: interrupted"
    assert signal.getsignal(signal.SIGINT) is before  # the CLI's handler is gone again


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, crossgrad.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("delay", [0.1, 0.4, 1.0, 2.5])
def test_ctrl_c_at_any_moment_of_startup_is_no_traceback(tmp_path, delay):
    import time

    proc = subprocess.Popen([sys.executable, "-m", "crossgrad", "run", *TINY, "--out-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and proc.returncode in (0, 130, -signal.SIGINT), err


# a Ctrl-C landing inside importlib's module-lock weakref callback: an exception raised there is printed
# ("Exception ignored in ... Traceback") and dropped, so the interrupt used to be lost and the run went on
# (1 in ~70 interrupts 0.33-0.45 s into `crossgrad run`). A stand-in callback with the same name, in a
# file whose name says importlib, gets the signal deterministically.
LOCK_CALLBACK = textwrap.dedent("""
    import os, signal, sys, time, weakref
    sys.path.insert(0, sys.argv[1])
    import importlib_stand_in
    from crossgrad import cli

    class Lock:
        pass

    def run(_argv):
        lock = Lock()
        ref = weakref.ref(lock, importlib_stand_in.cb)
        del lock  # the callback runs here and gets the signal
        for _ in range(3000):  # the interrupt must arrive soon after it (30 s under any load), not be lost
            time.sleep(0.01)
        return 0

    cli._main = run
    sys.exit(cli.main([]))
""")


def test_ctrl_c_inside_the_import_lock_callback_still_interrupts(tmp_path):
    (tmp_path / "importlib_stand_in.py").write_text(
        "import os, signal\n\ndef cb(ref):\n    os.kill(os.getpid(), signal.SIGINT)\n    return len(str(ref))\n")
    proc = subprocess.run([sys.executable, "-c", LOCK_CALLBACK, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr.strip() == "crossgrad: interrupted", proc.stderr


# ------------------------------------------------------------------ 10: a malicious checkpoint
# (the refusal names the object for every pickle protocol: see test_safe_loading.py)


# ------------------------------------------------------------------ 11: W that never reaches consensus
def test_spectral_gap_zero_warns(tmp_path, capsys):
    w = tmp_path / "w.txt"
    w.write_text("0 1\n1 0\n")
    rc, err = cli(capsys, "topology", "file", "2", "--option", f"path={w}")
    assert rc == 0 and "crossgrad: warning:" in err and "spectral gap 0" in err
    base = [*TINY, "--out-dir", str(tmp_path), "--set", 'topology.name="file"', "--set",
            f'topology.options.path="{w}"']
    rc, err = cli(capsys, "run", *base)
    assert rc == 0 and "spectral gap 0" in err
    rc, err = cli(capsys, "run", *base, "--set", "algorithm.gamma=0.5", "--overwrite")
    assert rc == 0 and "spectral gap" not in err  # (1 - gamma) I + gamma W does reach consensus
    rc, err = cli(capsys, "topology", "ring", "4")
    assert rc == 0 and "warning" not in err


# ------------------------------------------------------------------ 12: a sweep killed with -9
HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from crossgrad.run.rundir import claim_run_dir
    with claim_run_dir(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(120)
""")


def test_sweep_does_not_count_orphaned_runs_as_done(tmp_path, capsys):
    from crossgrad.sweep import expand, run_sweep

    f = tmp_path / "sw.toml"
    f.write_text(textwrap.dedent(f"""
        [topology]
        n_agents = 2
        [model]
        name = "mlp"
        [training]
        steps = 2
        threads = 1
        [output]
        out_dir = "{tmp_path / "out"}"
        [sweep]
        algorithms = ["ngc", "dsgd"]
    """))
    orphan, other = (r.run_dir for r in expand(f)[0])
    stale = orphan / "sweep-config-999999999.toml"  # left by a sweep killed with -9 (that pid is not alive)
    orphan.mkdir(parents=True)
    stale.write_text("")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(orphan)], stdout=subprocess.PIPE, text=True)
    try:  # the orphan: a run its killed sweep started, still training
        assert proc.stdout.readline().strip() == "held"
        assert run_sweep(f, quiet=True) == 75
        captured = capsys.readouterr()
        assert "0 already done, 1 running in another process, 1 to run" in captured.out
        assert "1 run(s) still running in another process" in captured.err
        assert json.loads((other / "summary.json").read_text())["status"] == "completed"
        assert not stale.exists()
    finally:
        proc.kill()
        proc.wait()
    assert run_sweep(f, quiet=True) == 0  # once the orphan is gone its run is done here
