"""Tests for the batched box-QP solver behind CGA (crossgrad.qp) and CGA's projection, checked against quadprog."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from crossgrad.algorithms import CGA, CombineContext, combine_weights
from crossgrad.comm.local import LocalComm
from crossgrad.flat import ParamLayout
from crossgrad.qp import kkt_residual, solve_box_qp
from crossgrad.topology import Topology

qpsolvers = pytest.importorskip("qpsolvers")
pytest.importorskip("quadprog")

MARGIN = 0.5
EPS = 1e-12


def _instances(rng: np.random.Generator, B: int, k: int, dtype: torch.dtype):
    """Hard-ish CGA instances: P < k, nearly parallel rows, zero rows masked out, wide scales."""
    gs, Ms, acts = [], [], []
    P = int(rng.choice([1, max(1, k - 1), k + 3, 40]))
    for b in range(B):
        scale = 10.0 ** rng.uniform(-6, 3)
        g = rng.standard_normal(P)
        M = rng.standard_normal((k, P))
        kind = b % 4
        if kind == 1 and k > 1:  # nearly parallel rows
            M[1:] = M[:1] * rng.uniform(0.5, 2, (k - 1, 1)) + 1e-7 * rng.standard_normal((k - 1, P))
        elif kind == 2:  # neighbours pointing against g: many variables leave the bound
            M = -np.abs(rng.standard_normal((k, 1))) * g[None] + 0.3 * M
        act = np.ones(k, dtype=bool)
        if kind == 3 and k > 1:  # dropped neighbours: zero rows, inactive
            off = rng.random(k) < 0.4
            off[0] = False
            M[off] = 0.0
            act = ~off
        gs.append(scale * g)
        Ms.append(scale * M * rng.uniform(0.1, 10, (k, 1)))
        acts.append(act)
    g = torch.tensor(np.array(gs), dtype=dtype)
    M = torch.tensor(np.array(Ms), dtype=dtype)
    return g, M, torch.tensor(np.array(acts))


def build_qp(g: torch.Tensor, M: torch.Tensor, eps: float = EPS, active: torch.Tensor | None = None):
    """CGA's QP in float64: Q = M Mᵀ + εI and c = M g, inactive rows of M taken as zero."""
    M64 = M.to(torch.float64)
    if active is not None:
        M64 = torch.where(active[:, :, None], M64, 0.0)
    Q = M64 @ M64.transpose(-1, -2) + eps * torch.eye(M.shape[1], dtype=torch.float64)
    return Q, (M64 @ g.to(torch.float64)[:, :, None]).squeeze(-1)


def _objective(Q: np.ndarray, c: np.ndarray, v: np.ndarray) -> float:
    return float(0.5 * v @ Q @ v + c @ v)


def _quadprog(Q: np.ndarray, c: np.ndarray, lower: float) -> np.ndarray | None:
    n = len(c)
    try:
        return qpsolvers.solve_qp(Q, c, -np.eye(n), -lower * np.ones(n), solver="quadprog")
    except Exception:  # quadprog rejects numerically singular Q
        return None


def _check_against_quadprog(g, M, act, Q, c, v, method, rtol):
    """Compare float64 ``v`` with quadprog on the QP (Q, c) built from float64 (g, M)."""
    compared = 0
    for b in range(len(g)):
        a = act[b].numpy()
        Qb, cb = Q[b].numpy()[np.ix_(a, a)], c[b].numpy()[a]
        vb = v[b].numpy()
        assert np.all(vb[~a] == MARGIN)
        vb = vb[a]
        Mb, gb = M[b].numpy()[a], g[b].numpy()
        ref = _quadprog(Qb, cb, MARGIN)
        if ref is None:
            continue
        ref_kkt = kkt_residual(*(torch.tensor(x)[None] for x in (Qb, cb, ref)), MARGIN)
        ref = np.maximum(ref, MARGIN)  # quadprog can be slightly infeasible on bad instances
        f, f_ref = _objective(Qb, cb, vb), _objective(Qb, cb, ref)
        fscale = np.linalg.norm(Qb) * (ref @ ref) + abs(cb @ ref) + 1e-300
        # Never worse than quadprog, even where quadprog is inaccurate.
        assert f <= f_ref + rtol["obj"] * fscale, (method, b, f, f_ref)
        if ref_kkt.item() > 1e-8:
            continue  # quadprog itself failed on this ill-conditioned instance
        compared += 1
        # quadprog's own inaccuracy (its KKT residual) bounds how far below it the optimum can be.
        assert abs(f - f_ref) <= max(rtol["obj"], 10 * ref_kkt.item()) * fscale, (method, b, f, f_ref)
        proj, proj_ref = gb + Mb.T @ vb, gb + Mb.T @ ref
        pscale = np.linalg.norm(gb) + np.linalg.norm(Mb) * np.linalg.norm(ref)
        assert np.linalg.norm(proj - proj_ref) <= rtol["proj"] * pscale, (method, b)
        if np.linalg.cond(Qb) < 1e6:  # v itself is only well determined then
            atol = rtol["v"] * np.abs(ref).max()
            assert np.allclose(vb, ref, rtol=rtol["v"], atol=atol), (method, b, vb, ref)
    return compared


