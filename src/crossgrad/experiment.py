"""Experiment runner: data -> partition -> simulator -> training loop, evaluation, checkpoints.

One run lives in one directory::

    config.toml      the resolved configuration (reload it with `crossgrad run config.toml`)
    metrics.jsonl    one JSON object per evaluation (keys: see `METRIC_KEYS`)
    summary.json     headline numbers, written when the run ends (status "completed" or "diverged")
    checkpoint.pt    the latest checkpoint (every `training.checkpoint_every` epochs, on Ctrl-C, at the end)

Data pipeline. The training set is normalised once into a float tensor on the run's device; each
agent draws minibatches from its own shard by index, shuffled by its own `torch.Generator`
(seeded from the run seed). An *epoch* is one pass over the LARGEST shard:
ceil(largest shard / batch_size) steps. Every agent always gets a full `batch_size` minibatch;
an agent whose shard runs out (a smaller shard, or the tail of its current permutation)
reshuffles and continues, so its stream of samples never stops and no sample is dropped.
The seed fixes the model initialisation, the partition, every agent's batch order and the
augmentation. Resuming from a checkpoint restores all of these and continues bit for bit (CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crossgrad.algorithms import ConfigError
from crossgrad.config import Config, config_from_dict, dump_toml, read_toml
from crossgrad.engine import NonFiniteError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.toml"
CHECKPOINT_VERSION = 1

#: keys of every metrics.jsonl record (accuracies are fractions in [0, 1]; bytes per agent per step)
METRIC_KEYS = (
    "step",
    "epoch",
    "lr",
    "consensus_acc",
    "consensus_loss",
    "local_acc_mean",
    "local_acc_min",
    "local_acc_max",
    "local_acc",
    "train_loss",
    "train_loss_agents",
    "consensus_distance",
    "bias_mv",
    "bias_dv",
    "bytes_round1",
    "bytes_round2",
    "grad_evals",
    "grad_evals_per_agent_per_step",
    "qp_failures",
    "wall_time_s",
    "steps_per_s",
    "peak_mem_mb",
)
#: metrics that depend on the machine and the clock (not compared between runs)
TIMING_KEYS = ("wall_time_s", "steps_per_s", "peak_mem_mb")


class RunError(ConfigError):
    """A problem with a run directory (nothing to resume, a run already there, ...)."""


class RunBusyError(RunError):
    """Another live process is training in this run directory."""

    exit_code = 75  # EX_TEMPFAIL: try again later; sweeps treat it as "running elsewhere"


@dataclass
class RunResult:
    status: str  # "completed" | "interrupted" | "diverged" | "failed" (dist: a peer died or hung)
    run_dir: Path
    summary: dict | None = None
    message: str = ""
    main: bool = True  # False on dist ranks other than 0, which write and report nothing on success

    @property
    def exit_code(self) -> int:
        return {"completed": 0, "interrupted": 130, "diverged": 1}.get(self.status, 1)


# ------------------------------------------------------------------------------------ data
def _data_errors() -> tuple[type[BaseException], ...]:
    from crossgrad import data as data_mod

    return tuple(getattr(data_mod, n) for n in ("DataError", "PartitionError") if hasattr(data_mod, n))


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the configuration or the inputs are wrong" (exit code 2, no traceback)."""
    from crossgrad.topology import TopologyError

    return (ConfigError, TopologyError, *_data_errors())


@dataclass
class Prepared:
    """Everything a run needs, built and validated from a config before any training."""

    cfg: Config
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    shards: list[Tensor]
    input_shape: tuple[int, ...]
    num_classes: int
    model: torch.nn.Module
    topology: Any
    algorithm: Any
    device: torch.device
    augment: Any = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device={name!r} but CUDA is not available")
    return dev


def _normalised(ds: Any, name: str) -> Tensor:
    from crossgrad.data import augment as aug

    return aug.normalize(ds.x, aug.dataset_stats(name)).float().contiguous()


