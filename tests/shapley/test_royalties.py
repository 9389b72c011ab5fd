"""Royalty splits: exact cents, non-negative amounts, named policies, typed errors."""

from __future__ import annotations

import decimal
import logging
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datavalue import shapley

CENT = Decimal("0.01")

MANY = settings(
    derandomize=True, deadline=None, max_examples=2000, suppress_health_check=[HealthCheck.too_slow]
)

values_st = st.lists(
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),  # includes huge and subnormal values
        st.floats(-1e-300, 1e-300, allow_nan=False),
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 5e-324, 1.7976931348623157e308]),
        st.integers(-(10**6), 10**6).map(float),
    ),
    min_size=1,
    max_size=25,
)
pools_st = st.one_of(
    st.integers(0, 10**6),
    st.integers(0, 10**17),
    st.integers(10**28, 10**32),  # beyond the default 28-digit Decimal precision
    st.sampled_from([0, 1, 2, 3, 99, 101]),
).map(lambda cents: Decimal(f"{cents}E-2"))


def exact_sum(xs):
    with decimal.localcontext() as ctx:
        ctx.prec = decimal.MAX_PREC
        return sum(xs, Decimal(0))


def test_contract_example():
    res = shapley.exact(lambda S: float(min(len(S & {0}), len(S & {1, 2}))), 3)
    amounts = shapley.split_royalties(res.values, pool=Decimal("1234.56"))
    assert len(amounts) == 3 and all(isinstance(a, Decimal) for a in amounts)
    assert sum(amounts) == Decimal("1234.56")
    assert [str(a) for a in amounts] == ["823.04", "205.76", "205.76"]
    assert amounts[0] == Decimal("823.04") and list(amounts)[1:] == [amounts[1], amounts[2]]


@MANY
@given(
    values=values_st,
    pool=pools_st,
    policy=st.sampled_from(["srs-v1", "srs-equal-fallback-v1", "equal-v1"]),
)
def test_amounts_sum_exactly_to_the_pool(values, pool, policy):
    split = shapley.split_royalties(values, pool=pool, policy=policy)
    assert len(split) == len(values)
    for a in split:  # non-negative whole cents (checked with exact fractions: any size)
        assert isinstance(a, Decimal) and a >= 0 and (Fraction(a) * 100).denominator == 1
    assert (
        exact_sum([*split, split.unallocated]) == pool == exact_sum([split.paid, split.unallocated])
    )
    positive = [max(Fraction(v), Fraction(0)) for v in values]
    if policy == "equal-v1" or any(positive) or policy == "srs-equal-fallback-v1":
        assert exact_sum(split) == pool and split.unallocated == 0
    else:
        assert split.no_positive and split.unallocated == pool and exact_sum(split) == 0
    # Largest remainder: nobody is a cent or more away from the exact entitlement.
    if policy == "srs-v1" and any(positive):
        total = sum(positive)
        for a, p in zip(split, positive, strict=True):
            exact = Fraction(pool) * p / total
            assert abs(Fraction(a) - exact) < Fraction(1, 100)
            if p == 0:
                assert a == 0
        order = np.argsort(values)
        ranked = [Fraction(split[i]) for i in order]
        assert all(
            x <= y + Fraction(1, 100) for x, y in zip(ranked, ranked[1:], strict=False)
        )  # monotone


def test_rounding_goes_to_largest_remainders_then_lowest_index():
    split = shapley.split_royalties([1.0, 1.0, 1.0], pool=Decimal("0.02"))
    assert [str(a) for a in split] == ["0.01", "0.01", "0.00"]
    split = shapley.split_royalties([0.1, 0.6, 0.3], pool=Decimal("0.10"))
    assert [str(a) for a in split] == ["0.01", "0.06", "0.03"]
    split = shapley.split_royalties([1.0, 2.0], pool=Decimal("0.01"))
    assert [str(a) for a in split] == ["0.00", "0.01"]


def test_negative_contributors_are_clipped():
    split = shapley.split_royalties([3.0, -10.0, 1.0], pool=Decimal("40.00"))
    assert [str(a) for a in split] == ["30.00", "0.00", "10.00"]
    assert split.shares == (0.75, 0.0, 0.25) and split.policy == "srs-v1"


