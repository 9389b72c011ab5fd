"""Fourth probe (issue 22): report, registry and Parquet writers given paths they must refuse.

Every writer of user-facing outputs refuses a path inside a datavalue run (one rule,
``datavalue._files.inside_run``), the API refuses a royalty ledger and its own files as the CLI
does, bad paths get the package's error classes (never a raw OSError), Parquet is written only
under a Parquet name, and a ledger row's ``output_id`` is a non-empty str (nothing converted).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue import _files, cli, shapley
from datavalue import errors as E
from datavalue.shapley.royalties import OwnerRegistry, RoyaltyLedger, write_report
from datavalue.store import refuse_inside_run

X = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
PERIOD = "2025-01-01:2025-02-01"


def _loss(model):
    return F.cross_entropy(model(X[:2]), Y[:2], reduction="none")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small built run and its model."""
    path = tmp_path_factory.mktemp("run") / "r.zarr"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(path, model, optimizer=opt, proj_dim=None) as rec:
        for t in range(4):
            ids = torch.arange(t * 4, (t + 1) * 4)
            with rec.step(sample_ids=ids):
                F.cross_entropy(model(X[ids]), Y[ids]).backward()
            opt.step()
            opt.zero_grad()
    datavalue.build_embeddings(path, progress=False)
    return path, model


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _ledger(path: Path) -> RoyaltyLedger:
    led = RoyaltyLedger(path)
    led.record(content="c1", output_id="g1", prompt="p", revenue="10.00", owners=["a", "b"], result=[1.0, 1.0],
               timestamp="2025-01-05T00:00:00+00:00")
    led.record(content="c2", output_id="g2", prompt="p", revenue="5.00", owners=["a", "c"], result=[1.0, 3.0],
               timestamp="2025-01-06T00:00:00+00:00")
    return led


@pytest.fixture
def ledger(tmp_path):
    path = tmp_path / "l.jsonl"
    led = _ledger(path)
    st = led.statement(PERIOD)
    led.close()
    return path, st


# ------------------------------------------------------------------ the rule: inside_run
def test_inside_run_names_the_run_and_only_a_datavalue_run(built, tmp_path):
    run, _ = built
    real = run.resolve()
    assert _files.inside_run(run) == real
    assert _files.inside_run(run / "zarr.json") == real
    assert _files.inside_run(run / "embeddings" / "new" / "x.parquet") == real  # the run, not its group
    assert _files.inside_run(run.parent / "report.html") is None
    assert _files.inside_run(run / ".." / "report.html") is None
    alias = tmp_path / "alias"
    alias.symlink_to(run, target_is_directory=True)
    assert _files.inside_run(alias / "report.html") == real
    assert _files.inside_run(tmp_path / "x" / ".." / "alias" / "zarr.json") == real
    # a zarr.json that is not a datavalue group (a report named zarr.json, another tool's store) is no run
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"a": 1}}')
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "zarr.json").write_text("not json")
    assert _files.inside_run(tmp_path / "out" / "report.html") is None
    assert _files.inside_run(tmp_path / "out2" / "report.html") is None
    refuse_inside_run(tmp_path / "out" / "r.parquet")  # the store's check is the same rule: no refusal
    with pytest.raises(E.StoreError, match=r"lies inside the run .*r\.zarr"):
        refuse_inside_run(alias / "r.parquet")


# ------------------------------------------------------------------ repro_04: writers inside a run
def test_royalties_cli_refuses_out_inside_a_run(built, ledger, capsys):
    run, _ = built
    led, _ = ledger
    before = _tree(run)
    for out in (run / "zarr.json", run / "report.html", run / "embeddings" / "r.csv"):
        rc = cli.main(["royalties", str(led), "--period", PERIOD, "--out", str(out), "--format", "json", "--overwrite"])
        err = capsys.readouterr().err
        assert rc == 2 and "lies inside the datavalue run" in err and "Traceback" not in err, err
    assert _tree(run) == before
    assert datavalue.open_run(run).n_steps == 4


