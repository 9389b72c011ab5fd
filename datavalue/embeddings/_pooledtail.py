"""Extending a build whose Fisher was pooled over neighbouring steps (``fisher_window = W > 0``).

Step ``t``'s curvature pools the recorded Fisher of steps ``t - W .. t + W`` clipped to the run, so steps
recorded after a build change the curvature of its last ``W`` steps ``a = T0 - W .. T0 - 1`` (the "tail"):
their step maps ``J_t`` become ``J'_t``. Every earlier step keeps its window, hence its map. An old row of
step ``s < a`` stored ``e = A x`` with ``x`` its embedding at step ``a`` and ``A = J_{T0-1} ... J_a`` the
tail's transfer operator as the build had it; the rebuild wants ``R_new(T0) A' x`` with
``A' = J'_{T0-1} ... J'_a``. So the old rows are mapped with ``R_new(T0) X``, ``X`` the solution of
``X A = A'`` (one ``w x w`` solve per block), and the tail's own rows are recomputed by a backward scan
of its ``W`` steps with the new windows. Cost on top of a plain extension: ``3 W`` steps (``A``, ``A'``,
the tail's rows) and one solve per block.

``X`` is exact when ``A'`` vanishes on whatever ``A`` loses: ``A`` is a product of ``I - eta (c H + lam I)``
factors, singular only at ``eta (c lambda + lam) = 1`` exactly, or in its velocity columns where momentum
is switched off inside the tail (then ``A'`` loses them too; the least-squares solution is taken). The
residual ``||X A - A'||`` is checked; the extension is refused (nothing written) when it is not at
rounding level.

The stored transfer operators of the old segments that reach into the tail are replaced the same way
(the part of a segment before ``a`` kept, its tail part swapped: ``Phi'_s = P'_s P_s^+ Phi_s``), so that
:func:`~datavalue.embeddings.embeddings_at` stays right after the extension.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from datavalue.embeddings._plan import _Plan
from datavalue.embeddings._stream import _scan
from datavalue.errors import EmbeddingError

logger = logging.getLogger(__name__)

#: ``X A`` must reproduce ``A'`` to this fraction of ``A'``'s largest entry (float64 products over
#: ``W`` steps land near 1e-15; an inconsistent system leaves O(1)).
RESIDUAL_TOL = 1e-8


@dataclasses.dataclass(frozen=True)
class PooledTail:
    """What an extension of a ``W > 0`` build needs, computed before anything is written.

    Attributes:
        start: the first tail step ``a = max(0, T0 - W)``; rows of steps ``< a`` are mapped, the rest recomputed.
        swap: per block, ``X`` with ``X A = A'`` (``None`` when ``a = 0``: no old row is mapped).
        old_plan: the plan with the windows the old build had (they end at ``T0 - 1``).
        seg_ops: the replaced stored operators ``{segment index: per block (w, w)}`` (empty without ops).
        residual: the largest relative residual of the solves (a health figure, logged).
    """

    start: int
    swap: list[np.ndarray] | None
    old_plan: _Plan
    seg_ops: dict[int, list[np.ndarray]]
    residual: float


def _transfer(plan: _Plan, lo: int, hi: int) -> list[np.ndarray]:
    """The per-block transfer operators ``(w, w)`` of steps ``lo .. hi - 1`` under ``plan`` (float64)."""
    res = _scan(plan, lo, hi, None, transfer=True, velocity=False, outputs=None)
    return [np.asarray(op, dtype=np.float64) for op in res["ops"]]


def _swap(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, float]:
    """``X`` with ``X @ old = new`` and its relative residual: LU first, least squares where ``old`` is
    singular (momentum off inside the tail zeroes its velocity columns)."""
    X = None
    try:
        X = np.linalg.solve(old.T, new.T).T
    except np.linalg.LinAlgError:
        pass
    scale = max(float(np.abs(new).max()), np.finfo(np.float64).tiny)

    def residual(Y: np.ndarray) -> float:
        r = float(np.abs(Y @ old - new).max()) / scale
        return r if np.isfinite(r) and np.all(np.isfinite(Y)) else np.inf

    if X is None or residual(X) > RESIDUAL_TOL:
        X = np.linalg.lstsq(old.T, new.T, rcond=None)[0].T
    return X, residual(X)


def pooled_tail(path: Any, plan: _Plan, T0: int, segments: list[tuple[int, int]],
                old_ops: list[list[np.ndarray]] | None, *, velocity_kept: bool) -> PooledTail:
    """The tail's maps for an extension from ``T0`` steps of a ``plan.fisher_window > 0`` build (see the module
    docstring). ``segments``/``old_ops``: the old build's segments and their stored operators (``None``: none
    stored). Reads rows only; writes nothing.

    Raises:
        EmbeddingError: a solve's residual above :data:`RESIDUAL_TOL` (the old rows cannot be carried to
            the new curvature exactly), or the old rows' velocity part is needed but was not kept.
    """
    W = int(plan.fisher_window)
    a = max(0, T0 - W)
    old_plan = dataclasses.replace(plan, fisher_end=T0)
    # the tail cut at the old segments' ends, so that each stored operator reaching into it can be replaced
    cuts = sorted({a, T0} | {hi for _, hi in segments if a < hi < T0})
    pieces = list(zip(cuts, cuts[1:], strict=False))
    P_old = [_transfer(old_plan, lo, hi) for lo, hi in pieces]
    P_new = [_transfer(plan, lo, hi) for lo, hi in pieces]
    nb = len(plan.blocks)

    def product(ops: list[list[np.ndarray]], first: int, last: int) -> list[np.ndarray]:
        """Per block ``P_last ... P_first`` (later pieces act after earlier ones)."""
        out = ops[first]
        for j in range(first + 1, last + 1):
            out = [ops[j][i] @ out[i] for i in range(nb)]
        return out

    worst = 0.0

    def solve(old: list[np.ndarray], new: list[np.ndarray], what: str) -> list[np.ndarray]:
        nonlocal worst
        out = []
        for i in range(nb):
            X, r = _swap(old[i], new[i])
            if r > RESIDUAL_TOL:
                raise EmbeddingError(
                    f"{path}: cannot extend this fisher_window={W} build exactly: the new steps change the pooled "
                    f"Fisher of its last {T0 - a} steps ({a}..{T0 - 1}), and {what} of block {i} is singular in a "
                    f"direction the new curvature uses (relative residual {r:.2g} > {RESIDUAL_TOL:g}), so the old "
                    "rows cannot be carried over. Nothing was written; rebuild with build_embeddings(..., "
                    f"fisher_window={W}, overwrite=True)."
                )
            worst = max(worst, r)
            out.append(X)
        return out

    swap = None
    if a > 0:
        swap = solve(product(P_old, 0, len(pieces) - 1), product(P_new, 0, len(pieces) - 1),
                     f"the transfer operator of steps {a}..{T0 - 1}")
        if not velocity_kept:  # old rows' velocity read as 0: right only if X takes none of it into delta theta
            # (the velocity columns of R_new(T0) are zero here: extend_embeddings refused a step T0 carrying momentum)
            for i, (lo, hi) in enumerate(plan.blocks):
                k = hi - lo
                if swap[i].shape[1] > k and np.abs(swap[i][:k, k:]).max() > RESIDUAL_TOL * np.abs(swap[i]).max():
                    raise EmbeddingError(
                        f"{path}: extending this fisher_window={W} build recomputes its last {T0 - a} steps, and "
                        f"momentum carries the old rows' velocity into them, which this build did not keep "
                        "(velocity=False). Nothing was written; rebuild with build_embeddings(..., "
                        f"fisher_window={W}, overwrite=True)."
                    )
    seg_ops: dict[int, list[np.ndarray]] = {}
    if old_ops is not None:
        for s, (lo, hi) in enumerate(segments):
            if hi <= a:
                continue
            j = pieces.index((max(lo, a), hi))
            if lo >= a:  # the whole segment lies in the tail
                seg_ops[s] = P_new[j]
            else:  # keep its part before a, swap its tail part
                X = solve(P_old[j], P_new[j], f"the tail part of stored segment {s}")
                seg_ops[s] = [X[i] @ np.asarray(old_ops[s][i], dtype=np.float64) for i in range(nb)]
    logger.info("%s: fisher_window=%d extension recomputes steps %d..%d (largest relative residual %.2g)",
                path, W, a, T0 - 1, worst)
    return PooledTail(start=a, swap=swap, old_plan=old_plan, seg_ops=seg_ops, residual=worst)
