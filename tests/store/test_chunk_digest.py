"""Issue 22, defect N03: every recorded chunk bound to its run.

A chunk *file* copied from another run with the same shapes has a valid crc32c, so before this
change it read silently as this run's data (builds and queries returned another run's gradients).
The writer now keeps a digest record (``<run>/commit/digests.0`` and ``.1``, ``datavalue.store._digest``): per
recorded array and chunk, ``crc32c(run_id || the chunk's crc32c trailer)``, written before each
commit's chunks; every reader of recorded rows compares the trailer it reads.
Each test below failed before the change (the copied chunks were read; the record did not exist).
"""

from __future__ import annotations

import json
import logging
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
from datavalue.store import RunWriter, fast_rows, open_run
from datavalue.store._digest import local_get, newest_record
from datavalue.store._schema import CHUNK_DIGEST_FILES, CHUNK_DIGESTS_KEY

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _crash_writer import MANIFEST, K, block  # noqa: E402

NOT_OURS = r"chunk {key} is not this run's .*copied in from another run with the same shapes.*whole copy"


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _record(path, seed, *, steps=3, lr=0.1, resume=False, trained=None, ids_from=0):
    """Record ``steps`` Adam steps of 4 rows (chunks of 8 rows); ``seed`` draws the data, ``lr`` and
    ``ids_from`` make the other run's per-step and per-row chunks differ from this one's."""
    model, opt = trained if trained is not None else (_model(), None)
    opt = opt or torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4 * steps, 4, generator=g), torch.randint(0, 3, (4 * steps,), generator=g)
    kw = {} if resume else {"chunk_rows": 8}
    with datavalue.Recorder(path, model, proj_dim=16, optimizer=opt, resume=resume, **kw) as rec:
        for t in range(steps):
            start = ids_from + 4 * rec.n_steps
            with rec.step(sample_ids=np.arange(start, start + 4)):
                F.cross_entropy(model(x[4 * t : 4 * t + 4]), y[4 * t : 4 * t + 4]).backward()
            opt.step()
            opt.zero_grad()
    return model, opt


def _key(name: str, i: int) -> str:
    return f"{name}/c/{i}/0" if name in ("grads", "adam_m", "adam_v") else f"{name}/c/{i}"


@pytest.fixture
def two_runs(tmp_path):
    """Run ``a`` and run ``b`` with the same shapes (3 steps of 4 rows, chunks of 8 rows) but other data,
    ids and learning rate: every chunk of ``b`` is a valid chunk file that ``a`` could hold."""
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    trained = _record(a, 0)
    _record(b, 1, lr=0.2, ids_from=1000)
    return a, b, trained


@pytest.mark.parametrize(("name", "chunk"), [("grads", 0), ("grads", 1), ("sample_id", 0), ("lr", 0), ("adam_m", 0)])
def test_a_chunk_file_of_another_run_is_refused_by_open_and_resume(two_runs, name, chunk):
    a, b, trained = two_runs
    good = open_run(a)
    assert open_run(b).n_rows == good.n_rows == 12
    src, dst = b / _key(name, chunk), a / _key(name, chunk)
    assert src.read_bytes() != dst.read_bytes() and src.stat().st_size == dst.stat().st_size
    shutil.copyfile(src, dst)
    with pytest.raises(StoreCorruptError, match=NOT_OURS.format(key=_key(name, chunk))) as exc:
        open_run(a)
    assert str(dst) in str(exc.value)
    with pytest.raises(StoreCorruptError, match=NOT_OURS.format(key=_key(name, chunk))):
        _record(a, 0, resume=True, trained=trained)  # nothing is appended to the mixed run either
    if name == "adam_m":  # the direct chunk reader of a run opened before the copy
        with pytest.raises(StoreCorruptError, match=NOT_OURS.format(key=_key(name, chunk))):
            fast_rows(good.array(name))[0:3]
        with pytest.raises(StoreCorruptError, match=NOT_OURS.format(key=_key(name, chunk))):
            good.read(name, 0, 3)


def test_a_grads_chunk_of_another_run_is_refused_by_every_reader(two_runs, capsys):
    a, b, trained = two_runs
    model = trained[0]
    good = open_run(a)
    attr = Attributor(a, model, kind="tracin", progress=False)  # opened before the copy
    shutil.copyfile(b / "grads/c/1/0", a / "grads/c/1/0")
    pattern = NOT_OURS.format(key="grads/c/1/0")
    with pytest.raises(StoreCorruptError, match=pattern):
        fast_rows(good.array("grads"), required_rows=good.n_rows)[0:12]
    with pytest.raises(StoreCorruptError, match=pattern):
        good.read("grads", 8, 12)
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    with pytest.raises(StoreCorruptError, match=pattern):
        attr.scores(lambda m: F.cross_entropy(m(x), y, reduction="none"))
    with pytest.raises(StoreCorruptError, match=pattern):
        Attributor(a, model, kind="tracin", progress=False)
    with pytest.raises(StoreCorruptError, match=pattern):
        datavalue.build_embeddings(a, "empirical_fisher", progress=False)
    from datavalue.cli import main

    capsys.readouterr()
    assert main(["info", str(a)]) == 2
    assert "grads/c/1/0 is not this run's" in capsys.readouterr().err