def test_write_report_and_registry_save_refuse_paths_inside_a_run(built, ledger, tmp_path):
    run, _ = built
    _, st = ledger
    before = _tree(run)
    alias = tmp_path / "alias"
    alias.symlink_to(run, target_is_directory=True)
    for out in (run / "zarr.json", run / "report.html", alias / "report.csv", run / "grads" / "new" / "r.json"):
        with pytest.raises(shapley.OutputPathError, match=r"lies inside the datavalue run .*r\.zarr.*nothing was written"):
            write_report(st, out, format="json", overwrite=True)
        with pytest.raises(shapley.OutputPathError, match="lies inside the datavalue run"):
            OwnerRegistry().save(out, overwrite=True)
    assert _tree(run) == before
    assert datavalue.open_run(run).n_steps == 4
    assert write_report(st, tmp_path / "report.json").is_file()  # outside the run: written


# ------------------------------------------------------------------ repro_05: the API door of the ledger guard
def test_write_report_and_registry_save_refuse_a_ledger_and_its_files(ledger, tmp_path):
    led, st = ledger
    head = led.with_name(led.name + ".head")
    raw, head_text = led.read_bytes(), head.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(led)
    os.link(led, tmp_path / "hard.jsonl")
    (tmp_path / "renamed.txt").write_bytes(raw)  # a ledger under any name is found by its header
    cases = [led, head, led.with_name(led.name + ".lock"), led.with_name(led.name + ".torn-1"),
             led.with_name(led.name + ".head.replaced-2"), tmp_path / "link.jsonl", tmp_path / "hard.jsonl",
             tmp_path / "sub" / ".." / "l.jsonl.head", tmp_path / "renamed.txt"]
    for out in cases:
        with pytest.raises(shapley.LedgerError, match="nothing was written"):
            write_report(st, out, format="json", overwrite=True)
        with pytest.raises(shapley.LedgerError, match="nothing was written"):
            OwnerRegistry().save(out, overwrite=True)
    assert led.read_bytes() == raw and head.read_bytes() == head_text
    assert not led.with_name(led.name + ".lock").exists()  # no report standing in for the append lock
    assert RoyaltyLedger(led, create=False).verify() == 2
    assert write_report(st, tmp_path / "l.jsonl.html").is_file()  # a name that only starts like the ledger's


# ------------------------------------------------------------------ repro_07: package errors, not OSError
def test_report_and_registry_writers_give_package_errors_for_bad_paths(ledger, tmp_path):
    _, st = ledger
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(shapley.OutputExistsError, match="is a directory"):
        write_report(st, tmp_path / "dir.csv", overwrite=True)
    with pytest.raises(shapley.OutputPathError, match=r"x\.txt is a file, not a directory"):
        write_report(st, tmp_path / "x.txt" / "r.csv")
    with pytest.raises(shapley.OutputPathError, match=r"x\.txt is a file, not a directory"):
        OwnerRegistry().save(tmp_path / "x.txt" / "deeper" / "r.json")
    with pytest.raises(shapley.OutputExistsError, match="is a directory"):
        OwnerRegistry().save(tmp_path, overwrite=True)
    assert (tmp_path / "x.txt").read_text() == "x" and (tmp_path / "dir.csv").is_dir()
    reg = OwnerRegistry(names={"a": "A"})
    reg.save(tmp_path / "new" / "owners.json")  # missing parents are created
    assert OwnerRegistry.load(tmp_path / "new" / "owners.json").to_dict() == reg.to_dict()
    with pytest.raises(shapley.OutputExistsError, match="already exists"):
        reg.save(tmp_path / "new" / "owners.json")


