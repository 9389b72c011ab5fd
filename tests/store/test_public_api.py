"""The store's public names: what other packages use instead of ``datavalue.store._*`` and ``run._group``."""

from __future__ import annotations

import numpy as np
import pytest

import datavalue.store as store
from datavalue.errors import StoreNotFoundError
from datavalue.store import (
    ChunkFileRows,
    RunWriter,
    StepBlock,
    create_array,
    fast_rows,
    open_run,
    write_chunk,
)


@pytest.fixture()
def run(tmp_path):
    path = tmp_path / "r.zarr"
    w = RunWriter(path, {"projection": {"blocks": []}}, k=3, chunk_rows=4, storage_dtype="float64", background=False)
    rng = np.random.default_rng(0)
    for t in range(3):
        w.submit(StepBlock(step=t, sample_id=np.arange(5) + 5 * t, weight=np.full(5, 0.2),
                           grads=rng.standard_normal((5, 3)), flags=np.zeros(5, np.uint8), lr=0.1))
    w.close()
    create_array(path, "embeddings/fisher/values", shape=(15, 3), dtype="float64", chunks=(4, 3))
    create_array(path, "embeddings/hessian/values", shape=(15, 3), dtype="float64", chunks=(4, 3))
    return open_run(path)


def test_every_public_name_resolves():
    for name in store.__all__:
        assert getattr(store, name) is not None, name
    assert not [n for n in store.__all__ if n.startswith("_")]


def test_array_chunk_rows_and_subgroups(run):
    grads = run.array("grads")
    assert grads.chunks == (4, 3) and grads.shape[0] >= run.n_rows  # unsliced: may hold spare rows
    np.testing.assert_array_equal(np.asarray(grads[: run.n_rows]), run.read("grads"))
    assert run.chunk_rows("grads") == run.row_chunk == 4
    assert run.subgroups("embeddings") == ["fisher", "hessian"]
    assert run.subgroups("no_such_group") == [] and run.subgroups("grads") == []  # an array is no group
    with pytest.raises(StoreNotFoundError, match="no array 'hessian'"):
        run.array("hessian")
    with pytest.raises(StoreNotFoundError):
        run.chunk_rows("adam_v")


def test_fast_rows_and_write_chunk_through_public_names(run):
    rows = fast_rows(run.array("grads"))
    assert isinstance(rows, ChunkFileRows)
    np.testing.assert_array_equal(rows[0 : run.n_rows], run.read("grads"))
    out = create_array(run.path, "embeddings/x/values", shape=(6, 3), dtype="float64", chunks=(4, 3))
    directory = store.chunk_dir(out)
    assert directory is not None
    data = np.arange(18, dtype=np.float64).reshape(6, 3)
    write_chunk(directory, 0, data[:4], 4)
    write_chunk(directory, 1, data[4:], 4)  # the edge chunk, zero-padded
    np.testing.assert_array_equal(np.asarray(run.array("embeddings/x/values")[:]), data)