TOL = {
    torch.float64: {"obj": 1e-10, "proj": 1e-6, "v": 1e-6, "kkt": 1e-9},
    torch.float32: {"obj": 1e-6, "proj": 1e-5, "v": 1e-5, "kkt": 1e-5},
}


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 12, 16])
def test_matches_quadprog(k):
    rng = np.random.default_rng(1000 + k)
    methods = ["auto", "active_set"] + (["enumerate"] if k <= 12 else [])
    compared = 0
    for _ in range(3):
        g, M, act = _instances(rng, 16 if k <= 8 else 6, k, torch.float64)
        Q, c = build_qp(g, M, EPS, act)
        for method in methods:
            v, ok = solve_box_qp(Q, c, MARGIN, active=act, method=method)
            assert v.dtype == torch.float64 and ok.dtype == torch.bool
            assert ok.all(), f"{method}: ok=False on valid instances"
            assert (kkt_residual(Q, c, v, MARGIN, act) <= TOL[torch.float64]["kkt"]).all()
            compared += _check_against_quadprog(g, M, act, Q, c, v, method, TOL[torch.float64])
    assert compared > 0


@pytest.mark.parametrize("k", [1, 2, 4, 8, 13])
def test_float32_inputs_match_quadprog(k):
    rng = np.random.default_rng(2000 + k)
    g, M, act = _instances(rng, 24, k, torch.float32)
    Q, c = build_qp(g, M, EPS, act)
    v, ok = solve_box_qp(Q.float(), c.float(), MARGIN, active=act)
    assert v.dtype == torch.float32 and ok.all()
    Q, c = Q.float().double(), c.float().double()  # the problem it was given, solved in float64
    assert (kkt_residual(Q, c, v.double(), MARGIN, act) <= TOL[torch.float32]["kkt"]).all()
    assert _check_against_quadprog(g.double(), M.double(), act, Q, c, v.double(), "float32",
                                   TOL[torch.float32]) > 0
    # solve_box_qp on float32 Q, c of a well-conditioned problem returns float32 and agrees with float64.
    A = torch.randn(8, k, k + 4, dtype=torch.float64)
    Q = A @ A.transpose(1, 2) + 0.1 * torch.eye(k, dtype=torch.float64)
    c = torch.randn(8, k, dtype=torch.float64)
    v32, ok32 = solve_box_qp(Q.float(), c.float(), MARGIN)
    v64, _ = solve_box_qp(Q.float().double(), c.float().double(), MARGIN)
    assert v32.dtype == torch.float32 and ok32.all()
    torch.testing.assert_close(v32.double(), v64, rtol=1e-6, atol=1e-6)


def test_methods_agree_on_projection():
    rng = np.random.default_rng(7)
    for k in (2, 5, 8):
        g, M, act = _instances(rng, 32, k, torch.float64)
        Q, c = build_qp(g, M, EPS, act)
        projs = []
        for method in ("enumerate", "active_set"):
            v, ok = solve_box_qp(Q, c, MARGIN, active=act, method=method)
            assert ok.all()
            projs.append(g + (torch.where(act, v, 0.0)[:, None, :] @ M).squeeze(1))
        scale = g.norm(dim=1) + M.flatten(1).norm(dim=1) * 10
        assert ((projs[0] - projs[1]).norm(dim=1) <= 1e-6 * scale).all()


@pytest.mark.parametrize("method", ["enumerate", "active_set"])
def test_one_dimensional_closed_form(method):
    q = torch.tensor([2.0, 2.0, 1e-6, 1e4, 3.0])
    c = torch.tensor([-4.0, 4.0, -1e-6, -1e5, -1.5])
    v, ok = solve_box_qp(q[:, None, None].double(), c[:, None].double(), MARGIN, method=method)
    expected = torch.clamp(-c.double() / q.double(), min=MARGIN)
    assert ok.all()
    torch.testing.assert_close(v[:, 0], expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["enumerate", "active_set"])
def test_two_dimensional_hand_solved(method):
    Q = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64).expand(3, 2, 2)
    c = torch.tensor([[-3.0, -3.0], [-3.0, 3.0], [1.0, 1.0]], dtype=torch.float64)
    # interior: Q v = -c -> (1, 1); one bound: v2 = .5, 2 v1 + .5 = 3 -> v1 = 1.25; both at the margin
    expected = torch.tensor([[1.0, 1.0], [1.25, 0.5], [0.5, 0.5]], dtype=torch.float64)
    v, ok = solve_box_qp(Q, c, MARGIN, method=method)
    assert ok.all()
    torch.testing.assert_close(v, expected, rtol=1e-12, atol=1e-12)


