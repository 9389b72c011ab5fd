"""Exact Shapley (and Banzhaf) values by enumeration, in weight-matrix form.

The Shapley value is linear in the vector ``u`` of the ``2**n`` coalition utilities (coalition
``S`` at index ``sum(1 << i for i in S)``)::

    phi = W @ u,   W[i, S] = w(|S| - 1) if i in S else -w(|S|),   w(k) = k! (n-k-1)! / n!

so once the coalition models exist, the values of many outputs (one row of utilities per
generated output) are a single matrix product ``U @ W.T``. The Banzhaf index uses
``W[i, S] = +-1 / 2**(n-1)``. ``exact`` is the slow oracle every estimator is tested against.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import numpy as np

from datavalue.shapley._errors import InvalidGameError, InvalidValuesError
from datavalue.shapley._validation import parse_n_exact, refuse_converted, shapley_size_weights
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.games._utility import as_utility

__all__ = ["exact", "exact_banzhaf", "exact_from_utilities", "exact_weights"]

logger = logging.getLogger(__name__)

_INDICES = ("shapley", "banzhaf")
# Above this many players the (n, 2**n) matrix is not materialised; values are computed with
# one gather per player instead (same numbers, O(2**n) memory).
_MATRIX_MAX_N = 14


def _parse_index(index: str) -> str:
    if index not in _INDICES:
        raise InvalidGameError(f"index must be one of {_INDICES}; got {index!r}.")
    return index


@functools.lru_cache(maxsize=8)
def _weights_cached(n: int, index: str) -> np.ndarray:
    masks = np.arange(1 << n, dtype=np.int64)
    size = np.bitwise_count(masks).astype(np.int64)
    member = ((masks[None, :] >> np.arange(n, dtype=np.int64)[:, None]) & 1).astype(bool)
    if index == "banzhaf":
        scale = 1.0 / float(1 << (n - 1))
        w = np.where(member, scale, -scale)
    else:
        wk = np.append(shapley_size_weights(n), 0.0)  # w(n) is never used with a minus sign
        w = np.where(member, wk[np.maximum(size - 1, 0)][None, :], -wk[size][None, :])
    w.setflags(write=False)
    return w


def exact_weights(n: int, *, index: str = "shapley") -> np.ndarray:
    """The ``(n, 2**n)`` matrix ``W`` with ``values = W @ u`` for utilities ``u`` by bitmask.

    Args:
        n: number of players (at most 20).
        index: ``"shapley"`` (default) or ``"banzhaf"``.

    Returns:
        A read-only float64 array. The columns of the Shapley matrix sum to ``-1`` at the empty
        coalition, ``+1`` at the full one and ``0`` elsewhere: efficiency,
        ``sum(W @ u) = u[full] - u[empty]``.

    Example:
        >>> W = exact_weights(2)
        >>> W.tolist()
        [[-0.5, 0.5, -0.5, 0.5], [-0.5, -0.5, 0.5, 0.5]]
    """
    n = parse_n_exact(n, what="exact_weights")
    return _weights_cached(n, _parse_index(index))


def exact_from_utilities(utilities: Any, *, index: str = "shapley") -> np.ndarray:
    """Exact values from the utilities of all ``2**n`` coalitions.

    Args:
        utilities: ``(2**n,)`` or ``(m, 2**n)`` float array; column ``S`` is the utility of the
            coalition with bitmask ``S`` (e.g. one row per generated output).
        index: ``"shapley"`` (default) or ``"banzhaf"``.

    Returns:
        ``(n,)`` or ``(m, n)`` values, matching the input's leading shape.

    Example:
        >>> import numpy as np
        >>> u = np.array([0.0, 0.0, 0.0, 1.0])          # unanimity game on {0, 1}
        >>> exact_from_utilities(u).tolist()
        [0.5, 0.5]
        >>> exact_from_utilities(np.stack([u, 2 * u])).tolist()
        [[0.5, 0.5], [1.0, 1.0]]
    """
    index = _parse_index(index)
    refuse_converted(utilities, name="utilities")
    try:
        u = np.asarray(utilities, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidValuesError(
            f"utilities must be a float array of shape (2**n,) or (m, 2**n); got "
            f"{type(utilities).__name__}."
        ) from None
    if u.ndim not in (1, 2):
        raise InvalidValuesError(f"utilities must be 1-D or 2-D; got shape {u.shape}.")
    size = u.shape[-1]
    n = size.bit_length() - 1
    if size < 2 or (1 << n) != size:
        raise InvalidValuesError(
            f"utilities must have 2**n columns (one per coalition, n >= 1); got {size}. "
            "Index coalitions by bitmask: column sum(1 << i for i in S)."
        )
    parse_n_exact(n, what="exact_from_utilities")
    if not np.all(np.isfinite(u)):
        raise InvalidValuesError(
            "utilities must be finite; got NaN or inf. Clamp log-likelihoods before valuing."
        )
    u2 = u.reshape(-1, size)
    if n <= _MATRIX_MAX_N:
        out = u2 @ _weights_cached(n, index).T
    else:
        out = np.empty((u2.shape[0], n))
        masks = np.arange(size, dtype=np.int64)
        sizes = np.bitwise_count(masks)
        wk = shapley_size_weights(n)
        for i in range(n):
            without = masks[((masks >> i) & 1) == 0]
            if index == "banzhaf":
                w = np.full(without.size, 1.0 / float(1 << (n - 1)))
            else:
                w = wk[sizes[without]]
            out[:, i] = (u2[:, without | (1 << i)] - u2[:, without]) @ w
    return out.reshape(u.shape[:-1] + (n,))


def _exact(v: Any, n: int | None, *, index: str, n_jobs: Any, client: Any) -> ShapleyResult:
    start = time.monotonic()
    util = as_utility(v, n, n_jobs=n_jobs, client=client)
    n = parse_n_exact(util.n, what=f"exact {index} enumeration")
    before = util.n_evaluations
    u = util.evaluate_masks(list(range(1 << n)))
    values = exact_from_utilities(u, index=index)
    elapsed = time.monotonic() - start
    logger.info("exact %s values for n=%d in %.3fs", index, n, elapsed)
    return ShapleyResult(
        values=values,
        stderr=np.zeros(n),
        n_evaluations=util.n_evaluations - before,
        n_samples=np.full(n, 1 << (n - 1)),
        converged=True,
        method="exact" if index == "shapley" else "banzhaf-exact",
        elapsed_s=elapsed,
    )


def exact(
    v: Any, n: int | None = None, *, n_jobs: int | None = None, client: Any = None
) -> ShapleyResult:
    """Exact Shapley values by enumerating all ``2**n`` coalitions (``n <= 20``).

    Args:
        v: utility ``v(frozenset) -> float``, a game from :mod:`datavalue.shapley.games`, a
            :class:`Utility` or a :class:`CoalitionGame` (their caches are reused).
        n: number of players (optional when ``v`` has ``.n``).
        n_jobs: evaluate coalitions on a thread pool of this size.
        client: a dask ``distributed.Client`` to evaluate coalitions on.

    Returns:
        :class:`ShapleyResult` with zero ``stderr`` and ``n_evaluations == 2**n`` on a cold cache.

    Raises:
        TooManyPlayersError: if ``n > 20`` (use :func:`permutation`).

    Example:
        >>> res = exact(lambda S: float(len(S) >= 2), 3)     # majority of three
        >>> res.values.round(4).tolist(), res.n_evaluations
        ([0.3333, 0.3333, 0.3333], 8)
    """
    return _exact(v, n, index="shapley", n_jobs=n_jobs, client=client)


def exact_banzhaf(
    v: Any, n: int | None = None, *, n_jobs: int | None = None, client: Any = None
) -> ShapleyResult:
    """Exact Banzhaf index ``beta_i = 2**-(n-1) sum_{S not containing i} [v(S+i) - v(S)]``.

    Not efficient: use ``result.rescaled(v(N) - v(empty))`` before paying with it.

    Example:
        >>> exact_banzhaf(lambda S: float(len(S) >= 2), 3).values.tolist()
        [0.5, 0.5, 0.5]
    """
    return _exact(v, n, index="banzhaf", n_jobs=n_jobs, client=client)
