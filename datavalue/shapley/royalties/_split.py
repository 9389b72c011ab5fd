"""Royalty policies and the exact-cent split of a pool among owners.

A *policy* turns per-owner values (Shapley values of one generated output) into shares, and
says what happens when no owner contributed positively. Policies are named and versioned
(``"srs-v1"``); a ledger row records the policy id so every payment can be replayed. Changing a
policy's behaviour means registering a new version, never editing an old one.

================================  ===================================  =========================
policy                            shares                               no positive contributor
================================  ===================================  =========================
``srs-v1`` (default)              max(0, phi_i) / sum_j max(0, phi_j)  pay nothing; the pool is
                                  (Shapley Royalty Share)              reported as unallocated
``srs-equal-fallback-v1``         as ``srs-v1``                        split equally
``srs-strict-v1``                 as ``srs-v1``                        raise
                                                                       NoPositiveContributionError
``equal-v1``                      1 / n (ignores the values)           (not applicable)
================================  ===================================  =========================

Beyond 28 significant digits, note that Python's ``sum`` of Decimals rounds in the default
context: use :func:`exact_sum` (the library does) or a ``decimal.localcontext`` with more
precision.

Money is :class:`decimal.Decimal`. Shares are computed exactly (floats converted to fractions
without rounding) and amounts are rounded to the currency ``quantum`` (a cent by default) by the
*largest remainder* method: each owner gets the floor of its exact amount in cents, and the
cents left over go one each to the owners with the largest fractional parts (ties to the lower
index). Hence ``sum(amounts) + unallocated == pool`` exactly, no amount is negative, and no
owner is more than one cent from its exact entitlement.
"""

from __future__ import annotations

import dataclasses
import decimal
import logging
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

import numpy as np

from datavalue.shapley._errors import InvalidPoolError, NoPositiveContributionError, PolicyError
from datavalue.shapley._validation import parse_values

__all__ = [
    "RoyaltyPolicy",
    "RoyaltySplit",
    "available_policies",
    "exact_sum",
    "get_policy",
    "parse_money",
    "register_policy",
    "split_royalties",
]

logger = logging.getLogger(__name__)

CENT = Decimal("0.01")
_WEIGHTINGS = ("clipped", "equal")
_NO_POSITIVE = ("retain", "equal", "error")


@dataclasses.dataclass(frozen=True)
class RoyaltyPolicy:
    """A named, versioned rule from values to shares.

    Attributes:
        name: policy family, e.g. ``"srs"``.
        version: integer version; the policy id is ``f"{name}-v{version}"``.
        weighting: ``"clipped"`` (shares proportional to ``max(0, value)``) or ``"equal"``.
        no_positive: when every value is ``<= 0``: ``"retain"`` (pay nothing, report the pool as
            unallocated), ``"equal"`` (split equally) or ``"error"`` (raise).
        description: one line for reports.

    Example:
        >>> RoyaltyPolicy(name="srs", version=1, weighting="clipped", no_positive="retain").id
        'srs-v1'
    """

    name: str
    version: int
    weighting: str
    no_positive: str
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or "-v" in self.name or not self.name.replace("-", "").isalnum():
            raise PolicyError(
                f"policy name must be alphanumeric with dashes and no '-v'; got {self.name!r}."
            )
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise PolicyError(f"policy version must be an int >= 1; got {self.version!r}.")
        if self.weighting not in _WEIGHTINGS:
            raise PolicyError(f"weighting must be one of {_WEIGHTINGS}; got {self.weighting!r}.")
        if self.no_positive not in _NO_POSITIVE:
            raise PolicyError(
                f"no_positive must be one of {_NO_POSITIVE}; got {self.no_positive!r}."
            )

    @property
    def id(self) -> str:
        """``name-vN``, the identifier stored in ledgers."""
        return f"{self.name}-v{self.version}"


_POLICIES: dict[str, RoyaltyPolicy] = {}


def register_policy(policy: RoyaltyPolicy, *, overwrite: bool = False) -> RoyaltyPolicy:
    """Make a policy available by its id; refuses to replace an existing id silently.

    Example:
        >>> p = register_policy(RoyaltyPolicy(name="doc-example", version=1,
        ...                                    weighting="clipped", no_positive="equal"))
        >>> get_policy("doc-example-v1") is p
        True
    """
    if not isinstance(policy, RoyaltyPolicy):
        raise PolicyError(f"expected a RoyaltyPolicy; got {type(policy).__name__}.")
    if policy.id in _POLICIES and not overwrite and _POLICIES[policy.id] != policy:
        raise PolicyError(
            f"policy {policy.id!r} is already registered with different rules. Ledgers replay by "
            "id, so register a new version (version + 1), or pass overwrite=True in tests."
        )
    _POLICIES[policy.id] = policy
    return policy


