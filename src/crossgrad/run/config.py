"""Typed run configuration: TOML in, `--set section.key=value` overrides, one clear error out.

A config file has the sections below (every key optional; defaults shown by `Config()`)::

    backend = "sim"                 # "sim" (in-process simulator) or "dist" (torch.distributed)

    [data]
    name = "digits"                 # digits | mnist | fashion-mnist | cifar10 | cifar100 | imagenette | synthetic
    data_dir = "shared/data/mnist"  # where the files are (not needed for digits)
    image_size = 32                 # imagenette: side of the square images in pixels (32 unless set)
    partition = "label_sorted"      # label_sorted | iid | dirichlet | dirichlet_even | shards | classes
    beta = 0.5                      # Dirichlet concentration (dirichlet, dirichlet_even)
    shards_per_agent = 2            # shards partition
    classes_per_agent = 4           # classes partition (required there): each agent holds exactly this many
    augment = false                 # random crop + flip (image datasets)

    [model]
    name = "lenet5"
    norm = "evonorm"                # evonorm | group | batch | none

    [topology]
    name = "ring"
    n_agents = 5
    weights = "uniform"             # mixing matrix: uniform | metropolis (see crossgrad.topology), or
                                    # out_uniform: column-stochastic, for push-sum (algorithm sgp)
    options = {}                    # builder options: {edges = [[0, 1], ...]} for name = "edges",
                                    # {path = "W.txt"} for name = "file" (relative to this file),
                                    # {seed = 0} for name = "random_matching" (a new graph every step,
                                    # as "one_peer_exponential"; see docs/algorithms.md)

    [algorithm]
    name = "ngc"                    # dsgd | ngc | compngc | cga | compcga
    alpha = 0.5                     # any hyperparameter of that algorithm (codec = "sign" compresses
                                    # ngc/cga); its own dataclass holds the defaults, other keys are errors

    [training]
    batch_size = 32                 # per agent
    epochs = 10                     # or steps = 1000 (steps wins when set)
    lr_schedule = "constant"        # constant | multistep (x0.1 at 50% and 75%) | cosine
    lr_milestones = [0.75, 0.9]     # multistep: where the lr drops, as fractions of the run (default [0.5, 0.75])
    lr_decay = 0.1                  # multistep: the factor at each milestone (default 0.1)
    ...

    [output]
    out_dir = "runs"
    name = "my-run"                 # default: derived from method, setting and seed

    [network]                       # optional: an unreliable network and simulated time (docs/network.md)
    drop_prob = 0.1                 # every message lost independently with this probability
    compute_ms = 5.0                # one gradient evaluation; latency_ms, bandwidth_mbps: links (or a file)

Overrides use one convention, ``section.key=value`` with the value parsed as a TOML literal
(``algorithm.alpha=0``, ``data.name="mnist"``); a value that is not a TOML literal is taken as
a bare string (``data.name=mnist``). Top-level keys have no section (``backend=dist``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from crossgrad.algorithms import ConfigError
from crossgrad.comm.network import NetworkConfig, check_network, resolve_network_paths
from crossgrad.console import warn
from crossgrad.data.partition import PARTITIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "AlgorithmConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OutputConfig",
    "TopologyConfig",
    "TrainingConfig",
    "apply_overrides",
    "config_from_dict",
    "dump_toml",
    "load_config",
    "method_label",
    "parse_override",
    "resolve_paths",
    "saved_config_data",
    "user_errors",
    "setting_label",
    "resolve_algorithm",
]

SCHEDULES = ("constant", "multistep", "cosine")
BACKENDS = ("sim", "dist")
RESUME_MODES = ("never", "auto")


@dataclass
class DataConfig:
    name: str = "digits"
    data_dir: str | None = None
    partition: str = "label_sorted"
    beta: float = 0.5
    shards_per_agent: int = 2
    #: the `classes` partition's k (no default: it is the setting); unset for the other partitions
    classes_per_agent: int | None = None
    augment: bool = False
    #: imagenette's image side in pixels (its loader's default, 32, when unset)
    image_size: int | None = None

    def loader_options(self) -> dict[str, Any]:
        """The keyword arguments for crossgrad.data.load_dataset that this section sets."""
        return {} if self.image_size is None else {"image_size": self.image_size}


@dataclass
class ModelConfig:
    name: str = "lenet5"
    norm: str = "evonorm"
    #: extra keyword arguments for the model builder (e.g. {width = 0.5})
    options: dict = field(default_factory=dict)


@dataclass
class TopologyConfig:
    name: str = "ring"
    n_agents: int = 5
    weights: str = "uniform"
    #: extra keyword arguments for crossgrad.topology.make_topology (e.g. {p = 0.3} for erdos_renyi)
    options: dict = field(default_factory=dict)


@dataclass
class AlgorithmConfig:
    """`name` and the algorithm's hyperparameters, every one resolved against the algorithm's own defaults.

    The algorithm's dataclass (crossgrad.algorithms) is the single source of its options and their
    defaults; a key it does not take is a ConfigError that lists the ones it does.
    """

    name: str = "ngc"
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.params = resolve_algorithm(self.name, self.params)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}


def resolve_algorithm(name: str, given: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Every hyperparameter of algorithm `name`: its defaults, overridden by `given` (type-checked)."""
    from crossgrad.algorithms import ALGORITHMS, algorithm_options

    if not isinstance(name, str) or name.lower() not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; available: {', '.join(sorted(ALGORITHMS))}")
    defaults = algorithm_options(name)
    out = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise ConfigError(
                f"{source}: unknown key algorithm.{key}; {name} takes: name, {', '.join(defaults)}"
            )
        default = defaults[key]
        hint = type(default) if default is not None else (str | None)
        out[key] = _coerce(f"algorithm.{key}", value, hint)
    return out


