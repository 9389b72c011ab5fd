"""Fifth probe (issue 22): royalty writers and the ledger (P5-25..P5-29).

Each test failed before its fix: a run archive replaced by a report or a registry (P5-25), a
complete last row missing only its newline called torn and then moved aside by ``recover`` (P5-27),
royalty values given as strings or bools converted and paid on (P5-26), a report written in one
format under another format's name (P5-29), and any number of rows after the head file accepted as
one interrupted append (P5-28).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import zipfile
from decimal import Decimal

import numpy as np
import pytest

from datavalue import shapley
from datavalue.shapley.royalties import _anchor


def _row(led, output_id, *, revenue="10.00", owners=("ann",), result=(1.0,)):
    return led.record(output_id=output_id, content=output_id, prompt="p", revenue=Decimal(revenue),
                      owners=list(owners), result=list(result), timestamp="2025-01-10")  # fmt: skip


def _ledger(path, n=2, revenue="10.00"):
    led = shapley.RoyaltyLedger(path)
    for i in range(n):
        _row(led, f"g{i}", revenue=revenue)
    led.close()
    return path


def _run_archive(path):
    """A run archive as ``archive_run`` packs it: the run's files at the root of an uncompressed zip,
    ``zarr.json`` carrying the datavalue manifest."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                             "attributes": {"datavalue": {"schema": 1}}}))
        zf.writestr("grads/zarr.json", json.dumps({"zarr_format": 3, "node_type": "array"}))
    return path.read_bytes()


def _statement(tmp_path):
    return shapley.RoyaltyLedger(_ledger(tmp_path / "st.jsonl", n=1)).statement()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "datavalue.cli", "royalties", *map(str, args)],
                          capture_output=True, text=True)  # fmt: skip


# ---------------------------------------------------------------- P5-25: a run archive is a run
def test_report_and_registry_never_replace_a_run_archive(tmp_path):
    archive = tmp_path / "r.zip"
    before = _run_archive(archive)
    st = _statement(tmp_path)
    for fmt in ("json", "csv", "html"):
        with pytest.raises(shapley.OutputPathError, match=r"r\.zip is a datavalue run archive.*nothing was written"):
            shapley.write_report(st, archive, format=fmt, overwrite=True)
    with pytest.raises(shapley.OutputPathError, match="run archive"):
        shapley.OwnerRegistry().save(archive, overwrite=True)
    renamed = tmp_path / "backup.bin"  # found by its content, whatever its name; and through a link
    renamed.write_bytes(before)
    link = tmp_path / "link.json"
    link.symlink_to(archive)
    for p in (renamed, link):
        with pytest.raises(shapley.OutputPathError, match="run archive"):
            shapley.write_report(st, p, format="json", overwrite=True)
    assert archive.read_bytes() == before and renamed.read_bytes() == before


def test_royalties_cli_refuses_out_on_a_run_archive(tmp_path):
    ledger = _ledger(tmp_path / "l.jsonl", n=1)
    archive = tmp_path / "r.zip"
    before = _run_archive(archive)
    r = _cli(ledger, "--period", ":", "--out", archive, "--format", "json", "--overwrite")
    assert r.returncode == 2 and "datavalue run archive" in r.stderr and "nothing was written" in r.stderr
    assert archive.read_bytes() == before


def test_other_zip_files_are_still_replaced_with_overwrite(tmp_path):
    st = _statement(tmp_path)
    other = tmp_path / "photos.zip"  # a zip that holds no datavalue run (another tool's zarr.json neither)
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("zarr.json", json.dumps({"zarr_format": 3, "attributes": {"other": 1}}))
    with pytest.raises(shapley.OutputExistsError):
        shapley.write_report(st, other, format="json")
    shapley.write_report(st, other, format="json", overwrite=True)
    assert json.loads(other.read_text())["paid_total"] == "10.00"


# ---------------------------------------------------------------- P5-27: a row missing its newline
def _strip_final_newline(path):
    data = path.read_bytes()
    assert data.endswith(b"\n")
    path.write_bytes(data[:-1])


def test_a_complete_last_row_without_its_newline_is_a_row(tmp_path):
    path = _ledger(tmp_path / "l.jsonl")
    _strip_final_newline(path)
    led = shapley.RoyaltyLedger(path)
    assert led.verify() == 2 and led.statement().paid_total == Decimal("20.00")
    _row(led, "g2", revenue="5.00")  # the append writes the missing newline first
    assert path.read_bytes().endswith(b"\n") and path.read_bytes().count(b"\n") == 4
    assert shapley.RoyaltyLedger(path).verify() == 3
    assert shapley.RoyaltyLedger(path).statement().paid_total == Decimal("25.00")
    assert not list(tmp_path.glob("l.jsonl.torn-*"))


