"""Shapley values by sampling stratified on coalition size, with Neyman allocation.

For player ``i`` the Shapley value is the plain average over sizes ``k = 0..n-1`` of the mean
marginal contribution over the size-``k`` coalitions of the other players::

    phi_i = (1/n) sum_k mu_{i,k},   mu_{i,k} = E_{|S|=k, i not in S}[v(S + i) - v(S)]

Each stratum mean is estimated separately, so ``Var(phi_i) = n**-2 sum_k sigma_{i,k}**2 / m_{i,k}``.
Neyman allocation (``m_{i,k}`` proportional to ``sigma_{i,k}``) minimises it for a fixed budget:
a pilot of ``pilot`` samples per stratum estimates each sigma, then every round splits its
budget so the totals track the sigmas (with a 10% uniform "defensive" share, so no stratum is
starved by an unlucky pilot). Small strata are *censused*: a stratum with at most
``census_max`` coalitions (always ``k = 0`` and ``k = n-1``) is enumerated once, exactly.

Rare events: in a stratum where a non-zero contribution is rare, the sample variance can be zero
although the true one is not. A stratum whose samples were *all identical* therefore reports the
"rule of three" bound ``min(1/4, 3/m) * r_i**2`` (``r_i`` the range of player ``i``'s observed
contributions) instead of 0: an event unseen in ``m`` draws has probability below ``3/m`` at 95%
confidence. Strata whose contributions varied report their sample variance, which is unbiased
(flooring those too overstated the standard error by up to 30%; ``tests/shapley/
test_calibration.py``). The bound decays as ``1/m**2`` in the variance of the mean, so it
vanishes for large budgets; for a stratum that is constant by nature it keeps the standard
error conservative. Neyman allocation uses the floored variance of every stratum, so a stratum
that looked constant keeps receiving samples.

Unbiased for any fixed allocation (``allocation="uniform"``); Neyman re-allocation is driven by
past samples, which adds a negligible bias. Not efficient: the values need not sum to
``v(N) - v(empty)`` exactly.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from datavalue.shapley._errors import InvalidGameError
from datavalue.shapley._validation import masks_from_bits
from datavalue.shapley.estimators._base import Moments, MonteCarloEstimator
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.estimators._stopping import StoppingRule

__all__ = ["stratified"]

_ALLOCATIONS = ("neyman", "uniform")
_DEFENSIVE = 0.1  # share of every Neyman round spread uniformly over the sampled strata


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` summing to ``total``."""
    raw = weights / weights.sum() * total
    out = np.floor(raw).astype(np.int64)
    short = total - int(out.sum())
    if short > 0:
        order = np.argsort(-(raw - out), kind="stable")
        out[order[:short]] += 1
    return out


def stratified(
    v: Any,
    n: int | None = None,
    *,
    n_samples: int | None = None,
    stop: StoppingRule | None = None,
    seed: Any = None,
    allocation: str = "neyman",
    pilot: int = 4,
    census_max: int | None = None,
    batch_size: int | None = None,
    n_jobs: int | None = None,
    client: Any = None,
) -> ShapleyResult:
    """Shapley values by size-stratified sampling.

    Args:
        v: utility ``v(frozenset) -> float``, a game, a :class:`Utility` or ``CoalitionGame``.
        n: number of players (optional when ``v`` has ``.n``).
        n_samples: marginal contributions per player (the pilot included).
        stop: a :class:`StoppingRule`; checked after each round.
        seed: root seed for reproducible sampling.
        allocation: ``"neyman"`` (samples proportional to each stratum's std) or ``"uniform"``.
        pilot: samples per stratum before allocating (>= 2, to estimate a variance).
        census_max: strata with at most this many coalitions are enumerated exactly. Default:
            ``pilot``, or the average per-stratum budget ``n_samples // n`` when larger
            (enumerating is then no dearer than sampling).
        batch_size: samples per player per round (default ``max(4 * n, 32)``).
        n_jobs: thread-pool size for utility evaluation.
        client: dask ``distributed.Client`` for utility evaluation.

    Returns:
        :class:`ShapleyResult`; ``n_samples`` counts marginal contributions per player.

    Example:
        >>> res = stratified(lambda S: float(len(S) >= 2), 3, n_samples=60, seed=0)
        >>> res.values.round(6).tolist()          # 3 players: every stratum is enumerated
        [0.333333, 0.333333, 0.333333]
    """
    return _Stratified(
        v,
        n,
        n_samples=n_samples,
        stop=stop,
        seed=seed,
        allocation=allocation,
        pilot=pilot,
        census_max=census_max,
        batch_size=batch_size,
        n_jobs=n_jobs,
        client=client,
    ).run()


