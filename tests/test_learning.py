"""Every algorithm learns on real data: digits, 5 agents on a ring, full label skew (2 classes each).

A few hundred steps through the runner; the consensus model must end well above chance (10 %) and
the training loss must fall. Thresholds are loose on purpose: this checks learning, not rankings.
"""
from __future__ import annotations

import json

import pytest

from crossgrad.run import load_config, run_experiment
from crossgrad.run.rundir import METRICS

ALGOS = {
    "dsgdm-n": ["algorithm.name=dsgd", "algorithm.nesterov=true"],
    "qgm": ["algorithm.name=dsgd", "algorithm.qgm=true"],
    "ngc-a1": ["algorithm.name=ngc", "algorithm.alpha=1.0"],
    "ngc-a0": ["algorithm.name=ngc", "algorithm.alpha=0.0"],
    "compngc": ["algorithm.name=compngc"],
    "cga": ["algorithm.name=cga"],
    "compcga": ["algorithm.name=compcga"],
    "gt": ["algorithm.name=gt"],
    "d2": ["algorithm.name=d2", "algorithm.momentum=0", "algorithm.lr=0.1"],  # D² takes no momentum
}


@pytest.mark.slow  # a real training run per algorithm: about a minute in all on an idle 2-core machine
@pytest.mark.parametrize("label", list(ALGOS))
def test_every_algorithm_learns_on_skewed_digits(label, tmp_path):
    cfg = load_config(None, [
        f'output.out_dir="{tmp_path}"', f'output.name="{label}"', "training.threads=1",
        "training.epochs=24", "training.lr_schedule=\"multistep\"", "algorithm.lr=0.05", "algorithm.momentum=0.9",
        "model.name=\"lenet5\"", "data.name=\"digits\"", "data.partition=\"label_sorted\"", *ALGOS[label],
    ])
    result = run_experiment(cfg, quiet=True)
    assert result.status == "completed"
    records = [json.loads(line) for line in (tmp_path / label / METRICS).read_text().splitlines()]
    final = records[-1]
    assert final["step"] >= 200
    assert final["consensus_acc"] > 0.5, (label, final["consensus_acc"])
    assert final["train_loss"] < records[1]["train_loss"]
