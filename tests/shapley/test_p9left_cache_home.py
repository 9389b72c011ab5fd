"""Ninth probe leftovers (session 13): one rule for '~' in run paths and utility caches (issue 22)."""

from __future__ import annotations

from pathlib import Path

import pytest

from datavalue._files import unexpanded_home_problem
from datavalue.shapley import CoalitionGame
from datavalue.shapley._errors import OutputPathError
from datavalue.shapley.games._cache import DiskCache
from datavalue.store import RunPathError
from datavalue.store._runpath import refuse_unexpanded_home


@pytest.mark.parametrize("path", ["~/p9left_cache/u.jsonl", Path("~/p9left_cache/u.jsonl"), "~nobody_p9/u.jsonl"])
def test_a_utility_cache_path_starting_with_tilde_is_not_created_literally(tmp_path, monkeypatch, path):
    """Was: ``CoalitionGame(..., cache_path="~/c.jsonl")`` created ``./~/c.jsonl`` in the current directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputPathError, match=r"the utility cache '~.*' starts with '~', which Python does not "
                                              r"expand.*expanduser.*Nothing was written"):
        CoalitionGame(lambda s: float(len(s)), 3, cache_path=path)
    with pytest.raises(OutputPathError, match="starts with '~'"):
        DiskCache(path, n=3)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / str(path).split("/")[0]).mkdir()  # a directory really named "~": used as it is
    game = CoalitionGame(lambda s: float(len(s)), 3, cache_path=path)
    assert game([0, 1]) == 2.0
    assert (tmp_path / str(path)).exists()


def test_the_run_path_uses_the_files_rule(tmp_path, monkeypatch):
    """``refuse_unexpanded_home`` is ``unexpanded_home_problem`` raised as a RunPathError: one rule, one text."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunPathError) as e:
        refuse_unexpanded_home("~/p9left_runs/r.zarr", "recording")
    assert str(e.value) == unexpanded_home_problem("~/p9left_runs/r.zarr", "recording:")
    assert str(e.value).startswith("recording: '~/p9left_runs/r.zarr' starts with '~', which Python does not expand")
    refuse_unexpanded_home("./~/r.zarr", "recording")  # not starting with '~': fine
    (tmp_path / "~").mkdir()
    refuse_unexpanded_home("~/r.zarr", "recording")  # a directory really named '~'
