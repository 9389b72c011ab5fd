"""Read rows of a local run's arrays straight from their chunk files.

Every row array of a run is stored with the codec chain ``bytes(little) -> crc32c`` and one chunk
across all columns (``docs/store-format.md``): a chunk file is the raw little-endian rows followed
by a 4-byte crc32c. zarr's read path adds per-chunk Python and event-loop work on top of that, and
on a 2-core machine it capped queries at 4-7.6 GB/s against 21 GB/s for reading the same files
from the page cache (docs/results/query_bandwidth.md). :class:`ChunkFileRows` reads the files
itself, into the output buffer, and verifies each checksum, and for a run's recorded arrays that
the checksum is the one the run's digest record binds to the run (``datavalue.store._digest``);
anything it does not recognise (other codecs, other stores) keeps zarr's reader (:func:`fast_rows`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from datavalue.errors import StoreCorruptError
from datavalue.store._digest import ChunkDigests, load_pair, local_get
from datavalue.store._schema import CHUNK_DIGESTS_KEY, RUN_ID_KEY

__all__ = ["ChunkFileRows", "chunk_dir", "fast_rows", "write_all"]


class ChunkFileRows:
    """Array-like rows ``[a:b]`` of a 2-D zarr v3 array in a local directory (picklable).

    Attributes mirror the zarr array's: ``shape``, ``dtype``, ``chunks``, ``ndim``. Missing chunk
    files read as the fill value (zarr's semantics) past ``required_rows``; inside the first
    ``required_rows`` rows (what the run's commit or the array's build covers) a missing file, a
    checksum mismatch or a short file raises :class:`~datavalue.errors.StoreCorruptError` naming the
    chunk. ``digests``: the run's chunk digest record (:func:`fast_rows` finds it for a recorded array):
    a chunk whose trailer it does not bind to the run (a chunk file copied in from another run or an
    older copy) raises :class:`~datavalue.errors.StoreCorruptError` too, at no extra read.
    """

    def __init__(self, directory: str | os.PathLike[str], shape: tuple[int, int], chunk_rows: int, dtype: Any,
                 fill_value: float = 0.0, name: str | None = None, *, required_rows: int = 0,
                 digests: ChunkDigests | None = None) -> None:
        self.directory = Path(directory)
        self.name = name or self.directory.name  # the array's path inside the run, for error messages
        self.shape = (int(shape[0]), int(shape[1]))
        self.chunk_rows = int(chunk_rows)
        self.chunks = (self.chunk_rows, self.shape[1])
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.fill_value = fill_value
        self.required_rows = int(required_rows)
        self.ndim = 2
        self.digests = digests if digests is not None and digests.covers(self.directory.name) else None

    def __len__(self) -> int:
        return self.shape[0]

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return ("ChunkFileRows", str(self.directory), self.shape, self.chunk_rows, self.dtype.str, self.required_rows)

    def __repr__(self) -> str:
        return f"ChunkFileRows({str(self.directory)!r}, shape={self.shape}, chunk_rows={self.chunk_rows}, dtype={self.dtype})"

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"ChunkFileRows takes a row slice a:b, got {key!r}")
        a, b, _ = key.indices(self.shape[0])
        b = max(a, b)
        out = np.empty((b - a, self.shape[1]), dtype=self.dtype)
        C, width = self.chunk_rows, self.shape[1] * self.dtype.itemsize
        for i in range(a // C, -(-b // C)):
            lo, hi = max(a, i * C), min(b, (i + 1) * C)
            dest = out[lo - a : hi - a]
            if lo == i * C and hi == (i + 1) * C:
                self._read_chunk(i, dest, width)  # a whole chunk: straight into the output
            elif self._chunk_size(i, width) is None:  # missing: an error inside the committed rows, else fill
                self._read_chunk(i, dest, width)
            else:  # the file holds exactly one chunk (checked): the buffer is bounded by what is on disk
                full = np.empty(self.chunks, dtype=self.dtype)
                self._read_chunk(i, full, width)
                dest[:] = full[lo - i * C : hi - i * C]
        return out

    def check_sizes(self, n: int) -> None:
        """Refuse a chunk file covering rows ``0:n`` whose size is not one chunk's (truncated, or the
        metadata's ``chunk_shape`` edited): a ``stat`` each, no read (``datavalue info``; P8-06). A missing
        one is left to :meth:`datavalue.store.Run.require_chunks`.

        Raises:
            StoreCorruptError: naming the chunk, its size and the size its metadata says."""
        width = self.shape[1] * self.dtype.itemsize
        for i in range(-(-int(n) // self.chunk_rows)):
            self._chunk_size(i, width)

    def _chunk_size(self, i: int, width: int) -> int | None:
        """The size of chunk ``i``'s file, or None when it is missing; refuses a file whose size is not
        one chunk's (``chunk_rows * width`` bytes and the 4-byte checksum) *before* a chunk-sized
        buffer is allocated: metadata edited to a huge ``chunk_shape`` (``[2**40, k]``) would otherwise
        ask numpy for terabytes."""
        path = self.directory / "c" / str(i) / "0"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        if size != self.chunk_rows * width + 4:
            raise StoreCorruptError(
                f"chunk {self.name}/c/{i}/0 is corrupt (truncated, or its metadata edited): it holds {size:,} bytes, but "
                f"the array's metadata ({self.name}/zarr.json: chunk_shape [{self.chunk_rows:,}, {self.shape[1]:,}], "
                f"{self.dtype}) says a chunk holds {self.chunk_rows * width + 4:,} (file {path}). "
                "Restore the run from a copy, or rebuild the array (embeddings: overwrite=True); nothing was allocated."
            )
        return size

    def _read_chunk(self, i: int, dest: np.ndarray, width: int) -> None:
        path = self.directory / "c" / str(i) / "0"
        label = f"{self.name}/c/{i}/0"
        crc = self._read_file(i, dest, width, path, label)
        if crc is None:
            return
        if i * self.chunk_rows < self.required_rows and self.dtype.kind == "f":
            # the run writer fills unwritten rows with NaN and a committed row is never all NaN: an
            # older copy of the chunk than the commit (a run copied while recording)
            r = min(self.required_rows, (i + 1) * self.chunk_rows) - 1 - i * self.chunk_rows
            if np.isnan(dest[r]).all():
                raise StoreCorruptError(
                    f"chunk {label} is older than what covers it: row {i * self.chunk_rows + r} is committed (or built) "
                    f"but the chunk holds it as not yet written (file {path}). This happens when a run is copied while "
                    "a recorder writes it. Copy it again after rec.flush() or rec.close(), or restore it from a copy."
                )
        digests = self.digests
        if digests is not None and (i < digests.n_chunks(self.directory.name) or i * self.chunk_rows < self.required_rows):
            # a recorder writing the run may have rewritten the chunk since the record was read: the
            # chunk is read again (rows and trailer), then the record, before it is refused
            digests.check(self.directory.name, i, crc, label=label, path=path,
                          reread=lambda: self._read_file(i, dest, width, path, label))

    def _read_file(self, i: int, dest: np.ndarray, width: int, path: Path, label: str) -> int | None:
        """Read chunk ``i``'s rows into ``dest``, verify its checksum; returns its crc32c trailer, or
        None for a missing chunk outside the required rows (``dest`` then holds the fill value)."""
        n = self.chunk_rows * width
        try:
            f = open(path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            if i * self.chunk_rows < self.required_rows:
                raise StoreCorruptError(
                    f"chunk {label} is missing (file {path}) although rows {i * self.chunk_rows}.."
                    f"{min(self.required_rows, (i + 1) * self.chunk_rows) - 1} are committed or built; it would read as "
                    "zeros. Restore the run from a copy, or rebuild the array (embeddings: overwrite=True)."
                ) from None
            dest[:] = self.fill_value
            return None
        with f:
            view = memoryview(dest).cast("B")
            got = f.readinto(view)
            tail = f.read(8)
        if got != n or len(tail) != 4:
            raise StoreCorruptError(
                f"chunk {label} is corrupt (truncated or too long: {got + len(tail)} bytes, expected {n + 4}; "
                f"file {path}); restore the run from a copy or re-record the affected steps."
            )
        crc = int.from_bytes(tail, "little")
        if crc32c.crc32c(view) != crc:
            raise StoreCorruptError(
                f"chunk {label} is corrupt (crc32c checksum mismatch; file {path}); restore the run from a copy or "
                "re-record it."
            )
        return crc


def chunk_dir(array: Any) -> Path | None:
    """The chunk directory of a zarr v3 array in a local directory with the run's plain layout (codecs
    ``bytes(little) -> crc32c``, default ``/`` chunk keys, float data, one chunk across every axis but
    the first), or ``None``."""
    try:
        from zarr.codecs import BytesCodec, Crc32cCodec
        from zarr.storage import LocalStore

        meta = array.metadata
        store = array.store
        if not isinstance(store, LocalStore):
            return None
        codecs = tuple(meta.codecs)
        if (
            meta.zarr_format != 3
            or len(array.shape) < 2
            or len(codecs) != 2
            or not isinstance(codecs[0], BytesCodec)
            or not isinstance(codecs[1], Crc32cCodec)
            or getattr(codecs[0].endian, "value", "little") not in ("little", None)
            or tuple(array.chunks)[1:] != tuple(array.shape)[1:]
            or getattr(meta.chunk_key_encoding, "name", "") != "default"
            or getattr(meta.chunk_key_encoding, "separator", "") != "/"
            or np.dtype(array.dtype).kind != "f"
        ):
            return None
        return Path(str(store.root)) / array.path
    except Exception:  # any surprise in zarr's metadata API: keep zarr's reader / writer
        return None


def fast_rows(array: Any, *, required_rows: int = 0) -> Any:
    """A :class:`ChunkFileRows` reading the same rows as ``array`` (a zarr array), or ``array``
    itself when its layout is not the run's plain one (non-local store, other codecs or chunking).

    ``required_rows``: rows that must be present (the commit's or a build's length): a missing chunk
    among them raises :class:`~datavalue.errors.StoreCorruptError` instead of reading as zeros (for
    the zarr fallback, check with :meth:`datavalue.store.Run.require_chunks`). A recorded array of a run
    that binds its chunks (``datavalue.store._digest``) is read with the run's digest record: a chunk
    file from another run, or an older copy, raises :class:`~datavalue.errors.StoreCorruptError`."""
    directory = chunk_dir(array)
    if directory is None or len(array.shape) != 2:
        return array
    return ChunkFileRows(directory, array.shape, array.chunks[0], array.dtype,
                         float(array.metadata.fill_value or 0.0), name=str(array.path), required_rows=required_rows,
                         digests=run_digests(directory.parent))


def run_digests(root: Path) -> ChunkDigests | None:
    """The chunk digest record of the local run ``root`` (read as a consistent pair with its commit), or
    ``None``: not a run that binds its chunks (derived arrays' groups, runs written before it; ``open_run``
    refuses a run that should have a record and has none)."""
    try:
        with open(root / "zarr.json", "rb") as f:
            attrs = json.loads(f.read()).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return None
    run_id = attrs.get(RUN_ID_KEY) if isinstance(attrs, dict) else None
    if not isinstance(run_id, str) or attrs.get(CHUNK_DIGESTS_KEY) is None:
        return None
    get = local_get(root)
    pair = load_pair(get, root)
    if pair is None:
        return None

    def load() -> Any:
        again = load_pair(get, root)
        if again is None:
            raise StoreCorruptError(f"{root}: the run's chunk digest record disappeared while it was read. Restore "
                                    "the run from a whole copy.")
        return again

    return ChunkDigests(pair[0], run_id, pair[1], root, load)


def write_all(array: Any, data: np.ndarray) -> None:
    """``array[:] = data``; for a local array with the run's plain layout, chunk file by chunk file
    with the store writer's encoder (zarr's write path cost 0.14 s of Python for one 32 MB operator)."""
    from datavalue.store._writer import write_chunk

    data = np.asarray(data, dtype=array.dtype)
    directory = chunk_dir(array)
    if directory is None or data.shape != tuple(array.shape):
        array[...] = data
        return
    C = int(array.chunks[0])
    for i in range(-(-data.shape[0] // C)):
        write_chunk(directory, i, data[i * C : (i + 1) * C], C)
