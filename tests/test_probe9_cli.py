"""Ninth probe (session 13): the command line on a full disk (P9-03).

``datavalue info RUN > /dev/full`` (standard output on a full file system; any write that finds no
room) ended in a raw ``OSError: [Errno 28] No space left on device`` traceback.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datavalue import cli
from tests._helpers_tiny_run import record_tiny_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("p9_cli") / "r.zarr"
    record_tiny_run(path)
    return path


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_p9_03_info_onto_a_full_disk_is_one_clear_line(run, extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open("/dev/full", "w") as full:
        got = subprocess.run([sys.executable, "-c", "import sys; from datavalue.cli import main; sys.exit(main())",
                              "info", str(run), *extra], stdout=full, stderr=subprocess.PIPE, text=True, env=env,
                             timeout=300)
    assert "Traceback" not in got.stderr and "Exception ignored" not in got.stderr, got.stderr
    assert got.returncode == 1
    assert "datavalue: error: writing the output" in got.stderr and "No space left on device" in got.stderr


def test_p9_03_a_full_disk_under_a_command_names_the_file(run, monkeypatch, capsys):
    def full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out.parquet")

    monkeypatch.setattr(sys, "argv", ["datavalue", "info", str(run)])
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    for action in parser._subparsers._group_actions[0].choices.values():  # noqa: SLF001 - route info to `full`
        if action.prog.endswith(" info"):
            action.set_defaults(func=full)
    assert cli.main() == 1
    err = capsys.readouterr().err
    assert "writing /data/out.parquet failed: No space left on device (errno 28)" in err


# ---------------------------------------------------------------- edited build attributes (P9-11)
_VALUES = Path("embeddings") / "empirical_fisher" / "values" / "zarr.json"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    import datavalue

    path = tmp_path_factory.mktemp("p9_build") / "r.zarr"
    record_tiny_run(path)
    datavalue.build_embeddings(path, progress=False)
    return path


def _edited(built: Path, tmp_path: Path, key: str, value) -> Path:
    import json
    import shutil

    run = tmp_path / "r.zarr"
    shutil.copytree(built, run)
    meta = json.loads((run / _VALUES).read_text())
    if key == "*":
        meta["attributes"]["datavalue_embeddings"] = value
    else:
        meta["attributes"]["datavalue_embeddings"][key] = value
    (run / _VALUES).write_text(json.dumps(meta))
    return run


_BAD = [("n_rows", "x"), ("n_steps", -1), ("*", [1, 2]), ("choice", None), ("complete", "yes"), ("blocks", [[0, "a"]])]


@pytest.mark.parametrize(("key", "value"), _BAD)
def test_p9_11_edited_build_attributes_are_a_store_error_in_queries(built, tmp_path, key, value):
    import datavalue
    from datavalue.errors import StoreCorruptError
    from tests._helpers_tiny_run import tiny_mlp, tiny_query_loss

    run = _edited(built, tmp_path, key, value)
    with pytest.raises(StoreCorruptError, match=r"build attributes .* are not as build_embeddings writes them"):
        datavalue.Attributor(run, tiny_mlp(), progress=False).scores(tiny_query_loss)  # was: raw ValueError, ...


@pytest.mark.parametrize(("key", "value"), [*_BAD, ("n_steps", 10**18), ("blocks", [[0, 10**12]])])
def test_p9_11_info_calls_a_build_with_edited_attributes_damaged(built, tmp_path, key, value, capsys):
    run = _edited(built, tmp_path, key, value)
    assert cli.main(["info", str(run)]) == 1  # was: a traceback, or "complete" with exit 0
    out, err = capsys.readouterr()
    assert "steps, complete" not in out
    assert "datavalue info: build 'empirical_fisher' is damaged" in err


def test_p9_11_an_intact_build_and_one_of_fewer_steps_are_not_damaged(built, tmp_path, capsys):
    assert cli.main(["info", str(built)]) == 0
    assert "4 steps, complete" in capsys.readouterr().out


# ---------------------------------------------------------------- a recorded chunk of the wrong size (P9-12)
@pytest.mark.parametrize("how", ["appended", "truncated"])
def test_p9_12_info_refuses_a_committed_gradient_chunk_of_the_wrong_size(run, tmp_path, capsys, how):
    import shutil

    copy = tmp_path / "r.zarr"
    shutil.copytree(run, copy)
    chunk = copy / "grads" / "c" / "0" / "0"
    raw = chunk.read_bytes()
    chunk.write_bytes(raw + b"\0" * 8 if how == "appended" else raw[:-100])
    assert cli.main(["info", str(copy)]) == 2  # was: the report, exit 0, while every read refused the run
    assert "chunk grads/c/0/0 is corrupt" in capsys.readouterr().err
