"""crossgrad: decentralized deep learning on non-IID data (NGC, CompNGC, DSGD, QGM, CGA).

    import torch, crossgrad as cg
    topo = cg.Topology.ring(5)
    algo = cg.make_algorithm("ngc", lr=0.01, alpha=1.0)
    sim = cg.Simulator(model, topo, algo)
    sim.step(next(batches))   # one (inputs, targets) per agent: crossgrad.data.BatchStreams
    cg.evaluate(sim, test)    # consensus and per-agent test accuracy
"""
import importlib

#: public name -> the module that defines it; imported on first use, so that `import crossgrad.cli`
#: stays light and a Ctrl-C while torch loads reaches the CLI's handler instead of printing a traceback
_EXPORTS = {
    **dict.fromkeys(["ALGORITHMS", "Algorithm", "ConfigError", "algorithm_options", "make_algorithm",
                     "register_algorithm"], "crossgrad.algorithms"),
    "Engine": "crossgrad.engine", "NonFiniteError": "crossgrad.engine",
    "Simulator": "crossgrad.simulator", "Topology": "crossgrad.topology", "evaluate": "crossgrad.evaluation",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'crossgrad' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "Algorithm", "ConfigError", "Engine", "NonFiniteError", "Simulator", "Topology",
    "algorithm_options", "evaluate", "make_algorithm", "register_algorithm",
]
