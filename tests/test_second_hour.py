"""Issue 30, the second hour with crossgrad: switching algorithm, rerunning, piping, and `config` checking what
`run` checks."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crossgrad.algorithms import ALGORITHMS, algorithm_options
from crossgrad.cli import consensus_jump, main
from crossgrad.run.config import ConfigError, load_config

EXAMPLE = Path(__file__).parents[1] / "examples" / "digits_ngc.toml"
TINY = ["model.name=mlp", "topology.n_agents=3", "training.batch_size=8", "training.threads=1",
        "training.steps=6", "training.eval_every_steps=3", "training.eval_subset=50"]


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def one_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2 and err.startswith("crossgrad: error: ") and err.count("\n") == 1, err
    assert all(n in err for n in needles), err
    return err


def _toml(value) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


# ------------------------------------------------------------------------------ 1: switching algorithm
@pytest.mark.parametrize("old, new", list(itertools.permutations(sorted(ALGORITHMS), 2)))
def test_switching_algorithm_on_the_command_line_drops_the_old_ones_keys(tmp_path, capsys, old, new):
    """Every registered algorithm, from a file that sets every hyperparameter of `old` that `new` lacks."""
    only_old = {k: v for k, v in algorithm_options(old).items() if k not in algorithm_options(new)}
    only_old = {k: "sign" if v is None else v for k, v in only_old.items()}  # codec: a value a file would give
    f = tmp_path / "c.toml"
    f.write_text(f'[algorithm]\nname = "{old}"\n' + "".join(f"{k} = {_toml(v)}\n" for k, v in only_old.items()))
    cfg = load_config(f, [f"algorithm.name={new}"])
    assert cfg.algorithm.name == new and cfg.algorithm.params == algorithm_options(new)
    err = capsys.readouterr().err
    if only_old:
        assert err.count("\n") == 1 and err.startswith("crossgrad: warning: ")
        named = {w.removeprefix("algorithm.").rstrip(",") for w in err.split() if w.startswith("algorithm.")}
        assert named == {"name=" + new, *only_old}
    else:
        assert err == ""


def test_a_switch_keeps_misspelled_and_command_line_keys_errors(tmp_path, capsys):
    f = tmp_path / "c.toml"
    f.write_text('[algorithm]\nname = "ngc"\nalpha = 0.5\nalpah = 1\n')
    with pytest.raises(ConfigError, match="unknown key algorithm.alpah; dsgd takes"):
        load_config(f, ["algorithm.name=dsgd"])
    f.write_text('[algorithm]\nname = "ngc"\nalpha = 0.5\n')
    with pytest.raises(ConfigError, match="unknown key algorithm.alpha; dsgd takes"):
        load_config(f, ["algorithm.name=dsgd", "algorithm.alpha=0.5"])  # asked for on the command line
    with pytest.raises(ConfigError, match="unknown key algorithm.alpha; dsgd takes"):
        load_config(None, ["algorithm.alpha=0.5", "algorithm.name=dsgd"])  # no file: nothing was switched
    assert load_config(f, ["algorithm.name=ngc"]).algorithm.params["alpha"] == 0.5  # no switch: kept
    capsys.readouterr()
    f.write_text('[algorithm]\nname = "dsgd"\nalpha = 0.5\n')
    with pytest.raises(ConfigError, match="unknown key algorithm.alpha; dsgd takes"):
        load_config(f)  # the file's own mistake stays one
    assert capsys.readouterr().err == ""  # no switch dropped anything


def test_the_readme_example_switches_to_every_algorithm(capsys):
    """`crossgrad config examples/digits_ngc.toml --set algorithm.name=X`: what `run` would train, for every X."""
    for name in sorted(ALGORITHMS):
        tree = ['topology.name="chain"'] if name == "relaysgd" else []  # relaysgd refuses the example's ring
        assert main(["config", str(EXAMPLE), *sets(f"algorithm.name={name}", *tree)]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert f'name = "{name}"' in out and "lr = 0.05" in out
        assert ("alpha = 1.0" in out) == ("alpha" in algorithm_options(name))


# ------------------------------------------------------------------------------ 2, 3: reruns, one agent
def test_a_rerun_says_name_new_and_a_bad_config_gets_its_own_message(tmp_path, capsys):
    args = ["run", "--quiet", "--out-dir", str(tmp_path), "--name", "r", *sets(*TINY)]
    assert main(args) == 0
    capsys.readouterr()
    one_error(main(args), capsys.readouterr().err, "already holds a finished run", "--name NEW", "--overwrite")
    for bad, needle in (("topology.n_agents=1", "topology.n_agents must be >= 2"),
                        ("model.name=lenet", "unknown model 'lenet'"),
                        ("training.warmup_steps=100000", "training.warmup_steps=100000 is longer than the run")):
        one_error(main([*args, *sets(bad)]), capsys.readouterr().err, needle)


def test_one_agent_is_refused_in_one_line(tmp_path, capsys):
    err = one_error(main(["run", "--out-dir", str(tmp_path), *sets("topology.n_agents=1")]),
                    capsys.readouterr().err, "decentralized training needs two agents")
    assert not any(tmp_path.iterdir()) and "not 1" in err


# ------------------------------------------------------------------------------ 4: output to a file
def test_bars_only_when_both_streams_are_terminals(monkeypatch):
    import crossgrad.console as console

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    for out, err in itertools.product((True, False), repeat=2):
        monkeypatch.setattr(sys, "stdout", Stream(out))
        monkeypatch.setattr(sys, "stderr", Stream(err))
        assert console.bars_wanted() == (out and err)


def test_a_run_into_a_file_prints_plain_lines(tmp_path, capsys, monkeypatch):
    import crossgrad.console as console

    assert main(["run", "--out-dir", str(tmp_path), "--name", "f", *sets(*TINY)]) == 0  # captured: no terminal
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    assert [line.split(": ")[0] for line in out.splitlines()[:2]] == ["[f] epoch 0.05 step 3", "[f] epoch 0.1 step 6"]
    monkeypatch.setattr(console, "bars_wanted", lambda: True)  # what a terminal gets: a bar, redrawn
    assert main(["run", "--out-dir", str(tmp_path), "--name", "t", *sets(*TINY)]) == 0
    assert "\r" in capsys.readouterr().err


# ------------------------------------------------------------------------------ 6: the quickstart's jump
def _records(distances, accs=None):
    accs = accs or [0.5] * len(distances)
    return [{"step": 9 * i, "epoch": i, "consensus_distance": d, "consensus_acc": a}
            for i, (d, a) in enumerate(zip(distances, accs, strict=True))]


def test_a_consensus_jump_is_named_with_its_numbers():
    jump = consensus_jump(_records([1e-14, 1.6, 0.06, 5.35, 0.005], [0.1, 0.1, 0.847, 0.29, 0.738]))
    assert jump == ("the consensus distance jumped from 0.06 to 5.35 at epoch 3 (consensus accuracy 84.7% -> "
                    "29.0%), then fell back to 0.005 (final consensus accuracy 73.8%)")
    assert consensus_jump(_records([1e-14, 1.6, 0.3, 0.2])) is None  # step 0's identical models are no baseline
    assert consensus_jump(_records([0, 0.05, 0.4, 0.9])) is None  # 8x, and not above 1
    assert consensus_jump(_records([0, 0.5, 6.0, 4.0])).endswith("at epoch 2 (consensus accuracy 50.0% -> 50.0%)")


# ------------------------------------------------------------------------------ 10: config checks what run checks
@pytest.mark.parametrize("bad, needle", [
    ("model.name=lenet", "model.name: unknown model 'lenet'; available models: "),
    ("model.norm=layer", "model.norm: unknown norm 'layer'"),
    ("model.options.widht=0.5", "model.options: mlp does not take widht; its options: hidden"),
    (("model.name=lenet5", "model.options.padding1=\"x\""), "model.options.padding1 must be an integer, not 'x'"),
    (("model.name=mobilenetv2", "model.options.width=-1"),
     "model 'mobilenetv2' with options {width = -1} cannot be built for digits (input 1x8x8, 10 classes): width"),
    ("model.name=vgg11", "model 'vgg11' does not fit digits (input 1x8x8, 10 classes): vgg11 needs inputs"),
    ("data.name=imagenet", "unknown dataset 'imagenet'"),
    (("data.name=imagenette", "data.image_size=16", "model.name=vgg11"),
     "model 'vgg11' does not fit imagenette (input 3x16x16, 10 classes)"),  # before the JPEGs are looked for
    (("data.name=cifar10", "data.image_size=16"), "cifar10 takes no options, got ['image_size']"),
    ("topology.name=moebius", "unknown topology 'moebius'"),
    ("topology.weights=heavy", "weights must be"),
    ("topology.options.p=0.5", "unknown option(s) p for topology 'ring'"),
    ("topology.n_agents=1000000", "at most 4096"),
    ("training.warmup_steps=7", "training.warmup_steps=7 is longer than the run (6 steps)"),
    ("output.out_dir=''", "output.out_dir must name a folder"),
])
def test_config_refuses_what_run_refuses_with_the_same_line(tmp_path, capsys, bad, needle):
    args = [*sets(*TINY, f'output.out_dir="{tmp_path}"'), *sets(*([bad] if isinstance(bad, str) else bad))]
    err = one_error(main(["config", *args]), capsys.readouterr().err, needle)
    assert main(["run", *args]) == 2 and capsys.readouterr().err == err
    assert not any(tmp_path.iterdir())


def test_a_warmup_longer_than_the_epochs_is_refused_before_the_run_directory(tmp_path):
    from crossgrad.run import run_experiment

    cfg = load_config(None, ["model.name=mlp", "topology.n_agents=3", "training.batch_size=8", "training.epochs=2",
                             "training.threads=1", "training.warmup_steps=121", f'output.out_dir="{tmp_path}"'])
    with pytest.raises(ConfigError, match=r"warmup_steps=121 is longer than the run \(120 steps\)"):
        run_experiment(cfg, quiet=True)  # 3 agents of digits: 480 samples each, 60 steps of 8 per epoch
    assert not any(tmp_path.iterdir())
    cfg.training.warmup_steps = 120
    assert run_experiment(cfg, quiet=True, stop_after=1).status == "stopped"


APPEND_AT_THE_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from crossgrad.files import OutputError, append_text
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) as on a full disk
    path = Path(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 10, path.stat().st_size + 10))
    try:
        append_text(path, "x" * 100 + "\\n")
    except OutputError as e:
        print(e)
""")


