"""Cost of extending a ``fisher_window`` build (session 13, issue 19): a synthetic SGD run written through the store's
``RunWriter`` (k = 512 in two recorded blocks, batch 32, 16 Fisher rows a step, lr 0.05), built with one operator
(``blocks="full"``) over 2,000 steps, resumed to 2,040 and extended, against a from-scratch build of the 2,040
steps with the same ``W``; wall clock of each (one run each) and the largest difference (float32 storage).

    flock /tmp/s13-bench.lock nice -n 10 env PYTHONPATH=. python experiments/lm/extend_pooled_cost.py
"""

import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from datavalue.embeddings import build_embeddings, extend_embeddings  # noqa: E402
from datavalue.store import RunWriter, StepBlock, open_array  # noqa: E402

K, B, F, T0, T1 = 512, 32, 16, 2000, 2040
MANIFEST = {
    "projection": {"proj_dim": None, "seed": 0, "blocks": [
        {"name": "a", "index": 0, "start": 0, "stop": 256, "k": 256},
        {"name": "b", "index": 1, "start": 256, "stop": 512, "k": 256}]},
    "loss_reduction": "mean", "optimizer": {"kind": "sgd"}, "curvature": {"fisher": None},
}
rng = np.random.default_rng(0)
STEPS = [StepBlock(step=t, sample_id=np.arange(B) + B * t, weight=np.full(B, 1 / B), grads=rng.normal(size=(B, K)) * 0.1,
                   flags=np.zeros(B, np.uint8), lr=0.05, grad_scale=1.0, momentum=0.0, weight_decay=0.0,
                   fisher=rng.normal(size=(F, K)) * 0.05) for t in range(T1)]


def write(path, steps, mode="create"):
    w = RunWriter(path, MANIFEST, k=K, mode=mode, chunk_rows=256, storage_dtype="float32", fisher=True,
                  background=False)
    for s in steps:
        w.submit(s)
    w.close()


def values(path):
    return np.asarray(open_array(path, "embeddings/fisher/values")[:])


with tempfile.TemporaryDirectory() as work:
    for W in (0, 4):
        grown, whole = pathlib.Path(work) / f"g{W}.zarr", pathlib.Path(work) / f"w{W}.zarr"
        write(grown, STEPS[:T0])
        write(whole, STEPS)
        build_embeddings(grown, "fisher", blocks="full", fisher_window=W, progress=False)
        write(grown, STEPS[T0:], mode="resume")
        t = time.perf_counter()
        extend_embeddings(grown, "fisher", progress=False)
        t_ext = time.perf_counter() - t
        t = time.perf_counter()
        build_embeddings(whole, "fisher", blocks="full", fisher_window=W, progress=False)
        t_build = time.perf_counter() - t
        a, b = values(grown), values(whole)
        print(f"W={W}: extend {T0}->{T1} {t_ext:.2f} s, rebuild {T1} {t_build:.2f} s, "
              f"max |diff| / max |entry| {np.abs(a - b).max() / np.abs(b).max():.1e}", flush=True)
