"""Boundary validators (``parse_*``) and coalition <-> bitmask helpers.

Public functions validate their inputs once with these helpers and trust them inside. Coalitions
are ``frozenset`` of player indices at the API; internally they are Python ``int`` bitmasks (bit
``i`` set when player ``i`` is present), so any number of players works and masks are cheap dict
keys. Coalition ``S`` of ``n`` players has index ``sum(1 << i for i in S)`` in every length-``2**n``
utility vector of this package.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from datavalue.shapley._errors import InvalidGameError, InvalidValuesError, TooManyPlayersError

__all__ = [
    "MAX_EXACT_PLAYERS",
    "coalition_of",
    "mask_of",
    "masks_from_bits",
    "parse_n",
    "parse_n_exact",
    "parse_partition",
    "parse_rng",
    "parse_values",
    "refuse_converted",
    "shapley_size_weights",
]

#: Largest player count for exact enumeration (2**20 utilities, about one million).
MAX_EXACT_PLAYERS = 20


def parse_n(n: object, *, name: str = "n") -> int:
    """Validate a player count: an ``int`` >= 1."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise InvalidGameError(
            f"{name} must be an int >= 1 (the number of players); got {n!r} of type "
            f"{type(n).__name__}. Pass the number of players, e.g. {name}=4."
        )
    if n < 1:
        raise InvalidGameError(
            f"{name} must be >= 1 (a game needs at least one player); got {n}. "
            "Pass the number of players (owners), e.g. n=4."
        )
    return int(n)


def parse_n_exact(n: object, *, what: str = "exact enumeration") -> int:
    """Validate a player count for 2**n enumeration (at most :data:`MAX_EXACT_PLAYERS`)."""
    n = parse_n(n)
    if n > MAX_EXACT_PLAYERS:
        raise TooManyPlayersError(
            f"{what} needs 2**n utilities; expected n <= {MAX_EXACT_PLAYERS}, got n={n} "
            f"(2**{n} = {2**n:,} coalitions). Use shapley.permutation(v, n, n_samples=...) "
            "or shapley.stratified(...) instead, or group players with shapley.group_shapley."
        )
    return n


#: what float() would convert but is no number: a value given as text, or a mask passed for values
_NOT_NUMBERS = (str, bytes, bool, np.bool_)


def refuse_converted(values: object, *, name: str = "values") -> None:
    """Refuse values given as strings, bytes or bools (``np.asarray(..., dtype=float)`` would turn
    ``"0.25"`` into 0.25 and ``True`` into 1.0, and royalties would be paid on them): a str or bytes,
    an array of strings or bools, or a sequence (or object array) holding one anywhere. Numbers of
    any type (ints, floats, numpy scalars, ``Decimal``) pass. Nothing is converted: the same rule as
    a utility's return value."""
    bad: object = None
    if isinstance(values, np.ndarray) and values.dtype.kind in "bUS":
        bad = values.dtype
    elif isinstance(values, _NOT_NUMBERS):
        bad = values
    elif not isinstance(values, np.ndarray) or values.dtype.kind == "O":
        try:  # lists mixing bools and numbers become number arrays: look at the elements themselves
            flat = np.asarray(values, dtype=object).ravel()
        except (TypeError, ValueError):
            return  # ragged or not a sequence: the float conversion reports it
        if any(issubclass(t, _NOT_NUMBERS) for t in set(map(type, flat))):  # one pass over types, fast
            bad = next(x for x in flat if isinstance(x, _NOT_NUMBERS))
    if bad is None:
        return
    got = f"an array of dtype {bad}" if isinstance(bad, np.dtype) else f"{bad!r} of type {type(bad).__name__}"
    raise InvalidValuesError(
        f"{name} must be numbers (floats); got {got}. Nothing is converted (not a string, "
        "not a bool: a mask passed for values, or text read from a file, would be paid on): pass floats, "
        f"e.g. [0.25, 0.75], or np.asarray(texts, dtype=float) after checking the texts."
    )


