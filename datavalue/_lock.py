"""One writer at a time: an exclusive lock file that names its holder.

Shared by the royalty ledger (``<ledger>.lock``, held for one append) and the run store
(``<run>/writer.lock``, held while a ``Recorder`` or a build writes into the run). Neither package
may import the other, so the mechanism lives here, in the base; each caller says what the lock
guards (``subject``), which error it raises and what a waiting user should do.

The protocol:

* **create atomically**: the holder's JSON (pid, host, start time, a random token, the process's
  start tick where the OS reports it, and what it is doing) is written to a temporary file, which
  is then hard-linked to the lock name; ``link`` fails when the name exists, so the lock appears
  whole or not at all (no empty lock file after a ``kill -9``). Filesystems without hard links
  fall back to ``O_CREAT | O_EXCL``;
* **a live holder** is never disturbed: the caller waits up to ``timeout`` seconds, then raises an
  error naming pid, host, start time, purpose and the lock file;
* **a stale lock** (its process is gone, on this host: ``kill -9``, a crash, a reboot) is taken over
  safely: under an advisory ``flock`` on the lock's directory (released by the kernel when a
  process dies, so it can never go stale itself), the lock is read again and, if it still names
  the same dead holder, atomically replaced (``os.replace``) by ours: no moment without a lock,
  and two processes taking over at once cannot both win;
* **a directory that cannot be written** (a read-only file system, ``EROFS``; no write permission,
  ``EACCES``/``EPERM``): the lock cannot be created, so the caller's ``read_only_error`` is raised
  saying so and what to do (``read_only_hint``), not the raw ``OSError`` naming a lock temporary;
* **another host's lock** is never taken over automatically (its pid means nothing here): the
  error says to check that host and delete the file;
* a pid reused by a new process (containers restart pids from 1) does not keep a dead holder
  alive: the holder's process start tick (``/proc/<pid>/stat``) is recorded and compared, and a
  lock naming this very process but no lock it holds is stale.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: tokens of the locks this process holds (a lock naming our pid without one of these is stale)
_HELD: set[str] = set()
_HELD_GUARD = threading.Lock()

#: errors of a directory that cannot be written: read-only file system, no permission
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _start_tick(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), else ``None``."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def read_holder(lock: Path) -> dict[str, Any] | None:
    """Who holds ``lock`` (its JSON), or ``None`` when it is gone or unreadable."""
    try:
        holder = json.loads(Path(lock).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def holder_state(holder: dict[str, Any]) -> str:
    """``"alive"``, ``"dead"`` (a process of this host that is gone) or ``"foreign"`` (another host,
    or a holder without a checkable pid (:func:`checkable`): never judged). A pid of 0 or -1 is no
    process: ``os.kill`` with it signals a whole group, which always answers, so such a lock read as
    "still running" forever (P9-18)."""
    if not checkable(holder):
        return "foreign"
    pid = int(holder["pid"])
    if holder.get("host") != socket.gethostname():
        return "foreign"
    if pid == os.getpid():
        token = holder.get("token")
        return "alive" if token is None or token in _HELD else "dead"
    if not _pid_alive(pid):
        return "dead"
    recorded, now = holder.get("pid_start"), _start_tick(pid)
    if recorded is not None and now is not None and int(recorded) != now:
        return "dead"  # the pid was reused by a process started later
    return "alive"


def checkable(holder: dict[str, Any]) -> bool:
    """Whether ``holder`` names a process that can be asked about: a positive int pid and a host (a
    lock file datavalue wrote; else it was damaged or edited)."""
    pid = holder.get("pid")
    return not isinstance(pid, bool) and isinstance(pid, int) and pid > 0 and isinstance(holder.get("host"), str)


def describe(holder: dict[str, Any]) -> str:
    """``"<purpose> in pid N on host 'h' since T"`` (``"this process"`` for our own pid)."""
    pid = holder.get("pid")
    who = f"pid {pid} on host {holder.get('host')!r}"
    if pid == os.getpid() and holder.get("host") == socket.gethostname():
        who = f"this process (pid {pid}) on host {holder.get('host')!r}"
    what = f"{holder['purpose']} in " if holder.get("purpose") else ""
    since = f" since {holder['since']}" if holder.get("since") else ""
    return f"{what}{who}{since}"


@contextlib.contextmanager
def _directory_guard(directory: Path):
    """An advisory ``flock`` on ``directory`` for the few system calls of a takeover; the kernel
    drops it when the process dies. Where flock is unavailable the takeover runs unguarded."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