class _Stratified(MonteCarloEstimator):
    """A unit is one round: ``k`` marginal contributions per player, spread over the strata."""

    def __init__(
        self,
        v: Any,
        n: int | None,
        *,
        allocation: str,
        pilot: int,
        census_max: int | None,
        batch_size: int | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(v, n, batch_size=batch_size, **kwargs)
        n = self.n
        if allocation not in _ALLOCATIONS:
            raise InvalidGameError(f"allocation must be one of {_ALLOCATIONS}; got {allocation!r}.")
        if isinstance(pilot, bool) or not isinstance(pilot, int) or pilot < 2:
            raise InvalidGameError(
                f"pilot must be an int >= 2 (to estimate a variance); got {pilot!r}."
            )
        self.allocation = allocation
        self.method = f"stratified-{allocation}"
        population = np.array([math.comb(n - 1, k) for k in range(n)], dtype=object)
        hint = self.loop_rule.max_samples_hint()
        if census_max is None:
            census_max = max(pilot, (hint or 0) // n)
        elif isinstance(census_max, bool) or not isinstance(census_max, int) or census_max < 1:
            raise InvalidGameError(f"census_max must be a positive int; got {census_max!r}.")
        exact = np.array([p <= census_max for p in population])  # same strata for every player
        pilot_cost = int(
            sum(int(p) if e else pilot for p, e in zip(population, exact, strict=True))
        )
        if hint is not None and hint < pilot_cost:
            raise InvalidGameError(
                f"stratified sampling with n={n} and pilot={pilot} needs at least {pilot_cost} "
                f"samples per player; got n_samples={hint}. Raise n_samples or lower pilot."
            )
        self.strata = [Moments(n) for _ in range(n)]  # strata[k] holds column i = player i
        self.lo, self.hi = np.full(n, np.inf), np.full(n, -np.inf)  # observed range per player
        # Per stratum and player: has any contribution differed from the first one seen?
        self.first = np.full((n, n), np.nan)
        self.varied = np.zeros((n, n), dtype=bool)
        self.sampled = np.flatnonzero(~exact)
        # Pilot: exact strata in full, `pilot` samples in every other stratum.
        requests: list[tuple[int, int, np.ndarray]] = []
        for i in range(n):
            for k in range(n):
                members = self._enumerate_stratum(i, k) if exact[k] else self._draw(i, k, pilot)
                requests.append((i, k, members))
        self._evaluate(requests)

    def default_batch_size(self) -> int:
        return max(4 * self.n, 32)

    def _evaluate(self, requests: list[tuple[int, int, np.ndarray]]) -> None:
        """Evaluate (player, size, members (c, n) bool) requests and update the strata."""
        n, lo, hi = self.n, self.lo, self.hi
        with_masks: list[int] = []
        without_masks: list[int] = []
        for i, _k, members in requests:
            ms = masks_from_bits(members)
            without_masks.extend(ms)
            with_masks.extend(m | (1 << i) for m in ms)
        u_with = self.util.evaluate_masks(with_masks)
        u_without = self.util.evaluate_masks(without_masks)
        pos = 0
        for i, k, members in requests:
            c = members.shape[0]
            diff = np.zeros((c, n))
            diff[:, i] = u_with[pos : pos + c] - u_without[pos : pos + c]
            if c:
                lo[i] = min(lo[i], diff[:, i].min())
                hi[i] = max(hi[i], diff[:, i].max())
                if np.isnan(self.first[k, i]):
                    self.first[k, i] = diff[0, i]
                self.varied[k, i] |= bool(np.any(diff[:, i] != self.first[k, i]))
            mask = np.zeros((c, n), dtype=bool)
            mask[:, i] = True
            self.strata[k].add(diff, mask)
            pos += c

    def _draw(self, i: int, k: int, count: int) -> np.ndarray:
        n = self.n
        others = np.array([j for j in range(n) if j != i], dtype=np.int64)
        members = np.zeros((count, n), dtype=bool)
        if k:
            pick = np.argsort(self.rng.random((count, n - 1)), axis=1)[:, :k]
            np.put_along_axis(members, others[pick], True, axis=1)
        return members

    def _enumerate_stratum(self, i: int, k: int) -> np.ndarray:
        others = [j for j in range(self.n) if j != i]
        combos = list(itertools.combinations(others, k))
        members = np.zeros((len(combos), self.n), dtype=bool)
        for r, combo in enumerate(combos):
            members[r, list(combo)] = True
        return members

    def _rule_of_three(self, k: int) -> np.ndarray:
        """Per player: the variance a stratum-k contribution could have if a rare value in the
        player's observed range was never drawn in its ``m`` samples (``p < 3/m``)."""
        m = np.maximum(self.strata[k].count, 1)
        r2 = np.where(self.hi >= self.lo, self.hi - self.lo, 0.0) ** 2
        return np.minimum(0.25, 3.0 / m) * r2

    def _floored_variance(self, k: int) -> np.ndarray:
        """For allocation: the sample variance of stratum k, at least the rule-of-three bound
        (so a stratum that looks constant keeps being sampled)."""
        return np.maximum(self.strata[k].variance(), self._rule_of_three(k))

    def _reported_variance(self, k: int) -> np.ndarray:
        """For the standard error: the sample variance where contributions varied, the
        rule-of-three bound only where every sample was identical (variance 0 by luck or by
        nature). Flooring varied strata too would overstate the error (``test_calibration``)."""
        return np.where(self.varied[k], self.strata[k].variance(), self._rule_of_three(k))

    def step(self, k: int) -> None:
        budget = k  # samples per player this round
        sampled = self.sampled
        reqs: list[tuple[int, int, np.ndarray]] = []
        for i in range(self.n):
            counts = np.array([self.strata[s].count[i] for s in sampled], dtype=np.float64)
            if self.allocation == "neyman":
                sig = np.sqrt([self._floored_variance(int(s))[i] for s in sampled])
            else:
                sig = np.zeros(len(sampled))
            if sig.sum() > 0:
                target = (counts.sum() + budget) * sig / sig.sum()
                need = np.maximum(target - counts, 0.0)
                neyman = need / need.sum() if need.sum() > 0 else sig / sig.sum()
                # Defensive mixture: a stratum whose pilot happened to look constant (sigma 0)
                # keeps receiving samples, so a rare large contribution is eventually seen.
                weights = (1.0 - _DEFENSIVE) * neyman + _DEFENSIVE / len(sampled)
            else:
                weights = np.ones(len(sampled))
            alloc = _largest_remainder(weights, budget)
            reqs.extend(
                (i, int(s), self._draw(i, int(s), int(c)))
                for s, c in zip(sampled, alloc, strict=True)
                if c
            )
        self._evaluate(reqs)

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.n
        means = np.stack([s.mean for s in self.strata])  # (n strata, n players)
        values = means.mean(axis=0)
        var = np.zeros(n)
        for k in self.sampled:
            var += self._reported_variance(int(k)) / np.maximum(self.strata[k].count, 1)
        counts = np.sum([s.count for s in self.strata], axis=0)
        return values, np.sqrt(var) / n, counts

    def settled(self) -> tuple[np.ndarray, np.ndarray] | None:
        if len(self.sampled) == 0:  # every stratum enumerated: the estimate is exact
            values, _, counts = self.state()
            return values, counts
        return None
