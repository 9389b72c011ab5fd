"""The checks of one royalty ledger row's inputs, before anything is split or written.

:meth:`RoyaltyLedger.record <datavalue.shapley.royalties.RoyaltyLedger.record>` (``_ledger.py``) appends
one row per generated output. This module parses what its caller passed (the output id, the owners, the
values or the coalition utilities, the content or its hash, the revenue and the royalty rate) and
refuses what cannot be paid as given, each message saying what was expected, what came and how to fix
it. Nothing here reads or writes the ledger: the checks that need it (a closed handle, a keyed ledger
without its key, an output id already paid) stay in ``_ledger.py``, in the order ``record`` runs them:
:func:`parse_output_id` first, then those, then :func:`parse_row_inputs`; :func:`check_timestamp`
runs under the ledger's lock, given the last row's timestamp.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import decimal
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal

import numpy as np

from datavalue.shapley._errors import InvalidGameError, InvalidPoolError, LedgerError
from datavalue.shapley._validation import parse_values
from datavalue.shapley.estimators._exact import exact_from_utilities
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.royalties._split import CENT, parse_money

__all__ = ["FUTURE_SKEW", "RowInputs", "check_timestamp", "id_text_problem", "parse_output_id", "parse_owners",
           "parse_row_inputs"]

#: Characters no id may hold besides the control characters (``Cc``): line and paragraph separators, and the
#: bidirectional embeddings, overrides and isolates, which make a statement show text in another order than
#: it holds ("Trojan Source", CVE-2021-42574).
_INVISIBLE = frozenset("\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def id_text_problem(text: str) -> str | None:
    """What is wrong with ``text`` as an id or a name printed in statements and reports, or ``None``.

    Refused (issue 22): blank or whitespace-only text (an owner nobody can see in a statement), leading or
    trailing whitespace (``' ann'`` prints like ``'ann'`` but is paid as another owner), control characters
    (``'a\\nb'`` breaks a statement's line and a CSV row into two for a naive reader; ``\\x1b`` drives a
    terminal), line separators and bidirectional overrides (:data:`_INVISIBLE`).

    Example:
        >>> id_text_problem("ann"), id_text_problem(" ")
        (None, 'it is blank (only whitespace)')
    """
    import unicodedata

    if not text.strip():
        return "it is blank (only whitespace)"
    if text != text.strip():
        return "it has leading or trailing whitespace (it would print like the id without it, but be another one)"
    bad = sorted({ch for ch in text if ch in _INVISIBLE or unicodedata.category(ch) == "Cc"})
    if bad:
        shown = ", ".join(f"U+{ord(ch):04X}" for ch in bad)
        return (f"it holds control or invisible characters ({shown}: a line break, a tab, a terminal escape or a "
                "bidirectional override), which would break or disguise the lines of statements and reports")
    return None


def check_id_text(value: str, what: str, error: type[Exception] = InvalidGameError) -> str:
    """``value`` (a non-empty ``str``) when :func:`id_text_problem` finds nothing, else ``error`` naming ``what``."""
    problem = id_text_problem(value)
    if problem is not None:
        raise error(f"{what} {value!r} cannot be used: {problem}. Pass the id as plain text, e.g. 'ann' "
                    "(strip it; no line breaks, tabs or control characters).")
    return value


@dataclasses.dataclass(frozen=True)
class RowInputs:
    """One row's inputs as :func:`parse_row_inputs` accepted them."""

    owners: tuple[str, ...]
    values: np.ndarray  # (n,) float: what the split pays by
    stderr: np.ndarray  # (n,) float
    method: str  # the estimator's name, "given" (plain values) or "exact" (from the utilities)
    utilities: np.ndarray | None  # (2**n,) float, stored so the row replays
    revenue: Decimal
    royalty_rate: Decimal
    pool: Decimal  # revenue * royalty_rate, rounded half-even to the cent


#: how far past this host's clock a row's timestamp may lie (clocks of the hosts that append differ)
FUTURE_SKEW = _dt.timedelta(minutes=5)


