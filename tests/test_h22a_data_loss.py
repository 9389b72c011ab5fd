"""Issue 22: nothing lost, nothing silently wrong, nothing outside the run.

Each test reproduces a way a writing command destroyed or leaked data that was not its own:
the demo emptying its output directory, ``overwrite=True`` deleting what is not a run, a royalty
report replacing its own ledger, a symlink leading a rebuild or an archive outside the run, and
spreadsheet formulas smuggled into the CSV report. The hostile inputs are listed in
``docs/errors.md`` ("Data that is not ours").
"""

from __future__ import annotations

import csv
import io
from decimal import Decimal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import zarr

import datavalue
from datavalue import errors as E
from datavalue import shapley
from datavalue.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _record(path: Path, *, overwrite: bool = False, steps: int = 2) -> None:
    model = _model()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with datavalue.Recorder(path, model, proj_dim=None, chunk_rows=8, overwrite=overwrite) as rec:
        for t in range(steps):
            with rec.step(sample_ids=range(6 * t, 6 * t + 6), lr=0.1):
                F.cross_entropy(model(x), y).backward()
            model.zero_grad()


# ------------------------------------------------------------------ item 2: Recorder(overwrite=True)
def test_recorder_overwrite_refuses_a_regular_file(tmp_path):
    path = tmp_path / "notes.zarr"
    path.write_text("my notes")
    with pytest.raises(E.StoreExistsError, match="regular file, not a datavalue run") as info:
        _record(path, overwrite=True)
    assert isinstance(info.value, FileExistsError)
    assert "nothing was deleted" in str(info.value)
    assert path.read_text() == "my notes"


def test_recorder_overwrite_refuses_a_foreign_zarr_store(tmp_path):
    path = tmp_path / "other.zarr"
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.attrs["mine"] = "precious"
    g.create_array("x", shape=(3,), dtype="int64")[:] = [1, 2, 3]
    with pytest.raises(E.StoreExistsError, match="without a datavalue run manifest"):
        _record(path, overwrite=True)
    assert list(zarr.open_group(str(path), mode="r")["x"][:]) == [1, 2, 3]


def test_recorder_overwrite_refuses_a_plain_directory_and_a_symlink(tmp_path):
    plain = tmp_path / "dir"
    plain.mkdir()
    (plain / "keep.txt").write_text("x")
    with pytest.raises(E.StoreExistsError, match="directory with 1 entry and no zarr.json"):
        _record(plain, overwrite=True)
    assert (plain / "keep.txt").exists()
    real = tmp_path / "real.zarr"
    _record(real)
    link = tmp_path / "link.zarr"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(E.StoreExistsError, match="symbolic link"):
        _record(link, overwrite=True)
    assert datavalue.open_run(real).n_steps == 2


def test_recorder_overwrite_still_replaces_a_run(tmp_path):
    path = tmp_path / "run.zarr"
    _record(path, steps=2)
    _record(path, overwrite=True, steps=1)
    assert datavalue.open_run(path).n_steps == 1


# ------------------------------------------------------------------ item 5: report over its own ledger
def _ledger(path: Path, owners=("a", "b"), values=(1.0, 2.0)) -> shapley.RoyaltyLedger:
    ledger = shapley.RoyaltyLedger(path)
    ledger.record(output_id="g1", prompt="p", revenue=Decimal("10.00"), owners=list(owners), result=list(values),
                  content=b"x", timestamp="2025-01-01")
    return ledger


def test_royalties_refuses_to_write_the_report_over_its_ledger(tmp_path, capsys):
    ledger = tmp_path / "L.jsonl"
    _ledger(ledger)
    before = ledger.read_bytes()
    rc = main(["royalties", str(ledger), "--period", ":", "--out", str(ledger), "--format", "json", "--overwrite"])
    assert rc == 2
    assert ledger.read_bytes() == before
    assert "is the ledger" in capsys.readouterr().err
    # the same file under another spelling (.., a symlink) is the same ledger
    (tmp_path / "sub").mkdir()
    other = tmp_path / "sub" / ".." / "L.jsonl"
    assert main(["royalties", str(ledger), "--period", ":", "--out", str(other), "--format", "json", "--overwrite"]) == 2
    (tmp_path / "alias.json").symlink_to(ledger)
    assert main(["royalties", str(ledger), "--period", ":", "--out", str(tmp_path / "alias.json"), "--overwrite"]) == 2
    assert ledger.read_bytes() == before
    assert shapley.RoyaltyLedger(ledger, create=False).records()  # still a valid ledger
    # a report elsewhere is still written
    assert main(["royalties", str(ledger), "--period", ":", "--out", str(tmp_path / "r.json")]) == 0


# ------------------------------------------------------------------ item 13: CSV formula injection
def test_csv_report_escapes_formulas_in_text_and_keeps_numbers(tmp_path):
    evil = '=HYPERLINK("http://evil","x")'
    owners = [evil, "+1-cmd", "@SUM(A1)", "\tTAB", "\rCR", "-neg", "plain"]
    ledger = _ledger(tmp_path / "L.jsonl", owners=owners, values=[3.0, 2.0, 1.0, 1.0, 1.0, 1.0, -2.5])
    st = ledger.statement(shapley.Period())
    text = shapley.render_report(st, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    got = {r["owner"] for r in rows if r["kind"] == "owner"}
    assert "'" + evil in got and evil not in got
    for o in owners[1:6]:
        assert "'" + o in got, (o, got)
    assert "plain" in got
    for r in rows:
        for field in ("owner", "name", "currency", "aggregation", "policies"):
            assert r[field][:1] not in ("=", "+", "-", "@", "\t", "\r"), r
        # numbers stay numbers, negative ones included
        Decimal(r["amount"])
        if r["value_sum"]:
            float(r["value_sum"])
    assert any(float(r["value_sum"]) < 0 for r in rows if r["kind"] == "owner")
    total = sum(Decimal(r["amount"]) for r in rows if r["kind"] in ("owner", "unallocated"))
    assert total == Decimal("10.00")
