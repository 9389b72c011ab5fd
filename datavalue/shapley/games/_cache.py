"""Append-only on-disk cache of coalition utilities (JSON lines, never pickle).

Expensive utilities (one fine-tuned model per coalition) are evaluated once and written here the
moment they are known, so a crashed or interrupted run resumes where it stopped::

    {"schema": "datavalue.shapley.utility-cache", "version": 1, "n": 4, "fingerprint": "..."}
    {"mask": 0, "value": -1234.5}
    {"mask": 5, "value": -1001.25}

The first line is a header; each further line is one coalition, keyed by its bitmask (bit ``i``
set when player ``i`` is in the coalition). Floats are written with ``repr`` and so round-trip
exactly. Reopening checks the header loudly, before anything else and without touching the file:
a file that is not a utility cache (no cache header on line 1) is refused as it is, and a cache
written for a different number of players or a different ``fingerprint`` (e.g. a hash of the
training config) is refused rather than silently reused. A final line cut short by a crash is
never dropped silently: as ``RoyaltyLedger.recover`` does for a ledger, its bytes are moved to
``<cache>.torn-<UTC time>`` beside the cache and a warning names that file; every complete line
is kept, and that one coalition is evaluated again.

One writer per cache: an open ``DiskCache`` holds the lock file ``<cache>.lock`` (pid, host, start
time; see :mod:`datavalue._lock`; named after the file a symbolic link leads to, so a link to the
cache shares its lock) until :meth:`DiskCache.close`, so a second handle, in this
process or another, is refused with an error naming the holder instead of truncating an append in
flight. The lock is held for the cache's lifetime rather than per append (as the ledger does)
because every write of a game goes through one ``DiskCache`` in one process (the thread pool and
dask both hand their results back to it), so parallel evaluation is unaffected, and a second run
on the same cache would only retrain the same coalitions. A lock left by a killed process on this
host is taken over (with a warning).

A coalition may appear twice (a resumed run, or caches concatenated by hand): identical values
are fine, but two different values for one coalition are refused on load and on ``put`` rather
than letting the later line silently win -- the utility is assumed deterministic, and a cache
that says both 3 and 333 cannot be trusted to pay anyone.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import threading
from pathlib import Path

import numpy as np

from datavalue._files import atomic_write, inside_run_problem, unexpanded_home_problem, unshare
from datavalue._lock import LockFile
from datavalue.shapley._errors import CacheMismatchError, OutputPathError, UtilityError

__all__ = ["DiskCache"]

logger = logging.getLogger(__name__)

_SCHEMA = "datavalue.shapley.utility-cache"
_VERSION = 1


class DiskCache:
    """A JSON-lines file mapping coalition bitmasks to utilities.

    Args:
        path: the cache file; created (with its parent directory) when missing.
        n: number of players of the game.
        fingerprint: free text identifying the utility (model, data, training config). A cache
            whose recorded fingerprint differs is refused.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "u.jsonl")
        >>> with DiskCache(path, n=2, fingerprint="demo") as c:
        ...     c.put(3, 1.5)
        >>> DiskCache(path, n=2, fingerprint="demo").get(3)
        1.5
    """

    def __init__(self, path: str | os.PathLike[str], *, n: int, fingerprint: str = "") -> None:
        self.path = Path(path)
        home = unexpanded_home_problem(path, "the utility cache")  # not ./~/...: the rule Recorder("~/r") follows
        if home is not None:
            raise OutputPathError(home)
        if isinstance(n, bool | np.bool_) or not isinstance(n, int | np.integer) or n < 0:  # P9-09
            raise UtilityError(f"n (the number of players) must be an int >= 0, got {n!r} ({type(n).__name__}); "
                               "nothing is rounded or converted.")
        self.n = int(n)
        self.fingerprint = str(fingerprint)
        self._values: dict[int, float] = {}
        self._lock = threading.Lock()
        self._fh = None
        if self.path.is_dir():
            raise CacheMismatchError(
                f"{self.path} is a directory; a utility cache is one JSON-lines file. Pass a file "
                f"path (e.g. {self.path / 'utilities.jsonl'})."
            )
        if self.path.exists() and self.path.stat().st_size > 0:
            self._check_header(self._first_line())  # before the lock: a foreign file gets no lock file
        else:  # a new cache (and its lock file) is never created inside a datavalue run
            inside = inside_run_problem(self.path, "a new utility cache (with its lock file)")
            if inside is not None:
                raise OutputPathError(inside)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = LockFile(
            self.lock_path,
            subject=f"utility cache {self.path}",
            error=CacheMismatchError,
            busy_hint=(
                "One writer per cache: close the other handle (game.close()) or wait for that run "
                "to finish, or pass another cache_path."
            ),
            purpose="DiskCache",
        )
        self._writer.acquire()
        try:
            if self.path.exists() and self.path.stat().st_size > 0:
                self._unshare()  # a hard-link snapshot's file is never written (truncated, appended) in place
                self._load()
            else:
                self._create()
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except BaseException:
            self._writer.release()
            raise

    @property
    def lock_path(self) -> Path:
        """The writer's lock file ``<cache>.lock`` (present while a handle is open), named after the
        file a symbolic link leads to, so every path to one cache shares one lock."""
        real = Path(os.path.realpath(self.path))
        return real.with_name(real.name + ".lock")

    def _create(self) -> None:
        header = {
            "schema": _SCHEMA,
            "version": _VERSION,
            "n": self.n,
            "fingerprint": self.fingerprint,
            "created": _dt.datetime.now(_dt.UTC).isoformat(),
        }
        real = Path(os.path.realpath(self.path))  # a link to a cache not yet written stays a link
        with atomic_write(real) as tmp, open(tmp, "w", encoding="utf-8") as f:  # the header appears whole or not at all
            f.write(json.dumps(header, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _first_line(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.readline(1 << 20)

    def _check_header(self, first: bytes) -> None:
        """Refuse a file that is not a cache of this game; reads only, never writes."""
        try:
            header = json.loads(first.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict) or header.get("schema") != _SCHEMA:
            raise CacheMismatchError(
                f"{self.path} is not a datavalue utility cache (expected a header with "
                f"schema={_SCHEMA!r} on line 1); it was left untouched. Pass a new cache_path."
            )
        if header.get("version") != _VERSION:
            raise CacheMismatchError(
                f"{self.path} has cache version {header.get('version')}; this library reads "
                f"version {_VERSION}. Recompute into a new cache_path."
            )
        if header.get("n") != self.n:
            raise CacheMismatchError(
                f"{self.path} was written for n={header.get('n')} players; this game has "
                f"n={self.n}. Use a new cache_path for a game with different players."
            )
        if header.get("fingerprint") != self.fingerprint:
            raise CacheMismatchError(
                f"{self.path} was written with fingerprint={header.get('fingerprint')!r}; this "
                f"utility has fingerprint={self.fingerprint!r}. Reusing it would mix utilities of "
                "different models: use a new cache_path, or pass the recorded fingerprint."
            )

    def _unshare(self) -> bool:
        """Give the cache file its own inode when another directory shares it (a hard-link snapshot,
        ``cp -al``; ``st_nlink > 1``): a copy, fsynced, renamed over it (as the ledger does), so the
        snapshot keeps its bytes. Returns whether it copied. Call with the writer's lock held."""
        return unshare(self.path)

    def _move_torn_tail(self, raw: bytes) -> bytes:
        """Move bytes after the last newline (an append cut short) to ``<cache>.torn-<time>``."""
        cut = raw.rfind(b"\n") + 1
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        real = Path(os.path.realpath(self.path))
        aside = real.with_name(f"{real.name}.torn-{stamp}")
        with open(aside, "xb") as f:
            f.write(raw[cut:])
            f.flush()
            os.fsync(f.fileno())
        with open(self.path, "r+b") as f:
            f.truncate(cut)
            os.fsync(f.fileno())
        logger.warning(
            "utility cache %s ends with a partial line %d (an append cut short by a crash); moved "
            "its %d bytes to %s and kept the %d complete lines before it",
            self.path,
            raw.count(b"\n") + 1,
            len(raw) - cut,
            aside,
            raw.count(b"\n"),
        )
        return raw[:cut]

    def _load(self) -> None:
        raw = self.path.read_bytes()
        first_end = raw.find(b"\n")
        self._check_header(raw if first_end < 0 else raw[: first_end + 1])
        if first_end < 0:  # a whole header whose newline was cut: complete it (nothing is lost)
            with open(self.path, "ab") as f:
                f.write(b"\n")
                os.fsync(f.fileno())
            raw += b"\n"
        if not raw.endswith(b"\n"):
            raw = self._move_torn_tail(raw)
        lines = raw.decode("utf-8").splitlines()
        first_line: dict[int, int] = {}
        for lineno, line in enumerate(lines[1:], start=2):
            try:
                rec = json.loads(line)
                mask, value = rec["mask"], rec["value"]
                if type(mask) is not int or type(value) not in (int, float):  # noqa: E721 - no bools, no strings
                    raise TypeError(mask, value)
                value = float(value)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise CacheMismatchError(
                    f"{self.path}:{lineno} is not a cache record (expected "
                    f'{{"mask": int, "value": float}}); got {line[:80]!r}.'
                ) from None
            if mask < 0 or mask.bit_length() > self.n:  # not 1 << n: a huge n would allocate it (P9-09)
                raise CacheMismatchError(
                    f"{self.path}:{lineno} has mask {mask} outside 0..2**{self.n}-1."
                )
            old = self._values.get(mask)
            if old is not None and old != value:
                raise CacheMismatchError(
                    f"{self.path}:{lineno} records mask {mask} with value {value!r}, but line "
                    f"{first_line[mask]} recorded {old!r}. The utility must be deterministic "
                    "(fix seeds), or two different utilities wrote to one cache: delete the "
                    "wrong lines or use a new cache_path."
                )
            first_line.setdefault(mask, lineno)
            self._values[mask] = value
        logger.info("resumed utility cache %s with %d coalitions", self.path, len(self._values))

    def get(self, mask: int) -> float | None:
        """The cached utility of ``mask``, or ``None``."""
        return self._values.get(mask)

    def __contains__(self, mask: object) -> bool:
        return mask in self._values

    def __len__(self) -> int:
        return len(self._values)

    def items(self) -> list[tuple[int, float]]:
        """All cached ``(mask, value)`` pairs."""
        return list(self._values.items())

    def put(self, mask: int, value: float) -> None:
        """Record a utility and flush it to disk immediately.

        Recording a coalition again with the same value is a no-op.

        Raises:
            CacheMismatchError: if ``mask`` is cached with a different value.
        """
        if isinstance(value, str | bytes | bool | np.bool_):
            raise UtilityError(
                f"a cached utility must be a float; got {value!r} of type {type(value).__name__} for "
                f"mask {mask}. Nothing is converted."
            )
        value = float(value)
        if not math.isfinite(value):
            raise UtilityError(f"cannot cache non-finite utility {value} for mask {mask}.")
        self._check_mask(mask)
        mask = int(mask)
        with self._lock:
            old = self._values.get(mask)
            if old is not None:
                if old != value:
                    raise CacheMismatchError(
                        f"utility cache {self.path} already has mask {mask} = {old!r}; got "
                        f"{value!r}. The utility must be deterministic (fix seeds), or use a new "
                        "cache_path for a different utility."
                    )
                return
            if os.fstat(self._fh.fileno()).st_nlink > 1 and self._unshare():  # snapshot taken while open
                self._fh.close()
                self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._values[mask] = value
            self._fh.write(json.dumps({"mask": int(mask), "value": value}) + "\n")
            self._fh.flush()

    def _check_mask(self, mask: object) -> None:
        """Refuse, before anything is written, a mask that is no coalition of the ``n`` players (P9-08: a
        float was written truncated, 2.5 as coalition 2; a mask outside ``0..2**n-1`` was written, and the
        cache, every utility in it, then refused to open)."""
        if isinstance(mask, bool | np.bool_) or not isinstance(mask, int | np.integer):
            raise UtilityError(f"a coalition mask must be an int (bit i set: player i in the coalition), got {mask!r} "
                               f"({type(mask).__name__}); nothing is rounded or converted. Nothing was written.")
        if mask < 0 or int(mask).bit_length() > self.n:
            raise UtilityError(f"mask {mask} is no coalition of this cache's n={self.n} players (expected "
                               f"0..2**{self.n}-1); nothing was written, the cache is as it was.")

    def close(self) -> None:
        """Flush to stable storage and close the file."""
        with self._lock:
            try:
                if self._fh is not None and not self._fh.closed:
                    self._fh.flush()
                    os.fsync(self._fh.fileno())
                    self._fh.close()
            finally:
                self._writer.release()

    def __enter__(self) -> DiskCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; callers should close()
        fh = getattr(self, "_fh", None)
        if fh is not None and not fh.closed:
            fh.close()
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.release()
