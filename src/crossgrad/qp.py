"""Batched exact solver for the small box-constrained QPs of cross-gradient aggregation (CGA).

CGA projects, per parameter tensor, a gradient ``g`` against the ``k`` cross-gradients stacked in
``M``.  With ``Q = M Mᵀ + εI`` and ``c = M g`` it needs

    v* = argmin_v ½ vᵀ Q v + cᵀ v   subject to   v ≥ lower (elementwise),

and the projected gradient is ``g + Mᵀ v*``.  Every training step has one such problem per
(agent, layer), all with the same tiny ``k``, so everything here works on a batch ``[B, k, k]``
at once in float64, with no Python loop over instances.

Two exact methods share one masked, vectorised Cholesky kernel:

* ``"enumerate"`` (small ``k``): solve the equality-constrained sub-problem of every one of the
  ``2^k`` candidate free sets, clip to the feasible set and keep the lowest objective.  No
  iteration, no tolerances, so it is the reference method.
* ``"active_set"`` (larger ``k``): a batched primal active-set method in the style of
  Lawson–Hanson, warm-started at the lower bound, iterated until no bound variable has a
  descent direction (or an iteration cap is hit).

``Q`` can be singular to working precision (ε = 1e-12 and nearly parallel or rank-deficient rows
of ``M``).  Then ``v*`` is not well determined, but ``g + Mᵀv*`` is.  The Cholesky kernel
therefore *drops* a variable whose pivot vanishes (fixing it at its bound, which is what
Carathéodory's theorem says an optimal solution can always afford), instead of producing a huge,
meaningless solution.  Every result is finally checked against the KKT conditions in a
scale-aware way and flagged ``ok=False`` when it is non-finite or fails them; callers are
expected to fall back to a previous solution and count the failure, never to ignore it.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["ENUMERATE_MAX_K", "kkt_residual", "solve_box_qp"]

Method = Literal["auto", "enumerate", "active_set"]

#: ``method="auto"`` enumerates all free sets up to this many variables, else uses the active set.
ENUMERATE_MAX_K = 3
_EPS64 = torch.finfo(torch.float64).eps
# Elements of the [B, 2^k, k, k] work tensor processed at once by the enumeration method.
_ENUM_CHUNK_ELEMS = 1 << 22
# Largest k solved with the vectorised Cholesky kernel; LAPACK (one call per matrix) beyond.
_VECTORISED_MAX_K = 8


def _masked_cholesky_solve(A: Tensor, b: Tensor, piv_tol: float) -> tuple[Tensor, Tensor]:
    """Solve ``A x = b`` for a batch of symmetric PSD matrices with unit-scale diagonals.

    Written as ``k`` vectorised right-looking elimination steps because for the tiny ``k`` of CGA
    this is far cheaper than one LAPACK call per matrix.  A pivot ``≤ piv_tol`` means the variable
    is (numerically) a combination of the earlier ones: it is dropped, i.e. ``x_j = 0`` and it does
    not influence the others.  Returns ``x`` and a ``[..., k]`` mask of dropped variables.
    """
    n = A.shape[-1]
    L = A.clone()
    x = b.clone()
    dropped = torch.zeros(b.shape, dtype=torch.bool, device=b.device)
    for j in range(n):
        piv = L[..., j, j]
        good = piv > piv_tol  # False for NaN as well
        dropped[..., j] = ~good
        # rsqrt rather than sqrt: on some CPU builds torch.sqrt is oddly slow for small tensors.
        rs = torch.where(good, piv, torch.ones_like(piv)).rsqrt()
        rs = torch.where(good, rs, torch.zeros_like(rs))
        col = L[..., j + 1:, j] * rs[..., None]
        L[..., j, j] = torch.where(good, piv * rs, torch.ones_like(rs))
        L[..., j + 1:, j] = col
        L[..., j + 1:, j + 1:] -= col[..., :, None] * col[..., None, :]
        y = x[..., j] * rs
        x[..., j] = y
        x[..., j + 1:] -= col * y[..., None]
    for j in range(n - 1, -1, -1):
        xj = x[..., j] / L[..., j, j]
        x[..., j] = xj
        if j:
            x[..., :j] -= L[..., j, :j] * xj[..., None]
    return x, dropped


def _spd_solve(A: Tensor, b: Tensor, piv_tol: float) -> tuple[Tensor, Tensor]:
    """``_masked_cholesky_solve`` semantics, via batched LAPACK for larger ``k``.

    The vectorised kernel costs ``O(k)`` Python-level steps over the whole batch, so beyond
    ``_VECTORISED_MAX_K`` (8) one LAPACK Cholesky per matrix is used instead and only the (rare)
    matrices with a vanishing pivot go through the dropping kernel.
    """
    n = A.shape[-1]
    if n <= _VECTORISED_MAX_K:
        return _masked_cholesky_solve(A, b, piv_tol)
    batch = b.shape[:-1]
    A, b = A.reshape(-1, n, n), b.reshape(-1, n)
    L, info = torch.linalg.cholesky_ex(A)
    x = torch.cholesky_solve(b[..., None], L).squeeze(-1)
    piv = L.diagonal(dim1=-2, dim2=-1)
    bad = (info != 0) | ~(piv * piv > piv_tol).all(dim=-1) | ~torch.isfinite(x).all(dim=-1)
    dropped = torch.zeros(b.shape, dtype=torch.bool, device=b.device)
    if bool(bad.any()):
        sel = bad.nonzero().squeeze(1)
        xb, db = _masked_cholesky_solve(A.index_select(0, sel), b.index_select(0, sel), piv_tol)
        x = x.index_copy(0, sel, xb)
        dropped = dropped.index_copy(0, sel, db)
    return x.reshape(*batch, n), dropped.reshape(*batch, n)


def _first_argmin(x: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum over the last dim and the first index attaining it (NaN rows give index ``k``).

    Built from ``amin`` because ``min(dim)``/``argmin`` and advanced indexing are surprisingly slow
    for small tensors on some multi-threaded CPU builds.
    """
    n = x.shape[-1]
    m = x.amin(dim=-1)
    cols = torch.arange(n, device=x.device)
    idx = torch.where(x == m[..., None], cols, n).amin(dim=-1)
    return m, idx


