"""Eighth probe's leftovers (issue 22, session 13): the optimizer state bound to the run, and a refused
resume that leaves nothing behind.

* An Adam state whose moments were edited, or taken from another run's checkpoint, with the right step
  count was accepted on resume (only the count was checked, P8-10): every flush now stores a digest of the
  optimizer's state with the weights' (``weights_digest/``), and a resume checks it before its first block.
* A refused resume (other weights, another state) left the recorder open: at the interpreter's exit its hook
  committed nothing and warned ``Recorder(...) was never closed``; its writer lock and the model stayed taken,
  so a corrected ``Recorder(..., resume=True)`` in the same process was refused too.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.errors import RecorderError, StoreMismatchError
from datavalue.store import open_run
from tests._helpers_tiny_run import X, Y, tiny_mlp

ROOT = Path(__file__).resolve().parents[2]


def _record(path, *, seed=0, steps=3, flush_each=False, momentum=None):
    m = tiny_mlp(seed)
    opt = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=momentum) if momentum
           else torch.optim.Adam(m.parameters(), lr=0.01))
    snaps = {}
    with datavalue.Recorder(path, m, optimizer=opt, proj_dim=None) as rec:
        for t in range(steps):
            ids = np.arange(6 * t, 6 * t + 6)
            with rec.step(sample_ids=ids):
                F.cross_entropy(m(X[ids]), Y[ids]).backward()
            opt.step()
            opt.zero_grad()
            if flush_each:
                rec.flush()
            snaps[t + 1] = (copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict()))
    return snaps


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("p8left_adam") / "r.zarr"
    return path, _record(path)


def _resume(src, dst, weights, state, *, sgd=False):
    shutil.copytree(src, dst)
    m = tiny_mlp()
    m.load_state_dict(weights)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) if sgd else torch.optim.Adam(m.parameters(), lr=0.01)
    opt.load_state_dict(copy.deepcopy(state))
    with datavalue.Recorder(dst, m, optimizer=opt, proj_dim=None, resume=True) as rec:
        with rec.step(sample_ids=np.arange(6)):
            F.cross_entropy(m(X[:6]), Y[:6]).backward()
        opt.step()
        opt.zero_grad()


def _edited(state, key="exp_avg", factor=1.5):
    st = copy.deepcopy(state)
    first = next(iter(st["state"].values()))
    first[key].mul_(factor)
    return st


def test_p8left_edited_adam_moments_with_the_right_step_count_are_refused(adam_run, tmp_path):
    path, snaps = adam_run
    with pytest.raises(StoreMismatchError, match=r"optimizer's state is not the one the run's training held after its "
                       r"3 steps \(1 of its entries differ: \['0\.weight/exp_avg'\].*Recorder was closed"):
        _resume(path, tmp_path / "r.zarr", snaps[3][0], _edited(snaps[3][1]))
    assert open_run(tmp_path / "r.zarr").n_steps == 3  # nothing appended


def test_p8left_edited_second_moments_are_refused(adam_run, tmp_path):
    path, snaps = adam_run
    with pytest.raises(StoreMismatchError, match=r"0\.weight/exp_avg_sq"):
        _resume(path, tmp_path / "r.zarr", snaps[3][0], _edited(snaps[3][1], "exp_avg_sq", 1.01))


def test_p8left_another_runs_state_with_the_same_step_count_is_refused(adam_run, tmp_path):
    path, snaps = adam_run
    other = _record(tmp_path / "other.zarr", seed=1)  # same model shape, same 3 steps, other moments
    with pytest.raises(StoreMismatchError, match=r"optimizer's state is not the one.*restored from another run"):
        _resume(path, tmp_path / "r.zarr", snaps[3][0], other[3][1])


def test_p8left_an_edited_momentum_buffer_is_refused(tmp_path):
    snaps = _record(tmp_path / "sgd.zarr", momentum=0.9)
    st = copy.deepcopy(snaps[3][1])
    next(iter(st["state"].values()))["momentum_buffer"].add_(0.01)
    with pytest.raises(StoreMismatchError, match=r"momentum_buffer"):
        _resume(tmp_path / "sgd.zarr", tmp_path / "r.zarr", snaps[3][0], st, sgd=True)


def test_p8left_the_recorded_state_resumes_and_each_flush_records_it(adam_run, tmp_path):
    path, snaps = adam_run
    _resume(path, tmp_path / "r.zarr", *snaps[3])
    assert open_run(tmp_path / "r.zarr").n_steps == 4
    doc = json.loads((tmp_path / "r.zarr" / "weights_digest" / "zarr.json").read_text())
    hist = doc["attributes"]["datavalue_weights"]["history"]
    assert [h["steps"] for h in hist] == [3, 4]
    assert all("0.weight/exp_avg" in h["optimizer"] and "0.weight/step" in h["optimizer"] for h in hist)


def test_p8left_the_older_count_is_still_named_by_the_first_update(adam_run, tmp_path):
    """A state from an older checkpoint differs in its moments and its count: the count's message (P8-10) names it."""
    path, snaps = adam_run
    with pytest.raises(RecorderError, match=r"Adam step count\(s\) \[2\].*left the count 3.*Recorder was closed"):
        _resume(path, tmp_path / "r.zarr", snaps[3][0], snaps[2][1])