def layout_of(*sizes: int) -> ParamLayout:
    model = torch.nn.Module()
    for k, n in enumerate(sizes):
        model.register_parameter(f"p{k}", torch.nn.Parameter(torch.zeros(n)))
    return ParamLayout.of(model)


def cga_setup(topo: Topology, layout: ParamLayout, **kw) -> tuple[CGA, CombineContext, object]:
    plan = LocalComm(topo.edges, topo.n).plan
    weights = combine_weights(topo.W, plan, "mixing", topo.is_directed)
    ctx = CombineContext(plan, layout, *weights, topology=topo)
    algo = CGA(**kw)
    return algo, ctx, algo.init_state(ctx, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("graph", ["full", "star", "directed_ring"])
def test_cga_combine_matches_quadprog_per_agent_and_layer(graph, dtype):
    topo = {"full": lambda: Topology.full(4), "star": lambda: Topology.star(5),
            "directed_ring": lambda: Topology.directed_ring(4)}[graph]()
    layout = layout_of(7, 3, 12)
    algo, ctx, state = cga_setup(topo, layout)
    plan = ctx.plan
    gen = torch.Generator().manual_seed(4)
    g_self = torch.randn(topo.n, layout.size, generator=gen, dtype=torch.float64)
    dv = torch.randn(len(plan.out_src), layout.size, generator=gen, dtype=torch.float64)
    dv[0, layout.slices()[1]] = 0.0  # a neighbour whose cross-gradient for one layer is all zero: dropped
    dv[1] = -3 * g_self[int(plan.out_src[1])]  # opposing the self-gradient: v leaves the margin
    out = algo.combine(ctx, g_self.to(dtype), None, dv.to(dtype), state)
    assert out.dtype == dtype and state.qp_failures == 0
    g_self, dv = g_self.to(dtype).double(), dv.to(dtype).double()
    for i in range(topo.n):
        edges = (plan.out_src == i).nonzero().flatten().tolist()
        for s in layout.slices():
            g = (ctx.self_w[i] * g_self[i, s]).numpy()
            rows = [(ctx.out_w[e] * dv[e, s]).numpy() for e in edges]
            rows = [r for r in rows if np.abs(r).sum() > 0]
            expected = g
            if rows:
                M = np.stack(rows)
                v = _quadprog(M @ M.T + EPS * np.eye(len(rows)), M @ g, MARGIN)
                expected = g + M.T @ v
            tol = 1e-9 if dtype == torch.float64 else 1e-5
            np.testing.assert_allclose(out[i, s].double().numpy(), expected, rtol=0,
                                       atol=tol * (1 + np.abs(expected).max()))


def test_cga_combine_closed_form():
    # self-gradient (1, 0), one neighbour's (-1, 0) at equal weights: v = 1 / (1 + eps / w^2)
    # removes the conflict; an agreeing neighbour keeps v at the margin
    topo = Topology.chain(2)
    algo, ctx, state = cga_setup(topo, layout_of(2))
    g_self = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    dv = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])  # out-edge e goes from agent e to the other one
    out = algo.combine(ctx, g_self, None, dv, state)
    torch.testing.assert_close(state.v[0, :, 0], torch.tensor([1.0, MARGIN], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [0.75, 1.0]]), rtol=0, atol=1e-6)


def test_cga_combine_counts_failures_and_reuses_the_previous_solution():
    topo = Topology.ring(4)
    layout = layout_of(5, 3)
    algo, ctx, state = cga_setup(topo, layout)
    gen = torch.Generator().manual_seed(0)
    g_self = torch.randn(4, layout.size, generator=gen, dtype=torch.float64)
    dv = torch.randn(8, layout.size, generator=gen, dtype=torch.float64)
    algo.combine(ctx, g_self, None, dv, state)
    before = state.v.clone()
    g_self[0, 0] = float("nan")  # agent 0's first layer cannot be solved
    algo.combine(ctx, g_self, None, -dv, state)
    assert state.qp_failures == 1 and state.counters() == {"qp_failures": 1}
    assert torch.equal(state.v[0, 0], before[0, 0])
    assert not torch.equal(state.v[1], before[1])


