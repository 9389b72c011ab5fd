"""Eighth probe (session 12): queries (P8-04, P8-05)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import datavalue
from datavalue.errors import QueryError
from tests._helpers_tiny_run import record_tiny_run, tiny_query_loss


@pytest.fixture(scope="module")
def attr(tmp_path_factory):
    path = tmp_path_factory.mktemp("p8_query") / "r.zarr"
    m = record_tiny_run(Path(path))
    datavalue.build_embeddings(path, progress=False)
    return datavalue.Attributor(path, m, progress=False)


@pytest.mark.parametrize("lazy", ["no", 1, None, np.array(True)])
def test_p8_04_lazy_takes_a_bool_only(attr, lazy):
    """Was: ``lazy="no"`` (truthy) returned a dask array; ``lazy=None`` an eager one, silently."""
    with pytest.raises(QueryError, match="lazy must be True or False"):
        attr.scores(tiny_query_loss, lazy=lazy)


def test_p8_04_lazy_bools_still_work(attr):
    eager = attr.scores(tiny_query_loss, lazy=False)
    np.testing.assert_array_equal(np.asarray(attr.scores(tiny_query_loss, lazy=np.bool_(True)).compute()), eager)


def test_p8_05_an_empty_array_query_is_not_called_an_empty_loss(attr):
    """Was: ``the query has no test points (loss_fn returned an empty tensor)`` for an array query."""
    with pytest.raises(QueryError, match=r"test gradients given have shape \(0, 43\)") as exc:
        attr.scores(np.ones((0, 43)))
    assert "loss_fn" not in str(exc.value)
