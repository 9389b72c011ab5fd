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


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    import datavalue

    path = tmp_path_factory.mktemp("p8_info") / "r.zarr"
    record_tiny_run(path)
    datavalue.build_embeddings(path, progress=False)
    return path


@pytest.mark.parametrize("damage", ["truncate", "chunk_shape"])
def test_p8_06_info_reports_a_truncated_build_chunk_as_damaged(built, tmp_path, damage, capsys):
    """Was: ``datavalue info`` said ``4 steps, complete`` and exited 0, while every query refused the chunk."""
    import json
    import shutil

    from datavalue.cli import main

    run = tmp_path / "r.zarr"
    shutil.copytree(built, run)
    values = run / "embeddings" / "empirical_fisher" / "values"
    if damage == "truncate":
        with open(values / "c" / "0" / "0", "r+b") as f:
            f.truncate(1000)
    else:
        meta = json.loads((values / "zarr.json").read_text())
        meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 2**40
        (values / "zarr.json").write_text(json.dumps(meta))
    assert main(["info", str(run)]) == 1
    out, err = capsys.readouterr()
    assert "DAMAGED" in out and "is corrupt (truncated, or its metadata edited)" in err
    assert main(["info", str(run), "--json"]) == 1
    assert "is corrupt" in json.loads(capsys.readouterr().out)["builds"]["empirical_fisher"]["damaged"]


def test_p8_06_info_on_an_intact_build_is_complete(built, capsys):
    from datavalue.cli import main

    assert main(["info", str(built)]) == 0
    assert "complete" in capsys.readouterr().out


def test_p8_11_version_prints_the_version(capsys):
    """Was: ``datavalue --version`` exited 2 with ``the following arguments are required: command``."""
    import datavalue
    from datavalue.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"datavalue {datavalue.__version__}"