def test_no_positive_contributor_default_pays_nothing_and_reports(caplog):
    with caplog.at_level(logging.WARNING, logger="datavalue.shapley"):
        split = shapley.split_royalties([-1.0, 0.0, -0.5], pool=Decimal("9.99"))
    assert split.no_positive and split.unallocated == Decimal("9.99") and split.paid == 0
    assert "no owner contributed positively" in caplog.text


def test_no_positive_contributor_other_policies():
    fallback = shapley.split_royalties(
        [-1.0, -2.0, -3.0], pool=Decimal("1.00"), policy="srs-equal-fallback-v1"
    )
    assert [str(a) for a in fallback] == ["0.34", "0.33", "0.33"] and fallback.no_positive
    with pytest.raises(shapley.NoPositiveContributionError) as info:
        shapley.split_royalties([-1.0, 0.0], pool=Decimal("1.00"), policy="srs-strict-v1")
    assert isinstance(info.value, ValueError)


def test_equal_policy_ignores_values():
    split = shapley.split_royalties(
        [100.0, -5.0, 0.0, 1.0], pool=Decimal("10.00"), policy="equal-v1"
    )
    assert [str(a) for a in split] == ["2.50", "2.50", "2.50", "2.50"]


def test_other_quantum_and_huge_pools():
    yen = shapley.split_royalties([1.0, 2.0], pool=Decimal("1000"), quantum=Decimal("1"))
    assert [str(a) for a in yen] == ["333", "667"]
    huge = Decimal("123456789012345678901234567890.07")  # 32 digits
    split = shapley.split_royalties([1.0, 1e-300, 3.0], pool=huge)
    assert exact_sum(split) == huge == split.paid and split[1] == Decimal("0.00")
    assert str(split[0]) == "30864197253086419725308641972.52"


def test_accepts_a_shapley_result_and_ints_and_strings():
    res = shapley.exact(lambda S: float(len(S)), 2)
    assert sum(shapley.split_royalties(res, pool=7)) == 7
    assert sum(shapley.split_royalties([1.0], pool="0.05")) == Decimal("0.05")


@pytest.mark.parametrize(
    "pool, match",
    [
        (Decimal("-0.01"), ">= 0"),
        (-5, ">= 0"),
        (12.5, "float"),
        (Decimal("1.005"), "whole number"),
        (Decimal("NaN"), "finite"),
        (Decimal("Infinity"), "finite"),
        ("twelve", "decimal amount"),
        (None, "decimal amount"),
        (True, "float|Decimal"),
    ],
)
def test_bad_pools_raise(pool, match):
    with pytest.raises(shapley.InvalidPoolError, match=match) as info:
        shapley.split_royalties([1.0, 2.0], pool=pool)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "values", [[1.0, float("nan")], [float("inf"), 1.0], [], [[1.0, 2.0]], ["a"]]
)
def test_bad_values_raise(values):
    with pytest.raises(shapley.InvalidValuesError):
        shapley.split_royalties(values, pool=Decimal("1.00"))


def test_policy_registry():
    assert {"srs-v1", "srs-equal-fallback-v1", "srs-strict-v1", "equal-v1"} <= set(
        shapley.available_policies()
    )
    with pytest.raises(shapley.PolicyError, match="unknown royalty policy"):
        shapley.split_royalties([1.0], pool=1, policy="srs-v99")
    changed = shapley.RoyaltyPolicy(name="srs", version=1, weighting="clipped", no_positive="equal")
    with pytest.raises(shapley.PolicyError, match="new version"):
        shapley.register_policy(changed)
    assert shapley.get_policy("srs-v1").no_positive == "retain"  # untouched
    custom = shapley.RoyaltyPolicy(
        name="test-fallback", version=2, weighting="clipped", no_positive="equal"
    )
    split = shapley.split_royalties([-1.0, -1.0], pool=Decimal("1.00"), policy=custom)
    assert split.policy == "test-fallback-v2" and sum(split) == Decimal("1.00")
    with pytest.raises(shapley.PolicyError):
        shapley.RoyaltyPolicy(name="x", version=0, weighting="clipped", no_positive="retain")
    with pytest.raises(shapley.PolicyError):
        shapley.RoyaltyPolicy(name="x", version=1, weighting="softmax", no_positive="retain")
