"""Eighth probe (session 12): the command line (P8-03, P8-06)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._helpers_tiny_run import record_tiny_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("p8_cli") / "r.zarr"
    record_tiny_run(path)
    return path


def _cli_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """Run ``datavalue ARGS`` with its standard output a pipe whose reader has gone (``| head -0``)."""
    r, w = os.pipe()
    os.close(r)
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, "-c", "import sys; from datavalue.cli import main; sys.exit(main())",
                               *args], stdout=w, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    finally:
        os.close(w)


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_p8_03_info_into_a_closed_pipe_stops_quietly(run, extra):
    """Was: a raw ``BrokenPipeError`` traceback (exit 1) for ``datavalue info RUN | head -3``."""
    got = _cli_into_closed_pipe("info", str(run), *extra)
    assert "Traceback" not in got.stderr and "BrokenPipeError" not in got.stderr, got.stderr
    assert got.returncode == 141
