"""Command-line interface: `crossgrad run | sweep | report | plot | config | algorithms | presets | partition |
models | topology | quickstart | bench`.

Exit codes: 0 success; 1 a run diverged (NaN/Inf) or failed; 2 a configuration or input error
(one line on stderr, no traceback); 75 a run directory is in use by another process; 130 interrupted
(a checkpoint was written, resume with `crossgrad run --resume DIR`, unless no step had run yet); 143
stopped by SIGTERM (the same, in the simulator). A run that stops before completing says in DIR/status.json
why, at which step, which checkpoint holds it and the command that continues it.
"""

from __future__ import annotations

import _thread
import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

EPILOG_SET = (
    "--set takes section.key=value, the value a TOML literal (algorithm.alpha=0, "
    'data.name="mnist"; a bare word is taken as a string), or section.table.key=value for an option '
    "table (topology.options.p=0.05). Top-level keys have no section (backend=sim). Sections: data, model, "
    "topology, algorithm, training, output. `crossgrad config` prints every key and its value."
)


def _error(msg: str) -> int:
    print(f"crossgrad: error: {msg}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    from crossgrad.run import resume_experiment, run_experiment

    if args.stop_after is not None and args.stop_after < 0:
        return _error(f"--stop-after takes a number of steps >= 0, not {args.stop_after}")
    if args.resume:
        if (args.config or args.preset or args.set or args.out_dir or args.name or args.overwrite
                or args.resume_if_exists):
            return _error(
                "--resume DIR takes no config file and no --preset/--set/--out-dir/--name/--overwrite/"
                "--resume-if-exists (the run continues with the config saved in DIR; --backend may change)"
            )
        result = resume_experiment(args.resume, quiet=args.quiet, stop_after=args.stop_after, backend=args.backend)
    else:
        if args.overwrite and args.resume_if_exists:
            return _error("--overwrite replaces an unfinished run, --resume-if-exists continues it: pick one")
        overrides = list(args.set or [])
        if args.resume_if_exists:
            overrides.append('output.resume="auto"')
        if args.out_dir:
            overrides.append(f"output.out_dir={_toml_str(args.out_dir)}")
        if args.name:
            overrides.append(f"output.name={_toml_str(args.name)}")
        if args.backend:
            overrides.append(f"backend={_toml_str(args.backend)}")
        cfg = _load(args, overrides)
        result = run_experiment(cfg, quiet=args.quiet, stop_after=args.stop_after, overwrite=args.overwrite)
    return _finish(result)


def _load(args: argparse.Namespace, overrides: list[str] | None):
    """The validated config of a command's FILE or --preset NAME (neither: the defaults), overrides applied."""
    from crossgrad.run.config import ConfigError, load_config

    if args.preset is None:
        return load_config(args.config, overrides)
    if args.config:
        raise ConfigError(f"--preset {args.preset} takes no config file ({args.config}): the preset is the config; "
                          "change it with --set")
    from crossgrad.presets import load_preset

    return load_preset(args.preset, overrides)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _finish(result) -> int:
    if result.said or (not result.main and result.status != "failed"):
        return result.exit_code  # dist: rank 0 reports what all ranks agreed on; a failure is each rank's own view
    if result.status == "completed":
        s = result.summary or {}
        acc, local = s.get("consensus_acc"), s.get("local_acc_mean")
        line = f"{s.get('method')} on {s.get('setting')} (seed {s.get('seed')}): completed"
        if acc is not None:
            line += f", consensus acc {100 * acc:.2f}%, mean local acc {100 * local:.2f}%"
        print(line)
        print(f"results in {result.run_dir}")
    elif result.status in ("stopped", "interrupted", "terminated"):
        print(f"crossgrad: {result.status}: {result.message}", file=sys.stderr)
    else:
        print(f"crossgrad: {result.message}", file=sys.stderr)
    return result.exit_code


def cmd_sweep(args: argparse.Namespace) -> int:
    from crossgrad.sweep import run_sweep

    if args.jobs is not None and args.jobs < 1:
        return _error("--jobs must be >= 1")
    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            return _error(f"--seeds takes comma-separated integers (0,1,2), not {args.seeds!r}")
        if not seeds:
            return _error("--seeds needs at least one seed")
    return run_sweep(args.file, args.set, jobs=args.jobs, quiet=args.quiet, dry_run=args.dry_run, seeds=seeds)


#: `crossgrad report --metric`
REPORT_METRICS = ("consensus", "local", "worst", "gossip")


def cmd_report(args: argparse.Namespace) -> int:
    from crossgrad.report import report_main

    return report_main(args.dirs, out=args.out, metric=args.metric, target=args.target)


def cmd_plot(args: argparse.Namespace) -> int:
    from crossgrad.report import plot_main

    return plot_main(args.dirs, out=args.out)


def cmd_config(args: argparse.Namespace) -> int:
    from crossgrad.run.config import dump_toml
    from crossgrad.run.inputs import check_inputs

    cfg = _load(args, args.set)
    check_inputs(cfg)  # what `crossgrad run` refuses before loading the data, this refuses too
    what = f" of preset {args.preset}" if args.preset else f" of {args.config}" if args.config else " (the defaults)"
    print(f"# the resolved configuration{what}; "
          f"runs into {Path(cfg.output.out_dir) / cfg.run_name()}")
    data = cfg.to_dict()
    print(dump_toml(data), end="")
    unset = [f"{k}.{kk}" for k, v in data.items() if isinstance(v, dict) for kk, vv in v.items() if vv is None]
    if unset:
        print(f"# unset (their defaults apply): {', '.join(unset)}")
    return 0


def cmd_algorithms(args: argparse.Namespace) -> int:
    from crossgrad.algorithms import ALGORITHMS, algorithm_options
    from crossgrad.run.config import dump_toml

    for name in sorted(ALGORITHMS):
        doc = (ALGORITHMS[name].__doc__ or "").strip().splitlines()
        generated = doc and doc[0].startswith(ALGORITHMS[name].__name__ + "(")  # a dataclass's own signature
        print(f"{name}" + (f": {doc[0]}" if doc and not generated else ""))
        for key, value in algorithm_options(name).items():
            print(f"    {key} = {'(unset)' if value is None else dump_toml({key: value}).split(' = ', 1)[1].strip()}")
    print("\nset any of them with --set algorithm.KEY=VALUE, or in a config file's [algorithm] table")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from crossgrad.presets import presets

    for p in presets():
        print(f"{p.name}\n    {p.description}\n    source: {p.source}")
    print("\nrun one with `crossgrad run --preset NAME` (--set overrides any key, e.g. --set training.epochs=2); "
          "`crossgrad config --preset NAME` prints it")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from crossgrad.data import class_histogram, format_histogram, load_dataset, partition

    cfg = _load(args, args.set)
    d = cfg.data
    train, _ = load_dataset(d.name, d.data_dir, **d.loader_options())
    parts = partition(train.y, cfg.topology.n_agents, d.partition, cfg.training.seed, beta=d.beta,
                      shards_per_agent=d.shards_per_agent, classes_per_agent=d.classes_per_agent)
    print(f"{cfg.setting} (seed {cfg.training.seed}): training samples of each class per agent")
    print(format_histogram(class_histogram(train.y, parts, train.num_classes), train.classes))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from crossgrad.models import describe_models

    if args.num_classes < 1:
        return _error(f"--num-classes must be >= 1, not {args.num_classes}")
    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(s) for s in args.input_shape.lower().replace("x", ",").split(","))
        except ValueError:
            return _error(f"--input-shape expects C,H,W (e.g. 1,28,28), not {args.input_shape!r}")
        if len(shape) != 3 or min(shape) < 1:
            return _error(f"--input-shape expects three positive sizes C,H,W (e.g. 1,28,28), not {args.input_shape!r}")
    try:
        print(describe_models(shape, args.num_classes, tuple(args.norm or ["evonorm"])))
    except ValueError as e:
        return _error(str(e))
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    from crossgrad.run.config import parse_override
    from crossgrad.topology import make_topology

    options = {}
    for text in args.option or []:
        key, value = parse_override(text)
        options[".".join(key)] = value
    topo = make_topology(args.name, args.n, weights=args.weights, **options)
    s = topo.summary()

    def degrees(ds: list[int]) -> str:
        lo, hi = min(ds), max(ds)
        return str(lo) if lo == hi else f"{lo}..{hi} (mean {sum(ds) / len(ds):.2f})"

    params = ", ".join(f"{k}={v}" for k, v in (s.get("params") or {}).items())
    print(f"topology          {s['name']}" + (f" ({params})" if params else ""))
    print(f"agents            {s['n']}")
    kind = "directed" if s["directed"] else "undirected: both directions counted"
    print(f"edges             {s['n_edges']} ({kind})")
    print(f"in-degree         {degrees(s['in_degrees'])}")
    print(f"out-degree        {degrees(s['out_degrees'])}")
    print(f"regular           {'yes' if s['regular'] else 'no'}")
    print(f"symmetric W       {'yes' if s['symmetric'] else 'no'}")
    if not s["doubly_stochastic"]:  # which sums are 1 decides the algorithms (columns: sgp only)
        print(f"stochastic W      {'rows' if s.get('row_stochastic', True) else 'columns (push-sum: algorithm sgp)'}")
    print(f"doubly stochastic {'yes' if s['doubly_stochastic'] else 'no'}")
    time_varying = s.get("time_varying", False)
    if time_varying:  # the graph changes every step: the lines above describe step 0's
        period = s["period"]
        print(f"time-varying      a new graph every step, {f'period {period}' if period else 'random'}; "
              "edges and degrees: step 0's")
        over = "one period's product of W_t" if period else "the expected W_t"
        print(f"spectral gap      {s['spectral_gap']:.6g} (of {over})")
    else:
        print(f"spectral gap      {s['spectral_gap']:.6g}")
    warning = topo.consensus_warning()
    if warning:
        print(f"crossgrad: warning: {warning}", file=sys.stderr)
    if args.matrix:
        import torch

        torch.set_printoptions(precision=4, linewidth=160, sci_mode=False)
        for t in range(min(s["period"] or 1, 4)) if time_varying else (None,):
            print("W =" if t is None else f"W_{t} =")
            print(topo.W if t is None else topo.at(t).W)
    return 0


