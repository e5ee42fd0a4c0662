"""Grids of runs from one TOML file: algorithms x topologies x grid keys x seeds.

A sweep file is a run config (the usual [data], [model], [algorithm], [training], ... sections
give the shared base) plus a [sweep] table::

    [sweep]
    algorithms = [                       # a name, or a table merged into [algorithm]
        {name = "ngc", alpha = 1.0},
        {name = "dsgd", momentum = 0.9, nesterov = true},
        "compngc",
    ]
    topologies = ["ring", {name = "torus", n_agents = 16}]   # merged into [topology]
    seeds = [0, 1, 2]
    jobs = 1                             # parallel processes (--jobs overrides)

    [sweep.grid]                         # any section.key, as with --set
    "data.partition" = ["label_sorted", "dirichlet"]

Every combination becomes one run directory under output.out_dir (default
``runs/<sweep file name>``), named from its method, setting, seed and grid values; runs whose
summary.json exists are skipped, runs with a checkpoint but no summary are resumed.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossgrad.algorithms import ConfigError
from crossgrad.files import atomic_write_text, make_dir, open_append
from crossgrad.run.config import (
    Config,
    apply_overrides,
    config_from_dict,
    dump_toml,
    read_toml,
    resolve_paths,
    saved_config_data,
    user_errors,
)
from crossgrad.run.inputs import check_inputs
from crossgrad.run.trainer import GPU_SHARE_ENV

SWEEP_KEYS = ("algorithms", "topologies", "seeds", "grid", "jobs")


@dataclass
class SweepRun:
    cfg: Config
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name


def _entries(value: Any, what: str) -> list[dict]:
    if value is None:
        return [{}]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"[sweep] {what} must be a non-empty list")
    out = []
    for v in value:
        if isinstance(v, str):
            out.append({"name": v})
        elif isinstance(v, dict):
            out.append(dict(v))
        else:
            raise ConfigError(f"[sweep] {what}: each entry must be a name or a table, not {v!r}")
    return out


def _entry_name(algo: dict, topo: dict, keys: list[str], values: tuple) -> str:
    """The settings that make one sweep entry, as section.key=value (for an error naming it)."""
    pairs = [(f"algorithm.{k}", v) for k, v in algo.items()] + [(f"topology.{k}", v) for k, v in topo.items()]
    return ", ".join(f"{k}={v}" for k, v in [*pairs, *zip(keys, values, strict=True)]) or "(the base config)"


def _slug(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text).strip("-") or "x"


def expand(path: str | Path, overrides: list[str] | None = None,
           seeds: list[int] | None = None) -> tuple[list[SweepRun], int]:
    """All runs of a sweep file, validated; returns (runs, jobs from the file).

    `seeds` replaces the file's [sweep] seeds (to run a first seed of everything, then more).
    """
    path = Path(path)
    data = read_toml(path)
    sweep = data.pop("sweep", None)
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: a sweep file needs a [sweep] table (keys: {', '.join(SWEEP_KEYS)})")
    unknown = sorted(set(sweep) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown [sweep] key(s) {', '.join(unknown)}; known: {', '.join(SWEEP_KEYS)}"
        )
    data = apply_overrides(data, overrides)
    data.setdefault("output", {})
    if not isinstance(data["output"], dict):
        raise ConfigError(f"{path}: [output] must be a table")
    if data["output"].get("name"):
        raise ConfigError(f"{path}: output.name cannot be set in a sweep (every run is named automatically)")
    data["output"].setdefault("out_dir", str(Path("runs") / path.stem))
    algos = _entries(sweep.get("algorithms"), "algorithms")
    topos = _entries(sweep.get("topologies"), "topologies")
    if seeds is None:
        seeds = sweep.get("seeds", [data.get("training", {}).get("seed", 0)])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ConfigError(f"{path}: [sweep] seeds must be a non-empty list of integers")
    grid = sweep.get("grid", {})
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: [sweep.grid] must be a table of section.key = [values]")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{path}: [sweep.grid] {k!r} must be a non-empty list of values")
        if len(k.split(".")) != 2:
            raise ConfigError(f"{path}: [sweep.grid] keys are section.key, not {k!r}")
    jobs = sweep.get("jobs", 1)
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"{path}: [sweep] jobs must be a positive integer")
    grid_keys = list(grid)
    runs: list[tuple[Config, str, str]] = []
    # seed-major: every configuration at the first seed finishes before any runs a second seed,
    # so a sweep stopped half-way still has a complete (if single-seed) table
    for seed, topo, algo, values in itertools.product(seeds, topos, algos, itertools.product(*grid.values())):
        d = copy.deepcopy(data)
        d.setdefault("topology", {}).update(topo)
        d.setdefault("algorithm", {}).update(algo)
        for key, value in zip(grid_keys, values, strict=False):
            section, k = key.split(".")
            d.setdefault(section, {})
            if not isinstance(d[section], dict):
                raise ConfigError(f"{path}: [sweep.grid] {key!r}: {section!r} is not a section")
            d[section][k] = value
        d.setdefault("training", {})["seed"] = seed
        cfg = resolve_paths(config_from_dict(d, str(path)), path.parent)
        try:  # what `crossgrad run` checks before its data loads, so a bad entry stops the sweep before its first run
            check_inputs(cfg)
        except user_errors() as e:
            raise ConfigError(f"{path}: run {_entry_name(algo, topo, grid_keys, values)} seed {seed}: {e}") from None
        name = cfg.run_name()
        for key, value in zip(grid_keys, values, strict=False):
            name += f"_{key.split('.')[-1]}={_slug(value)}"
        ident = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "output"}, sort_keys=True)
        runs.append((cfg, name, ident))
    # disambiguate runs whose readable names collide (e.g. two entries differing only in lr)
    counts: dict[str, int] = {}
    for _, name, _ in runs:
        counts[name] = counts.get(name, 0) + 1
    out, seen = [], set()
    for cfg, name, ident in runs:
        if counts[name] > 1:
            name += "_" + hashlib.sha1(ident.encode()).hexdigest()[:8]
        if name in seen:
            raise ConfigError(f"{path}: the sweep lists the same run twice ({name})")
        seen.add(name)
        cfg.output.name = name
        out.append(SweepRun(cfg, Path(cfg.output.out_dir) / name))
    return out, jobs


def _status(run: SweepRun) -> str:
    from crossgrad.run.rundir import CHECKPOINT, SUMMARY, lock_holder

    if (run.run_dir / SUMMARY).exists():
        return "done"
    if lock_holder(run.run_dir) is not None:
        return "busy"
    if (run.run_dir / CHECKPOINT).exists():
        return "resume"
    return "new"


def _check_not_another_run(run: SweepRun) -> None:
    """A run directory that already holds a run of a different configuration (another sweep file
    writing to the same out_dir with the same run names) is an error, never silently skipped or resumed."""
    from crossgrad.run.rundir import CONFIG, comparable_config

    path = run.run_dir / CONFIG
    if not path.is_file():
        return
    try:
        theirs = comparable_config(config_from_dict(saved_config_data(read_toml(path)), str(path)).to_dict())
    except ConfigError:
        theirs = None
    mine = comparable_config(run.cfg.to_dict())
    if theirs != mine:
        diff = sorted(k for k in set(mine) | set(theirs or {}) if mine.get(k) != (theirs or {}).get(k))
        raise ConfigError(
            f"{run.run_dir} already holds a run of another configuration "
            f"(differs in {', '.join(diff[:6]) if theirs is not None else 'everything: unreadable ' + CONFIG}); "
            "use another output.out_dir for this sweep"
        )


def _finished_elsewhere(run: SweepRun, rc: int) -> bool:
    """A run refused (exit 2) because another sweep finished it meanwhile is no failure."""
    return rc == 2 and _status(run) == "done"


def _result_line(run: SweepRun) -> str:
    from crossgrad.run.rundir import SUMMARY

    try:
        s = json.loads((run.run_dir / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no summary"
    acc = s.get("consensus_acc")
    return f"{s.get('status')}" + (
        f", consensus acc {100 * acc:.2f}%" if isinstance(acc, (int, float)) else ""
    )


def _run_inprocess(run: SweepRun, state: str, quiet: bool) -> int:
    from crossgrad.run import RunBusyError, resume_experiment, run_experiment, user_errors

    try:
        if state == "resume":
            result = resume_experiment(run.run_dir, quiet=quiet)
        else:
            result = run_experiment(run.cfg, quiet=quiet)
    except RunBusyError:
        print(f"  skip {run.name} (another process is running it)")
        return 0
    except user_errors() as e:
        print(f"crossgrad: error in {run.name}: {e}", file=sys.stderr)
        return 2
    if result.message and not result.said:
        print(result.message, file=sys.stderr)
    return result.exit_code


def _remove_orphaned_configs(run: SweepRun) -> None:
    """The config copies of sweeps killed (-9) before they could delete them; a live sweep's copy stays."""
    from crossgrad.run.rundir import pid_alive

    for f in run.run_dir.glob("sweep-config-*.toml"):
        pid = f.stem.rpartition("-")[2]
        if not (pid.isdigit() and pid_alive(int(pid))):
            f.unlink(missing_ok=True)


