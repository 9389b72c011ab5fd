"""Defects of issue 22's classes found by an independent probe, each a reproduction.

1. An array metadata file (``<name>/zarr.json``) older than the commit: zarr reads the array as
   the short one, so committed entries were silently dropped. Now refused on open and on resume.
3. ``resume=True`` through a symbolic link nested inside the run (``grads/c`` moved outside and
   linked back): only top-level members were checked; now the whole tree is walked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from datavalue.errors import StoreCorruptError, StoreError
from datavalue.store import RunWriter, StepBlock, archive_run, open_run

ROWS_PER_STEP = 4


def _writer(path: Path, mode: str = "create") -> RunWriter:
    return RunWriter(path, {"projection": {"blocks": []}}, k=3, chunk_rows=8, storage_dtype="float64",
                     background=False, mode=mode)


def _steps(w: RunWriter, start: int, stop: int) -> None:
    rng = np.random.default_rng(start)
    for t in range(start, stop):
        w.submit(StepBlock(step=t, sample_id=np.arange(ROWS_PER_STEP) + ROWS_PER_STEP * t,
                           weight=np.full(ROWS_PER_STEP, 0.25), grads=rng.standard_normal((ROWS_PER_STEP, 3)),
                           flags=np.zeros(ROWS_PER_STEP, np.uint8), lr=0.1))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ item 1: stale array metadata
@pytest.fixture()
def run_with_old_metadata(tmp_path):
    """A 6-step (24-row) run and each row array's zarr.json as it was after 2 steps (8 rows)."""
    path = tmp_path / "r.zarr"
    w = _writer(path)
    _steps(w, 0, 2)
    w.flush()
    old = {n: (path / n / "zarr.json").read_text() for n in ("grads", "sample_id", "weight", "flags")}
    _steps(w, 2, 6)
    w.close()
    return path, old


@pytest.mark.parametrize("name", ["sample_id", "flags", "weight", "grads"])
def test_an_older_row_array_metadata_file_is_refused_on_open(run_with_old_metadata, name):
    path, old = run_with_old_metadata
    assert json.loads(old[name])["shape"][0] == 8 and open_run(path).n_rows == 24
    (path / name / "zarr.json").write_text(old[name])
    with pytest.raises(StoreCorruptError, match=rf"array {name} has 8 entries .* the run's commit covers 24"):
        open_run(path)


def test_an_older_grads_metadata_file_fails_the_build_as_store_corruption(run_with_old_metadata):
    from datavalue import build_embeddings

    path, old = run_with_old_metadata
    (path / "grads" / "zarr.json").write_text(old["grads"])
    with pytest.raises(StoreCorruptError, match="array grads has 8 entries"):
        build_embeddings(path, progress=False)


@pytest.mark.parametrize(("name", "committed"), [("lr", 6), ("epoch", 6), ("step_ptr", 7)])
def test_a_shortened_per_step_array_is_refused_on_open(run_with_old_metadata, name, committed):
    path, _ = run_with_old_metadata
    meta = json.loads((path / name / "zarr.json").read_text())
    meta["shape"][0] = 3
    (path / name / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreCorruptError, match=rf"array {name} has 3 entries .* covers {committed}"):
        open_run(path)


def test_resume_refuses_an_older_metadata_file_and_changes_nothing(run_with_old_metadata):
    path, old = run_with_old_metadata
    (path / "sample_id" / "zarr.json").write_text(old["sample_id"])
    before = _tree(path)
    with pytest.raises(StoreCorruptError, match="array sample_id has 8 entries"):
        _writer(path, mode="resume")
    assert _tree(path) == before


def test_a_run_with_current_metadata_opens_and_reads_every_row(run_with_old_metadata):
    path, _ = run_with_old_metadata
    run = open_run(path)
    assert run.read("sample_id").tolist() == list(range(24))


# ------------------------------------------------------------------ item 3: nested links on resume
def test_resume_refuses_a_link_nested_inside_the_run_that_leads_outside(tmp_path):
    path, outside = tmp_path / "r.zarr", tmp_path / "outside_c"
    w = _writer(path)
    _steps(w, 0, 3)
    w.close()
    shutil.move(path / "grads" / "c", outside)
    (path / "grads" / "c").symlink_to(outside, target_is_directory=True)
    before, run_before = _tree(outside), _tree(path)
    with pytest.raises(StoreError, match=r"symbolic links that lead outside the run \(grads/c -> .*resume=True"):
        _writer(path, mode="resume")
    assert _tree(outside) == before and _tree(path) == run_before
    assert not (path / "writer.lock").exists()  # the lock taken for the check is released
    with pytest.raises(StoreError, match="grads/c ->"):
        archive_run(path, tmp_path / "a.zip")