@dataclass
class TrainingConfig:
    batch_size: int = 32
    epochs: int = 10
    steps: int | None = None
    lr_schedule: str = "constant"
    #: multistep: the fractions of the run's steps (increasing, each in (0, 1)) at which the lr is multiplied
    #: by lr_decay; None: [0.5, 0.75]. Both are unset by default so that runs written before they existed
    #: compare equal to their resumption (see rundir.comparable_config); the other schedules do not read them
    lr_milestones: list[float] | None = None
    lr_decay: float | None = None  # None: 0.1
    warmup_steps: int = 0
    #: H: every H-th step communicates, the H - 1 between are local optimizer steps (Local-DSGD); 1: every step
    local_steps: int = 1
    eval_every: int = 1  # epochs
    eval_every_steps: int | None = None  # evaluate every k steps instead (when set)
    eval_batch_size: int = 1024
    #: evaluate on this many test samples (a seeded random subset, the same at every evaluation); None: all
    eval_subset: int | None = None
    eval_at_start: bool = True  # evaluate the initial model (step 0) before training
    #: after the last step, evaluate every agent again after this many gossip-only rounds x <- P x (no gradient;
    #: on a time-varying topology the graphs of the steps that would follow); 0: none
    final_gossip_rounds: int = 0
    log_every: int = 10  # steps between two rows of steps.csv (taken at the next sync point)
    seed: int = 0
    checkpoint_every: int = 1  # epochs; 0 = only on Ctrl-C and at the end
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    threads: int = 0  # torch CPU threads; 0 = torch's default
    comm_timeout: float = 60.0  # backend "dist": seconds a rank waits for a neighbour before failing
    #: backend "dist": seconds a rank waits at a control point (evaluation, checkpoint, set-up) for the others;
    #: generous because rank 0 evaluates and writes files there while the others wait
    control_timeout: float = 1800.0
    #: backend "dist": seconds the processes have to find each other (rendezvous, store, connections) before
    #: start-up fails with one line: a restarted worker group must not wait the control time-out for a dead peer
    startup_timeout: float = 120.0


