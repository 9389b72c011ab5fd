"""End to end through the real builder, when ``datavalue.embeddings.build_embeddings`` exists."""

from __future__ import annotations

import numpy as np
import pytest

from datavalue.capture import per_sample_gradients
from datavalue.query import Attributor
from datavalue.store import open_array
from tests.query.conftest import data, record, test_loss

embeddings = pytest.importorskip("datavalue.embeddings")
if not hasattr(embeddings, "build_embeddings"):
    pytest.skip("datavalue.embeddings.build_embeddings is not available yet", allow_module_level=True)


def test_query_over_built_embeddings(tmp_path):
    path = tmp_path / "run.zarr"
    model = record(path)
    embeddings.build_embeddings(path, curvature="empirical_fisher", progress=False)
    _, _, xt, yt = data()
    loss = test_loss(xt, yt)
    attr = Attributor(path, model, progress=False)  # picks the only build
    assert attr.curvature == "empirical_fisher" and attr.kind == "dvemb"
    values = np.asarray(open_array(path, "embeddings/empirical_fisher/values")[:], np.float64)
    q = per_sample_gradients(model, loss, path).astype(np.float64)
    S = attr.scores(loss)
    np.testing.assert_allclose(S, q @ values.T, rtol=1e-5, atol=1e-6 * np.abs(S).max())
    # the last step's embedding is lr * weight * gradient (no later step to propagate through)
    run, last = attr.run, slice(attr.run.step_ptr[-2], attr.run.step_ptr[-1])
    tracin = Attributor(path, model, kind="tracin", progress=False).scores(loss)
    np.testing.assert_allclose(S[:, last], tracin[:, last], rtol=1e-4, atol=1e-6 * np.abs(S).max())
    assert run.n_steps == 10
