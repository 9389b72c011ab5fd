"""A build whose recursion state cannot fit in the available memory is refused before it starts, with the
numbers and what to change; the estimate matches the state the scan holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.embeddings import _build
from datavalue.embeddings._plan import _make_plan
from datavalue.errors import EmbeddingError
from datavalue.store import open_run


def _run(tmp_path, adam: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2) if adam else torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    path = tmp_path / f"r{int(adam)}.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt) as rec:
        for _ in range(3):
            with rec.step(sample_ids=range(16)):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return path


@pytest.mark.parametrize("adam", [False, True])
def test_state_estimate_counts_the_scan_state(tmp_path, adam):
    path = _run(tmp_path, adam)
    run = open_run(path)
    plan, _ = _make_plan(run, "empirical_fisher", "float64", None, 1e6, "direction", None, True, "layer")
    k2 = sum((b - a) ** 2 for a, b in plan.blocks)
    parts = 3 if adam else 1  # Adam exact: M, R_m, R_v; plain SGD: M
    assert _build.state_bytes(plan) == k2 * parts * 8


def test_build_refused_when_the_state_cannot_fit(tmp_path, monkeypatch):
    path = _run(tmp_path, True)
    monkeypatch.setattr(_build, "available_memory", lambda: 1000)
    with pytest.raises(EmbeddingError, match=r"available.*smaller proj_dim.*DATAVALUE_MEMORY_CHECK=0"):
        datavalue.build_embeddings(path, progress=False)
    assert not open_run(path).has_array("embeddings/empirical_fisher/values")  # nothing written
    monkeypatch.setenv("DATAVALUE_MEMORY_CHECK", "0")
    info = datavalue.build_embeddings(path, progress=False)
    assert np.isfinite(np.asarray(open_run(path).array(info.array)[:])).all()
