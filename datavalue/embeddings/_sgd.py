"""The SGD recursion (momentum, weight decay, clipping) of one block: pure math, no I/O.

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

import dataclasses

import numpy as np

from datavalue.embeddings._backend import namespace
from datavalue.embeddings._gemm import matmul_T, sub_outer
from datavalue.embeddings._state import Curv, CurvMatrix, _max_abs, _OperatorShape, _theta0_minus

__all__ = [
    "BlockState",
    "StepCoef",
    "init_state",
    "step_back",
    "step_coefficients",
    "operator",
    "state_from_operator",
    "chain",
]


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


def _xpT(X: np.ndarray, state: BlockState, coef: StepCoef) -> np.ndarray:
    """``X @ P.T`` for rows ``X`` (rows, k), with ``P = a R_v - b (Theta0 - M)``: (rows, n)."""
    out = matmul_T(X, state.M, alpha=coef.b, minus=X)
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

    The state's array type picks the backend (:mod:`datavalue.embeddings._backend`): a state of torch
    tensors runs on their device, and the other arrays (numpy or torch) are moved there.

    Example:
        >>> s = init_state(2)
        >>> s, E = step_back(s, np.array([[1.0, 2.0]]), np.array([1.0]), lr=0.5)
        >>> E.tolist(), s.M.tolist()
        ([[0.5, 1.0]], [[0.5, 1.0], [1.0, 2.0]])
    """
    dtype = state.dtype
    xp = namespace(state.M)
    G = xp.asarray(G, dtype=dtype)
    w = xp.asarray(w, dtype=dtype)
    coef = step_coefficients(
        lr, momentum=momentum, dampening=dampening, nesterov=nesterov, fresh=fresh
    )
    c = float(grad_scale)
    lam = float(weight_decay)

    GP = _xpT(G, state, coef) if (embed or (isinstance(curv, str) and G.shape[0])) else None
    Pu = u = None
    if clip_u is not None:
        u = xp.asarray(clip_u, dtype=dtype)
        Pu = _pu(state, coef, u)
    E = None
    if embed:
        assert GP is not None
        if Pu is not None:
            ug = G @ u if clip_ug is None else xp.asarray(clip_ug, dtype=dtype)
            E = (GP - xp.outer(ug, Pu)) * (-c * w)[:, None]
        else:
            E = GP * (-c * w)[:, None]

    # Everything that reads the old state is computed before M is updated (in place or not).
    lamP = None
    if lam != 0.0:
        # P = a R_v + b M - b Theta0
        lamP = (lam * coef.b) * state.M
        if state.Rv is not None:
            lamP += (lam * coef.a) * state.Rv
        xp.add_diag(lamP, -lam * coef.b)
    if coef.beta_in == 0.0:
        Rv = None
    else:
        # R_v <- beta_in (R_v - gamma (Theta0 - M_old))
        Rv = coef.gamma * state.M
        xp.add_diag(Rv, -coef.gamma)
        if state.Rv is not None:
            Rv += state.Rv
        Rv *= coef.beta_in

    # P A = c (F P^T)^T F + lam P ; M <- M - P A
    M = state.M if inplace else xp.copy(state.M)
    if isinstance(curv, str):
        if curv != "empirical_fisher":
            raise ValueError(f"curv must be an array, 'empirical_fisher' or None, got {curv!r}")
        if G.shape[0] and E is not None and Pu is None:
            # (c sqrt(w) GP)^T (sqrt(w) G) = -E^T G: the embeddings already carry c w (no scaled copies;
            # a clipped step's E uses the whole gradient's u @ g, its update this block's)
            sub_outer(M, E, G, alpha=-1.0)
        elif G.shape[0]:
            sw = xp.sqrt(w)
            assert GP is not None
            FP = GP if Pu is None else GP - xp.outer(G @ u, Pu)
            sub_outer(M, FP * (c * sw)[:, None], G * sw[:, None])
    elif isinstance(curv, CurvMatrix):
        H = xp.asarray(curv.H, dtype=dtype)
        HP = _xpT(H, state, coef)  # H P^T: (k, n); H symmetric, so P H = HP.T
        if Pu is not None:
            HP -= xp.outer(H @ u, Pu)
        M -= c * HP.T
    elif curv is not None:
        F = xp.asarray(curv, dtype=dtype)
        if F.shape[0]:
            FP = _xpT(F, state, coef)
            if Pu is not None:
                FP -= xp.outer(F @ u, Pu)
            sub_outer(M, FP * c, F)
    if lamP is not None:
        M -= lamP
    return BlockState(M=M, Rv=Rv), E


# ---------------------------------------------------------------------- operators


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
    xp = namespace(state.M)
    R = xp.zeros((n, width), state.dtype)
    R[:, :k] = _theta0_minus(state.M)
    if state.Rv is not None:
        if width == k:
            if xp.any(state.Rv):
                raise ValueError("the state carries velocity columns; ask for width=2k")
        else:
            R[:, k:] = state.Rv
    return R


def state_from_operator(R: np.ndarray, k: int) -> BlockState:
    """Inverse of :func:`operator`: ``R`` is ``(n, k)`` or ``(n, 2k)`` (numpy, or torch on its device)."""
    xp = namespace(R)
    R = xp.asarray(R)
    M = _theta0_minus(R[:, :k])
    Rv = None
    if R.shape[1] == 2 * k and xp.any(R[:, k:]):
        Rv = xp.copy(R[:, k:])
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
        if namespace(R).any(R[:, k:]):
            raise ValueError("a k x k transfer operator cannot absorb non-zero velocity columns")
        return R[:, :k] @ Phi
    if wR == k and wP == 2 * k:
        return R @ Phi[:k]
    raise ValueError(
        f"cannot chain an operator of width {wR} with a transfer operator of size {wP} (k={k})"
    )
