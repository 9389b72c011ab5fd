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

from datavalue.shapley._validation import masks_from_bits, parse_rng
from datavalue.shapley.estimators._base import Moments, parse_batch_size, run_batches
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.estimators._stopping import StoppingRule, parse_stopping
from datavalue.shapley.games._utility import as_utility

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
    util = as_utility(v, n, n_jobs=n_jobs, client=client)
    n = util.n
    loop_rule, goal_rule = parse_stopping(n_samples, stop)
    batch_size = parse_batch_size(batch_size)
    rng = parse_rng(seed)
    with_i, without_i = Moments(n), Moments(n)
    drawn = [0]

    def step(k: int) -> None:
        bits = rng.random((k, n)) < 0.5
        u = util.evaluate_masks(masks_from_bits(bits))
        x = np.broadcast_to(u[:, None], (k, n))
        with_i.add(x, bits)
        without_i.add(x, ~bits)
        drawn[0] += k

    def state() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = np.where(
            (with_i.count > 0) & (without_i.count > 0), with_i.mean - without_i.mean, 0.0
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            var = with_i.variance() / np.maximum(with_i.count, 1) + without_i.variance() / (
                np.maximum(without_i.count, 1)
            )
        return values, np.sqrt(var), np.full(n, drawn[0])

    return run_batches(
        util=util,
        step=step,
        state=state,
        loop_rule=loop_rule,
        goal_rule=goal_rule,
        batch_size=batch_size,
        per_unit=1,
        method="banzhaf-msr",
    )
