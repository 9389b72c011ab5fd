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
although the true one is not. The reported standard error therefore uses, per stratum, at least
the "rule of three" bound ``min(1/4, 3/m) * r_i**2`` (``r_i`` the range of player ``i``'s observed
contributions): an event unseen in ``m`` draws has probability below ``3/m`` at 95% confidence.
The floor decays as ``1/m**2`` in the variance of the mean, so it vanishes for large budgets.

Unbiased for any fixed allocation (``allocation="uniform"``); Neyman re-allocation is driven by
past samples, which adds a negligible bias. Not efficient: the values need not sum to
``v(N) - v(empty)`` exactly.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import numpy as np

from datavalue.shapley._errors import InvalidGameError
from datavalue.shapley._validation import masks_from_bits, parse_rng
from datavalue.shapley.estimators._base import Moments, parse_batch_size, run_batches
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.estimators._stopping import StoppingRule, parse_stopping
from datavalue.shapley.games._utility import as_utility

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
    util = as_utility(v, n, n_jobs=n_jobs, client=client)
    n = util.n
    loop_rule, goal_rule = parse_stopping(n_samples, stop)
    if allocation not in _ALLOCATIONS:
        raise InvalidGameError(f"allocation must be one of {_ALLOCATIONS}; got {allocation!r}.")
    if isinstance(pilot, bool) or not isinstance(pilot, int) or pilot < 2:
        raise InvalidGameError(
            f"pilot must be an int >= 2 (to estimate a variance); got {pilot!r}."
        )
    batch = parse_batch_size(batch_size if batch_size is not None else max(4 * n, 32))
    rng = parse_rng(seed)

    population = np.array([math.comb(n - 1, k) for k in range(n)], dtype=object)
    hint = loop_rule.max_samples_hint()
    if census_max is None:
        census_max = max(pilot, (hint or 0) // n)
    elif isinstance(census_max, bool) or not isinstance(census_max, int) or census_max < 1:
        raise InvalidGameError(f"census_max must be a positive int; got {census_max!r}.")
    exact = np.array([p <= census_max for p in population])  # same strata for every player
    pilot_cost = int(sum(int(p) if e else pilot for p, e in zip(population, exact, strict=True)))
    if hint is not None and hint < pilot_cost:
        raise InvalidGameError(
            f"stratified sampling with n={n} and pilot={pilot} needs at least {pilot_cost} "
            f"samples per player; got n_samples={hint}. Raise n_samples or lower pilot."
        )
    start = time.monotonic()
    before = util.n_evaluations
    strata = [Moments(n) for _ in range(n)]  # strata[k] holds column i = player i
    lo, hi = np.full(n, np.inf), np.full(n, -np.inf)  # observed contribution range per player
    sampled = np.flatnonzero(~exact)

    def evaluate(requests: list[tuple[int, int, np.ndarray]]) -> None:
        """Evaluate (player, size, members (c, n) bool) requests and update the strata."""
        with_masks, without_masks = [], []
        for i, _k, members in requests:
            ms = masks_from_bits(members)
            without_masks.extend(ms)
            with_masks.extend(m | (1 << i) for m in ms)
        u_with = util.evaluate_masks(with_masks)
        u_without = util.evaluate_masks(without_masks)
        pos = 0
        for i, k, members in requests:
            c = members.shape[0]
            diff = np.zeros((c, n))
            diff[:, i] = u_with[pos : pos + c] - u_without[pos : pos + c]
            if c:
                lo[i] = min(lo[i], diff[:, i].min())
                hi[i] = max(hi[i], diff[:, i].max())
            mask = np.zeros((c, n), dtype=bool)
            mask[:, i] = True
            strata[k].add(diff, mask)
            pos += c

    def draw(i: int, k: int, count: int) -> np.ndarray:
        others = np.array([j for j in range(n) if j != i], dtype=np.int64)
        members = np.zeros((count, n), dtype=bool)
        if k:
            pick = np.argsort(rng.random((count, n - 1)), axis=1)[:, :k]
            np.put_along_axis(members, others[pick], True, axis=1)
        return members

    def enumerate_stratum(i: int, k: int) -> np.ndarray:
        others = [j for j in range(n) if j != i]
        combos = list(itertools.combinations(others, k))
        members = np.zeros((len(combos), n), dtype=bool)
        for r, combo in enumerate(combos):
            members[r, list(combo)] = True
        return members

    # Pilot: exact strata in full, `pilot` samples in every other stratum.
    requests = []
    for i in range(n):
        for k in range(n):
            members = enumerate_stratum(i, k) if exact[k] else draw(i, k, pilot)
            requests.append((i, k, members))
    evaluate(requests)

    def floored_variance(k: int) -> np.ndarray:
        """Sample variance of stratum k per player, at least the rule-of-three bound."""
        m = np.maximum(strata[k].count, 1)
        r2 = np.where(hi >= lo, hi - lo, 0.0) ** 2
        return np.maximum(strata[k].variance(), np.minimum(0.25, 3.0 / m) * r2)

    def step(k_rounds: int) -> None:
        budget = k_rounds  # samples per player this round
        reqs = []
        for i in range(n):
            counts = np.array([strata[k].count[i] for k in sampled], dtype=np.float64)
            if allocation == "neyman":
                sig = np.sqrt([floored_variance(k)[i] for k in sampled])
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
                (i, int(k), draw(i, int(k), int(c)))
                for k, c in zip(sampled, alloc, strict=True)
                if c
            )
        evaluate(reqs)

    def state() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        means = np.stack([s.mean for s in strata])  # (n strata, n players)
        values = means.mean(axis=0)
        var = np.zeros(n)
        for k in sampled:
            var += floored_variance(k) / np.maximum(strata[k].count, 1)
        counts = np.sum([s.count for s in strata], axis=0)
        return values, np.sqrt(var) / n, counts

    if len(sampled) == 0:  # every stratum enumerated: the estimate is exact
        values, _, counts = state()
        return ShapleyResult(
            values=values,
            stderr=np.zeros(n),
            n_evaluations=util.n_evaluations - before,
            n_samples=counts,
            converged=True,
            method=f"stratified-{allocation}",
            elapsed_s=time.monotonic() - start,
        )
    return run_batches(
        util=util,
        step=step,
        state=state,
        loop_rule=loop_rule,
        goal_rule=goal_rule,
        batch_size=batch,
        per_unit=1,
        method=f"stratified-{allocation}",
        start=start,
        evaluations_before=before,
    )
