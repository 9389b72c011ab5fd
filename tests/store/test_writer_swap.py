"""The run writer installs rewritten chunks by swapping names (``store/_swap.py``, issue 20).

``os.replace`` over an existing chunk file made ext4 start writeback of the new file at every
commit (0.2-3 ms per file, about 14 files per commit); ``renameat2(RENAME_EXCHANGE)`` swaps the
names atomically without it. These tests pin the fast path (no ``os.replace`` in a commit where
the exchange exists), the fallback where a file system refuses it, and what a reader holding the
old file sees.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from datavalue.store import RunWriter, _swap, open_run

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _crash_writer import MANIFEST, K, block  # noqa: E402

exchange = pytest.mark.skipif(not _swap.exchange_available(), reason="no renameat2(RENAME_EXCHANGE) here (not Linux)")


def _run(path: Path, steps: int) -> RunWriter:
    w = RunWriter(path, MANIFEST, k=K, chunk_rows=16, background=False)
    for t in range(steps):
        w.submit(block(t))
    return w


def _partials(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*.partial"))


@exchange
def test_a_commit_that_rewrites_tail_chunks_calls_no_os_replace(tmp_path, monkeypatch):
    """Steps 5-7 rewrite the partial tail chunk of every array and the ``commit`` chunk: swapped,
    never replaced; the run reads back equal to one written in one go, and no temporary is left."""
    path, ref = tmp_path / "r.zarr", tmp_path / "ref.zarr"
    _run(ref, 8).close()
    w = _run(path, 5)
    replaced = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append(str(b)), real(a, b))[1])
    for t in range(5, 8):
        w.submit(block(t))
    monkeypatch.undo()
    w.close()
    assert [p for p in replaced if str(path) in p] == []
    assert _partials(path) == []
    run, expect = open_run(path), open_run(ref)
    assert run.n_steps == 8
    for name in ("grads", "sample_id", "weight", "flags", "step_ptr", "lr", "epoch"):
        np.testing.assert_array_equal(run.read(name) if name == "grads" else getattr(run, name),
                                      expect.read(name) if name == "grads" else getattr(expect, name), err_msg=name)


def test_install_falls_back_to_os_replace_where_the_file_system_refuses_the_exchange(tmp_path, monkeypatch):
    """A file system without the exchange (``EINVAL``, as NFS or an old kernel answer): ``os.replace``, from
    then on; the target holds the new bytes and the temporary is gone."""
    calls = []

    def refusing(*args):
        calls.append(args)
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(_swap, "_renameat2", refusing)
    target, tmp = tmp_path / "chunk", tmp_path / ".chunk.1.2.partial"
    target.write_bytes(b"old")
    tmp.write_bytes(b"new")
    _swap.install(tmp, target)
    assert target.read_bytes() == b"new" and not tmp.exists() and len(calls) == 1
    assert _swap._renameat2 is None  # not asked again
    tmp.write_bytes(b"newer")
    _swap.install(tmp, target)
    assert target.read_bytes() == b"newer" and len(calls) == 1


@exchange
def test_install_renames_onto_a_new_name_and_swaps_onto_an_existing_one(tmp_path):
    target, tmp = tmp_path / "c" / "0", tmp_path / "c" / ".0.1.2.partial"
    target.parent.mkdir()
    tmp.write_bytes(b"first")
    _swap.install(tmp, target)
    assert target.read_bytes() == b"first" and not tmp.exists()
    tmp.write_bytes(b"second")
    _swap.install(tmp, target)
    assert target.read_bytes() == b"second" and not tmp.exists()
    with pytest.raises(FileNotFoundError):
        _swap.install(tmp, target)  # no temporary: the error os.replace gives
    assert target.read_bytes() == b"second"


def test_a_reader_holding_the_old_chunk_file_keeps_reading_that_version(tmp_path):
    """The old version is unlinked, never rewritten: a reader that opened the tail chunk before a commit
    reads the whole old version (its crc32c trailer matches), however many commits follow."""
    import crc32c

    path = tmp_path / "r.zarr"
    w = _run(path, 5)  # 20 rows: grads chunk 1 holds 4 committed rows
    chunk = path / "grads" / "c" / "1" / "0"
    with open(chunk, "rb") as f:
        for t in range(5, 12):
            w.submit(block(t))
        old = f.read()
    w.close()
    assert crc32c.crc32c(old[:-4]) == int.from_bytes(old[-4:], "little")
    rows = np.frombuffer(old[:-4], dtype="<f4").reshape(16, K)
    np.testing.assert_array_equal(rows[:4], open_run(path).read("grads")[16:20])
    assert np.isnan(rows[4:]).all()  # the rows unwritten then: the marker

