"""What a step needs from its graph: the comm, the edge plan, the combine context and the gossip (steps 1-2).

A static topology has one `Wiring` for the whole run; a time-varying one has one per distinct graph, built
the first time that graph occurs and kept in a `WiringCache`. In-process (a `SharedMemoryComm`)
neighbours' rows are never copied: gossip is one product over x (`Gossip`) and round 2 reads the senders'
rows in place; elsewhere the same product runs over the rows round 1 received.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from crossgrad.algorithms import Algorithm, CombineContext, combine_weights
from crossgrad.algorithms.base import edges_per_agent
from crossgrad.codecs import Codec, Payload
from crossgrad.comm.base import Comm, EdgePlan, SharedMemoryComm
from crossgrad.comm.network import MixWeights
from crossgrad.flat import ParamLayout
from crossgrad.mixing import MixingProduct
from crossgrad.topology import Topology, is_time_varying


class Gossip:
    """Step 2: x_half = G x for the local agents, G = diag(1 - gamma + gamma w_ii) + gamma * (w_ij on the
    in-edges), one `MixingProduct` over round 1's pool (all of x in-process): the same product on the same
    numbers on every backend and placement of the agents, so float32 gossip is bit-identical on all of them."""

    def __init__(self, plan: EdgePlan, gossip_self: Tensor, gossip_in: Tensor):
        dev = gossip_self.device
        local = torch.tensor(plan.local, dtype=torch.long, device=dev)
        rows = torch.cat([torch.arange(plan.n_local, device=dev), plan.in_dst.to(dev)])
        cols = torch.cat([local, plan.in_src.to(dev)])
        self.product = MixingProduct(plan.n, plan.local, rows, cols, torch.cat([gossip_self, gossip_in]),
                                     plan.pool_agents, gossip_self.dtype)
        self.G = self.product.M

    def __call__(self, pool: Tensor, out: Tensor) -> Tensor:
        """G times round 1's pool (in global agent order) into `out` [n_local, P]."""
        return self.product(pool, out)


#: a time-varying topology keeps this many graphs' wirings, or its whole period when that is longer (up to
#: WIRING_CACHE_MAX: a Base-(k+1) graph on many agents has a long one, and rebuilding a wiring every step is slow)
WIRING_CACHE = 16
WIRING_CACHE_MAX = 64

CommFactory = Callable[[list[tuple[int, int]]], Comm]
#: what the comms of one run's graphs share: the byte counters, and a failed round (after it the peers'
#: message streams are out of step, whichever graph the next step uses)
RUN_WIDE = ("bytes_sent", "wire_bytes", "failed")


def comm_for(topology: Any, make: CommFactory) -> Comm | CommFactory:
    """What `Engine` takes for `topology`: the Comm of its edges, or for a time-varying topology the
    factory itself, which the engine calls with each distinct graph's edges."""
    return make if is_time_varying(topology) else make(topology.edges)


