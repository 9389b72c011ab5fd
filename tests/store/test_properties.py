"""Hypothesis: any sequence of steps (sizes, chunking, flushes) round-trips exactly through the store."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datavalue.store import RunWriter, StepBlock, open_run


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=12),
    chunk=st.integers(1, 7),
    k=st.integers(1, 5),
    fisher=st.booleans(),
    flush_every=st.integers(1, 5),
)
def test_store_round_trip(tmp_path_factory, sizes, chunk, k, fisher, flush_every):
    path = tmp_path_factory.mktemp("prop") / "r.zarr"
    rng = np.random.default_rng(len(sizes) * 31 + chunk)
    blocks = []
    w = RunWriter(path, {"projection": {"blocks": []}}, k=k, chunk_rows=chunk, fisher=fisher, storage_dtype="float64")
    for t, b in enumerate(sizes):
        blk = StepBlock(step=t, sample_id=rng.integers(0, 10**12, b), weight=rng.random(b), grads=rng.standard_normal((b, k)),
                        flags=rng.integers(0, 2, b).astype(np.uint8), lr=float(rng.random()), epoch=t // 3,
                        fisher=rng.standard_normal((int(rng.integers(0, 4)), k)) if fisher else None)
        blocks.append(blk)
        w.submit(blk)
        if t % flush_every == 0:
            w.flush()
    w.close()
    run = open_run(path)
    assert run.n_steps == len(sizes) and run.n_rows == sum(sizes)
    np.testing.assert_array_equal(run.grads.compute(), np.concatenate([b.grads for b in blocks]))
    np.testing.assert_array_equal(run.sample_id, np.concatenate([b.sample_id for b in blocks]))
    np.testing.assert_array_equal(run.weight, np.concatenate([b.weight for b in blocks]))
    np.testing.assert_array_equal(run.flags, np.concatenate([b.flags for b in blocks]))
    np.testing.assert_array_equal(run.lr, [b.lr for b in blocks])
    np.testing.assert_array_equal(run.step_ptr, np.concatenate([[0], np.cumsum(sizes)]))
    if fisher:
        np.testing.assert_array_equal(run.fisher.compute(), np.concatenate([b.fisher for b in blocks]))
        np.testing.assert_array_equal(np.diff(run.fisher_ptr), [len(b.fisher) for b in blocks])
