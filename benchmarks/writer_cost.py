"""What the run writer costs per recorded step (issue 20, sixth pass): bytes written, and CPU.

Two views, both for the benchmark MLP's rows (batch 128, k = 1,018 at proj_dim 1024) or any
``--k``/``--batch``:

- ``--mode bytes``: recorded MLP steps through ``datavalue.Recorder`` (AdamW, the optimizer passed,
  so the Adam moments are stored; ``--fisher`` adds one sampled pseudo-gradient row per example);
  every chunk file the writer installs is counted by array, in KiB per step.
- ``--mode cpu`` (default): the writer alone (``RunWriter(..., background=False)``, the background
  thread's commit rule applied by hand: a chunk's worth of rows or ``commit_every // 2`` = 16 steps),
  process CPU time per step, for each ``--chunk-rows`` value (``0``: the default,
  ``datavalue.store._writer.default_chunk_rows``), alternated ``--reps`` times in one process.

Run: ``PYTHONPATH=. python benchmarks/writer_cost.py --chunk-rows 1030 0`` (1,030 rows: the default
before the sixth pass, ``(4 << 20) // (4 k)``).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from datavalue.store import RunWriter, StepBlock, _writer


def _manifest(k: int) -> dict:
    return {"projection": {"proj_dim": None, "seed": 0, "blocks": [
        {"name": "a", "index": 0, "rule": "linear", "kind": "dense", "params": ["a"], "shape": [k], "k_rows": k,
         "k_cols": 1, "k": k, "start": 0, "stop": k}]},
        "model_fingerprint": {"digest": "writer-cost"}, "loss_reduction": "mean", "curvature": {"fisher": None},
        "optimizer": {"kind": "adamw"}}


def writer_cpu(k: int, b: int, chunk_rows: int, steps: int, fisher: bool) -> float:
    """Process CPU ms per step of a synchronous writer committing like the background one."""
    g = np.random.default_rng(0).standard_normal((b, k)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        w = RunWriter(os.path.join(d, "r.zarr"), _manifest(k), k=k, chunk_rows=chunk_rows or None, background=False,
                      fisher=fisher)
        C = w.chunk_rows
        pending, rows, c0 = [], 0, time.process_time()
        for t in range(steps):
            pending.append(StepBlock(step=t, sample_id=np.arange(b) + b * t, weight=np.full(b, 1.0 / b), grads=g,
                                     flags=np.zeros(b, np.uint8), lr=0.1, fisher=g if fisher else None,
                                     extra={"adam_m": np.full(k, 0.1), "adam_v": np.full(k, 0.2),
                                            "adam_step": float(t + 1)}))
            rows += b
            if rows >= C or len(pending) >= w.commit_every // 2:
                w._write(pending)
                pending, rows = [], 0
        if pending:
            w._write(pending)
        c1 = time.process_time()
        w.close()
    return (c1 - c0) / steps * 1e3


def recorded_bytes(chunk_rows: int, steps: int, fisher: bool) -> tuple[int, dict[str, float]]:
    """KiB written per recorded MLP step, by array (the Recorder's default chunking when ``chunk_rows`` is 0)."""
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    import capture_overhead as co

    import datavalue

    written: collections.Counter[str] = collections.Counter()
    orig = _writer._write_bytes

    def counting(path, data, crc):
        parts = path.parts
        written[parts[parts.index("c") - 1] if "c" in parts else path.name] += len(data)
        return orig(path, data, crc)

    _writer._write_bytes = counting
    try:
        torch.set_num_threads(1)
        name, model, loss_fn, b = co.mlp_case()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        kw = dict(curvature="fisher", fisher_max_classes=1, fisher_samples=1) if fisher else {}
        with tempfile.TemporaryDirectory() as d:
            rec = datavalue.Recorder(os.path.join(d, "r.zarr"), model, proj_dim=1024, optimizer=opt,
                                     chunk_rows=chunk_rows or None, **kw)
            for s in range(steps):
                with rec.step(sample_ids=range(s * b, (s + 1) * b)):
                    loss_fn(model).backward()
                opt.step()
                opt.zero_grad()
            C = rec._sink.chunk_rows
            rec.close()
    finally:
        _writer._write_bytes = orig
    return C, {n: v / steps / 1024 for n, v in written.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("cpu", "bytes"), default="cpu")
    ap.add_argument("--chunk-rows", nargs="+", type=int, default=[1030, 0], help="0: the writer's default")
    ap.add_argument("--k", type=int, default=1018)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--fisher", action="store_true")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    if args.mode == "bytes":
        for cr in args.chunk_rows:
            C, kib = recorded_bytes(cr, args.steps, args.fisher)
            top = ", ".join(f"{n} {v:.1f}" for n, v in list(kib.items())[:4])
            print(f"chunk_rows {C}{' (default)' if not cr else ''}: {sum(kib.values()):.1f} KiB written per step ({top}, ...)")
    else:
        res: dict[int, list[float]] = {cr: [] for cr in args.chunk_rows}
        for i in range(args.reps):
            for cr in args.chunk_rows if i % 2 == 0 else args.chunk_rows[::-1]:
                res[cr].append(writer_cpu(args.k, args.batch, cr, args.steps, args.fisher))
        for cr, v in res.items():
            C = cr or _writer.default_chunk_rows(args.k)
            print(f"chunk_rows {C}{' (default)' if not cr else ''}{' + fisher rows' if args.fisher else ''}: writer CPU "
                  f"{statistics.median(v):.2f} ms/step (median; runs {' '.join(f'{x:.2f}' for x in v)})")
    print(f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