class Wiring:
    """Everything about one step that follows from its graph: the backend's comm and edge plan, the
    combine context, the gossip weights and which model and data each gradient pair uses.

    A static topology has one for the whole run; a time-varying one has one per distinct graph.
    """

    def __init__(self, topology: Topology, comm: Comm, algorithm: Algorithm, layout: ParamLayout,
                 dev: torch.device, dtype: torch.dtype, gamma: float | None = None):
        algorithm.check_mixing(topology)  # each graph's W, a time-varying topology's included
        self.topology, self.comm = topology, comm
        plan = comm.plan
        directed = topology.is_directed
        # gossip (step 2) always mixes with W; only the combine (step 6) may use other weights
        gossip_self, gossip_in, _ = combine_weights(topology.W, plan, "mixing", directed)
        self_w, in_w, out_w = combine_weights(topology.W, plan, algorithm.weights, directed)
        receivers, senders = (torch.tensor(e, dtype=torch.long, device="cpu") for e in
                              ([d for _, d in topology.edges], [s for s, _ in topology.edges]))
        self.ctx = CombineContext(
            plan=EdgePlan(plan.n, plan.local, *(t.to(dev) for t in (plan.in_src, plan.in_dst, plan.out_dst,
                                                                     plan.out_src))),
            layout=layout, self_w=self_w.to(dev), in_w=in_w.to(dev), out_w=out_w.to(dev),
            # the graph's degrees, not the block's: the combine kernels they choose add in their own order, so a
            # block must not take another kernel than the simulator because its own agents happen to be regular
            in_k=edges_per_agent(receivers, plan.n), out_k=edges_per_agent(senders, plan.n),
            dtype=dtype, topology=topology,
        )
        #: W's gossip weights before the averaging rate: set_gamma scales them (the rate may follow a schedule)
        self._mixing = (gossip_self, gossip_in)
        #: the receivers' w of the local agents' out-edges (shares of a sender's column), for a lossy network
        local = torch.tensor(plan.local, dtype=torch.long, device="cpu")
        self._mixing_out = topology.W.to(torch.float64)[plan.out_dst, local[plan.out_src]]
        #: in-process backends: neighbours' rows are read in place (see SharedMemoryComm)
        self.shared = isinstance(comm, SharedMemoryComm)
        self.set_gamma(algorithm.gamma if gamma is None else gamma)
        n = plan.n_local
        self.pair_data = list(range(n)) + (plan.in_dst.tolist() if algorithm.cross_gradients else [])

    def set_gamma(self, gamma: float) -> None:
        """Gossip with averaging rate `gamma`: G = (1 - gamma) I + gamma W (the algorithm's gamma at first)."""
        self.gamma = gamma
        self._set_gossip(*self._mixing)

    def _set_gossip(self, w_self: Tensor, w_in: Tensor) -> None:
        """G = (1 - gamma) I + gamma W from W's rows: w_self (w_ii) and w_in (w_ij per in-edge)."""
        gamma, dev, dtype = self.gamma, self.ctx.self_w.device, self.ctx.dtype
        self.gossip_self = (1 - gamma + gamma * w_self).to(dtype).to(dev)
        self.gossip_in = (gamma * w_in).to(dtype).to(dev)
        self.gossip = Gossip(self.plan, self.gossip_self, self.gossip_in)

    def mix_weights(self) -> MixWeights:
        """This graph's weights before the averaging rate, what an algorithm re-weights when messages are lost
        (Algorithm.reweight), on the run's device."""
        c, dev = self.ctx, self.ctx.self_w.device
        return MixWeights(*(t.to(dev) for t in (*self._mixing, self._mixing_out)), self_w=c.self_w, in_w=c.in_w,
                          out_w=c.out_w)

    def reweighted(self, w: MixWeights) -> Wiring:
        """A copy of this wiring for one step with the weights `w` (the comm and the plan are shared)."""
        out = copy.copy(self)
        out.ctx = dataclasses.replace(self.ctx, self_w=w.self_w, in_w=w.in_w, out_w=w.out_w)
        out._set_gossip(w.mix_self, w.mix_in)
        return out

    @property
    def plan(self) -> EdgePlan:
        return self.ctx.plan

    def round1(self, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """Exchange rows x [n_local, P] and gossip them into `out`; returns (received rows, index): in-edge
        e's row is received[index[e]]."""
        if self.shared:
            models = self.comm.share(x)  # every agent reads its neighbours' rows of x in place
            self.gossip(models, out=out)
            return models, self.comm.sources
        pool, index = self.comm.exchange(x)
        self.gossip(pool, out=out)
        return pool, index

    def round2(self, payload: Payload, sent: Tensor, codec: Codec | None, out: Tensor) -> Tensor:
        """Send payload row e back along in-edge e; returns the arriving rows per out-edge, decoded, in `out`.

        sent[e] is payload row e's decoded value as its sender knows it. In-process the receiver reads
        that row in place: the payload is still built and counted, and a codec's roundtrip is its
        decode(encode()) bit for bit, so decoding it again would give the same rows.
        """
        if self.shared:
            return torch.index_select(sent, 0, self.comm.share_edges(payload), out=out)
        arrived = self.comm.exchange_edges(payload)
        return arrived[0] if codec is None else codec.decode(arrived, out.dtype, out=out)

    def mix(self, rows: Tensor, out: Tensor | None = None) -> Tensor:
        """Gossip another block of rows [n_local, P] with this step's matrix (one more round-1 message),
        into `out` if given (not rows itself)."""
        out = torch.empty_like(rows) if out is None else out
        self.round1(rows, out)
        return out

    def global_mean(self, rows: Tensor) -> Tensor:
        """The mean of rows over all n agents, [1, P] (Comm.global_mean: a collective, not an edge message)."""
        return self.comm.global_mean(rows)


class WiringCache:
    """The wirings of a time-varying topology's graphs, one per distinct W, built when a graph first occurs.

    Every comm it builds shares the first one's run-wide state (RUN_WIDE). It keeps at most `size` wirings
    (WIRING_CACHE, or the period up to WIRING_CACHE_MAX), dropping the oldest that is not the current one.
    """

    def __init__(self, topology: Any, make_comm: CommFactory, algorithm: Algorithm, layout: ParamLayout,
                 dev: torch.device, dtype: torch.dtype):
        self.topology, self.make_comm = topology, make_comm
        self.algorithm, self.layout, self.device, self.dtype = algorithm, layout, dev, dtype
        self.wirings: dict[bytes, Wiring] = {}
        self.size = min(max(WIRING_CACHE, getattr(topology, "period", None) or 0), WIRING_CACHE_MAX)
        self.gamma = algorithm.gamma  # the averaging rate in force (Engine.set_gamma), for graphs met later

    def __len__(self) -> int:
        return len(self.wirings)

    def set_gamma(self, gamma: float) -> None:
        self.gamma = gamma
        for wiring in self.wirings.values():
            wiring.set_gamma(gamma)

    def at(self, step: int, current: Wiring | None = None) -> Wiring:
        """The wiring of the graph at `step`; `current` (the wiring in use) is never the one dropped."""
        topology = self.topology.at(step)
        key = topology.W.numpy().tobytes()
        wiring = self.wirings.get(key)
        if wiring is None:
            comm = self.make_comm(topology.edges)
            if self.wirings:  # one set of counters, and one failure state (DistComm), for the whole run
                first = next(iter(self.wirings.values())).comm
                for name in RUN_WIDE:
                    if hasattr(first, name):
                        setattr(comm, name, getattr(first, name))
            wiring = Wiring(topology, comm, self.algorithm, self.layout, self.device, self.dtype, self.gamma)
            if len(self.wirings) >= self.size:
                self.wirings.pop(next(k for k, w in self.wirings.items() if w is not current))
            self.wirings[key] = wiring
        return wiring
