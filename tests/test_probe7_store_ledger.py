"""Seventh probe (issue 22): a hard-link snapshot of a run (P7-01), a run on a read-only file system
(P7-03), ``datavalue info`` on a build with a missing chunk (P7-07), a back-dated ledger row (P7-08).

Each ``test_p7_NN`` failed before its fix: the resumed run rewrote ``commit/digests.*`` in place, so
the snapshot sharing their inodes stopped opening; building or resuming a read-only run raised the
builtin ``OSError`` naming ``writer.lock.<token>.partial`` (``datavalue build``: exit 1 and a
traceback); ``datavalue info`` printed ``complete`` and exit 0; a row dated into a closed period was
appended and changed its statement.
"""

from __future__ import annotations

import builtins
import datetime as _dt
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue import _lock, shapley
from datavalue.cli import main
from datavalue.errors import StoreReadOnlyError
from datavalue.shapley.royalties import _record_checks
from datavalue.store import open_run
from tests._helpers_tiny_run import X, Y, record_tiny_run, tiny_mlp


def _snapshot(src: Path, dst: Path) -> None:
    """``cp -al src dst``: every file hard-linked (the rsnapshot-style backup)."""
    shutil.copytree(src, dst, copy_function=os.link)


def _steps(rec: datavalue.Recorder, model: torch.nn.Module, opt: torch.optim.Optimizer, ts: range) -> None:
    for t in ts:
        ids = np.arange(6 * (t % 4), 6 * (t % 4) + 6)
        with rec.step(sample_ids=ids + 100 * t):
            F.cross_entropy(model(X[ids]), Y[ids]).backward()
        opt.step()
        opt.zero_grad()


def _grads(path: Path) -> np.ndarray:
    run = open_run(path)
    return np.asarray(run.array("grads")[: run.n_rows])


# ------------------------------------------------------------------ P7-01: hard-link snapshots
def test_p7_01_a_hard_link_snapshot_of_a_closed_run_survives_its_resume(tmp_path):
    run, backup = tmp_path / "run.zarr", tmp_path / "backup.zarr"
    model = record_tiny_run(run, steps=3)
    _snapshot(run, backup)
    before = _grads(backup)
    digests = {p.name: p.read_bytes() for p in (backup / "commit").glob("digests.*")}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(run, model, optimizer=opt, resume=True, proj_dim=None, commit_every=1) as rec:
        _steps(rec, model, opt, range(3, 7))
    assert open_run(run).n_steps == 7
    assert {p.name: p.read_bytes() for p in (backup / "commit").glob("digests.*")} == digests
    assert open_run(backup).n_steps == 3  # before the fix: StoreCorruptError "chunk grads/c/0/0 is not this run's"
    np.testing.assert_array_equal(_grads(backup), before)
    for name in digests:  # the live run's record has its own inodes now
        assert os.stat(run / "commit" / name).st_nlink == 1
    datavalue.build_embeddings(backup, progress=False)  # the snapshot is a run of its own


def test_p7_01_a_snapshot_taken_while_the_recorder_is_open_keeps_its_steps(tmp_path):
    run, backup = tmp_path / "run.zarr", tmp_path / "backup.zarr"
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(run, model, optimizer=opt, proj_dim=None, commit_every=1) as rec:
        _steps(rec, model, opt, range(3))
        rec.flush()
        _snapshot(run, backup)  # the record's files are open in the recorder, shared with the snapshot
        _steps(rec, model, opt, range(3, 6))
    assert open_run(run).n_steps == 6
    snap = open_run(backup)  # before the fix: StoreCorruptError (its record described the live tail)
    assert snap.n_steps == 3
    np.testing.assert_array_equal(_grads(backup), _grads(run)[: snap.n_rows])


def test_p7_01_an_unshared_record_is_still_written_in_place(tmp_path):
    """The fast path stays: a record no other directory links to keeps its inode across commits."""
    run = tmp_path / "run.zarr"
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(run, model, optimizer=opt, proj_dim=None, commit_every=1) as rec:
        _steps(rec, model, opt, range(2))
        inodes = {p.name: p.stat().st_ino for p in (run / "commit").glob("digests.*")}
        _steps(rec, model, opt, range(2, 6))
    assert {p.name: p.stat().st_ino for p in (run / "commit").glob("digests.*")} == inodes
    assert not list(run.rglob("*.partial"))


