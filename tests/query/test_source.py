"""Which embeddings a query uses: curvature preference, missing and stale builds."""

from __future__ import annotations

import numpy as np
import pytest

from datavalue.errors import QueryError
from datavalue.query import Attributor, built_curvatures
from datavalue.store import create_array, open_run
from tests.query.conftest import record, write_embeddings


@pytest.fixture
def bare_run(tmp_path):
    path = tmp_path / "run.zarr"
    return path, record(path, epochs=1)


def test_no_embeddings_says_how_to_build_them(bare_run):
    path, model = bare_run
    with pytest.raises(QueryError, match=r"build_embeddings\("):
        Attributor(path, model)
    assert Attributor(path, model, kind="tracin", progress=False).kind == "tracin"


def test_curvature_preference_and_explicit_choice(bare_run):
    path, model = bare_run
    write_embeddings(path, "none", seed=1)
    assert Attributor(path, model).curvature == "none"  # the only one present
    emp = write_embeddings(path, "empirical_fisher", seed=2)
    assert Attributor(path, model).curvature == "empirical_fisher"
    fis = write_embeddings(path, "fisher", seed=3)
    assert built_curvatures(open_run(path)) == ["empirical_fisher", "fisher", "none"]
    q = np.random.default_rng(0).standard_normal((2, emp.shape[1])).astype(np.float32)
    a = Attributor(path, model, progress=False)
    assert a.curvature == "fisher"
    np.testing.assert_allclose(a.scores(q), q @ fis.T, rtol=1e-5, atol=1e-5)
    b = Attributor(path, model, curvature="empirical_fisher", progress=False)
    np.testing.assert_allclose(b.scores(q), q @ emp.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(QueryError, match="no 'gauss_newton' embeddings"):
        Attributor(path, model, curvature="gauss_newton")


def test_stale_or_unfinished_build_is_refused(bare_run):
    path, model = bare_run
    run = open_run(path)
    R, k = run.n_rows, run.proj_dim
    create_array(path, "embeddings/fisher/values", shape=(R - 8, k), dtype="float32", chunks=(16, k))
    with pytest.raises(QueryError, match="Rebuild"):
        Attributor(path, model)
    create_array(path, "embeddings/fisher/values", shape=(R, k), dtype="float32", chunks=(16, k), overwrite=True,
                 attrs={"datavalue_embeddings": {"curvature": "fisher", "n_rows": R, "complete": False}})
    with pytest.raises(QueryError, match="unfinished"):
        Attributor(path, model)
    create_array(path, "embeddings/fisher/values", shape=(R, k + 1), dtype="float32", chunks=(16, k + 1),
                 overwrite=True)
    with pytest.raises(QueryError, match="columns"):
        Attributor(path, model)
