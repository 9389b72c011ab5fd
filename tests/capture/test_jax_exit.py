"""A JaxRecorder its script never closes keeps its steps, like the PyTorch Recorder (P5-31, issue 22).

Each test runs a child script that records 20 steps (fewer than the writer's ``commit_every`` of 32, so
nothing is committed before the end) and ends without ``rec.close()``: plainly, by ``del rec``, by a
``KeyboardInterrupt``, or after a forked child ran the exit hook. The interpreter's exit hook
(``datavalue.capture._exit``) must commit the 20 steps and warn.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from datavalue.store import open_run
from tests._helpers_child import run_child

jax = pytest.importorskip("jax")
jnp = jax.numpy


_CHILD = """
import os, sys
import numpy as np
import jax, jax.numpy as jnp
from datavalue.capture.jax import JaxRecorder
run, mode = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
X = rng.standard_normal((160, 4)).astype(np.float32)
Y = rng.integers(0, 3, 160)
params = {"0": {"weight": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32), "bias": jnp.zeros(5)},
          "2": {"weight": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32), "bias": jnp.zeros(3)}}

def per_example_loss(p, x, y):
    h = jnp.tanh(p["0"]["weight"] @ x + p["0"]["bias"])
    return -jax.nn.log_softmax(p["2"]["weight"] @ h + p["2"]["bias"])[y]

rec = JaxRecorder(run, params, per_example_loss, proj_dim=None)
for t in range(20):
    ids = np.arange(8 * t, 8 * t + 8)
    grads = rec.step(params, X[ids], Y[ids], sample_ids=ids, lr=0.1)
    params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
if mode == "del":
    del rec
if mode == "raise":
    raise KeyboardInterrupt
if mode == "fork":
    pid = os.fork()
    if pid == 0:  # the child runs the exit hook: the parent's recorder is not its own. (It then leaves by
        # os._exit: a forked jax process's own exit can deadlock in XLA's thread pool, as jax warns at fork.)
        from datavalue.capture import _exit
        _exit._close_all_at_exit()
        print("hook ran in the child", flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    print("forked child exited", flush=True)
print("child done", flush=True)
"""


def _child(tmp_path: Path, mode: str) -> tuple[Path, subprocess.CompletedProcess]:
    return run_child(tmp_path, _CHILD, mode, JAX_PLATFORMS="cpu")


@pytest.mark.parametrize("mode", ["exit", "del", "raise"])
def test_a_script_that_never_closes_its_jax_recorder_keeps_its_steps(tmp_path, mode):
    run, r = _child(tmp_path, mode)
    if mode != "raise":
        assert r.returncode == 0, r.stderr[-2000:]
        assert "child done" in r.stdout, r.stderr[-2000:]
    assert open_run(run).n_steps == 20, r.stderr[-2000:]
    assert f"JaxRecorder('{run}') was never closed: committed" in r.stderr, r.stderr[-2000:]
    assert "call rec.close()" in r.stderr


def test_a_forked_child_leaves_the_parents_jax_recorder_alone(tmp_path):
    """Only the process that opened the recorder commits it, once, at its own exit."""
    run, r = _child(tmp_path, "fork")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "forked child exited" in r.stdout and "hook ran in the child" in r.stdout, r.stderr[-2000:]
    assert r.stderr.count("was never closed") == 1, r.stderr[-2000:]
    assert open_run(run).n_steps == 20


def test_a_closed_jax_recorder_leaves_the_exit_hook(tmp_path):
    from datavalue.capture import _exit
    from datavalue.capture.jax import JaxRecorder

    params = {"w": jnp.ones((2, 3), jnp.float32)}
    rec = JaxRecorder(tmp_path / "r.zarr", params, lambda p, x: jnp.sum(p["w"] @ x), proj_dim=None)
    assert id(rec) in _exit._OPEN
    rec.step(params, np.ones((2, 3), np.float32), sample_ids=[0, 1], lr=0.1)
    rec.close()
    assert id(rec) not in _exit._OPEN
    assert open_run(tmp_path / "r.zarr").n_steps == 1
