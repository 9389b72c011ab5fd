"""A build killed midway is never marked complete; queries refuse it; the next build restarts cleanly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import datavalue
from datavalue.errors import QueryError
from datavalue.store import open_array

ROOT = Path(__file__).resolve().parents[2]
WRITER = ROOT / "tests" / "store" / "_crash_writer.py"
BUILD = "import sys, datavalue; datavalue.build_embeddings(sys.argv[1], curvature='empirical_fisher', chunk_rows=64, progress=False)"


def test_killed_build_restarts_cleanly(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = tmp_path / "r.zarr"
    subprocess.run([sys.executable, str(WRITER), str(run), "1500", "create", "fast"], env=env, check=True, timeout=300)
    values = run / "embeddings" / "empirical_fisher" / "values" / "zarr.json"
    killed = False
    for _ in range(3):  # the kill must land while the build runs
        proc = subprocess.Popen([sys.executable, "-c", BUILD, str(run)], env=env)
        deadline = time.time() + 120
        while proc.poll() is None and not values.exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = True
            break
        proc.wait()
        datavalue.store.delete_path(run, "embeddings")
    if not killed:
        pytest.skip("the build finished before it could be killed (machine too fast for this trial)")
    attrs = dict(open_array(run, "embeddings/empirical_fisher/values").attrs.get("datavalue_embeddings", {}))
    assert attrs.get("complete") is False
    with pytest.raises(QueryError, match="unfinished build"):
        datavalue.Attributor(run, None, progress=False).scores(np.zeros((1, 24)))
    datavalue.build_embeddings(run, curvature="empirical_fisher", progress=False)  # no overwrite needed
    restarted = np.asarray(open_array(run, "embeddings/empirical_fisher/values")[:])
    datavalue.build_embeddings(run, curvature="empirical_fisher", progress=False, overwrite=True)
    np.testing.assert_array_equal(restarted, np.asarray(open_array(run, "embeddings/empirical_fisher/values")[:]))
