"""Issue 22 item 3: one writer per run.

Before the lock, two ``Recorder`` s on one path (one with ``overwrite=True``, or both with
``resume=True``) both wrote and steps were lost without an error. Now the first writer holds
``<run>/writer.lock`` (pid, host, start time) until it closes; a second writer gets
``StoreLockedError`` naming the holder; a lock left by a process killed with ``kill -9`` is taken
over by the next writer; one from another host never is. The lock file itself is
``datavalue._lock.LockFile``, shared with the royalty ledger (tests/shapley/test_ledger_tamper.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.errors import StoreExistsError, StoreLockedError
from datavalue.store import LOCK_FILE, RunWriter, lock_run, open_run

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _crash_writer import MANIFEST, K, block  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _steps(rec, model, t0, n):
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for t in range(t0, t0 + n):
        with rec.step(sample_ids=range(6 * t, 6 * t + 6), lr=0.1):
            F.cross_entropy(model(x), y).backward()
        model.zero_grad()


def _wait_for(pred, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ------------------------------------------------------------------ one process, two Recorders
@pytest.mark.parametrize("second", [{"overwrite": True}, {"resume": True}, {}])
def test_a_second_recorder_on_a_recording_run_is_refused_and_nothing_is_lost(tmp_path, second):
    path = tmp_path / "r.zarr"
    model, other = _model(), _model()
    with datavalue.Recorder(path, model, proj_dim=None, chunk_rows=8) as rec:
        _steps(rec, model, 0, 3)
        rec.flush()
        with pytest.raises(StoreLockedError, match=rf"a recorder in this process \(pid {os.getpid()}\)") as info:
            datavalue.Recorder(path, other, proj_dim=None, chunk_rows=8, **second)
        assert str(path / LOCK_FILE) in str(info.value) and socket.gethostname() in str(info.value)
        _steps(rec, model, 3, 2)  # the first writer carries on undisturbed
    run = open_run(path)
    assert run.n_steps == 5 and run.sample_id.tolist() == list(range(30))
    assert not (path / LOCK_FILE).exists()


def test_two_resumed_recorders_one_after_the_other_keep_every_step(tmp_path):
    path = tmp_path / "r.zarr"
    model = _model()
    with datavalue.Recorder(path, model, proj_dim=None, chunk_rows=8) as rec:
        _steps(rec, model, 0, 2)
    a = datavalue.Recorder(path, model, proj_dim=None, chunk_rows=8, resume=True)
    with pytest.raises(StoreLockedError):
        datavalue.Recorder(path, _model(), proj_dim=None, chunk_rows=8, resume=True)
    _steps(a, model, 2, 2)
    a.close()
    with datavalue.Recorder(path, model, proj_dim=None, chunk_rows=8, resume=True) as b:  # free again
        _steps(b, model, 4, 1)
    assert open_run(path).n_steps == 5


def test_the_lock_is_released_when_the_training_loop_raises(tmp_path):
    path = tmp_path / "r.zarr"
    model = _model()
    with pytest.raises(ZeroDivisionError), datavalue.Recorder(path, model, proj_dim=None) as rec:
        _steps(rec, model, 0, 2)
        1 / 0  # noqa: B018
    assert not (path / LOCK_FILE).exists()
    with datavalue.Recorder(path, model, proj_dim=None, resume=True) as rec:
        _steps(rec, model, 2, 1)
    assert open_run(path).n_steps == 3


def test_a_failed_open_leaves_no_lock(tmp_path):
    path = tmp_path / "r.zarr"
    RunWriter(path, MANIFEST, k=K).close()
    with pytest.raises(StoreExistsError):
        RunWriter(path, MANIFEST, k=K)
    with pytest.raises(datavalue.errors.StoreMismatchError):  # found under the lock: released again
        RunWriter(path, dict(MANIFEST, loss_reduction="sum"), k=K, mode="resume")
    assert not (path / LOCK_FILE).exists()
    with pytest.raises(datavalue.errors.StoreNotFoundError):
        RunWriter(tmp_path / "new.zarr", MANIFEST, k=K, mode="resume")
    assert not (tmp_path / "new.zarr").exists()


def test_a_build_waits_for_no_one_and_refuses_a_run_being_recorded(tmp_path):
    path = tmp_path / "r.zarr"
    model = _model()
    rec = datavalue.Recorder(path, model, proj_dim=None, chunk_rows=8)
    _steps(rec, model, 0, 3)
    rec.flush()
    with pytest.raises(StoreLockedError, match="a recorder"):
        datavalue.build_embeddings(path, "empirical_fisher", progress=False)
    rec.close()
    datavalue.build_embeddings(path, "empirical_fisher", progress=False)
    with lock_run(path, "a test"), pytest.raises(StoreLockedError, match="a test in this process"):
        datavalue.Recorder(path, model, proj_dim=None, resume=True)
    assert not (path / LOCK_FILE).exists()


def test_a_final_pass_holds_its_parent_run_too(tmp_path):
    path = tmp_path / "r.zarr"
    model = _model()
    with datavalue.Recorder(path, model, proj_dim=None, chunk_rows=8) as rec:
        _steps(rec, model, 0, 2)
    fp = datavalue.capture.FinalPass(path, model)
    try:
        with pytest.raises(StoreLockedError, match="writing final/"):
            datavalue.Recorder(path, _model(), proj_dim=None, overwrite=True)
    finally:
        fp.close()
    assert not (path / LOCK_FILE).exists() and not (path / "final" / LOCK_FILE).exists()
    assert open_run(path).n_steps == 2



def test_an_influence_build_is_refused_while_a_final_pass_writes(tmp_path):
    """``build_influence`` writes ``<run>/final/influence``: it takes the run's lock like the other builds."""
    path = tmp_path / "r.zarr"
    model = _model()
    with datavalue.Recorder(path, model, proj_dim=None, chunk_rows=8) as rec:
        _steps(rec, model, 0, 2)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with datavalue.capture.FinalPass(path, model) as fp:
        with fp.batch(range(6)):
            F.cross_entropy(model(x), y).backward()
        with pytest.raises(StoreLockedError):
            datavalue.embeddings.build_influence(path, progress=False)
    datavalue.embeddings.build_influence(path, progress=False)
    assert not (path / LOCK_FILE).exists()

