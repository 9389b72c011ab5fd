"""Eighth probe (session 12): resuming an Adam run with the optimizer state of another step (P8-10).

A resumed run whose optimizer holds no state was refused (P5-12); one whose state was loaded from an
older checkpoint than the weights (step count 2 where the run's last update left 4) was accepted: the
run then models moments and bias corrections the training never used.
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.errors import RecorderError
from datavalue.store import open_run
from tests._helpers_tiny_run import X, Y, tiny_mlp


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("p8_adam") / "r.zarr"
    m = tiny_mlp()
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    snaps = {}
    with datavalue.Recorder(path, m, optimizer=opt, proj_dim=None) as rec:
        for t in range(4):
            ids = np.arange(6 * t, 6 * t + 6)
            with rec.step(sample_ids=ids):
                F.cross_entropy(m(X[ids]), Y[ids]).backward()
            opt.step()
            opt.zero_grad()
            snaps[t + 1] = (copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict()))
    return path, snaps


def _resume(src, dst, weights, state):
    shutil.copytree(src, dst)
    m = tiny_mlp()
    m.load_state_dict(weights)
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    opt.load_state_dict(copy.deepcopy(state))
    with datavalue.Recorder(dst, m, optimizer=opt, proj_dim=None, resume=True) as rec:
        with rec.step(sample_ids=np.arange(6)):
            F.cross_entropy(m(X[:6]), Y[:6]).backward()
        opt.step()
        opt.zero_grad()


def test_p8_10_an_adam_state_from_an_older_checkpoint_is_refused(adam_run, tmp_path):
    path, snaps = adam_run
    with pytest.raises(RecorderError, match=r"Adam step count\(s\) \[2\].*left the count 4"):
        _resume(path, tmp_path / "r.zarr", snaps[4][0], snaps[2][1])
    assert open_run(tmp_path / "r.zarr").n_steps == 4  # the refused step was not written


def test_p8_10_the_matching_state_resumes(adam_run, tmp_path):
    path, snaps = adam_run
    _resume(path, tmp_path / "r.zarr", *snaps[4])
    assert open_run(tmp_path / "r.zarr").n_steps == 5