def test_report_writer_turns_an_os_refusal_into_a_package_error(ledger, tmp_path, monkeypatch):
    _, st = ledger
    (tmp_path / "r.json").write_text("before")
    real_replace = os.replace

    def full(src, dst):
        if str(dst).startswith(str(tmp_path)):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(shapley.OutputPathError, match="cannot write the report .*No space.*previous file is unchanged"):
        write_report(st, tmp_path / "r.json", overwrite=True)
    with pytest.raises(shapley.OutputPathError, match="cannot write the owner registry .*Nothing was written"):
        OwnerRegistry().save(tmp_path / "o.json")
    assert (tmp_path / "r.json").read_text() == "before"
    assert sorted(os.listdir(tmp_path)) == ["l.jsonl", "l.jsonl.head", "r.json"]  # no temporary left


def test_save_parquet_to_a_directory_or_under_a_file_is_a_package_error(built, tmp_path):
    run, model = built
    attr = datavalue.Attributor(run, model, progress=False)
    scores = attr.scores(_loss)
    (tmp_path / "d.parquet").mkdir()
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(E.StoreExistsError, match="is a directory"):
        attr.save_parquet(scores, tmp_path / "d.parquet", overwrite=True)
    with pytest.raises(E.QueryError, match=r"x\.txt is a file, not a directory"):
        attr.save_parquet(scores, tmp_path / "x.txt" / "s.parquet")
    assert (tmp_path / "d.parquet").is_dir() and not any((tmp_path / "d.parquet").iterdir())


# ------------------------------------------------------------------ repro_08: Parquet only under a Parquet name
def test_parquet_writers_refuse_a_name_of_another_format(built, tmp_path, capsys):
    run, model = built
    attr = datavalue.Attributor(run, model, progress=False)
    scores = attr.scores(_loss)
    for name in ("s.csv", "s.json", "s"):
        with pytest.raises(E.QueryError, match=r"written as Parquet, so the name must end in \.parquet"):
            attr.save_parquet(scores, tmp_path / name)
        with pytest.raises(E.QueryError, match="must end in .parquet"):
            attr.top_k(_loss, k=2).to_parquet(tmp_path / name)
    assert not any(tmp_path.iterdir())
    assert attr.save_parquet(scores, tmp_path / "s.PQ").is_file()
    assert attr.top_k(_loss, k=2).to_parquet(tmp_path / "t.parquet").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.PQ", "t.parquet"]  # no temporary left
    # the CLI states the same rule, naming its flag
    from datavalue._cli_query import check_parquet_name

    with pytest.raises(E.QueryError, match=r"--out .*r\.csv: the results are written as Parquet.*--out .*r\.parquet"):
        check_parquet_name(tmp_path / "r.csv")


def test_write_parquet_replaces_atomically(built, tmp_path, monkeypatch):
    import pandas as pd

    from datavalue.query._results import write_parquet

    out = tmp_path / "r.parquet"
    write_parquet(pd.DataFrame({"a": [1, 2]}), out)
    before = out.read_bytes()

    def boom(self, path, **kw):
        Path(path).write_bytes(b"PAR1 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(E.QueryError, match="No space left on device.*previous file is unchanged"):
        write_parquet(pd.DataFrame({"a": [3]}), out, overwrite=True)
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["r.parquet"]


# ------------------------------------------------------------------ repro_09: output ids are not converted
@pytest.mark.parametrize("bad", [5, 5.0, None, b"g", "", True])
def test_record_refuses_an_output_id_that_is_not_a_non_empty_str(tmp_path, bad):
    led = RoyaltyLedger(tmp_path / "l.jsonl")
    raw = (tmp_path / "l.jsonl").read_bytes()
    with pytest.raises(shapley.InvalidGameError, match="output_id must be a non-empty str"):
        led.record(content="c", output_id=bad, prompt="p", revenue="1.00", owners=["a"], result=[1.0])
    assert (tmp_path / "l.jsonl").read_bytes() == raw and led.records() == []
    row = led.record(content="c", output_id="5", prompt="p", revenue="1.00", owners=["a"], result=[1.0])
    assert row.output_id == "5"
    assert json.loads((tmp_path / "l.jsonl").read_text().splitlines()[1])["output_id"] == "5"