def _face_system(Qs: Tensor, cs: Tensor, free: Tensor) -> tuple[Tensor, Tensor]:
    """Masked system of the sub-problem with ``free`` variables unconstrained and the rest at 0."""
    pair = free[..., :, None] & free[..., None, :]
    A = torch.where(pair, Qs, torch.zeros((), dtype=Qs.dtype, device=Qs.device))
    A.diagonal(dim1=-2, dim2=-1).copy_(torch.where(free, A.diagonal(dim1=-2, dim2=-1), 1.0))
    rhs = torch.where(free, -cs, torch.zeros((), dtype=cs.dtype, device=cs.device))
    return A, rhs


def _solve_enumerate(Qs: Tensor, cs: Tensor, var: Tensor, piv_tol: float) -> Tensor:
    """Exact minimiser of ½uᵀQu + cᵀu, u ≥ 0, by trying all 2^k free sets (k small).

    Every candidate is clipped to u ≥ 0 and scored with the true objective, so a candidate spoiled
    by rounding can only lose, never be picked as a spurious optimum.
    """
    B, n = cs.shape
    S = 1 << n
    bits = (torch.arange(S, device=cs.device)[:, None] >> torch.arange(n, device=cs.device)) & 1
    bits = bits.bool()
    out = torch.empty_like(cs)
    chunk = max(1, _ENUM_CHUNK_ELEMS // (S * n * n))
    for lo in range(0, B, chunk):
        Qc, cc, vc = Qs[lo:lo + chunk], cs[lo:lo + chunk], var[lo:lo + chunk]
        free = bits[None] & vc[:, None, :]  # [b, S, n]
        A, rhs = _face_system(Qc[:, None], cc[:, None], free)
        x, _ = _spd_solve(A, rhs, piv_tol)
        x = x.clamp_min(0.0)
        obj = 0.5 * ((x @ Qc) * x).sum(-1) + (x * cc[:, None]).sum(-1)  # Q symmetric
        obj = torch.nan_to_num(obj, nan=float("inf"))
        _, best = _first_argmin(obj)
        out[lo:lo + chunk] = x.gather(1, best[:, None, None].expand(-1, 1, n)).squeeze(1)
    return out


def _solve_active_set(Qs: Tensor, cs: Tensor, var: Tensor, piv_tol: float, max_iter: int) -> Tensor:
    """Batched Lawson–Hanson style primal active-set method for ½uᵀQu + cᵀu, u ≥ 0.

    Each iteration, for every unfinished instance, solves the sub-problem on the current free set.
    If that point is infeasible it steps towards it until a variable hits its bound (which leaves
    the free set); otherwise it moves there and frees the bound variable with the most negative
    gradient, or stops when there is none.  A variable that cannot make progress right after being
    freed (rounding-level gradient, or numerically dependent on the free set) is blocked until the
    iterate moves, which rules out the classic add/drop cycling of Lawson–Hanson in floating point.
    The whole batch is processed every iteration (finished instances are frozen with ``where``):
    gathering the unfinished ones costs more than it saves at these sizes.
    """
    B, n = cs.shape
    dev = cs.device
    cols = torch.arange(n, device=dev)
    inf = float("inf")
    u = torch.zeros_like(cs)
    F = torch.zeros_like(var)  # free set
    blk = torch.zeros_like(var)  # blocked variables
    just_added = torch.zeros_like(var)  # variable freed by the previous iteration (one-hot or empty)
    done = ~var.any(dim=1)
    absQ = Qs.abs()
    for _ in range(max_iter):
        if bool(done.all()):
            break
        A, rhs = _face_system(Qs, cs, F)
        z, dropped = _spd_solve(A, rhs, piv_tol)
        dropped &= F
        blk = blk | (dropped & just_added)
        F = F & ~dropped
        z = torch.where(F, z, torch.zeros_like(z))

        # Infeasible sub-problem solution: step towards it until the first variable hits 0.
        neg = F & (z < 0)
        step = neg.any(dim=1)
        ratio = torch.where(neg, u / (u - z), torch.full_like(z, inf))
        alpha = ratio.amin(dim=1).clamp(0.0, 1.0)
        hit = neg & (ratio <= alpha[:, None])
        u_step = torch.where(hit, torch.zeros_like(z), (u + alpha[:, None] * (z - u)).clamp_min(0.0))
        F_step = F & ~hit & (u_step > 0)
        # No progress, and only because of the variable just freed: block it, keep the point.
        stuck = step & (alpha <= 0) & (hit == just_added).all(dim=1)
        moved = step & ~stuck

        # Feasible: move there, then free the bound variable with the most negative gradient.
        u_feas = z.clamp_min(0.0)
        r = (Qs @ u_feas[:, :, None]).squeeze(-1) + cs
        tol = 1e-10 * ((absQ @ u_feas[:, :, None]).squeeze(-1) + cs.abs())
        rr = torch.where(var & ~F & ~blk, r + tol, torch.full_like(r, inf))
        rmin, j = _first_argmin(rr)
        add = ~step & (rmin < 0)
        onehot_j = add[:, None] & (cols == j[:, None])

        live = ~done[:, None]
        u_new = torch.where(moved[:, None], u_step, torch.where(step[:, None], u, u_feas))
        F_keep = torch.where(stuck[:, None], F & ~just_added, F | onehot_j)
        F_new = torch.where(moved[:, None], F_step, F_keep)
        blk_new = torch.where(moved[:, None], torch.zeros_like(blk), blk | (stuck[:, None] & just_added))
        u = torch.where(live, u_new, u)
        F = torch.where(live, F_new, F)
        blk = torch.where(live, blk_new, blk)
        just_added = onehot_j & live
        done = done | (~step & ~add)
    return u


def _prepare(Q: Tensor, c: Tensor, lower: float, active: Tensor | None):
    """float64 copies with inactive variables masked out, and the shifted, Jacobi-scaled problem."""
    Q64 = Q.to(torch.float64)
    c64 = c.to(torch.float64)
    if active is None:
        act = torch.ones(c64.shape, dtype=torch.bool, device=c64.device)
    else:
        act = active.to(device=c64.device, dtype=torch.bool)
    zero = torch.zeros((), dtype=torch.float64, device=c64.device)
    Qm = torch.where(act[:, :, None] & act[:, None, :], Q64, zero)
    cm = torch.where(act, c64, zero)
    # u = v - lower ≥ 0  turns the linear term into c' = c + lower·Q·1.
    cp = cm + lower * Qm.sum(dim=-1)
    diag = Qm.diagonal(dim1=-2, dim2=-1)
    # Variables with a zero diagonal (zero row of M and ε = 0) have no curvature: keep them at the
    # bound; the KKT check reports the (unbounded) case where that is wrong.
    var = act & (diag > 0)
    d = torch.where(var, diag, torch.ones_like(diag)).rsqrt()
    Qs = Qm * d[:, :, None] * d[:, None, :]
    cs = cp * d
    return Qm, cm, act, var, d, Qs, cs


def kkt_residual(Q: Tensor, c: Tensor, v: Tensor, lower: float, active: Tensor | None = None) -> Tensor:
    """Scale-aware KKT violation of ``v`` for ``min ½vᵀQv + cᵀv, v ≥ lower`` (``[B]``, float64).

    With ``r = Qv + c`` and ``u = v - lower`` it is ``max_i |min(‖Q‖·u_i, r_i)|`` (the natural
    residual, covering stationarity, dual feasibility and complementarity at once) and the primal
    violation ``max(-u_i)·‖Q‖``, both relative to ``‖Q‖·‖v‖ + ‖c‖``.  Scaling matters because Q is
    often so ill-conditioned that only a backward-stable residual can be expected.  Inactive
    variables are ignored; non-finite inputs give ``inf``.
    """
    with torch.no_grad():
        Qm, cm, act, _, _, _, _ = _prepare(Q, c, lower, active)
        v64 = torch.where(act, v.to(torch.float64), torch.zeros((), dtype=torch.float64, device=cm.device))
        u = torch.where(act, v64 - lower, torch.zeros_like(v64))
        r = (v64[:, None, :] @ Qm.transpose(-1, -2)).squeeze(1) + cm
        nq = torch.linalg.matrix_norm(Qm) if Qm.numel() else Qm.new_zeros(Qm.shape[0])
        nat = torch.minimum(nq[:, None] * u, r).abs()
        prim = (-u).clamp_min(0.0) * nq[:, None]
        viol = torch.where(act, torch.maximum(nat, prim), torch.zeros_like(nat))
        viol = viol.amax(dim=1) if viol.shape[1] else viol.sum(dim=1)
        scale = nq * torch.linalg.vector_norm(v64, dim=1) + torch.linalg.vector_norm(cm, dim=1)
        res = viol / scale.clamp_min(torch.finfo(torch.float64).tiny)
        finite = (torch.isfinite(Qm).flatten(1).all(1) & torch.isfinite(cm).all(1)
                  & torch.isfinite(v64).all(1))
        return torch.where(finite & ~torch.isnan(res), res, torch.full_like(res, float("inf")))


def solve_box_qp(
    Q: Tensor,
    c: Tensor,
    lower: float,
    *,
    active: Tensor | None = None,
    method: Method = "auto",
    kkt_tol: float = 1e-6,
    max_iter: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Solve ``min_v ½vᵀQv + cᵀv  s.t.  v ≥ lower`` for a batch ``Q: [B,k,k]``, ``c: [B,k]``.

    ``Q`` must be symmetric positive (semi)definite.  ``active`` (``[B,k]`` bool) excludes
    variables, e.g. padding when instances have fewer neighbours: they are returned as ``lower``
    and their rows/columns of ``Q`` and entries of ``c`` are ignored.  Work is done in float64
    whatever the input dtype; ``v`` comes back in the input dtype.

    Returns ``(v, ok)``: ``ok[b]`` is False when the result is non-finite or violates the KKT
    conditions by more than ``kkt_tol`` relative (see :func:`kkt_residual`).  Never raises for bad
    values, only for bad shapes.
    """
    if Q.dim() != 3 or c.dim() != 2 or Q.shape[0] != c.shape[0] or Q.shape[1:] != (c.shape[1], c.shape[1]):
        raise ValueError(f"expected Q [B,k,k] and c [B,k], got {tuple(Q.shape)} and {tuple(c.shape)}")
    if active is not None and tuple(active.shape) != tuple(c.shape):
        raise ValueError(f"active must have shape {tuple(c.shape)}, got {tuple(active.shape)}")
    if method not in ("auto", "enumerate", "active_set"):
        raise ValueError(f"unknown method {method!r}")
    out_dtype = torch.promote_types(Q.dtype, c.dtype)
    if not out_dtype.is_floating_point:
        out_dtype = torch.float64
    B, n = c.shape
    lower = float(lower)
    with torch.no_grad():
        if B == 0 or n == 0:
            return (torch.full(c.shape, lower, dtype=out_dtype, device=c.device),
                    torch.ones(B, dtype=torch.bool, device=c.device))
        _, _, act, var, d, Qs, cs = _prepare(Q, c, lower, active)
        piv_tol = 50.0 * n * _EPS64
        if method == "auto":
            method = "enumerate" if n <= ENUMERATE_MAX_K else "active_set"
        if method == "enumerate":
            us = _solve_enumerate(Qs, cs, var, piv_tol)
        else:
            us = _solve_active_set(Qs, cs, var, piv_tol, max_iter if max_iter is not None else 4 * n + 20)
        v = torch.where(var, lower + us * d, torch.full_like(us, lower))
        ok = kkt_residual(Q, c, v, lower, act) <= kkt_tol
        ok &= torch.isfinite(v).all(dim=1)
        return v.to(out_dtype), ok
