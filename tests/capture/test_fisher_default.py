"""The default ``fisher_max_classes`` (issue 20): the exact class expectation on small models, sampled
labels above ``FISHER_EXACT_MAX_PARAMS`` trainable parameters; an explicit value and a resumed run's
own value win; the exact path's rows are those of an explicit ``fisher_max_classes=16``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.capture import CaptureConfig
from datavalue.capture._config import FISHER_EXACT_MAX_CLASSES, FISHER_EXACT_MAX_PARAMS
from datavalue.store import open_run

C = 4  # classes: at most FISHER_EXACT_MAX_CLASSES, so only the model's size decides


def _linear(n_params: int) -> torch.nn.Module:
    """A Linear layer with C outputs and exactly ``n_params`` trainable parameters (n_params % C == 0)."""
    assert n_params % C == 0
    torch.manual_seed(0)
    return torch.nn.Linear(n_params // C - 1, C)


def _record(path, model, steps=2, b=3, **kw) -> datavalue.Recorder:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    with datavalue.Recorder(path, model, proj_dim=16, optimizer=opt, curvature="fisher", storage_dtype="float64",
                            **kw) as rec:
        for s in range(steps):
            x = torch.randn(b, model.in_features, generator=g)
            y = torch.randint(0, C, (b,), generator=g)
            with rec.step(sample_ids=range(s * b, (s + 1) * b)):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return rec


def _fisher_rows(path) -> np.ndarray:
    return np.asarray(open_run(path).fisher.compute())


def test_boundary_of_the_default_rule(tmp_path):
    """At the threshold: exact (C rows per example); one parameter group above: sampled (1 row)."""
    assert C <= FISHER_EXACT_MAX_CLASSES
    small = _record(tmp_path / "small.zarr", _linear(FISHER_EXACT_MAX_PARAMS))
    large = _record(tmp_path / "large.zarr", _linear(FISHER_EXACT_MAX_PARAMS + C))
    assert small.fisher_max_classes == FISHER_EXACT_MAX_CLASSES
    assert large.fisher_max_classes == 1
    # what the run says it did: the manifest holds the resolved value, never None
    for path, want in ((tmp_path / "small.zarr", FISHER_EXACT_MAX_CLASSES), (tmp_path / "large.zarr", 1)):
        manifest = open_run(path).manifest
        assert manifest["capture_config"]["fisher_max_classes"] == want
        assert manifest["curvature"]["fisher"]["max_classes"] == want
    assert _fisher_rows(tmp_path / "small.zarr").shape[0] == 2 * 3 * C  # steps x b x classes
    assert _fisher_rows(tmp_path / "large.zarr").shape[0] == 2 * 3 * 1  # steps x b x 1 sampled label


def test_default_exact_path_equals_explicit(tmp_path):
    """Below the threshold the default records exactly what fisher_max_classes=16 records."""
    a = _rows_of(tmp_path / "a.zarr", None)
    b = _rows_of(tmp_path / "b.zarr", 16)
    np.testing.assert_array_equal(a, b)


def _rows_of(path, fmc) -> np.ndarray:
    _record(path, _linear(4 * 50), fisher_max_classes=fmc)
    return _fisher_rows(path)


def test_explicit_value_wins_on_a_large_model(tmp_path):
    rec = _record(tmp_path / "r.zarr", _linear(FISHER_EXACT_MAX_PARAMS + C), fisher_max_classes=16)
    assert rec.fisher_max_classes == 16
    assert _fisher_rows(tmp_path / "r.zarr").shape[0] == 2 * 3 * C


def test_resume_takes_the_runs_own_value(tmp_path):
    """A large model's run recorded exact (explicit 16, or any run written before this default)
    resumes with the default and stays exact; an explicit other value is refused."""
    path = tmp_path / "r.zarr"
    model = _linear(FISHER_EXACT_MAX_PARAMS + C)
    _record(path, model, fisher_max_classes=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(path, model, proj_dim=16, optimizer=opt, curvature="fisher", storage_dtype="float64",
                            resume=True) as rec:
        assert rec.fisher_max_classes == 16
        assert rec.config.fisher_max_classes == 16
    with pytest.raises(datavalue.errors.StoreMismatchError, match="fisher_max_classes"):
        datavalue.Recorder(path, model, proj_dim=16, optimizer=opt, curvature="fisher", storage_dtype="float64",
                           resume=True, fisher_max_classes=1)


def test_config_rule():
    cfg = CaptureConfig(curvature="fisher")
    assert cfg.fisher_max_classes is None
    assert cfg.resolved_fisher_max_classes(FISHER_EXACT_MAX_PARAMS) == FISHER_EXACT_MAX_CLASSES
    assert cfg.resolved_fisher_max_classes(FISHER_EXACT_MAX_PARAMS + 1) == 1
    assert cfg.resolved_fisher_max_classes(10**9, recorded=16) == 16
    assert CaptureConfig(fisher_max_classes=3).resolved_fisher_max_classes(10**9, recorded=16) == 3
    with pytest.raises(datavalue.errors.RecorderError, match="fisher_max_classes"):
        CaptureConfig(fisher_max_classes=0)