def test_an_older_copy_of_the_runs_own_chunk_is_refused(tmp_path):
    """``adam_m`` has no unwritten-row marker (NaN is a value there; its pad is 0): an older copy of
    its tail chunk read the later steps' moments as zeros. The digest refuses it."""
    path, snap = tmp_path / "r.zarr", tmp_path / "snapshot"
    model, opt = _record(path, 0, steps=2)
    shutil.copytree(path, snap, ignore=shutil.ignore_patterns("writer.lock"))
    _record(path, 0, steps=2, resume=True, trained=(model, opt))
    run = open_run(path)
    assert run.n_steps == 4
    old, new = snap / _key("adam_m", 0), path / _key("adam_m", 0)
    assert old.read_bytes() != new.read_bytes()
    shutil.copyfile(old, new)
    with pytest.raises(StoreCorruptError, match=r"adam_m/c/0/0 is not this run's .*or from an older copy of this run"):
        open_run(path)
    with pytest.raises(StoreCorruptError, match="adam_m/c/0/0 is not this run's"):
        run.read("adam_m", 0, 4)


def test_the_record_of_another_run_is_refused(two_runs):
    a, b, _ = two_runs
    for name in CHUNK_DIGEST_FILES:
        shutil.copyfile(b / name, a / name)
    with pytest.raises(StoreCorruptError, match=r"chunk digest record \(commit/digests.0 and .1\) was written by another run"):
        open_run(a)


def test_a_whole_copy_opens_resumes_and_stays_bound(two_runs, tmp_path):
    a, b, trained = two_runs
    copy = tmp_path / "copy.zarr"
    shutil.copytree(a, copy, ignore=shutil.ignore_patterns("writer.lock"))
    _record(copy, 0, steps=3, resume=True, trained=trained)
    run = open_run(copy)
    assert run.n_steps == 6 and run.n_rows == 24
    # the chunks written after the resume are bound too: chunk 2 holds rows 16..23
    shutil.copyfile(b / "grads/c/0/0", copy / "grads/c/2/0")  # a full chunk: no unwritten rows to tell it
    with pytest.raises(StoreCorruptError, match=NOT_OURS.format(key="grads/c/2/0")):
        open_run(copy)


# ------------------------------------------------------------------------------------ crash protocol
def _writer_run(path, steps, **kw):
    w = RunWriter(path, MANIFEST, k=K, chunk_rows=16, background=False, **kw)
    for t in range(w.steps, steps):
        w.submit(block(t))
    return w


