"""Named published settings: one TOML file per preset in this package, a normal config plus a [preset] table.

The [preset] table says what the setting is and where it comes from (`description`, `source`, `reports`,
and `differences` where crossgrad cannot run exactly what the authors ran); the loader strips it, so the
rest is validated as any config file is. `crossgrad presets` lists them, `crossgrad run --preset NAME`
runs one (`--set` still overrides), `crossgrad config --preset NAME` prints the resolved config.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from crossgrad.algorithms import ConfigError

__all__ = ["Preset", "load_preset", "preset_data", "presets"]

#: keys of the [preset] table; the first three are required
_REQUIRED = ("description", "source", "reports")
_KEYS = (*_REQUIRED, "differences")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str  # one line
    source: str  # the paper (table, row) and the code the setting is read from
    reports: str  # what the paper reports for it: which model(s), which accuracy
    differences: str  # where crossgrad's run differs from the authors' (empty when it does not)


def _files() -> dict[str, Any]:
    """Every preset file, by name (the file name without .toml); importlib.resources finds them installed too."""
    root = resources.files(__name__)
    return {Path(f.name).stem: f for f in root.iterdir() if f.name.endswith(".toml")}


def _read(name: str) -> tuple[dict[str, Any], Preset]:
    from crossgrad.run.config import tomllib

    files = _files()
    if name not in files:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(files))} (`crossgrad presets`)")
    data = tomllib.loads(files[name].read_text(encoding="utf-8"))
    meta = data.pop("preset", None)
    if not isinstance(meta, dict):
        raise ConfigError(f"preset {name}: no [preset] table")
    unknown = sorted(set(meta) - set(_KEYS))
    missing = [k for k in _REQUIRED if not meta.get(k)]
    if unknown or missing or not all(isinstance(v, str) for v in meta.values()):
        raise ConfigError(f"preset {name}: [preset] takes the strings {', '.join(_KEYS)} "
                          f"({', '.join(_REQUIRED)} required); got {', '.join(sorted(meta)) or 'none'}")
    return data, Preset(name, meta["description"], meta["source"], meta["reports"], meta.get("differences", ""))


def presets() -> list[Preset]:
    """Every preset, sorted by name."""
    return [_read(name)[1] for name in sorted(_files())]


def preset_data(name: str) -> dict[str, Any]:
    """The config data of preset `name`, [preset] stripped; its runs are named after it unless a config says
    otherwise (the default name is derived from the method, and several presets share one method label)."""
    data, _ = _read(name)
    output = data.setdefault("output", {})
    output.setdefault("name", name)
    return data


def load_preset(name: str, overrides: list[str] | None = None):
    """The validated Config of preset `name` with `section.key=value` overrides applied (no data is loaded)."""
    from crossgrad.run.config import apply_overrides, config_from_dict

    data = apply_overrides(preset_data(name), overrides)
    return config_from_dict(data, f"preset {name}").validate()
