"""Communication graphs and their mixing matrices.

A :class:`Topology` holds ``n`` agents and a validated row-stochastic mixing matrix ``W`` (float64,
``[n, n]``); :func:`make_topology` builds one by name (:data:`TOPOLOGIES`), which is how configs and
the command line ask for a graph. Mistakes raise :class:`TopologyError` (a ``ValueError``) with a
message naming the offending row, edge, agents or file.

``checks`` holds the shared argument and connectivity checks, ``graph`` the class and its named
constructors, ``registry`` the name -> builder table, including graphs given as an edge list or a file.
"""
from crossgrad.topology.checks import MAX_AGENTS, TopologyError
from crossgrad.topology.graph import Topology
from crossgrad.topology.registry import TOPOLOGIES, load_mixing_matrix, make_topology

__all__ = ["MAX_AGENTS", "TOPOLOGIES", "Topology", "TopologyError", "load_mixing_matrix", "make_topology"]