def test_recover_adds_the_missing_newline_and_moves_no_row(tmp_path, caplog):
    path = _ledger(tmp_path / "l.jsonl")
    _strip_final_newline(path)
    with caplog.at_level(logging.WARNING):
        assert shapley.RoyaltyLedger.recover(path) is None
    assert path.read_bytes().endswith(b"}\n") and "newline" in caplog.text
    assert not list(tmp_path.glob("l.jsonl.torn-*"))
    assert shapley.RoyaltyLedger(path).verify() == 2
    _strip_final_newline(path)
    assert len(shapley.RoyaltyLedger(path, repair=True)) == 2
    assert not list(tmp_path.glob("l.jsonl.torn-*"))


def test_a_header_without_its_newline_is_not_moved_aside(tmp_path):
    path = tmp_path / "l.jsonl"
    shapley.RoyaltyLedger(path).close()
    _strip_final_newline(path)
    led = shapley.RoyaltyLedger(path)
    assert len(led) == 0
    _row(led, "g0")
    assert shapley.RoyaltyLedger(path).verify() == 1


def test_recover_never_moves_aside_a_row_the_head_file_records(tmp_path):
    path = _ledger(tmp_path / "l.jsonl")
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # the recorded last row damaged later (not an interrupted append)
    damaged = path.read_bytes()
    with pytest.raises(shapley.LedgerError, match=r"torn.*head file l\.jsonl\.head records 2 rows and only 1 come before it.*Restore the ledger"):
        shapley.RoyaltyLedger(path)
    with pytest.raises(shapley.LedgerError, match=r"head file l\.jsonl\.head records 2 rows.*Restore the ledger"):
        shapley.RoyaltyLedger.recover(path)
    assert path.read_bytes() == damaged and not list(tmp_path.glob("l.jsonl.torn-*"))


# ---------------------------------------------------------------- P5-26: nothing is converted
@pytest.mark.parametrize(
    "values",
    [["1", "2"], [True, False], [1.0, True], np.array(["1", "2"]), np.array([True, False]),
     np.array([1.0, "2"], dtype=object), [np.bool_(True), 1.0], [b"1", b"2"], "12"],
    ids=["str", "bool", "float-and-bool", "np-str", "np-bool", "object-str", "np-bool-scalar", "bytes", "one-str"],
)  # fmt: skip
def test_split_royalties_refuses_strings_and_bools(values):
    with pytest.raises(shapley.InvalidValuesError, match="Nothing is converted"):
        shapley.split_royalties(values, pool=Decimal("1.00"))


def test_numbers_of_any_kind_are_still_values():
    for values in ([1, 2], [Decimal("1"), 2], np.array([1, 2], dtype=np.int32), [np.float32(1), 2.0]):
        assert [str(a) for a in shapley.split_royalties(values, pool=Decimal("1.00")).amounts] == ["0.33", "0.67"]


def test_ledger_record_refuses_string_or_bool_values_and_utilities(tmp_path):
    path = tmp_path / "l.jsonl"
    led = shapley.RoyaltyLedger(path)
    before = path.read_bytes()
    bad = [dict(result=["0.25", "0.75"]), dict(result=[True, False]), dict(utilities=["0", "1", "1", "1"]),
           dict(utilities=[False, True, True, True])]  # fmt: skip
    for i, kw in enumerate(bad):
        with pytest.raises(shapley.InvalidValuesError, match="Nothing is converted"):
            led.record(output_id=f"g{i}", prompt="p", revenue=Decimal("1.00"), owners=["a", "b"],
                       content=b"x", **kw)  # fmt: skip
    assert path.read_bytes() == before and len(shapley.RoyaltyLedger(path)) == 0


def test_exact_from_utilities_refuses_strings_and_bools():
    for u in (["0", "1", "1", "1"], [False, True, True, True], np.array([[0, 1, 1, 1]], dtype=bool)):
        with pytest.raises(shapley.InvalidValuesError, match="Nothing is converted"):
            shapley.exact_from_utilities(u)
    assert shapley.exact_from_utilities([0, 1, 1, 1]).tolist() == [0.5, 0.5]


