"""Ninth probe (session 13): the utility cache's masks and player count (P9-08, P9-09).

``DiskCache.put`` wrote any mask: ``-1``, ``16`` (n=4) or ``2**70`` went to the file, and the cache
(every utility in it, each maybe an hour of training) then refused to open; ``2.5`` was written as
coalition 2 and ``"3"`` as 3. ``DiskCache(n=...)`` took ``1.5`` as 1, ``True`` as 1, ``-1`` raised a
raw ``ValueError: negative shift count`` and a huge ``n`` a ``MemoryError`` when the cache was read.
"""

from __future__ import annotations

import numpy as np
import pytest

from datavalue.shapley import DiskCache
from datavalue.shapley._errors import UtilityError


@pytest.mark.parametrize("mask", [-1, 16, 2**70, 2.5, 3.0, True, "3", None])
def test_p9_08_a_mask_that_is_no_coalition_is_refused_and_nothing_written(tmp_path, mask):
    path = tmp_path / "u.jsonl"
    with DiskCache(path, n=4) as c:
        c.put(5, 1.25)
        before = path.read_bytes()
        with pytest.raises(UtilityError, match="coalition mask must be an int|is no coalition"):
            c.put(mask, 2.0)
        assert path.read_bytes() == before
    with DiskCache(path, n=4) as again:  # was: refused to open (mask outside 0..2**4-1)
        assert again.items() == [(5, 1.25)]


def test_p9_08_integer_masks_of_any_int_type_are_kept(tmp_path):
    path = tmp_path / "u.jsonl"
    with DiskCache(path, n=4) as c:
        c.put(np.int64(3), 1.0)
        c.put(np.uint8(15), 2.0)
        c.put(0, 0.5)
    with DiskCache(path, n=4) as again:
        assert sorted(again.items()) == [(0, 0.5), (3, 1.0), (15, 2.0)]


@pytest.mark.parametrize("n", [-1, 1.5, True, "3", None])
def test_p9_09_a_player_count_that_is_no_count_is_refused(tmp_path, n):
    with pytest.raises(UtilityError, match="n .the number of players. must be an int >= 0"):
        DiskCache(tmp_path / "u.jsonl", n=n)
    assert list(tmp_path.iterdir()) == []


def test_p9_09_a_huge_player_count_reads_a_cache_without_allocating_two_to_the_n(tmp_path):
    path = tmp_path / "u.jsonl"
    n = 2**40  # 1 << n alone would be a 128 GiB int
    with DiskCache(path, n=n) as c:
        c.put(2**39, 1.0)
    with DiskCache(path, n=n) as again:  # was: MemoryError
        assert again.items() == [(2**39, 1.0)]
