"""Cooperative games with known Shapley values: test oracles and the additive fast path.

Every game is a frozen dataclass, callable as ``game(coalition) -> float`` on a ``frozenset`` of
player indices ``0..n-1``, with ``game.n`` players and ``game.shapley_values()`` computed from a
closed form (or a polynomial counting formula) that does *not* enumerate coalitions, so tests
can check the estimators against it.

==================  ======================================  ===================================
game                v(S)                                    Shapley value
==================  ======================================  ===================================
UnanimityGame       1 if T subset of S                      1/|T| for i in T, else 0
GloveGame           min(|S & L|, |S & R|)                   counting formula; L={0}, R={1,2}:
                                                            (2/3, 1/6, 1/6)
AirportGame         -max_{i in S} c_i                       -sum_{j<=i} (c_j - c_{j-1})/(n-j+1)
WeightedVotingGame  1 if sum_{i in S} w_i >= q              Shapley-Shubik by dynamic program;
                                                            [3; 2,1,1]: (2/3, 1/6, 1/6)
SymmetricGame       f(|S|)                                  (f(n) - f(0)) / n
AdditiveGame        base + sum_{i in S} a_i                 a_i
==================  ======================================  ===================================

To add a game: subclass :class:`Game`, make it a frozen dataclass, implement ``__call__`` and
``shapley_values``, and add it to the oracle tests.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from datavalue.shapley._errors import InvalidGameError
from datavalue.shapley._validation import (
    coalition_of,
    parse_n,
    parse_n_exact,
    parse_values,
    shapley_size_weights,
)

__all__ = [
    "AdditiveGame",
    "AirportGame",
    "Game",
    "GloveGame",
    "SymmetricGame",
    "UnanimityGame",
    "WeightedVotingGame",
]


def _players(items: Iterable[Any], n: int, name: str) -> frozenset[int]:
    out = frozenset(int(i) for i in items)
    if any(not 0 <= i < n for i in out):
        raise InvalidGameError(f"{name} must hold player indices in 0..{n - 1}; got {sorted(out)}.")
    return out


class Game(abc.ABC):
    """A coalition game over players ``0..n-1`` with known Shapley values."""

    n: int

    @abc.abstractmethod
    def __call__(self, coalition: Iterable[int]) -> float:
        """Utility of a coalition (any iterable of player indices)."""

    @abc.abstractmethod
    def shapley_values(self) -> np.ndarray:
        """The known ``(n,)`` Shapley values (closed form, no enumeration)."""

    def utilities(self) -> np.ndarray:
        """``(2**n,)`` utilities of every coalition, indexed by bitmask (``n <= 20``)."""
        n = parse_n_exact(self.n, what="Game.utilities")
        return np.array([self(coalition_of(m)) for m in range(1 << n)], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class UnanimityGame(Game):
    """``v(S) = scale`` if ``carrier`` is contained in ``S``, else 0.

    Example:
        >>> UnanimityGame(n=3, carrier=frozenset({0, 1})).shapley_values().tolist()
        [0.5, 0.5, 0.0]
    """

    n: int
    carrier: frozenset[int]
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", parse_n(self.n))
        carrier = _players(self.carrier, self.n, "carrier")
        if not carrier:
            raise InvalidGameError("UnanimityGame needs a non-empty carrier; got an empty set.")
        object.__setattr__(self, "carrier", carrier)

    def __call__(self, coalition: Iterable[int]) -> float:
        return float(self.scale) if self.carrier <= frozenset(coalition) else 0.0

    def shapley_values(self) -> np.ndarray:
        phi = np.zeros(self.n)
        phi[sorted(self.carrier)] = self.scale / len(self.carrier)
        return phi

    def banzhaf_values(self) -> np.ndarray:
        """Banzhaf index: ``scale / 2**(|T|-1)`` for carrier members."""
        beta = np.zeros(self.n)
        beta[sorted(self.carrier)] = self.scale / 2.0 ** (len(self.carrier) - 1)
        return beta


@dataclasses.dataclass(frozen=True)
class GloveGame(Game):
    """``v(S) = min(|S & left|, |S & right|)``: pairs of gloves; other players are null.

    Example:
        >>> GloveGame(n=3, left=frozenset({0}), right=frozenset({1, 2})).shapley_values().round(4).tolist()
        [0.6667, 0.1667, 0.1667]
    """

    n: int
    left: frozenset[int]
    right: frozenset[int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", parse_n(self.n))
        left = _players(self.left, self.n, "left")
        right = _players(self.right, self.n, "right")
        if left & right:
            raise InvalidGameError(
                f"left and right must be disjoint; both hold {sorted(left & right)}."
            )
        object.__setattr__(self, "left", left)
        object.__setattr__(self, "right", right)

    def __call__(self, coalition: Iterable[int]) -> float:
        s = frozenset(coalition)
        return float(min(len(s & self.left), len(s & self.right)))

    def shapley_values(self) -> np.ndarray:
        # v depends only on (l, r, z) = counts of left, right and other players in S, so the
        # Shapley sum collapses to a sum over counts with binomial multiplicities.
        n, nl, nr = self.n, len(self.left), len(self.right)
        nz = n - nl - nr
        w = shapley_size_weights(n)

        def side(same: int, other: int) -> float:
            total = 0.0
            for a in range(same):  # same-side players already present (of same - 1 others)
                for b in range(other + 1):
                    gain = min(a + 1, b) - min(a, b)
                    if not gain:
                        continue
                    for z in range(nz + 1):
                        mult = math.comb(same - 1, a) * math.comb(other, b) * math.comb(nz, z)
                        total += mult * w[a + b + z] * gain
            return total

        phi = np.zeros(n)
        if nl:
            phi[sorted(self.left)] = side(nl, nr)
        if nr:
            phi[sorted(self.right)] = side(nr, nl)
        return phi


@dataclasses.dataclass(frozen=True)
class AirportGame(Game):
    """Cost-sharing of a runway: ``v(S) = -max_{i in S} costs[i]`` (``v(empty) = 0``).

    Example:
        >>> AirportGame(costs=(1.0, 3.0)).shapley_values().tolist()
        [-0.5, -2.5]
    """

    costs: tuple[float, ...]

    def __post_init__(self) -> None:
        costs = tuple(float(c) for c in parse_values(self.costs, name="costs"))
        if any(c < 0 for c in costs):
            raise InvalidGameError(f"airport costs must be >= 0; got {costs}.")
        object.__setattr__(self, "costs", costs)

    @property
    def n(self) -> int:  # type: ignore[override]
        return len(self.costs)

    def __call__(self, coalition: Iterable[int]) -> float:
        s = list(coalition)
        return -max((self.costs[i] for i in s), default=0.0)

    def shapley_values(self) -> np.ndarray:
        order = np.argsort(self.costs, kind="stable")
        c = np.concatenate([[0.0], np.asarray(self.costs)[order]])
        n = self.n
        steps = np.diff(c) / (n - np.arange(n))  # (c_j - c_{j-1}) / (n - j + 1), j = 1..n
        phi = np.empty(n)
        phi[order] = -np.cumsum(steps)
        return phi


@dataclasses.dataclass(frozen=True)
class WeightedVotingGame(Game):
    """``v(S) = 1`` if the weights in ``S`` reach ``quota``: ``[q; w_1, ..., w_n]``.

    ``shapley_values`` is the Shapley-Shubik index, counted by a dynamic program over
    (coalition size, weight) rather than by enumeration (integer weights).

    Example:
        >>> WeightedVotingGame(quota=3, weights=(2, 1, 1)).shapley_values().round(4).tolist()
        [0.6667, 0.1667, 0.1667]
    """

    quota: int
    weights: tuple[int, ...]

    def __post_init__(self) -> None:
        weights = tuple(self.weights)
        ints = all(isinstance(w, int | np.integer) and not isinstance(w, bool) for w in weights)
        if not weights or not ints or any(w < 0 for w in weights):
            raise InvalidGameError(
                f"weights must be non-negative ints, one per player; got {self.weights!r}."
            )
        if isinstance(self.quota, bool) or not isinstance(self.quota, int) or self.quota < 1:
            raise InvalidGameError(f"quota must be a positive int; got {self.quota!r}.")
        object.__setattr__(self, "weights", tuple(int(w) for w in weights))

    @property
    def n(self) -> int:  # type: ignore[override]
        return len(self.weights)

    def __call__(self, coalition: Iterable[int]) -> float:
        return float(sum(self.weights[i] for i in coalition) >= self.quota)

    def shapley_values(self) -> np.ndarray:
        n, q = self.n, self.quota
        w = shapley_size_weights(n)
        phi = np.zeros(n)
        for i in range(n):
            # counts[k, s]: subsets of the others with k members and weight s (s capped at q).
            counts = np.zeros((n, q + 1), dtype=object)
            counts[0, 0] = 1
            for j in range(n):
                if j == i:
                    continue
                wj = self.weights[j]
                for k in range(n - 1, 0, -1):
                    for s in range(q, -1, -1):
                        if counts[k - 1, s]:
                            counts[k, min(s + wj, q)] += counts[k - 1, s]
            lo = max(q - self.weights[i], 0)
            swing = [sum(counts[k, s] for s in range(lo, q)) for k in range(n)]
            phi[i] = float(sum(w[k] * swing[k] for k in range(n)))
        return phi


@dataclasses.dataclass(frozen=True)
class SymmetricGame(Game):
    """``v(S) = f(|S|)``: every player is interchangeable.

    Args:
        n: number of players.
        f: ``n + 1`` values ``f(0), ..., f(n)``, or a callable of the coalition size.

    Example:
        >>> SymmetricGame(n=4, f=lambda k: k**2).shapley_values().tolist()
        [4.0, 4.0, 4.0, 4.0]
    """

    n: int
    f: tuple[float, ...] | Callable[[int], float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", parse_n(self.n))
        f = self.f
        values = [f(k) for k in range(self.n + 1)] if callable(f) else list(f)
        if len(values) != self.n + 1:
            raise InvalidGameError(f"f needs n + 1 = {self.n + 1} values; got {len(values)}.")
        object.__setattr__(self, "f", tuple(float(x) for x in parse_values(values, name="f")))

    def __call__(self, coalition: Iterable[int]) -> float:
        return self.f[len(frozenset(coalition))]  # type: ignore[index]

    def shapley_values(self) -> np.ndarray:
        return np.full(self.n, (self.f[self.n] - self.f[0]) / self.n)  # type: ignore[index]

    def banzhaf_values(self) -> np.ndarray:
        """Banzhaf index: ``2**-(n-1) sum_k C(n-1, k) (f(k+1) - f(k))`` for every player."""
        f, n = self.f, self.n
        total = sum(math.comb(n - 1, k) * (f[k + 1] - f[k]) for k in range(n))  # type: ignore[index]
        return np.full(n, total / 2.0 ** (n - 1))


@dataclasses.dataclass(frozen=True, eq=False)
class AdditiveGame(Game):
    """``v(S) = base + sum_{i in S} contributions[i]``: the first-order (additive) owner game.

    Its Shapley value is exactly ``contributions``: every marginal contribution of player ``i``
    is ``contributions[i]``, whatever the coalition. So when owner contributions come from a
    first-order attribution (e.g. data value embeddings: the utility change is approximated by a
    sum of per-example influences), each owner's Shapley value is the *sum of its examples'
    influences* and no coalition ever needs to be evaluated. Interactions between owners (data
    that only helps in combination) are invisible to this game; compare with a
    :class:`~datavalue.shapley.CoalitionGame` on a few outputs to see how far it can be trusted.

    Example:
        >>> g = AdditiveGame.from_attributions([0.5, 0.25, -0.1, 1.0], owners=[0, 0, 1, 2])
        >>> g.shapley_values().tolist(), g({0, 2})
        ([0.75, -0.1, 1.0], 1.75)
    """

    contributions: np.ndarray
    base: float = 0.0
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        a = parse_values(self.contributions, name="contributions").copy()
        a.setflags(write=False)
        object.__setattr__(self, "contributions", a)
        object.__setattr__(self, "base", float(self.base))
        if self.names is not None:
            names = tuple(str(x) for x in self.names)
            if len(names) != a.size:
                raise InvalidGameError(f"names needs {a.size} entries; got {len(names)}.")
            object.__setattr__(self, "names", names)

    @property
    def n(self) -> int:  # type: ignore[override]
        return int(self.contributions.size)

    @classmethod
    def from_attributions(
        cls,
        scores: Sequence[float] | np.ndarray,
        owners: Sequence[Any] | np.ndarray,
        *,
        n_owners: int | None = None,
        base: float = 0.0,
    ) -> AdditiveGame:
        """Sum per-example attribution ``scores`` (shape ``(R,)``) by owner.

        Args:
            scores: one attribution score per training example (e.g. an influence).
            owners: owner of each example: ints ``0..n_owners-1`` or names (sorted to order).
            n_owners: number of owners for int labels (owners without examples get 0).
            base: ``v(empty)``, e.g. the base model's log-likelihood.
        """
        s = parse_values(scores, name="scores")
        labels = list(owners)
        if len(labels) != s.size:
            raise InvalidGameError(
                f"owners needs one label per score; got {len(labels)} labels for {s.size} scores."
            )
        if all(isinstance(x, int | np.integer) and not isinstance(x, bool) for x in labels):
            idx = np.asarray(labels, dtype=np.int64)
            k = int(idx.max()) + 1 if n_owners is None else parse_n(n_owners, name="n_owners")
            if idx.min() < 0 or idx.max() >= k:
                raise InvalidGameError(
                    f"owner labels must be in 0..{k - 1}; got {sorted(set(labels))}."
                )
            return cls(contributions=np.bincount(idx, weights=s, minlength=k), base=base)
        names = sorted({str(x) for x in labels})
        pos = {name: j for j, name in enumerate(names)}
        idx = np.array([pos[str(x)] for x in labels], dtype=np.int64)
        sums = np.bincount(idx, weights=s, minlength=len(names))
        return cls(contributions=sums, base=base, names=tuple(names))

    def __call__(self, coalition: Iterable[int]) -> float:
        return self.base + float(sum(self.contributions[i] for i in coalition))

    def shapley_values(self) -> np.ndarray:
        return self.contributions.copy()

    def banzhaf_values(self) -> np.ndarray:
        """Banzhaf index of an additive game: also ``contributions``."""
        return self.contributions.copy()
