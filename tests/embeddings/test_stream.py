"""Property tests of the chunk-owned writing and the segment split (pure, in memory)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datavalue.embeddings._plan import _split
from datavalue.embeddings._stream import _ChunkWriter, _write_pieces


class _Logged:
    """A numpy array that logs the row ranges written to it."""

    def __init__(self, shape):
        self.a = np.zeros(shape)
        self.dtype, self.shape, self.log = self.a.dtype, shape, []

    def __setitem__(self, sl, value):
        self.log.append((sl.start, sl.stop))
        self.a[sl] = value

    def __getitem__(self, sl):
        return self.a[sl]


@st.composite
def layouts(draw):
    steps = draw(
        st.lists(st.integers(0, 7), min_size=1, max_size=25)
    )  # rows per step (empty steps too)
    ptr = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
    return ptr, draw(st.integers(1, 8)), draw(st.integers(1, 9))


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_segments_write_every_row_once_and_only_own_chunks(layout):
    ptr, K, chunk = layout
    T, R = len(ptr) - 1, int(ptr[-1])
    bounds = _split(ptr, 0, T, K)
    assert bounds[0][0] == 0 and bounds[-1][1] == T and len(bounds) == min(K, T)
    assert all(lo < hi for lo, hi in bounds) and all(
        a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False)
    )
    want = np.arange(R * 2, dtype=np.float64).reshape(R, 2) + 1.0
    out = [_Logged((R, 2)), _Logged((R, 2))]
    pieces = []
    for lo, hi in bounds:  # each segment streams its steps backward, like _scan
        r_lo, r_hi = int(ptr[lo]), int(ptr[hi])
        w = _ChunkWriter(out, r_lo, r_hi, R, chunk)
        for t in range(hi - 1, lo - 1, -1):
            r0, r1 = int(ptr[t]), int(ptr[t + 1])
            w.put(r0, [want[r0:r1], -want[r0:r1]])
        pieces.extend(w.close())
        for s0, s1 in out[0].log:  # whole chunks, inside the segment's rows
            assert s0 % chunk == 0 and (s1 == R or s1 % chunk == 0) and r_lo <= s0 and s1 <= r_hi
        out[0].log.clear()
    _write_pieces(out, pieces, chunk)
    written = sorted(out[0].log)
    assert len(written) == len(
        {s0 // chunk for s0, _ in written}
    )  # the driver writes each shared chunk once
    np.testing.assert_array_equal(out[0].a, want)
    np.testing.assert_array_equal(out[1].a, -want)


# ---------------------------------------------------------------------- the scan's reader and writer on a real run


def _real_run(tmp_path, chunk_rows=5):
    from ._synthetic import make_steps, write_run

    steps = make_steps(4, 30)
    return write_run(tmp_path / "r.zarr", steps, chunk_rows=chunk_rows), steps


@pytest.mark.parametrize("window", [1, 5, 7, 13, 1000])
@pytest.mark.parametrize("fast", [True, False], ids=["chunk-files", "zarr"])
def test_reverse_rows_read_ahead_equal_the_store(tmp_path, window, fast):
    """Reading every step's rows from the end (chunk files with read-ahead, or zarr) gives exactly the
    stored rows; a scan starting mid-run (lo > 0) never reads below its first row."""
    from datavalue.embeddings._stream import _ReverseRows
    from datavalue.store import open_run

    path, _ = _real_run(tmp_path)
    run = open_run(path)
    ptr, G = run.step_ptr, run.read("grads")
    for lo_step in (0, 11):
        lo = int(ptr[lo_step])
        with _ReverseRows(run, "grads", lo, window, int(run.row_chunk)) as rows:  # joins its read-ahead
            assert (rows.fast is not None) is True
            if not fast:
                rows.fast = None
            for t in range(run.n_steps - 1, lo_step - 1, -1):
                r0, r1 = int(ptr[t]), int(ptr[t + 1])
                np.testing.assert_array_equal(rows.get(r0, r1), G[r0:r1])
                assert rows.c0 >= lo
                if rows.ahead is not None:
                    assert rows.ahead[0] >= lo


def test_a_corrupt_chunk_found_by_the_read_ahead_names_the_chunk(tmp_path):
    from datavalue.embeddings import build_embeddings
    from datavalue.errors import StoreCorruptError

    path, _ = _real_run(tmp_path)
    chunk = path / "grads" / "c" / "2" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match="grads/c/2/0 is corrupt"):
        build_embeddings(path, "empirical_fisher", progress=False)
    # the failed build joined its reader, writer and GEMM threads before raising: no chunk write of
    # it can land later (one once did, in the next test's count of writes)
    assert [t.name for t in threading.enumerate() if t.name.startswith("datavalue")] == []


def test_a_failed_build_writes_nothing_after_it_raised(tmp_path, monkeypatch):
    """The scan's chunk writes run on its writer thread; when the scan fails, the writes still
    queued are dropped and the one in flight finishes before the error reaches the caller. (They
    used to run on: one landed in the next test's count of chunk writes.)"""
    from datavalue.embeddings import build_embeddings
    from datavalue.errors import StoreCorruptError
    from datavalue.store import _writer

    path, _ = _real_run(tmp_path)
    chunk = path / "grads" / "c" / "2" / "0"  # the scan runs backward: later chunks are written first
    chunk.write_bytes(b"\0" + chunk.read_bytes()[1:])
    events = []
    real = _writer._write_chunk

    def slow(p, c):  # slow enough that writes are queued when the scan meets the corrupt chunk
        time.sleep(0.05)
        real(p, c)
        events.append("write")

    monkeypatch.setattr(_writer, "_write_chunk", slow)
    with pytest.raises(StoreCorruptError):
        build_embeddings(path, "empirical_fisher", progress=False)
    events.append("raised")
    time.sleep(0.3)
    assert "write" in events and events[-1] == "raised"


def test_direct_chunk_writes_read_back_through_zarr(tmp_path, monkeypatch):
    """The scan writes its output chunk files itself; zarr reads them back unchanged (every row,
    the partial last chunk included), equal to the recursion run by hand."""
    import zarr

    from datavalue.embeddings import build_embeddings
    from datavalue.store import _writer

    from ._synthetic import by_hand

    written = []
    real = _writer._write_chunk
    monkeypatch.setattr(_writer, "_write_chunk", lambda p, c: (written.append(p), real(p, c)))
    path, steps = _real_run(tmp_path, chunk_rows=4)
    build_embeddings(path, "empirical_fisher", progress=False, storage_dtype="float64")
    arr = zarr.open_array(str(path / "embeddings" / "empirical_fisher" / "values"), mode="r")
    n_chunks = -(-arr.shape[0] // arr.chunks[0])
    values = [p for p in written if "values" in p.parts]
    assert len(values) == n_chunks  # every output chunk went through the direct path, once
    assert arr.shape[0] % arr.chunks[0] != 0  # a partial last chunk
    np.testing.assert_allclose(arr[:], by_hand(steps, "empirical_fisher"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("setting", ["sgd", "momentum-clipped"])
def test_blocks_run_concurrently_with_the_same_result(tmp_path, monkeypatch, setting):
    """Narrow blocks shared among the scan's threads give exactly the one-thread result (each block's
    recursion is independent of the others within a step)."""
    from datavalue.embeddings import _gemm, _stream, build_embeddings
    from datavalue.store import open_array

    from ._synthetic import make_steps, write_run

    kw = {"momentum": 0.9, "weight_decay": 0.01} if setting != "sgd" else {}
    steps = make_steps(2, 17, fisher=True, **kw)  # grad_scale < 1 on most steps: clipped directions
    path = write_run(tmp_path / "r.zarr", steps, fisher=True)
    # per layer: the concurrency is between blocks (the default, "auto", takes one operator here)
    build_embeddings(path, "fisher", progress=False, storage_dtype="float64", blocks="layer")
    want = np.asarray(open_array(path, "embeddings/fisher/values")[:])

    calls = []
    real = _gemm.run_threads
    monkeypatch.setattr(_gemm, "run_threads", lambda fns: (calls.append(len(fns)), real(fns))[1])
    monkeypatch.setattr(_stream, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(_stream.os, "cpu_count", lambda: 3)
    build_embeddings(path, "fisher", progress=False, storage_dtype="float64", overwrite=True, blocks="layer")
    assert calls and all(n == 2 for n in calls)  # two blocks, two groups, every step
    np.testing.assert_array_equal(np.asarray(open_array(path, "embeddings/fisher/values")[:]), want)
