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


# ---------------------------------------------------------------- write_report to streams (P8-08, P8-09)
@pytest.fixture(scope="module")
def statement(tmp_path_factory):
    ledger = RoyaltyLedger(tmp_path_factory.mktemp("p8_report") / "l.jsonl")
    _record(ledger, "a")
    return ledger.statement(period="2025-01-01:2025-02-01")


def test_p8_08_a_binary_stream_gets_the_files_bytes(statement, tmp_path):
    """Was: raw ``TypeError: a bytes-like object is required, not 'str'`` for ``sys.stdout.buffer``."""
    import io

    from datavalue.shapley.royalties import write_report

    buf = io.BytesIO()
    write_report(statement, buf, format="csv")
    write_report(statement, tmp_path / "r.csv")
    assert buf.getvalue() == (tmp_path / "r.csv").read_bytes()
    with open(tmp_path / "b.csv", "wb") as f:
        write_report(statement, f, format="csv")
    assert (tmp_path / "b.csv").read_bytes() == buf.getvalue()


def test_p8_08_a_closed_or_read_only_stream_is_a_clear_error(statement, tmp_path):
    """Was: raw ``ValueError: I/O operation on closed file`` / ``io.UnsupportedOperation: not writable``."""
    from datavalue.shapley._errors import OutputPathError
    from datavalue.shapley.royalties import write_report

    (tmp_path / "x.csv").write_text("keep")
    f = open(tmp_path / "x.csv", "w")  # noqa: SIM115
    f.close()
    with pytest.raises(OutputPathError, match="the stream .* is closed"):
        write_report(statement, f, format="csv")
    with open(tmp_path / "x.csv") as r, pytest.raises(OutputPathError, match="not open for writing"):
        write_report(statement, r, format="csv")


def test_p8_09_the_path_dash_is_not_a_file_named_dash(statement, tmp_path, monkeypatch):
    """Was: ``write_report(st, "-")`` wrote a file named ``-`` in the current directory."""
    from datavalue.shapley._errors import OutputPathError
    from datavalue.shapley.royalties import write_report

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputPathError, match="sys.stdout"):
        write_report(statement, "-", format="csv")
    assert list(tmp_path.iterdir()) == []
    assert write_report(statement, "./-", format="csv").name == "-"
