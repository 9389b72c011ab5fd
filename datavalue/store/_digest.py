"""Every recorded chunk bound to its run: the chunk digest record.

A chunk file is the raw rows and their crc32c (``docs/store-format.md``); the crc only says the file
is whole. A chunk file copied from another run with the same shapes (``cp other.zarr/grads/c/0/0
run.zarr/grads/c/0/0``) is whole too, and would read as this run's data. So the writer keeps, for
each recorded array and chunk ``i``, ``h[i] = crc32c(run_id || crc_i)`` (``crc_i``: the chunk's
4-byte crc32c trailer, little endian) in a record beside the commit, :data:`CHUNK_DIGEST_FILES`.
Readers compare the trailer they read anyway: no extra pass over the data.

Crash protocol. The writer rewrites each array's partial tail chunk at every commit, and a commit is
"data chunks, then the ``commit`` chunk". The record of a commit is written (one atomic file
write) *before* its chunks, and says which commit it leads to (``after``) and from which
(``before``); for every chunk the commit rewrites it keeps the previous digest too. The record goes
into two files in turn, overwritten in place (an atomic file replace cost 200-500 us on ext4 here, a
``pwrite`` 1-10 us); each carries a sequence number and its crc32c, and a reader takes the newest
whole one: a write torn by a kill leaves the other, which is the record of the commit on disk (the
torn one's chunks were not written yet). A file another directory shares (a hard-link snapshot,
``cp -al run backup``: ``st_nlink > 1``, one ``fstat`` per write) is never written in place: that
write goes to a temporary and is renamed over it (atomic, as every other file of the run), which
gives the run its own inode and leaves the snapshot's record as it was. A reader pairs the record
with the ``commit`` on disk:

* commit == ``after``: the commit completed; only the new digests are accepted;
* commit == ``before``: killed between the record and the commit: a rewritten chunk may be either
  version on disk, so either digest is accepted (its committed rows are the same in both). Any
  other commit (one restored from an older copy: the run went back, which the embeddings' checks
  name) is read the same way: its rows are a prefix of the chunks', whichever version.

An older copy of this run's chunk therefore matches no digest, except the version of one commit
back while a commit is in flight; that one lacks committed rows, which the unwritten-row marker
catches (``_schema.unwritten_value``).

File layout (little endian): ``b"DVCD"``, u32 version, u32 length ``L`` of the record (bytes past
it are ignored: a shorter record written over a longer one), u64 sequence number, u16 + run id
(ascii), u8 has_before, ``before`` 4 x i64, ``after`` 4 x i64, u32 number of arrays; per array:
u16 + name, u32 ``n``, u32 ``p``, ``n`` u32 digests, ``p`` pairs (u32 chunk, u32 previous digest);
then the crc32c of the ``L - 4`` bytes before it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import crc32c
import numpy as np

from datavalue._files import atomic_write
from datavalue.errors import StoreCorruptError
from datavalue.store._schema import CHUNK_DIGEST_FILES

#: How messages name the record.
RECORD = "commit/digests.0 and .1"

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
        f"run's digest record ({RECORD}) binds to this run's id for that chunk. It was copied in from "
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
        seq: the sequence number of the next record (a resumed run: one past the newest on disk).
    """

    def __init__(self, root: Path, run_id: str, digests: dict[str, np.ndarray] | None = None, *, seq: int = 0) -> None:
        self.root, self.run_id, self.seq = Path(root), str(run_id), int(seq)
        self._fds: list[int | None] = [None, None]  # the two files, opened on first write (close())
        self._sizes = [1 << 62, 1 << 62]  # bytes last written to each (unknown: truncate after the first write)
        self.seed = run_seed(self.run_id)
        self._head = struct.pack("<H", len(self.run_id)) + self.run_id.encode("ascii")
        self._h: dict[str, np.ndarray] = {}  # the first _n[name] entries are the digests
        self._n: dict[str, int] = {}
        self._names: dict[str, bytes] = {}
        # the chunks rewritten since the last commit that landed: (i, a digest it had since), kept until
        # the next one lands (committed()): a commit that failed half way (a full disk) and the retry that
        # follows it leave either version on disk
        self._prev: dict[str, list[tuple[int, int]]] = {}
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
        if i < n and (i, int(h[i])) not in self._prev.get(name, ()):
            self._prev.setdefault(name, []).append((i, int(h[i])))
        elif i > n:  # never: chunks are written in order; the gap would hold digest 0
            raise RuntimeError(f"internal: chunk {name}/c/{i} staged before chunk {n}")
        h[i] = bound(self.seed, crc)
        self._n[name] = max(n, i + 1)

    def write(self, before: Commit | None, after: Commit) -> None:
        """Write the record of the commit ``before -> after`` over the older of the two files."""
        parts = [b"", struct.pack("<Q", self.seq) + self._head,
                 b"\x01" + _COMMIT.pack(*before) if before is not None else b"\x00" + bytes(32),
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
        size = sum(len(x) for x in parts) + 16  # the magic, version and length (12 bytes), the crc32c (4)
        parts[0] = _MAGIC + struct.pack("<II", FORMAT_VERSION, size)
        body = b"".join(parts)
        slot = self.seq % 2
        path = self.root.joinpath(*CHUNK_DIGEST_FILES[slot].split("/"))
        fd = self._fds[slot]
        if fd is None:
            fd = self._fds[slot] = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        data = body + crc32c.crc32c(body).to_bytes(4, "little")
        if os.fstat(fd).st_nlink > 1:  # shared with a hard-link snapshot: never change its inode
            self._replace(slot, path, data)
        else:
            if os.pwrite(fd, data, 0) != len(data):
                raise OSError(f"short write of the chunk digest record {CHUNK_DIGEST_FILES[slot]} (disk full?)")
            if self._sizes[slot] > len(data):  # a shorter record (after a resume): drop the older bytes past it
                os.ftruncate(fd, len(data))
        self._sizes[slot] = len(data)
        self.seq += 1

    def _replace(self, slot: int, path: Path, data: bytes) -> None:
        """Write ``data`` as the whole file ``path`` through a temporary renamed over it
        (:func:`datavalue._files.atomic_write`: a kill leaves a temporary the next writer sweeps,
        a full disk the last whole version), and keep the new file open for the next writes: the
        inode another directory links to keeps its bytes."""
        fd = None
        try:
            with atomic_write(path) as tmp:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                if os.write(fd, data) != len(data):
                    raise OSError(f"short write of the chunk digest record {path.name} (disk full?)")
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        old, self._fds[slot] = self._fds[slot], fd
        if old is not None:
            os.close(old)

    def committed(self) -> None:
        """The commit of the last record landed: forget its previous digests (the next record keeps only
        its own)."""
        self._prev.clear()

    def close(self) -> None:
        """Close the record's files. Idempotent."""
        for slot, fd in enumerate(self._fds):
            if fd is not None:
                self._fds[slot] = None
                os.close(fd)


# ---------------------------------------------------------------------------------------------- reader
class DigestRecord:
    """A parsed record: ``run_id``, ``before``/``after`` commits, per array its digests ``h`` and the
    previous digests ``prev`` (``{chunk: digests}``) of the chunks its commit rewrites."""

    def __init__(self, run_id: str, before: Commit | None, after: Commit, h: dict[str, np.ndarray],
                 prev: dict[str, dict[int, tuple[int, ...]]]) -> None:
        self.run_id, self.before, self.after, self.h, self.prev = run_id, before, after, h, prev
        self.seq = 0
        self.note = ""  # why the other file was not taken, when it is damaged (for messages)

    @classmethod
    def parse(cls, data: bytes, location: object, name: str = RECORD) -> DigestRecord:
        def bad(why: str) -> StoreCorruptError:
            return StoreCorruptError(
                f"{location}: the run's chunk digest record ({name}) is corrupt ({why}). {fix_message()}")

        if len(data) < 12 or data[:4] != _MAGIC:
            raise bad("not a datavalue chunk digest record")
        version, size = struct.unpack_from("<II", data, 4)
        if version != FORMAT_VERSION:
            raise bad(f"format version {version}; this datavalue reads version {FORMAT_VERSION}")
        if not 12 <= size <= len(data) or crc32c.crc32c(data[: size - 4]) != int.from_bytes(data[size - 4 : size], "little"):
            raise bad("truncated, or its crc32c does not match")
        data = data[:size]
        try:
            seq, n_id = struct.unpack_from("<QH", data, 12)
            pos = 22
            run_id = data[pos : pos + n_id].decode("ascii")
            pos += n_id
            has_before = data[pos]
            before = _COMMIT.unpack_from(data, pos + 1) if has_before else None
            after = _COMMIT.unpack_from(data, pos + 33)
            (n_arrays,) = struct.unpack_from("<I", data, pos + 65)
            pos += 69
            h: dict[str, np.ndarray] = {}
            prev: dict[str, dict[int, tuple[int, ...]]] = {}
            for _ in range(n_arrays):
                (n_name,) = struct.unpack_from("<H", data, pos)
                array = data[pos + 2 : pos + 2 + n_name].decode("utf-8")
                pos += 2 + n_name
                n, p = struct.unpack_from("<II", data, pos)
                pos += 8
                h[array] = np.frombuffer(data, dtype="<u4", count=n, offset=pos)
                pos += 4 * n
                pairs = np.frombuffer(data, dtype="<u4", count=2 * p, offset=pos).reshape(p, 2)
                prev[array] = {}
                for i, v in pairs.tolist():
                    prev[array][i] = (*prev[array].get(i, ()), v)
                pos += 8 * p
        except (struct.error, ValueError, IndexError) as exc:
            raise bad(f"unreadable: {exc}") from exc
        if pos != size - 4:
            raise bad(f"{size - 4 - pos} bytes past its last entry")
        record = cls(run_id, tuple(before) if before else None, tuple(after), h, prev)  # type: ignore[arg-type]
        record.seq = int(seq)
        return record


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
                f"{self.location}: the chunk digest record ({RECORD}) was written by another run (run id "
                f"{record.run_id!r}; this run's is {self.run_id!r}): it was copied in from another run, so nothing binds "
                f"this run's chunks. {fix_message()}")
        # the commit completed: only the new digests; otherwise (killed between the record and the commit,
        # or a commit restored from an older copy: its fewer rows are a prefix of the chunks' rows) either
        # version of a chunk the record's commit rewrote
        lenient = commit != record.after
        self.h = record.h
        self.seq = record.seq
        self.note = record.note
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
        return d == int(h[i]) or d in self.prev.get(name, {}).get(i, ())

    def check(self, name: str, i: int, crc: int, *, label: str, path: object,
              reread: Callable[[], int | None] | None = None, tries: int = 5) -> int:
        """Raise :class:`StoreCorruptError` unless :meth:`accepts`; returns the trailer accepted. A reader beside a recorder may hold
        an older record than the chunk it read, or a chunk that was rewritten since: before refusing,
        the chunk's trailer is read again (``reread``, when given) and then the record (so the record
        is at least as new as the chunk), up to ``tries`` times; without ``reread``, the record once."""
        if self.accepts(name, i, crc):
            return crc
        for _ in range(tries if self._load is not None else 0):
            if reread is not None:
                again = reread()
                if again is None:
                    break
                crc = again
            self._set(*self._load())  # type: ignore[misc]
            if self.accepts(name, i, crc) or reread is None:
                break
        if self.accepts(name, i, crc):
            return crc
        if i >= self.n_chunks(name):
            raise StoreCorruptError(
                f"{self.location}: chunk {label} (file {path}) holds committed rows but the run's chunk digest record "
                f"({RECORD}) lists {self.n_chunks(name)} chunk(s) of {name!r}: the record is older than the "
                f"data or another run's. {fix_message()}" + self.note)
        raise StoreCorruptError(mismatch_message(self.location, label, path, crc) + self.note)

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


