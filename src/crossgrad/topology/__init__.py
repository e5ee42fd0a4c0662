"""Communication graphs and their mixing matrices.

A :class:`Topology` holds ``n`` agents and a validated row-stochastic mixing matrix ``W`` (float64,
``[n, n]``; column-stochastic with ``stochastic="column"`` or ``weights="out_uniform"``, for push-sum);
:func:`make_topology` builds one by name (:data:`TOPOLOGIES`), which is how configs and
the command line ask for a graph. Mistakes raise :class:`TopologyError` (a ``ValueError``) with a
message naming the offending row, edge, agents or file.

``checks`` holds the shared argument and connectivity checks, ``graph`` the class and its named
constructors, ``registry`` the name -> builder table, including graphs given as an edge list or a file.
``timevarying`` holds the topologies whose graph changes every step (``at(step)``), ``basegraph`` the
Base-(k+1) graphs among them (exact averaging after one period for any n).
"""
from crossgrad.topology.basegraph import BaseGraph
from crossgrad.topology.checks import MAX_AGENTS, TopologyError
from crossgrad.topology.graph import Topology
from crossgrad.topology.registry import TOPOLOGIES, load_mixing_matrix, make_topology
from crossgrad.topology.timevarying import (
    OnePeerExponential,
    RandomMatching,
    TimeVaryingTopology,
    is_time_varying,
)

__all__ = ["MAX_AGENTS", "TOPOLOGIES", "BaseGraph", "OnePeerExponential", "RandomMatching", "TimeVaryingTopology",
           "Topology", "TopologyError", "is_time_varying", "load_mixing_matrix", "make_topology"]
