"""Issue 22 item 8: sample ids outside int64 are refused for every input dtype, never wrapped."""

from __future__ import annotations

import numpy as np
import pytest

from datavalue.capture._pipeline import parse_sample_ids
from datavalue.errors import RecorderError


@pytest.mark.parametrize(
    ("ids", "shown"),
    [
        ([2**63], "9223372036854775808"),
        ([1, 2**63 + 5], "9223372036854775813"),
        ([-(2**63) - 1], "-9223372036854775809"),
        ([2**64], "18446744073709551616"),
        (np.array([3, 2**64 - 1], dtype=np.uint64), "18446744073709551615"),
        (np.array([2**63], dtype=np.uint64), "9223372036854775808"),
        (np.array([1e20]), "1e+20"),
        (np.array([-1e20]), "-1e+20"),
        (np.array([2.0**63]), "9.223372036854776e+18"),
        ([1e20, 2.0], "1e+20"),
    ],
)
def test_ids_outside_int64_refused_with_values(ids, shown):
    with pytest.raises(RecorderError, match="int64") as exc:
        parse_sample_ids(ids)
    assert shown in str(exc.value)


@pytest.mark.parametrize("ids", [np.array([1.5, 2.0]), np.array([np.inf]), np.array([np.nan, 1.0])])
def test_non_integral_or_non_finite_float_ids_refused(ids):
    with pytest.raises(RecorderError, match="integers"):
        parse_sample_ids(ids)


@pytest.mark.parametrize(
    "ids",
    [[2**63 - 1, -(2**63) + 1], np.array([2**63 - 1], dtype=np.uint64), np.array([0.0, 7.0, -(2.0**62)]),
     np.array([1, 2], dtype=np.uint8), range(3), [np.int64(5), 6]],
)
def test_ids_inside_int64_kept_exactly(ids):
    got = parse_sample_ids(ids)
    assert got.dtype == np.int64
    expect = [int(v) for v in (list(ids) if not isinstance(ids, np.ndarray) else ids.tolist())]
    assert got.tolist() == expect


@pytest.mark.parametrize("ids", [[-(2**63)], np.array([3, -(2**63)], dtype=np.int64), np.array([-(2.0**63)])])
def test_the_store_marker_id_is_refused(ids):
    """-2**63 marks rows the store has not written yet (issue 22 item 7: an older copy of a chunk
    is told from data), so it cannot be a sample id."""
    with pytest.raises(RecorderError, match="reserved"):
        parse_sample_ids(ids)


@pytest.mark.parametrize("r", [range(5), range(3, 40, 7), range(10, -3, -4), range(2**63 - 4, 2**63 - 1),
                               range(-(2**63) + 1, -(2**63) + 5, 2), range(2**63 - 2, 2**63 + 1),
                               range(-(2**63), -(2**63) + 3), range(7, 7), range(0, 2**64, 2**62)])
def test_a_range_of_ids_parses_like_the_same_list(r):
    """``range`` ids take a fast path (issue 20): the same ids, and the same refusals, as the list of them."""
    from datavalue.errors import RecorderError

    def parse(x):
        try:
            return parse_sample_ids(x)
        except RecorderError as e:
            return str(e)

    fast, slow = parse(r), parse(list(r))
    if isinstance(slow, str):
        assert fast == slow
    else:
        assert fast.dtype == np.int64 and np.array_equal(fast, slow)