@dataclass
class OutputConfig:
    out_dir: str = "runs"
    name: str | None = None
    tensorboard: bool = False  # also write TensorBoard event files (pip install 'crossgrad[tensorboard]')
    #: "never": an unfinished run in the run directory is an error; "auto": continue it from its checkpoint
    #: (after the usual checks), or start when there is none (for scripted relaunches; torchrun restarts
    #: always resume)
    resume: str = "never"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    #: the [network] section; None (no section) is a perfect network, and such runs' files do not mention it
    network: NetworkConfig | None = None
    backend: str = "sim"

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        """Plain nested data, as written to a run's config.toml: [algorithm] lists every hyperparameter."""
        out = dataclasses.asdict(self)
        out["algorithm"] = self.algorithm.to_dict()
        if self.network is None:
            del out["network"]
        return out

    def make_algorithm(self):
        from crossgrad.algorithms import make_algorithm

        return make_algorithm(self.algorithm.name, **self.algorithm.params)

    def validate(self) -> Config:
        """Checks that need no data: ranges, choices, and the algorithm's own validation."""
        d, t, tr = self.data, self.topology, self.training
        if d.partition not in PARTITIONS:
            raise ConfigError(f"data.partition must be one of {', '.join(PARTITIONS)}, not {d.partition!r}")
        if d.partition in ("dirichlet", "dirichlet_even") and not (d.beta > 0 and math.isfinite(d.beta)):
            raise ConfigError(f"data.beta must be a positive number, not {d.beta}")
        if d.partition == "shards" and d.shards_per_agent < 1:
            raise ConfigError(f"data.shards_per_agent must be >= 1, not {d.shards_per_agent}")
        if d.partition == "classes" and d.classes_per_agent is None:
            raise ConfigError('data.partition = "classes" needs data.classes_per_agent (the classes each agent holds)')
        if d.classes_per_agent is not None and d.classes_per_agent < 1:
            raise ConfigError(f"data.classes_per_agent must be >= 1, not {d.classes_per_agent}")
        if d.image_size is not None and d.image_size < 1:
            raise ConfigError(f"data.image_size must be >= 1, not {d.image_size}")
        if t.n_agents < 2:
            raise ConfigError(f"topology.n_agents must be >= 2 (decentralized training needs two agents), "
                              f"not {t.n_agents}")
        if tr.batch_size < 1:
            raise ConfigError(f"training.batch_size must be >= 1, not {tr.batch_size}")
        if tr.steps is None and tr.epochs < 1:
            raise ConfigError(f"training.epochs must be >= 1, not {tr.epochs}")
        if tr.steps is not None and tr.steps < 1:
            raise ConfigError(f"training.steps must be >= 1, not {tr.steps}")
        if tr.lr_schedule not in SCHEDULES:
            raise ConfigError(
                f"training.lr_schedule must be one of {', '.join(SCHEDULES)}, not {tr.lr_schedule!r}"
            )
        if tr.lr_milestones is not None and not (
            tr.lr_milestones and all(math.isfinite(f) and 0 < f < 1 for f in tr.lr_milestones)
            and all(a < b for a, b in zip(tr.lr_milestones, tr.lr_milestones[1:]))
        ):
            raise ConfigError("training.lr_milestones must be increasing fractions of the run, each in (0, 1) "
                              f"(0.75: after three quarters of the steps), not {tr.lr_milestones}")
        if tr.lr_decay is not None and not (math.isfinite(tr.lr_decay) and 0 < tr.lr_decay <= 1):
            raise ConfigError(f"training.lr_decay must be a number in (0, 1] (the lr's factor at each "
                              f"milestone), not {tr.lr_decay}")
        for key in ("warmup_steps", "checkpoint_every", "threads", "final_gossip_rounds"):
            if getattr(tr, key) < 0:
                raise ConfigError(f"training.{key} must be >= 0, not {getattr(tr, key)}")
        if tr.steps is not None and tr.warmup_steps > tr.steps:
            raise ConfigError(warmup_error(tr.warmup_steps, tr.steps))
        if tr.eval_every < 1:
            raise ConfigError(f"training.eval_every must be >= 1 (epochs), not {tr.eval_every}")
        if tr.eval_every_steps is not None and tr.eval_every_steps < 1:
            raise ConfigError(f"training.eval_every_steps must be >= 1, not {tr.eval_every_steps}")
        if not 0 <= tr.seed < 2**63:
            raise ConfigError(f"training.seed must be an integer in [0, 2**63), not {tr.seed}")
        if tr.threads > MAX_THREADS:
            raise ConfigError(f"training.threads must be at most {MAX_THREADS}, not {tr.threads}")
        for key in ("comm_timeout", "control_timeout", "startup_timeout"):
            value = getattr(tr, key)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ConfigError(f"training.{key} must be a positive number of seconds, not {value!r}")
        if tr.eval_subset is not None and tr.eval_subset < 1:
            raise ConfigError(f"training.eval_subset must be >= 1 (test samples), not {tr.eval_subset}")
        if tr.log_every < 1:
            raise ConfigError(f"training.log_every must be >= 1 (steps), not {tr.log_every}")
        if tr.eval_batch_size < 1:
            raise ConfigError(f"training.eval_batch_size must be >= 1, not {tr.eval_batch_size}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", tr.device):
            raise ConfigError(f"training.device must be auto, cpu, cuda or cuda:N, not {tr.device!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        for where, value in _strings(self.to_dict()):
            if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
                raise ConfigError(f"{where} must not contain control characters or invalid UTF-8, not {value!r}")
        if not self.output.out_dir.strip():
            raise ConfigError("output.out_dir must name a folder (\".\" for the current one), not ''")
        if self.output.name is not None and (
            not self.output.name or "/" in self.output.name or self.output.name in (".", "..")
        ):
            raise ConfigError(f"output.name must be a plain directory name, not {self.output.name!r}")
        if self.output.resume not in RESUME_MODES:
            raise ConfigError(f"output.resume must be one of {', '.join(RESUME_MODES)}, not {self.output.resume!r}")
        if self.output.tensorboard:
            from crossgrad.run.scalars import require_tensorboard

            require_tensorboard()  # missing: say so now, not after the data has loaded
        if tr.local_steps < 1:
            raise ConfigError(f"training.local_steps must be >= 1, not {tr.local_steps}")
        self.algorithm.params = resolve_algorithm(self.algorithm.name, self.algorithm.params)
        algorithm = self.make_algorithm()  # alpha outside [0, 1], gamma <= 0, ...
        if tr.local_steps > 1 and algorithm.local_steps_refusal is not None:
            raise ConfigError(f"training.local_steps={tr.local_steps} needs an algorithm that can step without "
                              f"communicating; {algorithm.name} cannot: {algorithm.local_steps_refusal} "
                              "(dsgd can, with or without momentum and qgm)")
        if self.network is not None:
            check_network(self.network.validate(t.n_agents), algorithm, tr.local_steps)
        return self

    # ------------------------------------------------------------------ labels
    @property
    def method(self) -> str:
        return method_label(self)

    @property
    def setting(self) -> str:
        return setting_label(self)

    def run_name(self) -> str:
        if self.output.name:
            return self.output.name
        slug = re.sub(r"[^a-z0-9.]+", "-", self.method.lower().replace("α", "a").replace("²", "2")).strip("-")
        return f"{slug}_{self.setting.replace('/', '_')}_s{self.training.seed}"


MAX_THREADS = 512


def warmup_error(warmup: int, total: int) -> str:
    """The message for a warm-up longer than the run (checked on the steps once they are known)."""
    return (f"training.warmup_steps={warmup} is longer than the run ({total} steps): the learning rate "
            "would never reach algorithm.lr; shorten the warm-up or train longer")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the configuration or the inputs are wrong" (exit code 2, no traceback)."""
    from crossgrad import data as data_mod
    from crossgrad.topology import TopologyError

    data_errors = tuple(getattr(data_mod, n) for n in ("DataError", "PartitionError") if hasattr(data_mod, n))
    return (ConfigError, TopologyError, *data_errors)


def _strings(data: Any, where: str = "") -> list[tuple[str, str]]:
    """Every string (keys included) in nested config data, with its dotted location."""
    if isinstance(data, str):
        return [(where or "value", data)]
    if isinstance(data, dict):
        out = []
        for k, v in data.items():
            loc = f"{where}.{k}" if where else str(k)
            out += [(loc, k)] if isinstance(k, str) else []
            out += _strings(v, loc)
        return out
    if isinstance(data, (list, tuple)):
        return [x for v in data for x in _strings(v, where)]
    return []


def _fmt_num(v: float) -> str:
    return f"{v:g}"


def method_label(cfg: Config) -> str:
    """A readable label from the resolved hyperparameters: "NGC (α=1)", "DSGDm-N", "QGM", "CompNGC", "CGA", ...;
    an averaging-rate schedule and local steps are added after a comma ("DSGDm-N, γ exponential, H=4")."""
    label = _algorithm_label(cfg)
    schedule = cfg.algorithm.params.get("gamma_schedule", "constant")
    if schedule != "constant":
        label += f", γ {schedule}"
    if cfg.training.local_steps > 1:
        label += f", H={cfg.training.local_steps}"
    return label


def _algorithm_label(cfg: Config) -> str:
    a, name = cfg.algorithm.params, cfg.algorithm.name.lower()
    if name == "dsgd":
        if a["qgm"]:
            return "QGM"
        if a["momentum"] > 0:
            return "DSGDm-N" if a["nesterov"] else "DSGDm"
        return "DSGD"
    compressed = a.get("codec") is not None
    if name in ("ngc", "compngc"):
        if compressed:
            return "CompNGC" if a["alpha"] == 1 else f"CompNGC (α={_fmt_num(a['alpha'])})"
        return f"NGC (α={_fmt_num(a['alpha'])})"
    if name in ("cga", "compcga"):
        return "CompCGA" if compressed else "CGA"
    if name == "sgp":
        return "SGP"
    if name == "gt":  # the momentum form shows, as DSGD's does, and so do the published forms
        base = "DIGing" if a["variant"] == "diging" else "GT"
        tracked = " (tracked wd)" if a["track_weight_decay"] and a["weight_decay"] else ""
        if a["qgm"]:
            return f"{base} (QGM){tracked}"
        if a["momentum"] > 0:
            return f"{base}m-N{tracked}" if a["nesterov"] else f"{base}m{tracked}"
        return base + tracked
    if name == "d2":
        return "D²"
    if name == "gut":  # the GUT paper's names: mu = 0 with momentum is its QG-DSGDm baseline
        if a["momentum"] == 0:
            return "GUT" if a["mu"] > 0 else "DSGD (gut, mu=0)"
        base = "QG-GUTm" if a["mu"] > 0 else "QG-DSGDm"
        return base + "-N" if a["nesterov"] else base
    if name == "momentum_tracking":
        return "Momentum Tracking"
    if name == "decentlam":
        return "DecentLaM"
    if name == "relaysgd":
        return "RelaySGD" if a["relay"] == "model" else "RelaySum/Grad"
    return cfg.algorithm.name


def setting_label(cfg: Config) -> str:
    """E.g. "digits/label_sorted/ring-5" (Dirichlet adds its beta)."""
    part = cfg.data.partition
    if part in ("dirichlet", "dirichlet_even"):
        part += f"-{_fmt_num(cfg.data.beta)}"
    elif part == "shards":
        part += f"-{cfg.data.shards_per_agent}"
    elif part == "classes":
        part += f"-{cfg.data.classes_per_agent}"
    return f"{cfg.data.name}/{part}/{cfg.topology.name}-{cfg.topology.n_agents}"


# ---------------------------------------------------------------------- dict -> typed config
_SECTIONS = {f.name: f for f in fields(Config) if dataclasses.is_dataclass(f.default_factory)}
#: sections that are absent unless given (their presence changes the run)
_OPTIONAL = {"network": NetworkConfig}
_TOP_KEYS = {f.name for f in fields(Config) if f.name not in _SECTIONS and f.name not in _OPTIONAL}
_KNOWN = [*_SECTIONS, *_OPTIONAL]


def _coerce(where: str, value: Any, hint: Any) -> Any:
    """Check a TOML value against a field's type hint (ints are accepted for floats)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must not be empty")
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    elif base is dict or typing.get_origin(base) is dict:
        if isinstance(value, dict):
            return dict(value)
    elif typing.get_origin(base) is list:
        if isinstance(value, list):
            (item,) = typing.get_args(base)
            return [_coerce(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    else:  # pragma: no cover
        return value
    if typing.get_origin(base) is list:
        tname = {int: "a list of integers", float: "a list of numbers"}.get(typing.get_args(base)[0], "a list")
    else:
        tname = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base, "a table")
    raise ConfigError(f"{where} must be {tname}, not {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from nested plain data (as read from TOML); unknown sections/keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of sections")
    cfg = Config()
    top_hints = _hints(Config)
    for key, value in data.items():
        if key == "algorithm":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [algorithm] must be a table")
            given = dict(value)
            name = _coerce("algorithm.name", given.pop("name", cfg.algorithm.name), str)
            cfg.algorithm = AlgorithmConfig(name, resolve_algorithm(name, given, source))
        elif key == "network":
            cfg.network = NetworkConfig.from_dict(value, source)
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table")
            section = getattr(cfg, key)
            hints = _hints(type(section))
            for k, v in value.items():
                if k not in hints:
                    known = ", ".join(hints)
                    raise ConfigError(f"{source}: unknown key {key}.{k}; [{key}] takes: {known}")
                setattr(section, k, _coerce(f"{key}.{k}", v, hints[k]))
        elif key in _TOP_KEYS:
            setattr(cfg, key, _coerce(key, value, top_hints[key]))
        else:
            raise ConfigError(
                f"{source}: unknown section or key {key!r}; known sections: "
                f"{', '.join(_KNOWN)}; top-level keys: {', '.join(sorted(_TOP_KEYS))}"
            )
    return cfg


def saved_config_data(data: Any) -> Any:
    """A run directory's saved config data as this version reads it.

    Runs written before each algorithm owned its hyperparameters list every algorithm's keys under
    [algorithm] (a DSGD run has `alpha`, `margin`, ...); the runner passed only the ones the
    algorithm takes, so dropping the others reproduces exactly what those runs trained with.
    """
    from crossgrad.algorithms import ALGORITHMS, algorithm_options

    section = data.get("algorithm") if isinstance(data, dict) else None
    name = section.get("name", AlgorithmConfig.name) if isinstance(section, dict) else None
    if not isinstance(name, str) or name.lower() not in ALGORITHMS:
        return data
    taken = algorithm_options(name)
    return {**data, "algorithm": {k: v for k, v in section.items() if k == "name" or k in taken}}


def resolve_paths(cfg: Config, base_dir: str | Path) -> Config:
    """Make the topology's W file path absolute, relative to `base_dir` (the config file's folder)."""
    path = cfg.topology.options.get("path")
    if cfg.topology.name == "file" and isinstance(path, str):
        cfg.topology.options["path"] = str((Path(base_dir) / Path(path).expanduser()).resolve())
    if cfg.network is not None:
        resolve_network_paths(cfg.network, base_dir)
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """ "section.key=value" -> (["section", "key"], value); the value is a TOML literal or a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    path = key.split(".")
    if not key or any(not p for p in path) or len(path) > 3:
        raise ConfigError(f"--set expects section.key=value, section.table.key=value (topology.options.p=0.05) "
                          f"or a top-level key=value, got {text!r}")
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", raw) and raw not in ("true", "false"):
        return path, raw  # a bare word such as data.name=mnist (also "nan", "inf": strings, not floats)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `section.key=value` overrides to nested plain data (a copy is returned).

    An override of algorithm.name drops the file's hyperparameters of the algorithm it replaces that
    the new one does not take (see `_switch_algorithm`).
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    given: set[str] = set()  # the [algorithm] keys set on the command line
    for text in overrides or []:
        path, value = parse_override(text)
        if path[0] == "algorithm" and len(path) == 2:
            given.add(path[1])
        if len(path) == 1:
            if path[0] in _KNOWN:
                raise ConfigError(f"--set {text!r}: {path[0]!r} is a section; use {path[0]}.KEY=VALUE")
            out[path[0]] = value
        else:
            section, key = path[:2]
            if section not in _KNOWN:
                raise ConfigError(
                    f"--set {text!r}: unknown section {section!r}; known sections: {', '.join(_KNOWN)}"
                )
            out.setdefault(section, {})
            if not isinstance(out[section], dict):
                raise ConfigError(f"[{section}] must be a table")
            if len(path) == 3:
                value = _into_table(text, section, key, out[section].get(key), path[2], value)
            out[section][key] = value
    return _switch_algorithm(data, out, given)


