"""Largest stable step of each method on a quadratic consensus problem (REPORT.md, "Setting 2").

    python experiments/alpha0_stability.py   # prints the table, writes experiments/tables/stability.md

Agent i minimises f_i(x) = a/2 * ||x - c_i||^2 (same curvature a, different optima c_i). On such a
problem one iteration of the contract (ARCHITECTURE.md section 1: gossip, self-gradient at the
gossiped model, model-variant cross-gradients at the neighbours' pre-gossip models, Nesterov
momentum) is an affine map of the state (x, m), so it is stable exactly when the spectral radius of
its linear part is below 1. That depends on the curvature and the learning rate only through h = lr * a,
and the table gives the largest stable h per method: the largest curvature a step of size lr tolerates
is h / lr. Nothing here is trained; it explains why NGC with alpha = 0 blew up on CIFAR-10 at lr 0.01.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from crossgrad.topology import Topology

HERE = Path(__file__).resolve().parent


def combine_matrix(W: np.ndarray, gamma: float, method: str, alpha: float = 0.0) -> np.ndarray:
    """K with combined gradient = a * (K @ x) + const, for a stacked scalar model per agent."""
    n = len(W)
    G = (1 - gamma) * np.eye(n) + gamma * W  # the gossip step
    if method == "dsgd":
        return G  # self-gradient at the gossiped model
    D, A = np.diag(np.diag(W)), W - np.diag(np.diag(W))
    # NGC: w_ii * grad f_i(gossiped x_i) + sum_j w_ij [alpha * grad f_j(x_i) + (1 - alpha) * grad f_i(x_j)]
    return D @ G + alpha * np.diag(A.sum(1)) + (1 - alpha) * A


def spectral_radius(W: np.ndarray, gamma: float, beta: float, h: float, K: np.ndarray) -> float:
    """Of the iteration on (x, m): m' = beta m + g; x' = G x - lr ((1 + beta) g + beta^2 m), g = a K x."""
    n = len(W)
    G = (1 - gamma) * np.eye(n) + gamma * W
    # with m scaled by lr (mu = lr * m) the map depends on lr * a = h only
    M = np.block([[G - (1 + beta) * h * K, -beta**2 * np.eye(n)], [h * K, beta * np.eye(n)]])
    return float(np.abs(np.linalg.eigvals(M)).max())


def largest_stable_h(W: np.ndarray, gamma: float, beta: float, K: np.ndarray) -> float:
    """The first h on a log grid whose spectral radius exceeds 1, refined by bisection."""
    grid = np.geomspace(1e-4, 10, 400)
    stable = [spectral_radius(W, gamma, beta, h, K) <= 1 + 1e-12 for h in grid]
    first_bad = stable.index(False)
    lo, hi = grid[first_bad - 1], grid[first_bad]
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spectral_radius(W, gamma, beta, mid, K) <= 1 + 1e-12 else (lo, mid)
    return lo


def main() -> int:
    beta = 0.9
    graphs = [("ring-5", Topology.ring(5)), ("ring-10", Topology.ring(10)), ("torus 2×5", Topology.torus(2, 5))]
    methods = [("DSGDm-N", "dsgd", 0.0), ("NGC (α=0)", "ngc", 0.0), ("NGC (α=0.5)", "ngc", 0.5),
               ("NGC (α=1)", "ngc", 1.0)]
    lines = ["| graph | γ | λ_min(W) | " + " | ".join(m[0] for m in methods) + " |",
             "|:---|---:|---:|" + "---:|" * len(methods)]
    for gname, topo in graphs:
        W = topo.W.double().numpy()
        lam_min = float(np.linalg.eigvalsh((W + W.T) / 2).min())
        for gamma in (0.1, 0.5, 1.0):
            hs = [largest_stable_h(W, gamma, beta, combine_matrix(W, gamma, kind, alpha)) for _, kind, alpha in methods]
            lines.append(f"| {gname} | {gamma:g} | {lam_min:.3f} | " + " | ".join(f"{h:.3g}" for h in hs) + " |")
    table = "\n".join(lines) + "\n"
    print(f"largest stable lr × curvature, Nesterov momentum {beta}:\n{table}")
    out = HERE / "tables" / "stability.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
