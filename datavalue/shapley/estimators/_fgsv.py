"""The faithful group Shapley value (FGSV; Lee, Liu, Tang, Zhang, NeurIPS 2025, arXiv 2505.19013).

Players are *works* (data points, documents, lines); an owner, or any group ``G`` of works, is
valued at the sum of its works' Shapley values in the work-level game::

    FGSV(G) = sum_{i in G} phi_i(v)

It is the unique group value with the paper's faithfulness axioms: regrouping the *other* works
does not change ``FGSV(G)``, and splitting ``G`` into shells ``G_1, ..., G_k`` gives shells whose
values add up to ``FGSV(G)`` exactly, so a shell-company attack gains nothing. Owen values resist
the same attack only when an owner registry merges the shells back (the quotient property); FGSV
needs no registry, but it values an owner *as if every work were its own player*, which is a
different number from the owner-level Shapley value (see ``docs/shapley.md``).

Closed form without the ``n`` individual values: with ``w(k) = k!(n-k-1)!/n!``, ``s = |G|``,
``t = |T|`` and ``a = |T & G|``, the Shapley weight matrix summed over ``G`` gives::

    FGSV(G) = sum_T v(T) * (a * w(t-1) - (s-a) * w(t))

so one weight vector per group depends only on ``(t, a)`` (the structure the paper's fast
estimator samples over). ``fgsv_from_utilities`` applies it to the ``2**n`` utilities;
``fgsv_exact`` evaluates a game through the coalition cache first. For large ``n`` sum the
group's values from ``permutation(...)`` (unbiased and efficient; its per-player standard errors
do not add up to the group's, which needs their covariance), or use an additive game, where
``FGSV(G)`` is the group's summed attribution.

To extend: a sampling estimator over the ``(t, a)`` strata would subclass
``_base.MonteCarloEstimator`` (one unit = one coalition drawn within a stratum).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from datavalue.shapley._errors import InvalidValuesError
from datavalue.shapley._validation import parse_n_exact, parse_partition
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.games._utility import as_utility

__all__ = ["fgsv_exact", "fgsv_from_utilities", "fgsv_weights"]


def _popcount(masks: np.ndarray) -> np.ndarray:
    return np.bitwise_count(masks).astype(np.int64)


def fgsv_weights(n: int, group: Sequence[int]) -> np.ndarray:
    """``(2**n,)`` weights ``w`` with ``FGSV(group) = w @ u`` (``u``: utilities by bitmask).

    Args:
        n: number of works (players), at most ``MAX_EXACT_PLAYERS``.
        group: the works of one owner (indices ``0..n-1``, non-empty, no duplicates).

    Example:
        >>> import numpy as np
        >>> w = fgsv_weights(2, [0, 1])            # the grand coalition of 2 works
        >>> w.tolist()                             # v(N) - v(empty): efficiency
        [-1.0, 0.0, 0.0, 1.0]
    """
    n = parse_n_exact(n, what="exact FGSV")
    (g,) = parse_partition([group], n, name="group", cover=False)
    s = len(g)
    gmask = sum(1 << i for i in g)
    masks = np.arange(1 << n, dtype=np.int64)
    t = _popcount(masks)
    a = _popcount(masks & gmask)
    # w(k) = k!(n-k-1)!/n! = 1 / (n * C(n-1, k)) for k in 0..n-1
    wk = np.array([1.0 / (n * math.comb(n - 1, k)) for k in range(n)] + [0.0])
    inside = a * wk[np.maximum(t - 1, 0)]             # a >= 1 implies t >= 1
    outside = (s - a) * wk[np.minimum(t, n)]          # s - a >= 1 implies t <= n - 1
    return inside - outside


def fgsv_from_utilities(utilities: Any, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Exact FGSV of each group from the utilities of all ``2**n`` coalitions of works.

    Args:
        utilities: ``(2**n,)`` or ``(m, 2**n)`` float array, coalition ``S`` at column
            ``sum(1 << i for i in S)``.
        groups: disjoint groups of works (owners, or shells); they need not cover every work.

    Returns:
        ``(g,)`` or ``(m, g)``: ``sum_{i in G} phi_i`` for each group ``G``.

    Example:
        >>> import numpy as np
        >>> u = np.array([0.0, 0, 0, 0, 0, 0, 0, 1.0])   # unanimity on works {0, 1, 2}
        >>> fgsv_from_utilities(u, [[0, 1], [2]]).round(4).tolist()   # Owen would give [0.5, 0.5]
        [0.6667, 0.3333]
    """
    u = np.asarray(utilities, dtype=np.float64)
    size = u.shape[-1] if u.ndim else 0
    n = size.bit_length() - 1
    if u.ndim not in (1, 2) or size < 2 or (1 << n) != size:
        raise InvalidValuesError(
            f"utilities must have shape (2**n,) or (m, 2**n) with n >= 1; got {u.shape}. "
            "Order the columns by coalition bitmask (see shapley.exact_from_utilities)."
        )
    parse_n_exact(n, what="exact FGSV")
    if not np.all(np.isfinite(u)):
        raise InvalidValuesError("utilities must be finite; got NaN or inf.")
    parsed = parse_partition(groups, n, name="groups", cover=False)
    W = np.stack([fgsv_weights(n, g) for g in parsed], axis=0)   # (g, 2**n)
    return u @ W.T


def fgsv_exact(
    v: Any,
    n: int | None,
    groups: Sequence[Sequence[int]],
    *,
    n_jobs: int | None = None,
    client: Any = None,
) -> ShapleyResult:
    """Exact faithful group Shapley values of ``groups`` of works (``n <= 20`` works).

    The result has one entry per group (``values[j] = sum of the Shapley values of group j's
    works``); ``stderr`` is zero and ``n_samples`` counts the coalitions used.

    Args:
        v: utility over coalitions of works (a callable on frozensets, a game, a ``Utility``).
        n: number of works (optional when ``v.n`` exists).
        groups: disjoint groups of works, one per owner (need not cover every work).
        n_jobs, client: parallel evaluation, as for :func:`exact`.

    Example:
        >>> v = lambda S: float({0, 1, 2} <= S)             # needs all three works
        >>> fgsv_exact(v, 3, [[0, 1], [2]]).values.round(4).tolist()
        [0.6667, 0.3333]
        >>> fgsv_exact(v, 3, [[0], [1], [2]]).values.round(4).tolist()   # split: same totals
        [0.3333, 0.3333, 0.3333]
    """
    start = time.monotonic()
    util = as_utility(v, n, n_jobs=n_jobs, client=client)
    n = parse_n_exact(util.n, what="exact FGSV")
    parsed = parse_partition(groups, n, name="groups", cover=False)
    before = util.n_evaluations
    u = util.evaluate_masks(list(range(1 << n)))
    return ShapleyResult(
        values=fgsv_from_utilities(u, parsed),
        stderr=np.zeros(len(parsed)),
        n_evaluations=util.n_evaluations - before,
        n_samples=[1 << n] * len(parsed),
        converged=True,
        method="fgsv-exact",
        elapsed_s=time.monotonic() - start,
    )