# ------------------------------------------------------------------ other processes
_HOLDER = """
import sys, time, torch, torch.nn.functional as F, datavalue
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)); y = torch.tensor([0, 1, 2, 0, 1, 2])
path, release = sys.argv[1], sys.argv[2]
with datavalue.Recorder(path, model, proj_dim=None, chunk_rows=8, resume=sys.argv[3] == "resume") as rec:
    for t in range(4):
        with rec.step(sample_ids=range(6 * t, 6 * t + 6), lr=0.1):
            F.cross_entropy(model(x), y).backward()
        model.zero_grad()
    rec.flush()
    print("recording", flush=True)
    while not __import__("os").path.exists(release):
        time.sleep(0.01)
print("closed", flush=True)
"""


def test_a_recorder_in_another_process_is_named_and_its_steps_survive(tmp_path):
    path, release = tmp_path / "r.zarr", tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(release), "create"], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "recording"
        for kw in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(StoreLockedError, match=rf"a recorder in pid {proc.pid} on host") as info:
                datavalue.Recorder(path, _model(), proj_dim=None, chunk_rows=8, **kw)
            assert "still running" in str(info.value)
        release.touch()
        assert proc.stdout.readline().strip() == "closed"
        assert proc.wait(timeout=60) == 0
    finally:
        release.touch()
        proc.kill()
        proc.wait()
    model = _model()
    with datavalue.Recorder(path, model, proj_dim=None, chunk_rows=8, resume=True) as rec:  # released
        _steps(rec, model, 4, 1)
    assert open_run(path).n_steps == 5


