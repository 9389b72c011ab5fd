"""Ninth probe leftovers (session 13): odd and huge money in ``RoyaltyLedger.record`` (P9-14)."""

from __future__ import annotations

import decimal
from decimal import Decimal

import pytest

from datavalue.shapley import RoyaltyLedger
from datavalue.shapley._errors import InvalidPoolError


def _record(led: RoyaltyLedger, output_id: str, revenue: object, rate: object = "0.5"):
    return led.record(output_id=output_id, content=output_id, prompt="p", revenue=revenue, royalty_rate=rate,
                      owners=["ann", "bob"], utilities=[0, 1, 1, 2], timestamp="2025-01-02")


@pytest.mark.parametrize("revenue", ["1e400", "1e-400", "NaN", "sNaN", "Infinity", "1_000", " 5 ", "5e2", "1E+2",
                                     "５", ".5", "", "1" * 5000])
def test_p9_14_revenue_text_that_is_not_plain_decimal_digits_is_refused(tmp_path, revenue):
    """Was: ``'1e400'`` raised a raw ``decimal.InvalidOperation`` from the pool's rounding; ``'1_000'``,
    ``' 5 '`` and ``'5e2'`` were recorded (the last as ``5E+2``)."""
    led = RoyaltyLedger(tmp_path / "l.jsonl")
    with pytest.raises(InvalidPoolError, match=r"revenue must (be written as plain decimal digits|be below 10\*\*30)"
                                               r".*'1234\.56'") as e:
        _record(led, "g1", revenue)
    assert not isinstance(e.value, decimal.InvalidOperation)
    assert len(led) == 0
    _record(led, "g2", "12.50")  # the ledger still takes a row
    assert led.records()[-1].revenue == Decimal("12.50")


@pytest.mark.parametrize("revenue", [Decimal("1E+400"), 10**400, Decimal("1E+100000000000"), Decimal("1E+30"),
                                     Decimal("0E-100000000000"), Decimal("1E-100000000000")])
def test_p9_14_a_revenue_too_large_or_too_finely_divided_is_refused_before_any_arithmetic(tmp_path, revenue):
    """Was: raw ``decimal.InvalidOperation`` (``1E+400``), a hang computing ``10**(10**11)`` (the huge
    exponents)."""
    led = RoyaltyLedger(tmp_path / "l.jsonl")
    with pytest.raises(InvalidPoolError, match=r"revenue must (be below 10\*\*30|have at most 40 decimal places)"):
        _record(led, "g1", revenue)
    assert len(led) == 0


@pytest.mark.parametrize("rate", ["5e-1", "1_0", Decimal("1E+100000000000")])
def test_p9_14_the_royalty_rate_follows_the_same_rule(tmp_path, rate):
    led = RoyaltyLedger(tmp_path / "l.jsonl")
    with pytest.raises(InvalidPoolError, match="royalty_rate must"):
        _record(led, "g1", "10.00", rate)


@pytest.mark.parametrize("revenue, rate, pool", [("999999999999999999999999999999.99", "0.333333333333",
                                                  "333333333333000000000000000000.00"),  # ...999.9966... rounded
                                                 ("-0.00", "0.5", "0.00"), ("+7", "1", "7.00"), (12, "0.5", "6.00")])
def test_p9_14_plain_amounts_up_to_the_bound_are_split_exactly(tmp_path, revenue, rate, pool):
    row = _record(RoyaltyLedger(tmp_path / "l.jsonl"), "g1", revenue, rate)
    assert row.pool == Decimal(pool)
