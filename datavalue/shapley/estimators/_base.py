"""The one Monte Carlo loop: streaming moments and the estimator base that owns the batches.

Every sampling estimator draws i.i.d. *units* (a permutation, an antithetic pair, a coalition,
a round of stratified draws), turns them into per-player statistics, and reports a mean and a
standard error. What differs between estimators is only *how a unit is drawn and summarised*;
everything else is the same skeleton, which lives here once:

:class:`MonteCarloEstimator` owns
    wrapping the utility (``as_utility``: cache, ``n_jobs``, ``client``), parsing the budget
    (``n_samples`` and/or ``stop`` into a loop rule and a goal rule), the batch size, the root
    random generator (``seed``), the wall clock and the utility-call count, the loop itself
    (draw a batch, build a :class:`Progress`, ask the rule; never overshoot a sample budget;
    optionally let batches grow), ``converged``, the log line, and the :class:`ShapleyResult`.
A subclass implements
    ``step(k)`` (draw and process ``k`` units with ``self.rng``), ``state()`` (values, stderr and
    samples per player so far) and ``method``; optionally ``settled()`` when no sampling is needed
    (e.g. every stratum was enumerated). Anything done in ``__init__`` after ``super().__init__``
    (a pilot, the two end points of KernelSHAP) counts towards time and evaluations.

:class:`Moments` keeps a numerically stable running mean and sum of squared deviations (Chan et
al.'s parallel update, so values with a large common offset, like log-likelihoods near -1000,
keep their precision).

To add an estimator: subclass, implement the two methods, wrap it in a function with the usual
signature (``v, n=None, *, n_samples, stop, seed, batch_size, n_jobs, client``) that ends in
``return _MyEstimator(...).run()``, and add it to ``tests/shapley/test_calibration.py``.
"""

from __future__ import annotations

import abc
import logging
import time
from typing import Any

import numpy as np

from datavalue.shapley._errors import InvalidGameError
from datavalue.shapley._validation import parse_rng
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.estimators._stopping import Progress, StoppingRule, parse_stopping
from datavalue.shapley.games._utility import as_utility

__all__ = ["MonteCarloEstimator", "Moments", "parse_batch_size"]

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


class MonteCarloEstimator(abc.ABC):
    """Base of every sampling estimator: owns the batch loop, the stopping and the result.

    Args:
        v: utility ``v(frozenset) -> float``, a game, a ``Utility`` or a ``CoalitionGame``.
        n: number of players (optional when ``v`` has ``.n``).
        n_samples: the sample budget per player (see :func:`parse_stopping`).
        stop: a :class:`StoppingRule`.
        seed: root seed; ``self.rng`` is the only source of randomness.
        batch_size: samples per batch; a batch holds ``max(1, batch_size // per_unit)`` units
            (``None``: :meth:`default_batch_size`).
        n_jobs: thread-pool size for utility evaluation.
        client: dask ``distributed.Client`` for utility evaluation.

    Class or instance attributes a subclass may set (before :meth:`run`):
        per_unit: samples per player that one unit adds (2 for an antithetic or paired unit).
        growth: ``> 0`` lets a batch grow to ``growth`` times the units drawn so far, for
            estimators whose ``state()`` costs time proportional to all samples (total work stays
            ``O(m log m)``).

    Example:
        >>> import numpy as np
        >>> class MeanOfMarginals(MonteCarloEstimator):       # a toy: one random order per unit
        ...     method = "toy"
        ...     def __init__(self, v, n, **kw):
        ...         super().__init__(v, n, **kw)
        ...         self.moments = Moments(self.n)
        ...     def step(self, k):
        ...         for _ in range(k):
        ...             order, row = self.rng.permutation(self.n), np.zeros(self.n)
        ...             before = self.util(frozenset())
        ...             for j in range(self.n):
        ...                 now = self.util(frozenset(order[: j + 1].tolist()))
        ...                 row[order[j]], before = now - before, now
        ...             self.moments.add(row[None, :])
        ...     def state(self):
        ...         return self.moments.mean.copy(), self.moments.stderr(), self.moments.count
        >>> res = MeanOfMarginals(lambda S: float(len(S)), 3, n_samples=10, seed=0).run()
        >>> res.values.tolist(), res.n_samples.tolist()
        ([1.0, 1.0, 1.0], [10, 10, 10])
    """

    method: str = "monte-carlo"
    per_unit: int = 1
    growth: float = 0.0

    def __init__(
        self,
        v: Any,
        n: int | None = None,
        *,
        n_samples: int | None = None,
        stop: StoppingRule | None = None,
        seed: Any = None,
        batch_size: int | None = None,
        n_jobs: int | None = None,
        client: Any = None,
    ) -> None:
        self.util = as_utility(v, n, n_jobs=n_jobs, client=client)
        self.n = self.util.n
        self.loop_rule, self.goal_rule = parse_stopping(n_samples, stop)
        self.batch_size = parse_batch_size(
            self.default_batch_size() if batch_size is None else batch_size
        )
        self.rng = parse_rng(seed)
        self._start = time.monotonic()
        self._evaluations_before = self.util.n_evaluations

    @abc.abstractmethod
    def step(self, k: int) -> None:
        """Draw ``k`` i.i.d. units with ``self.rng``, evaluate them, update the statistics."""

    @abc.abstractmethod
    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(values, stderr, n_samples)``, each ``(n,)``, from everything drawn so far."""

    def default_batch_size(self) -> int:
        """Samples per batch when the caller gives none (``self.n`` is known here)."""
        return 64

    def settled(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(values, n_samples)`` when the answer is exact without sampling, else ``None``."""
        return None

    def _progress(self, values: np.ndarray, stderr: np.ndarray, n_samples: np.ndarray) -> Progress:
        return Progress(
            values=values,
            stderr=stderr,
            n_samples=n_samples,
            n_evaluations=self.util.n_evaluations - self._evaluations_before,
            elapsed_s=time.monotonic() - self._start,
        )

    def run(self) -> ShapleyResult:
        """Sample in batches until the loop rule holds; return the result."""
        settled = self.settled()
        if settled is not None:
            values, n_samples = settled
            stderr = np.zeros(self.n)
            progress = self._progress(values, stderr, n_samples)
            return self._result(progress, converged=True)
        units_per_batch = max(1, self.batch_size // self.per_unit)
        hint = self.loop_rule.max_samples_hint()
        while True:
            progress = self._progress(*self.state())
            done = int(progress.n_samples.min())
            if done > 0 and self.loop_rule(progress):
                break
            k = max(units_per_batch, int(self.growth * done / self.per_unit))
            if hint is not None:
                k = max(1, min(k, -(-(hint - done) // self.per_unit)))
            self.step(k)
        return self._result(progress, converged=bool(self.goal_rule(progress)))

    def _result(self, progress: Progress, *, converged: bool) -> ShapleyResult:
        logger.info(
            "%s: %d samples/player, %d evaluations, %.3fs, converged=%s",
            self.method,
            int(np.min(progress.n_samples)),
            progress.n_evaluations,
            progress.elapsed_s,
            converged,
        )
        return ShapleyResult(
            values=progress.values,
            stderr=progress.stderr,
            n_evaluations=progress.n_evaluations,
            n_samples=progress.n_samples,
            converged=converged,
            method=self.method,
            elapsed_s=progress.elapsed_s,
        )
