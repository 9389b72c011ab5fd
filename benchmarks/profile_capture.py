"""Profile the recorded training step (cProfile), split into training-thread and writer costs.

Run: ``.venv/bin/python benchmarks/profile_capture.py [--device cuda]``; prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import capture_overhead as co  # noqa: E402

import datavalue  # noqa: E402
from datavalue.store import _writer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--background", type=int, default=1)
    args = ap.parse_args()
    co.DEVICE = args.device
    name, model, loss_fn, b = co.mlp_case()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    stats = {"t": 0.0, "n": 0}
    orig = _writer.RunWriter._write

    def timed(self, blocks):
        t = time.perf_counter()
        orig(self, blocks)
        stats["t"] += time.perf_counter() - t
        stats["n"] += 1

    _writer.RunWriter._write = timed
    with tempfile.TemporaryDirectory() as d:
        rec = datavalue.Recorder(os.path.join(d, "r.zarr"), model, proj_dim=1024, optimizer=opt,
                                 background=bool(args.background))

        def go(n, start):
            for s in range(start, start + n):
                with rec.step(sample_ids=range(s * b, (s + 1) * b)):
                    loss_fn(model).backward()
                opt.step()
                opt.zero_grad()
            rec.flush()
            co._sync()

        go(10, 0)
        stats.update(t=0.0, n=0)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        go(args.steps, 10)
        prof.disable()
        total = time.perf_counter() - t0
        rec.close()
    print(f"{args.steps} recorded steps: {total / args.steps * 1e3:.2f} ms/step; writer: {stats['n']} writes, "
          f"{stats['t'] / max(stats['n'], 1) * 1e3:.1f} ms each, {stats['t'] / args.steps * 1e3:.2f} ms/step")
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
