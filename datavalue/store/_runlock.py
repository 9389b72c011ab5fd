"""One writer per run: the lock file ``<run>/writer.lock``.

A :class:`~datavalue.store.RunWriter` (so every ``Recorder``, ``JaxRecorder``, ``FinalPass`` and the
Trainer callback) holds it from before it creates, replaces or resumes the run until it is closed;
embedding builds hold it while they write (:func:`writes_run`). A second writer gets
:class:`~datavalue.errors.StoreLockedError` naming the holder (what it does, pid, host, since when).
The lock itself is :class:`datavalue._lock.LockFile` (shared with the royalty ledger): created
atomically, a dead process's lock on this host is taken over safely, another host's never. A
``kill -9`` leaves the file behind; the next writer finds its process gone and takes it over.

A child run (``<run>/final``, the final-weights pass) also holds its parent's lock: replacing or
resuming the parent must not happen under it.

Readers never lock: they see what the commit covers.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from datavalue._files import sweep_partials
from datavalue._lock import LockFile, holder_state, read_holder
from datavalue.errors import StoreLockedError, StoreReadOnlyError

#: name of the lock file inside a run directory
LOCK_FILE = "writer.lock"

_F = TypeVar("_F", bound=Callable[..., Any])
_NESTED = threading.local()  # runs this thread already holds through writes_run (nested calls)


def run_lock(path: str | os.PathLike[str], purpose: str) -> LockFile:
    """The (not yet acquired) writer lock of the run directory ``path``."""
    path = Path(os.path.abspath(path))  # not realpath: the store's link checks rely on the path as given
    return LockFile(
        path / LOCK_FILE, subject=f"run {path}", error=StoreLockedError, purpose=purpose,
        busy_hint="One writer per run: close that writer (rec.close(), or leave its `with` block) or wait "
        "for it to finish, then retry. Reading the run (open_run, Attributor) needs no lock.",
        read_only_error=StoreReadOnlyError, read_only_hint=(
            f"Building embeddings, resuming a recorder or a replay writes into the run ({purpose} does): copy the "
            f"run to a writable place (cp -r {path} /writable/place/) and run it there, or get write access. "
            "Reading it where it is (open_run, Attributor, datavalue query) works."),
    )


def live_holder(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder of ``<path>/writer.lock`` unless it is gone or stale (a dead process on this host)."""
    holder = read_holder(Path(path) / LOCK_FILE)
    if holder is None or holder_state(holder) == "dead":
        return None
    return holder


def refuse_if_locked(path: str | os.PathLike[str], purpose: str) -> None:
    """Raise :class:`StoreLockedError` when a live writer holds the run at ``path``."""
    holder = live_holder(path)
    if holder is not None:
        raise StoreLockedError(run_lock(path, purpose).locked_message(holder))


def only_the_lock(path: Path) -> bool:
    """Whether the directory ``path`` holds nothing but lock files (a writer killed before it wrote)."""
    return path.is_dir() and not path.is_symlink() and all(
        p.name == LOCK_FILE or (p.name.startswith(LOCK_FILE + ".") and p.name.endswith(".partial"))
        for p in path.iterdir()
    )


def sweep_run(path: str | os.PathLike[str]) -> list[Path]:
    """Remove what writers killed mid-write left in the run ``path``: half-written chunk files
    (``.<chunk>.<pid>.<thread>.partial``) of processes that are gone, and lock files a dead process
    was installing (``writer.lock.<token>.partial``). Only the holder of the run's lock may call it."""
    removed = sweep_partials(path)
    root = Path(path)
    for p in root.glob(LOCK_FILE + ".*.partial"):
        holder = read_holder(p)
        try:  # unreadable: torn by the kill that left it, or being written this instant (so: old ones only)
            torn = holder is None and time.time() - p.stat().st_mtime > 60
        except FileNotFoundError:
            continue
        if torn or (holder is not None and holder_state(holder) == "dead"):
            with suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


@contextmanager
def lock_run(path: str | os.PathLike[str], purpose: str) -> Iterator[None]:
    """Hold the writer lock of the local run ``path`` for the ``with`` block; a run this thread
    already holds through :func:`lock_run` (a nested call) is not locked again. Archives, URLs and
    paths without a run pass unlocked (writes there are refused by the store anyway).

    Raises:
        StoreLockedError: another writer holds the run.

    Example:
        >>> with lock_run("runs/x.zarr", "my tool"):   # doctest: +SKIP
        ...     ...                                     # write derived arrays into the run
    """
    held: set[str] = _NESTED.__dict__.setdefault("runs", set())
    if not isinstance(path, (str, os.PathLike)) or not Path(path, "zarr.json").is_file():
        yield
        return
    key = os.path.realpath(path)
    if key in held:
        yield
        return
    lock = run_lock(path, purpose)
    lock.acquire()
    held.add(key)
    sweep_run(path)  # what a killed writer left half-written: ours to remove now
    try:
        yield
    finally:
        held.discard(key)
        lock.release()


def writes_run(purpose: str) -> Callable[[_F], _F]:
    """Decorate a function whose first argument is a run path (or an open :class:`~datavalue.store.Run`,
    replaced by its path): it runs holding the run's writer lock (:func:`lock_run`)."""

    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def locked(path: Any, *args: Any, **kwargs: Any) -> Any:
            from datavalue.store._reader import Run

            if isinstance(path, Run):  # an open run: write to (and lock) its directory, read it afresh
                path = path.path
            with lock_run(path, purpose):
                return fn(path, *args, **kwargs)

        return locked  # type: ignore[return-value]

    return wrap
