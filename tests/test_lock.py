"""``datavalue._lock.LockFile``, the lock file shared by the run store and the royalty ledger.

The store's and the ledger's behaviour are tested in tests/store/test_h22_lock.py and
tests/shapley/test_ledger_tamper.py; here the parts of the protocol that a race would hit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from datavalue._lock import LockFile, holder_state, read_holder


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _lock(path, purpose="t"):
    return LockFile(path, subject="thing", error=RuntimeError, busy_hint="Wait.", purpose=purpose)


def test_a_takeover_rechecks_the_holder_before_replacing_it(tmp_path):
    """Two writers judge the same lock stale; the first takes it over; the second's takeover must
    see that the lock changed and leave it alone (else both would think they hold it)."""
    path = tmp_path / "x.lock"
    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "token": "s" * 32}
    path.write_text(json.dumps(stale))
    first = _lock(path, "first")
    first.acquire()
    assert read_holder(path)["purpose"] == "first"
    second = _lock(path, "second")
    assert second._take_over(stale, second._record()) is False  # judged stale earlier, too late now
    assert read_holder(path)["purpose"] == "first"
    with pytest.raises(RuntimeError, match="locked by first in this process"):
        second.acquire()
    first.release()
    assert not path.exists()


def test_the_lock_appears_whole_and_names_its_holder(tmp_path):
    path = tmp_path / "x.lock"
    with _lock(path, "writing"):
        holder = read_holder(path)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["purpose"] == "writing" and holder["since"] and len(holder["token"]) == 32
        assert holder_state(holder) == "alive"
        assert [p.name for p in tmp_path.iterdir()] == ["x.lock"]  # the temporary file is gone
    assert not path.exists()


def test_release_never_removes_someone_elses_lock(tmp_path):
    path = tmp_path / "x.lock"
    mine = _lock(path)
    mine.acquire()
    other = {"pid": 1, "host": "elsewhere", "token": "o" * 32}
    path.write_text(json.dumps(other))  # replaced behind our back (by hand)
    mine.release()
    assert read_holder(path) == other


def test_holder_states():
    me = socket.gethostname()
    assert holder_state({"pid": _dead_pid(), "host": me}) == "dead"
    assert holder_state({"pid": os.getpid(), "host": me}) == "alive"  # no token: never judged stale
    assert holder_state({"pid": os.getpid(), "host": me, "token": "n" * 32}) == "dead"  # a reused pid
    assert holder_state({"pid": 1, "host": "elsewhere"}) == "foreign"
    assert holder_state({"pid": "x", "host": me}) == "foreign"
    assert holder_state({"pid": os.getppid(), "host": me, "pid_start": -5}) == "dead"  # started later: reused