def test_after_kill_9_the_next_writer_takes_the_stale_lock_over(tmp_path, caplog):
    path, release = tmp_path / "r.zarr", tmp_path / "never"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(release), "create"], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "recording"
        holder = json.loads((path / LOCK_FILE).read_text())
        assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname() and holder["since"]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    assert (path / LOCK_FILE).exists()  # kill -9 leaves the lock behind
    model = _model()
    with caplog.at_level(logging.WARNING), datavalue.Recorder(path, model, proj_dim=None, chunk_rows=8,
                                                               resume=True) as rec:
        assert json.loads((path / LOCK_FILE).read_text())["pid"] == os.getpid()
        _steps(rec, model, 4, 1)
    assert f"took over the stale lock of a recorder in pid {proc.pid}" in caplog.text
    run = open_run(path)
    assert run.n_steps == 5 and run.sample_id.tolist() == list(range(30))


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    path = tmp_path / "r.zarr"
    RunWriter(path, MANIFEST, k=K).close()
    (path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "2026-01-01T00:00:00+00:00"}))
    for mode in ("resume", "overwrite"):
        with pytest.raises(StoreLockedError, match="'elsewhere'.*never taken over automatically.*delete the lock file"):
            RunWriter(path, MANIFEST, k=K, mode=mode)
    assert json.loads((path / LOCK_FILE).read_text())["host"] == "elsewhere"
    (path / LOCK_FILE).unlink()  # what the message says to do
    RunWriter(path, MANIFEST, k=K, mode="resume").close()


def test_a_lock_naming_this_process_but_not_held_by_it_is_stale(tmp_path):
    """A pid reused after a crash (containers restart pids from 1): the lock names our pid, but no
    lock this process holds."""
    path = tmp_path / "r.zarr"
    RunWriter(path, MANIFEST, k=K).close()
    (path / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": "x" * 32}))
    RunWriter(path, MANIFEST, k=K, mode="resume").close()
    assert not (path / LOCK_FILE).exists()


_RACER = """
import json, os, sys, time
from datavalue.errors import StoreLockedError
from datavalue.store import lock_run
path, go, out, release = sys.argv[1:5]
while not os.path.exists(go):
    time.sleep(0.001)
try:
    with lock_run(path, "racer"):
        open(out, "w").write("won")
        while not os.path.exists(release):
            time.sleep(0.005)
except StoreLockedError as exc:
    open(out, "w").write("lost: " + str(exc))
"""


def test_processes_racing_to_take_over_one_stale_lock_leave_one_winner(tmp_path):
    path = tmp_path / "r.zarr"
    w = RunWriter(path, MANIFEST, k=K)
    for t in range(3):
        w.submit(block(t))
    w.close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for trial in range(3):
        (path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "token": "d" * 32}))
        go, release = tmp_path / f"go{trial}", tmp_path / f"release{trial}"
        outs = [tmp_path / f"out{trial}-{i}" for i in range(4)]
        procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(path), str(go), str(o), str(release)], env=ENV)
                 for o in outs]
        try:
            time.sleep(1.0)  # let them all start and spin on the go file (no assertion depends on it)
            go.touch()
            _wait_for(lambda outs=outs: all(o.exists() and o.read_text() for o in outs), "every racer's verdict")
            verdicts = [o.read_text() for o in outs]
            assert sum(v == "won" for v in verdicts) == 1, verdicts
            assert all(v == "won" or " is locked by racer in pid " in v for v in verdicts), [v[:200] for v in verdicts]
        finally:
            release.touch()
            for p in procs:
                p.wait(timeout=60)
    assert open_run(path).n_steps == 3
    np.testing.assert_array_equal(open_run(path).sample_id, np.concatenate([block(t).sample_id for t in range(3)]))