def test_a_metrics_line_cut_short_by_a_full_disk_is_cut_off(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n')
    proc = subprocess.run([sys.executable, "-c", APPEND_AT_THE_LIMIT, str(path)], capture_output=True, text=True,
                          timeout=60)
    assert "file too large (disk full or file size limit)" in proc.stdout, proc.stderr
    assert path.read_text() == '{"step": 0}\n'


def test_a_full_disk_at_an_evaluation_says_the_checkpoint_is_kept(tmp_path, capsys, monkeypatch):
    import crossgrad.run.trainer as trainer
    from crossgrad.files import OutputError

    args = ["run", "--quiet", "--out-dir", str(tmp_path), "--name", "r", *sets(*TINY)]
    assert main([*args, "--stop-after", "3"]) == 0
    run = tmp_path / "r"

    def full(path, record):
        raise OutputError(f"cannot write {path}: file too large (disk full or file size limit)")

    with monkeypatch.context() as m:
        m.setattr(trainer, "append_metrics", full)
        capsys.readouterr()
        one_error(main(["run", "--resume", str(run), "--quiet"]), capsys.readouterr().err,
                  "metrics.jsonl: file too large", f"the previous checkpoint (step 3) is kept in {run}",
                  f"crossgrad run --resume {run} continues from it")
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 3, 6]


# ------------------------------------------------------------------------------ 7: every algorithm described
def test_every_algorithm_has_a_description(capsys):
    assert main(["algorithms"]) == 0
    heads = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines() if line[:1].isalpha()}
    for name in ALGORITHMS:
        assert heads[name].startswith(f"{name}: ") and len(heads[name]) > len(name) + 20, heads[name]