def test_resume_follows_a_nested_link_that_stays_inside_the_run(tmp_path):
    path = tmp_path / "r.zarr"
    w = _writer(path)
    _steps(w, 0, 3)
    w.close()
    shutil.move(path / "grads" / "c", path / "grads_chunks")
    (path / "grads" / "c").symlink_to(path / "grads_chunks", target_is_directory=True)
    w = _writer(path, mode="resume")
    _steps(w, 3, 5)
    w.close()
    assert open_run(path).n_steps == 5


# ------------------------------------------------------------------ item 2: relative path, then os.chdir
def _train(rec, model, opt, start, stop):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(start)
    for t in range(start, stop):
        x, y = torch.randn(4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)
        with rec.step(sample_ids=range(4 * t, 4 * t + 4)):
            F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("checkpoint_every", [None, 2])
def test_a_relative_run_path_stays_put_when_the_working_directory_changes(tmp_path, monkeypatch, checkpoint_every):
    import torch

    import datavalue
    from datavalue.capture import checkpoint_steps

    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir()
    b.mkdir()
    monkeypatch.chdir(a)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = datavalue.Recorder("rel.zarr", model, proj_dim=None, optimizer=opt, commit_every=1,
                             checkpoint_every=checkpoint_every)
    _train(rec, model, opt, 0, 2)
    rec.flush()
    monkeypatch.chdir(b)
    _train(rec, model, opt, 2, 5)
    rec.close()
    assert list(b.iterdir()) == []  # no half-run in the new working directory
    assert not (a / "rel.zarr" / "writer.lock").exists()  # the lock is released
    run = open_run(a / "rel.zarr")
    assert run.n_steps == 5 and run.read("sample_id").tolist() == list(range(20))
    if checkpoint_every:
        assert checkpoint_steps(run) == [0, 2, 4, 5]


def test_run_writer_and_locks_resolve_a_relative_path_once(tmp_path, monkeypatch):
    from datavalue._lock import LockFile
    from datavalue.store._runlock import run_lock

    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir()
    b.mkdir()
    monkeypatch.chdir(a)
    w = _writer(Path("r.zarr"))
    _steps(w, 0, 1)
    lock, run_lk = LockFile("x.lock", subject="x", error=StoreError, busy_hint=""), run_lock("other.zarr", "a test")
    (a / "other.zarr").mkdir()
    assert run_lk.subject == f"run {a / 'other.zarr'}"  # its messages name the run wherever the reader stands
    lock.acquire()
    run_lk.acquire()
    monkeypatch.chdir(b)
    _steps(w, 1, 3)
    w.close()
    lock.release()
    run_lk.release()
    assert list(b.iterdir()) == []
    assert not (a / "x.lock").exists() and not (a / "other.zarr" / "writer.lock").exists()
    assert not (a / "r.zarr" / "writer.lock").exists() and open_run(a / "r.zarr").n_steps == 3


# ------------------------------------------------------------------ item 4: checkpoint reads check their chunks
@pytest.fixture()
def run_with_checkpoints(tmp_path):
    """3 Adam steps, checkpoints at 0, 2, 3; the model's second bias is all zeros (an all-zero chunk)."""
    import torch

    import datavalue

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        model[2].bias.zero_()
        model[2].bias.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    path = tmp_path / "r.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, checkpoint_every=2) as rec:
        _train(rec, model, opt, 0, 3)
    return path


def test_an_all_zero_checkpoint_tensor_reads_back(run_with_checkpoints):
    from datavalue.capture import read_checkpoint

    ck = read_checkpoint(run_with_checkpoints, 0)
    assert (ck.model["2.bias"] == 0).all() and ck.model["0.weight"].abs().sum() > 0
    assert read_checkpoint(run_with_checkpoints, 2).state["0.weight"]["step"].dim() == 0  # a 0-d tensor


@pytest.mark.parametrize(("step", "chunk"), [(0, "model/0.weight/c/0/0"), (0, "model/2.bias/c/0"),
                                             (2, "optim/0.weight/exp_avg/c/0/0"), (2, "optim/0.weight/step/c")])
def test_a_missing_checkpoint_chunk_is_refused_not_read_as_zeros(run_with_checkpoints, step, chunk):
    from datavalue.capture import read_checkpoint

    (run_with_checkpoints / "checkpoints" / str(step) / chunk).unlink()
    array = chunk.split("/c")[0]
    with pytest.raises(StoreCorruptError, match=rf"checkpoint {step} is damaged: array checkpoints/{step}/{array}: "
                                                rf"chunk checkpoints/{step}/{array}/c.* is missing"):
        read_checkpoint(run_with_checkpoints, step)


def test_a_corrupt_checkpoint_chunk_is_refused(run_with_checkpoints):
    from datavalue.capture import read_checkpoint

    f = run_with_checkpoints / "checkpoints" / "0" / "model" / "0.weight" / "c" / "0" / "0"
    raw = bytearray(f.read_bytes())
    raw[0] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match=r"checkpoint 0 is damaged: array checkpoints/0/model/0.weight cannot be read"):
        read_checkpoint(run_with_checkpoints, 0)
