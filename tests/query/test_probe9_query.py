"""Ninth probe (session 13): queries (P9-04).

Test gradients given as float64 are checked finite, then scored in the dtype of the run's rows
(float32 for a float32 run): a value past float32's range became inf there, and every score NaN or
inf, with nothing but numpy's overflow warning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import datavalue
from datavalue.errors import NonFiniteError
from tests._helpers_tiny_run import record_tiny_run


@pytest.fixture(scope="module")
def attr(tmp_path_factory):
    path = tmp_path_factory.mktemp("p9_query") / "r.zarr"
    m = record_tiny_run(Path(path))
    datavalue.build_embeddings(path, progress=False)
    return datavalue.Attributor(path, m, progress=False)


@pytest.mark.parametrize("call", ["scores", "lazy", "top_k"])
def test_p9_04_test_gradients_past_the_scoring_dtype_are_refused(attr, call):
    q = np.ones((3, 43))
    q[1, 5] = 1e39  # finite in float64, inf in float32
    with pytest.raises(NonFiniteError, match=r"test points \[1\] are finite but too large for float32"):
        if call == "scores":
            attr.scores(q)
        elif call == "lazy":
            attr.scores(q, lazy=True).compute()
        else:
            attr.top_k(q, k=2)


def test_p9_04_large_test_gradients_inside_the_range_are_scored(attr):
    q = np.full((2, 43), 1e30)
    s = attr.scores(q)
    assert np.isfinite(s).all()
    ref = attr.scores(np.ones((2, 43))) * 1e30
    np.testing.assert_allclose(s, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_p9_13_a_damaged_commit_is_not_called_deleted_or_replaced(tmp_path):
    """A byte of ``commit/c/0`` flipped after the Attributor opened the run: the lazy scores and
    top_k said the run "was deleted or is being replaced" (query it again once it is in place)."""
    from datavalue.errors import QueryError
    from tests._helpers_tiny_run import tiny_query_loss

    path = tmp_path / "r.zarr"
    m = record_tiny_run(path)
    datavalue.build_embeddings(path, progress=False)
    a = datavalue.Attributor(path, m, progress=False)
    lazy = a.scores(tiny_query_loss, lazy=True)
    raw = bytearray((path / "commit" / "c" / "0").read_bytes())
    raw[3] ^= 1
    (path / "commit" / "c" / "0").write_bytes(bytes(raw))
    for call in (lazy.compute, lambda: a.top_k(tiny_query_loss, k=2)):
        with pytest.raises(QueryError, match=r"commit chunk commit/c/0 is damaged \(its crc32c does not match\)") as exc:
            call()
        assert "being replaced" not in str(exc.value)
