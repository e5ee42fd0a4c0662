"""One process per run directory: an flock the kernel releases when its holder dies, even by SIGKILL."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from crossgrad.run.rundir import LOCK, RunBusyError, claim_run_dir, lock_holder


def test_second_claim_is_busy_and_names_the_holder(tmp_path):
    with claim_run_dir(tmp_path / "r"):
        assert lock_holder(tmp_path / "r") == os.getpid()
        with pytest.raises(RunBusyError, match=f"in use by process {os.getpid()}"), claim_run_dir(tmp_path / "r"):
            pass
    assert lock_holder(tmp_path / "r") is None and not (tmp_path / "r" / LOCK).exists()


def test_stale_lock_file_and_half_written_files_are_taken_over(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / LOCK).write_text("999999999")  # a pid that cannot be alive
    (run / ".checkpoint.pt.tmp999999999.ab12cd").write_bytes(b"half a checkpoint")  # its writer is dead
    assert lock_holder(run) is None
    with claim_run_dir(run):
        assert not (run / ".checkpoint.pt.tmp999999999.ab12cd").exists()


def test_a_live_writers_temporary_file_survives_a_claim(tmp_path):
    # a sweep writes its config copy for a run (atomic_write: .NAME.tmpPID.HEX, then a rename) while
    # another sweep claims that run: the claim must not delete the file before it is renamed
    run = tmp_path / "r"
    run.mkdir()
    writing = run / f".sweep-config-{os.getpid()}.toml.tmp{os.getpid()}.ab12cd"
    writing.write_text("[model]\n")
    with claim_run_dir(run):
        assert writing.exists()


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from crossgrad.run.rundir import claim_run_dir
    with claim_run_dir(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(60)
""")


def test_lock_of_a_sigkilled_process_is_released(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "r")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert lock_holder(tmp_path / "r") == proc.pid
        with pytest.raises(RunBusyError), claim_run_dir(tmp_path / "r"):
            pass
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / "r" / LOCK).exists()  # left behind, but no longer held
    assert lock_holder(tmp_path / "r") is None
    with claim_run_dir(tmp_path / "r"):
        pass


RACE = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from crossgrad.run.rundir import RunBusyError, claim_run_dir
    run, log, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.001)
    events = []
    for _ in range(20):
        try:
            with claim_run_dir(run):
                t0 = time.time()
                time.sleep(0.002)
                events.append((t0, time.time()))
        except RunBusyError:
            pass
    log.write_text(json.dumps(events))
""")


@pytest.mark.timeout(120)
def test_racing_claimers_never_overlap(tmp_path):
    """Four processes claim, hold briefly and release the same directory in a tight loop."""
    go = tmp_path / "go"
    logs = [tmp_path / f"log{k}.json" for k in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "r"), str(log), str(go)],
                              stdout=subprocess.PIPE, text=True) for log in logs]
    assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 4
    go.touch()  # all four start together
    assert [p.wait(100) for p in procs] == [0, 0, 0, 0]
    spans = sorted(span for log in logs for span in json.loads(log.read_text()))
    assert len(spans) >= 20  # the directory changed hands many times
    for (_, a1), (b0, _) in zip(spans, spans[1:]):
        assert b0 >= a1, "two processes held the run directory at once"