#: the quickstart's settings: clear learning for both methods on digits in well under 2 minutes
QUICKSTART_EPOCHS = 20
QUICKSTART_BASE = {
    "data": {"name": "digits", "partition": "label_sorted"},
    "model": {"name": "lenet5", "norm": "evonorm"},
    "topology": {"name": "ring", "n_agents": 5},
    "algorithm": {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    "training": {
        "batch_size": 32,
        "lr_schedule": "multistep",
        "seed": 0,
        "checkpoint_every": 0,
        "threads": 1,
    },
}
QUICKSTART_RUNS = (("ngc", {"name": "ngc", "alpha": 1.0}), ("dsgdm-n", {"name": "dsgd"}))


#: what a jump in a quickstart run's consensus distance is (issue 30.6: measured, not a fault; README "The quickstart")
QUICKSTART_JUMP = {
    "dsgdm-n": "This is DSGDm-N itself at lr 0.05 on full label skew, not a fault: one agent's loss grows "
               "within a few steps at a constant lr, then the others'; with momentum 0, lr 0.02, GroupNorm or "
               "IID data it does not happen, and NGC, which corrects the skew, stays stable (see the README)",
}


def consensus_jump(records: list[dict], factor: float = 10.0) -> str | None:
    """The first evaluation at which the consensus distance grew `factor`-fold over the previous one to above
    1 (the agents' models flew apart), said in words; None if there is none. Step 0 is no baseline: every
    agent starts from the same model."""
    for prev, rec in zip(records, records[1:]):
        a, b = prev.get("consensus_distance"), rec.get("consensus_distance")
        if prev["step"] > 0 and a is not None and b is not None and b > 1 and b > factor * a:
            last = records[-1]
            settled = (last.get("consensus_distance") or b) < b / factor  # None: the run ended non-finite
            back = (f", then fell back to {last['consensus_distance']:.3g} (final consensus accuracy "
                    f"{100 * last['consensus_acc']:.1f}%)" if settled else "")
            return (f"the consensus distance jumped from {a:.3g} to {b:.3g} at epoch {rec['epoch']:g} "
                    f"(consensus accuracy {100 * prev['consensus_acc']:.1f}% -> {100 * rec['consensus_acc']:.1f}%)"
                    f"{back}")
    return None


def cmd_quickstart(args: argparse.Namespace) -> int:
    import copy

    from crossgrad.report import plot_main, report_main
    from crossgrad.run import run_experiment
    from crossgrad.run.config import config_from_dict

    out = Path(args.out)
    start = time.perf_counter()
    print(
        f"crossgrad quickstart: NGC (alpha=1) vs DSGDm-N on sklearn digits, 5 agents on a ring, "
        f"full label skew (each agent sees 2 of the 10 classes), {args.epochs} epochs -> {out}",
        flush=True,
    )
    dirs = []
    for name, algo in QUICKSTART_RUNS:
        data = copy.deepcopy(QUICKSTART_BASE)
        data["algorithm"].update(algo)
        data["training"]["epochs"] = args.epochs
        data["output"] = {"out_dir": str(out), "name": name}
        cfg = config_from_dict(data, "quickstart").validate()
        result = run_experiment(cfg, quiet=args.quiet, overwrite=True)
        if result.status != "completed":
            return _finish(result)
        dirs.append(result.run_dir)
    print()
    rc = report_main([str(out)], out=str(out))
    if rc:
        return rc
    for d in dirs:
        records = [json.loads(line) for line in (d / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        jump = consensus_jump(records)
        if jump is not None:
            print(f"\nnote: {d.name}: {jump}. " + QUICKSTART_JUMP.get(d.name, ""))
    rc = plot_main([str(out)], out=str(out))
    print(
        f"\nquickstart finished in {time.perf_counter() - start:.1f} s. Learning curves: {out}/curves_*.png, "
        f"accuracy against bytes sent and wall time: {out}/cost_*.png (and .svg); per-run metrics in "
        f"{', '.join(str(d / 'metrics.jsonl') for d in dirs)}"
    )
    return rc


# ------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crossgrad",
        description="Decentralized deep learning on non-IID data: "
        "NGC, CompNGC, DSGD(m-N), QGM, CGA, CompCGA.",
        epilog="Start with `crossgrad quickstart`. Exit codes: 0 ok, 1 a run diverged or failed, "
        "2 bad configuration or input, 75 run directory in use, 130 interrupted (checkpoint written if a step ran), "
        "143 stopped by SIGTERM (likewise); DIR/status.json says how an unfinished run continues.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser(
        "run",
        help="train one configuration (or resume one)",
        epilog=EPILOG_SET,
        description="Train one run from a TOML config (defaults for anything left out) into "
        "output.out_dir/output.name; writes config.toml, metrics.jsonl, "
        "checkpoint.pt and summary.json there.",
    )
    r.add_argument("config", nargs="?", help="TOML config file (optional: defaults otherwise)")
    r.add_argument("--preset", metavar="NAME", help="run a named published setting instead of a file "
                   "(`crossgrad presets` lists them)")
    r.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)"
    )
    r.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from its checkpoint "
                   "(on any number of processes: --backend sim, or dist under torchrun)")
    r.add_argument("--resume-if-exists", action="store_true",
                   help="continue the run if its directory holds an unfinished one, else start it "
                   "(same as --set output.resume=auto; a torchrun restart always does this)")
    r.add_argument("--out-dir", help="same as --set output.out_dir=DIR")
    r.add_argument("--name", help="run directory name (same as --set output.name=NAME)")
    r.add_argument("--backend", choices=("sim", "dist"), help="same as --set backend=...")
    r.add_argument(
        "--stop-after",
        type=int,
        metavar="STEPS",
        help="stop after this many steps in total with a checkpoint to resume from (a requested stop: exit 0)",
    )
    r.add_argument(
        "--overwrite", action="store_true", help="replace a finished or unfinished run in the same directory"
    )
    r.add_argument("--quiet", action="store_true", help="no progress bar; one log line per evaluation")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser(
        "sweep",
        help="run a grid of configurations from one TOML file",
        epilog=EPILOG_SET,
        description="Expand the [sweep] table of FILE (algorithms x topologies x grid keys x "
        "seeds) and run every run whose summary.json does not exist yet "
        "(unfinished runs with a checkpoint are resumed).",
    )
    s.add_argument("file", help="sweep TOML file")
    s.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help="override the base config (repeatable)"
    )
    s.add_argument("--jobs", type=int, help="parallel processes (default: [sweep] jobs, or 1)")
    s.add_argument("--seeds", metavar="S,S,...", help="run these seeds instead of [sweep] seeds (e.g. 0, then 1,2)")
    s.add_argument("--dry-run", action="store_true", help="list the runs without running them")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_sweep)

    for name, func, what in (
        (
            "report",
            cmd_report,
            "print the mean ± std table of finished runs (and write report.md / report.csv)",
        ),
        ("plot", cmd_plot, "draw learning curves of finished runs (PNG and SVG)"),
    ):
        c = sub.add_parser(
            name,
            help=what,
            description=what[0].upper() + what[1:] + "; run directories are found recursively under DIR.",
        )
        c.add_argument("dirs", nargs="+", metavar="DIR", help="run directories or folders holding them")
        c.add_argument("--out", help="where to write the files (default: the first DIR)")
        if name == "report":  # the names of crossgrad.report.table.METRICS (not imported here: it loads torch)
            c.add_argument("--metric", choices=REPORT_METRICS, default="consensus",
                           help="the accuracy the first column shows: the consensus model (default), the mean of "
                                "the agents' local models, the worst agent, or the mean after "
                                "training.final_gossip_rounds gossip-only rounds")
            c.add_argument("--target", type=float, metavar="ACC",
                           help="add a column: the first simulated time (runs with a [network] section) at which "
                                "the consensus accuracy reached ACC percent")
        c.set_defaults(func=func)

    for name, func, what in (
        ("config", cmd_config, "print the resolved configuration (defaults, FILE and --set applied) as TOML"),
        ("partition", cmd_partition, "print the class histogram of every agent's shard for a configuration"),
    ):
        c = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".", epilog=EPILOG_SET)
        c.add_argument("config", nargs="?", help="TOML config file (optional: defaults otherwise)")
        c.add_argument("--preset", metavar="NAME", help="a named published setting instead of a file")
        c.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
        c.set_defaults(func=func)
    a = sub.add_parser("algorithms", help="list the algorithms with their hyperparameters and defaults")
    a.set_defaults(func=cmd_algorithms)
    ps = sub.add_parser("presets", help="list the named published settings (crossgrad run --preset NAME)")
    ps.set_defaults(func=cmd_presets)

    m = sub.add_parser("models", help="list the models with parameter counts")
    m.add_argument("--input-shape", metavar="C,H,W", help="count parameters at this input shape")
    m.add_argument("--num-classes", type=int, default=10, help="number of classes (default 10)")
    m.add_argument(
        "--norm", action="append", help="norm(s) to show: evonorm, group, batch, none (repeatable)"
    )
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("topology", help="describe a topology: degrees, symmetry, stochasticity, spectral gap")
    t.add_argument(
        "name", help="ring, directed_ring, torus, full, chain, star, exponential, erdos_renyi, ..."
    )
    t.add_argument("n", type=int, help="number of agents")
    t.add_argument("--weights", default="uniform", help="mixing weights scheme (default: uniform)")
    t.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="extra topology option, e.g. p=0.3 or seed=1 for erdos_renyi (repeatable)",
    )
    t.add_argument("--matrix", action="store_true", help="also print the mixing matrix W")
    t.set_defaults(func=cmd_topology)

    q = sub.add_parser(
        "quickstart",
        help="train NGC and DSGDm-N on sklearn digits and compare them",
        description="Train NGC (alpha=1) and DSGDm-N (Nesterov momentum 0.9) on scikit-learn's "
        "embedded digits dataset, 5 agents on a ring with full label skew, then print "
        "the comparison table and write the learning curves.",
    )
    q.add_argument(
        "--out", default=str(Path("runs") / "quickstart"), help="output folder (default: runs/quickstart)"
    )
    q.add_argument(
        "--epochs", type=int, default=QUICKSTART_EPOCHS, help=f"epochs per run (default {QUICKSTART_EPOCHS})"
    )
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quickstart)

    # listed for --help only: main() hands `bench` to crossgrad.bench.main before parsing
    sub.add_parser("bench", help="simulator throughput vs the compute bound, overheads, scaling "
                   "(`crossgrad bench --help` for its options)")
    return p


