"""The Adam/AdamW recursion of one block (``docs/math.md``, section 7): pure math, no I/O.

The row operator grows to ``R = [R_theta, R_m, R_v]`` (``n x 3k``): columns on the perturbations of
the weights and of Adam's first and second moments. :func:`adam_coefficients` linearises one torch
step from the recorded moments; :func:`adam_step_back` carries the operator one step back and
returns the step's embeddings, like :func:`datavalue.embeddings._sgd.step_back` for SGD.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from datavalue.embeddings._backend import namespace
from datavalue.embeddings._state import (
    Curv,
    CurvMatrix,
    _max_abs,
    _OperatorShape,
    _pad,
    _theta0_minus,
)

__all__ = [
    "AdamBlockState",
    "AdamStepCoef",
    "adam_coefficients",
    "adam_step_back",
    "init_adam_state",
    "adam_operator",
    "adam_state_from_operator",
]


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
        xp = namespace(self.M)
        return all(xp.all_finite(x) for x in (self.M, self.Rm, self.Rv) if x is not None)


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
    unit_preconditioner: bool = False,
) -> AdamStepCoef:
    """Coefficients of one torch Adam/AdamW step from the moments *after* it (``m_next``,
    ``v_next``), the gradient ``g`` the optimizer used (clipped, with Adam's coupled decay) and
    the bias-correction count ``step`` (1 at the first update). Parameters with ``v_next == 0``
    (never any gradient) get ``p = q = 0``: their gradient perturbations are zero too.

    ``unit_preconditioner``: the rows are already whitened by ``sqrt(D)`` (a run recorded with
    ``precondition="adam"``): ``p = lr c1`` on every column and no second-moment term.
    """
    b1, b2 = float(betas[0]), float(betas[1])
    c1 = 1.0 / (1.0 - b1**step)
    c2 = 1.0 / (1.0 - b2**step)
    v_next = np.maximum(np.asarray(v_next, dtype=np.float64), 0.0)
    sv = np.sqrt(v_next)
    D = np.sqrt(c2) * sv + eps
    live = v_next > 0
    if unit_preconditioner:  # rows already whitened by sqrt(D): the step is lr c1 on every column
        p = np.broadcast_to(np.asarray(lr, dtype=np.float64) * c1, np.shape(v_next)).copy()
    else:
        p = np.where(live, lr * c1 / D, 0.0)
    q = r = None
    if second_moment and not unit_preconditioner:
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
    R = namespace(state.M).zeros((n, 3 * k), state.dtype)
    R[:, :k] = _theta0_minus(state.M)
    if state.Rm is not None:
        R[:, k : 2 * k] = state.Rm
    if state.Rv is not None:
        R[:, 2 * k :] = state.Rv
    return R


def adam_state_from_operator(R: np.ndarray, k: int) -> AdamBlockState:
    """Inverse of :func:`adam_operator`: ``R`` is ``(n, 3k)`` (numpy, or torch on its device)."""
    xp = namespace(R)
    R = xp.asarray(R)
    if R.shape[1] != 3 * k:
        raise ValueError(f"an Adam operator has 3k={3 * k} columns, got {R.shape[1]}")
    M = _theta0_minus(R[:, :k])
    Rm = xp.copy(R[:, k : 2 * k]) if xp.any(R[:, k : 2 * k]) else None
    Rv = xp.copy(R[:, 2 * k :]) if xp.any(R[:, 2 * k :]) else None
    return AdamBlockState(M=M, Rm=Rm, Rv=Rv)


def _adam_xpT(X: np.ndarray, state: AdamBlockState, coef: AdamStepCoef, s: np.ndarray) -> np.ndarray:
    """``X @ P.T`` with ``P = (1 - b1) R_m + R_v diag(r) - R_theta diag(s)``: (rows, n)."""
    Xs = X * s[None, :]
    out = Xs @ state.M.T
    out -= _pad(Xs, state.n)
    if state.Rm is not None:
        out += (1.0 - coef.b1) * (X @ state.Rm.T)
    if state.Rv is not None and coef.r is not None:
        xp = namespace(state.M)
        r = coef.r if xp.is_numpy else xp.asarray(coef.r, X.dtype)  # numpy: as it always ran
        out += (X * r[None, :]) @ state.Rv.T
    return out


def adam_step_back(
    state: AdamBlockState,
    G: np.ndarray,
    w: np.ndarray,
    coef: AdamStepCoef,
    *,
    curv: Curv = "empirical_fisher",
    grad_scale: float = 1.0,
    clip_u: np.ndarray | None = None,
    clip_ug: np.ndarray | None = None,
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

    On a clipped step with ``clip_u`` (this block's part of ``u = g_hat / ||g_hat||``, ``g_hat = sum_z w g``
    over all blocks) the clip's dependence on the batch is kept as in the SGD recursion: the gradient the
    optimizer used is ``c g_hat`` with ``c = max_norm / ||g_hat||``, so ``d g = c (I - u u^T) d g_hat`` and
    ``P`` is replaced by ``P (I - u u^T)`` (block-diagonally) in both the injection and the curvature term:

        e_t(z)   = -c w (P g_t(z) - (u . g_t(z)) P u)       (``u . g_t(z)``: ``clip_ug``, over all blocks)
        R_theta <- decay R_theta + (P - P u u^T) c H + lam P

    ``None`` treats ``c`` as a constant (docs/math.md, sections 5 and 10).

    Args: as :func:`step_back` (``clip_u``, ``clip_ug`` too); ``coef`` from :func:`adam_coefficients`
    (this block's columns).

    Returns:
        ``(new_state, E)``, ``E`` the ``(b, n)`` embeddings (``delta theta_T`` rows). Sign:
        ``loss(without) - loss(with) ~= E[i] @ g_test``; positive = helpful. A state of torch tensors
        runs on their device (:mod:`datavalue.embeddings._backend`); ``coef`` stays numpy.
    """
    dtype = state.dtype
    xp = namespace(state.M)
    G = xp.asarray(G, dtype=dtype)
    w = xp.asarray(w, dtype=dtype)
    c = float(grad_scale)
    k, n = state.k, state.n
    p = xp.asarray(coef.p, dtype=dtype)
    s = (1.0 - coef.b1) * p
    keep_v = coef.q is not None and coef.r is not None
    if keep_v:
        s = s - xp.asarray(coef.q, dtype=dtype) * xp.asarray(coef.r, dtype=dtype)
    need_gp = embed or (isinstance(curv, str) and G.shape[0] > 0)
    GP = _adam_xpT(G, state, coef, s) if need_gp else None
    u = Pu = None
    if clip_u is not None:  # P u as a row: u P^T (n,)
        u = xp.asarray(clip_u, dtype=dtype)
        Pu = _adam_xpT(u[None, :], state, coef, s)[0]
    E = None
    if embed and GP is not None:
        if Pu is not None:
            assert u is not None
            ug = G @ u if clip_ug is None else xp.asarray(clip_ug, dtype=dtype)
            E = (GP - xp.outer(ug, Pu)) * (-c * w)[:, None]
        else:
            E = GP * (-c * w)[:, None]

    # P A = c (F P'^T)^T F + lam P, P' = P (I - u u^T) on a clipped step with clip_u (else P)
    PA = xp.zeros((n, k), dtype)
    if isinstance(curv, str):
        if curv != "empirical_fisher":
            raise ValueError(f"curv must be an array, 'empirical_fisher' or None, got {curv!r}")
        if G.shape[0]:
            sw = xp.sqrt(w)
            assert GP is not None
            FP = GP if Pu is None else GP - xp.outer(G @ u, Pu)
            PA += c * ((FP * sw[:, None]).T @ (G * sw[:, None]))
    elif isinstance(curv, CurvMatrix):
        H = xp.asarray(curv.H, dtype=dtype)
        HP = _adam_xpT(H, state, coef, s)
        if Pu is not None:
            HP = HP - xp.outer(H @ u, Pu)
        PA += c * HP.T
    elif curv is not None:
        F = xp.asarray(curv, dtype=dtype)
        if F.shape[0]:
            FP = _adam_xpT(F, state, coef, s)
            if Pu is not None:
                FP = FP - xp.outer(F @ u, Pu)
            PA += c * (FP.T @ F)
    if coef.lam != 0.0:
        P = state.M * s[None, :]
        xp.add_diag(P, -s)
        if state.Rm is not None:
            P += (1.0 - coef.b1) * state.Rm
        if state.Rv is not None and coef.r is not None:
            P += state.Rv * xp.asarray(coef.r, dtype=dtype)[None, :]
        PA += coef.lam * P
    # R_theta' = decay R_theta + P A  <=>  M' = decay M + (1 - decay) Theta0 - P A
    M = coef.decay * state.M - PA
    if coef.decay != 1.0:
        xp.add_diag(M, 1.0 - coef.decay)
    # R_theta diag(x) = (Theta0 - M) diag(x)
    Rt_p = -state.M * p[None, :]
    xp.add_diag(Rt_p, p)
    Rm = -Rt_p if state.Rm is None else state.Rm - Rt_p
    Rm *= coef.b1
    Rv = None
    if keep_v:
        q = xp.asarray(coef.q, dtype=dtype)
        Rt_q = -state.M * q[None, :]
        xp.add_diag(Rt_q, q)
        Rv = Rt_q if state.Rv is None else state.Rv + Rt_q
        Rv *= coef.b2
    return AdamBlockState(M=M, Rm=Rm, Rv=Rv), E