def prepare(cfg: Config, device: torch.device | None = None) -> Prepared:
    """Load data, partition it, build model, topology and algorithm. Raises user errors only for bad input.

    `device` overrides training.device (the dist backend passes each rank its own GPU).
    """
    from crossgrad.data import load_dataset, partition
    from crossgrad.models import make_model
    from crossgrad.topology import make_topology

    cfg.validate()
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    device = device or resolve_device(cfg.training.device)
    topo = make_topology(
        cfg.topology.name, cfg.topology.n_agents, weights=cfg.topology.weights, **cfg.topology.options
    )
    algorithm = cfg.make_algorithm()
    d = cfg.data
    train, test = load_dataset(d.name, d.data_dir)
    shards = partition(
        train.y, topo.n, d.partition, cfg.training.seed, beta=d.beta, shards_per_agent=d.shards_per_agent
    )
    if cfg.training.batch_size > len(train.y):
        raise ConfigError(
            f"training.batch_size={cfg.training.batch_size} is larger than the whole {d.name} training set "
            f"({len(train.y)} samples)"
        )
    shards = [torch.as_tensor(s, dtype=torch.long) for s in shards]
    empty = [i for i, s in enumerate(shards) if len(s) == 0]
    if empty:
        raise ConfigError(
            f"the {d.partition} partition of {d.name} leaves agent(s) "
            f"{', '.join(map(str, empty))} without any training sample; use fewer agents "
            "or another partition"
        )
    input_shape = tuple(int(s) for s in train.input_shape)
    torch.manual_seed(cfg.training.seed)  # fixes the initialisation
    try:
        model = make_model(
            cfg.model.name, input_shape, train.num_classes, cfg.model.norm, **cfg.model.options
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"model {cfg.model.name!r} does not fit {d.name} "
            f"(input {'x'.join(map(str, input_shape))}, {train.num_classes} classes): {e}"
        ) from None
    augment = None
    if d.augment:
        from crossgrad.data.augment import Augment

        augment = Augment.for_dataset(d.name) if hasattr(Augment, "for_dataset") else Augment()
    x_train = _normalised(train, d.name).to(device)
    x_test = _normalised(test, d.name).to(device)
    return Prepared(
        cfg,
        x_train,
        train.y.long().to(device),
        x_test,
        test.y.long().to(device),
        shards,
        input_shape,
        train.num_classes,
        model.to(device),
        topo,
        algorithm,
        device,
        augment,
    )


# ---------------------------------------------------------------------------- per-agent data
def agent_seeds(seed: int, n: int, stream: int) -> list[int]:
    """Independent 63-bit seeds for n agents, from the run seed and a stream id."""
    ss = np.random.SeedSequence([int(seed), int(stream)])
    return [int(s) for s in ss.generate_state(n, dtype=np.uint64) >> np.uint64(1)]


class AgentStream:
    """An endless, reshuffling stream of one agent's sample indices."""

    def __init__(self, indices: Tensor, seed: int):
        self.indices = indices
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = self._shuffle()
        self.pos = 0

    def _shuffle(self) -> Tensor:
        return self.indices[torch.randperm(len(self.indices), generator=self.gen)]

    def next(self, size: int) -> Tensor:
        parts, need = [], size
        while need > 0:
            if self.pos >= len(self.perm):
                self.perm, self.pos = self._shuffle(), 0
            take = self.perm[self.pos : self.pos + need]
            self.pos += len(take)
            need -= len(take)
            parts.append(take)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])


