"""Temporary files (issue 22, clear-errors list: "`.partial` files left after a kill are never cleaned").

A writer killed mid-write leaves its temporary (``.<chunk>.<pid>.<thread>.partial``); the next writer
of the run (resume, a build, a replay write: whoever takes the run's lock) removes those of processes
that are gone and nothing else. Files written beside a user's files (reports, archives, caches) use a
temporary name no user file has, and remove it when the write fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch

import datavalue
from datavalue import shapley
from datavalue._files import atomic_write, stale_partial, sweep_partials
from datavalue.shapley import games
from datavalue.store import archive_run, open_run


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _record(path, steps, *, resume=False):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with datavalue.Recorder(path, model, proj_dim=None, resume=resume, overwrite=False) as rec:
        for _ in range(steps):
            with rec.step(sample_ids=range(4), lr=0.1):
                torch.nn.functional.mse_loss(model(x), y).backward()
            model.zero_grad()


def _plant(run: Path, pid: int) -> dict[str, Path]:
    """Temporaries as a writer killed at three moments leaves them: a chunk, a new chunk directory's
    first chunk, and the lock it was installing."""
    chunk = run / "grads" / "c" / "0" / f".0.{pid}.140213.partial"
    chunk.write_bytes(b"half a chunk")
    lock = run / "writer.lock.0123456789ab.partial"
    lock.write_text(f'{{"pid": {pid}, "host": "{os.uname().nodename}", "token": "0123456789ab"}}')
    return {"chunk": chunk, "lock": lock}


def test_the_next_writer_removes_what_a_killed_writer_left_and_nothing_else(tmp_path):
    run = tmp_path / "r.zarr"
    _record(run, 2)
    dead = _plant(run, _dead_pid())
    live = run / "grads" / "c" / "0" / f".0.{os.getppid()}.7.partial"  # a live process's: not ours to judge
    live.write_bytes(b"x")
    mine = run / "grads" / "c" / "0" / f".0.{os.getpid()}.7.partial"  # this process's own, in flight
    mine.write_bytes(b"x")
    users = run / "grads" / "notes.partial"  # a name no writer of ours gives
    users.write_text("keep me")
    before = np.asarray(open_run(run).grads.compute())
    _record(run, 1, resume=True)
    assert not dead["chunk"].exists() and not dead["lock"].exists()
    assert live.exists() and mine.exists() and users.read_text() == "keep me"
    r = open_run(run)
    assert r.n_steps == 3 and np.array_equal(np.asarray(r.grads.compute())[:8], before)


def test_a_build_removes_them_too(tmp_path):
    run = tmp_path / "r.zarr"
    _record(run, 3)
    dead = _plant(run, _dead_pid())
    datavalue.build_embeddings(run)
    assert not dead["chunk"].exists() and not dead["lock"].exists()


def test_a_link_is_never_followed_or_removed(tmp_path):
    run = tmp_path / "r.zarr"
    _record(run, 1)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / f".x.{_dead_pid()}.1.partial"
    victim.write_bytes(b"not the run's")
    (run / "grads" / "elsewhere").symlink_to(outside, target_is_directory=True)
    assert sweep_partials(run) == []
    assert victim.exists()


def test_stale_partial_reads_only_our_names():
    dead = _dead_pid()
    assert stale_partial(Path(f".c.{dead}.99.partial"))
    assert not stale_partial(Path(f"c.{dead}.99.partial"))  # no leading dot: not ours
    assert not stale_partial(Path(f".c.{os.getpid()}.99.partial"))  # ours, maybe in flight
    assert not stale_partial(Path(f".c.{dead}.99.tmp"))


@pytest.fixture
def statement(tmp_path):
    led = shapley.RoyaltyLedger(tmp_path / "ledger.jsonl")
    led.record(output_id="g1", content="c", prompt="p", owners=["ann", "bob"], revenue=Decimal("2.00"),
               royalty_rate=Decimal("0.5"), result=shapley.permutation(games.GloveGame(n=2, left={0}, right={1}),
                                                                        n_samples=10, seed=0),
               timestamp="2025-01-02")
    return led.statement("2025-01-01:2025-02-01")


def test_a_report_never_replaces_a_users_tmp_file_and_leaves_none_on_failure(tmp_path, statement, monkeypatch):
    out = tmp_path / "r.csv"
    keep = tmp_path / "r.csv.tmp"  # the temporary name reports used before: a user's file here was lost
    keep.write_text("the user's")
    shapley.write_report(statement, out)
    assert keep.read_text() == "the user's"
    assert out.read_text().startswith("period_start,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.jsonl", "ledger.jsonl.head", "r.csv", "r.csv.tmp"]

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", boom)
    with pytest.raises(OSError, match="No space"):
        shapley.write_report(statement, tmp_path / "s.csv", overwrite=True)
    monkeypatch.undo()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert not (tmp_path / "s.csv").exists()


def test_an_archive_never_replaces_a_users_partial_file(tmp_path):
    run = tmp_path / "r.zarr"
    _record(run, 1)
    keep = tmp_path / "a.zip.partial"
    keep.write_text("the user's")
    archive_run(run, tmp_path / "a.zip")
    assert keep.read_text() == "the user's"
    assert open_run(tmp_path / "a.zip").n_steps == 1


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    out = tmp_path / "f.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
