"""Out-of-core: querying embeddings several times larger than the memory bound stays under it.

The store: R = 200,000 occurrences of 10,000 samples (20 epochs), k = 256 float32 embeddings =
205 MB on disk, streamed in chunks of 4096 rows (4 MiB, equal to the storage chunks). The query
has m = 128 test points, so the dense score matrix (m, R) alone would be 102 MB in float32.

Bound: 80 MB of traced (Python + numpy) allocations at peak, with dask limited to 2 threads.
What legitimately lives at once (measured about 45-60 MB):
- reading: per thread one chunk being decoded; zarr holds about 3.5 copies of a chunk while
  decoding (compressed bytes, decompressed, checksum stripped, output): 2 x 3.5 x 4 MiB = 29 MB;
- per-chunk partial sums, two windows of 2 chunks: 4 x (4096 x 128 float32) = 8 MB;
- the (128, 10,000) float64 accumulator, which is the result: 10 MB;
- the run's per-row arrays and the sample index built on first use (np.unique): about 10 MB.
A warm-up query on another Attributor first keeps one-time library set-up (imports, codec
pipelines) out of the measurement. Loading the embeddings (205 MB) or forming the (m, R) matrix (102 MB) breaks it.
"""

from __future__ import annotations

import time
import tracemalloc

import dask
import numpy as np
import pytest

from datavalue.query import Attributor
from datavalue.store import RunWriter, StepBlock, create_array

R, K, M = 200_000, 256, 128
SAMPLES, EPOCHS, STEP_ROWS, CHUNK = 10_000, 20, 5_000, 4096
BOUND_MB = 80


def _big_run(path):
    manifest = {"projection": {"proj_dim": K, "seed": 0, "blocks": []}, "model_fingerprint": {}}
    writer = RunWriter(path, manifest, k=K, chunk_rows=STEP_ROWS, background=False)
    rng = np.random.default_rng(0)
    zeros = np.zeros((STEP_ROWS, K), np.float32)  # gradients are not read by a dvemb query
    step = 0
    for epoch in range(EPOCHS):
        perm = rng.permutation(SAMPLES)
        for i in range(0, SAMPLES, STEP_ROWS):
            ids = perm[i : i + STEP_ROWS].astype(np.int64)
            writer.submit(StepBlock(step=step, sample_id=ids, weight=np.full(ids.size, 1 / ids.size), grads=zeros,
                                    flags=np.zeros(ids.size, np.uint8), lr=0.1, epoch=epoch))
            step += 1
    writer.close()
    arr = create_array(path, "embeddings/empirical_fisher/values", shape=(R, K), dtype="float32", chunks=(CHUNK, K),
                       attrs={"curvature": "empirical_fisher"})
    for r0 in range(0, R, CHUNK):
        r1 = min(R, r0 + CHUNK)
        arr[r0:r1] = rng.standard_normal((r1 - r0, K), dtype=np.float32)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "run.zarr"
    t = time.perf_counter()
    _big_run(path)
    print(f"built the {R}x{K} store in {time.perf_counter() - t:.1f}s")
    return path


def _peak_mb(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()
    return out, peak


@pytest.mark.parametrize("what", ["by_sample", "top_k"])
def test_peak_memory_bounded(big, what):
    q = np.random.default_rng(1).standard_normal((M, K)).astype(np.float32)
    with dask.config.set(num_workers=2):
        Attributor(big, None, chunk_rows=CHUNK, progress=False).top_k(q[:2], k=2, by="sample", steps=(0, 1))
        attr = Attributor(big, None, chunk_rows=CHUNK, progress=False)
        if what == "by_sample":
            out, peak = _peak_mb(lambda: attr.scores(q, by="sample"))
            assert out.shape == (M, SAMPLES)
        else:
            out, peak = _peak_mb(lambda: attr.top_k(q, k=10))
            assert out.helpful_ids.shape == (M, 10)
    print(f"{what}: peak traced memory {peak:.1f} MB (bound {BOUND_MB} MB)")
    assert peak < BOUND_MB, f"{what} peaked at {peak:.1f} MB"


def test_measurement_sees_a_dense_result(big):
    """Control: the measurement does catch an (m, R) matrix (here the by=None result itself)."""
    q = np.random.default_rng(1).standard_normal((M, K)).astype(np.float32)
    attr = Attributor(big, None, chunk_rows=CHUNK, progress=False)
    with dask.config.set(num_workers=2):
        S, peak = _peak_mb(lambda: attr.scores(q))
    assert S.shape == (M, R)
    assert peak > M * R * 4 / 1e6 > BOUND_MB