def check_timestamp(timestamp: _dt.datetime | None, last: _dt.datetime | None, *, now: _dt.datetime,
                    allow_backdated: bool, path: object) -> _dt.datetime:
    """The row's timestamp (``None``: ``now``), refused when it would change the past.

    A row dated before the ledger's last row (``last``) falls into periods whose statements may
    already be issued and paid: it would change them. A row dated past ``now + FUTURE_SKEW`` would
    land in a period not yet closed. Both are refused unless ``allow_backdated`` (a correction, made
    on purpose, that re-issues those statements). The default timestamp (``now``) is never
    refused for a clock up to ``FUTURE_SKEW`` behind the last row's writer: it takes ``last``.

    Raises:
        LedgerError: the timestamp is earlier than ``last`` or later than ``now + FUTURE_SKEW``.
    """
    if timestamp is None:
        if last is None or last <= now:
            return now
        if last - now <= FUTURE_SKEW and not allow_backdated:  # another writer's clock is a little ahead
            return last
        timestamp = now
    if allow_backdated:
        return timestamp
    if last is not None and timestamp < last:
        raise LedgerError(
            f"timestamp {timestamp.isoformat()} is earlier than the last row of {path} "
            f"({last.isoformat()}): a back-dated row would change the statements of periods already issued "
            f"(and paid). Record sales in time order; to correct a closed period on purpose, pass "
            "allow_backdated=True and re-issue its statements."
        )
    if timestamp > now + FUTURE_SKEW:
        raise LedgerError(
            f"timestamp {timestamp.isoformat()} is later than now ({now.isoformat(timespec='seconds')}) plus "
            f"{int(FUTURE_SKEW.total_seconds() // 60)} minutes: a sale is recorded when it happened, and a row "
            "dated ahead would land in a period not yet closed (and refuse every row dated before it). Pass "
            "the sale's real time (or none: now), or allow_backdated=True for a deliberate correction."
        )
    return timestamp


def parse_output_id(output_id: object) -> str:
    """The generated output's id: a non-empty ``str`` (nothing is converted)."""
    if not isinstance(output_id, str) or not output_id:
        raise InvalidGameError(
            f"output_id must be a non-empty str (the generated output's id; nothing is converted, so 5 and "
            f"'5' are never taken for one output); got {output_id!r} of type {type(output_id).__name__}. "
            f"Pass the id as text, e.g. output_id={str(output_id) if isinstance(output_id, int) else 'gen-1'!r}."
        )
    return check_id_text(output_id, "output_id")


def parse_owners(owners: object) -> tuple[str, ...]:
    """Owner ids as given, one per player: a list (or tuple, array) of non-empty strings, each plain text
    (:func:`id_text_problem`: not blank, no surrounding whitespace, no control characters).

    Nothing is converted: ``None`` would be paid as an owner named ``'None'`` and a string
    ``'abc'`` would be split into the owners ``'a'``, ``'b'``, ``'c'``.
    """
    if isinstance(owners, str | bytes | Mapping | set | frozenset) or not isinstance(owners, Iterable):
        raise InvalidGameError(
            f"owners must be a list of owner ids (strings), one per player; got {owners!r} of type "
            f"{type(owners).__name__} (a string would be split into letters, a set has no order). Pass e.g. owners=['ann', 'bob', 'cy']."
        )
    out = []
    for i, o in enumerate(owners):
        if not isinstance(o, str) or not o:
            raise InvalidGameError(
                f"owners[{i}] must be a non-empty string (an owner id); got {o!r} of type "
                f"{type(o).__name__} in {list(owners)!r}. Nothing is converted: pass each owner's id "
                "as a string."
            )
        out.append(check_id_text(o, f"owners[{i}]"))
    return tuple(out)


#: Money given as text: ASCII digits with at most one point and an optional sign (``'1234.56'``, ``'-0.00'``);
#: ``Decimal(str)`` also takes ``'5e2'``, ``'1_000'``, ``' 5 '``, ``'NaN'`` and ``'Infinity'`` (P9-14).
_PLAIN_DECIMAL = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")
#: Amounts from ``10**MONEY_DIGITS`` up, or with more than ``MONEY_PLACES`` decimal places, are refused before
#: they are parsed: no revenue is that large, and ``Decimal('1E+400')`` would make the pool's rounding fail
#: (``decimal.InvalidOperation``) and ``Decimal('1E+100000000000')`` hang the exact cent arithmetic.
MONEY_DIGITS = 30
MONEY_PLACES = 40


