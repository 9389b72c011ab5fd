"""Issue 22 item 7, the rest: every read path of rows checks presence and age of its chunks.

Two ways a run silently read zeros before:

* a chunk deleted after a query was opened: the streamed reads of ``Attributor`` passed no
  ``required_rows``, so the missing chunk read as zeros;
* a run copied while it was recorded, with an older tail chunk (copied before more rows landed in
  it) and a newer commit: the last step read as zero gradients with sample id 0 and built.

The writer now fills a partial chunk's unwritten rows with a marker (NaN for floats, the integer
type's extreme for ids, flags and pointers), and every reader refuses a committed entry that holds
it, naming the chunk. The older chunk here is a real one: saved from the live run mid-recording
and copied back over the finished run's.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.errors import StoreCorruptError
from datavalue.query import Attributor
from datavalue.store import fast_rows, open_run

IDS_PER_STEP = 6


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])


def _record_with_an_old_copy(tmp_path: Path) -> tuple[Path, Path, torch.nn.Module]:
    """Record 4 steps of 6 rows in chunks of 8 rows; after step 3 (18 rows, chunk 2 holds rows
    16-17), save the live run's files; the finished run has 24 rows (chunk 2 full)."""
    path, snap = tmp_path / "r.zarr", tmp_path / "snapshot"
    model = _model()
    x, y = _data()
    with datavalue.Recorder(path, model, proj_dim=None, chunk_rows=8, storage_dtype="float64") as rec:
        for t in range(4):
            with rec.step(sample_ids=range(100 + IDS_PER_STEP * t, 100 + IDS_PER_STEP * (t + 1)), lr=0.1):
                F.cross_entropy(model(x), y).backward()
            model.zero_grad()
            if t == 2:
                rec.flush()  # what a copy of the live run sees at this moment
                shutil.copytree(path, snap)
    return path, snap, model


def _chunk(root: Path, name: str, i: int) -> Path:
    return root / name / "c" / str(i) / "0" if name in ("grads", "fisher") else root / name / "c" / str(i)


@pytest.mark.parametrize("name", ["grads", "sample_id", "weight", "flags"])
def test_an_older_tail_chunk_copied_into_the_run_is_refused(tmp_path, name):
    path, snap, model = _record_with_an_old_copy(tmp_path)
    good = open_run(path)
    assert good.n_rows == 24 and good.sample_id.tolist() == list(range(100, 124))
    shutil.copyfile(_chunk(snap, name, 2), _chunk(path, name, 2))  # the copy's older chunk, the newer commit
    with pytest.raises(StoreCorruptError, match=rf"chunk {name}/c/2 is older than the run's commit: entry {23 if name == 'grads' else 18}"):
        run = open_run(path)
        _ = run.sample_id, run.weight, run.flags
    if name == "grads":  # every read path: the direct chunk reader too
        with pytest.raises(StoreCorruptError, match="chunk grads/c/2/0 is older than what covers it: row 23"):
            fast_rows(good.array("grads"), required_rows=24)[16:24]
        with pytest.raises(StoreCorruptError, match="grads/c/2 is older"):
            datavalue.build_embeddings(path, "empirical_fisher", progress=False)
        with pytest.raises(StoreCorruptError, match="grads/c/2 is older"):
            Attributor(path, model, kind="tracin", progress=False)


@pytest.mark.parametrize(("name", "entry"), [("step_ptr", 4), ("lr", 3), ("epoch", 3)])
def test_an_older_per_step_chunk_is_refused(tmp_path, name, entry):
    path, snap, _ = _record_with_an_old_copy(tmp_path)
    shutil.copyfile(_chunk(snap, name, 0), _chunk(path, name, 0))
    with pytest.raises(StoreCorruptError, match=f"{name}/c/0 is older than the run's commit: entry {entry}"):
        getattr(open_run(path), name)


def test_the_unwritten_rows_of_a_live_tail_chunk_hold_the_marker(tmp_path):
    """What the checks rely on: the writer pads a partial chunk with the marker, not zeros."""
    _, snap, _ = _record_with_an_old_copy(tmp_path)
    g = np.frombuffer(_chunk(snap, "grads", 2).read_bytes()[:-4], dtype="<f8").reshape(8, -1)
    assert np.isfinite(g[:2]).all() and np.isnan(g[2:]).all()
    ids = np.frombuffer(_chunk(snap, "sample_id", 2).read_bytes()[:-4], dtype="<i8")
    assert ids[:2].tolist() == [116, 117] and (ids[2:] == np.iinfo(np.int64).min).all()
    run = open_run(snap)  # the live copy itself is consistent: its commit covers 18 rows
    assert run.n_rows == 18 and run.sample_id.tolist() == list(range(100, 118))
    assert np.isfinite(run.grads.compute()).all()


def test_a_chunk_deleted_after_a_query_opened_raises_instead_of_reading_zeros(tmp_path):
    path, _, model = _record_with_an_old_copy(tmp_path)
    x, y = _data()
    loss = lambda m: F.cross_entropy(m(x[:2]), y[:2], reduction="none")  # noqa: E731
    attr = Attributor(path, model, kind="tracin", progress=False)
    before = attr.scores(loss)
    assert np.abs(before[:, 8:16]).max() > 0
    _chunk(path, "grads", 1).unlink()
    with pytest.raises(StoreCorruptError, match=r"chunk grads/c/1/0 is missing .* rows 8\.\.15"):
        attr.scores(loss)


@pytest.mark.parametrize("field", ["lr", "grad_scale", "momentum", "weight_decay"])
def test_a_non_finite_step_hyperparameter_is_refused_not_stored(tmp_path, field):
    """NaN in these per-step arrays marks a step not written yet; a NaN clipping coefficient or lr
    must therefore be refused when recorded, not stored (it would read back as an older chunk)."""
    import dataclasses

    from datavalue.errors import RecorderError
    from datavalue.store import RunWriter

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _crash_writer import MANIFEST, K, block

    w = RunWriter(tmp_path / "r.zarr", MANIFEST, k=K)
    w.submit(block(0))
    with pytest.raises(RecorderError, match=rf"step 1: {field}=nan; a run stores finite step hyperparameters"):
        w.submit(dataclasses.replace(block(1), **{field: float("nan")}))
    w.submit(block(1))
    w.close()
    assert open_run(tmp_path / "r.zarr").n_steps == 2


def test_a_recorder_step_with_a_nan_clip_coef_is_refused_and_recording_goes_on(tmp_path):
    from datavalue.errors import RecorderError

    path, model = tmp_path / "r.zarr", _model()
    x, y = _data()
    with datavalue.Recorder(path, model, proj_dim=None) as rec:
        with pytest.raises(RecorderError, match=r"clip_coef must be a number in \(0, 1\]"), rec.step(sample_ids=range(6), lr=0.1) as h:
            F.cross_entropy(model(x), y).backward()
            h.clip_coef = float("nan")
        model.zero_grad()
        with rec.step(sample_ids=range(6), lr=0.1):
            F.cross_entropy(model(x), y).backward()
    run = open_run(path)
    assert run.n_steps == 1 and run.grad_scale.tolist() == [1.0]
