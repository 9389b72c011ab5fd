"""Every recorded chunk bound to its run: the chunk digest record.

A chunk file is the raw rows and their crc32c (``docs/store-format.md``); the crc only says the file
is whole. A chunk file copied from another run with the same shapes (``cp other.zarr/grads/c/0/0
run.zarr/grads/c/0/0``) is whole too, and would read as this run's data. So the writer keeps, for
each recorded array and chunk ``i``, ``h[i] = crc32c(run_id || crc_i)`` (``crc_i``: the chunk's
4-byte crc32c trailer, little endian) in one file at the run's root, :data:`CHUNK_DIGEST_FILE`.
Readers compare the trailer they read anyway: no extra pass over the data.

Crash protocol. The writer rewrites each array's partial tail chunk at every commit, and a commit is
"data chunks, then the ``commit`` chunk". The record of a commit is written (one atomic file
replace) *before* its chunks, and says which commit it leads to (``after``) and from which
(``before``); for every chunk the commit rewrites it keeps the previous digest too. A reader pairs
it with the ``commit`` on disk:

* commit == ``after``: the commit completed; only the new digests are accepted;
* commit == ``before``: killed between the record and the commit: a rewritten chunk may be either
  version on disk, so either digest is accepted (its committed rows are the same in both). Any
  other commit (one restored from an older copy: the run went back, which the embeddings' checks
  name) is read the same way: its rows are a prefix of the chunks', whichever version.

An older copy of this run's chunk therefore matches no digest, except the version of one commit
back while a commit is in flight; that one lacks committed rows, which the unwritten-row marker
catches (``_schema.unwritten_value``).

File layout (little endian): ``b"DVCD"``, u32 version, u16 + run id (ascii), u8 has_before,
``before`` 4 x i64, ``after`` 4 x i64, u32 number of arrays; per array: u16 + name, u32 ``n``,
u32 ``p``, ``n`` u32 digests, ``p`` pairs (u32 chunk, u32 previous digest); then the crc32c of
everything before it.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import crc32c
import numpy as np

from datavalue.errors import StoreCorruptError
from datavalue.store._schema import CHUNK_DIGEST_FILE

FORMAT_VERSION = 1
_MAGIC = b"DVCD"
_COMMIT = struct.Struct("<4q")

Commit = tuple[int, int, int, int]


def run_seed(run_id: str) -> int:
    """``crc32c(run_id)``: the running crc that :func:`bound` continues (computed once per run)."""
    return crc32c.crc32c(run_id.encode("ascii"))


def bound(seed: int, crc: int) -> int:
    """``crc32c(run_id || crc.to_bytes(4, "little"))`` for ``seed = run_seed(run_id)``."""
    return crc32c.crc32c(crc.to_bytes(4, "little"), seed)


def fix_message() -> str:
    return ("Restore the run from a whole copy of its directory (taken after rec.flush() or rec.close()), or "
            "re-record it; a chunk file cannot be mixed in from another run or another copy.")


def mismatch_message(location: object, label: str, path: object, crc: int) -> str:
    """The error for a chunk whose trailer matches no digest of the run's record."""
    return (
        f"{location}: chunk {label} is not this run's (file {path}): its checksum {crc:08x} is not the one the "
        f"run's digest record ({CHUNK_DIGEST_FILE}) binds to this run's id for that chunk. It was copied in from "
        "another run with the same shapes, or from an older copy of this run, and its rows would read as this "
        f"run's data. {fix_message()}"
    )


