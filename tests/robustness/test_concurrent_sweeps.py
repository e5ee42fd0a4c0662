"""Two sweeps writing into the same output folder never corrupt each other's files."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(240)
def test_two_sweeps_share_an_output_folder(tmp_path):
    out = tmp_path / "runs"
    sweep = tmp_path / "s.toml"
    sweep.write_text(f"""
[model]
name = "mlp"
[training]
epochs = 3
threads = 1
[output]
out_dir = "{out}"
[sweep]
algorithms = ["ngc", "dsgd"]
seeds = [0, 1, 2]
""")
    procs = [subprocess.Popen([sys.executable, "-m", "crossgrad", "sweep", str(sweep), "--quiet", *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for extra in ([], ["--jobs", "2"])]  # in-process runs against subprocess runs
    outputs = [p.communicate(timeout=200)[0] for p in procs]
    runs = sorted(d for d in out.iterdir() if d.is_dir())
    assert len(runs) == 6, outputs
    for d in runs:
        summary = json.loads((d / "summary.json").read_text())
        assert summary["status"] == "completed", (d, outputs)
        lines = (d / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["epoch"] for r in records] == [0.0, 1.0, 2.0, 3.0], (d, outputs)
        assert not (d / ".lock").exists()
    # each run trained once: the second sweep skipped or lost the race cleanly, never wrote twice; a sweep
    # that left a run to the other one says so with 75 if that run was still going when it finished
    assert all(p.returncode in (0, 75) for p in procs), outputs


def test_a_different_sweep_into_the_same_folder_is_refused(tmp_path, capsys):
    from crossgrad.cli import main

    out = tmp_path / "runs"

    def sweep_file(name: str, lr: float):
        p = tmp_path / f"{name}.toml"
        p.write_text(f'[model]\nname = "mlp"\n[algorithm]\nlr = {lr}\n[training]\nsteps = 2\nthreads = 1\n'
                     f'[output]\nout_dir = "{out}"\n[sweep]\nalgorithms = ["dsgd"]\n')
        return str(p)

    assert main(["sweep", sweep_file("a", 0.1), "--quiet"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # same run names, another learning rate: skipping would pass off a's results as b's
    assert main(["sweep", sweep_file("b", 0.05), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run of another configuration (differs in algorithm.lr)" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(["sweep", sweep_file("a", 0.1), "--quiet"]) == 0  # the same sweep again: all skipped
