"""Composable stopping rules for Monte Carlo estimators.

A rule is a frozen, stateless predicate on a :class:`Progress` snapshot that the estimator
builds after every batch. Rules combine with ``&`` (all must hold) and ``|`` (any suffices)::

    stop = (StderrBelow(1e-3) & MaxSamples(200)) | MaxTime(60)

Estimators report ``converged=True`` when their rule held at the end. A rule may also bound the
number of samples (:meth:`StoppingRule.max_samples_hint`) so that batches never overshoot an
explicit budget: ``permutation(v, n, n_samples=2000)`` draws exactly 2000 permutations.

To extend: subclass :class:`StoppingRule`, make it a frozen dataclass and implement ``__call__``.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import numpy as np

from datavalue.shapley._errors import InvalidGameError

__all__ = [
    "AllOf",
    "AnyOf",
    "MaxEvaluations",
    "MaxSamples",
    "MaxTime",
    "Progress",
    "StderrBelow",
    "StoppingRule",
    "parse_stopping",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Progress:
    """What an estimator knows after a batch.

    Attributes:
        values: ``(n,)`` current estimates.
        stderr: ``(n,)`` current standard errors (``inf`` while unknown).
        n_samples: ``(n,)`` samples used per player so far.
        n_evaluations: utility calls so far.
        elapsed_s: seconds since the estimator started.
    """

    values: np.ndarray
    stderr: np.ndarray
    n_samples: np.ndarray
    n_evaluations: int
    elapsed_s: float


class StoppingRule(abc.ABC):
    """A predicate on :class:`Progress`; ``True`` means "stop, the goal is met"."""

    @abc.abstractmethod
    def __call__(self, progress: Progress) -> bool:
        """Whether the goal of this rule is met."""

    def max_samples_hint(self) -> int | None:
        """An upper bound on per-player samples this rule will ever ask for (``None``: none)."""
        return None

    def __and__(self, other: StoppingRule) -> StoppingRule:
        return AllOf(rules=(self, _check_rule(other)))

    def __or__(self, other: StoppingRule) -> StoppingRule:
        return AnyOf(rules=(self, _check_rule(other)))


def _check_rule(rule: object) -> StoppingRule:
    if not isinstance(rule, StoppingRule):
        raise InvalidGameError(
            f"stopping rules combine only with other rules; got {rule!r}. "
            "Use e.g. MaxSamples(1000) | MaxTime(60)."
        )
    return rule


def _positive(value: float, name: str, *, integer: bool) -> None:
    ok = isinstance(value, int | np.integer) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not value > 0 or not math.isfinite(value):
        kind = "a positive int" if integer else "a positive number"
        raise InvalidGameError(f"{name} must be {kind}; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class MaxSamples(StoppingRule):
    """Stop once every player has at least ``n_samples`` samples.

    Example:
        >>> rule = MaxSamples(100) | MaxTime(5.0)
        >>> rule.max_samples_hint()
        100
    """

    n_samples: int

    def __post_init__(self) -> None:
        _positive(self.n_samples, "MaxSamples.n_samples", integer=True)

    def __call__(self, progress: Progress) -> bool:
        return bool(np.min(progress.n_samples) >= self.n_samples)

    def max_samples_hint(self) -> int | None:
        return int(self.n_samples)


@dataclasses.dataclass(frozen=True)
class StderrBelow(StoppingRule):
    """Stop once ``stderr_i <= atol + rtol * |value_i|`` for every player.

    ``min_samples`` guards against stopping on a lucky early variance estimate.

    Example:
        >>> StderrBelow(0.01, min_samples=50).rtol
        0.0
    """

    atol: float
    rtol: float = 0.0
    min_samples: int = 30

    def __post_init__(self) -> None:
        if not (isinstance(self.atol, int | float) and self.atol >= 0 and self.rtol >= 0):
            raise InvalidGameError(
                f"StderrBelow needs atol >= 0 and rtol >= 0; got atol={self.atol!r}, "
                f"rtol={self.rtol!r}."
            )
        if self.atol == 0 and self.rtol == 0:
            raise InvalidGameError("StderrBelow needs atol > 0 or rtol > 0; got both zero.")
        _positive(self.min_samples, "StderrBelow.min_samples", integer=True)

    def __call__(self, progress: Progress) -> bool:
        if np.min(progress.n_samples) < self.min_samples:
            return False
        tol = self.atol + self.rtol * np.abs(progress.values)
        return bool(np.all(progress.stderr <= tol))


@dataclasses.dataclass(frozen=True)
class MaxTime(StoppingRule):
    """Stop once ``seconds`` of wall-clock time have passed (checked between batches)."""

    seconds: float

    def __post_init__(self) -> None:
        _positive(self.seconds, "MaxTime.seconds", integer=False)

    def __call__(self, progress: Progress) -> bool:
        return progress.elapsed_s >= self.seconds


@dataclasses.dataclass(frozen=True)
class MaxEvaluations(StoppingRule):
    """Stop once the utility has been called ``n_evaluations`` times (checked between batches)."""

    n_evaluations: int

    def __post_init__(self) -> None:
        _positive(self.n_evaluations, "MaxEvaluations.n_evaluations", integer=True)

    def __call__(self, progress: Progress) -> bool:
        return progress.n_evaluations >= self.n_evaluations


@dataclasses.dataclass(frozen=True)
class AllOf(StoppingRule):
    """Stop when every rule holds (built by ``rule_a & rule_b``)."""

    rules: tuple[StoppingRule, ...]

    def __call__(self, progress: Progress) -> bool:
        return all(r(progress) for r in self.rules)

    def max_samples_hint(self) -> int | None:
        hints = [r.max_samples_hint() for r in self.rules]
        return None if any(h is None for h in hints) else max(hints)  # type: ignore[type-var]


@dataclasses.dataclass(frozen=True)
class AnyOf(StoppingRule):
    """Stop when any rule holds (built by ``rule_a | rule_b``)."""

    rules: tuple[StoppingRule, ...]

    def __call__(self, progress: Progress) -> bool:
        return any(r(progress) for r in self.rules)

    def max_samples_hint(self) -> int | None:
        hints = [h for r in self.rules if (h := r.max_samples_hint()) is not None]
        return min(hints) if hints else None


def parse_stopping(
    n_samples: int | None, stop: StoppingRule | None
) -> tuple[StoppingRule, StoppingRule]:
    """Combine the ``n_samples`` shorthand and an explicit rule.

    Returns ``(loop_rule, goal_rule)``: the estimator loops until ``loop_rule`` holds and reports
    ``converged = goal_rule(progress)``. ``n_samples`` alone is the goal; with both, ``n_samples``
    is a hard budget and ``stop`` the goal.
    """
    if stop is not None:
        _check_rule(stop)
    if n_samples is None and stop is None:
        raise InvalidGameError(
            "a Monte Carlo estimator needs a budget; got neither n_samples nor stop. "
            "Pass n_samples=2000, or stop=StderrBelow(1e-3) | MaxTime(60)."
        )
    if n_samples is None:
        return stop, stop  # type: ignore[return-value]
    budget = MaxSamples(n_samples)
    if stop is None:
        return budget, budget
    return stop | budget, stop
