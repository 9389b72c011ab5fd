"""Append-only, crash-safe writer of a run store.

Data rows are written first, then the single-chunk ``commit`` array (an atomic file replace in
zarr's LocalStore). A reader, or a recorder resuming after a crash, trusts only what ``commit``
says; rows past it are ignored and overwritten.

Writing happens on a background thread so that training never waits on disk; errors raised
there surface on the next :meth:`RunWriter.submit` or on :meth:`RunWriter.close`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import crc32c
import numpy as np
import zarr

from datavalue._lock import LockFile
from datavalue.errors import (
    RecorderError,
    RecorderStateError,
    StoreExistsError,
    StoreMismatchError,
    StoreNotFoundError,
)
from datavalue.store._digest import FORMAT_VERSION as DIGEST_FORMAT
from datavalue.store._digest import DigestWriter
from datavalue.store._paths import refuse_links_leaving
from datavalue.store._reader import (
    check_array_shapes,
    check_chunk_digests,
    check_manifest,
    read_commit,
)
from datavalue.store._refusals import (  # noqa: F401 (re-exported: store/__init__, _reader, tests)
    _is_run,
    _what_is,
    foreign_below,
    foreign_entries,
    refuse_foreign_below,
    refuse_unless_run,
)
from datavalue.store._runlock import LOCK_FILE, only_the_lock, refuse_if_locked, run_lock, sweep_run
from datavalue.store._runpath import creation_error, run_dir_path
from datavalue.store._schema import (
    CHUNK_DIGESTS_KEY,
    FINAL_RUN,
    LINEAGE_KEY,
    MANIFEST_DIGEST_KEY,
    MANIFEST_KEY,
    MARKED_ARRAYS,
    OPTIONAL_STEP_ARRAYS,
    ROW_ARRAYS,
    RUN_ID_KEY,
    SCHEMA_VERSION,
    STEP_ARRAYS,
    WEIGHTS_DIGEST_KEY,
    StepBlock,
    committed_length,
    diff_manifests,
    float_codecs,
    manifest_digest,
    small_codecs,
    unwritten_value,
)
from datavalue.store._swap import install

logger = logging.getLogger(__name__)

_STOP = object()
_FLUSH = object()
_FLUSH_TIMER = object()


def _encode(chunk: np.ndarray) -> memoryview:
    """A chunk's bytes as the codec ``bytes(little)`` stores them (no copy on a little-endian machine)."""
    return memoryview(np.ascontiguousarray(chunk, dtype=chunk.dtype.newbyteorder("<"))).cast("B")


def _write_chunk(path: Path, chunk: np.ndarray) -> None:
    """Encode one chunk exactly as the codec chain ``bytes(little) -> crc32c`` does, write it atomically.

    zarr's own write path costs tens of milliseconds of Python per chunk (event loop, fill-value
    checks, read-modify-write); the writer keeps each array's tail chunk in memory and writes whole
    chunks itself. Readers use zarr unchanged (tests read everything back through zarr).
    """
    data = _encode(chunk)
    _write_bytes(path, data, crc32c.crc32c(data))


def _write_bytes(path: Path, data: memoryview, crc: int) -> None:
    """Write a chunk's encoded bytes ``data`` and its crc32c ``crc`` to ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        f = open(tmp, "wb")  # noqa: SIM115
    except FileNotFoundError:  # the chunk's directory is new: create it (not before every write: a system call)
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "wb")  # noqa: SIM115
    try:
        with f:  # the array's buffer, then its checksum: no bytes copies
            f.write(data)
            f.write(crc.to_bytes(4, "little"))
        install(tmp, path)  # atomic, without the flush an os.replace over the old version costs (_swap)
    except BaseException:  # a full disk: the chunk keeps its last whole version, no temporary is left
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_chunk(directory: Path, i: int, piece: np.ndarray, chunk_rows: int, *, pad: Any = 0) -> None:
    """Write rows ``piece`` as chunk ``i`` (one chunk across all other axes) of the array stored in
    ``directory``, padded with ``pad`` to ``chunk_rows`` rows: zarr stores edge chunks whole."""
    if piece.shape[0] < chunk_rows:
        full = np.full((chunk_rows, *piece.shape[1:]), pad, dtype=piece.dtype)
        full[: piece.shape[0]] = piece
        piece = full
    _write_chunk(directory.joinpath("c", str(i), *(["0"] * (piece.ndim - 1))), piece)


class _Staged(NamedTuple):
    """A chunk encoded and checksummed, to be written after the run's digest record names it."""

    name: str  # the array
    i: int  # the chunk
    path: Path
    data: memoryview
    crc: int


