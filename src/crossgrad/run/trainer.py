"""The training loop, written once for every backend, and the entry points `run_experiment` / `resume_experiment`.

The trainer holds the engine of this process's agents and talks to a cluster (crossgrad.run.cluster)
for everything that involves the other processes; it never asks which backend it runs on. Each
step: set the learning rate, one engine step on the local agents' batches, add to the running
totals. At sync points (every `cluster.sync_every` steps, and at every evaluation, checkpoint and
stop) the processes agree on two flags: a NaN/Inf seen by any agent (the engine records it and
keeps communicating, so no peer mistakes it for a network failure) and a Ctrl-C. A divergence
ends the run before anything non-finite is evaluated or saved, naming the earliest failing step
and agent; a Ctrl-C ends it after the step's evaluation and with a checkpoint.

Statuses: "completed"; "stopped" (`stop_after` reached: checkpoint written, exit 0); "interrupted"
(Ctrl-C: checkpoint written, exit 130); "terminated" (SIGTERM: in the simulator like Ctrl-C, exit 143;
under torchrun the process dies of the signal); "diverged" (exit 1); "failed" (a peer died or hung, exit 1).

The main process keeps status.json (crossgrad.run.rundir.status_record) saying where the run stands:
"running" from the start of training (with the step of the latest checkpoint), then, on every stop that
is not a completion, the stop's status, reason, step, checkpoint and the command that continues it; a
completed run removes it (its summary.json is the record). A diverged run's record is its summary.json.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crossgrad import console
from crossgrad.files import OutputError
from crossgrad.run.checkpoint import (
    environment,
    environment_changes,
    pack,
    read_checkpoint,
    split,
    write_checkpoint,
)
from crossgrad.run.cluster import Interrupt, open_cluster
from crossgrad.run.config import Config
from crossgrad.run.data import AgentBatches, Prepared, prepare
from crossgrad.run.evaluate import TrainTotals, evaluate, evaluate_after_gossip, gather_stats, peak_memory_mb
from crossgrad.run.reblock import reblock
from crossgrad.run.rundir import (
    CHECKPOINT,
    METRICS,
    SUMMARY,
    RunError,
    append_metrics,
    atomic_write_text,
    check_resumable,
    claim_run_dir,
    clear_status,
    holds_unfinished_run,
    jsonable,
    load_run_config,
    one_line,
    open_run_dir,
    status_record,
    write_metrics,
    write_status,
)
from crossgrad.run.scalars import ScalarLog
from crossgrad.run.schedule import gamma_at, lr_at, run_length
from crossgrad.topology.timevarying import is_time_varying


@dataclass
class RunResult:
    status: str  # "completed" | "stopped" | "interrupted" | "terminated" | "diverged" | "failed" (a peer died or hung)
    run_dir: Path
    summary: dict | None = None
    message: str = ""
    main: bool = True  # False on dist ranks other than 0, which write and report nothing on success
    said: bool = False  # the message is on stderr already (a failure: each rank's, before it can be killed)

    @property
    def exit_code(self) -> int:
        return {"completed": 0, "stopped": 0, "interrupted": 130, "terminated": 143, "diverged": 1}.get(self.status, 1)


@dataclass(frozen=True)
class Verdict:
    """What the processes agreed on at a sync point."""

    failure: tuple[int, int, str] | None  # the earliest (step, agent, what) that went non-finite
    interrupted: str | None  # the signal that asked for a stop ("SIGINT", "SIGTERM"), None if none did


def agents_total(blocks: list[list[float]]) -> float:
    """The sum of every agent's value, gathered as one list per process: added exactly (fsum), so it is the
    same however the agents are split over processes (per-process partial sums would round differently)."""
    return math.fsum(v for block in blocks for v in block)


class Trainer:
    """Trains one configured run in `run_dir` with the agents of `cluster` local to this process."""

    def __init__(self, cfg: Config, run_dir: Path, cluster: Any, prepared: Prepared, quiet: bool = False):
        self.cfg, self.run_dir, self.cluster, self.p, self.quiet = cfg, Path(run_dir), cluster, prepared, quiet
        tr = cfg.training
        self.engine = cluster.build_engine(prepared)
        self.batches = AgentBatches(prepared, cluster.local, tr.batch_size)
        self.totals = TrainTotals(len(cluster.local), self.engine.x.device)
        self.steps_per_epoch, self.total_steps = run_length(cfg, prepared.shards)
        self.step = 0
        self.saved_step: int | None = None  # the step of the checkpoint on disk (only ever a finite state)
        self.metrics: list[dict] = []
        self.elapsed = 0.0

    # -------------------------------------------------------------- checkpoints
    def _part(self) -> dict[str, Any]:
        """This process's share of the state: engine, batch streams, random generators, running totals."""
        return {
            "sim": self.engine.state_dict(),
            **self.batches.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.p.device.type == "cuda" else [],
            "acc": self.totals.state_dict(),
        }

    def _load_part(self, part: dict[str, Any]) -> None:
        self.engine.load_state_dict(part["sim"])
        self.batches.load_state_dict(part)
        torch.set_rng_state(part["torch_rng"])
        if part["cuda_rng"] and self.p.device.type == "cuda":
            torch.cuda.set_rng_state_all(part["cuda_rng"])
        self.totals.load_state_dict(part["acc"])

    def save_checkpoint(self) -> None:
        """Every process's part to the main one, which writes the file; all wait until it is on disk."""
        parts = self.cluster.gather_parts(self._part())
        if self.cluster.main:
            common = {"step": self.step, "epoch": self.step // self.steps_per_epoch, "total_steps": self.total_steps,
                      "metrics": self.metrics, "elapsed": self.elapsed, "config": self.cfg.to_dict(),
                      "environment": environment(self.p.device)}
            write_checkpoint(self.run_dir / CHECKPOINT, pack(common, parts))
            self.saved_step = self.step  # on disk now, whatever happens to the barrier
            self.record("running", "training", "")
        self.cluster.barrier()
        self.saved_step = self.step

    def load_checkpoint(self) -> None:
        """Resume from the run directory's checkpoint: the main process reads it and sends each process its part."""
        path, error, shares = self.run_dir / CHECKPOINT, None, None
        if self.cluster.main:
            try:
                state = read_checkpoint(path, self.cfg.to_dict(), self.total_steps, self.cluster.n)
                progress = {k: state[k] for k in ("step", "metrics", "elapsed")}
                changes = environment_changes(state.get("environment"), environment(self.p.device))
                if changes:  # e.g. other thread counts sum in another order: close, but not bit-identical
                    print(f"crossgrad: warning: resuming with {', '.join(changes)} (the checkpoint's "
                          "environment); the result may differ in the last bits from an uninterrupted run",
                          file=sys.stderr)
                shares = [{"progress": progress, "part": part} for part in self._recut(split(state))]
            except (RunError, KeyError) as e:
                error = e if isinstance(e, RunError) else RunError(f"cannot resume from {path}: missing {e}")
        self.cluster.broadcast_error(error)
        share = self.cluster.scatter_parts(shares)
        try:
            self._load_part(share["part"])
            self.step = int(share["progress"]["step"])
            self.saved_step = self.step
            self.metrics = list(share["progress"]["metrics"])
            self.elapsed = float(share["progress"]["elapsed"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
            raise RunError(
                f"cannot resume from {path}: the checkpoint does not fit this run ({one_line(e, 200)})"
            ) from None

    def _recut(self, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A checkpoint's parts for this run's number of processes: agent state is per agent (see reblock)."""
        if len(parts) != self.cluster.n_processes:
            self._say(f"[{self.run_dir.name}] the checkpoint was written by {len(parts)} process(es), this run has "
                      f"{self.cluster.n_processes}: its agents' state is re-cut for the new blocks")
        topo = self.p.topology
        return reblock(parts, self.cluster.n, None if is_time_varying(topo) else topo.edges,
                       self.cluster.n_processes, margin=float(getattr(self.p.algorithm, "margin", 0.0)))

    # -------------------------------------------------------------- status.json
    def record(self, status: str, reason: str, message: str) -> None:
        """Write where the run stands to status.json (the main process; the others touch no file)."""
        if self.cluster.main:
            write_status(self.run_dir, status_record(
                status, step=self.step, total_steps=self.total_steps, checkpoint_step=self.saved_step,
                reason=reason, message=message, command=self.cluster.continue_command(self.run_dir)))

    def _killed_by_launcher(self) -> None:
        """Under torchrun, SIGTERM ends this process at once (see cluster.Interrupt): say so in the run directory."""
        kept = ("no checkpoint had been written yet, so the same command starts the run again"
                if self.saved_step is None else
                f"the checkpoint of step {self.saved_step} is kept; continue with: "
                f"{self.cluster.continue_command(self.run_dir)} (or the first command again with --resume-if-exists)")
        self.record("terminated", "SIGTERM from the launcher",
                    f"stopped by SIGTERM from the launcher at step {self.step} of {self.total_steps} (torchrun stops "
                    f"the group when one of its processes fails); {kept}")

    # -------------------------------------------------------------- evaluation and summary
    def _evaluate(self, t0: float, steps_at_t0: int) -> dict[str, Any] | None:
        """The metrics record of the current step on the main process (None elsewhere); a collective."""
        out = evaluate(self.engine, self.p, self.cluster, self.totals, self.cfg.training.eval_batch_size)
        self.totals.reset()
        if out is None:
            return None
        ev, stats = out
        now, done = time.perf_counter(), self.step - steps_at_t0
        return {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 6),
            "lr": self.engine.lr,
            "gamma": self.engine.gamma,
            **{k: ev[k] for k in ("consensus_acc", "consensus_loss", "local_acc_mean", "local_acc_min",
                                  "local_acc_max", "local_acc", "train_loss", "train_loss_agents",
                                  "consensus_distance", "bias_mv", "bias_dv")},
            "bytes_round1": stats.bytes_per_agent_per_step[0],
            "bytes_round2": stats.bytes_per_agent_per_step[1],
            "grad_evals": stats.grad_evals,
            "grad_evals_per_agent_per_step": stats.grad_evals_per_agent_per_step,
            "qp_failures": stats.qp_failures,
            "wall_time_s": self.elapsed + (now - t0),
            "steps_per_s": done / (now - t0) if done and now > t0 else None,
            "peak_mem_mb": peak_memory_mb(self.p.device),
            **({} if self.engine.network is None else self.engine.network.metrics()),  # the same on every process
        }

    def summary(self, status: str, message: str = "") -> dict[str, Any] | None:
        """The run's headline numbers on the main process (None elsewhere); a collective."""
        stats = gather_stats(self.engine, self.cluster)
        if stats is None:
            return None
        cfg = self.cfg
        final = {k: v for k, v in (self.metrics[-1] if self.metrics else {}).items()
                 if k not in ("local_acc", "final_gossip_acc")}
        accs = [m["consensus_acc"] for m in self.metrics if m.get("consensus_acc") is not None]
        stats.steps = self.step  # a diverged run counts the steps before the failing one
        bpas = stats.bytes_per_agent_per_step
        return jsonable(
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
                "final_gossip_rounds": cfg.training.final_gossip_rounds,
                "final_gossip_acc_mean": final.get("final_gossip_acc_mean"),
                "best_consensus_acc": max(accs) if accs else None,
                "bytes_per_agent_per_step": bpas,
                "bytes_per_agent_total": [b * self.step for b in bpas],
                "grad_evals": stats.grad_evals,
                "grad_evals_per_agent_per_step": stats.grad_evals_per_agent_per_step,
                "qp_failures": stats.qp_failures,
                "wall_time_s": self.elapsed,
                "peak_mem_mb": peak_memory_mb(self.p.device),
                "shard_sizes": [len(s) for s in self.p.shards],
                "config": cfg.to_dict(),
            }
        )

    # -------------------------------------------------------------- the loop
    def _agree(self, intr: Interrupt, loss: bool = False) -> Verdict:
        """The flags of every process; with `loss`, also the sum of every agent's training losses so far
        (`self.loss_sum`, for steps.csv: one all-gather carries both)."""
        e = self.engine.nonfinite
        mine = (intr.hit, None if e is None else (e.step, e.agent, e.what),
                self.totals.loss.tolist() if loss else [])
        everyone = self.cluster.share(mine)
        if loss:
            self.loss_sum = agents_total([agents for _, _, agents in everyone])
        failures = [f for _, f, _ in everyone if f is not None]
        # the earliest step; within it an agent's own failure before what its neighbours received from it
        first = min(failures, key=lambda f: (f[0], "received" in f[2], f[1])) if failures else None
        return Verdict(first, next((hit for hit, _, _ in everyone if hit), None))

    def _log(self, rec: dict, bar: Any) -> None:
        tl = rec["train_loss"]
        line = (
            f"[{self.run_dir.name}] epoch {rec['epoch']:g} step {rec['step']}: "
            f"consensus acc {100 * rec['consensus_acc']:.2f}% "
            f"local acc {100 * rec['local_acc_mean']:.2f}% "
            f"(min {100 * rec['local_acc_min']:.1f}, max {100 * rec['local_acc_max']:.1f}) "
            f"train loss {'-' if tl is None else f'{tl:.4f}'} "
            f"consensus dist {rec['consensus_distance']:.3g}"
        )
        if "final_gossip_acc_mean" in rec:
            line += (f"; after {rec['final_gossip_rounds']} gossip rounds: local acc "
                     f"{100 * rec['final_gossip_acc_mean']:.2f}% (min {100 * rec['final_gossip_acc_min']:.1f})")
        if bar is not None:
            bar.write(line)
        else:
            print(line, flush=True)

    def _progress_bar(self) -> Any:
        if self.quiet or not self.cluster.main or not console.bars_wanted():
            return None  # then each evaluation's log line is the progress
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                    desc=self.run_dir.name, file=sys.stderr, mininterval=0.5)

    def train(self, stop_after: int | None = None) -> RunResult:
        """Train to the end, or to `stop_after` total steps or Ctrl-C (then checkpoint and stop)."""
        cfg, tr, cluster = self.cfg, self.cfg.training, self.cluster
        metrics_path = self.run_dir / METRICS
        t0, steps_at_t0 = time.perf_counter(), self.step
        self.record("running", "training", "")  # what a run killed without a word (SIGKILL) leaves
        if self.step == 0 and not self.metrics and tr.eval_at_start:
            self._say(f"[{self.run_dir.name}] step 0: evaluating the initial model on {len(self.p.y_test)} test "
                      "samples (training.eval_at_start=false skips this, training.eval_subset=N uses N samples)")
            rec = self._evaluate(t0, steps_at_t0)
            if rec is not None:
                self.metrics.append(rec)
            cluster.barrier()
        if cluster.main:
            write_metrics(metrics_path, self.metrics)
        scalars = ScalarLog(self.run_dir, cfg.output.tensorboard, self.step) if cluster.main else None
        with contextlib.closing(scalars) if scalars is not None else contextlib.nullcontext():
            return self._loop(stop_after, scalars, t0, steps_at_t0)

    def _say(self, text: str) -> None:
        """A status line on the main process, so that a long silence is explained (not with --quiet)."""
        if self.cluster.main and not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def _log_scalars(self, scalars: ScalarLog, t0: float) -> None:
        """One steps.csv row: every agent's mean training loss since the previous row, from the sums `_agree`
        just gathered."""
        loss_sum, steps = self.loss_sum, self.totals.steps
        done = steps - self._logged[1]
        if done:
            mean = (loss_sum - self._logged[0]) / (done * self.cluster.n)
            scalars.step(self.step, self.step / self.steps_per_epoch, self.engine.lr, mean,
                         self.elapsed + time.perf_counter() - t0)
        self._logged = (loss_sum, steps)

    def _held(self) -> list[bool] | None:
        """Which local agents' batch streams stand still this step: those network churn has away."""
        network = self.engine.network
        if network is None or not network.churn:
            return None
        away = network.absent(self.engine.stats.steps)
        return [bool(away[a]) for a in self.cluster.local]

    def _all_losses(self) -> float:
        """The sum of every agent's running training loss (a collective; exact, so layout-independent)."""
        return agents_total(self.cluster.share(self.totals.loss.tolist()))

    def _loop(self, stop_after: int | None, scalars: ScalarLog | None, t0: float, steps_at_t0: int) -> RunResult:
        cfg, tr, cluster = self.cfg, self.cfg.training, self.cluster
        epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        eval_steps = tr.eval_every_steps or tr.eval_every * self.steps_per_epoch
        ckpt_steps = tr.checkpoint_every * self.steps_per_epoch if tr.checkpoint_every else 0
        metrics_path = self.run_dir / METRICS
        self._logged, last_log = (self._all_losses(), self.totals.steps), self.step
        bar = self._progress_bar()
        status, verdict = "completed", Verdict(None, None)
        with cluster.interrupt(self.run_dir) as intr, (bar if bar is not None else contextlib.nullcontext()):
            if cluster.main:
                intr.before_death = self._killed_by_launcher
            while self.step < self.total_steps and not verdict.interrupted:
                if stop_after is not None and self.step >= stop_after:
                    status = "stopped"
                    break
                self.engine.set_lr(lr_at(cfg, self.step, self.total_steps))
                self.engine.set_gamma(gamma_at(cfg.algorithm.params, self.step // self.steps_per_epoch, epochs))
                # training.local_steps = H: one communicating step, then H - 1 local ones
                hold = self._held()  # churn's absent agents: their streams stand still
                batches = self.batches.next() if hold is None else self.batches.next(hold)
                losses = self.engine.step(batches, communicate=self.step % tr.local_steps == 0)
                self.step += 1
                evaluate_now = self.step % eval_steps == 0 or self.step == self.total_steps
                # the bias diagnostic costs passes over every [E, P] gradient block: sampled every
                # log_every steps and before each evaluation, never on the device every step
                self.totals.add(losses, self.engine, bias=evaluate_now or self.step % tr.log_every == 0)
                checkpoint_now = self.step == self.total_steps or (ckpt_steps and self.step % ckpt_steps == 0)
                if evaluate_now or checkpoint_now or self.step % cluster.sync_every == 0:
                    # on crossing a multiple of log_every, so a resumed run logs the steps an uninterrupted one does
                    log_now = self.step // tr.log_every > last_log // tr.log_every or evaluate_now
                    verdict = self._agree(intr, loss=log_now)
                    if verdict.failure is not None:
                        break
                    if log_now:
                        if scalars is not None:
                            self._log_scalars(scalars, t0)
                        last_log = self.step
                if bar is not None:
                    bar.update(1)
                    if self.step % 10 == 0 or self.step == self.total_steps:
                        bar.set_postfix(epoch=f"{self.step / self.steps_per_epoch:.2f}",
                                        loss=f"{float(losses.mean()):.4f}", refresh=False)
                if evaluate_now:
                    rec = self._evaluate(t0, steps_at_t0)
                    if self.step == self.total_steps and tr.final_gossip_rounds:
                        gossiped = evaluate_after_gossip(self.engine, self.p, cluster, tr.final_gossip_rounds,
                                                         tr.eval_batch_size)
                        if rec is not None:
                            rec.update(gossiped)
                    self._logged = (0.0, 0)  # the evaluation restarted the running totals
                    if rec is not None:
                        self.metrics.append(rec)
                        try:
                            append_metrics(metrics_path, rec)
                        except OutputError as e:  # a resumed run rewrites metrics.jsonl from its checkpoint
                            raise OutputError(f"{e}; {self._kept('the previous checkpoint')}") from None
                        if scalars is not None:
                            scalars.evaluation(rec)
                        self._log(rec, bar)
                    cluster.barrier()  # rank 0's evaluation must not count against the next round's time-out
                if checkpoint_now:
                    self.elapsed += time.perf_counter() - t0
                    t0, steps_at_t0 = time.perf_counter(), self.step
                    self.save_checkpoint()
            if verdict.failure is None and status == "stopped":
                verdict = self._agree(intr)  # never checkpoint a state that went non-finite since the last sync
        self.elapsed += time.perf_counter() - t0
        if verdict.failure is not None:
            step, agent, what = verdict.failure
            self.step = step
            message = (f"training diverged: non-finite {what} at step {step + 1} on agent {agent}; "
                       f"{self._kept('the last finite checkpoint')}; "
                       "a smaller algorithm.lr or algorithm.gamma usually helps")
            return self._finish("diverged", message)
        if (status == "stopped" or verdict.interrupted) and self.step < self.total_steps:
            self.save_checkpoint()
            if cluster.main:
                write_metrics(metrics_path, self.metrics)
            status, reason = STOPS.get(verdict.interrupted, ("stopped", f"--stop-after {stop_after}"))
            message = (f"stopped at step {self.step} of {self.total_steps} ({reason}); the checkpoint of step "
                       f"{self.step} is kept; resume with: {cluster.continue_command(self.run_dir)}")
            self.record(status, reason, message)
            return RunResult(status, self.run_dir, None, message, cluster.main)
        return self._finish("completed", "")

    def _kept(self, which: str) -> str:
        """What a run that ends now leaves to resume from."""
        if self.saved_step is None:
            return "no checkpoint had been written yet"
        return (f"{which} (step {self.saved_step}) is kept in {self.run_dir / CHECKPOINT} "
                f"(crossgrad run --resume {self.run_dir} continues from it)")

    def _finish(self, status: str, message: str) -> RunResult:
        summary = self.summary(status, message)
        if summary is not None:
            atomic_write_text(self.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
            clear_status(self.run_dir)  # the summary is the record of a run that ended with a verdict
        return RunResult(status, self.run_dir, summary, message, self.cluster.main)


#: a stop a signal asked for: its status and reason (a stop without one is --stop-after's)
STOPS = {"SIGINT": ("interrupted", "Ctrl-C (SIGINT)"), "SIGTERM": ("terminated", "SIGTERM")}


# ------------------------------------------------------------------------------ entry points
#: set by `crossgrad sweep --jobs k` for its runs: k of them share each GPU
GPU_SHARE_ENV = "CROSSGRAD_GPU_SHARE"


def share_gpu(device: torch.device) -> None:
    """Cap this process's CUDA memory at its share of the device when k sweep runs share it, so that one
    run's growth fails that run with an out-of-memory error instead of starving the others."""
    share = os.environ.get(GPU_SHARE_ENV)
    if share and device.type == "cuda":
        # a little under 1/k: each process also holds a CUDA context outside the allocator's count
        torch.cuda.set_per_process_memory_fraction(0.95 / int(share), device)


#: seconds of silence after which a start-up step says what it is doing
SLOW_S = 1.0


@contextlib.contextmanager
def say_if_slow(text: str | None):
    """Print `text` (on stderr) if the block is still running after SLOW_S: a slow data load is explained,
    while a fast one, or a bad input's one-line error, comes without it."""
    timer = threading.Timer(SLOW_S, lambda: print(text, file=sys.stderr, flush=True)) if text else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


def _run(cfg: Config, run_dir: Path, *, quiet: bool, stop_after: int | None, resume: bool,
         overwrite: bool = False) -> RunResult:
    with open_cluster(cfg) as cluster:
        share_gpu(cluster.device)
        try:
            return _train(cfg, run_dir, cluster, quiet=quiet, stop_after=stop_after, resume=resume,
                          overwrite=overwrite)
        except KeyboardInterrupt:  # outside the training loop (loading data, the first evaluation, a 2nd Ctrl-C)
            return RunResult("interrupted", run_dir, None, _outside_message(run_dir), cluster.main)


def _outside_message(run_dir: Path) -> str:
    kept = (f"its last checkpoint is kept; resume with: crossgrad run --resume {run_dir}"
            if (run_dir / CHECKPOINT).is_file()
            else "no checkpoint had been written, so there is nothing to resume: run the same command again")
    return f"interrupted outside a training step; {kept}"


def _train(cfg: Config, run_dir: Path, cluster: Any, *, quiet: bool, stop_after: int | None, resume: bool,
           overwrite: bool) -> RunResult:
    loading = f"[{run_dir.name}] loading {cfg.data.name} and building the run"
    with say_if_slow(loading if cluster.main and not quiet else None):
        prepared = prepare(cfg, cluster.device, quiet=quiet)  # validated before the run directory is touched
    warning = prepared.topology.consensus_warning(prepared.algorithm.gamma)
    if warning and cluster.main:
        print(f"crossgrad: warning: {warning}", file=sys.stderr)
    # a restarted torchrun worker group reruns the first command line: it continues the run, never replaces it
    auto = not resume and (cluster.restarts > 0 or (cfg.output.resume == "auto" and not overwrite))
    overwrite = overwrite and not cluster.restarts
    with contextlib.ExitStack() as stack:
        error = None
        if cluster.main:  # only the main process touches the run directory; the others hear its verdict
            try:
                stack.enter_context(claim_run_dir(run_dir))
                resume = resume or (auto and holds_unfinished_run(run_dir))
                open_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
            except (RunError, OutputError) as e:
                error = e
        cluster.broadcast_error(error)
        if auto:
            resume = cluster.share(resume)[0]  # what the main process found in the run directory
        trainer = Trainer(cfg, run_dir, cluster, prepared, quiet=quiet)
        try:
            if resume:
                trainer.load_checkpoint()
                if auto:
                    why = f" (torchrun restart {cluster.restarts})" if cluster.restarts else ""
                    trainer._say(f"[{run_dir.name}] continuing the unfinished run from its checkpoint at step "
                                 f"{trainer.step}{why}")
            return trainer.train(stop_after=stop_after)
        except cluster.failures as e:
            message = _failure_message(e, trainer.saved_step, cluster.continue_command(run_dir))
            # at once: torchrun sends SIGTERM to the group when the first rank exits, and the process group's
            # teardown on the way to the command line's report can take longer than that
            print(f"crossgrad: {message}", file=sys.stderr, flush=True)
            trainer.record("failed", message.partition("; ")[0], message)
            return RunResult("failed", run_dir, None, message, cluster.main, said=True)
        except KeyboardInterrupt:  # a second Ctrl-C (or SIGTERM) while stopping, or one outside the training loop
            # (a resumption interrupted while loading its checkpoint keeps the record of the stop it resumes)
            if trainer.saved_step is not None or not (run_dir / CHECKPOINT).is_file():
                trainer.record("interrupted", "Ctrl-C outside a training step, or a second signal while stopping",
                               _outside_message(run_dir))
            raise


def _failure_message(e: BaseException, saved_step: int | None, command: str) -> str:
    """A peer died or hung: the cause first (which peer, silent or gone), then who saw it, then how to go on
    (`command`: the cluster's continue_command)."""
    from crossgrad.comm.dist import CommTimeoutError, label

    head = (f"cause: {e.detail}; seen by {label(e.rank, e.spans)} in {e.round_name}"
            if isinstance(e, CommTimeoutError) else str(e))
    kept = ("no checkpoint had been written yet" if saved_step is None else
            f"the checkpoint of step {saved_step} is kept: torchrun --max-restarts continues from it by itself, "
            f"or continue with: {command}")
    return f"{head}; {kept}"


def run_experiment(
    cfg: Config, *, quiet: bool = False, stop_after: int | None = None, overwrite: bool = False
) -> RunResult:
    """Run one configured experiment into output.out_dir/<name>; a finished run there is an error."""
    cfg.validate()
    run_dir = Path(cfg.output.out_dir) / cfg.run_name()
    return _run(cfg, run_dir, quiet=quiet, stop_after=stop_after, resume=False, overwrite=overwrite)


def resume_experiment(run_dir: str | Path, *, quiet: bool = False, stop_after: int | None = None,
                      backend: str | None = None) -> RunResult:
    """Continue a stopped or interrupted run from its checkpoint; the result equals an uninterrupted run (CPU).

    `backend` ("sim" or "dist") runs it on another backend than the one that wrote it; the checkpoint's
    agent state is re-cut for this run's number of processes.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"cannot resume: {run_dir} is not a directory")
    cfg = load_run_config(run_dir)
    if backend is not None:
        cfg.backend = backend
        cfg.validate()
    check_resumable(run_dir)  # before loading the data, which takes minutes for CIFAR-10
    return _run(cfg, run_dir, quiet=quiet, stop_after=stop_after, resume=True)
