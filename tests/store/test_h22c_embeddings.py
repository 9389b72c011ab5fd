"""Issue 22 item 7: embeddings reads check chunk presence and the build's provenance."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from datavalue.embeddings import build_embeddings, check_build
from datavalue.errors import EmbeddingError, QueryError, StoreCorruptError
from datavalue.query import Attributor
from datavalue.store import fast_rows, open_run
from tests.embeddings._synthetic import make_steps, write_run


def _built(path, seed=0, T=12):
    write_run(path, make_steps(seed, T), chunk_rows=5)
    build_embeddings(path, curvature="empirical_fisher", chunk_rows=5)
    return path


def test_deleted_embeddings_chunk_is_named_not_read_as_zeros(tmp_path):
    path = _built(tmp_path / "r.zarr")
    run = open_run(path)
    values = path / "embeddings" / "empirical_fisher" / "values"
    assert Attributor(path, kind="dvemb").n_rows == run.n_rows
    (values / "c" / "1" / "0").unlink()
    # what a reader without the check gets: exact zeros in the rows of the deleted chunk
    assert not np.any(fast_rows(run.array("embeddings/empirical_fisher/values"))[5:10])
    with pytest.raises(StoreCorruptError, match=r"embeddings/empirical_fisher/values/c/1/0"):
        Attributor(path, kind="dvemb")
    with pytest.raises(StoreCorruptError, match=r"embeddings/empirical_fisher/values/c/1/0"):
        check_build(run, "empirical_fisher")
    with pytest.raises(StoreCorruptError, match=r"values/c/1/0"):
        run.require_chunks("embeddings/empirical_fisher/values", run.n_rows)


def test_embeddings_copied_from_another_run_are_refused(tmp_path):
    a = _built(tmp_path / "a.zarr", seed=0)
    b = tmp_path / "b.zarr"
    write_run(b, make_steps(0, 12), chunk_rows=5)  # the same shapes (ids, rows, steps) ...
    run_b = open_run(b)
    assert run_b.n_rows == open_run(a).n_rows
    lr = run_b.lr.copy()
    shutil.rmtree(b)
    steps = make_steps(0, 12)
    steps[3] = steps[3].__class__(**{**steps[3].__dict__, "lr": float(lr[3]) * 2})  # ... but another lr at step 3
    write_run(b, steps, chunk_rows=5)
    shutil.copytree(a / "embeddings", b / "embeddings")
    with pytest.raises(QueryError, match="run_digest|written for another run"):
        Attributor(b, kind="dvemb")
    with pytest.raises(EmbeddingError, match="run_digest|written for another run"):
        check_build(open_run(b), "empirical_fisher")
    assert check_build(open_run(a), "empirical_fisher")["n_rows"] == open_run(a).n_rows


def test_embeddings_copied_into_a_run_of_other_length_are_refused(tmp_path):
    a = _built(tmp_path / "a.zarr", seed=0, T=12)
    b = tmp_path / "b.zarr"
    write_run(b, make_steps(0, 12) + make_steps(1, 2, t0=12), chunk_rows=5)
    shutil.copytree(a / "embeddings", b / "embeddings")
    with pytest.raises(EmbeddingError, match="built from 12 steps|written for another run"):
        check_build(open_run(b), "empirical_fisher")
    with pytest.raises(QueryError):
        Attributor(b, kind="dvemb")


def test_fast_rows_with_required_rows_names_a_missing_chunk(tmp_path):
    path = _built(tmp_path / "r.zarr")
    run = open_run(path)
    name = "embeddings/empirical_fisher/values"
    (path / name / "c" / "1" / "0").unlink()
    with pytest.raises(StoreCorruptError, match=r"embeddings/empirical_fisher/values/c/1/0 is missing"):
        fast_rows(run.array(name), required_rows=run.n_rows)[0 : run.n_rows]
    # chunks past the required rows keep zarr's fill semantics (spare capacity past a commit)
    assert not np.any(fast_rows(run.array(name), required_rows=5)[5:10])


@pytest.mark.parametrize("curvature", ["fisher", "none"])
def test_check_build_accepts_its_own_build_with_momentum_and_fisher(tmp_path, curvature):
    path = tmp_path / "r.zarr"
    write_run(path, make_steps(3, 9, momentum=0.9, weight_decay=0.01, fisher=True), fisher=True, chunk_rows=5)
    build_embeddings(path, curvature=curvature, chunk_rows=5)
    meta = check_build(open_run(path), curvature)
    assert meta["n_steps"] == 9
    assert Attributor(path, kind="dvemb", curvature=curvature).n_steps == 9
