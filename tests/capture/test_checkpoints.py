"""Recorder(checkpoint_every=N): weights and the whole optimizer state in the run, read back bit for bit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datavalue
from datavalue.capture import CaptureConfig, checkpoint_steps, read_checkpoint
from datavalue.errors import RecorderError, StoreNotFoundError
from tests.capture.models import mlp


class WithBuffer(nn.Module):
    """An MLP with a bfloat16 buffer (a dtype numpy lacks) and a frozen parameter."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("table", torch.randn(4, 2).to(torch.bfloat16))

    def forward(self, x):
        return self.net(x)


def _optimizer(kind, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    if kind == "sgd_plain":
        return torch.optim.SGD(params, lr=0.1)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    return torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0, "lr": 3e-3}], lr=1e-2)


@pytest.mark.parametrize("kind", ["sgd", "sgd_plain", "adam", "adamw_groups"])
def test_checkpoints_round_trip_bit_for_bit(kind, tmp_path):
    torch.manual_seed(0)
    model = WithBuffer()
    opt = _optimizer(kind, model)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    path = tmp_path / "run.zarr"
    seen = {}
    name_of = {id(p): n for n, p in model.named_parameters()}
    with datavalue.Recorder(path, model, proj_dim=8, optimizer=opt, checkpoint_every=2) as rec:
        for t in range(5):
            seen[t] = (copy.deepcopy(dict(model.named_parameters()) | dict(model.named_buffers())),
                       {name_of[id(p)]: copy.deepcopy(s) for p, s in opt.state.items()})
            with rec.step(sample_ids=range(8)):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                model.table.add_(1)  # buffers change too
    seen[5] = (copy.deepcopy(dict(model.named_parameters()) | dict(model.named_buffers())),
               {name_of[id(p)]: copy.deepcopy(s) for p, s in opt.state.items()})
    assert checkpoint_steps(path) == [0, 2, 4, 5]
    for step in (0, 2, 4, 5):
        ck = read_checkpoint(path, step)
        weights, state = seen[step]
        assert ck.step == step and set(ck.model) == set(weights)
        for name, t in weights.items():
            got = ck.model[name]
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(torch.int16) if got.dtype == torch.bfloat16 else got,
                               (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).detach()), (step, name)
        assert set(ck.state) == set(state)
        for pname, st in state.items():
            for key, v in st.items():
                if torch.is_tensor(v):
                    assert torch.equal(ck.state[pname][key], v) and ck.state[pname][key].dtype == v.dtype, (step, key)
        assert ck.optimizer == type(opt).__name__
        assert [g["params"] for g in ck.groups] == [[name_of[id(p)] for p in g["params"]] for g in opt.param_groups]
        assert [g["lr"] for g in ck.groups] == [g["lr"] for g in opt.param_groups]
    if kind == "adam":
        assert set(read_checkpoint(path, 2).state["net.0.weight"]) == {"step", "exp_avg", "exp_avg_sq"}


def test_load_into_resumes_training_identically(tmp_path):
    """A checkpoint loaded into a fresh model and optimizer continues exactly like the original."""
    torch.manual_seed(0)
    model = mlp().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    path = tmp_path / "run.zarr"
    with datavalue.Recorder(path, model, proj_dim=8, optimizer=opt, checkpoint_every=3) as rec:
        for _ in range(4):
            with rec.step(sample_ids=range(8)):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    fresh = mlp().double()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    read_checkpoint(path, 3).load_into(fresh, fresh_opt)
    # one more step from checkpoint 3 reproduces checkpoint 4 (the final weights)
    F.cross_entropy(fresh(x), y).backward()
    fresh_opt.step()
    for n, p in fresh.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[n])


def test_checkpoint_options_are_validated(tmp_path):
    with pytest.raises(RecorderError, match="optimizer"):
        datavalue.Recorder(tmp_path / "a.zarr", nn.Linear(2, 2), proj_dim=None, checkpoint_every=2)
    with pytest.raises(RecorderError, match="checkpoint_every"):
        CaptureConfig(checkpoint_every=0)
    cfg = CaptureConfig(checkpoint_every=5)
    assert CaptureConfig.from_manifest({"capture_config": cfg.to_json()}) == cfg
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(tmp_path / "b.zarr", model, proj_dim=None, optimizer=opt) as rec:
        with rec.step(sample_ids=[0, 1]):
            model(torch.randn(2, 2)).sum().backward()
        opt.step()
    assert checkpoint_steps(tmp_path / "b.zarr") == []
    with pytest.raises(StoreNotFoundError, match="checkpoint_every"):
        read_checkpoint(tmp_path / "b.zarr", 0)


def test_incomplete_checkpoint_is_ignored(tmp_path):
    """A checkpoint whose marker was never written (a crash while writing) is not listed."""
    from datavalue.store import delete_path

    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, checkpoint_every=1) as rec:
        for _ in range(2):
            with rec.step(sample_ids=[0, 1]):
                model(torch.randn(2, 2)).sum().backward()
            opt.step()
            opt.zero_grad()
    delete_path(path, "checkpoints/1/meta")
    assert checkpoint_steps(path) == [0, 2]
    assert np.isfinite(read_checkpoint(path, 2).model["weight"].numpy()).all()


def test_module_doctest():
    import doctest

    from datavalue.capture import _checkpoint

    result = doctest.testmod(_checkpoint, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
