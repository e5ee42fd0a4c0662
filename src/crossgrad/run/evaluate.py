"""Evaluation: every agent's model and the consensus model on the test set, and the run's counters.

Each process scores its own agents' models; the rows, buffers and counters are then gathered on
the main process (through the cluster, see crossgrad.run.cluster), which scores the consensus
model (the exact average of all agents' parameters) and builds the metrics record.
"""
from __future__ import annotations

import copy
import resource
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

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
#: keys the last record adds with training.final_gossip_rounds = K > 0 (the agents after K gossip-only rounds)
FINAL_GOSSIP_KEYS = ("final_gossip_rounds", "final_gossip_acc_mean", "final_gossip_acc_min", "final_gossip_acc_max",
                     "final_gossip_acc", "final_gossip_consensus_distance")
#: metrics that depend on the machine and the clock (not compared between runs)
TIMING_KEYS = ("wall_time_s", "steps_per_s", "peak_mem_mb")


@torch.no_grad()
def score_rows(model: torch.nn.Module, layout: Any, rows: Tensor, buffers: list[Tensor], x: Tensor, y: Tensor,
               batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Test-set (correct predictions, summed loss) of k models that share `model`'s architecture.

    rows: [k, P] flat parameters; buffers: one [k, *shape] tensor per model buffer (batch-norm
    statistics). Buffer-free models are evaluated together with torch.func.vmap.
    """
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


def identical(rows: Tensor, buffers: list[Tensor]) -> bool:
    """Whether all k models are the same (every run's step 0: the agents start from one initialisation)."""
    return rows.shape[0] > 1 and bool((rows == rows[:1]).all()) and all(bool((b == b[:1]).all()) for b in buffers)


def score_models(model: torch.nn.Module, layout: Any, rows: Tensor, buffers: list[Tensor], x: Tensor, y: Tensor,
                 batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """score_rows, scoring identical models once: at step 0 that divides the evaluation's cost by k."""
    if identical(rows, buffers):
        correct, loss = score_rows(model, layout, rows[:1], [b[:1] for b in buffers], x, y, batch_size)
        k = rows.shape[0]
        return correct.expand(k).clone(), loss.expand(k).clone()
    return score_rows(model, layout, rows, buffers, x, y, batch_size)


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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class TrainTotals:
    """Running sums between two evaluations: each local agent's training loss and the cross-gradient bias.

    Sums per agent and element counts (not means): the bias sums are kept per local agent (the edges an
    agent receives on, or sends on) and added up in agent order once gathered, so that they are the
    simulator's bit for bit however the agents are placed on processes.
    """

    def __init__(self, n_local: int, device: torch.device):
        self.n_local, self.device = n_local, device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros(self.n_local, dtype=torch.float64, device=self.device)
        self.steps = 0
        sums = torch.zeros(self.n_local, dtype=torch.float64, device=self.device)
        self.bias = [sums, 0, sums.clone(), 0]  # |mv - g| sums per agent, count, |dv - g| sums per agent, count

    def add(self, losses: Tensor, engine: Any, bias: bool = True) -> None:
        """A step's losses; with `bias`, also its cross-gradient bias (a mean over the steps sampled)."""
        self.loss += losses.detach().double()
        self.steps += 1
        if not bias:
            return
        last, plan = engine.last, engine.ctx.plan
        g, mv, dv = last.get("g_self"), last.get("mv"), last.get("dv")
        # one sum per edge row, added to its agent's in edge order: the same numbers in the same order on any layout
        if g is not None and mv is not None and len(plan.in_dst):
            owner = plan.in_dst.to(mv.device)
            self.bias[0].index_add_(0, owner, (mv - g.index_select(0, owner)).abs().sum(1).double())
            self.bias[1] += mv.numel()
        if g is not None and dv is not None and len(plan.out_src):
            owner = plan.out_src.to(dv.device)
            self.bias[2].index_add_(0, owner, (dv - g.index_select(0, owner)).abs().sum(1).double())
            self.bias[3] += dv.numel()

    def mean_loss(self) -> Tensor:
        return self.loss / max(self.steps, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.clone(), "steps": self.steps, "bias_mv": self.bias[0].clone(),
                "bias_mv_n": self.bias[1], "bias_dv": self.bias[2].clone(), "bias_dv_n": self.bias[3]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss = state["loss"].to(self.device)
        self.steps = int(state["steps"])
        self.bias = [self._sums(state["bias_mv"]), int(state["bias_mv_n"]),
                     self._sums(state["bias_dv"]), int(state["bias_dv_n"])]

    def _sums(self, saved: Tensor) -> Tensor:
        """Per-agent bias sums from a checkpoint; one saved before they were per agent holds the process's
        total, which goes to its first agent (the sum over agents is what the metric reads)."""
        if saved.dim() == 0:
            sums = torch.zeros(self.n_local, dtype=torch.float64, device=self.device)
            sums[0] = saved
            return sums
        return saved.to(self.device)


@dataclass
class RunStats:
    """Counters of all n agents: steps, gradient evaluations, bytes sent per round, QP failures."""

    steps: int
    n: int
    grad_evals: int
    bytes_sent: Tensor  # [n, 2]
    qp_failures: int

    @property
    def bytes_per_agent_per_step(self) -> list[float]:
        return (self.bytes_sent.double().mean(0) / max(self.steps, 1)).tolist() if self.steps else [0.0, 0.0]

    @property
    def grad_evals_per_agent_per_step(self) -> float:
        return self.grad_evals / (self.steps * self.n) if self.steps else 0.0


def gather_stats(engine: Any, cluster: Any) -> RunStats | None:
    """All agents' counters on the main process (None elsewhere); a collective on every process."""
    e, dev = engine, engine.x.device
    mine = torch.tensor([[e.stats.grad_evals, e.stats.qp_failures]], dtype=torch.float64, device=dev)
    counters = cluster.gather(mine)
    sent = cluster.gather(e.comm.bytes_sent.to(dev))
    if counters is None:
        return None
    total = counters.sum(0).tolist()
    return RunStats(e.stats.steps, len(sent), int(total[0]), sent.cpu(), int(total[1]))


def gossiped_models(engine: Any, rounds: int) -> Tensor:
    """The local agents' models after `rounds` gossip-only rounds x <- P x from the engine's rows, P the run's
    gossip matrix (1 - gamma) I + gamma W (gamma as in force at the end), uncompressed for every algorithm; on
    a time-varying topology round k uses the graph of step steps + k, the steps that would follow. A collective
    under torch.distributed.

    The engine is left as it was, its byte counters included: these rounds are not training steps.
    """
    e = engine
    comm = e.comm
    counters = {k: getattr(comm, k).clone() for k in ("bytes_sent", "wire_bytes") if hasattr(comm, k)}
    steps = e.stats.steps
    if e.time_varying:  # the engine builds (and caches) the wiring of each step's graph
        mixes = (e.wirings.at(steps + k, current=e.wiring).mix for k in range(rounds))
    else:
        mixes = (e.wiring.mix for _ in range(rounds))
    models = e.algorithm.gossip_only(e.x, e.algo_state, mixes)
    for k, saved in counters.items():  # one set of counters for all of a run's graphs (RUN_WIDE)
        getattr(comm, k).copy_(saved)
    return models


@torch.no_grad()
def evaluate_after_gossip(engine: Any, p: Any, cluster: Any, rounds: int, batch_size: int) -> dict | None:
    """Every agent's test accuracy after `rounds` gossip-only rounds (gossiped_models), with their consensus
    distance, on the main process (None elsewhere); a collective. The consensus model is not re-scored: a
    doubly stochastic P keeps the agents' mean."""
    e, x, y = engine, p.x_test, p.y_test
    models = gossiped_models(e, rounds)
    correct, _ = score_models(p.model, e.layout, models, e.buffers, x, y, batch_size)
    per_agent = cluster.gather(correct.double())
    xs = cluster.gather(models)
    if per_agent is None:
        return None
    acc = (per_agent.cpu() / len(y)).tolist()
    return {
        "final_gossip_rounds": rounds,
        "final_gossip_acc_mean": sum(acc) / len(acc),
        "final_gossip_acc_min": min(acc),
        "final_gossip_acc_max": max(acc),
        "final_gossip_acc": acc,
        "final_gossip_consensus_distance": float(((xs - xs.mean(0, keepdim=True)) ** 2).sum(1).mean()),
    }


@torch.no_grad()
def evaluate(engine: Any, p: Any, cluster: Any, totals: TrainTotals, batch_size: int) -> tuple[dict, RunStats] | None:
    """Accuracies, losses, consensus distance and bias of all agents, on the main process (None elsewhere).

    Each process scores its own agents; the main one also gathers every model for the consensus.
    A collective: every process calls it at the same step.
    """
    e, x, y = engine, p.x_test, p.y_test
    models = e.models()  # the agents' models: push-sum's de-biased x / w, else the rows x themselves
    correct, loss = score_models(p.model, e.layout, models, e.buffers, x, y, batch_size)
    per_agent = cluster.gather(torch.stack([correct.double(), totals.mean_loss()], 1))
    b = totals.bias
    bias = cluster.gather(torch.stack([b[0], b[2]], 1))  # per agent: summed in agent order below
    counts = cluster.gather(torch.tensor([[b[1], b[3]]], dtype=torch.float64, device=e.x.device))
    xs = cluster.gather(models)
    bufs = [cluster.gather(buf) for buf in e.buffers]
    stats = gather_stats(e, cluster)
    if stats is None:
        return None
    centre = xs.mean(0, keepdim=True)
    if identical(xs, bufs):  # the consensus model is every agent's model, already scored
        c_correct, c_loss = correct[:1], loss[:1]
    else:
        c_correct, c_loss = score_rows(p.model, e.layout, centre, consensus_buffers(bufs), x, y, batch_size)
    per_agent, bias, counts = per_agent.cpu(), bias.sum(0).tolist(), counts.sum(0).tolist()
    ev = accuracy_record(torch.cat([per_agent[:, 0].round().long(), c_correct.cpu()]), float(c_loss[0]), len(y))
    losses = per_agent[:, 1].tolist() if totals.steps else None
    ev.update(
        train_loss=(sum(losses) / len(losses)) if losses else None,
        train_loss_agents=losses,
        consensus_distance=float(((xs - centre) ** 2).sum(1).mean()),
        bias_mv=bias[0] / counts[0] if counts[0] else None,
        bias_dv=bias[1] / counts[1] if counts[1] else None,
    )
    return ev, stats
