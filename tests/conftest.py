"""Suite-wide settings and the thread guard: no test may leave a thread of its own running."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

def _seed_line(config: pytest.Config) -> str | None:
    if not config.pluginmanager.hasplugin("randomly"):
        return None
    seed = config.getoption("randomly_seed", None)
    return f"Using --randomly-seed={seed}" if isinstance(seed, int) else None


def pytest_sessionstart(session: pytest.Session) -> None:
    """Print pytest-randomly's seed first even under ``-q`` (which hides the header that has it)."""
    line = _seed_line(session.config)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if line and reporter is not None and session.config.get_verbosity() < 0:
        reporter.write_line(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """...and last, next to the failures, with how to rerun this order."""
    line = _seed_line(config)
    if line:
        terminalreporter.write_line(f"{line} (rerun this order: make test PYTEST_ARGS='{line.split()[1]}')")


#: How long a test's threads may take to finish after it (a pool shut down without waiting, a
#: writer thread between its last write and its exit).
THREAD_GRACE_S = 2.0


def _process_wide_workers() -> set[threading.Thread]:
    """Threads of other libraries' process-wide pools: each is started once, on first use, and
    reused by every later call, so the test that happens to start it does not leak it. Looked up
    by the pool objects themselves (not by thread names), so a new pool per call is still caught."""
    pools: list[object] = []
    dask_threaded = sys.modules.get("dask.threaded")
    if dask_threaded is not None:  # the threaded scheduler's pool for calls from the main thread
        pools.append(getattr(dask_threaded, "default_pool", None))
    zarr_sync = sys.modules.get("zarr.core.sync")
    threads: set[threading.Thread] = set()
    if zarr_sync is not None:  # zarr's event-loop thread, its executor and the loop's default executor
        threads.update(t for t in getattr(zarr_sync, "iothread", [None]) if t is not None)
        pools.append(getattr(zarr_sync, "_executor", None))
        for loop in getattr(zarr_sync, "loop", [None]):
            pools.append(getattr(loop, "_default_executor", None))
    dist_utils = sys.modules.get("distributed.utils")
    if dist_utils is not None:  # distributed's one offload thread
        pools.append(getattr(dist_utils, "_offload_executor", None))
    for pool in pools:
        threads.update(getattr(pool, "_threads", ()))
    return threads


def _offending(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started since ``before`` that are still alive and are not daemons or are
    datavalue's own (named ``datavalue-*``), other libraries' process-wide pools excepted."""
    allowed = _process_wide_workers()
    return [
        t
        for t in threading.enumerate()
        if t not in before
        and t not in allowed
        and t.is_alive()
        and (not t.daemon or t.name.startswith("datavalue"))
    ]


@pytest.fixture(autouse=True)
def no_thread_outlives_its_test() -> Iterator[None]:
    """Fail a test that leaves a thread running: a pool, reader or writer belongs to the object or
    build that started it, which joins it when it ends (``with`` / ``close()``). A leftover thread
    keeps working into the next test (a late chunk write once showed up in another test's count)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE_S
    left = _offending(before)
    while left and time.monotonic() < deadline:
        for t in left:
            t.join(max(0.0, deadline - time.monotonic()))
        left = _offending(before)
    if left:
        names = ", ".join(f"{t.name} (daemon={t.daemon})" for t in left)
        pytest.fail(
            f"threads started by this test are still running {THREAD_GRACE_S:g} s after it: {names}. "
            "Close the object that owns them (with / close()) before the test ends.",
            pytrace=False,
        )
