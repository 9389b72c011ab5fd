"""A dask.distributed LocalCluster (two worker processes) gives the local scheduler's answers."""

from __future__ import annotations

import numpy as np
import pytest

from datavalue.query import Attributor

distributed = pytest.importorskip("distributed")


@pytest.mark.timeout(120)
def test_local_cluster_matches_threaded(tiny):
    path, model, _, loss = tiny
    local = Attributor(path, model, chunk_rows=16, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        remote = Attributor(path, model, chunk_rows=16, progress=False, client=client)
        np.testing.assert_allclose(remote.scores(loss), local.scores(loss), rtol=1e-6)
        np.testing.assert_allclose(remote.scores(loss, by="sample"), local.scores(loss, by="sample"), rtol=1e-6)
        lazy = remote.scores(loss, by="sample", lazy=True)
        np.testing.assert_allclose(client.compute(lazy).result(), local.scores(loss, by="sample"), rtol=1e-6)
        for by in (None, "sample"):
            a, b = remote.top_k(loss, k=3, by=by), local.top_k(loss, k=3, by=by)
            np.testing.assert_array_equal(a.helpful_ids, b.helpful_ids)
            np.testing.assert_array_equal(a.harmful_ids, b.harmful_ids)
