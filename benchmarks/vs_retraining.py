"""Exact retraining versus one build plus queries: time per influence value.

    .venv/bin/python benchmarks/vs_retraining.py                 # MLP 784-128-10 on 4,096 real MNIST digits
    .venv/bin/python benchmarks/vs_retraining.py --n-train 512   # a quick check

One float64 SGD run (batch 64, 3 epochs) of an MLP on real MNIST, recorded by ``datavalue.Recorder``
(proj_dim 1024, ``curvature="fisher"``). Then:

* **exact:** ``datavalue.testing.trajectory_loo`` for ``--n-loo`` random single occurrences (each
  replays the tail of training from the snapshot before its step, about T/2 steps on average);
* **estimate:** ``datavalue.build_embeddings`` (one backward pass over the trajectory, all
  occurrences) plus ``Attributor.scores`` for the same test points (all occurrences).

Reports seconds per exact value, seconds for the build and the query, the break-even number of
values, and the Spearman of the estimate with the exact values (a sanity check, not the fidelity
study; that is experiments/loo_fidelity). Appends a row to docs/results/performance.md's
"Against exact retraining" table when ``--write`` is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import datavalue
from datavalue.data import load_mnist
from datavalue.testing import Batch, spearman_per_test, train_reference, trajectory_loo

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=4096)
    ap.add_argument("--n-test", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--proj-dim", type=int, default=1024)
    ap.add_argument("--n-loo", type=int, default=20)
    ap.add_argument("--write", action="store_true", help="append the result to docs/results/performance.md")
    a = ap.parse_args()
    torch.manual_seed(0)
    xtr, ytr = load_mnist("train", a.n_train, seed=0)
    xte, yte = load_mnist("test", a.n_test, seed=1)
    X, Y = torch.tensor(xtr, dtype=torch.float64), torch.tensor(ytr)
    Xt, Yt = torch.tensor(xte, dtype=torch.float64), torch.tensor(yte)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(a.epochs):
        perm = rng.permutation(a.n_train)
        for i in range(0, a.n_train, a.batch):
            idx = np.sort(perm[i : i + a.batch])
            batches.append(Batch(idx, X[idx], Y[idx]))
    T = len(batches)

    def factory() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(784, a.hidden), nn.Tanh(), nn.Linear(a.hidden, 10)).double()

    def ce(m, x, y):
        return F.cross_entropy(m(x), y, reduction="none")

    test_loss = lambda m: ce(m, Xt, Yt)  # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="vs_retraining_"))
    try:
        path = tmp / "run.zarr"
        model = factory()
        opt = torch.optim.SGD(model.parameters(), lr=a.lr)
        t0 = time.perf_counter()
        with datavalue.Recorder(path, model, proj_dim=a.proj_dim, optimizer=opt, curvature="fisher") as rec:
            ref = train_reference(factory, batches, np.full(T, a.lr), ce, model=model, optimizer=opt, verify=False,
                                  step_context=lambda t, b, lr: rec.step(sample_ids=b.sample_ids, lr=lr))
        t_train_record = time.perf_counter() - t0
        steps, ids = ref.occurrences()
        pick = np.sort(np.random.default_rng(2).choice(steps.size, a.n_loo, replace=False))
        t0 = time.perf_counter()
        truth = trajectory_loo(ref, list(zip(steps[pick].tolist(), ids[pick].tolist())), test_loss)
        t_loo = time.perf_counter() - t0
        t0 = time.perf_counter()
        info = datavalue.build_embeddings(path, "fisher", progress=False)
        t_build = time.perf_counter() - t0
        final = ref.final_model()
        t0 = time.perf_counter()
        attr = datavalue.Attributor(path, final, curvature="fisher", progress=False)
        S = attr.scores(test_loss)  # (m, R): test gradients at the final weights, then one pass over the embeddings
        t_query = time.perf_counter() - t0
        rho = spearman_per_test(np.asarray(S).T[pick], truth)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    R = steps.size
    per_loo = t_loo / a.n_loo
    est_total = t_build + t_query
    line = (f"| MLP 784-{a.hidden}-10, {a.n_train} MNIST, {T} steps, {R:,} occurrences, {a.n_test} test points | "
            f"{t_train_record:.1f} s | {per_loo:.2f} s ({a.n_loo} values) | {per_loo * R / 3600:.1f} h | "
            f"{t_build:.1f} s + {t_query:.1f} s | {est_total / per_loo:.0f} | {rho:.3f} |")
    print(f"operator blocks: {len(info.blocks)}")
    print(line)
    if a.write:
        with open(ROOT / "docs/results/performance.md", "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