def get_policy(policy: str | RoyaltyPolicy) -> RoyaltyPolicy:
    """Look a policy up by id (``"srs-v1"``); a :class:`RoyaltyPolicy` is returned as is."""
    if isinstance(policy, RoyaltyPolicy):
        return policy
    try:
        return _POLICIES[policy]
    except (KeyError, TypeError):
        raise PolicyError(
            f"unknown royalty policy {policy!r}; expected one of {available_policies()}. "
            "Register custom policies with shapley.register_policy."
        ) from None


def available_policies() -> list[str]:
    """Ids of all registered policies."""
    return sorted(_POLICIES)


for _p in (
    RoyaltyPolicy(
        "srs",
        1,
        "clipped",
        "retain",
        "Shapley Royalty Share; nothing paid if no owner contributed positively",
    ),
    RoyaltyPolicy(
        "srs-equal-fallback",
        1,
        "clipped",
        "equal",
        "Shapley Royalty Share; equal split if no owner contributed positively",
    ),
    RoyaltyPolicy(
        "srs-strict",
        1,
        "clipped",
        "error",
        "Shapley Royalty Share; refuse outputs with no positive contributor",
    ),
    RoyaltyPolicy("equal", 1, "equal", "equal", "equal split among owners, values ignored"),
):
    register_policy(_p)


def exact_sum(amounts: Iterable[Decimal]) -> Decimal:
    """Sum Decimals without rounding (the default context keeps only 28 digits).

    Example:
        >>> exact_sum([Decimal("1E+30"), Decimal("0.01")])
        Decimal('1000000000000000000000000000000.01')
    """
    with decimal.localcontext() as ctx:
        ctx.prec = decimal.MAX_PREC
        return sum(amounts, Decimal(0))


def _parse_quantum(quantum: object) -> Decimal:
    q = quantum if isinstance(quantum, Decimal) else None
    if q is None or not q.is_finite() or q <= 0 or q.normalize().as_tuple().digits != (1,):
        raise InvalidPoolError(
            f"quantum must be a positive power of ten as a Decimal (e.g. Decimal('0.01') for "
            f"cents, Decimal('1') for yen); got {quantum!r}."
        )
    return q.normalize()


def parse_money(amount: object, *, name: str = "pool", quantum: Decimal = CENT) -> Decimal:
    """Validate money: a finite, non-negative ``Decimal`` (or int/str) on the quantum grid.

    Floats are refused: ``0.1 + 0.2`` is not ``0.3`` in binary, and money must be exact.

    Example:
        >>> parse_money("1234.56")
        Decimal('1234.56')
    """
    q = _parse_quantum(quantum)
    if isinstance(amount, bool | np.bool_):
        raise InvalidPoolError(
            f"{name} must be an amount of money (a Decimal, int or str such as Decimal('1234.56')); got the bool "
            f"{amount!r}."
        )
    if isinstance(amount, float | np.floating):
        raise InvalidPoolError(
            f"{name} must be a Decimal, int or str; got the float {amount!r}. Floats cannot hold "
            f"cents exactly: pass Decimal('{amount}') or the string '{amount}'."
        )
    try:
        if isinstance(amount, Decimal):
            d = amount
        elif isinstance(amount, int | np.integer):
            d = Decimal(int(amount))
        else:
            d = Decimal(amount)  # type: ignore[arg-type]
    except (InvalidOperation, TypeError, ValueError):
        raise InvalidPoolError(
            f"{name} must be a decimal amount like Decimal('1234.56'); got {amount!r}."
        ) from None
    if not d.is_finite():
        raise InvalidPoolError(f"{name} must be finite; got {d}.")
    if d < 0:
        raise InvalidPoolError(
            f"{name} must be >= 0; got {d}. A royalty pool is what the owners share; "
            "record refunds as separate adjustments outside the split."
        )
    if _units(d, q) is None:
        raise InvalidPoolError(
            f"{name} must be a whole number of {q} (the currency quantum); got {d}. "
            f"Round it first, e.g. {name}.quantize(Decimal('{q}'), rounding=ROUND_HALF_EVEN)."
        )
    return unsigned_zero(d)


def unsigned_zero(d: Decimal) -> Decimal:
    """``d``, with a negative zero (``Decimal('-0.00')``, what ``'-0'`` or ``-0.0 * x`` gives) made ``0.00``:
    money is never printed as ``-0.00`` (issue 22). Any other amount is returned as it is.

    Example:
        >>> unsigned_zero(Decimal("-0.00")), unsigned_zero(Decimal("-1.50"))
        (Decimal('0.00'), Decimal('-1.50'))
    """
    return d.copy_abs() if d.is_zero() else d


def _units(d: Decimal, q: Decimal) -> int | None:
    """``d / q`` as an exact int (integer arithmetic, any size), or ``None`` if not whole."""
    sign, digits, exp = d.as_tuple()
    coeff = int("".join(map(str, digits)) or "0")
    shift = int(exp) - int(q.as_tuple().exponent)
    if shift >= 0:
        value = coeff * 10**shift
    else:
        value, rem = divmod(coeff, 10**-shift)
        if rem:
            return None
    return -value if sign else value


def _from_units(units: int, q: Decimal) -> Decimal:
    exp = int(q.as_tuple().exponent)
    return Decimal(f"{units}E{exp}") if exp else Decimal(units)


