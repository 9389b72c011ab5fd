"""Issue 22 item 6: durability bounded in steps.

Before, steps were committed only every 10 s or per full chunk: a job killed after 80 recorded
steps had committed none. Now at most ``commit_every`` (default 32) recorded steps are ever
uncommitted: a process that kills itself with SIGKILL right after submitting its ``K``-th step
leaves at least ``K - commit_every`` committed steps, each equal to what was submitted. The
processes kill themselves, so where the kill lands does not depend on timing; the time-based
commit is pushed out to an hour so that only the step bound can save anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datavalue.store import LOCK_FILE, RunWriter, open_run

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
sys.path.insert(0, str(HERE))
from _crash_writer import MANIFEST, K, block  # noqa: E402

_WRITER = """
import os, signal, sys, time
from _crash_writer import MANIFEST, K, block
from datavalue.store import RunWriter
path, n, every, slow = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "slow"
w = RunWriter(path, MANIFEST, k=K, chunk_rows=4096, commit_interval=3600.0, commit_every=every)
if slow:  # a disk slower than training: without back-pressure the queue would hold every step
    write = w._write
    w._write = lambda blocks: (time.sleep(0.05), write(blocks))
for t in range(n):
    w.submit(block(t))
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_writer(path: Path, n: int, every: int, slow: bool) -> None:
    proc = subprocess.run([sys.executable, "-c", _WRITER, str(path), str(n), str(every), "slow" if slow else "fast"],
                          env=ENV, timeout=300)
    assert proc.returncode == -9


@pytest.mark.parametrize(("every", "slow"), [(16, False), (16, True), (4, True), (1, False)])
def test_a_kill_after_k_steps_keeps_at_least_k_minus_commit_every(tmp_path, every, slow):
    path, n = tmp_path / "r.zarr", 60
    _killed_writer(path, n, every, slow)
    run = open_run(path)
    assert n - every <= run.n_steps <= n, (run.n_steps, n, every)
    want = [block(t) for t in range(run.n_steps)]  # every committed step reads back exactly
    np.testing.assert_array_equal(run.sample_id, np.concatenate([b.sample_id for b in want]))
    np.testing.assert_array_equal(run.grads.compute(), np.concatenate([b.grads for b in want]).astype(np.float32))
    assert (path / LOCK_FILE).exists()  # left by the kill; the next writer takes it over
    w = RunWriter(path, MANIFEST, k=K, mode="resume")
    for t in range(w.steps, n):
        w.submit(block(t))
    w.close()
    assert open_run(path).n_steps == n


_RECORDER = """
import os, signal, sys, torch, torch.nn.functional as F, datavalue
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)); y = torch.tensor([0, 1, 2, 0, 1, 2])
rec = datavalue.Recorder(sys.argv[1], model, proj_dim=None, commit_every=int(sys.argv[2]))
for t in range(int(sys.argv[3])):
    with rec.step(sample_ids=range(6 * t, 6 * t + 6), lr=0.1):
        F.cross_entropy(model(x), y).backward()
    model.zero_grad()
    if t == 9:
        rec.flush()  # everything so far is committed, whatever commit_every says
        assert datavalue.store.open_run(sys.argv[1]).n_steps == 10
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_recorder_killed_after_k_steps_keeps_at_least_k_minus_commit_every(tmp_path):
    path, n, every = tmp_path / "r.zarr", 40, 8
    proc = subprocess.run([sys.executable, "-c", _RECORDER, str(path), str(every), str(n)], env=ENV, timeout=300)
    assert proc.returncode == -9
    run = open_run(path)
    assert n - every <= run.n_steps <= n
    assert run.sample_id.tolist() == list(range(6 * run.n_steps))


def test_commit_every_is_validated():
    from datavalue.capture import CaptureConfig
    from datavalue.errors import RecorderError

    assert CaptureConfig().commit_every == 32
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(RecorderError, match="commit_every must be a positive int"):
            CaptureConfig(commit_every=bad)
    with pytest.raises(ValueError, match="commit_every must be a positive int"):
        RunWriter("/nonexistent/never-created.zarr", MANIFEST, k=K, commit_every=0)
