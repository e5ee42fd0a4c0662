"""Finding run directories and reading what the runner left in them (summary, metrics, config)."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from crossgrad.errors import ConfigError
from crossgrad.run.config import read_toml
from crossgrad.run.rundir import CHECKPOINT, CONFIG, METRICS, SUMMARY

# files that mark a directory as a (possibly crashed) run directory even without a summary
_RUN_MARKERS = (METRICS, CONFIG, CHECKPOINT)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def number(x: Any) -> float | None:
    """A JSON value as a float, or None when it is not a number (bools are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warn(f"cannot read {path}: {e}; skipped")
        return None


def _read_config(path: Path) -> dict | None:
    """The config.toml saved next to a summary that carries no "config" of its own."""
    if not path.is_file():
        return None
    try:
        return read_toml(path)
    except ConfigError as e:
        warn(f"{e}; the run's configuration is ignored")
        return None


def _load_run(run_dir: Path) -> dict | None:
    summary = _read_json(run_dir / SUMMARY)
    if summary is None:
        return None
    if not isinstance(summary, dict):
        warn(f"{run_dir / SUMMARY} is not a JSON object; skipped")
        return None
    config = summary.get("config")
    if not isinstance(config, dict):
        config = _read_config(run_dir / CONFIG)
    return {"path": str(run_dir), "summary": summary, "config": config}


def _unfinished_run(run_dir: Path) -> dict | None:
    """A run directory without a summary, described from its config.toml so that it is counted.

    Its status is "running" (another process holds it); else what its status.json says ("stopped",
    "interrupted", "terminated", "failed"), or "killed" when that still says "running" (its process died
    without a word: SIGKILL, out of memory, a lost node); without a status.json (runs written before
    there was one) "interrupted" (a checkpoint to resume from) or "crashed" (neither). The summary's
    "stop" holds the status.json record (or {}); None when the config cannot be read.
    """
    from crossgrad.run.config import config_from_dict, saved_config_data
    from crossgrad.run.rundir import continue_command, lock_holder, read_status

    path = run_dir / CONFIG
    if not path.is_file():
        return None
    try:
        config = config_from_dict(saved_config_data(read_toml(path)), str(path))
    except ConfigError as e:
        warn(f"{e}; skipped")
        return None
    record = read_status(run_dir) or {}
    if lock_holder(run_dir) is not None:
        status = "running"
    elif record:
        status = "killed" if record.get("status") == "running" else str(record.get("status"))
    else:
        status = "interrupted" if (run_dir / CHECKPOINT).is_file() else "crashed"
    if not record and status == "interrupted":  # any checkpoint resumes in the simulator
        record = {"continue": continue_command(run_dir)}
    summary = {"method": config.method, "setting": config.setting, "seed": config.training.seed,
               "status": status, "stop": record}
    return {"path": str(run_dir), "summary": summary, "config": config.to_dict()}


def stop_note(summary: dict) -> str:
    """Where an unfinished run stands and how to continue it, from its status.json ("" when nothing is known)."""
    record, parts = summary.get("stop") or {}, []
    step, total, saved = record.get("step"), record.get("total_steps"), record.get("checkpoint_step")
    if summary.get("status") == "killed":
        if saved is not None:
            parts.append(f"killed after its checkpoint of step {saved}")
    elif isinstance(step, int):
        why = record.get("reason")
        parts.append(f"at step {step}" + (f" of {total}" if total is not None else "") + (f" ({why})" if why else ""))
    if record.get("continue") and summary.get("status") != "running":
        parts.append(f"continue with: {record['continue']}")
    elif summary.get("status") in ("stopped", "interrupted", "terminated", "failed", "killed"):
        parts.append("no checkpoint: run its command again")
    return "; ".join(parts)


def collect(paths: Iterable[str | Path]) -> list[dict]:
    """Find run directories recursively under each path: finished ones and unfinished ones.

    Returns ``[{"path": str, "summary": dict, "config": dict | None}, ...]`` sorted by path; the
    config is the summary's "config", else the run's config.toml, else None. A run directory
    with a config.toml but no summary.json (still running, interrupted or crashed) gets a summary
    that says so, so that tables count it. Unreadable summaries and run-looking directories
    without either are skipped with a warning on stderr. Run directories are not searched further.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: dict[str, dict] = {}
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name == SUMMARY:
            p = p.parent
        if not p.exists():
            warn(f"{p} does not exist; skipped")
            continue
        if not p.is_dir():
            warn(f"{p} is not a directory; skipped")
            continue
        for root, dirs, files in os.walk(p):
            dirs.sort()
            root_p = Path(root)
            if SUMMARY in files:
                dirs[:] = []  # a run directory: do not descend
                key = str(root_p.resolve())
                if key not in found:
                    run = _load_run(root_p)
                    if run is not None:
                        found[key] = run
            elif any(m in files for m in _RUN_MARKERS):
                run = _unfinished_run(root_p)
                if run is None:
                    warn(f"{root_p} has no {SUMMARY} and no readable {CONFIG}; skipped")
                    continue
                dirs[:] = []
                found.setdefault(str(root_p.resolve()), run)
    return sorted(found.values(), key=lambda r: r["path"])


def load_metrics(run: dict | str | Path) -> list[dict]:
    """The evaluation records of a run (``metrics.jsonl``); bad lines are skipped with a warning."""
    run_dir = Path(run["path"] if isinstance(run, dict) else run)
    path = run_dir / METRICS
    if not path.is_file():
        return []
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    warn(f"{path}:{lineno}: invalid JSON ({e}); line skipped")
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
    except (OSError, UnicodeDecodeError) as e:
        warn(f"cannot read {path}: {e}; skipped")
    return records


def load_steps(run: dict | str | Path) -> list[dict]:
    """The per-step rows of a run (``steps.csv``: step, epoch, lr, train_loss, wall_time_s) as numbers."""
    import csv

    from crossgrad.run.scalars import STEPS_CSV

    path = Path(run["path"] if isinstance(run, dict) else run) / STEPS_CSV
    if not path.is_file():
        return []
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                try:
                    rows.append({k: float(v) for k, v in row.items() if k is not None})
                except (TypeError, ValueError):
                    continue  # a torn last line of a killed run
    except (OSError, UnicodeDecodeError) as e:
        warn(f"cannot read {path}: {e}; skipped")
    return rows


def as_list(paths: Any) -> list:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def default_out(paths: Sequence[str | Path], out: str | Path | None) -> Path | None:
    if out is not None:
        return Path(out)
    if paths and Path(paths[0]).is_dir():
        return Path(paths[0])
    return None


def no_runs(paths: Sequence[str | Path]) -> int:
    """Say that nothing was found under ``paths``; the exit code for it."""
    print(f"error: no runs found (no {SUMMARY} under: {', '.join(map(str, paths)) or 'nothing'})",
          file=sys.stderr)
    return 2