def parse_values(values: object, *, name: str = "values", ndim: int = 1) -> np.ndarray:
    """Validate a finite float array with ``ndim`` dims and at least one player; strings, bytes and
    bools are refused, not converted (:func:`refuse_converted`)."""
    inner = getattr(values, "values", None)
    if isinstance(inner, np.ndarray):  # a ShapleyResult
        values = inner
    refuse_converted(values, name=name)
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidValuesError(
            f"{name} must be an array of floats; got {type(values).__name__} that numpy cannot "
            f"convert ({exc}). Pass a list or numpy array of numbers."
        ) from None
    if arr.ndim != ndim:
        raise InvalidValuesError(
            f"{name} must have {ndim} dimension(s); got shape {arr.shape}. "
            "Pass one value per player."
        )
    if arr.size == 0 or arr.shape[-1] == 0:
        raise InvalidValuesError(f"{name} must hold at least one player; got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[:5].tolist()
        raise InvalidValuesError(
            f"{name} must be finite; got NaN or inf at index {bad}. Check the utility or "
            "estimator that produced them (e.g. a log-likelihood of -inf); clamp or drop them."
        )
    return arr


def parse_rng(seed: object) -> np.random.Generator:
    """Turn a seed (``None``, int, ``SeedSequence`` or ``Generator``) into a ``Generator``."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, np.random.SeedSequence):
        return np.random.default_rng(seed)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InvalidGameError(
            f"seed must be None, a non-negative int, a SeedSequence or a Generator; got {seed!r}. "
            "Pass e.g. seed=0 for reproducible sampling."
        )
    return np.random.default_rng(np.random.SeedSequence(int(seed)))


def mask_of(coalition: Iterable[int], n: int) -> int:
    """Bitmask of a coalition, validating that every player is in ``0..n-1``."""
    mask = 0
    for i in coalition:
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < n:
            raise InvalidGameError(
                f"coalition members must be player indices in 0..{n - 1}; got {i!r}. "
                "Players are numbered from 0."
            )
        mask |= 1 << int(i)
    return mask


def coalition_of(mask: int) -> frozenset[int]:
    """The ``frozenset`` of player indices whose bits are set in ``mask``."""
    out = []
    i = 0
    while mask:
        if mask & 1:
            out.append(i)
        mask >>= 1
        i += 1
    return frozenset(out)


def masks_from_bits(bits: np.ndarray) -> list[int]:
    """Bitmasks of the rows of a boolean ``(m, n)`` membership matrix (any ``n``)."""
    bits = np.asarray(bits, dtype=bool)
    if bits.shape[1] <= 62:
        weights = np.left_shift(np.int64(1), np.arange(bits.shape[1], dtype=np.int64))
        return (bits.astype(np.int64) @ weights).tolist()
    packed = np.packbits(bits, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def parse_partition(groups: object, n: int, *, name: str = "unions", cover: bool = True):
    """Validate a partition of players ``0..n-1`` into non-empty disjoint groups.

    Returns a tuple of sorted tuples. With ``cover=False`` groups may leave players out.
    """
    example = "Pass e.g. [[0, 1], [2]] (owner 0 holds works 0 and 1, owner 1 holds work 2)."
    if isinstance(groups, str | bytes) or not isinstance(groups, Iterable):
        raise InvalidGameError(
            f"{name} must be a sequence of sequences of player indices; got {groups!r} of type "
            f"{type(groups).__name__}. {example}"
        )
    parsed_groups = []
    for g in groups:
        if isinstance(g, str | bytes) or not isinstance(g, Iterable):
            raise InvalidGameError(
                f"each group of {name} must be a sequence of player indices (ints); got the group "
                f"{g!r} of type {type(g).__name__} in {groups!r}. {example}"
            )
        members = list(g)
        for i in members:
            if isinstance(i, bool | np.bool_) or not isinstance(i, int | np.integer):
                raise InvalidGameError(
                    f"{name} hold player indices, which are ints; got {i!r} of type "
                    f"{type(i).__name__} in the group {g!r}. Players are numbered 0..{n - 1}: "
                    "pass ints, never floats, bools or strings (nothing is rounded)."
                )
        parsed_groups.append(tuple(sorted(int(i) for i in members)))
    parsed = tuple(parsed_groups)
    seen: set[int] = set()
    for g in parsed:
        if not g:
            raise InvalidGameError(f"{name} must not contain an empty group; got {parsed}.")
        for i in g:
            if not 0 <= i < n:
                raise InvalidGameError(
                    f"{name} refer to players 0..{n - 1}; got player {i} in {parsed}."
                )
            if i in seen:
                raise InvalidGameError(
                    f"{name} must be disjoint; player {i} appears twice in {parsed}. "
                    "Each work belongs to exactly one owner."
                )
            seen.add(i)
    if cover and len(seen) != n:
        missing = sorted(set(range(n)) - seen)
        raise InvalidGameError(
            f"{name} must cover all {n} players; players {missing} are in no group. "
            "Add them to a group (a singleton group is fine)."
        )
    if not parsed:
        raise InvalidGameError(f"{name} must contain at least one group; got {groups!r}.")
    return parsed


def shapley_size_weights(n: int) -> np.ndarray:
    """``w[k] = k! (n-k-1)! / n!`` for ``k = 0..n-1``: weight of a size-``k`` coalition."""
    return np.array([1.0 / (n * math.comb(n - 1, k)) for k in range(n)], dtype=np.float64)
