"""Fifth probe (issue 22): inputs, queries and output paths.

Each test failed before its fix (docs/errors.md, "Fifth probe: inputs, queries and outputs"): an
aborted ``FinalPass`` was used as a whole pass (P5-15); a ``DataParallel`` / ``torch.compile`` model
was recorded under ``module.`` / ``_orig_mod.`` names no model could query (P5-22); float16
storage kept overflowing gradients as unflagged inf and underflowing rows as zeros (P5-23);
``archive`` / a ledger / a utility cache wrote into another datavalue run (P5-07); a query with a
model far from the final weights said nothing (P5-16); ``curvature="fisher"`` on a one-output model
recorded zero rows (P5-20); a numpy ``lr``, bool/fractional tokens and a float ``proj_dim`` were
raw errors or converted (P5-17); BatchNorm in training mode failed in torch.func internals (P5-24);
``save_parquet(S, by="sample")`` labelled occurrence scores as samples' (P5-06);
``datavalue info RUN/grads`` answered with zarr internals (P5-14); a huge ledger value broke every
average-then-share statement with a message about non-finite values (P5-01).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue import errors as E
from datavalue.capture import FinalPass
from datavalue.embeddings import build_influence
from datavalue.store import open_run

X = torch.randn(24, 4, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(1))


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _record(path: Path, model: torch.nn.Module | None = None, steps: int = 4, **kw) -> torch.nn.Module:
    model = _model() if model is None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw.setdefault("proj_dim", None)
    with datavalue.Recorder(path, model, optimizer=opt, **kw) as rec:
        for t in range(steps):
            ids = np.arange(6 * t, 6 * t + 6)
            with rec.step(sample_ids=ids):
                F.cross_entropy(model(X[ids]), Y[ids]).backward()
            opt.step()
            opt.zero_grad()
    return getattr(model, "module", model)


def _loss(m: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(m(X[:3]), Y[:3], reduction="none")


# ---------------------------------------------------------------- P5-15: an aborted FinalPass
def test_p5_15_aborted_final_pass_is_refused(tmp_path):
    run = tmp_path / "r.zarr"
    model = _record(run)
    with pytest.raises(RuntimeError, match="loader failed"), FinalPass(run, model) as fp:
        for t in range(4):
            if t == 2:
                raise RuntimeError("data loader failed")
            ids = np.arange(6 * t, 6 * t + 6)
            with fp.batch(ids):
                F.cross_entropy(model(X[ids]), Y[ids]).backward()
    assert open_run(run / "final").n_rows == 12  # what was recorded is kept
    with pytest.raises(E.EmbeddingError, match="unfinished final-weights pass.*loader failed.*overwrite=True"):
        build_influence(run, progress=False)
    with pytest.raises(E.QueryError, match="unfinished final-weights pass"):
        datavalue.Attributor(run, model, kind="influence", progress=False)


def test_p5_15_whole_pass_builds_and_a_subset_is_reported(tmp_path, caplog):
    run = tmp_path / "r.zarr"
    model = _record(run)
    with FinalPass(run, model) as fp:  # half of the training samples: allowed, but reported
        for t in range(2):
            ids = np.arange(6 * t, 6 * t + 6)
            with fp.batch(ids):
                F.cross_entropy(model(X[ids]), Y[ids]).backward()
    assert open_run(run / "final").manifest["integration"]["complete"] is True
    with caplog.at_level(logging.WARNING, logger="datavalue"):
        build_influence(run, progress=False)
    assert "covers 12 of the 24 distinct samples" in caplog.text
    S = datavalue.Attributor(run, model, kind="influence", progress=False).scores(_loss)
    assert S.shape == (3, 12)


def test_p5_15_pass_closed_without_with_is_complete(tmp_path):
    run = tmp_path / "r.zarr"
    model = _record(run)
    fp = FinalPass(run, model)
    with fp.batch(np.arange(24)):
        F.cross_entropy(model(X), Y).backward()
    fp.close()
    build_influence(run, progress=False)