class LockFile:
    """An exclusive lock file ``path`` naming its holder; see the module docstring.

    Args:
        path: the lock file.
        subject: what it guards, for messages (``"ledger /x/l.jsonl"``, ``"run /x/r.zarr"``).
        error: the exception class raised when the lock is held by someone else.
        busy_hint: what to do when a live process on this host holds it (end of the message).
        purpose: what the holder is doing (``"Recorder"``, ``"build_embeddings"``), stored in the lock.
        read_only_error: the exception class raised when the lock's directory cannot be written
            (read-only file system, no permission); default ``error``.
        read_only_hint: what to do then (end of that message).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with LockFile(d / "x.lock", subject="x", error=RuntimeError, busy_hint="wait") as lk:
        ...     (d / "x.lock").exists()
        True
        >>> (d / "x.lock").exists()
        False
    """

    def __init__(self, path: str | os.PathLike[str], *, subject: str, error: type[Exception],
                 busy_hint: str, purpose: str | None = None, read_only_error: type[Exception] | None = None,
                 read_only_hint: str = "Give a path on a writable file system.") -> None:
        self.path = Path(os.path.abspath(path))  # once: release after an os.chdir removes this lock
        self.subject, self.error, self.busy_hint, self.purpose = subject, error, busy_hint, purpose
        self.read_only_error, self.read_only_hint = read_only_error or error, read_only_hint
        self._me: dict[str, Any] | None = None
        self._pid = os.getpid()

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._me is not None

    def _record(self) -> dict[str, Any]:
        me: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
        }
        tick = _start_tick(os.getpid())
        if tick is not None:
            me["pid_start"] = tick
        if self.purpose:
            me["purpose"] = self.purpose
        return me

    def _write_tmp(self, me: dict[str, Any]) -> Path:
        tmp = self.path.with_name(f"{self.path.name}.{me['token'][:12]}.partial")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(me, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _create(self, me: dict[str, Any]) -> bool:
        """Create the lock naming ``me``; ``False`` when it exists."""
        tmp = self._write_tmp(me)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here: O_EXCL, then the content
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(me, sort_keys=True))
                f.flush()
                os.fsync(f.fileno())
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _take_over(self, holder: dict[str, Any], me: dict[str, Any]) -> bool:
        """Replace the lock when it still names the dead ``holder``; ``True`` when ours now."""
        with _directory_guard(self.path.parent):
            if read_holder(self.path) != holder or holder_state(holder) != "dead":
                return False  # released, or taken over by someone else meanwhile: start again
            tmp = self._write_tmp(me)
            os.replace(tmp, self.path)
        logger.warning("%s: took over the stale lock of %s (no longer running)", self.subject, describe(holder))
        return True

    def acquire(self, timeout: float = 0.0) -> None:
        """Take the lock, waiting up to ``timeout`` seconds for a live holder.

        Raises:
            self.error: another live holder (or one on another host) keeps it.
        """
        if self._me is not None:
            raise self.error(f"{self.subject}: this lock is already held by this object.")
        me = self._record()
        with _HELD_GUARD:
            _HELD.add(me["token"])
        deadline = time.monotonic() + float(timeout)
        changed = 0  # times the lock changed hands under us (released, or another process took it over)
        try:
            while True:
                if self._unwritable(self._create, me):
                    break
                holder = read_holder(self.path)
                if holder is not None and holder_state(holder) == "dead":
                    if self._unwritable(self._take_over, holder, me):
                        break
                    holder = None  # someone else took it over first: look again, so the error names them
                if holder is None and changed < 8:  # released or replaced between our two system calls
                    changed += 1
                    continue
                if time.monotonic() >= deadline:
                    raise self.error(self.locked_message(holder, timeout))
                time.sleep(0.02)
        except BaseException:
            with _HELD_GUARD:
                _HELD.discard(me["token"])
            raise
        self._me, self._pid = me, os.getpid()

    def _unwritable(self, step: Any, *args: Any) -> bool:
        """``step(*args)``, with a directory that cannot be written turned into ``read_only_error``."""
        try:
            return bool(step(*args))
        except OSError as exc:
            if exc.errno not in _UNWRITABLE:
                raise
            why = ("is on a read-only file system" if exc.errno == errno.EROFS
                   else "cannot be written by this user (permission denied)")
            raise self.read_only_error(
                f"{self.subject} {why}: its writer lock {self.path.name} cannot be created in {self.path.parent}. "
                f"{self.read_only_hint}") from exc

    def release(self) -> None:
        """Remove the lock if this object holds it (never someone else's). Idempotent."""
        me, self._me = self._me, None
        if me is None or os.getpid() != self._pid:  # a forked child never releases its parent's lock
            return
        try:
            if read_holder(self.path) == me:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            with _HELD_GUARD:
                _HELD.discard(me["token"])

    def locked_message(self, holder: dict[str, Any] | None, timeout: float = 0.0) -> str:
        """The error text for a lock held by ``holder``: who, since when, and how to clear it."""
        if holder is None:
            return (
                f"{self.subject} is locked ({self.path} exists but names no holder). If no writer is "
                "running, delete the lock file."
            )
        state = holder_state(holder)
        if not checkable(holder):
            return (
                f"{self.subject} is locked ({self.path} names no holder that can be checked: pid "
                f"{holder.get('pid')!r:.40}, host {holder.get('host')!r:.40}; the lock file was damaged or edited). "
                "If no writer is running, delete the lock file."
            )
        if state == "foreign":
            return (
                f"{self.subject} is locked by {describe(holder)} ({self.path}). A lock from another "
                "host is never taken over automatically: check that no writer runs there, then "
                "delete the lock file."
            )
        waited = f"; waited {timeout:g}s" if timeout > 0 else ""
        return (
            f"{self.subject} is locked by {describe(holder)} ({self.path}), which is still "
            f"running{waited}. {self.busy_hint}"
        )

    def __enter__(self) -> LockFile:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
