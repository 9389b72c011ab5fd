"""The recursion against explicit products of step Jacobians (float64, tiny problems)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from datavalue.embeddings import _core as core
from datavalue.embeddings import _gemm


def _jacobian(k, H, *, lr, wd, mom, damp, nest, fresh, c, u=None):
    """Explicit 2k x 2k Jacobian of one torch.optim.SGD step in (theta, v)."""
    co = core.step_coefficients(lr, momentum=mom, dampening=damp, nesterov=nest, fresh=fresh)
    Pc = (
        np.eye(k) if u is None else np.eye(k) - np.outer(u, u)
    )  # d(c g_hat) = c (I - u u^T) d g_hat
    A = c * Pc @ H + wd * np.eye(k)
    Id = np.eye(k)
    J = np.block([[Id - co.b * A, -co.gamma * co.beta_in * Id], [co.a * A, co.beta_in * Id]])
    return J, co


def _random_run(rng, T, k, *, f=None):
    steps = []
    for _ in range(T):
        b = int(rng.integers(1, 5))
        G = rng.normal(size=(b, k))
        w = np.full(b, 1.0 / b)
        F = None if f is None else rng.normal(size=(f, k)) * 0.3
        steps.append((G, w, F))
    return steps


def _explicit(steps, params, k, curvature):
    """Embeddings (delta theta_T, delta v_T) of every row by explicit products."""
    T = len(steps)
    Js, injs = [], []
    for t, (G, w, F) in enumerate(steps):
        p = params[t]
        if curvature == "empirical_fisher":
            H = (G * w[:, None]).T @ G
        elif curvature == "none":
            H = np.zeros((k, k))
        else:
            H = F.T @ F
        J, co = _jacobian(k, H, **p)
        Js.append(J)
        Gc = G if p.get("u") is None else G - np.outer(G @ p["u"], p["u"])
        inj = np.concatenate(
            [co.b * p["c"] * w[:, None] * Gc, -co.a * p["c"] * w[:, None] * Gc], axis=1
        )
        injs.append(inj)
    out = []
    for t in range(T):
        Phi = np.eye(2 * k)
        for s in range(T - 1, t, -1):
            Phi = Phi @ Js[s]
        out.append(injs[t] @ Phi.T)
    return np.concatenate(out), Js


def _params(rng, T, *, wd=False, mom=False, nest=False, damp=False, clip=False, clipdir=False, k=5):
    ps = []
    for t in range(T):
        m = 0.9 if mom else 0.0
        ps.append(
            dict(
                lr=float(rng.uniform(0.05, 0.3)),
                wd=0.1 if wd else 0.0,
                mom=m,
                damp=0.3 if damp else 0.0,
                nest=nest,
                fresh=bool(mom and t == 0),
                c=float(rng.uniform(0.5, 1.0)) if clip or clipdir else 1.0,
                u=(lambda v: v / np.linalg.norm(v))(rng.normal(size=k)) if clipdir else None,
            )
        )
    return ps


def _recursion(steps, params, k, curvature, *, velocity):
    st = core.init_state(k, velocity=velocity)
    out = [None] * len(steps)
    for t in range(len(steps) - 1, -1, -1):
        G, w, F = steps[t]
        p = params[t]
        curv = {"empirical_fisher": "empirical_fisher", "none": None}.get(curvature, F)
        st, E = core.step_back(
            st,
            G,
            w,
            lr=p["lr"],
            curv=curv,
            weight_decay=p["wd"],
            momentum=p["mom"],
            dampening=p["damp"],
            nesterov=p["nest"],
            fresh=p["fresh"],
            grad_scale=p["c"],
            clip_u=p.get("u"),
        )
        out[t] = E
    return np.concatenate(out), st


CASES = {
    "sgd": {},
    "weight_decay": dict(wd=True),
    "clip": dict(clip=True),
    "momentum": dict(mom=True),
    "momentum_wd_damp": dict(mom=True, wd=True, damp=True),
    "nesterov_wd_clip": dict(mom=True, nest=True, wd=True, clip=True),
    "clip_direction": dict(clipdir=True),
    "momentum_wd_clip_direction": dict(mom=True, wd=True, damp=True, clipdir=True),
}


@pytest.mark.parametrize("curvature", ["empirical_fisher", "fisher", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_recursion_equals_explicit_products(case, curvature):
    rng = np.random.default_rng(zlib.crc32(f"{case}-{curvature}".encode()))
    k, T = 5, 7
    steps = _random_run(rng, T, k, f=3)
    params = _params(rng, T, **CASES[case])
    want, Js = _explicit(steps, params, k, curvature)
    # velocity=True carries delta v_T as well
    got, st = _recursion(steps, params, k, curvature, velocity=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())
    # the final state is the whole-run transfer operator
    Phi = np.eye(2 * k)
    for J in reversed(Js):
        Phi = Phi @ J
    Phi = Phi  # J_{T-1} ... J_0
    np.testing.assert_allclose(core.operator(st, 2 * k), Phi, atol=1e-10)
    # velocity=False gives the theta rows
    got_t, _ = _recursion(steps, params, k, curvature, velocity=False)
    np.testing.assert_allclose(got_t, want[:, :k], rtol=0, atol=1e-10 * np.abs(want).max())


def test_plain_sgd_is_the_paper_recursion():
    """E = eta w (G - G @ M.T), M <- M + eta (I - M) H with H = sum w g g^T."""
    rng = np.random.default_rng(0)
    k, T = 4, 6
    steps = _random_run(rng, T, k)
    lrs = rng.uniform(0.1, 0.5, size=T)
    M = np.zeros((k, k))
    want = [None] * T
    for t in range(T - 1, -1, -1):
        G, w, _ = steps[t]
        want[t] = lrs[t] * w[:, None] * (G - G @ M.T)
        M = M + sum(np.outer(e, g) for e, g in zip(want[t], G, strict=True))
    st = core.init_state(k)
    got = [None] * T
    for t in range(T - 1, -1, -1):
        G, w, _ = steps[t]
        st, got[t] = core.step_back(st, G, w, lr=lrs[t])
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=1e-12)
    np.testing.assert_allclose(st.M, M, atol=1e-12)


def test_orientation_trap_is_caught():
    """Writing ``G @ M`` instead of ``G @ M.T`` must not pass the explicit-product check."""
    rng = np.random.default_rng(1)
    k, T = 5, 6
    steps = _random_run(rng, T, k)
    params = _params(rng, T)
    want, _ = _explicit(steps, params, k, "empirical_fisher")
    want = want[:, :k]
    M = np.zeros((k, k))
    wrong = [None] * T
    for t in range(T - 1, -1, -1):
        G, w, _ = steps[t]
        lr = params[t]["lr"]
        wrong[t] = lr * w[:, None] * (G - G @ M)  # the bug
        M = M + wrong[t].T @ G
    wrong = np.concatenate(wrong)
    got, _ = _recursion(steps, params, k, "empirical_fisher", velocity=False)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.abs(wrong - want).max() > 1e-3 * np.abs(want).max()
    # M is genuinely non-symmetric, which is what makes the orientation matter
    st = core.init_state(k)
    for t in range(T - 1, -1, -1):
        st, _ = core.step_back(st, steps[t][0], steps[t][1], lr=params[t]["lr"])
    assert np.abs(st.M - st.M.T).max() > 1e-3


def test_float32_state_tracks_float64():
    rng = np.random.default_rng(2)
    k, T = 6, 20
    steps = _random_run(rng, T, k)
    params = _params(rng, T, mom=True, wd=True)
    got64, _ = _recursion(steps, params, k, "empirical_fisher", velocity=False)
    st = core.init_state(k, dtype="float32")
    out = [None] * T
    for t in range(T - 1, -1, -1):
        G, w, _ = steps[t]
        p = params[t]
        st, out[t] = core.step_back(
            st, G, w, lr=p["lr"], weight_decay=p["wd"], momentum=p["mom"], fresh=p["fresh"]
        )
    got32 = np.concatenate(out)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, got64, atol=1e-5 * np.abs(got64).max())


def test_chain_of_segment_operators_equals_whole_run():
    rng = np.random.default_rng(3)
    k, T = 4, 9
    steps = _random_run(rng, T, k, f=2)
    params = _params(rng, T, mom=True, wd=True)
    _, st_full = _recursion(steps, params, k, "fisher", velocity=True)

    def seg_op(lo, hi):
        st = core.init_state(k, velocity=True)
        for t in range(hi - 1, lo - 1, -1):
            G, w, F = steps[t]
            p = params[t]
            st, _ = core.step_back(
                st,
                G,
                w,
                lr=p["lr"],
                curv=F,
                weight_decay=p["wd"],
                momentum=p["mom"],
                fresh=p["fresh"],
                embed=False,
            )
        return core.operator(st, 2 * k)

    R = core.operator(core.init_state(k, velocity=True), 2 * k)
    for lo, hi in [(6, 9), (2, 6), (0, 2)]:
        R = core.chain(R, seg_op(lo, hi), k)
    np.testing.assert_allclose(R, core.operator(st_full, 2 * k), atol=1e-12)
    back = core.operator(core.state_from_operator(R, k), 2 * k)
    np.testing.assert_allclose(back, R, atol=1e-14)


@pytest.mark.parametrize("nogil", [True, False], ids=["cblas", "numpy"])
@pytest.mark.parametrize("curv", ["fisher", "empirical_fisher"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_row_split_gemms_equal_the_unsplit_step(monkeypatch, dtype, momentum, curv, nogil):
    """Inside gemm_threads, wide operators split X @ M.T and the rank-b update by rows of M over a
    thread pool, through the GIL-free CBLAS GEMM or numpy's matmul; the result must equal the
    single-call step (to rounding)."""
    rng = np.random.default_rng(7)
    k, b = 37, 5
    G, F = rng.normal(size=(b, k)), rng.normal(size=(3 * b, k)) * 0.3
    w = np.full(b, 1.0 / b)
    base = core.init_state(k, velocity=momentum > 0, dtype=dtype)
    base.M[:] = rng.normal(size=base.M.shape) * 0.1
    kw = dict(lr=0.3, curv=F if curv == "fisher" else curv, momentum=momentum, weight_decay=0.01)
    want_state, want_E = core.step_back(base, G, w, **kw)
    monkeypatch.setattr(_gemm, "SPLIT_MIN", 8)  # split this small operator
    calls = []
    real = _gemm.gemm_nogil

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k) if nogil else False

    monkeypatch.setattr(_gemm, "gemm_nogil", spy)
    with core.gemm_threads(3):
        assert _gemm._parts(base.M.shape[0]) is not None
        got_state, got_E = core.step_back(base, G, w, **kw)
    assert calls  # the split path ran
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(got_E, want_E, atol=tol)
    np.testing.assert_allclose(got_state.M, want_state.M, atol=tol)
    assert _gemm._parts(k) is None  # the setting ends with the context
