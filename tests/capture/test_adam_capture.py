"""The Recorder stores the Adam/AdamW moments each step needs (adam_m, adam_v, adam_step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import datavalue
from datavalue.capture._gradients import exact_layout
from datavalue.errors import RecorderError
from datavalue.store import open_run


def _train(path, opt_cls, steps=4, **rec_kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = opt_cls(model.parameters(), lr=0.01, weight_decay=0.01)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    states = []
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, storage_dtype="float64", **rec_kw) as rec:
        for _ in range(steps):
            with rec.step(sample_ids=range(6)):
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            named = dict(model.named_parameters())
            states.append({n: (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
                           for n, p in named.items() if "exp_avg" in opt.state[p]})
    return model, rec, states


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.Adam])
def test_moments_before_each_step_in_exact_layout(tmp_path, opt_cls):
    model, rec, states = _train(tmp_path / "r.zarr", opt_cls)
    run = open_run(tmp_path / "r.zarr")
    assert run.has_adam_state and run.adam_first_step() == 0
    np.testing.assert_array_equal(run.adam_step, [1, 2, 3, 4])
    m, v = run.read("adam_m"), run.read("adam_v")
    assert m.shape == (4, run.proj_dim) and not m[0].any() and not v[0].any()  # zeros before step 0
    for t in range(1, 4):  # stored at t: the state after step t - 1
        want_m = exact_layout({n: s[0] for n, s in states[t - 1].items()}, run.blocks)
        want_v = exact_layout({n: s[1] for n, s in states[t - 1].items()}, run.blocks)
        np.testing.assert_array_equal(m[t], want_m)
        np.testing.assert_array_equal(v[t], want_v)
    if opt_cls is torch.optim.AdamW:  # the m-difference is the batch gradient, summed from the rows
        b1 = 0.9
        G, w = run.read("grads"), run.weight
        for t in range(3):
            r0, r1 = run.step_ptr[t], run.step_ptr[t + 1]
            np.testing.assert_allclose((m[t + 1] - b1 * m[t]) / (1 - b1), w[r0:r1] @ G[r0:r1], rtol=1e-9, atol=1e-12)


def test_sgd_runs_store_no_moments_and_flag_checks(tmp_path):
    _train(tmp_path / "s.zarr", torch.optim.SGD)
    assert not open_run(tmp_path / "s.zarr").has_adam_state
    _train(tmp_path / "a.zarr", torch.optim.AdamW, record_optimizer_state=False)
    assert not open_run(tmp_path / "a.zarr").has_adam_state
    with pytest.raises(RecorderError, match="record_optimizer_state"):
        _train(tmp_path / "x.zarr", torch.optim.SGD, record_optimizer_state=True)
