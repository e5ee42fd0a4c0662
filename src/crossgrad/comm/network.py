"""An unreliable network and simulated time, beside the Comm layer: which messages of a step arrive, and
how long the step would take on real links.

The backends still move every message (the simulator by indexing, torch.distributed point to point);
this model decides which of them *arrive*. Every decision is drawn from a counter-based hash of
(seed, step, round, sender, receiver) — no generator whose state would have to travel — so the
simulator, torch.distributed with any number of agents per process, and a run resumed at any step
lose exactly the same messages. Each process computes the whole network's decisions (a few hashes
per edge and step), so counters and simulated time agree on every process without communicating.

What the engine and the algorithms see is a `Delivery` per step (which of the local agents'
messages of rounds 1 and 2 arrived); what a missing message *means* is each algorithm's decision,
in its `reweight` hook (crossgrad.algorithms.base), which this module applies to the step's
gossip and combine weights. A step in which everything arrives uses the wiring unchanged, so a
`[network]` section that loses nothing trains bit for bit as a run without one.

Churn (agents that leave and come back) is drawn the same way, per agent and step. An absent agent's messages,
both ways, are not sent, so its neighbours re-weight as for drops; the engine leaves the absent agents' whole
state as it was (`Engine._agent_rows`) and the runner holds their batch streams; with rejoin = "neighbor" a
returning agent takes the round-1 model of its lowest-numbered in-neighbour that reaches it.

Simulated time of a synchronous step: round 1 (the slowest message: its link's latency plus its
bytes over the link's bandwidth), then the slowest agent's compute (its gradient evaluations times
`compute_ms` times its straggler factor), then round 2 the same way. A lost message still occupies
its link until it would have arrived (the receiver waits that long before it knows), so it counts.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crossgrad.errors import ConfigError

#: metrics.jsonl keys of a run with a [network] section (absent from runs without one)
NETWORK_KEYS = ("sim_time_s", "messages_sent", "messages_dropped", "links_down", "agents_present")

#: what a returning agent starts from (network.churn.rejoin)
REJOIN = ("own", "neighbor")

# hash streams: one per kind of decision, so that no two decisions share a draw
_ROUND1, _ROUND2, _LINK_FAIL, _LINK_REPAIR, _LEAVE, _RETURN = 1, 2, 3, 4, 5, 6
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrap-around arithmetic is defined for numpy's unsigned ints)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, step: int, stream: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) per (src[e], dst[e]), a pure function of (seed, step, stream, src, dst)."""
    key = np.full(len(src), seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
    for part in (np.uint64(step), np.uint64(stream), src.astype(np.uint64), dst.astype(np.uint64)):
        key = _mix(key ^ part)
    return (key >> np.uint64(11)).astype(np.float64) * 2.0**-53  # the top 53 bits: exact in a double


def _number(where: str, value: Any, low: float = 0.0, high: float | None = None, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, not {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or (open_low and v == low) or (high is not None and v > high):
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        raise ConfigError(f"{where} must be a finite number {bound}" + (f" and <= {high:g}" if high is not None else "")
                          + f", not {value!r}")
    return v


def _int(where: str, value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where} must be an integer >= {low}, not {value!r}")
    return value


def _table(where: str, value: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table ({', '.join(keys)}), not {value!r}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}; {where} takes: {', '.join(keys)}")
    return value


@dataclass
class NetworkConfig:
    """The `[network]` section. Everything is off by default; see docs/network.md.

    drop_prob: each message (every round, every edge) is lost independently with this probability.
    link_failures: {rate, mean_down} (an up link fails at a step with probability rate and stays down a
    geometric number of steps of mean mean_down) or {schedule = [[i, j, start, end], ...]} (the link
    i-j is down for steps start <= t < end); a down link loses every message on it, both ways.
    stragglers: one compute slow-down factor per agent, or {distribution = "lognormal", sigma} /
    {distribution = "uniform", low, high}, drawn once per agent from the seed.
    compute_ms: one gradient evaluation on one agent; latency_ms, bandwidth_mbps: every link's, or
    the path of a file of lines "i j value" (the link i-j, both ways; relative to the config file).
    churn: {rate, mean_absence} (a present agent leaves at a step with probability rate and stays away a
    geometric number of steps of mean mean_absence) or {schedule = [[agent, start, end], ...]} (away for
    steps start <= t < end), and rejoin = "own" (default: it resumes from its own state) or "neighbor"
    (it first copies the model of its lowest-numbered in-neighbour whose round-1 message reaches it).
    seed: of every draw (default: training.seed).
    """

    drop_prob: float = 0.0
    link_failures: dict = field(default_factory=dict)
    churn: dict = field(default_factory=dict)
    stragglers: Any = None
    compute_ms: float = 0.0
    latency_ms: Any = 0.0
    bandwidth_mbps: Any = None
    seed: int | None = None

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> NetworkConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: [network] must be a table")
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                raise ConfigError(f"{source}: unknown key network.{key}; [network] takes: {', '.join(known)}")
        return cls(**data)  # validated with the whole config, once its file paths are resolved

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self, n_agents: int | None = None) -> NetworkConfig:
        """One ConfigError naming the key for any bad value; `n_agents` checks per-agent lists."""
        self.drop_prob = _number("network.drop_prob", self.drop_prob, 0.0, 1.0)
        if self.drop_prob == 1.0:
            raise ConfigError("network.drop_prob must be below 1 (with 1 no message ever arrives), not 1")
        self.compute_ms = _number("network.compute_ms", self.compute_ms)
        if self.seed is not None:
            _int("network.seed", self.seed)
            if self.seed >= 2**63:
                raise ConfigError(f"network.seed must be below 2**63, not {self.seed}")
        lf = _table("network.link_failures", self.link_failures, ("rate", "mean_down", "schedule"))
        if "schedule" in lf:
            if set(lf) != {"schedule"}:
                raise ConfigError("network.link_failures takes either a schedule or rate and mean_down, not both")
            _schedule("network.link_failures.schedule", lf["schedule"], 4, n_agents)
        elif lf:
            if set(lf) != {"rate", "mean_down"}:
                raise ConfigError("network.link_failures needs both rate and mean_down (steps), or a schedule")
            lf["rate"] = _number("network.link_failures.rate", lf["rate"], 0.0, 1.0)
            lf["mean_down"] = _number("network.link_failures.mean_down", lf["mean_down"], 1.0)
        churn = _table("network.churn", self.churn, ("rate", "mean_absence", "schedule", "rejoin"))
        rejoin = churn.get("rejoin", "own")
        if rejoin not in REJOIN:
            raise ConfigError(f"network.churn.rejoin must be 'own' or 'neighbor', not {rejoin!r}")
        kinds = set(churn) - {"rejoin"}
        if "schedule" in kinds:
            if kinds != {"schedule"}:
                raise ConfigError("network.churn takes either a schedule or rate and mean_absence, not both")
            _schedule("network.churn.schedule", churn["schedule"], 3, n_agents)
        elif kinds != {"rate", "mean_absence"}:
            if churn:
                raise ConfigError("network.churn needs both rate and mean_absence (steps), or a schedule")
        else:
            churn["rate"] = _number("network.churn.rate", churn["rate"], 0.0, 1.0)
            churn["mean_absence"] = _number("network.churn.mean_absence", churn["mean_absence"], 1.0)
        self.stragglers = _check_stragglers(self.stragglers, n_agents)
        for key, low_open in (("latency_ms", False), ("bandwidth_mbps", True)):
            value = getattr(self, key)
            if value is None and key == "bandwidth_mbps":
                continue
            if isinstance(value, str):
                read_link_values(value, key)  # a bad file is said now, not when the run starts
            else:
                setattr(self, key, _number(f"network.{key}", value, open_low=low_open))
        return self


def check_network(cfg: NetworkConfig, algorithm: Any, local_steps: int = 1) -> None:
    """Refuse an algorithm that has no sound behaviour when messages are lost or agents leave, or whose
    returning agents cannot copy a neighbour's model (one line, its reason)."""
    churn = bool(set(cfg.churn) - {"rejoin"})
    if (cfg.drop_prob > 0 or cfg.link_failures or churn) and algorithm.loss_refusal:
        raise ConfigError(f"{algorithm.name} cannot run on a lossy network (network.drop_prob / link_failures / "
                          f"churn): {algorithm.loss_refusal}")
    if churn and cfg.churn.get("rejoin") == "neighbor":
        if algorithm.rejoin_refusal:
            raise ConfigError(f"{algorithm.name} cannot take network.churn.rejoin = 'neighbor': "
                              f"{algorithm.rejoin_refusal}")
        if local_steps > 1:
            raise ConfigError("network.churn.rejoin = 'neighbor' needs training.local_steps = 1 (a returning agent "
                              "copies a model it receives in round 1, and a local step has none)")


def _schedule(where: str, rows: Any, width: int, n: int | None) -> None:
    """[[agents..., start, end], ...]: agents in [0, n), 0 <= start < end."""
    if not isinstance(rows, list):
        raise ConfigError(f"{where} must be a list of [{'i, j, ' if width == 4 else 'agent, '}start, end] rows")
    for row in rows:
        if not isinstance(row, list) or len(row) != width:
            raise ConfigError(f"{where}: every row must be [{'i, j, ' if width == 4 else 'agent, '}start, end], "
                              f"not {row!r}")
        for v in row:
            _int(where, v)
        if row[-2] >= row[-1]:
            raise ConfigError(f"{where}: a row's start must be before its end, not {row!r}")
        if n is not None and any(a >= n for a in row[:-2]):
            raise ConfigError(f"{where}: agent out of range in {row!r} (there are {n} agents)")


def _check_stragglers(value: Any, n: int | None) -> Any:
    where = "network.stragglers"
    if value is None:
        return None
    if isinstance(value, list):
        out = [_number(f"{where}[{k}]", v, open_low=True) for k, v in enumerate(value)]
        if n is not None and len(out) != n:
            raise ConfigError(f"{where} lists {len(out)} factors for {n} agents")
        return out
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a list of factors or a table {{distribution = ...}}, not {value!r}")
    kind = value.get("distribution")
    if kind == "lognormal":
        _table(where, value, ("distribution", "sigma"))
        return {"distribution": kind, "sigma": _number(f"{where}.sigma", value.get("sigma"))}
    if kind == "uniform":
        _table(where, value, ("distribution", "low", "high"))
        low = _number(f"{where}.low", value.get("low"), open_low=True)
        high = _number(f"{where}.high", value.get("high"), low)
        return {"distribution": kind, "low": low, "high": high}
    raise ConfigError(f"{where}.distribution must be 'lognormal' or 'uniform', not {kind!r}")


def resolve_network_paths(cfg: NetworkConfig, base_dir: str | Path) -> None:
    """Per-link value files relative to `base_dir` (the config file's folder), made absolute."""
    for key in ("latency_ms", "bandwidth_mbps"):
        value = getattr(cfg, key)
        if isinstance(value, str):
            setattr(cfg, key, str((Path(base_dir) / Path(value).expanduser()).resolve()))


def read_link_values(path: str, key: str) -> dict[tuple[int, int], float]:
    """A file of lines "i j value" ('#' starts a comment): the link i-j's value, both ways."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"network.{key}: cannot read {path!r}: {e}") from None
    out: dict[tuple[int, int], float] = {}
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        try:
            i, j, v = int(words[0]), int(words[1]), float(words[2])
            if len(words) != 3:
                raise ValueError
        except (ValueError, IndexError):
            raise ConfigError(f"network.{key}: {path}:{number}: expected 'i j value', got {line.strip()!r}") from None
        v = _number(f"network.{key} ({path}:{number})", v, open_low=key == "bandwidth_mbps")
        out[i, j] = out[j, i] = v
    return out


@dataclass(frozen=True)
class Delivery:
    """Which of a step's messages touching the local agents arrive (bool tensors on the run's device).

    in1[e]: the round-1 message on local in-edge e reached its local receiver; out1[e]: the local
    sender's round-1 message on out-edge e reached its receiver; out2[e]: the round-2 message owed to
    the local sender of out-edge e (the cross-gradient its receiver computed with its model) came back:
    its round-1 message arrived and so did the reply. A receiver that never got a model computes no
    cross-gradient for it and sends nothing back.
    """

    in1: Tensor
    out1: Tensor
    out2: Tensor


@dataclass
class MixWeights:
    """A step's weights before the gossip rate is applied, float64: the mixing matrix W's entries the local
    agents use (mix_self[k] = w_kk, mix_in[e] on in-edge e, mix_out[e] = the receiver's w of out-edge e,
    i.e. the share of the sender's column) and the combine weights (self_w, in_w, out_w of CombineContext)."""

    mix_self: Tensor
    mix_in: Tensor
    mix_out: Tensor
    self_w: Tensor
    in_w: Tensor
    out_w: Tensor


class _Graph:
    """One graph's global edge arrays, per-link latency and bandwidth, and the local edges' global ids."""

    def __init__(self, edges: list[tuple[int, int]], plan: Any, latency: Any, bandwidth: Any):
        self.src = np.array([s for s, _ in edges], dtype=np.int64)
        self.dst = np.array([d for _, d in edges], dtype=np.int64)
        gid = {(s, d): e for e, (s, d) in enumerate(edges)}
        local = plan.local
        self.in_gid = torch.tensor([gid[int(s), local[int(d)]] for s, d in zip(plan.in_src, plan.in_dst)],
                                   dtype=torch.long, device="cpu")
        self.out_gid = torch.tensor([gid[local[int(s)], int(d)] for s, d in zip(plan.out_src, plan.out_dst)],
                                    dtype=torch.long, device="cpu")
        self.latency_ms = _per_link(latency, edges, "latency_ms", 0.0)
        self.bandwidth_mbps = _per_link(bandwidth, edges, "bandwidth_mbps", math.inf)
        # pairs of the undirected links (for failures): link id of every edge
        pairs = {}
        self.link = np.array([pairs.setdefault((min(s, d), max(s, d)), len(pairs)) for s, d in edges],
                             dtype=np.int64)


def _per_link(value: Any, edges: list[tuple[int, int]], key: str, default: float) -> np.ndarray:
    if value is None:
        return np.full(len(edges), default)
    if not isinstance(value, dict):
        return np.full(len(edges), float(value))
    missing = [e for e in edges if e not in value]
    if missing:
        raise ConfigError(f"network.{key}: the file gives no value for the link {missing[0][0]}-{missing[0][1]}")
    return np.array([value[e] for e in edges], dtype=np.float64)


class NetworkModel:
    """The network of one run: draws each step's deliveries, applies the algorithm's re-weighting, counts
    messages and simulated time. `state_dict`/`load_state_dict` carry the counters and the links' and agents' state.

    `topology`: the run's (static or time-varying); `seed`: of every draw unless the config gives one.
    Every bad value, a per-link file that misses a link included, is a ConfigError here, before training.
    """

    def __init__(self, cfg: NetworkConfig, topology: Any, seed: int = 0):
        n = topology.n
        cfg.validate(n)
        self.cfg, self.n = cfg, n
        self.seed = cfg.seed if cfg.seed is not None else seed
        time_varying = callable(getattr(topology, "at", None))
        if time_varying and (cfg.link_failures or isinstance(cfg.latency_ms, str)
                             or isinstance(cfg.bandwidth_mbps, str)):
            raise ConfigError("network.link_failures and per-link latency_ms / bandwidth_mbps files need one fixed "
                              "graph; on a time-varying topology give global values")
        self.latency = read_link_values(cfg.latency_ms, "latency_ms") if isinstance(cfg.latency_ms, str) \
            else cfg.latency_ms
        self.bandwidth = read_link_values(cfg.bandwidth_mbps, "bandwidth_mbps") \
            if isinstance(cfg.bandwidth_mbps, str) else cfg.bandwidth_mbps
        if not time_varying:  # a file that misses a link: said now, not at the first step
            for value, key in ((self.latency, "latency_ms"), (self.bandwidth, "bandwidth_mbps")):
                _per_link(value, topology.edges, key, 0.0)
        self.factors = _factors(cfg.stragglers, n, self.seed)
        self._graphs: weakref.WeakKeyDictionary[Any, _Graph] = weakref.WeakKeyDictionary()  # per wiring
        self.sim_time_s = 0.0
        self.messages_sent = 0
        self.messages_dropped = 0
        self.links_down = 0
        self.down: np.ndarray | None = None  # the Markov links' state (rate / mean_down), by link id
        #: churn's draws (rate / mean_absence or a schedule); {} without churn
        self.churn = cfg.churn if set(cfg.churn) - {"rejoin"} else {}
        self.away = np.zeros(n, dtype=bool)  # the agents away at step away_step
        self.was_away = np.zeros(n, dtype=bool)  # and at the step before (who returns at away_step)
        self.away_step = -1
        self._before: Tensor | None = None

    def check(self, algorithm: Any) -> None:
        check_network(self.cfg, algorithm)

    def graph(self, wiring: Any) -> _Graph:
        g = self._graphs.get(wiring)
        if g is None:
            g = self._graphs[wiring] = _Graph(wiring.topology.edges, wiring.comm.plan, self.latency,
                                                  self.bandwidth)
        return g

    # ---------------------------------------------------------------- one step
    def absent(self, step: int) -> np.ndarray:
        """Which agents are away at `step` (a bool per agent, all False without churn). The runner asks before
        drawing the step's batches (an absent agent's stream is held), the engine at the step itself: the
        chain advances once per step and the answer is kept for that step."""
        if not self.churn:
            return self.away
        while self.away_step < step:
            t = self.away_step + 1
            self.was_away, self.away = self.away, self._away_at(t, self.away)
            self.away_step = t
        if step != self.away_step:
            raise ValueError(f"churn is at step {self.away_step}; step {step} has passed")
        return self.away

    def _away_at(self, t: int, before: np.ndarray) -> np.ndarray:
        churn = self.churn
        if "schedule" in churn:
            away = np.zeros(self.n, dtype=bool)
            for a, start, end in churn["schedule"]:
                away[a] |= start <= t < end
            return away
        # a two-state Markov chain per agent, drawn from the hash as the links' are
        agents = np.arange(self.n, dtype=np.int64)
        leave = uniforms(self.seed, t, _LEAVE, agents, agents) < churn["rate"]
        back = uniforms(self.seed, t, _RETURN, agents, agents) < 1.0 / churn["mean_absence"]
        return np.where(before, ~back, leave)

    def begin(self, step: int, wiring: Any, algorithm: Any) -> tuple[Any, dict[str, Any]]:
        """The wiring this step runs on (re-weighted by the algorithm where messages were lost, else the
        given one itself) and what `end` needs. With churn it also names the local agents the engine must
        leave as they are (info["away"], local indices) and the returning agents that copy a neighbour's
        model (info["rejoin"]: their local indices and the in-edges whose model they copy)."""
        g = self.graph(wiring)
        up1 = self._links_up(step, g)
        away = self.absent(step) if self.churn else None
        # an absent agent sends nothing and its neighbours send it nothing: those messages are not sent at all
        sent1 = np.ones(len(up1), dtype=bool) if away is None else ~(away[g.src] | away[g.dst])
        up1 &= sent1
        if self.cfg.drop_prob > 0:
            up1 &= uniforms(self.seed, step, _ROUND1, g.src, g.dst) >= self.cfg.drop_prob
        # round 2 is the replies to round 1's models, or (relaysgd) the method's own message on every edge
        sent2 = up1 if algorithm.round2 else sent1
        arr2 = sent2.copy()
        if algorithm.round2 and self.cfg.drop_prob > 0:  # the reply goes from the model's receiver to its owner
            arr2 &= uniforms(self.seed, step, _ROUND2, g.dst, g.src) >= self.cfg.drop_prob
        self._before = wiring.comm.bytes_sent.sum(0)
        info = {"graph": g, "sent1": sent1, "up1": up1, "sent2": sent2, "arr2": arr2, "algorithm": algorithm}
        dev = wiring.ctx.self_w.device
        if away is not None:
            self._churn_info(info, wiring.comm.plan, g, away, dev)
        if up1.all() and (arr2 == sent2).all():
            return wiring, info  # nothing lost: the wiring's own weights, bit for bit
        mask1, mask2 = torch.from_numpy(up1).to(dev), torch.from_numpy(arr2).to(dev)
        delivery = Delivery(in1=mask1[g.in_gid.to(dev)], out1=mask1[g.out_gid.to(dev)], out2=mask2[g.out_gid.to(dev)])
        info["delivery"] = delivery
        return wiring.reweighted(algorithm.reweight(wiring.ctx, wiring.mix_weights(), delivery)), info

    def _churn_info(self, info: dict[str, Any], plan: Any, g: _Graph, away: np.ndarray, dev: torch.device) -> None:
        """The local agents away this step, and with rejoin = "neighbor" each returning agent's choice: the
        in-edge of its lowest-numbered in-neighbour whose round-1 model reaches it (none: it resumes its own)."""
        local = np.asarray(plan.local, dtype=np.int64)
        ks = np.flatnonzero(away[local])
        info["away"] = torch.from_numpy(ks).to(dev) if len(ks) else None
        back = np.flatnonzero((self.was_away & ~away)[local])
        if self.churn.get("rejoin") != "neighbor" or not len(back):
            return
        arrived = info["up1"][g.in_gid.numpy()]
        in_src, in_dst = plan.in_src.cpu().numpy(), plan.in_dst.cpu().numpy()
        pick = [(k, c[np.argmin(in_src[c])]) for k in back
                for c in [np.flatnonzero((in_dst == k) & arrived)] if len(c)]
        if pick:
            info["rejoin"] = tuple(torch.tensor(v, dtype=torch.long, device=dev) for v in zip(*pick))

    def end(self, wiring: Any, info: dict[str, Any]) -> None:
        """After the step: count its messages, take back the round-2 bytes of replies never sent, and add the
        step's simulated time. A round counts only if the comms sent something in it: a local step
        (training.local_steps) or push-sum's first step, which send nothing, lose nothing and wait for no link."""
        comm, g, up1, sent2, arr2 = wiring.comm, info["graph"], info["up1"], info["sent2"], info["arr2"]
        sent1 = info["sent1"]
        delta = comm.bytes_sent.sum(0) - self._before
        plan = comm.plan
        per1 = float(delta[0]) / len(plan.out_src) if len(plan.out_src) else 0.0
        per2 = float(delta[1]) / len(plan.in_dst) if len(plan.in_dst) else 0.0
        if per1:
            self.messages_sent += int(sent1.sum())
            self.messages_dropped += int((sent1 & ~up1).sum())
            if not sent1.all():  # nothing goes to or from an absent agent
                unsent = ~torch.from_numpy(sent1)[g.out_gid]
                comm.bytes_sent[:, 0].index_add_(0, plan.out_src[unsent], comm.bytes_sent.new_full(
                    (int(unsent.sum()),), -per1))
        if per2:
            self.messages_sent += int(sent2.sum())
            self.messages_dropped += int((sent2 & ~arr2).sum())
        # a receiver that got no model computed and sent no cross-gradient for it
        if per2 and info["algorithm"].round2 and not up1.all():
            unsent = ~torch.from_numpy(up1)[g.in_gid]
            comm.bytes_sent[:, 1].index_add_(0, plan.in_dst[unsent], comm.bytes_sent.new_full(
                (int(unsent.sum()),), -per2))
        cfg = self.cfg
        if not (cfg.compute_ms or cfg.latency_ms or cfg.bandwidth_mbps is not None):
            return
        evals = np.ones(self.n)
        if info["algorithm"].cross_gradients:  # one cross-gradient per model received
            evals += np.bincount(g.dst[up1], minlength=self.n)
        if self.churn:
            evals[self.away] = 0  # an absent agent computes nothing
        compute = float((evals * self.factors).max(initial=0.0)) * cfg.compute_ms
        rounds = [(per1, sent1), (per2, sent2)]
        ms = compute + sum(_round_ms(g, size, which) for size, which in rounds if size and which.any())
        self.sim_time_s += ms / 1000.0

    def _links_up(self, step: int, g: _Graph) -> np.ndarray:
        """Advance the failed links to `step` and return which edges' links are up."""
        lf = self.cfg.link_failures
        if not lf:
            return np.ones(len(g.src), dtype=bool)
        m = int(g.link.max()) + 1 if len(g.link) else 0
        first = np.unique(g.link, return_index=True)[1]  # one edge per link names it: (min, max) agents
        a, b = np.minimum(g.src, g.dst)[first], np.maximum(g.src, g.dst)[first]
        if "schedule" in lf:
            down = np.zeros(m, dtype=bool)
            pos = {(int(i), int(j)): k for k, (i, j) in enumerate(zip(a, b))}
            for i, j, start, end in lf["schedule"]:
                k = pos.get((min(i, j), max(i, j)))
                if k is not None and start <= step < end:
                    down[k] = True
        else:  # a two-state Markov chain per link, its transitions drawn from the hash
            down = np.zeros(m, dtype=bool) if self.down is None else self.down
            fail = uniforms(self.seed, step, _LINK_FAIL, a, b) < lf["rate"]
            repair = uniforms(self.seed, step, _LINK_REPAIR, a, b) < 1.0 / lf["mean_down"]
            down = np.where(down, ~repair, fail)
        self.down = down
        self.links_down = int(down.sum())
        return ~down[g.link]

    # ---------------------------------------------------------------- metrics and state
    def metrics(self) -> dict[str, Any]:
        """The counters of metrics.jsonl (NETWORK_KEYS): cumulative, of the whole network, equal on every process."""
        return {"sim_time_s": self.sim_time_s, "messages_sent": self.messages_sent,
                "messages_dropped": self.messages_dropped, "links_down": self.links_down,
                "agents_present": self.n - int(self.away.sum())}

    def state_dict(self) -> dict[str, Any]:
        return {"sim_time_s": self.sim_time_s, "messages_sent": self.messages_sent,
                "messages_dropped": self.messages_dropped, "links_down": self.links_down,
                "down": None if self.down is None else torch.from_numpy(self.down.copy()),
                "away": torch.from_numpy(self.away.copy()), "was_away": torch.from_numpy(self.was_away.copy()),
                "away_step": self.away_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sim_time_s = float(state["sim_time_s"])
        self.messages_sent, self.messages_dropped = int(state["messages_sent"]), int(state["messages_dropped"])
        self.links_down = int(state["links_down"])
        self.down = None if state["down"] is None else state["down"].numpy().astype(bool)
        if "away" in state:  # (checkpoints from before churn had no absent agents)
            self.away, self.was_away = state["away"].numpy().astype(bool), state["was_away"].numpy().astype(bool)
            self.away_step = int(state["away_step"])


def _round_ms(g: _Graph, size: float, which: np.ndarray) -> float:
    """The slowest of the round's messages: its link's latency plus its bytes over the link's bandwidth."""
    transfer = size * 8 / (g.bandwidth_mbps[which] * 1e6) * 1e3  # bytes -> ms at Mbit/s (inf: no cost)
    return float((g.latency_ms[which] + transfer).max())


def _factors(spec: Any, n: int, seed: int) -> np.ndarray:
    """Every agent's compute slow-down factor: given, or drawn once from the seed."""
    if spec is None:
        return np.ones(n)
    if isinstance(spec, list):
        return np.array(spec, dtype=np.float64)
    rng = np.random.Generator(np.random.PCG64([seed, 0x5EED]))
    if spec["distribution"] == "lognormal":
        return np.exp(spec["sigma"] * rng.standard_normal(n))
    return rng.uniform(spec["low"], spec["high"], n)
