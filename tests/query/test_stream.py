"""Properties of the streaming kernels against dense numpy, over random shapes and chunkings."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datavalue.query import _stream


@st.composite
def problems(draw):
    R = draw(st.integers(1, 60))
    m = draw(st.integers(1, 4))
    chunk = draw(st.integers(1, 25))
    n_groups = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    groups = rng.integers(-1, n_groups, R)  # -1: left out
    if draw(st.booleans()):
        groups = np.sort(groups)  # contiguous groups (steps) take the no-sort path
    rows = rng.standard_normal((R, m))
    if draw(st.booleans()):
        rows = np.round(rows, 1)  # ties
    return rows, chunk, groups, n_groups, draw(st.integers(1, 6)), draw(st.integers(1, 5))


@settings(max_examples=40, deadline=None)
@given(problems())
def test_grouped_sums_equal_dense(p):
    rows, chunk, groups, n_groups, _, window = p
    lazy = da.from_array(rows, chunks=(chunk, rows.shape[1]))
    expect = np.zeros((rows.shape[1], n_groups))
    keep = groups >= 0
    np.add.at(expect.T, groups[keep], rows[keep])
    part = _stream.stream_reduce(_stream.segment_partials(_stream.dask_blocks(lazy), groups), _stream.combine_segments,
                                 progress=False, window=window, client="synchronous", n_groups=n_groups)
    np.testing.assert_allclose(_stream.densify(part, n_groups), expect, atol=1e-12)
    tree = _stream.grouped_sums(lazy, groups, n_groups, fan_in=2).compute(scheduler="synchronous")
    np.testing.assert_allclose(tree, expect, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_streamed_top_k_equals_dense(p):
    rows, chunk, _, _, k, window = p
    lazy = da.from_array(rows, chunks=(chunk, rows.shape[1]))
    part = _stream.stream_reduce(_stream.top_k_partials(_stream.dask_blocks(lazy), k), _stream.combine_top_k, progress=False,
                                 window=window, client="synchronous", k=k)
    hv, hi, lv, li = _stream.finalize_top_k(part, k)
    S = rows.T
    kk = min(k, S.shape[1])
    # values are exact; indices must point at those values (ties may pick either)
    np.testing.assert_array_equal(hv, -np.sort(-S, axis=1)[:, :kk])
    np.testing.assert_array_equal(lv, np.sort(S, axis=1)[:, :kk])
    np.testing.assert_array_equal(np.take_along_axis(S, hi, 1), hv)
    np.testing.assert_array_equal(np.take_along_axis(S, li, 1), lv)
    assert all(len(set(r)) == kk for r in hi) and all(len(set(r)) == kk for r in li)
    dh, _, dl, _ = _stream.dense_top_k(S, k)
    np.testing.assert_array_equal(dh, hv)
    np.testing.assert_array_equal(dl, lv)


def test_chunk_tasks_align_with_storage_chunks_for_any_window():
    import zarr

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 3)).astype(np.float32)
    arr = zarr.create_array(store={}, shape=emb.shape, chunks=(8, 3), dtype="float32")
    arr[:] = emb
    q = rng.standard_normal((2, 3))
    scale = rng.random(50)
    for start, stop in [(0, 50), (5, 43), (16, 24), (7, 7)]:
        chunks = _stream.ChunkTasks(arr, q, start, stop, chunk_rows=8, row_scale=scale[start:stop])
        assert all((start + b) % 8 == 0 for _, b in chunks.bounds[:-1])  # edges on the storage grid
        out = _stream.stream_blocks(chunks, progress=False)
        expect = (q.astype(np.float32) @ emb[start:stop].T) * scale[start:stop]
        np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)
        groups = np.arange(stop - start) % 3
        part = _stream.stream_reduce(chunks.with_reduce(_stream.segment_chunk, lambda a, b, g=groups: (g[a:b],)),
                                     _stream.combine_segments, progress=False, window=2, n_groups=3) if len(chunks) else None
        if part is not None:
            sums = _stream.densify(part, 3)
            np.testing.assert_allclose(sums, np.stack([expect[:, groups == j].sum(1) for j in range(3)], 1),
                                       rtol=1e-5, atol=1e-5)


def test_one_blas_thread_limits_blas_only_on_local_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]

    before = blas_threads()
    if not before:
        pytest.skip("no BLAS library found by threadpoolctl")
    with _stream.one_blas_thread(None):  # local threads: one BLAS thread each
        assert set(blas_threads()) == {1}
    assert blas_threads() == before
    with _stream.one_blas_thread("sync"):  # one scoring thread: BLAS keeps its own
        assert blas_threads() == before


def test_grouped_sums_fold_into_a_dense_accumulator_without_copies():
    rng = np.random.default_rng(3)
    acc = (None, np.zeros((2, 6)))
    out_arr = acc[1]
    parts = [(np.array([0, 4]), rng.normal(size=(2, 2))), (np.array([1, 4, 5]), rng.normal(size=(3, 2)))]
    want = np.zeros((2, 6))
    for ids, sums in parts:
        want[:, ids] += sums.T
    got = _stream.combine_segments(acc, *parts, n_groups=6)
    assert got[0] is None and got[1] is out_arr  # updated in place, (m, n_groups) layout
    dense = _stream.densify(got, 6)
    assert dense is out_arr and dense.flags.c_contiguous
    np.testing.assert_allclose(dense, want)
    np.testing.assert_allclose(_stream.densify(parts[1], 6)[:, [1, 4, 5]], parts[1][1].T)
