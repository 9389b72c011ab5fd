"""What the recursions share: the curvature argument and the shape of a block state.

Both recursions (:mod:`._sgd` for SGD with momentum, :mod:`._adam` for Adam/AdamW) carry a row
operator whose first ``k`` columns are ``R_theta = Theta0 - M`` with ``Theta0 = [I; 0]``; the
helpers here turn ``M`` into ``R_theta`` and back and pad rows to the operator's width.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from datavalue.embeddings._backend import namespace

__all__ = ["CurvMatrix", "Curv"]


@dataclasses.dataclass(frozen=True)
class CurvMatrix:
    """An explicit symmetric curvature block ``H_t`` (``k x k``, weights included, before the
    clipping coefficient), for curvatures that are not a sum of squares such as the exact Hessian.

    Example:
        >>> from datavalue.embeddings._sgd import init_state, step_back
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
    return namespace(a).max_abs(a)


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
        return self.M.dtype  # a torch dtype on the torch backend (datavalue.embeddings._backend)


def _pad(X: np.ndarray, n: int) -> np.ndarray:
    """``X @ Theta0.T``: ``X`` (rows, k) placed in the first k of n columns."""
    if X.shape[1] == n:
        return X
    out = namespace(X).zeros((X.shape[0], n), X.dtype)
    out[:, : X.shape[1]] = X
    return out


def _theta0_minus(X: np.ndarray) -> np.ndarray:
    """``Theta0 - X`` for an ``(n, k)`` block (``Theta0 = [I; 0]``), a new array: it turns ``M`` into
    the operator's ``R_theta`` columns and back."""
    out = -X
    namespace(X).add_diag(out, 1.0)
    return out
