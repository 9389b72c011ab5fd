"""TracIn over a run with param groups of different learning rates: every column is weighted by
its own group's lr (exact while the groups keep fixed ratios), else the query is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datavalue
from datavalue.errors import QueryError
from datavalue.query import Attributor
from datavalue.store import open_run


def _run(path, lambdas):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    named = list(model.named_parameters())
    opt = torch.optim.SGD([{"params": [p for n, p in named if not n.endswith("bias")], "lr": 0.1},
                           {"params": [p for n, p in named if n.endswith("bias")], "lr": 0.05}], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    gen = torch.Generator().manual_seed(1)
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt) as rec:
        for t in range(3):
            x = torch.randn(4, 4, dtype=torch.float64, generator=gen)
            y = torch.randint(0, 2, (4,), generator=gen)
            opt.zero_grad()
            with rec.step(sample_ids=np.arange(4) + 4 * t):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return open_run(path)


def test_tracin_weights_each_column_by_its_groups_lr(tmp_path):
    run = _run(tmp_path / "r.zarr", [lambda t: 0.5**t, lambda t: 0.5**t])  # one schedule: fixed ratio
    q = np.random.default_rng(0).normal(size=(2, run.proj_dim))
    got = Attributor(run.path, kind="tracin", progress=False).scores(q)
    labels = np.empty(run.proj_dim, dtype=int)
    for a, b, g in run.column_groups["column_groups"]:
        labels[a:b] = g
    G = np.asarray(run.grads)
    lr_cols = run.param_groups["lr"][run.row_step][:, labels]  # (R, k) every row's lr per column
    rs = (run.grad_scale[run.row_step] * run.weight)[:, None]
    want = ((G * lr_cols) * rs) @ q.T
    got = np.asarray(got).T  # scores are (m, R)
    np.testing.assert_allclose(got, want, rtol=1e-5)  # float32 storage
    old = ((G * run.lr[run.row_step][:, None]) * rs) @ q.T  # group 0's lr everywhere (before)
    assert np.abs(old - want).max() > 1e-3 * np.abs(want).max()


def test_tracin_refuses_groups_whose_lr_ratio_changes(tmp_path):
    run = _run(tmp_path / "r.zarr", [lambda t: 0.5**t, lambda t: 1.0])
    q = np.ones((1, run.proj_dim))
    with pytest.raises(QueryError, match="fixed ratios"):
        Attributor(run.path, kind="tracin", progress=False).scores(q)
