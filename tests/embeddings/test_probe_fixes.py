"""Issue 22 probe, items 5 and 6: build arguments are checked before ``overwrite=True`` deletes the
finished build, and unclear errors become clear ones.

5. ``client=object()`` (a raw AttributeError 'compute'), a ``"tcp://..."`` string as client, and
   ``chunk_rows=10**12`` (a raw MemoryError "244 TiB") each failed only after the old build was
   deleted, leaving it ``complete: False``.
6. ``build_embeddings(open_run(p))`` said "cannot open the zarr group at <Run object>";
   ``max_memory="0"``, ``"0.4 B"`` and ``0.5`` became a limit of 0 bytes while ``0`` was refused.
"""

from __future__ import annotations

import numpy as np
import pytest

from datavalue._memory import parse_max_memory
from datavalue.embeddings import build_embeddings
from datavalue.errors import EmbeddingError, QueryError, RecorderError
from datavalue.store import open_array, open_run

from ._synthetic import make_steps, write_run


@pytest.fixture()
def built(tmp_path):
    path = write_run(tmp_path / "r.zarr", make_steps(3, 6))
    build_embeddings(path, "empirical_fisher", progress=False)
    return path


def _build_state(path):
    arr = open_array(path, "embeddings/empirical_fisher/values")
    meta = dict(arr.attrs["datavalue_embeddings"])
    return meta["complete"], meta["created"], np.asarray(arr[:])


@pytest.mark.parametrize(("kwargs", "said"), [
    (dict(client=object(), segments=2), r"client must be a dask.distributed.Client or None \(local threads\), got object"),
    (dict(client="tcp://127.0.0.1:1", segments=2),
     r"got the string 'tcp://127.0.0.1:1'. To run on a cluster, connect first and pass the client: "
     r"client=dask.distributed.Client\('tcp://127.0.0.1:1'\)"),
    (dict(chunk_rows=10**12), r"a build with chunk_rows=1,000,000,000,000 \(7 columns\) would hold about .* TiB "
                              r"\(one output chunk .* TiB\), but the machine has .* available. Pass a smaller "
                              r"chunk_rows= \(default: the run's, \d+\)"),
])
def test_a_bad_argument_is_refused_before_overwrite_deletes_the_build(built, monkeypatch, kwargs, said):
    monkeypatch.delenv("DATAVALUE_MEMORY_CHECK", raising=False)
    complete, created, values = _build_state(built)
    assert complete
    with pytest.raises(EmbeddingError, match=said):
        build_embeddings(built, "empirical_fisher", progress=False, overwrite=True, **kwargs)
    complete2, created2, values2 = _build_state(built)
    assert complete2 and created2 == created
    np.testing.assert_array_equal(values2, values)


def test_a_dask_client_is_still_accepted(built):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        info = build_embeddings(built, "empirical_fisher", progress=False, overwrite=True, segments=2, client=client)
    assert info.n_steps == 6


def test_an_open_run_is_built_from_its_path(built):
    before = _build_state(built)[2]
    info = build_embeddings(open_run(built), "empirical_fisher", progress=False, overwrite=True)
    assert info.path == str(built)
    np.testing.assert_array_equal(_build_state(built)[2], before)


def test_an_open_run_is_locked_like_its_path(built):
    from datavalue.errors import StoreLockedError
    from datavalue.store._runlock import run_lock

    lock = run_lock(built, "a test")
    lock.acquire()
    try:
        with pytest.raises(StoreLockedError):
            build_embeddings(open_run(built), "empirical_fisher", progress=False, overwrite=True)
    finally:
        lock.release()


@pytest.mark.parametrize("path", [3, {"run": "r.zarr"}, None])
def test_something_else_than_a_path_is_refused_clearly(path):
    with pytest.raises(EmbeddingError, match=r"path must be a run's path .* or an open datavalue Run, got .*: pass "
                                             r"the run's path"):
        build_embeddings(path, progress=False)


@pytest.mark.parametrize("value", [0, "0", "0.4 B", 0.5, "0 GiB", 0.0, -1, float("nan")])
def test_max_memory_below_one_byte_is_refused_alike(value):
    said = r"max_memory must be None, a positive number of bytes or a string such as '8 GiB', got "
    with pytest.raises(ValueError, match=said):
        parse_max_memory(value)
    with pytest.raises(QueryError, match=said):
        parse_max_memory(value, QueryError)
    with pytest.raises(RecorderError, match=said):
        parse_max_memory(value, RecorderError)


@pytest.mark.parametrize(("value", "got"), [(1, 1), ("1 B", 1), ("0.5 KB", 500), (2.7, 2), ("8 GiB", 8 << 30),
                                            (10**30, 10**30)])
def test_max_memory_of_a_byte_or_more_is_accepted(value, got):
    assert parse_max_memory(value) == got


@pytest.mark.parametrize("fn", ["extend_embeddings", "embeddings_at"])
def test_extend_and_checkpoint_builds_check_the_client_first(built, fn):
    """``extend_embeddings`` / ``embeddings_at`` refuse a bad ``client=`` before they read or write."""
    import datavalue.embeddings as emb

    args = (built, 2) if fn == "embeddings_at" else (built,)
    with pytest.raises(EmbeddingError, match="client must be a dask.distributed.Client or None"):
        getattr(emb, fn)(*args, client=object(), progress=False)
