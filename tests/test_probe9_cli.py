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
