"""crossgrad: decentralized deep learning on non-IID data (NGC, CompNGC, DSGD, QGM, CGA).

    import torch, crossgrad as cg
    topo = cg.Topology.ring(5)
    algo = cg.make_algorithm("ngc", lr=0.1, gamma=0.5, momentum=0.9, nesterov=True, alpha=1.0)
    sim = cg.Simulator(model, topo, algo)
    sim.step(batches)   # one (inputs, targets) per agent
"""
from crossgrad.algorithms import (
    ALGORITHMS,
    Algorithm,
    ConfigError,
    algorithm_options,
    make_algorithm,
    register_algorithm,
)
from crossgrad.engine import Engine, NonFiniteError
from crossgrad.simulator import Simulator
from crossgrad.topology import Topology

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "Algorithm", "ConfigError", "Engine", "NonFiniteError", "Simulator", "Topology",
    "algorithm_options", "make_algorithm", "register_algorithm",
]
