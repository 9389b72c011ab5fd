"""Owen values (owners -> works) and group Shapley values (players = groups of works).

Copyright owners hold *works*; a coalition game over works with the partition of works into
owners ("unions") has an Owen value (Owen 1977): players join in a random order in which each
owner's works arrive contiguously, owners in uniformly random order and works uniformly at random
within their owner. Exactly::

    phi_i = sum_{R subset M \\ {k}} sum_{T subset B_k \\ {i}}
            r!(m-r-1)!/m! * t!(b-t-1)!/b! * [v(Q_R + T + i) - v(Q_R + T)]

for work ``i`` of owner ``k`` (``b = |B_k|`` works, ``m`` owners, ``Q_R`` the works of owners
``R``). Two facts make it the right tool against the *splitting attack*:

* quotient property: the sum of an owner's Owen values is the Shapley value of the owner-level
  game ``v_M(R) = v(Q_R)``;
* hence an owner's total does not depend on how its data is cut into works (or shell players
  that the owner registry resolves to it), while summing plain Shapley values over an owner's
  works does (cutting a complementary dataset into more pieces raises the sum).

:func:`group_shapley` computes the owner-level (quotient) values directly with any estimator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from datavalue.shapley._errors import InvalidGameError, InvalidValuesError
from datavalue.shapley._validation import parse_n_exact, parse_partition
from datavalue.shapley.estimators._exact import exact
from datavalue.shapley.estimators._kernel import kernel_shap
from datavalue.shapley.estimators._permutation import PermutationSampling, permutation
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.estimators._stopping import StoppingRule
from datavalue.shapley.estimators._stratified import stratified
from datavalue.shapley.games._utility import QuotientUtility, as_utility

__all__ = ["group_shapley", "owen_exact", "owen_from_utilities", "owen_permutation"]


def _subset_masks(masks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """OR of every subset of ``masks`` and the subset sizes (``2**len(masks)`` each)."""
    k = len(masks)
    sel = np.arange(1 << k, dtype=np.int64)
    out = np.zeros(1 << k, dtype=np.int64)
    for j, m in enumerate(masks):
        out |= np.where((sel >> j) & 1, np.int64(m), np.int64(0))
    return out, np.bitwise_count(sel).astype(np.int64)


def _owen_terms(n: int, unions: tuple[tuple[int, ...], ...]):
    """Per player ``(with_idx, without_idx, weights)``: ``phi_i = w @ (u[with] - u[without])``."""
    m = len(unions)
    union_masks = [sum(1 << i for i in g) for g in unions]
    terms = []
    for i in range(n):
        k = next(j for j, g in enumerate(unions) if i in g)
        q, r = _subset_masks([um for j, um in enumerate(union_masks) if j != k])
        w_r = np.array([1.0 / (m * math.comb(m - 1, x)) for x in r.tolist()])
        b = len(unions[k])
        t, s = _subset_masks([1 << j for j in unions[k] if j != i])
        w_t = np.array([1.0 / (b * math.comb(b - 1, x)) for x in s.tolist()])
        without = (q[:, None] | t[None, :]).ravel()
        terms.append((without | (1 << i), without, np.outer(w_r, w_t).ravel()))
    return terms


def owen_from_utilities(utilities: Any, unions: Sequence[Sequence[int]]) -> np.ndarray:
    """Exact Owen values from the utilities of all ``2**n`` coalitions (columns by bitmask).

    Args:
        utilities: ``(2**n,)`` or ``(m, 2**n)`` float array.
        unions: partition of the ``n`` players (works) into owners.

    Example:
        >>> import numpy as np
        >>> u = np.array([0.0, 0, 0, 0, 0, 0, 0, 1.0])   # unanimity on works {0, 1, 2}
        >>> owen_from_utilities(u, [[0, 1], [2]]).tolist()
        [0.25, 0.25, 0.5]
    """
    u = np.asarray(utilities, dtype=np.float64)
    size = u.shape[-1] if u.ndim else 0
    n = size.bit_length() - 1
    if u.ndim not in (1, 2) or size < 2 or (1 << n) != size:
        raise InvalidValuesError(
            f"utilities must have shape (2**n,) or (m, 2**n) with n >= 1; got {u.shape}."
        )
    parse_n_exact(n, what="exact Owen values")
    if not np.all(np.isfinite(u)):
        raise InvalidValuesError("utilities must be finite; got NaN or inf.")
    parsed = parse_partition(unions, n)
    u2 = u.reshape(-1, size)
    out = np.empty((u2.shape[0], n))
    for i, (with_i, without_i, w) in enumerate(_owen_terms(n, parsed)):
        out[:, i] = (u2[:, with_i] - u2[:, without_i]) @ w
    return out.reshape(u.shape[:-1] + (n,))


def owen_exact(
    v: Any,
    n: int | None,
    unions: Sequence[Sequence[int]],
    *,
    n_jobs: int | None = None,
    client: Any = None,
) -> ShapleyResult:
    """Exact Owen values of the works (``n <= 20``), owners given by ``unions``.

    ``result.aggregate(unions)`` gives the owners' totals (their Shapley values in the owner
    game).

    Example:
        >>> v = lambda S: float({0, 1, 2} <= S)           # needs all three works
        >>> owen_exact(v, 3, [[0, 1], [2]]).aggregate([[0, 1], [2]]).values.tolist()
        [0.5, 0.5]
    """
    start = time.monotonic()
    util = as_utility(v, n, n_jobs=n_jobs, client=client)
    n = parse_n_exact(util.n, what="exact Owen values")
    parsed = parse_partition(unions, n)
    before = util.n_evaluations
    u = util.evaluate_masks(list(range(1 << n)))
    return ShapleyResult(
        values=owen_from_utilities(u, parsed),
        stderr=np.zeros(n),
        n_evaluations=util.n_evaluations - before,
        n_samples=[len(t[2]) for t in _owen_terms(n, parsed)],
        converged=True,
        method="owen-exact",
        elapsed_s=time.monotonic() - start,
    )


def owen_permutation(
    v: Any,
    n: int | None,
    unions: Sequence[Sequence[int]],
    *,
    n_samples: int | None = None,
    stop: StoppingRule | None = None,
    seed: Any = None,
    antithetic: bool = True,
    batch_size: int = 64,
    n_jobs: int | None = None,
    client: Any = None,
) -> ShapleyResult:
    """Owen values by sampling union-respecting permutations (antithetic by default).

    Each sample orders the owners at random and each owner's works at random; the reversed
    order is also union-respecting and forms the antithetic partner. Efficient for every sample;
    a null work gets exactly zero.

    Example:
        >>> v = lambda S: float({0, 1, 2} <= S)
        >>> res = owen_permutation(v, 3, [[0, 1], [2]], n_samples=400, seed=0)
        >>> round(float(res.values.sum()), 12)
        1.0
    """
    return _OwenPermutation(
        v,
        n,
        unions,
        n_samples=n_samples,
        stop=stop,
        seed=seed,
        antithetic=antithetic,
        batch_size=batch_size,
        n_jobs=n_jobs,
        client=client,
    ).run()


class _OwenPermutation(PermutationSampling):
    """Union-respecting orders: owners at random, then each owner's works at random."""

    base_method = "owen-permutation"

    def __init__(
        self, v: Any, n: int | None, unions: Sequence[Sequence[int]], **kwargs: Any
    ) -> None:
        super().__init__(v, n, **kwargs)
        self.blocks = [np.array(g, dtype=np.int64) for g in parse_partition(unions, self.n)]

    def draw(self, k: int) -> np.ndarray:
        rng, blocks = self.rng, self.blocks
        union_order = rng.permuted(np.tile(np.arange(len(blocks)), (k, 1)), axis=1)
        inner = [rng.permuted(np.tile(b, (k, 1)), axis=1) for b in blocks]
        return np.stack([np.concatenate([inner[j][r] for j in union_order[r]]) for r in range(k)])