@pytest.mark.parametrize("cut", [0, 1, 3, 7, "all"])
def test_a_kill_between_the_record_and_the_commit_leaves_a_readable_run(tmp_path, monkeypatch, cut):
    """The commit of steps 5-6 dies after its digest record and ``cut`` of its chunk files (``"all"``:
    every chunk, not the commit). The run opens with its 5 committed steps, reads them back, and a
    resumed writer continues it to a run equal to an uninterrupted one."""
    from datavalue.store import _writer

    path, ref = tmp_path / "r.zarr", tmp_path / "ref.zarr"
    _writer_run(ref, 9).close()
    w = _writer_run(path, 5)  # steps 0..4: 20 rows, grads chunk 1 half full
    written, real = [], _writer._write_bytes

    def dying(p, data, crc):
        if cut != "all" and len(written) >= cut:
            raise KeyboardInterrupt("killed")  # what a kill leaves: the record and `cut` chunks on disk
        written.append(p)
        real(p, data, crc)

    monkeypatch.setattr(_writer, "_write_bytes", dying)
    monkeypatch.setattr(_writer.RunWriter, "_commit_chunk", lambda self, v: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        w._write([block(5), block(6)])
    monkeypatch.undo()
    w._closed = True
    w._release()  # the killed process's lock is gone with it
    assert len(written) == (cut if cut != "all" else len(written)) and any("grads" in str(p) for p in written) == (cut != 0)
    run = open_run(path)
    assert run.n_steps == 5 and run.n_rows == 20
    expect = open_run(ref)
    np.testing.assert_array_equal(np.asarray(run.grads), np.asarray(expect.grads)[:20])
    np.testing.assert_array_equal(fast_rows(run.array("grads"), required_rows=20)[0:20], np.asarray(expect.grads)[:20])
    np.testing.assert_array_equal(run.sample_id, expect.sample_id[:20])
    _writer_run(path, 9, mode="resume").close()
    done = open_run(path)
    assert done.n_steps == 9
    for name in ("grads", "sample_id", "weight", "flags", "step_ptr", "lr", "epoch"):
        np.testing.assert_array_equal(done.read(name) if name == "grads" else getattr(done, name),
                                      expect.read(name) if name == "grads" else getattr(expect, name), err_msg=name)


def test_a_chunk_written_without_its_record_is_refused(tmp_path, monkeypatch):
    """The order matters: a writer that wrote a chunk and committed without the record first (the
    order the protocol forbids) leaves a chunk no record binds: refused, not read."""
    from datavalue.store import _digest

    path = tmp_path / "r.zarr"
    w = _writer_run(path, 5)
    monkeypatch.setattr(_digest.DigestWriter, "write", lambda self, before, after: None)
    w.submit(block(5))
    w.close()
    with pytest.raises(StoreCorruptError, match=r"grads/c/1/0 is not this run's"):
        open_run(path)


def test_the_record_continues_on_resume(tmp_path):
    path = tmp_path / "r.zarr"
    _writer_run(path, 5).close()
    _writer_run(path, 11, mode="resume").close()  # 44 rows: grads chunks 0..2
    record = newest_record(local_get(path), path)
    assert len(record.h["grads"]) == 3 and len(record.h["lr"]) == 1 and record.after[:2] == (11, 44)
    assert open_run(path).n_steps == 11


def test_a_run_written_before_chunk_digests_opens_with_a_note(tmp_path, caplog):
    path = tmp_path / "r.zarr"
    _writer_run(path, 5).close()
    for name in CHUNK_DIGEST_FILES:
        (path / name).unlink()
    doc = json.loads((path / "zarr.json").read_text())
    del doc["attributes"][CHUNK_DIGESTS_KEY]  # as versions before it wrote the run
    (path / "zarr.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.INFO, logger="datavalue.store._reader"):
        run = open_run(path)
    assert run.n_steps == 5 and run.read("grads").shape == (20, K)
    assert any("no chunk digest record" in r.getMessage() and "not checked" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(fast_rows(run.array("grads"), required_rows=20)[0:20], run.read("grads"))
    _writer_run(path, 7, mode="resume").close()  # resumes as before, still without a record
    assert open_run(path).n_steps == 7 and not any((path / name).exists() for name in CHUNK_DIGEST_FILES)


def test_a_deleted_record_of_a_bound_run_is_refused(tmp_path):
    path = tmp_path / "r.zarr"
    _writer_run(path, 5).close()
    for name in CHUNK_DIGEST_FILES:
        (path / name).unlink()
    with pytest.raises(StoreCorruptError, match=r"chunk digest record \(commit/digests.0 and .1\) is missing.*whole copy"):
        open_run(path)
    with pytest.raises(StoreCorruptError, match=r"chunk digest record \(commit/digests.0 and .1\) is missing"):
        RunWriter(path, MANIFEST, k=K, mode="resume", background=False)


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_damaged_record_is_refused(tmp_path):
    """The newest of the two files damaged: the older one is the record of the commit before, so the
    chunks the last commit rewrote match none of its digests (the message names the damaged file);
    both damaged: the record is corrupt."""
    path = tmp_path / "r.zarr"
    _writer_run(path, 5).close()  # 6 records (creation, 5 commits): the newest is digests.1
    assert newest_record(local_get(path), path).seq == 5
    _flip(path / "commit/digests.1")
    with pytest.raises(StoreCorruptError, match=r"chunk grads/c/1/0 .*the other file of the record is damaged: "
                                                r".*chunk digest record \(commit/digests.1\) is corrupt"):
        open_run(path)
    _flip(path / "commit/digests.0")
    with pytest.raises(StoreCorruptError, match=r"chunk digest record \(commit/digests.1\) is corrupt \(truncated, or its crc32c"):
        open_run(path)


def test_a_record_write_torn_by_a_kill_leaves_the_previous_one(tmp_path, monkeypatch):
    """A kill inside the record's write (half of it on disk, over the older file): the other file is the
    record of the commit on disk; the run opens with its committed steps and resumes."""
    import os

    from datavalue.store import _digest

    path = tmp_path / "r.zarr"
    w = _writer_run(path, 5)
    real = os.pwrite

    def torn(fd, data, offset):
        real(fd, data[: len(data) // 2], offset)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(_digest.os, "pwrite", torn)
    with pytest.raises(KeyboardInterrupt):
        w._write([block(5)])
    monkeypatch.undo()
    w._closed = True
    w._release()
    assert open_run(path).n_steps == 5
    _writer_run(path, 8, mode="resume").close()
    assert open_run(path).n_steps == 8


def test_a_reader_beside_the_recorder_follows_the_record(tmp_path):
    """A reader opened mid-recording reads the tail chunk after the writer rewrote it: it reloads the
    record once instead of refusing the run's own newer chunk."""
    path = tmp_path / "r.zarr"
    w = _writer_run(path, 5)  # grads chunk 1 holds rows 16..19
    rows = fast_rows(open_run(path).array("grads"), required_rows=20)
    w.submit(block(5))  # rewrites chunk 1 (rows 16..23) and the record
    np.testing.assert_array_equal(rows[16:20], block(4).grads.astype(rows.dtype))
    w.close()