def test_p8left_a_run_flushed_before_the_state_digests_resumes_unchecked(adam_run, tmp_path):
    """Runs written before the optimizer digest (entries without "optimizer") resume as before."""
    path, snaps = adam_run
    dst = tmp_path / "old.zarr"
    shutil.copytree(path, dst)
    meta = dst / "weights_digest" / "zarr.json"
    doc = json.loads(meta.read_text())
    for h in doc["attributes"]["datavalue_weights"]["history"]:
        h.pop("optimizer")
    meta.write_text(json.dumps(doc))
    _resume(dst, tmp_path / "r.zarr", snaps[3][0], _edited(snaps[3][1]))
    assert open_run(tmp_path / "r.zarr").n_steps == 4


def test_p8left_a_refused_resume_frees_the_run_and_the_model(adam_run, tmp_path):
    """After a refusal the same process fixes the state and resumes with the same model: the refused recorder
    released the run's lock and the model (before, both stayed taken until the interpreter exited)."""
    path, snaps = adam_run
    dst = tmp_path / "r.zarr"
    shutil.copytree(path, dst)
    m = tiny_mlp()
    m.load_state_dict(snaps[3][0])
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    opt.load_state_dict(_edited(snaps[3][1]))
    rec = datavalue.Recorder(dst, m, optimizer=opt, proj_dim=None, resume=True)
    with pytest.raises(StoreMismatchError), rec.step(sample_ids=np.arange(6)):
        pass
    assert rec.closed
    opt.load_state_dict(copy.deepcopy(snaps[3][1]))
    with datavalue.Recorder(dst, m, optimizer=opt, proj_dim=None, resume=True) as rec2:
        with rec2.step(sample_ids=np.arange(6)):
            F.cross_entropy(m(X[:6]), Y[:6]).backward()
        opt.step()
    assert open_run(dst).n_steps == 4


_SCRIPT = r"""
import copy, sys, numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
import datavalue
from datavalue.errors import DataValueError
from tests._helpers_tiny_run import X, Y, tiny_mlp
path, mode = {path!r}, {mode!r}
m = tiny_mlp(); opt = torch.optim.Adam(m.parameters(), lr=0.01)
with datavalue.Recorder(path, m, optimizer=opt, proj_dim=None) as rec:
    for t in range(3):
        ids = np.arange(6 * t, 6 * t + 6)
        with rec.step(sample_ids=ids):
            F.cross_entropy(m(X[ids]), Y[ids]).backward()
        opt.step(); opt.zero_grad()
        if t == 0:
            old = copy.deepcopy(opt.state_dict())
w, st = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())
m2 = tiny_mlp(); opt2 = torch.optim.Adam(m2.parameters(), lr=0.01)
if mode != "weights":
    m2.load_state_dict(w)
if mode == "count":
    opt2.load_state_dict(old)
if mode == "moments":
    next(iter(st["state"].values()))["exp_avg"].mul_(2.0)
    opt2.load_state_dict(st)
try:
    rec = datavalue.Recorder(path, m2, optimizer=opt2, proj_dim=None, resume=True)  # no `with`: a script's style
    with rec.step(sample_ids=np.arange(6)):
        F.cross_entropy(m2(X[:6]), Y[:6]).backward()
    opt2.step()
except DataValueError as exc:
    print("refused:", type(exc).__name__)
"""


@pytest.mark.parametrize("mode", ["weights", "fresh", "count", "moments"])
def test_p8left_a_refused_resume_leaves_no_exit_hook_warning(tmp_path, mode):
    code = _SCRIPT.format(root=str(ROOT), path=str(tmp_path / "r.zarr"), mode=mode)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="default")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused:"), out.stdout + out.stderr
    assert out.stderr == "", out.stderr  # was: "RuntimeWarning: Recorder('...') was never closed: committed 0 steps at exit"


def test_p8left_a_state_saved_and_loaded_from_disk_resumes(adam_run, tmp_path):
    """The usual checkpoint path (torch.save, then torch.load(weights_only=True)) gives the recorded state back."""
    path, snaps = adam_run
    torch.save({"model": snaps[3][0], "optimizer": snaps[3][1]}, tmp_path / "ckpt.pt")
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    _resume(path, tmp_path / "r.zarr", ck["model"], ck["optimizer"])
    assert open_run(tmp_path / "r.zarr").n_steps == 4