def test_p7_01_a_hard_link_snapshot_of_a_ledger_keeps_its_rows(tmp_path):
    """The same class in the ledger: an append through a shared inode grew the snapshot's ledger past
    its own head file, which then refused to open ("rows beyond its head file")."""
    live, snap = tmp_path / "live", tmp_path / "snap"
    led = shapley.RoyaltyLedger(live / "l.jsonl")
    _row(led, "a", "2025-01-10")
    _snapshot(live, snap)
    _row(led, "b", "2025-01-11")
    assert led.verify() == 2 and os.stat(live / "l.jsonl").st_nlink == 1
    copy = shapley.RoyaltyLedger(snap / "l.jsonl")
    assert copy.verify() == 1 and [r.output_id for r in copy.records()] == ["a"]
    assert not list(live.glob(".*.partial"))


# ------------------------------------------------------------------ P7-03: a read-only run
def _unwritable(monkeypatch, directory: Path, code: int) -> None:
    """Writes of the lock module under ``directory`` fail with ``code`` (EROFS: a read-only mount,
    which a test cannot make without root; EACCES: no permission)."""
    real_open, real_link = builtins.open, os.link

    def refuse(path: object) -> None:
        if str(os.path.abspath(str(path))).startswith(str(directory)):
            raise OSError(code, os.strerror(code), str(path))

    def fake_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def fake_link(src, dst, *a, **k):
        refuse(dst)
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(_lock, "open", fake_open, raising=False)  # the lock's temporary
    monkeypatch.setattr(_lock.os, "link", fake_link)


@pytest.mark.parametrize("code, why", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_p7_03_building_or_resuming_a_read_only_run_is_a_clear_error(tmp_path, monkeypatch, capsys, code, why):
    run = tmp_path / "run.zarr"
    model = record_tiny_run(run, steps=2)
    _unwritable(monkeypatch, run, code)
    with pytest.raises(StoreReadOnlyError, match=why) as e:  # before the fix: the builtin OSError
        datavalue.build_embeddings(run, progress=False)
    msg = str(e.value)
    assert ".partial" not in msg and "copy the run to a writable place" in msg and "build_embeddings" in msg
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(StoreReadOnlyError, match=why):
        datavalue.Recorder(run, model, optimizer=opt, resume=True, proj_dim=None)
    assert main(["build", str(run)]) == 2  # before the fix: the OSError's traceback, exit 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0] and err[0].startswith("datavalue: error: run ")
    assert sorted(p.name for p in run.iterdir() if "lock" in p.name) == []
    assert open_run(run).n_steps == 2  # reading needs no lock


def test_p7_03_a_ledger_in_a_read_only_directory_is_a_ledger_error(tmp_path, monkeypatch):
    path = tmp_path / "l.jsonl"
    led = shapley.RoyaltyLedger(path)
    _unwritable(monkeypatch, tmp_path, errno.EROFS)
    with pytest.raises(shapley.LedgerError, match="read-only file system"):
        led.record(output_id="a", content="a", prompt="p", revenue=Decimal("1.00"), owners=["ann"], result=[1.0])


def test_p7_03_a_new_ledger_in_a_read_only_directory_is_a_ledger_error(tmp_path, monkeypatch):
    from datavalue.shapley.royalties import _anchor

    def write_atomic(path, text):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path) + ".tmp-1")

    monkeypatch.setattr(_anchor, "write_atomic", write_atomic)
    with pytest.raises(shapley.LedgerError, match="cannot create the ledger .*read-only file system"):
        shapley.RoyaltyLedger(tmp_path / "new.jsonl")  # before the fix: the builtin OSError naming the temporary
    assert not (tmp_path / "new.jsonl").exists()


