"""Ninth probe leftovers (session 13): the Adam moments of a bfloat16/float16 model (P9-15)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datavalue.capture._engine import Engine
from datavalue.capture._gradients import block_matrix
from datavalue.capture._optim import adam_moments


def _float64_block_means(opt, model, engine, f=lambda t: t):
    """Each projected block's mean of ``f(moment)``, its entries summed in float64 (the reference)."""
    params = dict(model.named_parameters())
    out = {}
    for key, name in (("exp_avg", "adam_m"), ("exp_avg_sq", "adam_v")):
        named = {n: f(opt.state[p][key].detach()) if key in opt.state.get(p, {}) else torch.zeros_like(p)
                 for n, p in params.items()}
        out[name] = np.concatenate([np.full(b.k, float(block_matrix(b.to_json(), named).to(torch.float64).mean()))
                                    for b in engine.blocks])
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_p9_15_half_precision_moments_are_summed_in_at_least_float32(dtype):
    """Was: ``precise=False`` (what float32 storage uses) summed each parameter's moments in bfloat16/float16,
    0.3-0.4% off the float64 sums; now within 1e-6 (float32 sums): relative for ``adam_v`` (positive), of the
    block's mean ``|m|`` for ``adam_m`` (its signs cancel in the mean)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 512), nn.Tanh(), nn.Linear(512, 5)).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-3)
    x, y = torch.randn(16, 1024, dtype=dtype), torch.randint(0, 5, (16,))
    eng = Engine(model, proj_dim=24, seed=0)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
    got, ref = adam_moments(opt, model, eng, precise=False), _float64_block_means(opt, model, eng)
    scale = _float64_block_means(opt, model, eng, torch.abs)
    for key in ("adam_m", "adam_v"):
        assert (scale[key] > 0).all()
        rel = np.abs(got[key] - ref[key]) / scale[key]
        assert rel.max() <= 1e-6, (key, rel.max())


def test_p9_16_weights_an_update_made_non_finite_are_not_called_changed(tmp_path, caplog):
    """Was: a float16 model whose Adam update (eps=1e-8 rounds to 0 in float16) made its weights NaN was told
    its weights "changed ... (weight clipping, an EMA copied back ...)"; now a NonFiniteError that says the
    update overflowed, with the float16 fixes."""
    import datavalue
    from datavalue.errors import NonFiniteError, RecorderStateError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).half()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 8).half(), torch.randint(0, 3, (4,))
    rec = datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=4, optimizer=opt)
    with pytest.raises(NonFiniteError, match=r"hold NaN or inf after the last optimizer\.step\(\).*eps >= 1e-4") as e:
        for s in range(3):
            with rec.step(range(4 * s, 4 * s + 4)):
                opt.zero_grad()
                F.cross_entropy(model(x).float(), y).backward()
            opt.step()
    assert not isinstance(e.value, RecorderStateError) and "weight clipping" not in str(e.value)
    assert not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with caplog.at_level(logging.WARNING, logger="datavalue"):
        rec.close()
    assert datavalue.open_run(tmp_path / "r.zarr").n_steps == 1
    # the close-time warning says the same (was: "changed after the last optimizer.step() (weight clipping ...)")
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "hold NaN or inf at close" in said and "weight clipping" not in said
