"""Bad input gets a typed, clear error; nothing already written is lost."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.errors import (
    NonFiniteError,
    RecorderError,
    RecorderStateError,
    UnsupportedModelError,
)
from datavalue.store import open_run


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    return model, x, y, tmp_path / "r.zarr"


def _good_step(rec, model, x, y, ids=range(6)):
    with rec.step(sample_ids=ids, lr=0.1):
        F.cross_entropy(model(x), y).backward()


def test_sample_ids_length_mismatch(setup):
    model, x, y, path = setup
    with datavalue.Recorder(path, model, proj_dim=None) as rec:
        with pytest.raises(RecorderError, match="sample_ids has 5"):
            with rec.step(sample_ids=range(5), lr=0.1):
                F.cross_entropy(model(x), y).backward()
        model.zero_grad()
        _good_step(rec, model, x, y)
    assert open_run(path).n_steps == 1


def test_duplicate_ids_and_bad_types(setup):
    model, x, y, path = setup
    with datavalue.Recorder(path, model, proj_dim=None) as rec:
        with pytest.raises(RecorderError, match="repeats ids \\[3\\]"):
            rec.step(sample_ids=[0, 1, 2, 3, 3, 4], lr=0.1).__enter__()
        with pytest.raises(RecorderError, match="integers"):
            rec.step(sample_ids=["a", "b"], lr=0.1).__enter__()
        with pytest.raises(RecorderError, match="no lr"):
            rec.step(sample_ids=[0]).__enter__()
    # tensor, numpy and list ids are all accepted
    with datavalue.Recorder(path, model, proj_dim=None, overwrite=True) as rec:
        for ids in (torch.arange(6), np.arange(6, 12), list(range(12, 18))):
            _good_step(rec, model, x, y, ids)
    assert open_run(path).sample_id.tolist() == list(range(18))


def test_step_without_backward(setup):
    model, x, y, path = setup
    with datavalue.Recorder(path, model, proj_dim=None) as rec:
        with pytest.raises(RecorderStateError, match="no backward"):
            with rec.step(sample_ids=range(6), lr=0.1):
                F.cross_entropy(model(x), y)
        _good_step(rec, model, x, y)
    assert open_run(path).n_steps == 1


def test_nested_steps_and_after_close(setup):
    model, x, y, path = setup
    rec = datavalue.Recorder(path, model, proj_dim=None)
    with pytest.raises(RecorderStateError, match="nested"):
        with rec.step(sample_ids=range(6), lr=0.1):
            with rec.step(sample_ids=range(6), lr=0.1):
                pass
    rec.close()
    with pytest.raises(RecorderStateError, match="closed"):
        with rec.step(sample_ids=range(6), lr=0.1):
            pass
    # a second open recorder on the same model is refused
    rec2 = datavalue.Recorder(path, model, proj_dim=None, overwrite=True)
    with pytest.raises(RecorderStateError, match="already has an open Recorder"):
        datavalue.Recorder(path.with_name("other.zarr"), model, proj_dim=None)
    rec2.close()


def test_model_without_trainable_parameters(setup):
    model, x, y, path = setup
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UnsupportedModelError, match="no trainable parameters"):
        datavalue.Recorder(path, model, proj_dim=None)


def test_nonfinite_raise_and_skip(setup):
    model, x, y, path = setup
    xbad = x.clone()
    xbad[2] = float("nan")
    with datavalue.Recorder(path, model, proj_dim=None) as rec:
        _good_step(rec, model, x, y)
        with pytest.raises(NonFiniteError, match="sample ids \\[2\\]"):
            with rec.step(sample_ids=range(6), lr=0.1):
                F.cross_entropy(model(xbad), y).backward()
    assert open_run(path).n_steps == 1  # the committed step survives, the bad one is not written
    model.zero_grad()
    with datavalue.Recorder(path, model, proj_dim=None, on_nonfinite="skip", overwrite=True) as rec:
        with rec.step(sample_ids=range(6), lr=0.1):
            F.cross_entropy(model(xbad), y).backward()
    run = open_run(path)
    assert run.flags.tolist() == [0, 0, 1, 0, 0, 0]
    g = run.grads.compute()
    assert np.all(g[2] == 0) and np.isfinite(g).all()


def test_bad_options(setup):
    model, x, y, path = setup
    with pytest.raises(RecorderError, match="loss_reduction"):
        datavalue.Recorder(path, model, loss_reduction="avg")
    with pytest.raises(RecorderError, match="curvature"):
        datavalue.Recorder(path, model, curvature="ggn")
    with pytest.raises(RecorderError, match="resume=True and overwrite=True"):
        datavalue.Recorder(path, model, resume=True, overwrite=True)
    with pytest.raises(RecorderError, match="layers="):
        datavalue.Recorder(path, model, layers=["nope"])
