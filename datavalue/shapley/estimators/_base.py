"""Shared Monte Carlo machinery: streaming moments and the batch loop.

Every sampling estimator draws i.i.d. *units* (a permutation, an antithetic pair, a coalition),
turns each into a per-player vector, and averages. :class:`Moments` keeps a numerically stable
running mean and sum of squared deviations (Chan et al.'s parallel update, so values with a large
common offset, like log-likelihoods near -1000, keep their precision). :func:`run_batches`
drives the loop: draw a batch, evaluate, update, build a :class:`Progress`, ask the rule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from datavalue.shapley._errors import InvalidGameError
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.estimators._stopping import Progress, StoppingRule
from datavalue.shapley.games._utility import Utility

__all__ = ["Moments", "parse_batch_size", "run_batches"]

logger = logging.getLogger(__name__)


class Moments:
    """Per-column running count, mean and M2 over rows of ``(b, n)`` batches.

    Rows can be masked: ``add(x, mask)`` only counts ``x[r, j]`` where ``mask[r, j]``.

    Example:
        >>> import numpy as np
        >>> m = Moments(2)
        >>> m.add(np.array([[1.0, 2.0], [3.0, 6.0]]))
        >>> m.mean.tolist(), m.variance().tolist()
        ([2.0, 4.0], [2.0, 8.0])
    """

    def __init__(self, n: int) -> None:
        self.count = np.zeros(n, dtype=np.int64)
        self.mean = np.zeros(n)
        self.m2 = np.zeros(n)

    def add(self, x: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Merge a batch of rows into the running statistics."""
        x = np.asarray(x, dtype=np.float64)
        if mask is None:
            cnt = np.full(x.shape[1], x.shape[0], dtype=np.int64)
            bmean = x.mean(axis=0) if x.shape[0] else np.zeros(x.shape[1])
            bm2 = ((x - bmean) ** 2).sum(axis=0)
        else:
            cnt = mask.sum(axis=0).astype(np.int64)
            safe = np.maximum(cnt, 1)
            bmean = np.where(mask, x, 0.0).sum(axis=0) / safe
            bm2 = np.where(mask, (x - bmean) ** 2, 0.0).sum(axis=0)
        total = self.count + cnt
        safe_total = np.maximum(total, 1)
        delta = bmean - self.mean
        self.mean = self.mean + delta * cnt / safe_total
        self.m2 = self.m2 + bm2 + delta**2 * self.count * cnt / safe_total
        self.count = total

    def variance(self) -> np.ndarray:
        """Unbiased sample variance per column (``inf`` with fewer than two rows)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            var = np.where(self.count > 1, self.m2 / np.maximum(self.count - 1, 1), np.inf)
        return np.maximum(var, 0.0)

    def stderr(self) -> np.ndarray:
        """Standard error of the mean per column (``inf`` with fewer than two rows)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sqrt(self.variance() / np.maximum(self.count, 1))


def parse_batch_size(batch_size: object) -> int:
    """Validate a positive int batch size."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidGameError(f"batch_size must be a positive int; got {batch_size!r}.")
    return batch_size


def run_batches(
    *,
    util: Utility,
    step: Callable[[int], None],
    state: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]],
    loop_rule: StoppingRule,
    goal_rule: StoppingRule,
    batch_size: int,
    per_unit: int,
    method: str,
    start: float | None = None,
    evaluations_before: int | None = None,
    growth: float = 0.0,
) -> ShapleyResult:
    """Run ``step(k)`` (draw and process ``k`` units) until ``loop_rule`` holds.

    ``state()`` returns ``(values, stderr, n_samples)``; each unit adds ``per_unit`` samples per
    player, which lets a sample budget (``loop_rule.max_samples_hint()``) cap the last batch.
    ``start``/``evaluations_before`` account for work done before the loop (e.g. a pilot).
    ``growth > 0`` lets batches grow to ``growth`` times the units drawn so far, for estimators
    whose ``state()`` costs time proportional to all samples (total work stays ``O(m log m)``).
    """
    start = time.monotonic() if start is None else start
    before = util.n_evaluations if evaluations_before is None else evaluations_before
    hint = loop_rule.max_samples_hint()
    while True:
        values, stderr, n_samples = state()
        progress = Progress(
            values=values,
            stderr=stderr,
            n_samples=n_samples,
            n_evaluations=util.n_evaluations - before,
            elapsed_s=time.monotonic() - start,
        )
        if int(n_samples.min()) > 0 and loop_rule(progress):
            break
        k = max(batch_size, int(growth * int(n_samples.min()) / per_unit))
        if hint is not None:
            remaining = hint - int(n_samples.min())
            k = max(1, min(k, -(-remaining // per_unit)))
        step(k)
    converged = bool(goal_rule(progress))
    logger.info(
        "%s: %d samples/player, %d evaluations, %.3fs, converged=%s",
        method,
        int(n_samples.min()),
        progress.n_evaluations,
        progress.elapsed_s,
        converged,
    )
    return ShapleyResult(
        values=values,
        stderr=stderr,
        n_evaluations=progress.n_evaluations,
        n_samples=n_samples,
        converged=converged,
        method=method,
        elapsed_s=progress.elapsed_s,
    )