# ---------------------------------------------------------------- P5-29: format and name agree
@pytest.mark.parametrize("name,fmt", [("r.csv", "html"), ("r.html", "csv"), ("r.json.csv", "json"), ("r.HTM", "json")])
def test_write_report_refuses_a_format_another_suffix_names(tmp_path, name, fmt):
    st = _statement(tmp_path)
    ext = name.rsplit(".", 1)[1]
    with pytest.raises(shapley.OutputPathError, match=rf"ends in \.{ext}, the suffix of .* reports, but .* {fmt.upper()}.*nothing was written"):
        shapley.write_report(st, tmp_path / name, format=fmt)
    assert not (tmp_path / name).exists()


def test_a_format_with_a_matching_or_unknown_suffix_is_written(tmp_path):
    st = _statement(tmp_path)
    for name, fmt in (("a.csv", "csv"), ("b.htm", "html"), ("c.txt", "csv"), ("d", "json"), ("e.JSON", None)):
        shapley.write_report(st, tmp_path / name, format=fmt)
        assert (tmp_path / name).stat().st_size > 0
    assert shapley.infer_format("x.txt", format="csv") == "csv"
    with pytest.raises(shapley.OutputPathError, match="ends in .csv"):
        shapley.infer_format("x.csv", format="html")


def test_royalties_cli_refuses_a_format_another_suffix_names(tmp_path):
    ledger = _ledger(tmp_path / "l.jsonl", n=1)
    for name, fmt in (("r.csv", "html"), ("r.html", "csv"), ("r.json.csv", "json")):
        r = _cli(ledger, "--period", ":", "--out", tmp_path / name, "--format", fmt)
        assert r.returncode == 2 and "--format" in r.stderr, r.stderr
        assert not (tmp_path / name).exists()
    r = _cli(ledger, "--period", ":", "--out", tmp_path / "ok.csv", "--format", "csv")
    assert r.returncode == 0 and (tmp_path / "ok.csv").read_text().startswith("period_start")


# ---------------------------------------------------------------- P5-28: rows beyond the head
def _head_back(path, rows_after):
    """The head file as it was ``rows_after`` appends ago."""
    led = shapley.RoyaltyLedger(path)
    rec = led.records()
    keep = len(rec) - rows_after
    _anchor.write_head(path, rows=keep, last_hash=rec[keep - 1].row_hash, key=None)


def test_one_row_after_the_head_is_an_interrupted_append(tmp_path, caplog):
    path = _ledger(tmp_path / "l.jsonl")
    _head_back(path, 1)
    with caplog.at_level(logging.WARNING):
        assert shapley.RoyaltyLedger(path).verify() == 2
    assert "1 row after its head (an append was interrupted)" in caplog.text
    _row(shapley.RoyaltyLedger(path), "g9")
    assert json.loads(path.with_name("l.jsonl.head").read_text())["rows"] == 3


def test_more_rows_after_the_head_are_refused_until_reanchored(tmp_path):
    path = _ledger(tmp_path / "l.jsonl", n=4)
    _head_back(path, 3)
    with pytest.raises(shapley.LedgerError, match=r"3 rows beyond its head file.*reanchor"):
        shapley.RoyaltyLedger(path)
    head = path.with_name("l.jsonl.head").read_text()
    data = path.read_bytes()
    with pytest.raises(shapley.LedgerError, match="beyond its head"):
        shapley.RoyaltyLedger(path, repair=True)
    assert path.read_bytes() == data and path.with_name("l.jsonl.head").read_text() == head
    shapley.RoyaltyLedger.reanchor(path)  # the explicit acceptance, after checking the rows
    assert shapley.RoyaltyLedger(path).verify() == 4


def test_a_reader_racing_several_appends_is_not_refused(tmp_path, monkeypatch):
    """A reader reads the head, then the ledger: appends in between leave more rows than the head it
    read. It reads the head again and retries, rather than calling them added by hand."""
    path = _ledger(tmp_path / "l.jsonl", n=4)
    led = shapley.RoyaltyLedger(path)
    fresh = path.with_name("l.jsonl.head").read_text()
    _head_back(path, 3)
    stale = path.with_name("l.jsonl.head").read_text()
    path.with_name("l.jsonl.head").write_text(fresh)
    calls = []

    def read_head_text(ledger):
        calls.append(1)
        return stale if len(calls) == 1 else fresh  # the writers finish between the two reads

    monkeypatch.setattr(_anchor, "read_head_text", read_head_text)
    assert led.verify() == 4 and len(calls) >= 2


def test_errors_doc_lists_these_tests():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "errors.md").read_text()
    start = doc.index("### Fifth probe: royalties and the ledger")
    end = doc.find("\n#", start + 1)
    section = doc[start : end if end > 0 else len(doc)]
    here = {name for name in globals() if name.startswith("test_") and name != "test_errors_doc_lists_these_tests"}
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", section))
    assert here <= named, here - named