class _AppendArray:
    """Appends rows to a zarr array along axis 0, keeping the last (partial) chunk in memory.

    The tail chunk lives in one buffer of a whole chunk, its unwritten rows holding the pad value:
    each commit copies the new rows into it and writes it out as is (a chunk that the new rows fill
    entirely is written straight from them), so a commit costs no concatenation of the tail, no
    padded copy and no copy of the new tail (issue 20).

    :meth:`append` only *stages* the chunks (encoded, crc32c computed once): the writer records
    their digests (``datavalue.store._digest``) before it writes them. A commit that completes the
    buffered chunk and starts the next one needs the completed chunk's bytes until they are
    written, so the new tail goes into a second buffer (two per array, swapped; allocated on first use).
    """

    def __init__(self, root: Path, arr: zarr.Array, length: int) -> None:
        self.root, self.arr, self.length = root, arr, int(length)
        self.name = root.name
        self.rows_per_chunk = int(arr.chunks[0])
        self.chunk_shape = tuple(int(c) for c in arr.chunks)
        if tuple(arr.shape[1:]) != self.chunk_shape[1:]:
            raise ValueError(f"{root.name}: the writer needs one chunk across the columns, got chunks {arr.chunks} for shape {arr.shape}")
        # rows not written yet carry a marker, so that an older copy of a chunk is told from data
        self.pad = unwritten_value(arr.dtype) if root.name in MARKED_ARRAYS else 0
        self.buf: np.ndarray | None = None  # the tail chunk: its first length % rows_per_chunk rows are data
        self._spare: np.ndarray | None = None  # the other buffer (see the class docstring)
        self._suffix = ("0",) * (len(self.chunk_shape) - 1)
        start = (self.length // self.rows_per_chunk) * self.rows_per_chunk
        if self.length > start:
            self._fresh()[: self.length - start] = np.asarray(arr[start : self.length])

    @property
    def tail(self) -> np.ndarray:
        """The rows of the partial last chunk (a view)."""
        n = self.length % self.rows_per_chunk
        return self.buf[:n] if self.buf is not None else np.zeros((0, *self.chunk_shape[1:]), self.arr.dtype)

    def _fresh(self, *, staged: bool = False) -> np.ndarray:
        """The tail buffer, all pad (allocated once, refilled when a new chunk starts in it); ``staged``:
        the current buffer holds a chunk not written yet, so the other buffer takes the new tail."""
        if staged:
            self.buf, self._spare = self._spare, self.buf
        if self.buf is None:
            self.buf = np.full(self.chunk_shape, self.pad, dtype=self.arr.dtype)
        else:
            self.buf.fill(self.pad)
        return self.buf

    def _stage(self, i: int, chunk: np.ndarray) -> _Staged:
        data = _encode(chunk)
        return _Staged(self.name, i, self.root.joinpath("c", str(i), *self._suffix), data, crc32c.crc32c(data))

    def append(self, data: np.ndarray, staged: list[_Staged] | None = None) -> None:
        """Append ``data`` (rows), adding the chunks to write to ``staged`` (in chunk order); without
        ``staged``, write them at once."""
        if staged is None:
            staged = []
            self.append(data, staged)
            for s in staged:
                _write_bytes(s.path, s.data, s.crc)
            return
        if len(data) == 0:
            return
        data = np.asarray(data).reshape(-1, *self.chunk_shape[1:])
        new_len = self.length + len(data)
        _grow(self.arr, new_len)  # metadata first, so the chunk grid covers the new chunks
        C, pos, buffered = self.rows_per_chunk, 0, False
        while pos < len(data):
            i, off = divmod(self.length, C)
            n = min(C - off, len(data) - pos)
            piece = data[pos : pos + n]
            if off == 0 and n == C:  # a whole chunk: straight from the rows (converted once if need be)
                staged.append(self._stage(i, piece if piece.dtype == self.arr.dtype else piece.astype(self.arr.dtype)))
            else:  # only the first piece continues the buffer, only the last starts a new chunk in it
                buf = self.buf if off else self._fresh(staged=buffered)  # a chunk's first rows: all pad behind them
                assert buf is not None
                buf[off : off + n] = piece  # converts to the array's dtype, as astype does
                staged.append(self._stage(i, buf))
                buffered = True
            pos += n
            self.length += n


#: Bytes per chunk (at 4 bytes a number) of a per-step *vector* array (``adam_m``, ``adam_v``: ``(T, k)``).
#: The writer rewrites an array's partial tail chunk at every commit, so a 4 MiB chunk (1,024 steps at
#: k = 1024) cost 4 MiB of writing per array per commit for a few KiB of new rows; 256 KiB (64 steps at
#: k = 1024, 16 at k = 4096) keeps that near the data while a long run has few files (issue 20).
STEP_VECTOR_CHUNK_BYTES = 256 << 10


def _step_chunk_rows(kind: str, width: tuple[int, ...]) -> int:
    """Steps per chunk of an optional per-step array of ``kind`` and ``width`` (readers take any chunking)."""
    per = 4 * int(np.prod(width)) if width else 0
    if not per:
        return 4096
    target = STEP_VECTOR_CHUNK_BYTES if kind == "vector" else 4 << 20
    return int(max(1, min(4096, target // per)))


def _grow(arr: zarr.Array, needed: int) -> None:
    """Resize axis 0 of ``arr`` to at least ``needed`` (doubling, so resizes are rare)."""
    cap = arr.shape[0]
    if needed <= cap:
        return
    new = max(needed, 2 * cap, arr.chunks[0])
    arr.resize((new, *arr.shape[1:]))


def default_chunk_rows(k: int) -> int:
    """Rows per chunk of the row arrays when the caller names none: about 4 MiB of float32 gradients of
    ``k`` columns, at least 64 rows, at most 65,536, **rounded down to a power of two**.

    The writer commits when a chunk's worth of rows is pending and writes every chunk those rows touch
    whole, the partial last one included (rewritten at the next commit). Steps of a power-of-two batch
    (16, 32, 128, ...) then fill chunks exactly: each commit writes one whole chunk of new rows and
    no partial one. With ``(4 << 20) // (4 k)`` rows (1,030 at k = 1,018, the benchmark MLP's)
    every commit also rewrote a nearly empty tail chunk: 962 KiB written per step for 509 KiB of
    gradients (issue 20, sixth pass). Readers take any chunking; a resumed run keeps its own.
    """
    rows = max(64, min(65536, (4 << 20) // (4 * max(int(k), 1))))
    return 1 << (int(rows).bit_length() - 1)


class RunWriter:
    """Writes :class:`StepBlock` objects into a Zarr v3 run, committing each one.

    Args:
        path: directory of the run (``*.zarr`` by convention).
        manifest: JSON-serialisable provenance (see ``docs/store-format.md``).
        k: number of gradient columns.
        mode: ``"create"`` (refuse existing data), ``"overwrite"`` or ``"resume"``.
        chunk_rows: rows per chunk of the row arrays.
        storage_dtype: ``"float32"`` or ``"float16"``.
        fisher: whether the run stores pseudo-gradient rows.
        background: write on a background thread (default) or synchronously. The writer owns
            that thread: :meth:`close` (or leaving ``with RunWriter(...)``) joins it.
        max_queue: steps that may wait in the queue before ``submit`` blocks.
        commit_interval: seconds a step may wait in the writer's buffer before it is committed
            (a chunk's worth of rows, ``flush`` and ``close`` commit at once).
        commit_every: at most this many submitted steps are ever uncommitted: the background
            writer commits every ``commit_every // 2`` steps (and on a full chunk, on the
            ``commit_interval`` timer, on ``flush``), and :meth:`submit` waits while
            ``commit_every`` steps are still uncommitted. A ``kill -9`` after ``K`` submitted steps
            therefore leaves at least ``K - commit_every`` committed (``docs/capture.md``).
    """

    #: rows per chunk when none is named (:func:`default_chunk_rows`; callers outside the store ask here)
    default_chunk_rows = staticmethod(default_chunk_rows)

    def __init__(
        self,
        path: str | Path,
        manifest: dict[str, Any],
        *,
        k: int,
        mode: str = "create",
        chunk_rows: int | None = None,
        storage_dtype: str = "float32",
        fisher: bool = False,
        background: bool = True,
        max_queue: int = 64,
        commit_interval: float = 10.0,
        commit_every: int = 32,
    ) -> None:
        self.path = run_dir_path(path)  # absolute, once: a later os.chdir must not move the run or its lock
        self.commit_interval = float(commit_interval)
        if isinstance(commit_every, bool) or not isinstance(commit_every, (int, np.integer)) or commit_every < 1:
            raise ValueError(f"commit_every must be a positive int (steps), got {commit_every!r}.")
        self.commit_every = int(commit_every)
        self.k = int(k)
        manifest = dict(manifest, schema_version=SCHEMA_VERSION, storage_dtype=storage_dtype)
        if chunk_rows is None:
            chunk_rows = default_chunk_rows(self.k)
        self.chunk_rows = int(chunk_rows)
        if mode not in ("create", "overwrite", "resume"):
            raise ValueError(f"mode must be 'create', 'overwrite' or 'resume', got {mode!r}")
        self._locks: list[LockFile] = []
        self._run_id: str | None = None
        self._digests: DigestWriter | None = None  # None: a run written before chunks were bound to their run
        self._on_disk: tuple[int, int, int, int] = (0, 0, 0, 0)  # the commit on disk
        self._lock_and_prepare(mode, manifest, chunk_rows, storage_dtype, fisher)
        self.manifest = manifest if mode != "resume" else self.manifest
        self._tails: dict[str, _AppendArray] = {}
        self._has_fisher: bool | None = None
        self._error: BaseException | None = None
        self._optional: set[str] | None = None  # optional per-step arrays present (see _optional_step_arrays)
        self._closed = False
        #: seconds close() waits for the background writer (None: as long as it takes; the exit hook of an
        #: unclosed recorder sets a limit)
        self.close_timeout: float | None = None
        self._submitted = self.steps  # steps handed to submit (committed: self.steps)
        self._committed = threading.Condition()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(maxsize=max_queue)
            self._thread = threading.Thread(target=self._worker, name="datavalue-writer", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ set-up
    def _exists(self) -> bool:
        """Whether ``path`` holds anything besides a writer lock (one killed before it wrote leaves only that)."""
        return not only_the_lock(self.path) if self.path.is_dir() else self.path.exists() or self.path.is_symlink()

    def _lock_and_prepare(self, mode: str, manifest: dict[str, Any], chunk_rows: int, storage_dtype: str,
                          fisher: bool) -> None:
        """Take the run's writer lock (and its parent's for a child run), then create, replace or
        open the run: every check that matters is made again under the lock."""
        exists = self._exists()
        if exists and self.path.is_dir():
            refuse_if_locked(self.path, "a recorder")  # a live writer: say so, whatever else is wrong
        if mode == "create" and exists:
            found = _what_is(self.path)  # resume=True is advice only for a run (never for /dev/null)
            raise StoreExistsError(
                f"{self.path} already exists. Pass resume=True to continue that run after its last "
                "committed step, or overwrite=True to replace it." if found == "run" else
                f"{self.path} already exists and is {found}, not a datavalue run; choose another path for the run."
            )
        if mode == "resume" and not exists:
            raise StoreNotFoundError(f"resume=True but there is no run at {self.path}; drop resume=True to start one.")
        if exists:
            (self._check_resumable if mode == "resume" else refuse_unless_run)(self.path)
        made = not self.path.exists()
        try:
            if self.path.name == FINAL_RUN and _is_run(self.path.parent):  # a child run: the parent is written too
                self._locks.append(run_lock(self.path.parent, f"a recorder writing {FINAL_RUN}/"))
                self._locks[-1].acquire()
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # under a regular file, in /proc, read-only: say where and why
                raise creation_error(self.path, exc, "the run") from exc
            self._locks.append(run_lock(self.path, "a recorder"))
            self._locks[-1].acquire()
            if mode == "resume":
                sweep_run(self.path)  # half-written files of the writer that was killed
                self._open_existing(manifest)
                return
            if mode == "create" and self._exists():  # created by a writer that came and went meanwhile
                raise StoreExistsError(f"{self.path} was created by another writer meanwhile; pass resume=True to continue it.")
            if self._exists():
                refuse_unless_run(self.path)  # never a user's file, directory, symlink or foreign zarr store
                for entry in self.path.iterdir():  # everything but the lock we hold
                    if entry.name == LOCK_FILE:
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            self._create(manifest, chunk_rows, storage_dtype, fisher)
        except BaseException:
            self._release()
            if made and only_the_lock(self.path):
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            raise

    @staticmethod
    def _check_resumable(path: Path) -> None:
        found = _what_is(path)
        if found == "a regular file" and path.suffix == ".zip" and zipfile.is_zipfile(path):
            raise StoreNotFoundError(
                f"resume=True but {path} is a run archive (.zip), which is read-only: a recorder cannot append to it. "
                f"Unzip it to a directory (e.g. `unzip {path.name} -d {path.stem}.zarr`) and resume there.")
        if found != "run":
            raise StoreNotFoundError(f"resume=True but {path} is {found}, not a datavalue run; check the path.")

    def _release(self) -> None:
        """Close the digest record's files; release the writer lock(s), the run's own first."""
        if self._digests is not None:
            self._digests.close()
        while self._locks:
            self._locks.pop().release()

    def _create(self, manifest: dict[str, Any], chunk_rows: int, storage_dtype: str, fisher: bool) -> None:
        g = zarr.open_group(str(self.path), mode="a", zarr_format=3)  # "a": the directory holds our writer lock
        # one zarr.json write: the manifest and the digest binding its capture settings to the data
        self._run_id = uuid.uuid4().hex  # on the root and every array: an array copied from another run shows
        g.attrs.update({MANIFEST_KEY: manifest, MANIFEST_DIGEST_KEY: manifest_digest(manifest), RUN_ID_KEY: self._run_id,
                        CHUNK_DIGESTS_KEY: DIGEST_FORMAT})
        # every chunk is written, even one equal to the fill value: no per-chunk comparison
        cfg = {"write_empty_chunks": True}
        ours = {RUN_ID_KEY: self._run_id}
        cap = chunk_rows
        g.create_array("grads", shape=(cap, self.k), chunks=(chunk_rows, self.k), dtype=storage_dtype,
                       compressors=float_codecs(), fill_value=0, config=cfg, attributes=ours)
        for name, dt in ROW_ARRAYS.items():
            g.create_array(name, shape=(cap,), chunks=(chunk_rows,), dtype=dt, compressors=small_codecs(), fill_value=0, config=cfg, attributes=ours)
        step_chunk = 4096
        for name, dt in STEP_ARRAYS.items():
            g.create_array(name, shape=(step_chunk,), chunks=(step_chunk,), dtype=dt, compressors=small_codecs(), fill_value=0, config=cfg, attributes=ours)
        g.create_array("step_ptr", shape=(step_chunk + 1,), chunks=(step_chunk,), dtype="int64",
                       compressors=small_codecs(), fill_value=0, config=cfg, attributes=ours)
        if fisher:
            g.create_array("fisher", shape=(cap, self.k), chunks=(chunk_rows, self.k), dtype=storage_dtype,
                           compressors=float_codecs(), fill_value=0, config=cfg, attributes=ours)
            g.create_array("fisher_ptr", shape=(step_chunk + 1,), chunks=(step_chunk,), dtype="int64",
                           compressors=small_codecs(), fill_value=0, config=cfg, attributes=ours)
        g.create_array("commit", shape=(4,), chunks=(4,), dtype="int64", compressors=small_codecs(), fill_value=0, config=cfg, attributes=ours)
        self._group = g
        # every recorded chunk bound to the run's id: the record of the zero commit, then that commit
        self._digests = DigestWriter(self.path, self._run_id)
        self._digests.write(None, (0, 0, 0, 0))
        # an explicit zero commit before any data chunk: a missing commit/c/0 beside data is then damage,
        # never a first step in flight (store._reader.read_commit)
        self._commit_chunk(np.zeros(4, dtype=np.int64))
        self._on_disk = (0, 0, 0, 0)
        self.steps = self.rows = self.fisher_rows = self.generation = 0

    def _open_existing(self, manifest: dict[str, Any]) -> None:
        self._check_resumable(self.path)
        # resuming appends to chunks anywhere in the tree: never through a link out of the run
        refuse_links_leaving(self.path, "resume=True would write through them, outside the run")
        g = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
        on_disk = dict(g.attrs.get(MANIFEST_KEY, {}))
        check_manifest(on_disk, self.path, g.attrs.get(MANIFEST_DIGEST_KEY))
        diffs = diff_manifests(on_disk, manifest)
        if diffs:
            raise StoreMismatchError(
                f"cannot resume {self.path}: the recorder's configuration differs from the recorded one:\n  "
                + "\n  ".join(diffs)
                + "\nRe-create the Recorder with the recorded settings, or pass overwrite=True to start over."
            )
        if "grads" in g and g["grads"].shape[1] != self.k:
            raise StoreMismatchError(f"{self.path} has {g['grads'].shape[1]} gradient columns, this recorder makes {self.k}.")
        self._group = g
        self._run_id = g.attrs.get(RUN_ID_KEY)  # None for runs written before run ids
        self.chunk_rows = int(g["grads"].chunks[0])
        self.manifest = on_disk
        # a missing commit beside data chunks is damage, not 0 steps to overwrite
        self.steps, self.rows, self.fisher_rows, self.generation = read_commit(g, self.path)
        # an array metadata file older than the commit: appending would resize from the wrong length
        check_array_shapes(g, self.path, steps=self.steps, rows=self.rows, fisher_rows=self.fisher_rows)
        # every committed chunk this run's (the tails are read back and rewritten: never bless another's);
        # the record continues from the digests of the chunks as they are on disk
        found, bound = check_chunk_digests(g, self.path, steps=self.steps, rows=self.rows, fisher_rows=self.fisher_rows)
        self._on_disk = (self.steps, self.rows, self.fisher_rows, self.generation)
        if bound is not None and self._run_id:
            self._digests = DigestWriter(self.path, self._run_id, bound, seq=0 if found is None else found.seq + 1)
        self.generation += 1
        # this session's entry in the run's history, before any data: a copy of the run resumed elsewhere
        # gets another, and data derived on one copy are then refused by the other (Run.foreign_derived)
        lineage = [list(e) for e in (g.attrs.get(LINEAGE_KEY) or [])]
        g.attrs.update({LINEAGE_KEY: [*lineage, [int(self.steps), uuid.uuid4().hex]]})
        logger.info("resuming %s after %d committed steps (%d rows)", self.path, self.steps, self.rows)

    @property
    def has_fisher(self) -> bool:
        if self._has_fisher is None:
            self._has_fisher = "fisher" in self._group
        return self._has_fisher

    # ------------------------------------------------------------------ writing
    def submit(self, block: StepBlock) -> None:
        """Queue one step for writing (returns at once unless the queue is full)."""
        self.check_block(block)
        self._raise_pending()
        if self._queue is None:
            self._write([block])
            return
        self.wait_for_room()
        self._submitted += 1
        self._queue.put(block)

    def check_block(self, block: StepBlock) -> None:
        """Refuse a step :meth:`submit` would refuse (closed writer, non-finite step values), without queueing it."""
        if self._closed:
            raise RecorderStateError("this run writer is closed; open a new Recorder(..., resume=True) to record more.")
        bad = {n: v for n in ("lr", "grad_scale", "momentum", "weight_decay") if not np.isfinite(v := getattr(block, n))}
        if bad:  # NaN there marks a step not written yet (an older copy of a chunk), never a value
            raise RecorderError(
                f"step {block.step}: {', '.join(f'{n}={v!r}' for n, v in bad.items())}; a run stores finite step "
                "hyperparameters only. Check the optimizer's param groups and the clipping coefficient "
                "(clip_coef); nothing was written for this step."
            )

    def wait_for_room(self) -> None:
        """Block until fewer than ``commit_every`` submitted steps are uncommitted (the durability bound).

        :meth:`submit` calls it; a caller that holds one step back before submitting it (a recorder
        waiting for that step's optimizer update) calls it when it starts holding, so that the held
        step counts against the bound: the step is then submitted without waiting.
        """
        if self._queue is None:
            return
        with self._committed:  # the durability bound: never more than commit_every steps uncommitted
            while self._submitted - self.steps >= self.commit_every and self._error is None:
                self._committed.wait(1.0)
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RecorderStateError(f"the background writer failed: {err!r}") from err

    def _worker(self) -> None:
        """Coalesce steps and write them in chunk-sized pieces.

        A partial chunk costs a rewrite of the whole tail chunk, so steps are buffered until a
        chunk's worth of rows is pending, ``commit_every // 2`` steps are, ``commit_interval``
        seconds have passed since the oldest pending step, or a flush/close asks for it. A crash
        loses at most that window (:meth:`submit` keeps it under ``commit_every`` steps);
        everything committed before it stays readable.
        """
        assert self._queue is not None
        pending: list[StepBlock] = []
        rows = 0
        oldest = 0.0
        while True:
            timeout = None if not pending else max(0.0, oldest + self.commit_interval - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = _FLUSH_TIMER
            force = item is _STOP or item is _FLUSH or item is _FLUSH_TIMER
            if isinstance(item, StepBlock):
                if not pending:
                    oldest = time.monotonic()
                pending.append(item)
                rows += item.n_rows
            due = rows >= self.chunk_rows or len(pending) >= max(1, self.commit_every // 2)
            if pending and (force or due) and self._error is None:
                try:
                    self._write(pending)
                except BaseException as exc:  # surfaced to the training thread
                    logger.exception("datavalue writer failed")
                    self._error = exc
                pending, rows = [], 0
                with self._committed:
                    self._committed.notify_all()
            if item is not _FLUSH_TIMER:
                self._queue.task_done()
            if item is _STOP:
                return

    def _write(self, blocks: list[StepBlock]) -> None:
        for i, b in enumerate(blocks):
            if b.step != self.steps + i:
                raise RecorderStateError(f"step {b.step} submitted out of order (expected {self.steps + i}).")
        r1 = self.rows + sum(b.n_rows for b in blocks)
        t1 = self.steps + len(blocks)
        appends: dict[str, np.ndarray] = {
            "grads": np.concatenate([b.grads for b in blocks]),
            "sample_id": np.concatenate([b.sample_id for b in blocks]),
            "weight": np.concatenate([b.weight for b in blocks]),
            "flags": np.concatenate([b.flags for b in blocks]),
            "step_ptr": self.rows + np.cumsum([b.n_rows for b in blocks]),
        }
        for name in STEP_ARRAYS:
            appends[name] = np.array([getattr(b, name) for b in blocks])
        f1 = self.fisher_rows
        if self.has_fisher:
            fis = [b.fisher if b.fisher is not None else np.zeros((0, self.k), np.float32) for b in blocks]
            appends["fisher"] = np.concatenate(fis)
            appends["fisher_ptr"] = self.fisher_rows + np.cumsum([len(f) for f in fis])
            f1 = self.fisher_rows + len(appends["fisher"])
        staged: list[_Staged] = []
        self._optional_step_arrays(blocks, appends, staged)
        for name, data in appends.items():
            self._tail(name).append(data, staged)
        after = (t1, r1, f1, self.generation)
        if self._digests is not None:  # the chunks' digests first, bound to the run (datavalue.store._digest) ...
            for c in staged:
                self._digests.stage(c.name, c.i, c.crc)
            self._digests.write(self._on_disk, after)
        for c in staged:  # ... then the data chunks ...
            _write_bytes(c.path, c.data, c.crc)
        self._commit_chunk(np.array(after, dtype=np.int64))  # ... then visibility
        self.steps, self.rows, self.fisher_rows = t1, r1, f1
        self._on_disk = after
        if self._digests is not None:
            self._digests.committed()

    def _optional_step_arrays(self, blocks: list[StepBlock], appends: dict[str, np.ndarray], staged: list[_Staged]) -> None:
        """Per-step optional arrays (``StepBlock.extra``): created on first use (earlier steps NaN,
        ``first_step`` attribute), NaN for steps that lack them; the NaN chunks of the earlier steps
        are added to ``staged``."""
        names = {n for b in blocks for n in (b.extra or {})}
        if self._optional is None:  # which optional arrays the run has: looked up once (each lookup is a
            self._optional = {n for n in OPTIONAL_STEP_ARRAYS if n in self._group}  # zarr store round trip)
        names |= self._optional
        for name in sorted(names):
            kind = OPTIONAL_STEP_ARRAYS.get(name)
            if kind is None:
                raise RecorderStateError(f"unknown optional per-step array {name!r}; known: {sorted(OPTIONAL_STEP_ARRAYS)}")
            width = {"vector": (self.k,), "matrix": (self.k, self.k)}.get(kind, ())
            if kind == "group":  # (G,) per step: the optimizer's param groups
                width = self._group_width(name, blocks)
            if name not in self._optional:  # (the set, not the group: a group lookup is a store round trip)
                dt = "float64" if self.manifest.get("storage_dtype") == "float64" or kind in ("scalar", "group") else "float32"
                rows = _step_chunk_rows(kind, width)
                cap = max(rows, self.steps + len(blocks))
                arr = self._group.create_array(name, shape=(cap, *width), chunks=(rows, *width), dtype=dt,
                                               compressors=small_codecs(), fill_value=np.nan,
                                               config={"write_empty_chunks": True},
                                               attributes={"first_step": int(self.steps)}
                                               | ({RUN_ID_KEY: self._run_id} if self._run_id else {}))
                self._optional.add(name)
                # earlier steps: NaN (fill value), written out so that the chunks exist: the whole chunks
                # here, the partial one by the append (its tail reads the fill value)
                if self.steps >= rows:
                    nan = np.full((rows, *width), np.nan, dtype=dt)
                    tail = _AppendArray(self.path / name, arr, 0)
                    staged.extend(tail._stage(i, nan) for i in range(self.steps // rows))
            data = []
            for b in blocks:
                v = (b.extra or {}).get(name)
                if v is not None and np.size(v) != int(np.prod(width)):
                    raise RecorderStateError(
                        f"step {b.step}: {name} has {np.size(v)} entries, the run stores {int(np.prod(width))} "
                        "(the optimizer's param groups changed during the run; add_param_group after recording "
                        "started is not supported: start a new run)."
                    )
                data.append(np.full(width, np.nan) if v is None else np.asarray(v, np.float64).reshape(width))
            appends[name] = np.stack(data)

    def _group_width(self, name: str, blocks: list[StepBlock]) -> tuple[int, ...]:
        """``(G,)`` of a per-group array: the stored width, else the first value's length."""
        if name in self._tails:  # appended to before: its width, without a store round trip
            return self._tails[name].chunk_shape[1:]
        if name in self._group:
            return tuple(self._group[name].shape[1:])
        for b in blocks:
            v = (b.extra or {}).get(name)
            if v is not None:
                return (int(np.size(v)),)
        raise RecorderStateError(f"internal: no value to size the per-group array {name!r}")

    def _tail(self, name: str) -> _AppendArray:
        tail = self._tails.get(name)
        if tail is None:
            tail = self._tails[name] = _AppendArray(self.path / name, self._group[name], self._valid_length(name))
        return tail

    def _valid_length(self, name: str) -> int:
        return committed_length(name, steps=self.steps, rows=self.rows, fisher_rows=self.fisher_rows)

    def _commit_chunk(self, values: np.ndarray) -> None:
        _write_chunk(self.path / "commit" / "c" / "0", values)

    def flush(self) -> None:
        """Block until every submitted step is committed."""
        if self._queue is not None and not self._closed:
            self._queue.put(_FLUSH)
            self._queue.join()
        self._raise_pending()

    def close(self) -> None:
        """Flush and stop the background thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._queue is not None and self._thread is not None:
                if self._thread.is_alive():
                    self._queue.put(_STOP)
                    self._thread.join(self.close_timeout)
                    if self._thread.is_alive():
                        raise RecorderStateError(
                            f"{self.path}: the background writer did not finish within {self.close_timeout:g} s; the "
                            f"steps after the run's last commit ({self.steps} steps) may be lost.")
                else:  # the thread is gone (stopped by the interpreter, or this is a forked copy): write here
                    self._drain()
            self._raise_pending()
        finally:
            self._release()

    def _drain(self) -> None:
        """Commit the steps still queued, on the calling thread (the writer thread is not running)."""
        assert self._queue is not None
        blocks = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, StepBlock):
                blocks.append(item)
        if blocks and self._error is None:
            self._write(blocks)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def keeps_weights_digest(self) -> bool:
        """Whether the run says its ``weights_digest`` member was written (root attribute
        :data:`~datavalue.store._schema.WEIGHTS_DIGEST_KEY`): then a missing member is damage."""
        return bool(self._group.attrs.get(WEIGHTS_DIGEST_KEY))

    def mark_weights_digest(self) -> None:
        """Say, once, that the run's ``weights_digest`` member exists (call after writing it)."""
        if not self.keeps_weights_digest:
            self._group.attrs.update({WEIGHTS_DIGEST_KEY: 1})

    def update_manifest(self, **entries: Any) -> None:
        """Merge ``entries`` into the manifest on disk (e.g. the optimizer once it is known)."""
        self.manifest = dict(self.manifest, **entries)
        self._group.attrs.update({MANIFEST_KEY: self.manifest, MANIFEST_DIGEST_KEY: manifest_digest(self.manifest)})
