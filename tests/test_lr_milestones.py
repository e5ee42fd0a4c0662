"""The multistep schedule's milestones and factor (training.lr_milestones, training.lr_decay): the default
unchanged, the steps they fall on, their validation, and a run that records and resumes them."""
from __future__ import annotations

import csv

import pytest

from crossgrad.cli import main
from crossgrad.presets import load_preset
from crossgrad.run import resume_experiment, run_experiment
from crossgrad.run.config import Config, ConfigError, config_from_dict, dump_toml, load_config, tomllib
from crossgrad.run.rundir import comparable_config
from crossgrad.run.schedule import lr_at, milestone_steps

MULTISTEP = ["training.lr_schedule=multistep", "algorithm.lr=0.3"]


def test_default_is_the_fixed_schedule_bit_for_bit():
    # before the milestones could be set: base * 0.1 ** ((t >= total // 2) + (t >= 3 total // 4))
    default = load_config(None, MULTISTEP)
    explicit = load_config(None, [*MULTISTEP, "training.lr_milestones=[0.5, 0.75]", "training.lr_decay=0.1"])
    assert default.training.lr_milestones is None and default.training.lr_decay is None
    for total in range(1, 60):
        for t in range(total):
            old = 0.3 * (0.1 ** ((t >= total // 2) + (t >= (3 * total) // 4)))
            assert lr_at(default, t, total) == old == lr_at(explicit, t, total), (t, total)


def test_milestones_fall_where_the_authors_drop():
    # RelaySGD: epochs 150 and 180 of 200, 98 steps an epoch; ARS: int(0.5 E), int(0.6 E) of E = 300
    relay = load_config(None, [*MULTISTEP, "training.lr_milestones=[0.75, 0.9]"])
    assert milestone_steps(relay, 200 * 98) == [150 * 98, 180 * 98]
    ars = load_config(None, [*MULTISTEP, "training.lr_milestones=[0.5, 0.6]", "training.lr_decay=0.5"])
    assert milestone_steps(ars, 300 * 98) == [150 * 98, 180 * 98]
    total = 300 * 98
    assert [lr_at(ars, t, total) for t in (0, 150 * 98 - 1, 150 * 98, 180 * 98 - 1, 180 * 98, total - 1)] == [
        0.3, 0.3, 0.3 * 0.5, 0.3 * 0.5, 0.3 * 0.5 ** 2, 0.3 * 0.5 ** 2]
    # the decimal as written: 0.29 * 100 is 28.999... in doubles, and the drop still comes at step 29
    odd = load_config(None, [*MULTISTEP, "training.lr_milestones=[0.29]"])
    assert milestone_steps(odd, 100) == [29]
    assert lr_at(odd, 28, 100) == 0.3 and lr_at(odd, 29, 100) == pytest.approx(0.03)
    # a short run can put two milestones on one step: both drops apply there
    assert milestone_steps(relay, 4) == [3, 3] and lr_at(relay, 3, 4) == pytest.approx(0.003)


@pytest.mark.parametrize("override, needle", [
    ("training.lr_milestones=[0.9, 0.5]", "increasing fractions of the run, each in (0, 1)"),
    ("training.lr_milestones=[0.5, 0.5]", "increasing fractions"),
    ("training.lr_milestones=[0.5, 1.0]", "not [0.5, 1.0]"),
    ("training.lr_milestones=[0, 0.5]", "not [0.0, 0.5]"),
    ("training.lr_milestones=[nan]", "not [nan]"),
    ("training.lr_milestones=[]", "not []"),
    ("training.lr_milestones=0.5", "training.lr_milestones must be a list of numbers, not 0.5"),
    ('training.lr_milestones=["a"]', "training.lr_milestones[0] must be a number, not 'a'"),
    ("training.lr_milestones=[true]", "training.lr_milestones[0] must be a number"),
    ("training.lr_decay=0", "training.lr_decay must be a number in (0, 1]"),
    ("training.lr_decay=1.5", "training.lr_decay must be a number in (0, 1]"),
    ("training.lr_decay=[0.1]", "training.lr_decay must be a number, not [0.1]"),
])
def test_bad_milestones_are_one_line_errors(capsys, override, needle):
    with pytest.raises(ConfigError, match="lr_milestones|lr_decay"):
        load_config(None, [*MULTISTEP, override])
    assert main(["config", "--set", "training.lr_schedule=multistep", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crossgrad: error: ") and err.count("\n") == 1 and needle in err


def test_nan_decay_in_a_file_is_refused(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[training]\nlr_schedule = "multistep"\nlr_decay = nan\n')
    with pytest.raises(ConfigError, match=r"training.lr_decay must be a number in \(0, 1\].*not nan"):
        load_config(p)


def test_unset_by_default_so_older_runs_still_compare_equal():
    # a run written before these keys existed has neither in its config; its resumption must match it
    flat = comparable_config(Config().to_dict())
    assert "training.lr_milestones" not in flat and "training.lr_decay" not in flat
    cfg = load_config(None, [*MULTISTEP, "training.lr_milestones=[0.75, 0.9]", "training.lr_decay=0.2"])
    again = config_from_dict(tomllib.loads(dump_toml(cfg.to_dict()))).validate()
    assert again.training.lr_milestones == [0.75, 0.9] and again.training.lr_decay == 0.2


def test_presets_carry_the_authors_milestones():
    def fractions(name):
        tr = load_preset(name).training
        return tr.lr_schedule, tr.lr_milestones, tr.lr_decay

    assert fractions("relaysgd-cifar10-vgg11-ring16-a0.1-dsgd") == ("multistep", [0.75, 0.9], 0.1)
    assert fractions("ars-cifar10-resnet20-ring16-a0.01-ars") == ("multistep", [0.5, 0.6], 0.1)
    assert fractions("gut-cifar10-resnet20-ring16-gut") == ("multistep", [0.5, 0.75], 0.1)


def _lrs(run_dir):
    with open(run_dir / "steps.csv", newline="") as f:
        return {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}


def test_a_run_drops_at_its_milestones_and_resumes(tmp_path):
    common = ["model.name=mlp", "topology.n_agents=3", "training.batch_size=8", "training.threads=1",
              "training.steps=8", "training.eval_every_steps=4", "training.log_every=1", "training.eval_subset=50",
              "training.lr_schedule=multistep", "training.lr_milestones=[0.25, 0.6]", "training.lr_decay=0.5",
              "algorithm.lr=0.01", f'output.out_dir="{tmp_path}"']
    whole = run_experiment(load_config(None, [*common, "output.name=whole"]), quiet=True)
    assert whole.status == "completed"
    # steps.csv's row k is taken after k steps: the lr of step k - 1 (0-based); drops at steps 2 and 4
    expected = {k: 0.01 * 0.5 ** ((k - 1 >= 2) + (k - 1 >= 4)) for k in range(1, 9)}
    assert _lrs(tmp_path / "whole") == expected
    part = run_experiment(load_config(None, [*common, "output.name=part"]), quiet=True, stop_after=3)
    assert part.status == "stopped"
    assert resume_experiment(tmp_path / "part").status == "completed"  # the saved list compares equal
    assert _lrs(tmp_path / "part") == _lrs(tmp_path / "whole")