# ------------------------------------------------------------------------------- schedules
def lr_at(cfg: Config, step: int, total: int) -> float:
    """Learning rate of step `step` (0-based) out of `total`: warm-up, then the schedule."""
    base, tr = cfg.algorithm.lr, cfg.training
    if tr.warmup_steps and step < tr.warmup_steps:
        return base * (step + 1) / tr.warmup_steps
    if tr.lr_schedule == "multistep":
        return base * (0.1 ** ((step >= total // 2) + (step >= (3 * total) // 4)))
    if tr.lr_schedule == "cosine":
        span = max(total - tr.warmup_steps, 1)
        t = min(max(step - tr.warmup_steps, 0), span - 1)
        return max(base * 0.5 * (1 + math.cos(math.pi * t / span)), base * 1e-6)
    return base


# ------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def score_rows(model: torch.nn.Module, layout: Any, rows: Tensor, buffers: list[Tensor], x: Tensor, y: Tensor,
               batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Test-set (correct predictions, summed loss) of k models that share `model`'s architecture.

    rows: [k, P] flat parameters; buffers: one [k, *shape] tensor per model buffer (batch-norm
    statistics). Buffer-free models are evaluated together with torch.func.vmap.
    """
    import copy

    k, total = rows.shape[0], len(y)
    correct = torch.zeros(k, dtype=torch.long, device=rows.device)
    loss_sum = torch.zeros(k, dtype=torch.float64, device=rows.device)
    template = copy.deepcopy(model).eval()
    if not buffers:

        def logits_of(row: Tensor, inputs: Tensor) -> Tensor:
            params = dict(zip(layout.names, layout.views(row), strict=False))
            return torch.func.functional_call(template, params, (inputs,))

        batched = torch.func.vmap(logits_of, in_dims=(0, None))
        step = max(1, batch_size // k)  # at most batch_size (model, image) pairs per forward: bounded memory
        for s in range(0, total, step):
            xb, yb = x[s : s + step], y[s : s + step]
            out = batched(rows, xb)  # [k, B, C]
            correct += (out.argmax(-1) == yb).sum(1)
            per = torch.nn.functional.cross_entropy(out.permute(1, 2, 0), yb[:, None].expand(-1, k), reduction="none")
            loss_sum += per.sum(0).double()
        return correct, loss_sum
    models = []
    for i in range(k):
        m = copy.deepcopy(template)
        for p, v in zip(m.parameters(), layout.views(rows[i]), strict=False):
            p.copy_(v)
        for b, stacked in zip(m.buffers(), buffers, strict=False):
            b.copy_(stacked[i])
        models.append(m)
    for s in range(0, total, batch_size):
        xb, yb = x[s : s + batch_size], y[s : s + batch_size]
        for i, m in enumerate(models):
            out = m(xb)
            correct[i] += (out.argmax(-1) == yb).sum()
            loss_sum[i] += torch.nn.functional.cross_entropy(out, yb, reduction="sum").double()
    return correct, loss_sum


def consensus_buffers(buffers: list[Tensor]) -> list[Tensor]:
    """The consensus model's buffers, [1, *shape] each: the agents' mean (integer counters: agent 0's)."""
    return [b.mean(0, keepdim=True).to(b.dtype) if b.is_floating_point() else b[:1] for b in buffers]


def accuracy_record(correct: Tensor, consensus_loss: float, total: int) -> dict[str, Any]:
    """Metrics from the correct counts of the n agents followed by the consensus model."""
    acc = (correct.double() / total).tolist()
    local = acc[:-1]
    return {
        "consensus_acc": acc[-1],
        "consensus_loss": consensus_loss / total,
        "local_acc_mean": sum(local) / len(local),
        "local_acc_min": min(local),
        "local_acc_max": max(local),
        "local_acc": local,
    }


def evaluate(sim: Any, x: Tensor, y: Tensor, batch_size: int = 1024) -> dict[str, Any]:
    """Consensus model accuracy/loss and every agent's local test accuracy (fractions)."""
    rows, buffers = sim.params, sim.engine.buffers
    stacked = torch.cat([rows, rows.mean(0, keepdim=True)])  # agents, then the consensus model
    bufs = [torch.cat([b, c]) for b, c in zip(buffers, consensus_buffers(buffers), strict=False)]
    correct, loss = score_rows(sim.model, sim.engine.layout, stacked, bufs, x, y, batch_size)
    return accuracy_record(correct, float(loss[-1]), len(y))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -------------------------------------------------------------------------------- file helpers
def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before it takes the name: a crash never leaves half a file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _one_line(text: Any, limit: int) -> str:
    """An exception's text as one line of at most `limit` characters (for one-line CLI errors)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


#: config keys that may differ between a checkpoint and its resumption (where and how fast, not what)
_RESUMABLE_KEYS = {"output", "training.device", "training.threads", "training.eval_batch_size",
                   "training.comm_timeout"}


def _comparable_config(d: Any) -> dict[str, Any] | None:
    if not isinstance(d, dict):
        return None
    flat = {}
    for k, v in d.items():
        for kk, vv in (v.items() if isinstance(v, dict) and k != "backend" else [(None, v)]):
            key = k if kk is None else f"{k}.{kk}"
            if k not in _RESUMABLE_KEYS and key not in _RESUMABLE_KEYS:
                flat[key] = vv
    return flat


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, lambda p: p.write_text(text, encoding="utf-8"))


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def write_metrics(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(_jsonable(r)) + "\n" for r in records))


def load_run_config(run_dir: str | Path) -> Config:
    p = Path(run_dir) / CONFIG
    if not p.is_file():
        raise RunError(f"{run_dir} is not a run directory (no {CONFIG})")
    return config_from_dict(read_toml(p), str(p)).validate()


# ------------------------------------------------------------------------------------ trainer
class _Interrupt:
    """Turns the first Ctrl-C into a flag checked between steps; a second one aborts at once."""

    def __init__(self) -> None:
        self.hit = False
        self._old = None

    def __enter__(self) -> _Interrupt:
        if _in_main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Trainer:
    """Trains one configured run in `run_dir`, on the simulator or, with backend "dist", as one rank.

    With backend "dist" every rank builds a Trainer for its own agent (rank r = agent r) on an
    initialised process group; training exchanges messages along graph edges only. Evaluation and
    checkpoints gather to rank 0 (collectives outside training steps), which alone writes files.
    Each agent's batches come from the same per-agent seeds as in the simulator, so both backends
    train on the same samples in the same order.
    """

    def __init__(self, cfg: Config, run_dir: Path, quiet: bool = False, prepared: Prepared | None = None):
        self.cfg, self.run_dir, self.quiet = cfg, Path(run_dir), quiet
        p = self.p = prepared or prepare(cfg)
        self.n = p.topology.n
        tr = cfg.training
        self.dist = cfg.backend == "dist"
        if self.dist:
            import torch.distributed as dist

            from crossgrad.distributed import make_engine

            self.sim = None
            self.engine = make_engine(p.model, p.topology, p.algorithm, timeout=tr.comm_timeout, device=p.device)
            self.local = [dist.get_rank()]
        else:
            from crossgrad.simulator import Simulator

            self.sim = Simulator(p.model, p.topology, p.algorithm)
            self.engine = self.sim.engine
            self.local = list(range(self.n))
        self.main = self.local[0] == 0  # the process that evaluates and writes files
        self.batch_size = tr.batch_size
        largest = max(len(s) for s in p.shards)
        self.steps_per_epoch = max(1, math.ceil(largest / tr.batch_size))
        self.total_steps = tr.steps if tr.steps is not None else tr.epochs * self.steps_per_epoch
        stream_seeds, aug_seeds = agent_seeds(tr.seed, self.n, 1), agent_seeds(tr.seed, self.n, 2)
        self.streams = [AgentStream(p.shards[i].to("cpu"), stream_seeds[i]) for i in self.local]
        self.aug_gens = [torch.Generator().manual_seed(aug_seeds[i]) for i in self.local]
        self.stats: dict[str, Any] = {}  # of all agents, as of the latest evaluation
        self.step = 0
        self.metrics: list[dict] = []
        self.elapsed = 0.0
        self._reset_accumulators()

    # -------------------------------------------------------------- accumulators
    def _reset_accumulators(self) -> None:
        dev = self.engine.x.device
        self.acc = {
            "loss": torch.zeros(len(self.local), dtype=torch.float64, device=dev),
            "steps": 0,
            "bias_mv": torch.zeros((), dtype=torch.float64, device=dev),
            "bias_mv_n": 0,
            "bias_dv": torch.zeros((), dtype=torch.float64, device=dev),
            "bias_dv_n": 0,
        }

    def _accumulate(self, losses: Tensor) -> None:
        a = self.acc
        a["loss"] += losses.detach().double()
        a["steps"] += 1
        last, plan = self.engine.last, self.engine.ctx.plan
        g = last.get("g_self")
        mv, dv = last.get("mv"), last.get("dv")
        # sums and element counts (not means) so that ranks' partial sums add up to the simulator's
        if g is not None and mv is not None and len(plan.in_dst):
            a["bias_mv"] += (mv - g.index_select(0, plan.in_dst)).abs().sum().double()
            a["bias_mv_n"] += mv.numel()
        if g is not None and dv is not None and len(plan.out_src):
            a["bias_dv"] += (dv - g.index_select(0, plan.out_src)).abs().sum().double()
            a["bias_dv_n"] += dv.numel()

    # -------------------------------------------------------------- batches
    def _batches(self) -> list[tuple[Tensor, Tensor]]:
        p, dev = self.p, self.p.device
        out = []
        for stream, gen in zip(self.streams, self.aug_gens, strict=True):
            idx = stream.next(self.batch_size).to(dev)
            xb, yb = p.x_train.index_select(0, idx), p.y_train.index_select(0, idx)
            if p.augment is not None:
                xb = p.augment(xb, generator=gen)
            out.append((xb, yb))
        return out

    # -------------------------------------------------------------- evaluation record
    def _evaluate(self, t0: float, steps_at_t0: int) -> dict[str, Any] | None:
        """The metrics record of the current step (None on ranks other than 0)."""
        a = self.acc
        ev = self._gather_eval() if self.dist else self._local_eval()
        if ev is None:
            self._reset_accumulators()
            return None
        ev, agents, bias, stats = ev
        self.stats = stats
        now = time.perf_counter()
        wall = self.elapsed + (now - t0)
        done = self.step - steps_at_t0
        agents = agents if a["steps"] else None
        rec = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 6),
            "lr": self.engine.lr,
            **{k: v for k, v in ev.items() if k != "consensus_distance"},
            "train_loss": (sum(agents) / len(agents)) if agents else None,
            "train_loss_agents": agents,
            "consensus_distance": ev["consensus_distance"],
            "bias_mv": bias[0] / bias[1] if bias[1] else None,
            "bias_dv": bias[2] / bias[3] if bias[3] else None,
            "bytes_round1": stats["bytes_per_agent_per_step"][0] if self.step else 0.0,
            "bytes_round2": stats["bytes_per_agent_per_step"][1] if self.step else 0.0,
            "grad_evals": stats["grad_evals"],
            "grad_evals_per_agent_per_step": stats["grad_evals_per_agent_per_step"] if self.step else 0.0,
            "qp_failures": stats["qp_failures"],
            "wall_time_s": wall,
            "steps_per_s": done / (now - t0) if done and now > t0 else None,
            "peak_mem_mb": peak_memory_mb(self.p.device),
        }
        self._reset_accumulators()
        return rec

    def _local_eval(self) -> tuple[dict[str, Any], list[float], list[float], dict[str, Any]]:
        a, sim = self.acc, self.sim
        ev = evaluate(sim, self.p.x_test, self.p.y_test, self.cfg.training.eval_batch_size)
        ev["consensus_distance"] = sim.consensus_distance()
        agents = (a["loss"] / max(a["steps"], 1)).tolist()
        bias = [float(a["bias_mv"]), a["bias_mv_n"], float(a["bias_dv"]), a["bias_dv_n"]]
        return ev, agents, bias, sim.stats

    def _gather_eval(self) -> tuple[dict[str, Any], list[float], list[float], dict[str, Any]] | None:
        """Evaluation on the dist backend: each rank scores its own model, rank 0 the consensus model.

        Collectives, outside training steps: a gather of every rank's parameters and buffers (for
        the consensus model) and one of a small row of counters per rank.
        """
        from crossgrad.distributed import gather_rows, gather_state
        from crossgrad.simulator import run_stats

        a, e, tr = self.acc, self.engine, self.cfg.training
        x, y = self.p.x_test, self.p.y_test
        mine, _ = score_rows(self.p.model, e.layout, e.x, e.buffers, x, y, tr.eval_batch_size)
        counters = torch.tensor(
            [float(mine[0]), float(a["loss"][0]) / max(a["steps"], 1), float(a["bias_mv"]), a["bias_mv_n"],
             float(a["bias_dv"]), a["bias_dv_n"], e.stats.grad_evals, e.stats.qp_failures],
            dtype=torch.float64, device=e.x.device)
        rows = gather_rows(counters)
        state = gather_state(e)
        if state is None:
            return None
        rows = rows.cpu()
        xs, bufs = state["x"], state["buffers"]
        centre = xs.mean(0, keepdim=True)
        c_correct, c_loss = score_rows(self.p.model, e.layout, centre, consensus_buffers(bufs), x, y,
                                       tr.eval_batch_size)
        correct = torch.cat([rows[:, 0].round().long(), c_correct.cpu()])
        ev = accuracy_record(correct, float(c_loss[0]), len(y))
        ev["consensus_distance"] = float(((xs - centre) ** 2).sum(1).mean())
        stats = run_stats(e.stats.steps, int(rows[:, 6].sum()), state["bytes_sent"], int(rows[:, 7].sum()))
        bias = rows[:, 2:6].sum(0).tolist()
        return ev, rows[:, 1].tolist(), bias, stats

    # -------------------------------------------------------------- checkpoints
    def _local_state(self) -> dict[str, Any]:
        """The state of this process's agents: engine, batch streams, random generators, accumulators."""
        return {
            "sim": self.engine.state_dict(),
            "streams": [s.state_dict() for s in self.streams],
            "aug_gens": [g.get_state() for g in self.aug_gens],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.p.device.type == "cuda" else [],
            "acc": dict(self.acc),
        }

    def _load_local_state(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state["sim"])
        for s, st in zip(self.streams, state["streams"], strict=False):
            s.load_state_dict(st)
        for g, st in zip(self.aug_gens, state["aug_gens"], strict=False):
            g.set_state(st)
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and self.p.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        dev = self.engine.x.device
        self.acc = {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in state["acc"].items()}

    def state_dict(self) -> dict[str, Any] | None:
        """The whole run's state; on the dist backend a collective that returns it on rank 0 only.

        The simulator's checkpoint holds the local state at the top level; the dist backend's holds
        one local state per rank under "ranks" (rank r's at index r).
        """
        local = self._local_state()
        if self.dist:
            import torch.distributed as dist

            everyone = [None] * self.n if self.main else None
            dist.gather_object(_to_cpu(local), everyone, dst=0)
            if not self.main:
                return None
            local = {"ranks": everyone}
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "total_steps": self.total_steps,
            **local,
            "metrics": self.metrics,
            "elapsed": self.elapsed,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise RunError(
                f"checkpoint version {state.get('version')} is not supported (expected {CHECKPOINT_VERSION})"
            )
        self._load_local_state(state["ranks"][self.local[0]] if self.dist else state)
        self.step = int(state["step"])
        self.metrics = list(state["metrics"])
        self.elapsed = float(state["elapsed"])

    def save_checkpoint(self) -> None:
        state = self.state_dict()
        if state is not None:
            _atomic_write_bytes(self.run_dir / CHECKPOINT, lambda p: torch.save(state, p))

    def load_checkpoint(self) -> None:
        """Resume from the run directory's checkpoint; on the dist backend rank 0 reads and sends each rank its part."""
        if not self.dist:
            state = self._read_checkpoint()
            self._apply_checkpoint(state)
            return
        import torch.distributed as dist

        parts: list[Any] = [None] * self.n
        problem = None
        if self.main:
            try:
                state = self._read_checkpoint()
                common = {k: v for k, v in state.items() if k != "ranks"}
                parts = [{**common, "ranks": {r: part}} for r, part in enumerate(state["ranks"])]
            except RunError as e:
                problem = e
        problem = broadcast_from_main(problem)
        if problem is not None:
            raise problem
        got: list[Any] = [None]
        dist.scatter_object_list(got, parts if self.main else None, src=0)
        self._apply_checkpoint(got[0])

    def _apply_checkpoint(self, state: dict[str, Any]) -> None:
        path = self.run_dir / CHECKPOINT
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
            raise RunError(
                f"cannot resume from {path}: the checkpoint does not fit this run ({_one_line(e, 200)})"
            ) from None

    def _read_checkpoint(self) -> dict[str, Any]:
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            raise RunError(f"nothing to resume in {self.run_dir} (no {CHECKPOINT})")
        try:  # data only: a checkpoint whose pickle refers to any code is refused, never executed
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling problem means a bad file
            text = str(e)
            if "Weights only load failed" in text:
                glob = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
                m = re.search(r"WeightsUnpickler error:\s*([^\n]*)", text)
                detail = f"it refers to {glob.group(1)}" if glob else (m.group(1) if m else text)
                raise RunError(
                    f"cannot read {path}: it holds objects other than tensors and plain data "
                    f"({_one_line(detail, 200)}); refusing to load it (nothing in it was run)"
                ) from None
            reason = _one_line(text, 200) or "empty file"
            raise RunError(f"cannot read {path}: corrupt or truncated ({reason})") from None
        if not isinstance(state, dict):
            raise RunError(f"cannot read {path}: not a crossgrad checkpoint")
        self._check_state(state, path)
        return state

    def _check_state(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint that is not this run's, before touching any state."""
        if state.get("version") != CHECKPOINT_VERSION:
            raise RunError(
                f"{path}: checkpoint version {state.get('version')} is not supported (expected {CHECKPOINT_VERSION})"
            )
        mine, theirs = _comparable_config(self.cfg.to_dict()), _comparable_config(state.get("config"))
        if theirs is not None and mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise RunError(
                f"cannot resume from {path}: it was written by another configuration "
                f"(differs in {', '.join(diff[:6])}{', ...' if len(diff) > 6 else ''})"
            )
        local_keys = ("sim", "streams", "aug_gens", "torch_rng", "acc")
        missing = [k for k in ("step", "metrics", *(("ranks",) if self.dist else local_keys)) if k not in state]
        if missing:
            raise RunError(f"cannot resume from {path}: not a complete checkpoint (missing {', '.join(missing)})")
        step = state["step"]
        if not isinstance(step, int) or not 0 <= step <= self.total_steps:
            raise RunError(f"cannot resume from {path}: step {step!r} is outside this run's 0..{self.total_steps}")
        if self.dist:
            ranks = state["ranks"]
            if not isinstance(ranks, (list, tuple)) or len(ranks) != self.n:
                raise RunError(f"cannot resume from {path}: it does not hold one state per rank ({self.n})")
            locals_, per = list(ranks), 1
        else:
            locals_, per = [state], self.n
        for local in locals_:
            if not isinstance(local, dict) or any(k not in local for k in local_keys):
                raise RunError(f"cannot resume from {path}: not a complete checkpoint (a rank's state is incomplete)")
            for key in ("streams", "aug_gens"):
                if not isinstance(local[key], (list, tuple)) or len(local[key]) != per:
                    raise RunError(f"cannot resume from {path}: {key} is not one entry per agent ({self.n})")

    # -------------------------------------------------------------- summary
    def summary(self, status: str, message: str = "") -> dict[str, Any]:
        cfg = self.cfg
        stats = self.stats if self.dist else self.sim.stats  # dist: as of the last evaluation
        final = {k: v for k, v in (self.metrics[-1] if self.metrics else {}).items() if k != "local_acc"}
        accs = [m["consensus_acc"] for m in self.metrics if m.get("consensus_acc") is not None]
        bpas = stats["bytes_per_agent_per_step"] if self.step else [0.0, 0.0]
        return _jsonable(
            {
                "method": cfg.method,
                "setting": cfg.setting,
                "seed": cfg.training.seed,
                "status": status,
                "message": message,
                "algorithm": self.engine.algorithm.describe(),
                "steps": self.step,
                "total_steps": self.total_steps,
                "epochs": self.step / self.steps_per_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "final": final,
                "consensus_acc": final.get("consensus_acc"),
                "local_acc_mean": final.get("local_acc_mean"),
                "best_consensus_acc": max(accs) if accs else None,
                "bytes_per_agent_per_step": bpas,
                "bytes_per_agent_total": [b * self.step for b in bpas],
                "grad_evals": stats["grad_evals"],
                "grad_evals_per_agent_per_step": stats["grad_evals_per_agent_per_step"] if self.step else 0.0,
                "qp_failures": stats["qp_failures"],
                "wall_time_s": self.elapsed,
                "peak_mem_mb": peak_memory_mb(self.p.device),
                "shard_sizes": [len(s) for s in self.p.shards],
                "config": cfg.to_dict(),
            }
        )

    # -------------------------------------------------------------- the loop
    def _log(self, msg: str, bar: Any = None) -> None:
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)

    def _eval_line(self, rec: dict) -> str:
        tl = rec["train_loss"]
        return (
            f"[{self.run_dir.name}] epoch {rec['epoch']:g} step {rec['step']}: "
            f"consensus acc {100 * rec['consensus_acc']:.2f}% "
            f"local acc {100 * rec['local_acc_mean']:.2f}% "
            f"(min {100 * rec['local_acc_min']:.1f}, max {100 * rec['local_acc_max']:.1f}) "
            f"train loss {'-' if tl is None else f'{tl:.4f}'} "
            f"consensus dist {rec['consensus_distance']:.3g}"
        )

    def train(self, stop_after: int | None = None) -> RunResult:
        """Train to the end (or to `stop_after` total steps / Ctrl-C, then checkpoint and stop)."""
        from tqdm import tqdm

        cfg, tr = self.cfg, self.cfg.training
        eval_steps = tr.eval_every_steps or tr.eval_every * self.steps_per_epoch
        ckpt_steps = tr.checkpoint_every * self.steps_per_epoch if tr.checkpoint_every else 0
        metrics_path = self.run_dir / METRICS
        t0, steps_at_t0 = time.perf_counter(), self.step
        if self.step == 0 and not self.metrics:
            rec = self._evaluate(t0, steps_at_t0)
            if rec is not None:
                self.metrics.append(rec)
        if self.main:
            write_metrics(metrics_path, self.metrics)
        bar = None
        if not self.quiet and self.main:
            bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                unit="step",
                dynamic_ncols=True,
                desc=self.run_dir.name,
                file=sys.stderr,
                mininterval=0.5,
            )
        status, message = "completed", ""
        # Ctrl-C on the dist backend ends the processes (each rank would see it at another step);
        # the latest periodic checkpoint is what resumes
        interrupt = contextlib.nullcontext(None) if self.dist else _Interrupt()
        with interrupt as intr:
            try:
                while self.step < self.total_steps:
                    if (intr is not None and intr.hit) or (stop_after is not None and self.step >= stop_after):
                        status = "interrupted"
                        message = f"stopped at step {self.step} of {self.total_steps}"
                        break
                    self.engine.set_lr(lr_at(cfg, self.step, self.total_steps))
                    losses = self.engine.step(self._batches())
                    self.step += 1
                    self._accumulate(losses)
                    if bar is not None:
                        bar.update(1)
                        if self.step % 10 == 0 or self.step == self.total_steps:
                            bar.set_postfix(
                                epoch=f"{self.step / self.steps_per_epoch:.2f}",
                                loss=f"{float(losses.mean()):.4f}",
                                refresh=False,
                            )
                    if self.step % eval_steps == 0 or self.step == self.total_steps:
                        rec = self._evaluate(t0, steps_at_t0)
                        if rec is not None:
                            self.metrics.append(rec)
                            with open(metrics_path, "a", encoding="utf-8") as f:
                                f.write(json.dumps(_jsonable(rec)) + "\n")
                            if self.quiet or bar is not None:
                                self._log(self._eval_line(rec), bar)
                    if self.step == self.total_steps or (ckpt_steps and self.step % ckpt_steps == 0):
                        self.elapsed_now(t0)
                        t0, steps_at_t0 = time.perf_counter(), self.step
                        self.save_checkpoint()
            except NonFiniteError as e:
                status = "diverged"
                message = (
                    f"training diverged: non-finite {e.what} at step {e.step + 1} on agent {e.agent}"
                    f"; the last good checkpoint (if any) is kept in {self.run_dir / CHECKPOINT}"
                )
            finally:
                if bar is not None:
                    bar.close()
        if status == "interrupted":
            self.elapsed_now(t0)
            self.save_checkpoint()
            if self.main:
                write_metrics(metrics_path, self.metrics)
            message += f"; resume with: crossgrad run --resume {self.run_dir}"
            return RunResult(status, self.run_dir, None, message, self.main)
        if status == "diverged":
            self.elapsed_now(t0)
        summary = self.summary(status, message) if self.main else None
        if summary is not None:
            atomic_write_text(self.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
        return RunResult(status, self.run_dir, summary, message, self.main)

    def elapsed_now(self, t0: float) -> None:
        """Fold the wall time since t0 into `elapsed` (t0 is then restarted by the caller)."""
        self.elapsed += time.perf_counter() - t0


# ------------------------------------------------------------------------------ entry points
def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a collective; used for set-up and errors, never in training)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _open_run_dir(run_dir: Path, cfg: Config, *, resume: bool, overwrite: bool) -> None:
    """Check that `run_dir` may be trained in (the caller holds its lock); a new run also writes its config."""
    if resume:
        if (run_dir / SUMMARY).exists():
            raise RunError(f"{run_dir} is already finished ({SUMMARY} exists); nothing to resume")
        return
    if (run_dir / SUMMARY).exists() and not overwrite:
        raise RunError(f"{run_dir} already holds a finished run; pick another output.name or out_dir")
    if (run_dir / CHECKPOINT).exists() and not overwrite:
        raise RunError(f"{run_dir} holds an unfinished run; continue it with: crossgrad run --resume {run_dir}")
    for stale in (SUMMARY, CHECKPOINT, METRICS):
        (run_dir / stale).unlink(missing_ok=True)
    atomic_write_text(run_dir / CONFIG, dump_toml(cfg.to_dict()))


def _run_dist(cfg: Config, run_dir: Path, *, quiet: bool, stop_after: int | None, resume: bool,
              overwrite: bool = False) -> RunResult:
    """One rank of a dist-backend run (launched by torchrun, one process per agent)."""
    import torch.distributed as dist

    from crossgrad.distributed import CommTimeoutError, init_from_env, shutdown

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "backend 'dist' runs one process per agent: launch it with "
            f"torchrun --nproc-per-node {cfg.topology.n_agents} -m crossgrad run ... (see docs/distributed.md)"
        )
    world = int(os.environ["WORLD_SIZE"])
    if world != cfg.topology.n_agents:
        raise ConfigError(
            f"backend 'dist' needs one process per agent: {world} processes were launched for "
            f"{cfg.topology.n_agents} agents (torchrun --nproc-per-node / --nnodes)"
        )
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    device = init_from_env("gloo" if cfg.training.device == "cpu" else None, timeout=cfg.training.comm_timeout)
    try:
        prepared = prepare(cfg, device=device)
        main = dist.get_rank() == 0
        with contextlib.ExitStack() as stack:
            problem = None
            if main:  # only rank 0 touches the run directory; the others hear its verdict
                try:
                    stack.enter_context(claim_run_dir(run_dir))
                    _open_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
                except RunError as e:
                    problem = e
            problem = broadcast_from_main(problem)
            if problem is not None:
                raise problem
            trainer = Trainer(cfg, run_dir, quiet=quiet, prepared=prepared)
            if resume:
                trainer.load_checkpoint()
            try:
                return trainer.train(stop_after=stop_after)
            except CommTimeoutError as e:
                return RunResult("failed", run_dir, None, f"{e}; the latest checkpoint (if any) is kept", main)
    finally:
        shutdown()


LOCK = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(run_dir: Path) -> int | None:
    """The live process that holds `run_dir` (its pid, or -1 if not known yet), or None."""
    import fcntl

    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:  # a shared probe: it succeeds only if nobody holds the exclusive lock
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            pass  # held
        else:
            return None
        try:
            pid = int(os.read(fd, 32).decode().strip() or -1)
        except ValueError:
            pid = -1
        return pid if pid == -1 or _pid_alive(pid) else -1
    finally:
        os.close(fd)  # also drops the probe


@contextmanager
def claim_run_dir(run_dir: Path):
    """Only one process trains in a run directory at a time; a dead process's lock is taken over.

    The lock is an exclusive `flock` on `.lock` (which also records the holder's pid for messages
    and `lock_holder`). The kernel drops it when its process dies, even by SIGKILL, so there is no
    stale-lock guesswork and no window in which two processes both believe they hold the directory:
    two sweeps sharing an output folder never write the same run's files at once; the second one
    is told the run is busy.
    """
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    waits = [0.01, 0.05, 0.2]  # a `lock_holder` probe holds the lock for a moment: look again
    for _ in range(100):
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            if waits:
                time.sleep(waits.pop(0))
                continue
            holder = lock_holder(run_dir)
            who = f"process {holder}" if holder is not None and holder > 0 else "another process"
            raise RunBusyError(f"{run_dir} is in use by {who}; wait for it to finish or stop it") from None
        try:  # the previous holder may have removed the file between our open and flock: open it again
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    else:
        raise RunError(f"cannot lock {run_dir}")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        for tmp in run_dir.glob(".*.tmp*"):  # half-written files of a process killed while saving
            tmp.unlink(missing_ok=True)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding the lock (see the inode check above)
        os.close(fd)


def run_experiment(
    cfg: Config, *, quiet: bool = False, stop_after: int | None = None, overwrite: bool = False
) -> RunResult:
    """Run one configured experiment into output.out_dir/<name>; a finished run there is an error."""
    cfg.validate()
    run_dir = Path(cfg.output.out_dir) / cfg.run_name()
    if cfg.backend == "dist":
        return _run_dist(cfg, run_dir, quiet=quiet, stop_after=stop_after, resume=False, overwrite=overwrite)
    prepared = prepare(cfg)  # validate everything before touching the run directory
    with claim_run_dir(run_dir):
        _open_run_dir(run_dir, cfg, resume=False, overwrite=overwrite)
        trainer = Trainer(cfg, run_dir, quiet=quiet, prepared=prepared)
        return trainer.train(stop_after=stop_after)


def resume_experiment(
    run_dir: str | Path, *, quiet: bool = False, stop_after: int | None = None
) -> RunResult:
    """Continue an interrupted run from its checkpoint; the result equals an uninterrupted run (CPU)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"cannot resume: {run_dir} is not a directory")
    cfg = load_run_config(run_dir)
    if cfg.backend == "dist":
        return _run_dist(cfg, run_dir, quiet=quiet, stop_after=stop_after, resume=True)
    with claim_run_dir(run_dir):
        _open_run_dir(run_dir, cfg, resume=True, overwrite=False)
        trainer = Trainer(cfg, run_dir, quiet=quiet)
        trainer.load_checkpoint()
        return trainer.train(stop_after=stop_after)