def _switch_algorithm(before: dict[str, Any], after: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """`after` without the [algorithm] keys of `before` that belong to the algorithm an override switched away from.

    Comparing algorithms from one example config (`--set algorithm.name=dsgd` on an NGC file) must not
    fail on NGC's alpha; a key that neither algorithm takes is left in, so a misspelling stays an error,
    and so is a key given on the command line. One warning line names what was dropped.
    """
    from crossgrad.algorithms import ALGORITHMS, algorithm_options

    old_section, new_section = before.get("algorithm"), after.get("algorithm")
    if "name" not in given or not isinstance(old_section, dict) or not isinstance(new_section, dict):
        return after
    old, new = old_section.get("name", AlgorithmConfig.name), new_section["name"]
    known = all(isinstance(n, str) and n.lower() in ALGORITHMS for n in (old, new))
    if not known or old.lower() == new.lower():
        return after  # an unknown name is reported by resolve_algorithm
    theirs, mine = algorithm_options(old), algorithm_options(new)
    dropped = [k for k in old_section if k not in given and k in theirs and k not in mine]
    if dropped:
        keys = ", ".join(f"algorithm.{k}" for k in dropped)
        warn(f"algorithm.name={new} (set on the command line) does not take {keys} from the config ({old}'s); "
             f"ignoring {'it' if len(dropped) == 1 else 'them'}")
        after["algorithm"] = {k: v for k, v in new_section.items() if k not in dropped}
    return after


def _into_table(text: str, section: str, key: str, table: Any, entry: str, value: Any) -> dict[str, Any]:
    """`table` (section.key, a table such as topology.options) with `entry` set to `value`, as a new dict."""
    if section in _OPTIONAL:  # its tables are the keys whose value may be one
        tables = [k for k in ("link_failures", "stragglers", "churn") if k in _hints(_OPTIONAL[section])]
    else:
        hints = {} if section == "algorithm" else _hints(_SECTIONS[section].default_factory)  # flat hyperparameters
        tables = [k for k, h in hints.items() if h is dict or typing.get_origin(h) is dict]
    if key not in tables:
        raise ConfigError(f"--set {text!r}: {section}.{key} is not a table"
                          + (f"; [{section}] tables: {', '.join(tables)}" if tables else ""))
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"{section}.{key} must be a table")
    return {**(table or {}), entry: value}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or start from defaults), apply overrides, validate. Raises ConfigError."""
    data = read_toml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    cfg = config_from_dict(data, str(path) if path is not None else "config")
    return resolve_paths(cfg, Path(path).parent if path is not None else Path.cwd()).validate()


# ------------------------------------------------------------------------------ TOML writing
_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):  # a TOML basic string: escape backslash, quote and every control character
        return '"' + "".join(_TOML_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 32 or ord(c) == 127 else c)
                             for c in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
        )
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def dump_toml(data: dict[str, Any]) -> str:
    """Write nested plain data (top-level scalars, then one table per section) as TOML. None is omitted."""
    lines = [
        f"{_toml_key(k)} = {_toml_value(v)}"
        for k, v in data.items()
        if not isinstance(v, dict) and v is not None
    ]
    for k, v in data.items():
        if isinstance(v, dict):
            if lines:
                lines.append("")
            lines.append(f"[{_toml_key(k)}]")
            lines += [f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines) + "\n"
