"""The suite's thread guard (tests/conftest.py) sees what it must and nothing else."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import _offending


@pytest.mark.parametrize(("name", "daemon", "caught"), [
    ("datavalue-probe", True, True),  # ours, even as a daemon
    ("probe", False, True),  # anyone's non-daemon thread keeps the process alive
    ("probe", True, False),  # another library's daemon (tqdm's monitor, zarr's event loop)
])
def test_the_guard_reports_threads_left_running(name, daemon, caught):
    before = set(threading.enumerate())
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name=name, daemon=daemon)
    t.start()
    try:
        assert (_offending(before) == [t]) is caught
    finally:
        stop.set()
        t.join()
    assert _offending(before) == []
