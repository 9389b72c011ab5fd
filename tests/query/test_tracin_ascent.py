"""TracIn on a run trained with ``maximize=True`` (gradient ascent) takes the other sign (noticed while
fixing the fifth probe's P5-09: the SGD build models ascent, TracIn still scored it as descent)."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import datavalue


def _one_step_run(path, maximize: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    start = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, maximize=maximize)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt) as rec:
        opt.zero_grad()
        with rec.step(sample_ids=[0, 1, 2, 3]):
            F.cross_entropy(model(x), y).backward()
        opt.step()
    return start


def test_tracin_of_an_ascent_step_is_the_descent_steps_negated(tmp_path):
    start = _one_step_run(tmp_path / "descent.zarr", maximize=False)
    _one_step_run(tmp_path / "ascent.zarr", maximize=True)  # same weights and batch at its only step: same rows
    xt, yt = torch.randn(3, 5, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2])

    def q(m):
        return F.cross_entropy(m(xt), yt, reduction="none")

    d = datavalue.Attributor(tmp_path / "descent.zarr", start, kind="tracin", progress=False).scores(q)
    a = datavalue.Attributor(tmp_path / "ascent.zarr", start, kind="tracin", progress=False).scores(q)
    assert np.abs(d).max() > 1e-4  # not a vacuous comparison
    np.testing.assert_allclose(a, -d, rtol=1e-6, atol=1e-9)  # was: a == d (ascent scored as descent)
