"""Direct chunk-file reads (datavalue.store._chunkfiles) against zarr's own reader."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from datavalue.errors import StoreCorruptError
from datavalue.store import create_array, open_array
from datavalue.store._chunkfiles import ChunkFileRows, fast_rows


@pytest.fixture()
def run_dir(tmp_path):
    path = tmp_path / "r.zarr"
    zarr.open_group(str(path), mode="w", zarr_format=3)
    return path


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rows_equal_zarr_reads_for_any_slice(run_dir, dtype):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(103, 6)).astype(dtype)
    arr = create_array(run_dir, "embeddings/x/values", shape=(120, 6), dtype=dtype, chunks=(16, 6))
    arr[:103] = data  # rows 103..119: partly in a written chunk, chunk 7 never written (fill value)
    zarr_arr = open_array(run_dir, "embeddings/x/values")
    rows = fast_rows(zarr_arr)
    assert isinstance(rows, ChunkFileRows) and rows.shape == (120, 6) and rows.chunks == (16, 6)
    for a, b in [(0, 120), (0, 16), (16, 48), (5, 7), (15, 17), (100, 120), (112, 120), (40, 40), (0, 1)]:
        got = rows[a:b]
        np.testing.assert_array_equal(got, np.asarray(zarr_arr[a:b]))
        assert got.dtype == np.dtype(dtype) and got.shape == (b - a, 6)


def test_other_layouts_keep_zarrs_reader(run_dir, tmp_path):
    arr = create_array(run_dir, "embeddings/x/values", shape=(10, 4), dtype="float32", chunks=(5, 4))
    arr[:] = 1.0
    store = zarr.storage.MemoryStore()
    mem = zarr.create_array(store, shape=(10, 4), chunks=(5, 4), dtype="float32")
    assert fast_rows(mem) is mem  # not a local directory
    split = zarr.create_array(str(tmp_path / "split.zarr"), shape=(10, 4), chunks=(5, 2), dtype="float32")
    assert fast_rows(split) is split  # a chunk does not span the columns
    packed = zarr.create_array(str(tmp_path / "zstd.zarr"), shape=(10, 4), chunks=(5, 4), dtype="float32",
                               compressors=zarr.codecs.ZstdCodec())
    assert fast_rows(packed) is packed  # another codec chain


def test_corrupt_and_truncated_chunks_name_the_file(run_dir):
    arr = create_array(run_dir, "embeddings/x/values", shape=(32, 4), dtype="float32", chunks=(8, 4))
    arr[:] = np.arange(128, dtype=np.float32).reshape(32, 4)
    rows = fast_rows(open_array(run_dir, "embeddings/x/values"))
    chunk = run_dir / "embeddings" / "x" / "values" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match="c/1/0 is corrupt"):
        rows[0:32]
    np.testing.assert_array_equal(rows[0:8], np.arange(32, dtype=np.float32).reshape(8, 4))  # others still read
    chunk.write_bytes(bytes(raw[:-10]))
    with pytest.raises(StoreCorruptError, match="c/1/0 is corrupt \\(truncated"):
        rows[8:9]


def test_rows_survive_a_copy_by_reduction(run_dir):
    """The reader crosses to dask.distributed workers by its reduce protocol (plain attributes only);
    deepcopy goes through the same protocol."""
    import copy

    arr = create_array(run_dir, "embeddings/x/values", shape=(9, 3), dtype="float64", chunks=(4, 3))
    arr[:] = np.arange(27.0).reshape(9, 3)
    rows = copy.deepcopy(fast_rows(open_array(run_dir, "embeddings/x/values")))
    np.testing.assert_array_equal(rows[2:7], np.arange(27.0).reshape(9, 3)[2:7])


@pytest.mark.parametrize("shape,chunks", [((5, 4, 4), (1, 4, 4)), ((11, 3), (4, 3))])
def test_write_all_reads_back_through_zarr(run_dir, shape, chunks, monkeypatch):
    """Direct chunk writes (3-D operators with one chunk per operator, 2-D rows with a partial last
    chunk) read back through zarr exactly; other layouts go through zarr's own writer."""
    from datavalue.store import _writer
    from datavalue.store._chunkfiles import write_all

    written = []
    real = _writer._write_chunk
    monkeypatch.setattr(_writer, "_write_chunk", lambda p, c: (written.append(p), real(p, c)))
    data = np.random.default_rng(1).normal(size=shape)
    arr = create_array(run_dir, "embeddings/x/ops", shape=shape, dtype="float64", chunks=chunks)
    write_all(arr, data)
    np.testing.assert_array_equal(open_array(run_dir, "embeddings/x/ops")[...], data)
    assert len(written) == -(-shape[0] // chunks[0])

    written.clear()
    packed = zarr.create_array(str(run_dir.parent / "zstd.zarr"), shape=shape, chunks=chunks, dtype="float64",
                               compressors=zarr.codecs.ZstdCodec())
    write_all(packed, data)
    assert not written
    np.testing.assert_array_equal(packed[...], data)
