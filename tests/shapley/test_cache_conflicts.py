"""The utility cache refuses a coalition recorded with two different values (issue 22, item 9)."""

from __future__ import annotations

import pytest

from datavalue import shapley
from datavalue.shapley import games


def _cache_with_duplicate(tmp_path, value):
    path = tmp_path / "u.jsonl"
    with shapley.DiskCache(path, n=2, fingerprint="f") as c:
        c.put(3, 3.0)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f'{{"mask": 3, "value": {value!r}}}\n')
    return path


def test_a_conflicting_duplicate_is_refused_on_load(tmp_path):
    path = _cache_with_duplicate(tmp_path, 333.0)
    with pytest.raises(shapley.CacheMismatchError, match=r"u\.jsonl:3 .*mask 3.*333.0.*3.0"):
        shapley.DiskCache(path, n=2, fingerprint="f")


def test_the_coalition_game_does_not_silently_use_the_conflicting_value(tmp_path):
    path = _cache_with_duplicate(tmp_path, 333.0)
    with pytest.raises(shapley.CacheMismatchError):
        games.CoalitionGame(lambda S: float(len(S)), 2, cache_path=path, fingerprint="f")


def test_an_identical_duplicate_is_fine(tmp_path):
    path = _cache_with_duplicate(tmp_path, 3.0)
    assert shapley.DiskCache(path, n=2, fingerprint="f").get(3) == 3.0


def test_put_refuses_a_different_value_and_accepts_the_same(tmp_path):
    with shapley.DiskCache(tmp_path / "u.jsonl", n=2, fingerprint="f") as c:
        c.put(1, 2.5)
        c.put(1, 2.5)
        with pytest.raises(shapley.CacheMismatchError, match="deterministic"):
            c.put(1, 2.75)
        assert c.get(1) == 2.5
