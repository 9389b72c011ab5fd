"""Defects an independent probe found in issue 22's classes (utility cache, group indices).

Each test failed before its fix.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from datavalue import shapley

# ---------------------------------------------------------------- 1. a file that is not a cache


@pytest.mark.parametrize("text", ['{"my": "results"}', "my notes, no newline", '{"my": "results"}\nmore'])
def test_opening_a_cache_never_changes_a_file_that_is_not_one(tmp_path, text):
    path = tmp_path / "res.json"
    path.write_text(text)
    with pytest.raises(shapley.CacheMismatchError, match="not a datavalue utility cache.*left untouched"):
        shapley.CoalitionGame(lambda S: float(len(S)), 3, cache_path=path)
    assert path.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.json"]  # no lock, no aside file


def test_a_torn_last_line_is_moved_aside_not_dropped(tmp_path, caplog):
    path = tmp_path / "u.jsonl"
    with shapley.DiskCache(path, n=3, fingerprint="f") as c:
        c.put(1, 1.0)
    torn = b'{"mask": 2, "val'
    with open(path, "ab") as f:
        f.write(torn)
    with caplog.at_level(logging.WARNING), shapley.DiskCache(path, n=3, fingerprint="f") as c:
        assert c.items() == [(1, 1.0)]
    asides = list(tmp_path.glob("u.jsonl.torn-*"))
    assert len(asides) == 1 and asides[0].read_bytes() == torn
    assert asides[0].name in caplog.text and "partial line 3" in caplog.text
    assert path.read_bytes().endswith(b'{"mask": 1, "value": 1.0}\n')


def test_a_header_cut_before_its_newline_is_completed(tmp_path):
    path = tmp_path / "u.jsonl"
    with shapley.DiskCache(path, n=2, fingerprint="f"):
        pass
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with shapley.DiskCache(path, n=2, fingerprint="f") as c:
        c.put(3, 2.0)
    assert shapley.DiskCache(path, n=2, fingerprint="f").get(3) == 2.0


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(shapley.CacheMismatchError, match="is a directory"):
        shapley.DiskCache(tmp_path, n=2)


# ---------------------------------------------------------------- 2. one writer per cache

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from datavalue import shapley
    c = shapley.DiskCache(sys.argv[1], n=4, fingerprint="f")
    c.put(1, 1.0)
    c._fh.write('{"mask": 2, "va'); c._fh.flush()   # an append in flight
    print("ready", flush=True)
    sys.stdin.readline()
    c._fh.write('lue": 2.0}\\n'); c._fh.flush()
    c.close()
    print("done", flush=True)
    """
)


def test_a_second_writer_in_another_process_is_refused_and_the_cache_survives(tmp_path):
    path = tmp_path / "u.jsonl"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(shapley.CacheMismatchError, match=rf"locked by DiskCache in pid {proc.pid} on host"):
            shapley.DiskCache(path, n=4, fingerprint="f")
        with pytest.raises(shapley.CacheMismatchError, match="One writer per cache"):
            shapley.CoalitionGame(lambda S: 0.0, 4, cache_path=path, fingerprint="f")
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    lines = path.read_text().splitlines()
    assert [json.loads(x) for x in lines[1:]] == [{"mask": 1, "value": 1.0}, {"mask": 2, "value": 2.0}]
    with shapley.DiskCache(path, n=4, fingerprint="f") as c:  # released on close: opens again
        assert dict(c.items()) == {1: 1.0, 2: 2.0}


def test_a_second_handle_in_one_process_is_refused_until_the_first_closes(tmp_path):
    path = tmp_path / "u.jsonl"
    game = shapley.CoalitionGame(lambda S: float(len(S)), 3, cache_path=path)
    with pytest.raises(shapley.CacheMismatchError, match=r"locked by DiskCache in this process"):
        shapley.CoalitionGame(lambda S: float(len(S)), 3, cache_path=path)
    game.close()
    assert not (tmp_path / "u.jsonl.lock").exists()
    with shapley.CoalitionGame(lambda S: 1 / 0, 3, cache_path=path) as again:
        assert again.utility.disk is not None


def test_a_lock_left_by_a_killed_writer_is_taken_over(tmp_path):
    path = tmp_path / "u.jsonl"
    code = (
        "import os,sys; from datavalue import shapley; "
        "c = shapley.DiskCache(sys.argv[1], n=2); c.put(1, 1.0); os._exit(0)"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env)
    assert (tmp_path / "u.jsonl.lock").exists()
    with shapley.DiskCache(path, n=2) as c:
        assert c.get(1) == 1.0


# ---------------------------------------------------------------- 3. group indices are ints


@pytest.mark.parametrize(
    ("groups", "said"),
    [
        ([[1.9]], r"got 1.9 of type float in the group \[1.9\]"),
        ([[0.5]], r"got 0.5 of type float"),
        ([[True]], r"got True of type bool"),
        ([[0, 1.0]], r"got 1.0 of type float"),
        (["01"], r"got the group '01' of type str"),
        ([["0"], ["1"]], r"got '0' of type str"),
        ("01", r"got '01' of type str"),
        ([0, 1], r"got the group 0 of type int"),
    ],
)
def test_group_indices_must_be_ints(groups, said):
    import numpy as np

    u = np.arange(4, dtype=float)
    with pytest.raises(shapley.InvalidGameError, match=said):
        shapley.fgsv_from_utilities(u, groups)


def test_owen_refuses_non_integer_groups_too():
    import numpy as np

    u = np.arange(4, dtype=float)
    with pytest.raises(shapley.InvalidGameError, match="of type float"):
        shapley.owen_from_utilities(u, [[0], [1.0]])
    with pytest.raises(shapley.InvalidGameError, match="of type bool"):
        shapley.fgsv_weights(2, [True])