def newest_record(get: Callable[[str], bytes | None], location: object) -> DigestRecord | None:
    """The newest whole record of the two files (``None``: neither exists). A damaged file beside a
    whole one is passed over (a write torn by a kill), and named in :attr:`DigestRecord.note`.

    Raises:
        StoreCorruptError: both files exist and neither is whole.
    """
    found, bad = [], []
    for name in CHUNK_DIGEST_FILES:
        raw = get(name)
        if raw is None:
            continue
        try:
            found.append(DigestRecord.parse(raw, location, name))
        except StoreCorruptError as exc:
            bad.append(exc)
    if not found:
        if bad:
            raise bad[-1]
        return None
    record = max(found, key=lambda r: r.seq)
    if bad:
        record.note = f" (the other file of the record is damaged: {bad[0]})"
    return record


def load_pair(get: Callable[[str], bytes | None], location: object, *, tries: int = 4) -> tuple[DigestRecord, Commit | None] | None:
    """``(record, commit)`` read as a consistent pair through ``get`` (raw bytes of a key inside the
    run, ``None`` when absent), or ``None`` when the run has no record. The commit is read first, then
    the record (a recorder writes them in the other order), and again while they disagree (a
    recorder committing meanwhile); the last pair is returned for :class:`ChunkDigests` to judge."""
    pair = None
    for _ in range(tries):
        commit = read_commit_bytes(get("commit/c/0"))
        record = newest_record(get, location)
        if record is None:
            return None
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


def read_trailer(path: str | os.PathLike[str], size: int) -> tuple[int | None, bool]:
    """``(crc trailer, whole)`` of a local chunk file that should hold ``size`` bytes: the last 4 bytes
    (``None`` when it is missing or shorter than 4 bytes) and whether it holds exactly ``size``. Two
    system calls besides open and close: a read at ``size - 4`` tells both (no ``fstat``)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None, False
    try:
        raw = os.pread(fd, 5, size - 4)
        if len(raw) == 4:
            return int.from_bytes(raw, "little"), True
        end = os.fstat(fd).st_size  # not one chunk: its own last 4 bytes, for the reader's messages
        return (int.from_bytes(os.pread(fd, 4, end - 4), "little") if end >= 4 else None), False
    finally:
        os.close(fd)
