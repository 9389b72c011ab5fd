"""``datavalue replay --out`` is checked before the replay runs (the probe's item 4).

Before the fix an unwritable ``--out`` (a directory, ``/proc/x.parquet``) gave a raw pyarrow traceback,
and only after the replay had run and been stored in the run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from datavalue.cli import main
from datavalue.query import replays
from tests.query.test_replay import loss_fn, make_case

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay_cli")
    c = make_case(tmp / "run.zarr")
    spec = tmp / "spec.py"
    spec.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "import torch\nfrom tests.query.test_replay import mlp\n"
        "gen = torch.Generator().manual_seed(0)\n"
        "X = torch.randn(69, 6, generator=gen, dtype=torch.float64)\nY = torch.randint(0, 4, (69,), generator=gen)\n"
        "def model():\n    return mlp().double()\n"
        "def train():\n    return X[:64], Y[:64]\n"
        "def data():\n    return X[64:], Y[64:]\n")
    return c, spec, tmp


def _argv(c, spec, out):
    return [str(c.path), "--model", f"{spec}:model", "--train", f"{spec}:train", "--data", f"{spec}:data",
            "--out", str(out), "--top-k", "3", "--no-progress"]


def _cases(tmp):
    (tmp / "notes.txt").write_text("x")
    (tmp / "adir").mkdir(exist_ok=True)
    return {
        "a directory": (tmp / "adir", r"--out .*adir is a directory"),
        "under a file": (tmp / "notes.txt" / "r.parquet", r"notes.txt is a file, not a directory"),
        "in /proc": (Path("/proc/x.parquet"), r"--out /proc/x.parquet: cannot create a file in /proc"),
    }


@pytest.mark.parametrize("which", ["a directory", "under a file", "in /proc"])
def test_replay_refuses_an_unwritable_out_before_it_runs(case, capsys, which):
    c, spec, tmp = case
    out, said = _cases(tmp)[which]
    if which == "in /proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no procfs here")
    before = sorted(p.name for p in tmp.iterdir())
    assert main(["replay", *_argv(c, spec, out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("datavalue replay: error: "), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(said, err), err
    assert "default" not in replays(c.path)  # the replay did not run: nothing was stored in the run
    assert sorted(p.name for p in tmp.iterdir()) == before  # no probe file left behind


def test_query_refuses_out_in_proc_before_any_work(case, capsys):
    c, spec, _ = case
    if not os.path.isdir("/proc/self"):
        pytest.skip("no procfs here")
    argv = ["query", str(c.path), "--model", f"{spec}:nothing", "--data", f"{spec}:nothing",
            "--out", "/proc/x.parquet"]
    assert main(argv) == 1  # --model would fail if it were loaded: the --out check comes first
    assert "cannot create a file in /proc" in capsys.readouterr().err


def test_replay_still_writes_a_writable_out(case, capsys):
    c, spec, tmp = case
    out = tmp / "new" / "top.parquet"
    assert main(["replay", *_argv(c, spec, out), "--name", "ok"]) == 0
    assert out.exists() and "ok" in replays(c.path)
    assert not [p for p in (tmp / "new").iterdir() if p.name != "top.parquet"]


# ---------------------------------------------------------------- item 5: step windows are ints


@pytest.mark.parametrize(
    ("steps", "said"),
    [
        ((0, 2.9), r"\(float 2.9\)"),
        ((0.5, 2), r"\(float 0.5\)"),
        ((True, 2), r"\(bool True\)"),
        ((0, "3"), r"\(str '3'\)"),
        ("03", r"got the string '03'"),
        (3, r"got 3; pass e.g."),
    ],
)
def test_replay_influence_refuses_non_integer_steps(case, steps, said):
    from datavalue.capture import ReplayError
    from datavalue.query import replay_influence

    c = case[0]
    with pytest.raises(ReplayError, match=said):
        replay_influence(c.path, c.factory(), lambda ids: None, c.query, loss_fn=lambda m, b: None, steps=steps,
                         name="bad", progress=False)
    assert "bad" not in replays(c.path)


def test_replay_influence_takes_int_and_open_ends(case):
    import numpy as np

    from datavalue.query import replay_influence

    c = case[0]
    a = replay_influence(c.path, c.factory(), lambda ids: (c.X[ids], c.Y[ids]), c.query, loss_fn=loss_fn,
                         steps=(np.int64(3), None), name="w1", progress=False)
    assert list(a.attrs["steps"]) == [3, 8]
