"""A synthetic run larger than RAM: write it, build embeddings over it, query top-k, measure memory.

    python benchmarks/scale.py --gb 30            # 30 GB of float32 embeddings (the issue's size)
    python benchmarks/scale.py --gb 1 --out /tmp  # a quick check

The run has ``k = 256`` columns in 4 blocks of 64 and 128 occurrences per step. Gradients are stored
as float16 (half the embeddings' size) to keep the disk footprint at 1.5x the embeddings. Peak memory
is the process's maximum resident set size (``resource.getrusage``), measured separately for the
build and the query by running each in a fresh subprocess. Results are appended to
docs/results/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
K, B, BLOCK = 256, 128, 64


def manifest() -> dict:
    blocks = [{"name": f"b{i}", "index": i, "rule": "synthetic", "kind": "dense", "params": [f"b{i}"], "shape": [BLOCK],
               "k_rows": BLOCK, "k_cols": 1, "k": BLOCK, "start": i * BLOCK, "stop": (i + 1) * BLOCK} for i in range(K // BLOCK)]
    return {"projection": {"proj_dim": K, "seed": 0, "blocks": blocks}, "model_fingerprint": {"digest": "synthetic"},
            "loss_reduction": "mean", "curvature": {"fisher": None}, "optimizer": {"kind": "sgd", "dampening": 0.0, "nesterov": False}}


def write_run(path: Path, n_steps: int) -> float:
    from datavalue.store import RunWriter, StepBlock

    t0 = time.perf_counter()
    w = RunWriter(path, manifest(), k=K, chunk_rows=65536, storage_dtype="float16", max_queue=4)
    rng = np.random.default_rng(0)
    base = (rng.standard_normal((B * 64, K)) * 0.05).astype(np.float32)
    n_samples = max(B, n_steps * B // 3)  # each sample seen about 3 times
    for t in range(n_steps):
        g = base[(t % 64) * B : (t % 64 + 1) * B] * (1.0 + (t % 7) * 0.01)  # a fresh array per step
        ids = (np.arange(B) + t * B) % n_samples
        w.submit(StepBlock(step=t, sample_id=ids, weight=np.full(B, 1 / B), grads=g, flags=np.zeros(B, np.uint8),
                           lr=0.01, epoch=t * B // n_samples))
    w.close()
    return time.perf_counter() - t0


def child(mode: str, path: str) -> None:
    import datavalue

    t0 = time.perf_counter()
    if mode == "build":
        datavalue.build_embeddings(path, curvature="empirical_fisher", dtype="float32", progress=False, blocks="layer")
    else:
        attr = datavalue.Attributor(path, None, progress=False)
        q = np.random.default_rng(1).standard_normal((16, K)).astype(np.float32)
        top = attr.top_k(q, k=10, by="sample")
        assert np.asarray(top.helpful_ids).shape == (16, 10)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"mode": mode, "seconds": dt, "peak_gib": peak}))


def run_child(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=30.0, help="size of the float32 embeddings to create")
    ap.add_argument("--out", default=str(ROOT / "runs"), help="directory for the synthetic run (deleted afterwards)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    n_steps = int(args.gb * 2**30 / (B * K * 4))
    path = Path(args.out) / "scale.zarr"
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = n_steps * B
    t_write = write_run(path, n_steps)
    build = run_child("build", path)
    query = run_child("query", path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    emb_gb = rows * K * 4 / 2**30
    line = (f"| {emb_gb:.1f} GiB embeddings ({rows:,} occurrences x {K}) | {size / 2**30:.1f} GiB | {t_write:.0f} s | "
            f"{build['seconds']:.0f} s ({rows / build['seconds']:,.0f} occ/s), peak {build['peak_gib']:.2f} GiB | "
            f"{query['seconds']:.0f} s ({emb_gb / query['seconds']:.2f} GiB/s), peak {query['peak_gib']:.2f} GiB |")
    print(line)
    res = ROOT / "docs" / "results" / "scale.md"
    if not res.exists():
        res.write_text(
            "# Scale: a run larger than memory\n\n`python benchmarks/scale.py --gb N` (2 cores, 24 GiB RAM). Top-k by sample "
            "for 16 test points; the build is empirical Fisher, float32 state, 4 blocks of 64. Peak = max RSS of the "
            "process doing the work.\n\n| run | on disk | write | build | top-k query |\n|---|---|---|---|---|\n")
    with open(res, "a") as f:
        f.write(line + "\n")
    if not args.keep:
        shutil.rmtree(path)


if __name__ == "__main__":
    main()