def _in_import_lock_callback(frame) -> bool:
    """True inside importlib's module-lock weakref callback (``_get_module_lock.<locals>.cb``), directly or
    further down: a handler deferred from there may run again while the first is still in threading's code."""
    while frame is not None:
        if frame.f_code.co_name == "cb" and "importlib" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def main(argv: list[str] | None = None) -> int:
    hit = []

    def on_ctrl_c(signum, frame):
        hit.append(signum)
        if _in_import_lock_callback(frame):
            # an exception raised in this weakref callback is printed as "Exception ignored" with a
            # traceback and then dropped, so the run would go on. Have the handler run again a moment
            # later, once the callback has returned: interrupt_main trips the flag of a signal without
            # sending one (a real signal could land in another thread's system call), and it is called
            # from another thread because called here the handler would run again at once, still inside
            timer = threading.Timer(0.005, _thread.interrupt_main, (signum,))
            timer.daemon = True
            timer.start()
            return
        raise KeyboardInterrupt

    # a Ctrl-C that lands inside an import can surface as another error (numpy half-initialised:
    # AttributeError); remembering that it came is what tells those apart from real errors
    own = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_ctrl_c) if own else None
    try:  # torch is imported in here (crossgrad's modules load lazily): a Ctrl-C while it loads is handled too
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print("crossgrad: interrupted", file=sys.stderr)
        return 130
    except Exception:
        if not hit:
            raise
        print("crossgrad: interrupted", file=sys.stderr)
        return 130
    finally:
        if own:
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:  # its own parser; argparse.REMAINDER would not pass a leading --option
        from crossgrad.bench import main as bench_main

        func, args = (lambda _: bench_main(argv[1:])), None
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
        func = getattr(args, "func", None)
        if not func:
            parser.print_help()
            return 2
    from crossgrad.run import user_errors

    try:
        return int(func(args) or 0)
    except user_errors() as e:  # one line; 2 unless the error has its own code (a busy run dir: 75, ...)
        _error(str(e))
        return getattr(e, "exit_code", 2)
    except BrokenPipeError:
        return 0
    except OSError as e:  # a path the checks above did not foresee: still one line, not a traceback
        from crossgrad.files import describe

        return _error(f"{e.filename}: {describe(e)}" if e.filename else describe(e))


if __name__ == "__main__":
    raise SystemExit(main())