def test_p7_03_cli_any_other_read_only_write_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """A write no datavalue check foresaw (here: inside the build) still ends in one line, exit 2."""
    run = tmp_path / "run.zarr"
    record_tiny_run(run, steps=2)

    def build(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(run / "embeddings"))

    monkeypatch.setattr(datavalue.embeddings, "build_embeddings", build)
    assert main(["build", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "read-only file system" in err[0] and str(run / "embeddings") in err[0]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="a read-only bind mount needs root")
def test_p7_03_a_real_read_only_mount(tmp_path):
    run = tmp_path / "run.zarr"
    record_tiny_run(run, steps=2)
    script = textwrap.dedent(f"""
        import datavalue
        from datavalue.errors import StoreReadOnlyError
        try:
            datavalue.build_embeddings({str(run)!r}, progress=False)
        except StoreReadOnlyError as e:
            print("REFUSED", e)
        print("STEPS", datavalue.open_run({str(run)!r}).n_steps)
    """)
    (tmp_path / "probe.py").write_text(script)
    cmd = (f"mount --bind {tmp_path} {tmp_path} && mount -o remount,ro,bind {tmp_path} {tmp_path} && "
           f"{sys.executable} {tmp_path / 'probe.py'} && {sys.executable} -m datavalue.cli build {run}; echo EXIT $?")
    r = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if "mount" in r.stderr and "REFUSED" not in r.stdout:
        pytest.skip(f"cannot bind-mount here: {r.stderr.strip()[:200]}")
    assert "REFUSED run" in r.stdout and "read-only file system" in r.stdout and "STEPS 2" in r.stdout
    assert "EXIT 2" in r.stdout and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------ P7-07: info on a damaged build
def test_p7_07_info_reports_a_build_with_a_missing_chunk_as_damaged(tmp_path, capsys):
    run = tmp_path / "run.zarr"
    record_tiny_run(run, steps=4)
    datavalue.build_embeddings(run, progress=False)
    assert main(["info", str(run)]) == 0
    assert "4 steps, complete" in capsys.readouterr().out
    chunk = sorted((run / "embeddings" / "empirical_fisher" / "values" / "c").rglob("*"))
    victim = next(p for p in chunk if p.is_file())
    victim.unlink()
    assert main(["info", str(run)]) == 1  # before the fix: 0, "4 steps, complete"
    out, err = capsys.readouterr()
    assert "complete" not in out and "DAMAGED" in out
    assert "embeddings/empirical_fisher/values/c/0/0" in err and "is missing" in err
    assert main(["info", "--json", str(run)]) == 1
    meta = json.loads(capsys.readouterr().out)["builds"]["empirical_fisher"]
    assert "embeddings/empirical_fisher/values/c/0/0" in meta["damaged"]


# ------------------------------------------------------------------ P7-08: a back-dated ledger row
def _row(led, output_id, timestamp, owner="ann", **kw):
    return led.record(output_id=output_id, content=output_id, prompt="p", revenue=Decimal("10.00"),
                      owners=[owner, "bob"], result=[1.0, 1.0], timestamp=timestamp, **kw)  # fmt: skip


JAN = "2025-01-01:2025-02-01"


def test_p7_08_a_row_dated_before_the_last_is_refused(tmp_path):
    led = shapley.RoyaltyLedger(tmp_path / "l.jsonl")
    _row(led, "a", "2025-01-10")
    paid = led.statement(JAN).paid_total
    _row(led, "b", "2025-02-10")
    with pytest.raises(shapley.LedgerError, match="earlier than the last row.*allow_backdated=True"):
        _row(led, "c", "2025-01-05", owner="mallory")  # before the fix: appended, January paid 10.00 more
    assert len(led) == 2 and led.statement(JAN).paid_total == paid
    other = shapley.RoyaltyLedger(tmp_path / "l.jsonl")  # another handle, opened before the next row
    _row(led, "d", "2025-02-20")
    with pytest.raises(shapley.LedgerError, match="earlier than the last row"):
        _row(other, "e", "2025-02-15")  # the rows it had not read yet count (checked under the lock)
    _row(led, "f", "2025-02-20")  # the same time as the last row: accepted
    _row(led, "c", "2025-01-05", owner="mallory", allow_backdated=True)  # a deliberate correction
    assert led.verify() == 5 and led.statement(JAN).paid_total == paid + Decimal("10.00")
    with pytest.raises(shapley.LedgerError, match="earlier than the last row .*2025-02-20"):
        _row(led, "g", "2025-02-01")  # the bound is the latest timestamp, not the back-dated last row


def test_p7_08_a_row_dated_ahead_of_the_clock_is_refused(tmp_path):
    led = shapley.RoyaltyLedger(tmp_path / "l.jsonl")
    with pytest.raises(shapley.LedgerError, match="later than now"):
        _row(led, "a", "2999-01-05")
    now = _dt.datetime.now(_dt.UTC)
    _row(led, "b", now + _record_checks.FUTURE_SKEW / 2)  # within the stated skew
    row = led.record(output_id="c", content="c", prompt="p", revenue=Decimal("1.00"), owners=["ann"], result=[1.0])
    assert row.timestamp == led.records()[-2].timestamp  # the default (now) on a clock behind: the last row's time
    assert len(led) == 2 and led.verify() == 2