def test_duplicate_rows_rank_deficient_large_scale():
    # M = [m, m] is rank one with ||m||^2 ~ 1e10 >> 1/eps: only v1 + v2 = t matters, and the
    # projection equals that of a single row with margin 2*MARGIN: t = max(1, -m.g / |m|^2).
    rng = np.random.default_rng(3)
    B, P = 20, 50
    m = torch.tensor(rng.standard_normal((B, P)) * 1e3)
    g = torch.tensor(rng.standard_normal((B, P)) * 1e3)
    g[: B // 2] -= 3 * m[: B // 2]  # conflicting half: t > 1
    M = torch.stack([m, m], dim=1)
    for method in ("enumerate", "active_set"):
        Q, c = build_qp(g, M, EPS)
        v, ok = solve_box_qp(Q, c, MARGIN, method=method)
        assert ok.all() and (v >= MARGIN).all()
        t = torch.clamp(-(m * g).sum(1) / (m * m).sum(1), min=2 * MARGIN)
        torch.testing.assert_close(v.sum(1), t, rtol=1e-9, atol=0)
        proj = g + (v[:, None, :] @ M).squeeze(1)
        torch.testing.assert_close(proj, g + t[:, None] * m, rtol=0, atol=1e-9 * 1e3 * P)


def test_active_mask_matches_reduced_problem_and_ignores_garbage():
    rng = np.random.default_rng(11)
    g, M, _ = _instances(rng, 12, 6, torch.float64)
    act = torch.tensor(rng.random((12, 6)) < 0.6)
    act[:, 0] = True
    act[0] = False  # an instance with nothing active
    Q, c = build_qp(g, M, EPS, act)
    Qg, cg = Q.clone(), c.clone()
    Qg[~act[:, :, None].expand_as(Q)] = float("nan")  # garbage in inactive rows/cols
    cg[~act] = float("inf")
    v, ok = solve_box_qp(Qg, cg, MARGIN, active=act)
    assert ok.all()
    assert (v[~act] == MARGIN).all()
    for b in range(1, 12):
        a = act[b]
        vb, okb = solve_box_qp(Q[b][a][:, a][None], c[b][a][None], MARGIN)
        assert okb.all()
        torch.testing.assert_close(v[b][a], vb[0], rtol=1e-8, atol=1e-10 * (1 + vb.abs().max().item()))


@pytest.mark.parametrize("k", [2, 6, 12])
def test_non_finite_inputs_flagged_not_raised(k):
    rng = np.random.default_rng(5)
    g, M, act = _instances(rng, 8, k, torch.float64)
    act[:] = True
    Q, c = build_qp(g, M, EPS)
    Q[1, 0, 0] = float("nan")
    c[2, -1] = float("nan")
    Q[3] = float("inf")
    c[4] = float("-inf")
    for method in ("auto", "active_set") + (("enumerate",) if k <= 8 else ()):
        v, ok = solve_box_qp(Q, c, MARGIN, method=method)
        assert ok.tolist() == [True, False, False, False, False, True, True, True]


def test_batched_equals_one_by_one():
    rng = np.random.default_rng(21)
    for k in (2, 4, 8, 16):
        g, M, act = _instances(rng, 10, k, torch.float64)
        Q, c = build_qp(g, M, EPS, act)
        v, ok = solve_box_qp(Q, c, MARGIN, active=act)
        assert ok.all()
        for b in range(len(g)):
            vb, okb = solve_box_qp(Q[b:b + 1], c[b:b + 1], MARGIN, active=act[b:b + 1])
            assert okb.all()
            pb = (torch.where(act[b], vb[0], 0.0) @ M[b])
            p = (torch.where(act[b], v[b], 0.0) @ M[b])
            scale = (g[b].norm() + M[b].norm() * v[b].norm()).item()
            assert (p - pb).norm().item() <= 1e-9 * scale


def test_kkt_flags_wrong_answers_and_edge_shapes():
    rng = np.random.default_rng(2)
    g, M, act = _instances(rng, 8, 4, torch.float64)
    act[:] = True
    Q, c = build_qp(g, M, EPS)
    v, ok = solve_box_qp(Q, c, MARGIN)
    assert ok.all()
    assert (kkt_residual(Q, c, v + 1.0, MARGIN) > 1e-6).all()  # not stationary any more
    assert (kkt_residual(Q, c, v - 1.0, MARGIN) > 1e-6).all()  # infeasible
    v0, ok0 = solve_box_qp(torch.zeros(0, 3, 3), torch.zeros(0, 3), MARGIN)
    assert v0.shape == (0, 3) and ok0.shape == (0,)
    ve, oke = solve_box_qp(torch.zeros(2, 0, 0), torch.zeros(2, 0), MARGIN)
    assert ve.shape == (2, 0) and oke.all()
    # M = 0: Q = eps*I, c = 0 -> v = margin exactly.
    vz, okz = solve_box_qp(EPS * torch.eye(3).expand(4, 3, 3), torch.zeros(4, 3), MARGIN)
    assert okz.all() and (vz == MARGIN).all()
    with pytest.raises(ValueError):
        solve_box_qp(torch.zeros(2, 3, 3), torch.zeros(2, 4), MARGIN)
