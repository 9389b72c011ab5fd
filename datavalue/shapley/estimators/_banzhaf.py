"""Banzhaf values by maximum sample reuse (MSR; Wang & Jia 2023, "Data Banzhaf").

The Banzhaf value weighs every coalition equally::

    beta_i = E_{S uniform over subsets of N}[v(S) | i in S] - E[v(S) | i not in S]

MSR draws coalitions uniformly (each player present with probability 1/2) and reuses *every*
sample for *every* player: the sample lands in player ``i``'s "with" or "without" mean. One
utility call thus informs all ``n`` estimates, giving ``O(n / eps**2 log(n / delta))`` calls for
error ``eps``, and the equal weighting makes Banzhaf the semivalue most robust to noisy
utilities (e.g. stochastic training).

Unbiased (given at least one sample on each side). Not efficient: normalise with
``result.rescaled(v(N) - v(empty))`` before paying anyone with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from datavalue.shapley._validation import masks_from_bits
from datavalue.shapley.estimators._base import Moments, MonteCarloEstimator
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.estimators._stopping import StoppingRule

__all__ = ["banzhaf_msr"]


def banzhaf_msr(
    v: Any,
    n: int | None = None,
    *,
    n_samples: int | None = None,
    stop: StoppingRule | None = None,
    seed: Any = None,
    batch_size: int = 256,
    n_jobs: int | None = None,
    client: Any = None,
) -> ShapleyResult:
    """Banzhaf values by maximum sample reuse.

    Args:
        v: utility ``v(frozenset) -> float``, a game, a :class:`Utility` or ``CoalitionGame``.
        n: number of players (optional when ``v`` has ``.n``).
        n_samples: uniformly random coalitions to draw (each one serves every player).
        stop: a :class:`StoppingRule`.
        seed: root seed for reproducible sampling.
        batch_size: coalitions per batch.
        n_jobs: thread-pool size for utility evaluation.
        client: dask ``distributed.Client`` for utility evaluation.

    Returns:
        :class:`ShapleyResult` with ``method="banzhaf-msr"``; ``stderr_i`` is
        ``sqrt(var_with / m_with + var_without / m_without)`` (``inf`` until both sides have
        two samples).

    Example:
        >>> res = banzhaf_msr(lambda S: 3.0 * (0 in S) - 1.0 * (2 in S), 3, n_samples=400, seed=0)
        >>> bool(abs(res.values - [3.0, 0.0, -1.0]).max() <= 4 * res.stderr.max())  # additive: a_i
        True
    """
    return _BanzhafMSR(
        v,
        n,
        n_samples=n_samples,
        stop=stop,
        seed=seed,
        batch_size=batch_size,
        n_jobs=n_jobs,
        client=client,
    ).run()


class _BanzhafMSR(MonteCarloEstimator):
    """A unit is one uniformly random coalition; it lands in every player's with/without side."""

    method = "banzhaf-msr"

    def __init__(self, v: Any, n: int | None, **kwargs: Any) -> None:
        super().__init__(v, n, **kwargs)
        self.with_i, self.without_i = Moments(self.n), Moments(self.n)
        self.drawn = 0

    def step(self, k: int) -> None:
        n = self.n
        bits = self.rng.random((k, n)) < 0.5
        u = self.util.evaluate_masks(masks_from_bits(bits))
        x = np.broadcast_to(u[:, None], (k, n))
        self.with_i.add(x, bits)
        self.without_i.add(x, ~bits)
        self.drawn += k

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with_i, without_i = self.with_i, self.without_i
        values = np.where(
            (with_i.count > 0) & (without_i.count > 0), with_i.mean - without_i.mean, 0.0
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            var = with_i.variance() / np.maximum(with_i.count, 1) + without_i.variance() / (
                np.maximum(without_i.count, 1)
            )
        return values, np.sqrt(var), np.full(self.n, self.drawn)
