"""Cached, optionally parallel, optionally persistent evaluation of a coalition utility.

Every estimator funnels its utility calls through :class:`Utility`: coalitions are de-duplicated,
looked up in a memory cache keyed by coalition (and optionally a :class:`DiskCache`), and the
misses are evaluated serially, on a thread pool (``n_jobs``) or on a dask cluster (``client``).
Dask is never imported here: the client is used duck-typed through ``client.map`` and
``client.gather``, so any object with that interface works.

The utility is assumed deterministic: a coalition is evaluated at most once per cache.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from datavalue.shapley._errors import InvalidGameError, UtilityError
from datavalue.shapley._validation import coalition_of, mask_of, parse_n, parse_partition
from datavalue.shapley.games._cache import DiskCache

__all__ = ["QuotientUtility", "Utility", "as_utility"]

logger = logging.getLogger(__name__)


class Utility:
    """A coalition utility ``v(S)`` with a cache keyed by coalition.

    Args:
        fn: ``fn(frozenset[int]) -> float``, the utility of a coalition of player indices.
        n: number of players.
        cache_path: optional JSON-lines file; utilities are appended as they are computed and
            reloaded on the next run (see :class:`DiskCache`).
        fingerprint: identifies the utility in the disk cache (reopening with another is refused).
        n_jobs: evaluate cache misses on a thread pool of this size (``None`` or 1: serial).
        client: a dask ``distributed.Client`` (or anything with ``map``/``gather``); takes
            precedence over ``n_jobs``. ``fn`` must then be serialisable for the workers.

    Attributes:
        n_evaluations: calls made to ``fn`` so far (cache hits excluded).
        n_hits: lookups answered from a cache.

    Example:
        >>> u = Utility(lambda S: float(len(S)), 3)
        >>> u(frozenset({0, 2})), u(frozenset({0, 2})), u.n_evaluations
        (2.0, 2.0, 1)
    """

    def __init__(
        self,
        fn: Callable[[frozenset[int]], float],
        n: int,
        *,
        cache_path: str | os.PathLike[str] | None = None,
        fingerprint: str = "",
        n_jobs: int | None = None,
        client: Any = None,
    ) -> None:
        if not callable(fn):
            raise InvalidGameError(
                f"the utility must be callable as fn(frozenset) -> float; got {fn!r}."
            )
        self.fn = fn
        self.n = parse_n(n)
        if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int)):
            raise InvalidGameError(f"n_jobs must be a positive int or None; got {n_jobs!r}.")
        if n_jobs is not None and n_jobs < 1:
            raise InvalidGameError(f"n_jobs must be >= 1; got {n_jobs}. Use None for serial.")
        if client is not None and not (hasattr(client, "map") and hasattr(client, "gather")):
            raise InvalidGameError(
                f"client must provide .map and .gather (a dask distributed.Client); got {client!r}."
            )
        self.n_jobs = n_jobs
        self.client = client
        self.disk: DiskCache | None = (
            DiskCache(cache_path, n=self.n, fingerprint=fingerprint) if cache_path else None
        )
        self._memory: dict[int, float] = dict(self.disk.items()) if self.disk else {}
        self.n_evaluations = 0
        self.n_hits = 0

    # ----------------------------------------------------------------- lookups
    def __call__(self, coalition: Iterable[int]) -> float:
        """Utility of one coalition (any iterable of player indices)."""
        return float(self.evaluate_masks([mask_of(coalition, self.n)])[0])

    def evaluate(self, coalitions: Iterable[Iterable[int]]) -> np.ndarray:
        """Utilities of many coalitions, in order, as a float64 array."""
        return self.evaluate_masks([mask_of(c, self.n) for c in coalitions])

    def cached(self, coalition: Iterable[int]) -> float | None:
        """The cached utility of a coalition, or ``None`` (never calls ``fn``)."""
        return self._memory.get(mask_of(coalition, self.n))

    def __len__(self) -> int:
        return len(self._memory)

    @property
    def cache(self) -> dict[frozenset[int], float]:
        """A snapshot of every cached utility, keyed by coalition."""
        return {coalition_of(m): v for m, v in self._memory.items()}

    def evaluate_masks(self, masks: Sequence[int]) -> np.ndarray:
        """Utilities of coalitions given as bitmasks, evaluating each missing one once."""
        memory = self._memory
        missing = list(dict.fromkeys(m for m in masks if m not in memory))
        self.n_hits += len(masks) - len(missing)
        if missing:
            self._compute(missing)
        return np.fromiter((memory[m] for m in masks), dtype=np.float64, count=len(masks))

    # ----------------------------------------------------------------- evaluation
    def _store(self, mask: int, value: object) -> None:
        try:
            if isinstance(value, str | bytes | bool | np.bool_):  # float() would convert these
                raise TypeError(value)
            val = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise UtilityError(
                f"the utility must return a float; for coalition {sorted(coalition_of(mask))} it "
                f"returned {value!r} of type {type(value).__name__}. Nothing is converted (not a "
                "string, not a bool): return a number, e.g. float(score)."
            ) from None
        if not math.isfinite(val):
            raise UtilityError(
                f"the utility must be finite; for coalition {sorted(coalition_of(mask))} it "
                f"returned {val}. Clamp log-likelihoods (e.g. max(logp, -1e6)) or fix the model."
            )
        self._memory[mask] = val
        self.n_evaluations += 1
        if self.disk is not None:
            self.disk.put(mask, val)

    def _compute(self, masks: list[int]) -> None:
        coalitions = [coalition_of(m) for m in masks]
        if self.client is not None:
            kwargs = {}
            try:
                if "pure" in inspect.signature(self.client.map).parameters:
                    kwargs["pure"] = False  # keys must not collide across different utilities
            except (TypeError, ValueError):
                pass
            futures = self.client.map(self.fn, coalitions, **kwargs)
            for m, val in zip(masks, self.client.gather(futures), strict=True):
                self._store(m, val)
        elif self.n_jobs is not None and self.n_jobs > 1 and len(masks) > 1:
            error: BaseException | None = None
            with cf.ThreadPoolExecutor(max_workers=self.n_jobs) as pool:
                futures = {
                    pool.submit(self.fn, c): m for c, m in zip(coalitions, masks, strict=True)
                }
                for fut in cf.as_completed(futures):  # persist each as soon as it is known
                    if fut.exception() is not None:
                        error = error or fut.exception()  # keep the others' (costly) results
                        continue
                    self._store(futures[fut], fut.result())
            if error is not None:
                raise error
        else:
            for m, c in zip(masks, coalitions, strict=True):
                self._store(m, self.fn(c))
        logger.debug("evaluated %d coalitions (%d so far)", len(masks), self.n_evaluations)

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Close the disk cache, if any."""
        if self.disk is not None:
            self.disk.close()

    def __enter__(self) -> Utility:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f", cache_path={str(self.disk.path)!r}" if self.disk else ""
        return f"Utility(n={self.n}, cached={len(self._memory)}{where})"


