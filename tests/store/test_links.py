"""Writing a derived array never goes through a symbolic link that leads outside the run."""

from __future__ import annotations

import numpy as np
import pytest

from datavalue.errors import StoreError, StoreNotFoundError
from datavalue.store import RunWriter, StepBlock, create_array, open_array, open_array_writable


@pytest.fixture()
def run_path(tmp_path):
    path = tmp_path / "r.zarr"
    w = RunWriter(path, {"projection": {"blocks": []}}, k=3, chunk_rows=4, storage_dtype="float64", background=False)
    rng = np.random.default_rng(0)
    for t in range(2):
        w.submit(StepBlock(step=t, sample_id=np.arange(5) + 5 * t, weight=np.full(5, 0.2),
                           grads=rng.standard_normal((5, 3)), flags=np.zeros(5, np.uint8), lr=0.1))
    w.close()
    create_array(path, "embeddings/fisher/values", shape=(10, 3), dtype="float64", chunks=(4, 3))
    return path


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writable_open_refuses_a_link_leading_outside_the_run(run_path, tmp_path):
    outside = tmp_path / "someone_elses"
    outside.mkdir()
    (run_path / "embeddings").rename(outside / "embeddings")
    (run_path / "embeddings").symlink_to(outside / "embeddings", target_is_directory=True)
    before = _tree(outside)
    assert open_array(run_path, "embeddings/fisher/values").shape == (10, 3)  # reading through it is fine
    with pytest.raises(StoreError, match="leads outside the run"):
        open_array_writable(run_path, "embeddings/fisher/values")
    assert _tree(outside) == before


def test_writable_open_writes_inside_the_run_and_through_links_that_stay_inside(run_path):
    (run_path / "alias").symlink_to(run_path / "embeddings", target_is_directory=True)
    arr = open_array_writable(run_path, "alias/fisher/values")
    arr.resize((12, 3))
    arr[10:12] = np.ones((2, 3))
    arr.attrs["note"] = "extended"
    back = open_array(run_path, "embeddings/fisher/values")
    assert back.shape == (12, 3) and back.attrs["note"] == "extended"
    np.testing.assert_array_equal(np.asarray(back[10:12]), np.ones((2, 3)))


def test_writable_open_of_a_missing_array_names_it(run_path):
    with pytest.raises(StoreNotFoundError, match="no array 'embeddings/none/values'"):
        open_array_writable(run_path, "embeddings/none/values")
