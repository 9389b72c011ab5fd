"""Permutation Monte Carlo Shapley values (Castro et al. 2009) with antithetic pairs.

The Shapley value is the expected marginal contribution of a player when players join in a
uniformly random order. One permutation ``pi`` gives every player one marginal contribution,
and these telescope: ``sum_i c_i(pi) = v(N) - v(empty)``. Every sample is therefore efficient,
and so is every average of samples (up to float rounding).

Antithetic sampling pairs each permutation with its reverse: a player early in one is late in
the other, so the two contributions are negatively correlated and their average has lower
variance. The pair is the i.i.d. unit for the standard error.

Cost: ``n + 1`` utilities per permutation (fewer with the coalition cache). Hoeffding gives
``n_samples >= 2 r**2 ln(2n/delta) / eps**2`` permutations for error ``eps`` with probability
``1 - delta`` when marginal contributions lie in a range ``r``.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from datavalue.shapley.estimators._base import Moments, MonteCarloEstimator
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.estimators._stopping import StoppingRule
from datavalue.shapley.games._utility import Utility

__all__ = ["PermutationSampling", "permutation", "permutation_contributions"]


def permutation_contributions(util: Utility, perms: np.ndarray) -> np.ndarray:
    """Marginal contributions ``c[b, i]`` of each player in each permutation.

    Args:
        util: the cached utility.
        perms: ``(b, n)`` int array, each row a permutation of ``0..n-1`` (joining order).

    Returns:
        ``(b, n)`` array with ``c[b, perms[b, j]] = v(first j+1 players) - v(first j players)``.
    """
    b, n = perms.shape
    if n <= 62:
        bits = np.left_shift(np.int64(1), perms.astype(np.int64))
        prefix = np.zeros((b, n + 1), dtype=np.int64)
        np.cumsum(bits, axis=1, out=prefix[:, 1:])
        masks = prefix.ravel().tolist()
    else:  # Python ints: any number of players
        masks = []
        for row in perms.tolist():
            m = 0
            masks.append(m)
            for i in row:
                m |= 1 << i
                masks.append(m)
    u = util.evaluate_masks(masks).reshape(b, n + 1)
    contrib = np.empty((b, n))
    np.put_along_axis(contrib, perms, np.diff(u, axis=1), axis=1)
    return contrib


def permutation(
    v: Any,
    n: int | None = None,
    *,
    n_samples: int | None = None,
    stop: StoppingRule | None = None,
    seed: Any = None,
    antithetic: bool = True,
    batch_size: int = 64,
    n_jobs: int | None = None,
    client: Any = None,
) -> ShapleyResult:
    """Shapley values by permutation sampling (antithetic by default).

    Args:
        v: utility ``v(frozenset) -> float``, a game, a :class:`Utility` or ``CoalitionGame``.
        n: number of players (optional when ``v`` has ``.n``).
        n_samples: permutations to draw (rounded up to even when antithetic). With ``stop`` it is
            a hard budget; alone it is the goal.
        stop: a :class:`StoppingRule`, e.g. ``StderrBelow(1e-3) | MaxTime(60)``.
        seed: root seed (int, ``SeedSequence`` or ``Generator``) for reproducible sampling.
        antithetic: pair each permutation with its reverse.
        batch_size: permutations evaluated per batch (a batch is de-duplicated and evaluated
            together, in parallel if ``n_jobs``/``client`` is set); rules are checked between.
        n_jobs: thread-pool size for utility evaluation.
        client: dask ``distributed.Client`` for utility evaluation.

    Returns:
        :class:`ShapleyResult`; ``values.sum() == v(N) - v(empty)`` up to rounding for every
        sample count, and ``stderr`` is the standard error over i.i.d. units (pairs).

    Example:
        >>> res = permutation(lambda S: float(len(S)) ** 2, 4, n_samples=200, seed=0)
        >>> res.values.round(6).tolist(), bool(res.stderr.max() < 1e-9)     # symmetric game
        ([4.0, 4.0, 4.0, 4.0], True)
    """
    return _Permutation(
        v,
        n,
        n_samples=n_samples,
        stop=stop,
        seed=seed,
        antithetic=antithetic,
        batch_size=batch_size,
        n_jobs=n_jobs,
        client=client,
    ).run()


class PermutationSampling(MonteCarloEstimator):
    """Permutation Monte Carlo over orders drawn by :meth:`draw`; the reversed order is the
    antithetic partner (it must come from the same distribution). Shared by plain Shapley and
    Owen values, which differ only in which permutations they draw."""

    base_method = "permutation"  # the result's method, with "-antithetic" when antithetic

    def __init__(self, v: Any, n: int | None, *, antithetic: bool, **kwargs: Any) -> None:
        super().__init__(v, n, **kwargs)
        self.antithetic = antithetic
        self.per_unit = 2 if antithetic else 1  # a unit is the pair (order, reversed order)
        self.method = f"{self.base_method}-antithetic" if antithetic else self.base_method
        self.moments = Moments(self.n)

    @abc.abstractmethod
    def draw(self, k: int) -> np.ndarray:
        """``(k, n)`` joining orders drawn with ``self.rng``."""

    def step(self, k: int) -> None:
        perms = self.draw(k)
        if self.antithetic:
            c = permutation_contributions(self.util, np.concatenate([perms, perms[:, ::-1]]))
            self.moments.add(0.5 * (c[:k] + c[k:]))
        else:
            self.moments.add(permutation_contributions(self.util, perms))

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m = self.moments
        return m.mean.copy(), m.stderr(), m.count * self.per_unit


class _Permutation(PermutationSampling):
    """Uniformly random joining orders (Shapley values)."""

    def draw(self, k: int) -> np.ndarray:
        return self.rng.permuted(np.tile(np.arange(self.n), (k, 1)), axis=1)