def money_input(amount: object, name: str) -> object:
    """``amount`` (revenue or royalty rate) as :func:`parse_money` should see it: a str must be plain decimal
    text (:data:`_PLAIN_DECIMAL`) and becomes a ``Decimal``; a finite ``Decimal`` or int must be below
    ``10**MONEY_DIGITS`` with at most ``MONEY_PLACES`` decimal places. Anything else is passed on as given,
    for :func:`parse_money` to check (types, NaN, the sign, the grid).

    Raises:
        InvalidPoolError: text that is not plain decimal digits, an amount too large or too finely divided.
    """
    accepted = ("Pass money as a Decimal, an int, or a str of plain decimal digits with at most one point, "
                "like Decimal('1234.56') or '1234.56'")
    if isinstance(amount, str):
        if _PLAIN_DECIMAL.fullmatch(amount) is None:
            shown = amount if len(amount) <= 60 else amount[:60] + "..."
            raise InvalidPoolError(
                f"{name} must be written as plain decimal digits with at most one point, like '1234.56'; got "
                f"{shown!r} ({len(amount)} characters). Exponents ('5e2'), underscores ('1_000'), spaces, "
                "'NaN' and 'Infinity' are not taken as money, so that a typo never becomes an amount. "
                f"{accepted}."
            )
        amount = Decimal(amount)
    if isinstance(amount, bool | np.bool_):
        return amount
    if isinstance(amount, int | np.integer):
        amount = Decimal(int(amount))  # no str(): an int past 4300 digits has none
        too_large = not amount.is_zero() and amount.adjusted() >= MONEY_DIGITS
        too_fine = False
    elif isinstance(amount, Decimal) and amount.is_finite():
        too_large = not amount.is_zero() and amount.adjusted() >= MONEY_DIGITS
        too_fine = int(amount.as_tuple().exponent) < -MONEY_PLACES
    else:
        return amount
    if too_large:
        raise InvalidPoolError(
            f"{name} must be below 10**{MONEY_DIGITS} (1E+{MONEY_DIGITS}); got an amount with "
            f"{amount.adjusted() + 1:,} digits before the point ({amount:.3E}): no payment is that "
            f"large, so it is a units or parsing mistake. {accepted}."
        )
    if too_fine:
        raise InvalidPoolError(
            f"{name} must have at most {MONEY_PLACES} decimal places; got {name} with exponent "
            f"{amount.as_tuple().exponent} ({str(amount)[:40]}). {accepted}, on the currency's grid."
        )
    return amount


def parse_row_inputs(
    *,
    owners: object,
    result: ShapleyResult | Sequence[float] | np.ndarray | None,
    utilities: Sequence[float] | np.ndarray | None,
    content: bytes | str | None,
    output_hash: str | None,
    revenue: Decimal | int | str,
    royalty_rate: Decimal | int | str,
) -> RowInputs:
    """Check a row's owners, values, content and money (see :meth:`RoyaltyLedger.record` for each).

    Raises:
        InvalidGameError: owners not distinct strings, not exactly one of ``content``/``output_hash``,
            no values, values and owners or utilities of different sizes, ``result`` disagreeing with
            ``utilities``.
        InvalidValuesError: values or utilities that are not finite numbers.
        InvalidPoolError: revenue or rate not money on their grid (a str not plain decimal digits, an
            amount of 10**30 or more: :func:`money_input`), a rate above 1.
    """
    owners = parse_owners(owners)
    if len(set(owners)) != len(owners) or not owners:
        raise InvalidGameError(f"owners must be distinct and non-empty; got {list(owners)}.")
    if (content is None) == (output_hash is None):
        raise InvalidGameError("pass exactly one of content= (hashed here) or output_hash=.")
    u = None if utilities is None else parse_values(utilities, name="utilities")
    if result is None and u is None:
        raise InvalidGameError("pass result= (values) and/or utilities= for the split.")
    if isinstance(result, ShapleyResult):
        values, stderr, method = result.values, result.stderr, result.method
    elif result is not None:
        values = parse_values(result)
        stderr, method = np.zeros(values.size), "given"
    else:
        values = exact_from_utilities(u)
        stderr, method = np.zeros(values.size), "exact"
    if u is not None and u.size != 1 << values.size:
        raise InvalidGameError(
            f"utilities must have 2**n = {1 << values.size} entries for {values.size} "
            f"owners; got {u.size}."
        )
    if values.size != len(owners):
        raise InvalidGameError(f"{values.size} values for {len(owners)} owners.")
    if result is not None and u is not None:  # the stored utilities must reproduce the row
        exact = exact_from_utilities(u)
        if not np.allclose(values, exact, rtol=1e-9, atol=1e-12):
            raise InvalidGameError(
                f"result= gives the values {np.asarray(values).tolist()}, but the utilities= given "
                f"with it have the Shapley values {exact.tolist()}; the row would pay by one and "
                "store the other, so its utilities would no longer reproduce its amounts. Pass "
                "utilities= alone (exact values, replayable), or result= alone (an estimate), or "
                "both only when they agree."
            )
    revenue_d = parse_money(money_input(revenue, "revenue"), name="revenue")
    rate = parse_money(money_input(royalty_rate, "royalty_rate"), name="royalty_rate", quantum=Decimal("1E-12"))
    if rate > 1:
        raise InvalidPoolError(f"royalty_rate must be in [0, 1]; got {rate}.")
    with decimal.localcontext() as ctx:
        ctx.prec = 80  # exact: revenue < 10**30 on the cent grid (32 digits) times a rate of 13 digits at most
        pool = (revenue_d * rate).quantize(CENT, rounding=decimal.ROUND_HALF_EVEN)
    return RowInputs(owners=owners, values=values, stderr=stderr, method=method, utilities=u,
                     revenue=revenue_d, royalty_rate=rate, pool=pool)  # fmt: skip
