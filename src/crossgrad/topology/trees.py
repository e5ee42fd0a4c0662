"""Spanning trees for RelaySGD (algorithm ``relaysgd``): ``binary_tree``, ``double_binary_trees``, and which
trees a graph offers to relay over.

Both are built as the RelaySGD authors' topology code (epfml/relaysgd, ``topologies.py``) builds them:

* ``binary_tree``: agent w >= 1 hangs below agent w // 2, a heap numbered from 1 (agent 1 has children 2
  and 3, agent 2 has 4 and 5, ...) with agent 0 attached to agent 1 as a leaf, so the edges are
  {w // 2, w} for w = 1 .. n - 1.
* ``double_binary_trees``: that tree and its mirror image, agent w relabelled n - 1 - w (so agent n - 1 is
  the leaf attached to agent n - 2). The two trees share some edges; the graph is their union, and
  RelaySGD relays half of the coordinates over each tree (the even ones over the first, the odd ones over
  the mirror), so that an agent that is a leaf in one tree carries traffic in the other.
"""
from __future__ import annotations

from typing import Any

from crossgrad.topology.checks import MAX_AGENTS, check_int
from crossgrad.topology.graph import Topology

Pairs = list[tuple[int, int]]


def binary_tree_pairs(n: int) -> Pairs:
    """The binary tree's n - 1 edges as (parent, child) pairs: (w // 2, w) for w = 1 .. n - 1."""
    return [(w // 2, w) for w in range(1, n)]


def double_binary_tree_pairs(n: int) -> tuple[Pairs, Pairs]:
    """The binary tree and its mirror (agent w relabelled n - 1 - w), each as (parent, child) pairs."""
    first = binary_tree_pairs(n)
    return first, [(n - 1 - p, n - 1 - c) for p, c in first]


def binary_tree(n: int, weights: str = "uniform") -> Topology:
    n = check_int(n, "n (number of agents)", 1, MAX_AGENTS)
    return Topology._undirected(n, binary_tree_pairs(n), weights, "binary_tree")


def double_binary_trees(n: int, weights: str = "uniform") -> Topology:
    """The union of the two trees (a gossip W over it exists for the other algorithms; relaysgd ignores W)."""
    n = check_int(n, "n (number of agents)", 1, MAX_AGENTS)
    first, mirror = double_binary_tree_pairs(n)
    return Topology._undirected(n, first + mirror, weights, "double_binary_trees")


def _undirected_pairs(topology: Topology) -> set[tuple[int, int]]:
    return {(min(s, d), max(s, d)) for s, d in topology.edges}


def relay_trees(topology: Any) -> list[Pairs] | None:
    """The spanning trees RelaySGD relays over on `topology`, each as sorted undirected pairs, or None.

    ``double_binary_trees`` gives its two trees; any other undirected graph that is a tree (connected, which
    every Topology is, with n - 1 edges: a chain, a star, a binary tree, one given as edges) gives itself;
    anything else, a time-varying topology included, None.
    """
    if callable(getattr(topology, "at", None)) or topology.is_directed:
        return None
    pairs = _undirected_pairs(topology)
    if topology.name == "double_binary_trees":
        trees = [sorted((min(a, b), max(a, b)) for a, b in t) for t in double_binary_tree_pairs(topology.n)]
        # a graph renamed by hand is not the authors' union: fall through to the tree test
        if set(trees[0]) | set(trees[1]) == pairs:
            return trees
    if len(pairs) != topology.n - 1:
        return None
    return [sorted(pairs)]