# ---------------------------------------------------------------------------------------------- writer
class DigestWriter:
    """The writer's side: every recorded array's digests in memory, the record written per commit.

    Args:
        root: the run directory.
        run_id: the run's id (root attribute ``datavalue_run_id``).
        digests: the digests of the chunks already written (a resumed run), per array.
    """

    def __init__(self, root: Path, run_id: str, digests: dict[str, np.ndarray] | None = None) -> None:
        self.root, self.run_id = Path(root), str(run_id)
        self.seed = run_seed(self.run_id)
        self._head = _MAGIC + struct.pack("<IH", FORMAT_VERSION, len(self.run_id)) + self.run_id.encode("ascii")
        self._h: dict[str, np.ndarray] = {}  # the first _n[name] entries are the digests
        self._n: dict[str, int] = {}
        self._names: dict[str, bytes] = {}
        self._prev: dict[str, list[tuple[int, int]]] = {}  # this commit's rewritten chunks: (i, previous digest)
        for name, h in (digests or {}).items():
            self._h[name] = np.array(h, dtype="<u4")
            self._n[name] = len(h)

    def stage(self, name: str, i: int, crc: int) -> None:
        """Record that chunk ``i`` of array ``name`` is about to be written with trailer ``crc``."""
        h = self._h.get(name)
        n = self._n.get(name, 0)
        if h is None or i >= len(h):  # grow (doubling: a long run resizes rarely)
            grown = np.zeros(max(2 * (0 if h is None else len(h)), i + 1, 16), dtype="<u4")
            if h is not None:
                grown[:n] = h[:n]
            self._h[name] = h = grown
        if i < n:
            self._prev.setdefault(name, []).append((i, int(h[i])))
        elif i > n:  # never: chunks are written in order; the gap would hold digest 0
            raise RuntimeError(f"internal: chunk {name}/c/{i} staged before chunk {n}")
        h[i] = bound(self.seed, crc)
        self._n[name] = max(n, i + 1)

    def write(self, before: Commit | None, after: Commit) -> None:
        """Write the record of the commit ``before -> after`` (atomically), then forget this commit's
        previous digests (the next commit's record keeps only its own)."""
        parts = [self._head, b"\x01" + _COMMIT.pack(*before) if before is not None else b"\x00" + bytes(32),
                 _COMMIT.pack(*after), struct.pack("<I", len(self._n))]
        for name in sorted(self._n):
            prev = self._prev.get(name, ())
            key = self._names.get(name)
            if key is None:
                raw = name.encode("utf-8")
                key = self._names[name] = struct.pack("<H", len(raw)) + raw
            parts += [key, struct.pack("<II", self._n[name], len(prev)), memoryview(self._h[name][: self._n[name]]).cast("B")]
            if prev:
                parts.append(np.asarray(prev, dtype="<u4").tobytes())
        body = b"".join(parts)
        path = self.root / CHUNK_DIGEST_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(body)
                f.write(crc32c.crc32c(body).to_bytes(4, "little"))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._prev.clear()


# ---------------------------------------------------------------------------------------------- reader
class DigestRecord:
    """A parsed record: ``run_id``, ``before``/``after`` commits, per array its digests ``h`` and the
    previous digests ``prev`` (``{chunk: digest}``) of the chunks its commit rewrites."""

    def __init__(self, run_id: str, before: Commit | None, after: Commit, h: dict[str, np.ndarray],
                 prev: dict[str, dict[int, int]]) -> None:
        self.run_id, self.before, self.after, self.h, self.prev = run_id, before, after, h, prev

    @classmethod
    def parse(cls, data: bytes, location: object) -> DigestRecord:
        def bad(why: str) -> StoreCorruptError:
            return StoreCorruptError(
                f"{location}: the run's chunk digest record ({CHUNK_DIGEST_FILE}) is corrupt ({why}). {fix_message()}")

        if len(data) < 4 or crc32c.crc32c(data[:-4]) != int.from_bytes(data[-4:], "little"):
            raise bad("truncated, or its crc32c does not match")
        if data[:4] != _MAGIC:
            raise bad("not a datavalue chunk digest record")
        try:
            version, n_id = struct.unpack_from("<IH", data, 4)
            if version != FORMAT_VERSION:
                raise bad(f"format version {version}; this datavalue reads version {FORMAT_VERSION}")
            pos = 10
            run_id = data[pos : pos + n_id].decode("ascii")
            pos += n_id
            has_before = data[pos]
            before = _COMMIT.unpack_from(data, pos + 1) if has_before else None
            after = _COMMIT.unpack_from(data, pos + 33)
            (n_arrays,) = struct.unpack_from("<I", data, pos + 65)
            pos += 69
            h: dict[str, np.ndarray] = {}
            prev: dict[str, dict[int, int]] = {}
            for _ in range(n_arrays):
                (n_name,) = struct.unpack_from("<H", data, pos)
                name = data[pos + 2 : pos + 2 + n_name].decode("utf-8")
                pos += 2 + n_name
                n, p = struct.unpack_from("<II", data, pos)
                pos += 8
                h[name] = np.frombuffer(data, dtype="<u4", count=n, offset=pos)
                pos += 4 * n
                pairs = np.frombuffer(data, dtype="<u4", count=2 * p, offset=pos).reshape(p, 2)
                prev[name] = {int(i): int(v) for i, v in pairs}
                pos += 8 * p
        except (struct.error, ValueError, IndexError) as exc:
            raise bad(f"unreadable: {exc}") from exc
        if pos != len(data) - 4:
            raise bad(f"{len(data) - 4 - pos} bytes past its last entry")
        return cls(run_id, tuple(before) if before else None, tuple(after), h, prev)  # type: ignore[arg-type]