@dataclasses.dataclass(frozen=True)
class RoyaltySplit(Sequence[Decimal]):
    """The amounts paid to each owner for one pool; behaves as a sequence of ``Decimal``.

    Attributes:
        amounts: one ``Decimal`` per owner, each a multiple of ``quantum``.
        shares: exact share of each owner as a float (zeros when nothing was paid).
        pool: the pool that was split.
        unallocated: the part of the pool paid to no owner (the whole pool when the policy
            retains it); ``sum(amounts) + unallocated == pool`` always.
        policy: id of the policy used.
        no_positive: whether no owner had a positive value.
        quantum: the currency unit amounts are rounded to.
    """

    amounts: tuple[Decimal, ...]
    shares: tuple[float, ...]
    pool: Decimal
    unallocated: Decimal
    policy: str
    no_positive: bool
    quantum: Decimal = CENT

    @property
    def paid(self) -> Decimal:
        """Total paid to owners (summed exactly)."""
        return exact_sum(self.amounts)

    def __getitem__(self, i):  # type: ignore[override]
        return self.amounts[i]

    def __len__(self) -> int:
        return len(self.amounts)

    def __iter__(self) -> Iterator[Decimal]:
        return iter(self.amounts)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form with money as strings."""
        return {
            "amounts": [str(a) for a in self.amounts],
            "shares": list(self.shares),
            "pool": str(self.pool),
            "unallocated": str(self.unallocated),
            "policy": self.policy,
            "no_positive": self.no_positive,
            "quantum": str(self.quantum),
        }


def _largest_remainder(weights: list[Fraction], units: int) -> list[int]:
    total = sum(weights, Fraction(0))
    raw = [units * w / total for w in weights]
    floors = [r.numerator // r.denominator for r in raw]
    left = units - sum(floors)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - floors[i]), i))
    for i in order[:left]:
        floors[i] += 1
    return floors


def split_royalties(
    values: Any,
    *,
    pool: Decimal | int | str,
    policy: str | RoyaltyPolicy = "srs-v1",
    quantum: Decimal = CENT,
) -> RoyaltySplit:
    """Split ``pool`` among owners according to their values, exactly to the cent.

    Args:
        values: ``(n,)`` per-owner values (e.g. ``ShapleyResult.values``, or the result itself).
        pool: the owners' pool for this output, ``rho * revenue`` (``Decimal``, int or str).
        policy: a policy id (see :func:`available_policies`) or a :class:`RoyaltyPolicy`.
        quantum: currency unit to round to (``Decimal('0.01')``).

    Returns:
        :class:`RoyaltySplit`, a sequence of ``Decimal`` amounts (one per owner) that sum to
        ``pool`` unless the policy retained it (then ``unallocated == pool`` and a warning is
        logged).

    Raises:
        InvalidPoolError: negative, non-finite, float or sub-cent pool.
        InvalidValuesError: NaN or infinite values.
        NoPositiveContributionError: under ``srs-strict-v1`` when no value is positive.

    Example:
        >>> from decimal import Decimal
        >>> amounts = split_royalties([2.0, 1.0, -0.5], pool=Decimal("100.00"))
        >>> list(amounts), sum(amounts)
        ([Decimal('66.67'), Decimal('33.33'), Decimal('0.00')], Decimal('100.00'))
    """
    phi = parse_values(values)
    pol = get_policy(policy)
    q = _parse_quantum(quantum)
    pool_d = parse_money(pool, quantum=q)
    units = _units(pool_d, q)
    assert units is not None  # parse_money checked it
    n = phi.size
    if pol.weighting == "equal":
        weights = [Fraction(1)] * n
    else:
        weights = [Fraction(float(x)) if x > 0 else Fraction(0) for x in phi]
    no_positive = not any(w > 0 for w in weights)
    if no_positive:
        if pol.no_positive == "error":
            raise NoPositiveContributionError(
                f"policy {pol.id} needs at least one owner with a positive value; got "
                f"{phi.tolist()}. Use 'srs-v1' (retain) or 'srs-equal-fallback-v1' instead."
            )
        if pol.no_positive == "retain":
            logger.warning(
                "no owner contributed positively (values %s); policy %s pays nothing and "
                "reports %s as unallocated",
                phi.tolist(),
                pol.id,
                pool_d,
            )
            zero = _from_units(0, q)
            return RoyaltySplit(
                amounts=(zero,) * n,
                shares=(0.0,) * n,
                pool=pool_d,
                unallocated=pool_d,
                policy=pol.id,
                no_positive=True,
                quantum=q,
            )
        weights = [Fraction(1)] * n
    total = sum(weights, Fraction(0))
    cents = _largest_remainder(weights, units)
    return RoyaltySplit(
        amounts=tuple(_from_units(c, q) for c in cents),
        shares=tuple(float(w / total) for w in weights),
        pool=pool_d,
        unallocated=_from_units(0, q),
        policy=pol.id,
        no_positive=no_positive,
        quantum=q,
    )
