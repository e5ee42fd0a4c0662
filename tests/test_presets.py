"""Presets: named published settings shipped as TOML in the package, listed, resolved, validated and run."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from crossgrad.cli import main
from crossgrad.presets import load_preset, preset_data, presets
from crossgrad.run.config import ConfigError, config_from_dict, read_toml

ROOT = Path(__file__).resolve().parents[1]
NAMES = [p.name for p in presets()]
#: the mechanics tests use a preset that needs nothing beyond crossgrad's oldest pieces
PLAIN = "relaysgd-cifar10-vgg11-full16-iid-allreduce"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_validates(name):
    from crossgrad.run.inputs import check_inputs

    cfg = load_preset(name)  # resolve and validate; no data is loaded
    assert cfg.output.name == name and cfg.data.name == "cifar10"
    check_inputs(cfg)  # what a run checks before its data loads: the graph, the algorithm on it, the model
    # the file's own keys survive resolution: the preset is what it says, not crossgrad's defaults
    data = preset_data(name)
    assert cfg.algorithm.name == data["algorithm"]["name"]
    for key, value in data["algorithm"].items():
        if key != "name":
            assert cfg.algorithm.params[key] == value, key
    for section in ("data", "model", "topology", "training"):
        for key, value in data.get(section, {}).items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_the_issue_settings_are_there():
    # issue 27 item 6 names four published settings; each has its presets
    for prefix in ("gut-cifar10-resnet20-ring16-", "relaysgd-cifar10-vgg11-", "mt-cifar10-lenet-ring8-classes4-",
                   "ars-cifar10-"):
        assert any(n.startswith(prefix) for n in NAMES), prefix
    gut = {n.rsplit("-ring16-", 1)[1] for n in NAMES if n.startswith("gut-")}
    assert gut == {"dsgd", "gut", "qg-dsgdm", "qg-gutm"}
    for p in presets():
        assert p.description and "\n" not in p.description and p.source and p.reports


def test_preset_table_is_stripped_and_overrides_apply():
    name = PLAIN
    data = preset_data(name)
    assert "preset" not in data
    config_from_dict(data)  # [preset] would be an unknown section here
    cfg = load_preset(name, ["training.epochs=2", "output.name=short"])
    assert cfg.training.epochs == 2 and cfg.output.name == "short"


def test_presets_are_package_data():
    # an installed crossgrad has only the files pyproject's package-data names
    globs = read_toml(ROOT / "pyproject.toml")["tool"]["setuptools"]["package-data"]["crossgrad"]
    files = sorted((ROOT / "src" / "crossgrad" / "presets").glob("*.toml"))
    assert len(files) == len(NAMES)
    for f in files:
        assert any(fnmatch.fnmatch(f"presets/{f.name}", g) for g in globs), f.name


def test_malformed_preset_is_one_line_error(monkeypatch, tmp_path):
    import crossgrad.presets as mod

    (tmp_path / "bad.toml").write_text('[preset]\ndescription = "x"\nsource = "y"\nreport = "typo"\n')
    (tmp_path / "none.toml").write_text('[data]\nname = "digits"\n')
    monkeypatch.setattr(mod, "_files", lambda: {p.stem: p for p in tmp_path.glob("*.toml")})
    with pytest.raises(ConfigError, match=r"preset bad: \[preset\] takes .*got description, report, source"):
        load_preset("bad")
    with pytest.raises(ConfigError, match=r"preset none: no \[preset\] table"):
        load_preset("none")


def test_presets_command_lists_name_description_source(capsys):
    rc, out, _ = run_cli(capsys, "presets")
    assert rc == 0
    for p in presets():
        assert f"{p.name}\n    {p.description}\n    source: {p.source}\n" in out


def test_config_preset_prints_the_resolved_config(capsys):
    name = PLAIN
    rc, out, _ = run_cli(capsys, "config", "--preset", name, "--set", "training.epochs=3")
    assert rc == 0 and f"of preset {name}" in out
    printed = config_from_dict(read_toml_text(out))
    assert printed.to_dict() == load_preset(name, ["training.epochs=3"]).to_dict()


def read_toml_text(text: str) -> dict:
    from crossgrad.run.config import tomllib

    return tomllib.loads(text)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "x.toml", "--preset", "P"], "--preset P takes no config file (x.toml)"),
        (["config", "x.toml", "--preset", "P"], "--preset P takes no config file (x.toml)"),
        (["run", "--preset", "no-such-preset"], "unknown preset 'no-such-preset'; available: "),
        (["run", "--resume", "somewhere", "--preset", "P"], "--resume DIR takes no config file and no --preset"),
    ],
)
def test_preset_errors_are_one_line(capsys, tmp_path, argv, needle):
    argv = [PLAIN if a == "P" else a for a in argv]
    needle = needle.replace("--preset P ", f"--preset {PLAIN} ")
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and err.startswith("crossgrad: error: ") and err.count("\n") == 1
    assert needle in err
    if "unknown preset" in needle:
        assert all(n in err for n in NAMES)


def test_run_preset_with_overrides(capsys, tmp_path):
    # a preset is an ordinary config: here shrunk by --set to digits and an MLP (no CIFAR-10 in tests)
    name = PLAIN
    small = ["data.name=digits", "data.augment=false", "model.name=mlp", "topology.n_agents=4",
             "training.steps=3", "training.warmup_steps=0", "training.eval_at_start=false",
             "training.eval_subset=64", "algorithm.lr=0.05"]
    argv = ["run", "--preset", name, "--out-dir", str(tmp_path), "--quiet"]
    for s in small:
        argv += ["--set", s]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    saved = read_toml(tmp_path / name / "config.toml")
    assert saved["training"]["seed"] == 1 and saved["training"]["steps"] == 3  # the preset's, then --set's
    assert saved["topology"]["name"] == "full" and saved["algorithm"]["weight_decay"] == 1e-4
