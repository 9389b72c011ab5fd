"""Pure math core of data value embeddings: one block's backward recursion, no I/O.

The derivation is in ``docs/math.md``. In short: linearise one optimizer step of the state
``(theta, v)`` around the recorded trajectory and propagate removals forward; the embeddings are
the columns of the product of step Jacobians, carried backward as a *row operator*

    R^(t) = [R_theta, R_v]   (n x 2k):  delta theta_T (and, with ``velocity``, delta v_T)
                                         = R_theta delta theta_t + R_v delta v_t

Starting from ``R^(T) = [I, 0]`` the step map of SGD with coupled weight decay ``lam``, momentum
``beta``, dampening ``d``, clipping coefficient ``c`` and curvature ``H = F^T F`` gives

    A = c H + lam I
    P = a R_v - b R_theta                   (a, b, beta_in, gamma from the optimizer, see StepCoef)
    e_t(z)     = -c w P g_t(z)               embedding of every row of step t
    R_theta   <- R_theta + P A
    R_v       <- beta_in (R_v - gamma R_theta)

For plain SGD (no momentum) ``R_v = 0``, ``P = -eta (I - M)`` and this is the recursion of the
paper, ``E = eta w (G - G @ M.T)``, ``M <- M + eta (I - M) H``. ``R_theta`` is kept as
``Theta0 - M`` with ``Theta0 = [I; 0]`` so that float32 state keeps the small entries of ``M``.
Every product is a (rows x k) by (k x n) product: a step costs ``O((b + f) n k)`` flops and
never forms ``H``.

On a clipped step the coefficient's own derivative is kept with ``clip_u`` (``A = c (I - u u^T) H
+ lam I``, injection ``c w (I - u u^T) g``), see ``docs/math.md`` section 5.

Extend by adding a curvature kind: give :func:`step_back` its rows ``F`` (``H = F^T F``, weights
included), the string ``"empirical_fisher"`` (``F = sqrt(w) G``, reusing ``G @ P^T``), or an explicit
symmetric matrix wrapped in :class:`CurvMatrix` (e.g. the exact Hessian, which is indefinite and has
no real rows ``F``): then ``P A = c (H P^T)^T + lam P`` costs one ``(k x k) @ (k x n)`` product.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np

from datavalue._blas import gemm_nogil

__all__ = [
    "BlockState",
    "StepCoef",
    "init_state",
    "step_back",
    "step_coefficients",
    "operator",
    "state_from_operator",
    "chain",
    "AdamBlockState",
    "AdamStepCoef",
    "adam_coefficients",
    "adam_step_back",
    "init_adam_state",
    "adam_operator",
    "adam_state_from_operator",
    "CurvMatrix",
]


@dataclasses.dataclass(frozen=True)
class CurvMatrix:
    """An explicit symmetric curvature block ``H_t`` (``k x k``, weights included, before the
    clipping coefficient), for curvatures that are not a sum of squares such as the exact Hessian.

    Example:
        >>> F = np.array([[1.0, 2.0]])
        >>> s1, _ = step_back(init_state(2), F, np.array([1.0]), lr=0.1, curv=F)
        >>> s2, _ = step_back(init_state(2), F, np.array([1.0]), lr=0.1, curv=CurvMatrix(F.T @ F))
        >>> bool(np.allclose(s1.M, s2.M))
        True
    """

    H: np.ndarray


Curv = np.ndarray | CurvMatrix | Literal["empirical_fisher"] | None


def _max_abs(a: np.ndarray | None) -> float:
    """``max |a|`` in two passes without an ``abs()`` temporary (0 for ``None`` or empty)."""
    if a is None or not a.size:
        return 0.0
    return max(float(a.max()), -float(a.min()))


class _OperatorShape:
    """``n``, ``k`` and ``dtype`` of a block state, read from its ``M`` (``(n, k)``)."""

    M: np.ndarray

    @property
    def n(self) -> int:
        return int(self.M.shape[0])

    @property
    def k(self) -> int:
        return int(self.M.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self.M.dtype


@dataclasses.dataclass(frozen=True)
class BlockState(_OperatorShape):
    """Backward state of one block: the row operator ``R = [Theta0 - M, R_v]``.

    Attributes:
        M: ``(n, k)`` with ``R_theta = Theta0 - M``; ``Theta0`` is the identity in the first ``k``
            rows and zero below.
        Rv: ``(n, k)`` velocity columns of the operator, or ``None`` when they are zero (every
            plain-SGD step resets them to zero).
    """

    M: np.ndarray
    Rv: np.ndarray | None

    def max_abs(self) -> float:
        """Largest entry of ``[M, R_v]`` in absolute value (the explosion monitor)."""
        return max(_max_abs(self.M), _max_abs(self.Rv))


@dataclasses.dataclass(frozen=True)
class StepCoef:
    """Scalars of one linearised step (see ``docs/math.md``, section "Momentum").

    ``v' = beta_in v + a d``, ``theta' = theta - eta (nu d + mu v')`` with ``d`` the decayed,
    clipped gradient. ``b = eta (nu + mu a)`` multiplies the injected gradient and
    ``gamma = eta mu``.
    """

    a: float
    b: float
    beta_in: float
    gamma: float


def step_coefficients(
    lr: float,
    *,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    fresh: bool = False,
) -> StepCoef:
    """Coefficients of one ``torch.optim.SGD`` step.

    Args:
        lr: the step size ``eta_t``.
        momentum: ``beta_t`` (0 = plain SGD).
        dampening: torch's ``dampening`` (not applied on the step that creates the buffer).
        nesterov: torch's ``nesterov``.
        fresh: this step creates the momentum buffer (torch sets ``buf = d`` on the first step
            with ``momentum != 0``): no carried velocity, no dampening.

    Example:
        >>> step_coefficients(0.1)
        StepCoef(a=1.0, b=0.1, beta_in=0.0, gamma=0.1)
    """
    eta = float(lr)
    beta = float(momentum)
    if beta == 0.0:
        return StepCoef(a=1.0, b=eta, beta_in=0.0, gamma=eta)
    a = 1.0 if fresh else 1.0 - float(dampening)
    beta_in = 0.0 if fresh else beta
    if nesterov:
        return StepCoef(a=a, b=eta * (1.0 + beta * a), beta_in=beta_in, gamma=eta * beta)
    return StepCoef(a=a, b=eta * a, beta_in=beta_in, gamma=eta)


def init_state(k: int, *, velocity: bool = False, dtype: np.dtype | str = np.float64) -> BlockState:
    """State at the end of training: ``R^(T) = [I, 0]`` (``velocity=False``, ``n = k`` rows)
    or the full ``2k x 2k`` identity (``velocity=True``, rows for ``delta theta_T`` then
    ``delta v_T``; also the start of a segment's transfer operator).

    Example:
        >>> init_state(3).M.shape, init_state(3, velocity=True).Rv.shape
        ((3, 3), (6, 3))
    """
    dtype = np.dtype(dtype)
    n = 2 * k if velocity else k
    M = np.zeros((n, k), dtype=dtype)
    Rv = None
    if velocity:
        Rv = np.zeros((n, k), dtype=dtype)
        Rv[k:] = np.eye(k, dtype=dtype)
    return BlockState(M=M, Rv=Rv)


def _pad(X: np.ndarray, n: int) -> np.ndarray:
    """``X @ Theta0.T``: ``X`` (rows, k) placed in the first k of n columns."""
    if X.shape[1] == n:
        return X
    out = np.zeros((X.shape[0], n), dtype=X.dtype)
    out[:, : X.shape[1]] = X
    return out


# ---------------------------------------------------------------------- row-split GEMMs
#
# The streaming scan runs its GEMMs next to a row-reader and a writer thread. BLAS's own threads
# spin-wait between calls and starve those threads (measured on 2 cores: a 2048-wide operator ran
# at 3,041 occurrences/s on 2 OpenBLAS threads, 4,531 on one). Instead the scan keeps BLAS at one
# thread and, for wide operators, splits each GEMM by rows of the operator over a small pool of
# Python threads that block (not spin) between steps. Measured in a real build (one 2048-wide
# operator, b = 128, float32, 300 steps, median of 3): 4,715 occurrences/s unsplit, 5,831 split.
_GEMM = threading.local()
_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_BLOCK_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
#: Operators narrower than this are never split (the GEMMs are too small to share).
SPLIT_MIN = 512


@contextlib.contextmanager
def gemm_threads(n: int) -> Iterator[None]:
    """Within the context, split the GEMMs of operators at least :data:`SPLIT_MIN` wide over
    ``n`` threads (this thread only; BLAS itself should run one thread, see ``threadpoolctl``)."""
    old = getattr(_GEMM, "n", 1)
    _GEMM.n = max(1, int(n))
    try:
        yield
    finally:
        _GEMM.n = old


def gemm_thread_count() -> int:
    """The thread count set by :func:`gemm_threads` for this thread (1 outside it)."""
    return int(getattr(_GEMM, "n", 1))


def run_threads(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run zero-argument callables on the GEMM pool of :func:`gemm_thread_count` threads (inside
    :func:`gemm_threads`; the callers' GEMMs release the GIL), results in order."""
    n = max(1, min(gemm_thread_count(), len(fns)))
    pool = _BLOCK_POOLS.get(n)
    if pool is None:  # apart from the row-split pools
        pool = _BLOCK_POOLS[n] = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="datavalue-blocks")
    return list(pool.map(lambda f: f(), fns))


def _parts(rows: int) -> list[tuple[int, int]] | None:
    n = gemm_thread_count()
    if n <= 1 or rows < SPLIT_MIN:
        return None
    edges = np.linspace(0, rows, n + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _map(fn: Callable[[int, int], Any], parts: list[tuple[int, int]]) -> list[Any]:
    pool = _POOLS.get(len(parts))
    if pool is None:
        pool = _POOLS[len(parts)] = concurrent.futures.ThreadPoolExecutor(
            len(parts), thread_name_prefix="datavalue-gemm"
        )
    return list(pool.map(lambda ab: fn(*ab), parts))


def _sub_outer(M: np.ndarray, X: np.ndarray, Y: np.ndarray, alpha: float = 1.0) -> None:
    """``M -= alpha X.T @ Y`` in place: one BLAS GEMM with beta=1 (no temporary) on one thread; split
    by rows of ``M`` inside :func:`gemm_threads`."""
    if M.flags.c_contiguous and M.dtype in (np.float64, np.float32) and X.shape[0]:
        X = np.ascontiguousarray(X, dtype=M.dtype)
        Y = np.ascontiguousarray(Y, dtype=M.dtype)
        parts = _parts(M.shape[0])
        if parts is None:
            if gemm_nogil(M, X, Y, alpha=-float(alpha), beta=1.0, trans_a=True):
                return
            from scipy.linalg import blas  # imported on first use only (0.15 s)

            gemm = blas.dgemm if M.dtype == np.float64 else blas.sgemm
            # C-contiguous M is the Fortran-ordered M.T:  M.T <- M.T - Y.T @ X
            gemm(-float(alpha), Y, X, beta=1.0, c=M.T, trans_a=1, overwrite_c=1)
            return
        # scipy's sgemm (its own OpenBLAS) does not run in parallel from two threads (two halves of a
        # 2048-wide float32 update: 12.0 ms one after the other, 13.8 ms on two threads). numpy's
        # OpenBLAS called through ctypes does (10.3 / 6.0 ms) and accumulates in place
        # (datavalue._blas.gemm_nogil); without it, numpy's matmul into a per-thread buffer plus an
        # in-place subtraction (one extra pass over the part's rows).
        def part(a: int, b: int) -> None:
            if gemm_nogil(M[a:b], X[:, a:b], Y, alpha=-float(alpha), beta=1.0, trans_a=True):
                return
            buf = _buffer((b - a, M.shape[1]), M.dtype)
            np.matmul(X[:, a:b].T, Y, out=buf)
            if alpha != 1.0:
                buf *= alpha
            M[a:b] -= buf

        _map(part, parts)
        return
    M -= alpha * (X.T @ Y)


def _buffer(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """A reusable scratch array of this thread (no page faults per step for a large temporary)."""
    bufs = getattr(_GEMM, "bufs", None)
    if bufs is None:
        bufs = _GEMM.bufs = {}
    key = (shape, np.dtype(dtype).str)
    buf = bufs.get(key)
    if buf is None:
        bufs.clear()  # keep one shape per thread
        buf = bufs[key] = np.empty(shape, dtype=dtype)
    return buf


def _matmul_T(X: np.ndarray, M: np.ndarray, *, alpha: float = 1.0, minus: np.ndarray | None = None) -> np.ndarray:
    """``alpha (X @ M.T - minus @ Theta0.T)`` (rows, M.shape[0]), split by rows of ``M`` inside
    :func:`gemm_threads`; ``minus`` (rows, k <= M.shape[0]) fills the output first and the GEMM
    accumulates onto it (one pass instead of a subtraction and a scaling)."""
    parts = _parts(M.shape[0])
    dtype = np.result_type(X, M)
    if parts is None:
        out = X @ M.T
        if minus is not None:
            out[:, : minus.shape[1]] -= minus
        if alpha != 1.0:
            out *= alpha
        return out
    out = np.empty((X.shape[0], M.shape[0]), dtype=dtype)
    X = np.ascontiguousarray(X, dtype=dtype)
    if minus is not None:
        np.multiply(minus, -alpha, out=out[:, : minus.shape[1]])
    if minus is None or minus.shape[1] < out.shape[1]:
        out[:, 0 if minus is None else minus.shape[1] :] = 0.0

    def part(a: int, b: int) -> None:  # straight into the output's columns: no concatenation copy
        if not gemm_nogil(out[:, a:b], X, M[a:b], alpha=alpha, beta=1.0, trans_b=True):
            out[:, a:b] += alpha * (X @ M[a:b].T)

    _map(part, parts)
    return out


def _xpT(X: np.ndarray, state: BlockState, coef: StepCoef) -> np.ndarray:
    """``X @ P.T`` for rows ``X`` (rows, k), with ``P = a R_v - b (Theta0 - M)``: (rows, n)."""
    out = _matmul_T(X, state.M, alpha=coef.b, minus=X)
    if state.Rv is not None and coef.a != 0.0:
        out += coef.a * (X @ state.Rv.T)
    return out


def _pu(state: BlockState, coef: StepCoef, u: np.ndarray) -> np.ndarray:
    """``P @ u`` (n,) with ``P = a R_v - b (Theta0 - M)``."""
    out = coef.b * (state.M @ u)
    out[: state.k] -= coef.b * u
    if state.Rv is not None and coef.a != 0.0:
        out += coef.a * (state.Rv @ u)
    return out


def step_back(
    state: BlockState,
    G: np.ndarray,
    w: np.ndarray,
    *,
    lr: float,
    curv: Curv = "empirical_fisher",
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    fresh: bool = False,
    grad_scale: float = 1.0,
    clip_u: np.ndarray | None = None,
    clip_ug: np.ndarray | None = None,
    embed: bool = True,
    inplace: bool = False,
) -> tuple[BlockState, np.ndarray | None]:
    """One step of the backward recursion for one block (pure unless ``inplace``).

    Args:
        state: the operator after step t (from later steps only).
        G: ``(b, k)`` unweighted per-sample gradients of step t, taken before its update.
        w: ``(b,)`` weights ``w_t(z)`` of the rows in the stepped loss.
        lr: ``eta_t``.
        curv: ``(f, k)`` curvature rows ``F`` with ``H_t = F^T F`` (weights included, before
            ``grad_scale``); a :class:`CurvMatrix` holding ``H_t`` itself; ``"empirical_fisher"``
            for ``F = sqrt(w) G``; ``None`` for ``H = 0``.
        weight_decay: coupled decay ``lambda_t`` (torch.optim.SGD semantics).
        momentum, dampening, nesterov, fresh: see :func:`step_coefficients`.
        grad_scale: clipping coefficient ``c_t``.
        clip_u: for a clipped step (``c_t < 1``), this block's part of the unit direction
            ``u = g_hat / ||g_hat||`` of the step's whole gradient ``g_hat = sum_z w g``. Given, the
            dependence of ``c_t = max_norm / ||g_hat||`` on the weights and on the removed example
            is kept (``d(c g_hat) = c (I - u u^T) d g_hat``, block-diagonally); ``None`` treats
            ``c_t`` as a constant. See ``docs/math.md``, section 5.
        clip_ug: ``(b,)`` the rows' inner products with the *whole* ``u`` (all blocks);
            default: this block's ``G @ clip_u``.
        embed: compute the embeddings (``False``: operator only, for transfer operators).
        inplace: update ``state.M`` in place instead of copying it (the streaming builders do;
            a ``k x k`` copy per step costs as much as the update itself on many cores).

    Returns:
        ``(new_state, E)`` with ``E`` the ``(b, n)`` embeddings (row-stacked ``e_t(z)``; the first
        ``k`` columns are ``delta theta_T``), or ``None`` when ``embed`` is False.
        Sign: ``loss(without) - loss(with) ~= E[i, :k] @ g_test``; positive = helpful.

    Example:
        >>> s = init_state(2)
        >>> s, E = step_back(s, np.array([[1.0, 2.0]]), np.array([1.0]), lr=0.5)
        >>> E.tolist(), s.M.tolist()
        ([[0.5, 1.0]], [[0.5, 1.0], [1.0, 2.0]])
    """
    dtype = state.dtype
    G = np.asarray(G, dtype=dtype)
    w = np.asarray(w, dtype=dtype)
    coef = step_coefficients(
        lr, momentum=momentum, dampening=dampening, nesterov=nesterov, fresh=fresh
    )
    c = float(grad_scale)
    lam = float(weight_decay)

    GP = _xpT(G, state, coef) if (embed or (isinstance(curv, str) and G.shape[0])) else None
    Pu = u = None
    if clip_u is not None:
        u = np.asarray(clip_u, dtype=dtype)
        Pu = _pu(state, coef, u)
    E = None
    if embed:
        assert GP is not None
        if Pu is not None:
            ug = G @ u if clip_ug is None else np.asarray(clip_ug, dtype=dtype)
            E = (GP - np.outer(ug, Pu)) * (-c * w)[:, None]
        else:
            E = GP * (-c * w)[:, None]

    # Everything that reads the old state is computed before M is updated (in place or not).
    lamP = None
    if lam != 0.0:
        # P = a R_v + b M - b Theta0
        lamP = (lam * coef.b) * state.M
        if state.Rv is not None:
            lamP += (lam * coef.a) * state.Rv
        k = state.k
        lamP[np.arange(k), np.arange(k)] -= lam * coef.b
    if coef.beta_in == 0.0:
        Rv = None
    else:
        # R_v <- beta_in (R_v - gamma (Theta0 - M_old))
        Rv = coef.gamma * state.M
        Rv[np.arange(state.k), np.arange(state.k)] -= coef.gamma
        if state.Rv is not None:
            Rv += state.Rv
        Rv *= coef.beta_in

    # P A = c (F P^T)^T F + lam P ; M <- M - P A
    M = state.M if inplace else state.M.copy()
    if isinstance(curv, str):
        if curv != "empirical_fisher":
            raise ValueError(f"curv must be an array, 'empirical_fisher' or None, got {curv!r}")
        if G.shape[0] and E is not None and Pu is None:
            # (c sqrt(w) GP)^T (sqrt(w) G) = -E^T G: the embeddings already carry c w (no scaled copies;
            # a clipped step's E uses the whole gradient's u @ g, its update this block's)
            _sub_outer(M, E, G, alpha=-1.0)
        elif G.shape[0]:
            sw = np.sqrt(w)
            assert GP is not None
            FP = GP if Pu is None else GP - np.outer(G @ u, Pu)
            _sub_outer(M, FP * (c * sw)[:, None], G * sw[:, None])
    elif isinstance(curv, CurvMatrix):
        H = np.asarray(curv.H, dtype=dtype)
        HP = _xpT(H, state, coef)  # H P^T: (k, n); H symmetric, so P H = HP.T
        if Pu is not None:
            HP -= np.outer(H @ u, Pu)
        M -= c * HP.T
    elif curv is not None:
        F = np.asarray(curv, dtype=dtype)
        if F.shape[0]:
            FP = _xpT(F, state, coef)
            if Pu is not None:
                FP -= np.outer(F @ u, Pu)
            _sub_outer(M, FP * c, F)
    if lamP is not None:
        M -= lamP
    return BlockState(M=M, Rv=Rv), E


# ---------------------------------------------------------------------- operators


def _theta0_minus(X: np.ndarray) -> np.ndarray:
    """``Theta0 - X`` for an ``(n, k)`` block (``Theta0 = [I; 0]``), a new array: it turns ``M`` into
    the operator's ``R_theta`` columns and back."""
    out = -X
    k = X.shape[1]
    out[np.arange(k), np.arange(k)] += 1.0
    return out


def operator(state: BlockState, width: int | None = None) -> np.ndarray:
    """The row operator ``[Theta0 - M, R_v]`` as an ``(n, width)`` matrix.

    ``width`` is ``k`` (velocity columns must then be zero) or ``2k`` (default: ``2k`` when the
    state carries ``R_v``, else ``k``).
    """
    n, k = state.n, state.k
    if width is None:
        width = 2 * k if state.Rv is not None else k
    if width not in (k, 2 * k):
        raise ValueError(f"width must be k={k} or 2k={2 * k}, got {width}")
    R = np.zeros((n, width), dtype=state.dtype)
    R[:, :k] = _theta0_minus(state.M)
    if state.Rv is not None:
        if width == k:
            if np.any(state.Rv):
                raise ValueError("the state carries velocity columns; ask for width=2k")
        else:
            R[:, k:] = state.Rv
    return R


def state_from_operator(R: np.ndarray, k: int) -> BlockState:
    """Inverse of :func:`operator`: ``R`` is ``(n, k)`` or ``(n, 2k)``."""
    R = np.asarray(R)
    M = _theta0_minus(R[:, :k])
    Rv = None
    if R.shape[1] == 2 * k and np.any(R[:, k:]):
        Rv = R[:, k:].copy()
    return BlockState(M=M, Rv=Rv)


def chain(R: np.ndarray, Phi: np.ndarray, k: int) -> np.ndarray:
    """``R @ Phi`` for a row operator ``R`` (n, k|2k) at a segment's end and the segment's transfer
    operator ``Phi`` (k x k for a segment without momentum, else 2k x 2k). Widths are matched by
    zero padding; a k x k ``Phi`` is only valid when ``R``'s velocity columns are zero (the
    segment's last step carries no velocity), which is checked.
    """
    wR, wP = R.shape[1], Phi.shape[0]
    if wR == wP:
        return R @ Phi
    if wR == 2 * k and wP == k:
        if np.any(R[:, k:]):
            raise ValueError("a k x k transfer operator cannot absorb non-zero velocity columns")
        return R[:, :k] @ Phi
    if wR == k and wP == 2 * k:
        return R @ Phi[:k]
    raise ValueError(
        f"cannot chain an operator of width {wR} with a transfer operator of size {wP} (k={k})"
    )


# ---------------------------------------------------------------------- Adam / AdamW


@dataclasses.dataclass(frozen=True)
class AdamBlockState(_OperatorShape):
    """Backward state of one block under Adam/AdamW: ``R = [Theta0 - M, R_m, R_v]`` (``n x 3k``).

    ``R_m``/``R_v`` are the operator's columns on the perturbations of the first and second
    moments; ``None`` means zero (``R_v`` stays ``None`` when the second-moment term is dropped).
    """

    M: np.ndarray
    Rm: np.ndarray | None
    Rv: np.ndarray | None

    def max_abs(self) -> float:
        """Largest ``|entry|`` of ``M`` (the explosion monitor; ``R_m``/``R_v`` are in the units of
        the moments, ``R_v`` scales like ``1 / g^2`` and is large by construction)."""
        return _max_abs(self.M)

    def finite(self) -> bool:
        return all(bool(np.all(np.isfinite(x))) for x in (self.M, self.Rm, self.Rv) if x is not None)


@dataclasses.dataclass(frozen=True)
class AdamStepCoef:
    """Per-parameter coefficients of one linearised Adam/AdamW step (``docs/math.md``, section 7).

    With ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2`` and
    ``theta' = decay theta - lr c1 m' / (sqrt(c2 v') + eps)`` (``c1, c2`` the bias corrections):

        d theta' = decay d theta - p * d m' + q * d v'
        p = lr c1 / (sqrt(c2 v') + eps),  q = lr c1 m' sqrt(c2) / (2 sqrt(v') (sqrt(c2 v') + eps)^2)
        r = 2 (1 - b2) g                  (d v' = b2 d v + r * d g)

    Attributes: ``p``, ``q`` (``None``: second-moment term dropped), ``r`` are ``(k,)``;
    ``b1``, ``b2`` the betas; ``decay = 1 - lr wd`` for AdamW's decoupled decay (else 1);
    ``lam`` Adam's coupled decay (``g`` includes ``lam theta``; else 0).
    """

    p: np.ndarray
    q: np.ndarray | None
    r: np.ndarray | None
    b1: float
    b2: float
    decay: float = 1.0
    lam: float = 0.0


def adam_coefficients(
    m_next: np.ndarray,
    v_next: np.ndarray,
    g: np.ndarray,
    *,
    lr: float,
    step: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
    decoupled: bool = True,
    second_moment: bool = True,
) -> AdamStepCoef:
    """Coefficients of one torch Adam/AdamW step from the moments *after* it (``m_next``,
    ``v_next``), the gradient ``g`` the optimizer used (clipped, with Adam's coupled decay) and
    the bias-correction count ``step`` (1 at the first update). Parameters with ``v_next == 0``
    (never any gradient) get ``p = q = 0``: their gradient perturbations are zero too.
    """
    b1, b2 = float(betas[0]), float(betas[1])
    c1 = 1.0 / (1.0 - b1**step)
    c2 = 1.0 / (1.0 - b2**step)
    v_next = np.maximum(np.asarray(v_next, dtype=np.float64), 0.0)
    sv = np.sqrt(v_next)
    D = np.sqrt(c2) * sv + eps
    live = v_next > 0
    p = np.where(live, lr * c1 / D, 0.0)
    q = r = None
    if second_moment:
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(live, lr * c1 * np.asarray(m_next) * np.sqrt(c2) / (2.0 * sv * D * D), 0.0)
        r = 2.0 * (1.0 - b2) * np.asarray(g, dtype=np.float64)
    wd = float(weight_decay)
    return AdamStepCoef(
        p=p,
        q=q,
        r=r,
        b1=b1,
        b2=b2,
        decay=1.0 - lr * wd if decoupled else 1.0,
        lam=0.0 if decoupled else wd,
    )


def init_adam_state(k: int, *, dtype: np.dtype | str = np.float64, transfer: bool = False) -> AdamBlockState:
    """``R^(T) = [I, 0, 0]``: embeddings are ``delta theta_T``. With ``transfer``, the identity on the
    whole ``3k`` state (``n = 3k`` rows): the scan then yields a segment's transfer operator."""
    dt = np.dtype(dtype)
    if not transfer:
        return AdamBlockState(M=np.zeros((k, k), dtype=dt), Rm=None, Rv=None)
    return adam_state_from_operator(np.eye(3 * k, dtype=dt), k)


def adam_operator(state: AdamBlockState) -> np.ndarray:
    """The row operator ``[Theta0 - M, R_m, R_v]`` as an ``(n, 3k)`` matrix (zeros for a ``None`` part)."""
    n, k = state.n, state.k
    R = np.zeros((n, 3 * k), dtype=state.dtype)
    R[:, :k] = _theta0_minus(state.M)
    if state.Rm is not None:
        R[:, k : 2 * k] = state.Rm
    if state.Rv is not None:
        R[:, 2 * k :] = state.Rv
    return R


def adam_state_from_operator(R: np.ndarray, k: int) -> AdamBlockState:
    """Inverse of :func:`adam_operator`: ``R`` is ``(n, 3k)``."""
    R = np.asarray(R)
    if R.shape[1] != 3 * k:
        raise ValueError(f"an Adam operator has 3k={3 * k} columns, got {R.shape[1]}")
    M = _theta0_minus(R[:, :k])
    Rm = R[:, k : 2 * k].copy() if np.any(R[:, k : 2 * k]) else None
    Rv = R[:, 2 * k :].copy() if np.any(R[:, 2 * k :]) else None
    return AdamBlockState(M=M, Rm=Rm, Rv=Rv)


def _adam_xpT(X: np.ndarray, state: AdamBlockState, coef: AdamStepCoef, s: np.ndarray) -> np.ndarray:
    """``X @ P.T`` with ``P = (1 - b1) R_m + R_v diag(r) - R_theta diag(s)``: (rows, n)."""
    Xs = X * s[None, :]
    out = Xs @ state.M.T
    out -= _pad(Xs, state.n)
    if state.Rm is not None:
        out += (1.0 - coef.b1) * (X @ state.Rm.T)
    if state.Rv is not None and coef.r is not None:
        out += (X * coef.r[None, :]) @ state.Rv.T
    return out


def adam_step_back(
    state: AdamBlockState,
    G: np.ndarray,
    w: np.ndarray,
    coef: AdamStepCoef,
    *,
    curv: Curv = "empirical_fisher",
    grad_scale: float = 1.0,
    embed: bool = True,
) -> tuple[AdamBlockState, np.ndarray | None]:
    """One step of the Adam-aware backward recursion for one block (pure).

    The row operator ``R = [R_theta, R_m, R_v]`` is updated to ``R J_t`` with ``J_t`` the
    Jacobian of the linearised step on ``(delta theta, delta m, delta v)``; with
    ``s = (1 - b1) p - q r`` and ``P = (1 - b1) R_m + R_v diag(r) - R_theta diag(s)``:

        e_t(z)   = -c w P g_t(z)                        (removal injects d g = -c w g_t(z))
        R_theta <- decay R_theta + P A,    A = c H + lam I
        R_m     <- b1 (R_m - R_theta diag(p))
        R_v     <- b2 (R_v + R_theta diag(q))           (R_theta, R_m, R_v: before the update)

    Args: as :func:`step_back`; ``coef`` from :func:`adam_coefficients` (this block's columns).

    Returns:
        ``(new_state, E)``, ``E`` the ``(b, n)`` embeddings (``delta theta_T`` rows). Sign:
        ``loss(without) - loss(with) ~= E[i] @ g_test``; positive = helpful.
    """
    dtype = state.dtype
    G = np.asarray(G, dtype=dtype)
    w = np.asarray(w, dtype=dtype)
    c = float(grad_scale)
    k, n = state.k, state.n
    p = np.asarray(coef.p, dtype=dtype)
    s = (1.0 - coef.b1) * p
    keep_v = coef.q is not None and coef.r is not None
    if keep_v:
        s = s - np.asarray(coef.q, dtype=dtype) * np.asarray(coef.r, dtype=dtype)
    need_gp = embed or (isinstance(curv, str) and G.shape[0] > 0)
    GP = _adam_xpT(G, state, coef, s) if need_gp else None
    E = GP * (-c * w)[:, None] if embed and GP is not None else None

    # P A = c (F P^T)^T F + lam P
    PA = np.zeros((n, k), dtype=dtype)
    if isinstance(curv, str):
        if curv != "empirical_fisher":
            raise ValueError(f"curv must be an array, 'empirical_fisher' or None, got {curv!r}")
        if G.shape[0]:
            sw = np.sqrt(w)
            assert GP is not None
            PA += c * ((GP * sw[:, None]).T @ (G * sw[:, None]))
    elif isinstance(curv, CurvMatrix):
        PA += c * _adam_xpT(np.asarray(curv.H, dtype=dtype), state, coef, s).T
    elif curv is not None:
        F = np.asarray(curv, dtype=dtype)
        if F.shape[0]:
            PA += c * (_adam_xpT(F, state, coef, s).T @ F)
    if coef.lam != 0.0:
        P = state.M * s[None, :]
        P[np.arange(k), np.arange(k)] -= s
        if state.Rm is not None:
            P += (1.0 - coef.b1) * state.Rm
        if state.Rv is not None and coef.r is not None:
            P += state.Rv * np.asarray(coef.r, dtype=dtype)[None, :]
        PA += coef.lam * P
    # R_theta' = decay R_theta + P A  <=>  M' = decay M + (1 - decay) Theta0 - P A
    M = coef.decay * state.M - PA
    if coef.decay != 1.0:
        M[np.arange(k), np.arange(k)] += 1.0 - coef.decay
    # R_theta diag(x) = (Theta0 - M) diag(x)
    Rt_p = -state.M * p[None, :]
    Rt_p[np.arange(k), np.arange(k)] += p
    Rm = -Rt_p if state.Rm is None else state.Rm - Rt_p
    Rm *= coef.b1
    Rv = None
    if keep_v:
        q = np.asarray(coef.q, dtype=dtype)
        Rt_q = -state.M * q[None, :]
        Rt_q[np.arange(k), np.arange(k)] += q
        Rv = Rt_q if state.Rv is None else state.Rv + Rt_q
        Rv *= coef.b2
    return AdamBlockState(M=M, Rm=Rm, Rv=Rv), E