class QuotientUtility:
    """The utility of groups of players: ``v_G(T) = v(union of groups in T)``.

    Shares (and fills) the inner :class:`Utility`'s caches and parallel settings, so a group
    game over a :class:`CoalitionGame` reuses its disk cache.

    Example:
        >>> inner = Utility(lambda S: float(len(S)), 4)
        >>> q = QuotientUtility(inner, [[0, 1], [2, 3]])
        >>> q(frozenset({1})), inner.cached(frozenset({2, 3}))
        (2.0, 2.0)
    """

    def __init__(self, inner: Utility, groups: Sequence[Sequence[int]]) -> None:
        self.inner = inner
        self.groups = parse_partition(groups, inner.n, name="groups", cover=False)
        self.n = len(self.groups)
        self._group_masks = [mask_of(g, inner.n) for g in self.groups]

    @property
    def n_evaluations(self) -> int:
        """Calls made to the inner utility's function so far."""
        return self.inner.n_evaluations

    def _inner_mask(self, mask: int) -> int:
        out = 0
        for j, gm in enumerate(self._group_masks):
            if mask >> j & 1:
                out |= gm
        return out

    def evaluate_masks(self, masks: Sequence[int]) -> np.ndarray:
        """Utilities of group coalitions given as bitmasks over groups."""
        return self.inner.evaluate_masks([self._inner_mask(m) for m in masks])

    def __call__(self, coalition: Iterable[int]) -> float:
        return float(self.evaluate_masks([mask_of(coalition, self.n)])[0])


def as_utility(
    v: object, n: int | None, *, n_jobs: int | None = None, client: Any = None
) -> Utility:
    """Wrap ``v`` (a callable, a game, a :class:`Utility` or a ``CoalitionGame``) as a Utility.

    ``n`` may be ``None`` when ``v`` knows its player count (``v.n``); when both are given they
    must agree. An existing Utility keeps its cache; ``n_jobs``/``client`` then override its
    parallel settings only when given.
    """
    inner = getattr(v, "utility", None)
    if isinstance(inner, Utility):
        v = inner
    known = getattr(v, "n", None)
    if n is None:
        if known is None:
            raise InvalidGameError(
                "the number of players is unknown: pass n (e.g. shapley.exact(v, 4)) or a game "
                "object with an .n attribute."
            )
        n = known
    n = parse_n(n)
    if known is not None and int(known) != n:
        raise InvalidGameError(f"n={n} disagrees with the game, which has n={known} players.")
    if isinstance(v, QuotientUtility):
        if n_jobs is not None or client is not None:
            raise InvalidGameError("set n_jobs/client on the inner Utility of a group game.")
        return v  # type: ignore[return-value]
    if isinstance(v, Utility):
        if (n_jobs is not None and n_jobs != v.n_jobs) or (
            client is not None and client is not v.client
        ):
            raise InvalidGameError(
                "n_jobs/client were passed to an estimator together with a Utility (or "
                "CoalitionGame) that has its own settings; pass them when constructing it."
            )
        return v
    return Utility(v, n, n_jobs=n_jobs, client=client)  # type: ignore[arg-type]
