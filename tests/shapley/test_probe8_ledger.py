"""Eighth probe (session 12): the royalty ledger (P8-07)."""

from __future__ import annotations

import os

import pytest

from datavalue.shapley import RoyaltyLedger


def _record(ledger: RoyaltyLedger, output_id: str) -> None:
    ledger.record(output_id=output_id, prompt="p", revenue="1.00", owners=["x", "y"], utilities=[0, 1, 1, 2],
                  content=output_id.encode(), timestamp="2025-01-01")


@pytest.mark.parametrize("other_ledger_there", [False, True])
def test_p8_07_a_ledger_opened_by_a_relative_path_keeps_appending_to_it_after_chdir(tmp_path, monkeypatch,
                                                                                    other_ledger_there):
    """Was: after ``os.chdir`` the handle looked for ``l.jsonl`` in the new directory: a raw
    ``FileNotFoundError``, or (another ledger there) ``l.jsonl changed under this handle``."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    if other_ledger_there:
        monkeypatch.chdir(b)
        with RoyaltyLedger("l.jsonl") as other:
            _record(other, "other")
    monkeypatch.chdir(a)
    ledger = RoyaltyLedger("l.jsonl")
    _record(ledger, "first")
    monkeypatch.chdir(b)
    _record(ledger, "second")
    assert ledger.path == a / "l.jsonl" and len(ledger) == 2
    ledger.close()
    assert [r.output_id for r in RoyaltyLedger(a / "l.jsonl").records()] == ["first", "second"]
    assert sorted(os.listdir(b)) == (["l.jsonl", "l.jsonl.head"] if other_ledger_there else [])
    if other_ledger_there:
        assert [r.output_id for r in RoyaltyLedger(b / "l.jsonl").records()] == ["other"]
