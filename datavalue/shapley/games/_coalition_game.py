"""The retraining game: one model per coalition, each evaluated once and kept on disk.

``CoalitionGame`` wraps a user function ``train_and_eval(frozenset) -> float`` (train or fine-tune
on the base data plus the coalition's data, return e.g. the log-likelihood of a generated output)
in a :class:`Utility` with a JSON-lines :class:`DiskCache`. Every estimator accepts it directly
and reuses the cache, so exact enumeration after an interrupted run only trains the coalitions
that are still missing. For several outputs over the same coalition models, let
``train_and_eval`` return one output's utility and build one game per output sharing the
trained models, or compute the ``(m, 2**n)`` utility matrix yourself and call
:func:`~datavalue.shapley.exact_from_utilities` once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from datavalue.shapley._errors import InvalidGameError
from datavalue.shapley._validation import parse_n, parse_n_exact
from datavalue.shapley.games._utility import Utility

__all__ = ["CoalitionGame"]


class CoalitionGame:
    """A game whose utility is an expensive, cached, optionally parallel user function.

    Args:
        train_and_eval: ``f(frozenset[int]) -> float`` for a coalition of player indices.
        n: number of players (owners, or works).
        cache_path: JSON-lines file where every evaluated coalition is appended; reopening
            resumes (see :class:`DiskCache`). ``None`` keeps the cache in memory only.
        fingerprint: identifies the utility (model, data, training config) in the cache file;
            a cache written with another fingerprint is refused.
        names: optional player names (owner names), one per player.
        n_jobs: thread-pool size for evaluating missing coalitions.
        client: dask ``distributed.Client`` for evaluating missing coalitions.

    Example:
        >>> import os, tempfile
        >>> from datavalue import shapley
        >>> path = os.path.join(tempfile.mkdtemp(), "coalitions.jsonl")
        >>> game = CoalitionGame(lambda S: float(len(S) >= 2), 3, cache_path=path)
        >>> shapley.exact(game).values.round(4).tolist(), game.utility.n_evaluations
        ([0.3333, 0.3333, 0.3333], 8)
        >>> game.close()
        >>> again = CoalitionGame(lambda S: 1 / 0, 3, cache_path=path)   # never called
        >>> shapley.exact(again).n_evaluations
        0
    """

    def __init__(
        self,
        train_and_eval: Callable[[frozenset[int]], float],
        n: int,
        *,
        cache_path: str | os.PathLike[str] | None = None,
        fingerprint: str = "",
        names: Sequence[str] | None = None,
        n_jobs: int | None = None,
        client: Any = None,
    ) -> None:
        self.n = parse_n(n)
        if names is not None:
            names = tuple(str(x) for x in names)
            if len(names) != self.n:
                raise InvalidGameError(f"names needs {self.n} entries; got {len(names)}.")
        self.names: tuple[str, ...] | None = names
        self.utility = Utility(
            train_and_eval,
            self.n,
            cache_path=cache_path,
            fingerprint=fingerprint,
            n_jobs=n_jobs,
            client=client,
        )

    def __call__(self, coalition: Iterable[int]) -> float:
        """Utility of a coalition (trained and evaluated at most once)."""
        return self.utility(coalition)

    def utilities(self) -> np.ndarray:
        """``(2**n,)`` utilities of all coalitions by bitmask (evaluating missing ones)."""
        n = parse_n_exact(self.n, what="CoalitionGame.utilities")
        return self.utility.evaluate_masks(list(range(1 << n)))

    def close(self) -> None:
        """Flush and close the disk cache."""
        self.utility.close()

    def __enter__(self) -> CoalitionGame:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CoalitionGame(n={self.n}, {self.utility!r})"