_GROUP_ESTIMATORS = ("exact", "permutation", "stratified", "kernelshap")


def group_shapley(
    v: Any,
    n: int | None,
    groups: Sequence[Sequence[int]],
    *,
    method: str = "exact",
    n_jobs: int | None = None,
    client: Any = None,
    **kwargs: Any,
) -> ShapleyResult:
    """Shapley values of groups of players (e.g. owners as groups of works).

    The group game is ``v_G(T) = v(union of groups in T)``; works in no group are never present.
    Utilities go through ``v``'s cache, so a :class:`CoalitionGame` over works is reused.

    Args:
        v: utility over the ``n`` individual players (works).
        n: number of players (optional when ``v`` has ``.n``).
        groups: disjoint groups of player indices; result index ``j`` is group ``j``.
        method: ``"exact"``, ``"permutation"``, ``"stratified"`` or ``"kernelshap"``.
        n_jobs: thread-pool size for evaluating the *work-level* utility.
        client: dask client for evaluating the work-level utility.
        **kwargs: passed to the estimator (``n_samples``, ``stop``, ``seed``...).

    Example:
        >>> v = lambda S: float({0, 1, 2} <= S)
        >>> group_shapley(v, 3, [[0, 1], [2]]).values.tolist()
        [0.5, 0.5]
    """
    estimators = {
        "exact": exact,
        "permutation": permutation,
        "stratified": stratified,
        "kernelshap": kernel_shap,
    }
    if method not in estimators:
        raise InvalidGameError(f"method must be one of {_GROUP_ESTIMATORS}; got {method!r}.")
    inner = as_utility(v, n, n_jobs=n_jobs, client=client)
    quotient = QuotientUtility(inner, groups)  # type: ignore[arg-type]
    res = estimators[method](quotient, quotient.n, **kwargs)
    return ShapleyResult(**{**res.__dict__, "method": f"group-{res.method}"})