class ChunkDigests:
    """What a reader accepts: per array and chunk, the digests of the versions a consistent run may
    hold (see the module docstring). Picklable (numpy arrays and ints).

    Args:
        record: the run's parsed record.
        run_id: the run's id (its root attribute).
        commit: the run's ``commit`` chunk as read with the record (``None``: there is none yet).
        location: the run, for messages.
        load: re-reads ``(record, commit)`` from the store; a reader whose chunk matches no digest
            reloads once (a recorder may have committed since the record was read).
    """

    def __init__(self, record: DigestRecord, run_id: str, commit: Commit | None, location: object,
                 load: Callable[[], tuple[DigestRecord, Commit | None]] | None = None) -> None:
        self.location, self.run_id, self.seed = location, run_id, run_seed(run_id)
        self._load = load
        self._set(record, commit)

    def _set(self, record: DigestRecord, commit: Commit | None) -> None:
        if record.run_id != self.run_id:
            raise StoreCorruptError(
                f"{self.location}: the chunk digest record ({CHUNK_DIGEST_FILE}) was written by another run (run id "
                f"{record.run_id!r}; this run's is {self.run_id!r}): it was copied in from another run, so nothing binds "
                f"this run's chunks. {fix_message()}")
        # the commit completed: only the new digests; otherwise (killed between the record and the commit,
        # or a commit restored from an older copy: its fewer rows are a prefix of the chunks' rows) either
        # version of a chunk the record's commit rewrote
        lenient = commit != record.after
        self.h = record.h
        self.prev = record.prev if lenient else {}
        self.commit = commit

    def bind(self, crc: int) -> int:
        """The digest this run's record holds for a chunk with trailer ``crc``."""
        return bound(self.seed, crc)

    def covers(self, name: str) -> bool:
        return name in self.h

    def n_chunks(self, name: str) -> int:
        h = self.h.get(name)
        return 0 if h is None else len(h)

    def accepts(self, name: str, i: int, crc: int) -> bool:
        """Whether a chunk ``i`` of ``name`` with trailer ``crc`` is one this run wrote there."""
        h = self.h.get(name)
        if h is None or i >= len(h):
            return False
        d = bound(self.seed, crc)
        return d == int(h[i]) or self.prev.get(name, {}).get(i) == d

    def check(self, name: str, i: int, crc: int, *, label: str, path: object) -> None:
        """Raise :class:`StoreCorruptError` unless :meth:`accepts` (after one reload of the record, for
        a reader that runs beside the recorder)."""
        if self.accepts(name, i, crc):
            return
        if self._load is not None:
            self._set(*self._load())
            if self.accepts(name, i, crc):
                return
        if i >= self.n_chunks(name):
            raise StoreCorruptError(
                f"{self.location}: chunk {label} (file {path}) holds committed rows but the run's chunk digest record "
                f"({CHUNK_DIGEST_FILE}) lists {self.n_chunks(name)} chunk(s) of {name!r}: the record is older than the "
                f"data or another run's. {fix_message()}")
        raise StoreCorruptError(mismatch_message(self.location, label, path, crc))

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_load"] = None  # a closure over a store: not shipped to other processes
        return state


def read_commit_bytes(raw: bytes | None) -> Commit | None:
    """The ``commit`` chunk's values from its raw bytes (``None``: no chunk, or not one we can decode:
    ``read_commit`` names that damage)."""
    if raw is None or len(raw) != 36 or crc32c.crc32c(raw[:32]) != int.from_bytes(raw[32:], "little"):
        return None
    return tuple(int(x) for x in _COMMIT.unpack(raw[:32]))  # type: ignore[return-value]


def load_pair(get: Callable[[str], bytes | None], location: object, *, tries: int = 4) -> tuple[DigestRecord, Commit | None] | None:
    """``(record, commit)`` read as a consistent pair through ``get`` (raw bytes of a key inside the
    run, ``None`` when absent), or ``None`` when the run has no record. The commit is read first, then
    the record (a recorder writes them in the other order), and again while they disagree (a
    recorder committing meanwhile); the last pair is returned for :class:`ChunkDigests` to judge."""
    pair = None
    for _ in range(tries):
        commit = read_commit_bytes(get("commit/c/0"))
        raw = get(CHUNK_DIGEST_FILE)
        if raw is None:
            return None
        record = DigestRecord.parse(raw, location)
        pair = (record, commit)
        if commit == record.after or commit == record.before:
            break
    return pair


def local_get(root: Path) -> Callable[[str], bytes | None]:
    """A ``get`` for :func:`load_pair` over a run directory."""

    def get(key: str) -> bytes | None:
        try:
            return root.joinpath(*key.split("/")).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    return get


def read_trailer(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(crc trailer, file size)`` of a local chunk file, or ``None`` when it is missing or shorter
    than 4 bytes (the reader names that damage)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        size = os.fstat(fd).st_size
        if size < 4:
            return None
        raw = os.pread(fd, 4, size - 4)
    finally:
        os.close(fd)
    return (int.from_bytes(raw, "little"), size) if len(raw) == 4 else None
