"""Seventh probe leftovers (issue 22), the store's side: ``Run.require_chunks`` checked only the first
column chunk of each row chunk (a deleted chunk in a later column passed), and ``Run.grads`` /
``Run.fisher`` were plain ``da.from_zarr`` (a chunk deleted after open read as zeros, a flipped byte
raised zarr's bare ``ValueError`` at compute time).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datavalue.errors import StoreCorruptError
from datavalue.store import create_array, open_run
from tests._helpers_tiny_run import record_tiny_run


def _flip(path: Path, at: int = 3) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.fixture
def run_path(tmp_path: Path) -> Path:
    path = tmp_path / "run.zarr"
    record_tiny_run(path, steps=4, chunk_rows=6, curvature="fisher")
    return path


def test_require_chunks_names_a_deleted_chunk_in_a_later_column(run_path):
    arr = create_array(run_path, "embeddings/wide/values", shape=(24, 12), dtype="float32", chunks=(6, 4))
    arr[:] = np.arange(24 * 12, dtype="float32").reshape(24, 12) + 1
    (run_path / "embeddings/wide/values/c/2/1").unlink()  # row chunk 2, column chunk 1 (not the first)
    run = open_run(run_path)
    with pytest.raises(StoreCorruptError, match=r"embeddings/wide/values/c/2/1 .*entries 12\.\.17.* missing"):
        run.require_chunks("embeddings/wide/values", 24)
    run.require_chunks("embeddings/wide/values", 12)  # rows 0..11 are whole


@pytest.mark.parametrize("name", ["grads", "fisher"])
def test_a_chunk_deleted_after_open_is_an_error_not_zeros(run_path, name):
    run = open_run(run_path)
    lazy = getattr(run, name)
    assert np.abs(np.asarray(lazy[:6])).sum() > 0
    (run_path / name / "c" / "1" / "0").unlink()
    with pytest.raises(StoreCorruptError, match=rf"chunk {name}/c/1/0 is missing"):
        np.asarray(getattr(run, name).compute())
    np.asarray(lazy[:6].compute())  # the intact chunk still reads


@pytest.mark.parametrize("name", ["grads", "fisher"])
def test_a_flipped_byte_is_a_store_error_naming_the_chunk(run_path, name):
    run = open_run(run_path)
    _flip(run_path / name / "c" / "1" / "0")
    with pytest.raises(StoreCorruptError, match=rf"chunk {name}/c/1/0 is corrupt"):
        getattr(run, name).compute()


def test_wide_layout_reads_through_the_checked_array(run_path):
    """An array with several column chunks (not the chunk-file layout) is read with the same checks."""
    from datavalue.store._checked import CheckedArray, checked_rows

    arr = create_array(run_path, "embeddings/wide/values", shape=(24, 12), dtype="float32", chunks=(6, 4))
    data = np.arange(24 * 12, dtype="float32").reshape(24, 12) + 1
    arr[:] = data
    reader = checked_rows(arr, 24, location=run_path)
    assert isinstance(reader, CheckedArray)
    np.testing.assert_array_equal(reader[6:20, 3:9], data[6:20, 3:9])
    _flip(run_path / "embeddings/wide/values/c/3/2", 5)
    with pytest.raises(StoreCorruptError, match=r"chunk embeddings/wide/values/c/3/2 is corrupt"):
        reader[0:24]
    (run_path / "embeddings/wide/values/c/1/2").unlink()
    with pytest.raises(StoreCorruptError, match=r"chunk embeddings/wide/values/c/1/2 .*missing"):
        reader[0:12]