class Children:
    """The sweep's running runs. They run in their own sessions, so a Ctrl-C at the terminal reaches the
    sweep alone, which forwards it once to each: every run then writes its checkpoint and exits, and no
    new run starts (a run's own second Ctrl-C would abort it without a checkpoint)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopping = False

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen | None:
        with self.lock:  # no run starts after stop() has signalled the others
            if self.stopping:
                return None
            proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
            self.procs.add(proc)
            return proc

    def wait(self, proc: subprocess.Popen) -> int:
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.procs.discard(proc)

    def stop(self) -> int:
        """Forward a Ctrl-C to every running run; returns how many there were."""
        with self.lock:
            self.stopping = True
            for proc in self.procs:
                proc.send_signal(signal.SIGINT)
            return len(self.procs)


def _run_subprocess(run: SweepRun, state: str, threads: int, jobs: int, children: Children) -> int | None:
    """The run's exit code, or None when the sweep was stopped before it started."""
    make_dir(run.run_dir)
    cfg_path = None
    if state == "resume":
        args = ["run", "--resume", str(run.run_dir), "--quiet"]
    else:
        cfg_path = run.run_dir / f"sweep-config-{os.getpid()}.toml"  # per sweep: never shared
        atomic_write_text(cfg_path, dump_toml(run.cfg.to_dict()))
        args = ["run", str(cfg_path), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env[GPU_SHARE_ENV] = str(jobs)  # concurrent CUDA runs split the device's memory (crossgrad.run.trainer)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        with open_append(run.run_dir / "run.log") as log:
            proc = children.start([sys.executable, "-m", "crossgrad", *args], stdout=log,
                                  stderr=subprocess.STDOUT, env=env)
            return None if proc is None else children.wait(proc)
    finally:  # the run saved its own config.toml; this copy only passed it on
        if cfg_path is not None:
            cfg_path.unlink(missing_ok=True)


def _progress(k: int, total: int, started: float) -> str:
    """"[k/total] 12m05s, about 30m00s left" after k runs: the runs left at the mean time per run so far."""
    def fmt(s: float) -> str:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"

    spent = time.monotonic() - started
    left = f", about {fmt(spent / k * (total - k))} left" if 0 < k < total else ""
    return f"[{k}/{total}] {fmt(spent)}{left}"


#: the exit codes of a run stopped in order by a signal (Ctrl-C, SIGTERM), its checkpoint written
SIGNALLED = (130, 143)


def _run_parallel(todo: list[tuple[SweepRun, str]], jobs: int, started: float) -> int | None:
    """Run `todo` as `jobs` child processes; the number that failed, or None after a Ctrl-C (all stopped)."""
    from crossgrad.run import RunBusyError

    threads = max(1, (os.cpu_count() or 1) // jobs)
    children, done, failures, interrupted = Children(), 0, 0, False

    def work(item: tuple[SweepRun, str]) -> tuple[SweepRun, int | None]:
        if _status(item[0]) in ("done", "busy"):  # another sweep got there first
            return item[0], 0
        rc = _run_subprocess(item[0], item[1], threads, jobs, children)
        return item[0], 0 if rc == RunBusyError.exit_code or _finished_elsewhere(item[0], rc) else rc

    pool = ThreadPoolExecutor(max_workers=jobs)
    pending = [pool.submit(work, item) for item in todo]
    try:
        for fut in as_completed(pending):
            r, rc = fut.result()
            if rc is None:
                continue  # never started: the sweep is stopping
            done += 1
            if rc in SIGNALLED:  # a run stopped by a signal of its own: stop the sweep as a Ctrl-C would
                interrupted = True
                children.stop()
            failures += rc not in (0, *SIGNALLED)
            line = {0: None, 1: None, 130: "interrupted (checkpoint written)",
                    143: "terminated by SIGTERM (checkpoint written)"}.get(
                rc, f"failed (exit {rc}); see {r.run_dir / 'run.log'}") or _result_line(r)
            print(f"{_progress(done, len(todo), started)} {r.name}: {line}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        n = children.stop()
        print(f"\nsweep: Ctrl-C; waiting for {n} running run(s) to write their checkpoints", file=sys.stderr,
              flush=True)
    while True:  # wait for the children even through more Ctrl-Cs, so no thread is left to be interrupted
        try:
            pool.shutdown(wait=True, cancel_futures=True)
            break
        except KeyboardInterrupt:
            children.stop()  # a second Ctrl-C reaches the runs as their second one: they stop at once
    if interrupted:
        print("sweep interrupted; run the same command again to resume it", file=sys.stderr)
        return None
    return failures


def run_sweep(
    path: str | Path,
    overrides: list[str] | None = None,
    jobs: int | None = None,
    quiet: bool = False,
    dry_run: bool = False,
    seeds: list[int] | None = None,
) -> int:
    """Run every missing run of a sweep; returns 0 if all finished, 1 if any failed or diverged, 75 if
    some are still running in another process."""
    from crossgrad.run import RunBusyError

    runs, file_jobs = expand(path, overrides, seeds)
    jobs = jobs or file_jobs
    for r in runs:
        _check_not_another_run(r)
        _remove_orphaned_configs(r)
    states = [_status(r) for r in runs]
    todo = [(r, s) for r, s in zip(runs, states, strict=False) if s not in ("done", "busy")]
    print(
        f"sweep {path}: {len(runs)} runs in {runs[0].cfg.output.out_dir if runs else '-'}; "
        f"{states.count('done')} already done, "
        + (f"{states.count('busy')} running in another process, " if "busy" in states else "")
        + f"{len(todo)} to run"
        + (f" with {jobs} jobs" if jobs > 1 else "")
    )
    for r, s in zip(runs, states, strict=False):
        if s == "done":
            print(f"  skip {r.name} (summary.json exists)")
        elif s == "busy":
            print(f"  skip {r.name} (another process is running it)")
        elif dry_run:
            print(f"  {'resume' if s == 'resume' else 'run'} {r.name}")
    if dry_run:
        return 0
    failures, started = 0, time.monotonic()
    if jobs == 1:
        for k, (r, s) in enumerate(todo, 1):
            if _status(r) in ("done", "busy"):  # another sweep got there first
                print(f"[{k}/{len(todo)}] skip {r.name} (done or running elsewhere)", flush=True)
                continue
            print(f"[{k}/{len(todo)}] {'resuming' if s == 'resume' else 'running'} {r.name}", flush=True)
            rc = _run_inprocess(r, s, quiet)
            rc = 0 if _finished_elsewhere(r, rc) else rc
            if rc in SIGNALLED:  # SIGTERM too: the run stopped in order, the sweep must not go on to the next
                print("sweep interrupted; run it again to continue", file=sys.stderr)
                return rc
            failures += rc != 0
            print(
                f"{_progress(k, len(todo), started)} {r.name}: "
                f"{_result_line(r) if rc in (0, 1) else f'failed (exit {rc})'}",
                flush=True,
            )
    else:
        failures = _run_parallel(todo, jobs, started)
        if failures is None:
            return 130
    if failures:
        print(f"{failures} of {len(todo)} runs failed or diverged", file=sys.stderr)
        return 1
    elsewhere = [r.name for r in runs if _status(r) == "busy"]
    if elsewhere:  # not done yet, and not this sweep's to wait for (e.g. orphans of a sweep killed with -9)
        print(f"{len(elsewhere)} run(s) still running in another process ({', '.join(elsewhere[:3])}"
              f"{', ...' if len(elsewhere) > 3 else ''}); run the sweep again when they finish", file=sys.stderr)
        return RunBusyError.exit_code
    return 0
