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
import re
import zipfile
from decimal import Decimal
from pathlib import Path

import numpy as np
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
    # ids that start with a tab or a carriage return are refused when recorded since session 13 (p8left: control
    # characters and padding in ids), so they can no longer reach a report
    for bad in ("\tTAB", "\rCR"):
        with pytest.raises(shapley.InvalidGameError, match="leading or trailing whitespace|control character"):
            _ledger(tmp_path / f"refused{len(bad)}{ord(bad[0])}.jsonl", owners=[bad, "plain"], values=[1.0, 1.0])
    owners = [evil, "+1-cmd", "@SUM(A1)", "-neg", "plain"]
    ledger = _ledger(tmp_path / "L.jsonl", owners=owners, values=[3.0, 2.0, 1.0, 1.0, -2.5])
    st = ledger.statement(shapley.Period())
    text = shapley.render_report(st, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    got = {r["owner"] for r in rows if r["kind"] == "owner"}
    assert "'" + evil in got and evil not in got
    for o in owners[1:4]:
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


# ------------------------------------------------------------------ item 1: datavalue demo --out DIR
@pytest.fixture
def tiny_mnist(monkeypatch):
    """Synthetic 'MNIST' (every class in the test split) so the demo runs offline in seconds."""
    import datavalue.data

    def fake(split="train", n=None, *, seed=0, flatten=True):
        rng = np.random.default_rng([0 if split == "train" else 1, seed or 0])
        n = n or 100
        return rng.random((n, 784), dtype=np.float32), np.arange(n, dtype=np.int64) % 10

    monkeypatch.setattr(datavalue.data, "load_mnist", fake)


def _demo(out: Path, *extra: str) -> int:
    return main(["demo", "--out", str(out), "--n-train", "96", "--epochs", "1", "--proj-dim", "64", "--quiet", *extra])


def test_demo_keeps_unrelated_files_and_refuses_to_overwrite(tmp_path, tiny_mnist, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("the user's notes")
    assert _demo(out) == 0  # a directory with other files in it is fine: nothing of the demo's is there
    assert (out / "keep.txt").read_text() == "the user's notes"
    assert all((out / name).exists() for name in ("run.zarr", "top_k.txt", "demo.png"))
    steps = datavalue.open_run(out / "run.zarr").n_steps
    capsys.readouterr()
    # a second run without --overwrite refuses before touching anything
    stamp = (out / "top_k.txt").stat().st_mtime_ns
    assert _demo(out) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err
    assert (out / "top_k.txt").stat().st_mtime_ns == stamp
    # --overwrite replaces the demo's outputs and nothing else
    assert _demo(out, "--overwrite") == 0
    assert (out / "keep.txt").read_text() == "the user's notes"
    assert datavalue.open_run(out / "run.zarr").n_steps == steps


def test_demo_overwrite_refuses_what_it_did_not_write(tmp_path, tiny_mnist):
    from datavalue.demo import run_demo

    out = tmp_path / "demo"
    (out / "run.zarr").mkdir(parents=True)
    (out / "run.zarr" / "mine.txt").write_text("x")
    with pytest.raises(E.StoreExistsError, match="not a datavalue run"):  # the recorder deletes only a run
        run_demo(out, n_train=96, epochs=1, proj_dim=64, overwrite=True, progress=False)
    assert (out / "run.zarr" / "mine.txt").exists()
    other = tmp_path / "demo2"
    other.mkdir()
    (tmp_path / "elsewhere.txt").write_text("outside")
    (other / "top_k.txt").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(E.StoreExistsError, match="symbolic link"):
        run_demo(other, n_train=96, epochs=1, proj_dim=64, overwrite=True, progress=False)
    assert (tmp_path / "elsewhere.txt").read_text() == "outside"


# ------------------------------------------------------------------ item 12: links out of a run
@pytest.fixture
def built(tmp_path):
    path = tmp_path / "run.zarr"
    _record(path, steps=3)
    datavalue.build_embeddings(path, curvature="empirical_fisher", progress=False)
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _link_embeddings_outside(run: Path, tmp_path: Path) -> Path:
    """Move the run's embeddings out and leave a symlink: the outside copy stands for someone's data."""
    outside = tmp_path / "someone_elses"
    outside.mkdir()
    (run / "embeddings").rename(outside / "embeddings")
    (outside / "embeddings" / "empirical_fisher" / "keep.txt").write_text("not the run's")
    (run / "embeddings").symlink_to(outside / "embeddings", target_is_directory=True)
    return outside


def test_build_overwrite_never_deletes_or_writes_through_a_link(built, tmp_path, capsys):
    outside = _link_embeddings_outside(built, tmp_path)
    before = _tree(outside)
    rc = main(["build", str(built), "--curvature", "empirical_fisher", "--overwrite"])
    assert rc == 2
    assert "leads outside the run" in capsys.readouterr().err
    assert _tree(outside) == before  # nothing deleted, nothing written
    from datavalue.store import create_array, delete_path

    with pytest.raises(E.StoreError, match="leads outside the run"):
        delete_path(built, "embeddings/empirical_fisher")
    with pytest.raises(E.StoreError, match="leads outside the run"):
        create_array(built, "embeddings/other/values", shape=(2, 2), dtype="float64", chunks=(2, 2))
    assert _tree(outside) == before


def test_archive_never_packs_what_a_link_points_to(built, tmp_path, capsys):
    (tmp_path / "secret.txt").write_text("password")
    (built / "notes.txt").symlink_to(tmp_path / "secret.txt")
    out = tmp_path / "a.zip"
    assert main(["archive", str(built), str(out)]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "outside the run" in err
    assert not out.exists()
    (built / "notes.txt").unlink()
    _link_embeddings_outside(built, tmp_path)
    assert main(["archive", str(built), str(out)]) == 2
    assert not out.exists()
    # without the link the run archives, and reopens
    (built / "embeddings").unlink()
    assert main(["archive", str(built), str(out)]) == 0
    with zipfile.ZipFile(out) as zf:
        assert not any("keep.txt" in n for n in zf.namelist())
    assert datavalue.open_run(out).n_steps == 3


def test_links_that_stay_inside_the_run_are_allowed(built, tmp_path):
    (built / "alias").symlink_to(built / "embeddings", target_is_directory=True)
    from datavalue.store import delete_path

    delete_path(built, "alias/nothing_here")  # inside the run: no refusal
    assert main(["archive", str(built), str(tmp_path / "ok.zip")]) == 0


def test_resume_never_appends_through_a_link(tmp_path):
    run = tmp_path / "run.zarr"
    _record(run, steps=1)
    outside = tmp_path / "someone_elses_grads"
    (run / "grads").rename(outside)
    (run / "grads").symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    model = _model()
    with pytest.raises(E.StoreError, match="lead outside the run"):
        datavalue.Recorder(run, model, proj_dim=None, chunk_rows=8, resume=True)
    assert _tree(outside) == before


def test_errors_doc_lists_these_tests():
    doc = (ROOT / "docs" / "errors.md").read_text()
    section = doc[doc.index("## Data that is not ours"):].split("\n## Third probe")[0]  # later probes list their own
    here = {name for name in globals() if name.startswith("test_") and name != "test_errors_doc_lists_these_tests"}
    listed = set(re.findall(r"`(test_[a-z0-9_]+)`", section))
    assert listed == here, listed ^ here
