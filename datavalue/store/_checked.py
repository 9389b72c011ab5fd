"""Checked reads of any zarr array of a run: a missing chunk or a damaged one is a ``StoreCorruptError``.

zarr reads a missing chunk as the array's fill value (zeros) and a chunk whose crc32c trailer does not
match raises a bare ``ValueError`` at compute time. :class:`CheckedArray` wraps a zarr array so that
every read first checks that each chunk it touches inside the required entries (``0:required`` along
the first axis: what the commit or a build covers) exists, in every column chunk, and names the chunk
that fails to decode. :func:`checked_rows` gives the reader for a dask array of a run's rows: the
chunk-file reader (:func:`~datavalue.store.fast_rows`, checksums and the run's digest record) for the
run's plain layout, :class:`CheckedArray` for any other (several column chunks, other stores).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from datavalue.errors import StoreCorruptError
from datavalue.store._verify import missing_chunk_message

__all__ = ["CheckedArray", "checked_rows", "first_missing_chunk", "read_checked"]


def _key(arr: Any, coords: tuple[int, ...]) -> str:
    """The store key of chunk ``coords`` of ``arr`` (``<path>/c/1/0``; ``<path>/c`` for a 0-d array)."""
    rel = arr.metadata.encode_chunk_key(coords)
    return f"{arr.path}/{rel}" if arr.path else rel


def _exists(arr: Any, key: str) -> bool:
    from zarr.core.sync import sync
    from zarr.storage import LocalStore

    store = arr.store
    if isinstance(store, LocalStore):
        import os

        return os.path.isfile(os.path.join(str(store.root), *key.split("/")))
    return bool(sync(store.exists(key)))


def _grid(arr: Any) -> tuple[int, ...]:
    return tuple(-(-int(s) // int(c)) for s, c in zip(arr.shape, arr.chunks, strict=True))


def first_missing_chunk(arr: Any, required: int, rows: tuple[int, int] | None = None) -> tuple[str, int, int] | None:
    """The first chunk of ``arr`` holding entries ``0:required`` (along the first axis; only those in
    ``rows`` ``(a, b)`` when given) that is missing, in any column chunk: ``(key, first, last)``, or None."""
    shape = tuple(int(s) for s in arr.shape)
    if 0 in shape or int(required) <= 0:
        return None
    if not shape:
        return None if _exists(arr, _key(arr, ())) else (_key(arr, ()), 0, 0)
    C = int(arr.chunks[0])
    a, b = (0, int(required)) if rows is None else (max(0, rows[0]), min(int(required), rows[1]))
    if b <= a:
        return None
    others = [range(g) for g in _grid(arr)[1:]]
    for i in range(a // C, -(-b // C)):
        for rest in itertools.product(*others):
            key = _key(arr, (i, *rest))
            if not _exists(arr, key):
                return key, i * C, min(int(required), (i + 1) * C) - 1
    return None


class CheckedArray:
    """Array-like reads of a zarr array (any shape) that refuse a missing or damaged chunk.

    ``name``: the array's path inside the run (messages); ``location``: the run (messages);
    ``required``: entries ``0:required`` along the first axis that must be present (a chunk missing
    there would read as zeros). Reading a chunk that fails to decode (checksum, truncation) raises
    :class:`~datavalue.errors.StoreCorruptError` naming it. Picklable as the zarr array is."""

    def __init__(self, arr: Any, name: str | None = None, *, required: int | None = None, location: Any = None) -> None:
        self._arr = arr
        self.name = name or str(arr.path)
        self.location = location if location is not None else str(getattr(arr.store, "root", arr.store))
        self.shape = tuple(int(s) for s in arr.shape)
        self.dtype = np.dtype(arr.dtype)
        self.chunks = tuple(int(c) for c in arr.chunks)
        self.ndim = len(self.shape)
        self.required = (self.shape[0] if self.shape else 1) if required is None else int(required)

    def __len__(self) -> int:
        return self.shape[0]

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return ("CheckedArray", self.location, self.name, self.shape, self.dtype.str, self.required)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if self.shape:
            first = key[0] if key else slice(None)
            if isinstance(first, slice):
                a, b, _ = first.indices(self.shape[0])
                rows = (min(a, b), max(a, b) + 1) if first.step not in (None, 1) else (a, b)
            elif isinstance(first, (int, np.integer)):
                r = int(first) % self.shape[0] if self.shape[0] else 0
                rows = (r, r + 1)
            else:
                rows = (0, self.shape[0])
        else:
            rows = None
        missing = first_missing_chunk(self._arr, self.required, rows)
        if missing is not None:
            raise StoreCorruptError(missing_chunk_message(self.location, *missing))
        try:
            return np.asarray(self._arr[key])
        except StoreCorruptError:
            raise
        except Exception as exc:  # noqa: BLE001 - zarr's decode errors (ValueError for a checksum) are named below
            raise StoreCorruptError(self._damaged(rows, exc)) from exc

    def _damaged(self, rows: tuple[int, int] | None, exc: Exception) -> str:
        """Name the first chunk in ``rows`` that fails to decode."""
        grid = _grid(self._arr)
        if not self.shape:
            coords_list: Any = [()]
        else:
            C = self.chunks[0]
            a, b = rows if rows is not None else (0, self.shape[0])
            coords_list = itertools.product(range(a // C, -(-b // C)), *[range(g) for g in grid[1:]])
        for coords in coords_list:
            sel = tuple(slice(c * n, min((c + 1) * n, s)) for c, n, s in zip(coords, self.chunks, self.shape, strict=True))
            try:
                self._arr[sel]
            except Exception:  # noqa: BLE001 - this chunk is the one
                return (f"{self.location}: chunk {_key(self._arr, coords)} is corrupt (checksum mismatch or truncated: "
                        f"{type(exc).__name__}: {exc}). Restore the run from a copy; for derived arrays (embeddings) "
                        "rebuild them with overwrite=True; for recorded arrays re-record from the last intact step.")
        return (f"{self.location}: reading {self.name} failed ({type(exc).__name__}: {exc}); no single chunk fails when "
                "read alone (an I/O error?). Read it again; if it fails again, restore the run from a copy.")


def read_checked(arr: Any, name: str | None = None, *, required: int | None = None, location: Any = None) -> np.ndarray:
    """All of ``arr`` as numpy, read through :class:`CheckedArray` (every chunk present and intact)."""
    return CheckedArray(arr, name, required=required, location=location)[...]


class _Rows2D:
    """Tuple-key adapter over a row reader that takes one row slice (``ChunkFileRows``), for dask."""

    def __init__(self, rows: Any) -> None:
        self._rows = rows
        self.shape, self.dtype, self.ndim = tuple(rows.shape), np.dtype(rows.dtype), len(rows.shape)

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return ("_Rows2D", self._rows.__dask_tokenize__())

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first = key[0] if key else slice(None)
        if not isinstance(first, slice) or first.step not in (None, 1):
            out = self._rows[0 : self.shape[0]]
            return out[key]
        out = self._rows[first]
        return out[(slice(None), *key[1:])] if len(key) > 1 else out


def checked_rows(arr: Any, required: int, *, location: Any = None) -> Any:
    """A reader of ``arr`` for ``dask.array.from_array`` that refuses a missing (inside ``0:required``)
    or damaged chunk with :class:`~datavalue.errors.StoreCorruptError` naming it: the chunk-file reader
    for the run's plain layout (it also checks the run's digest record), :class:`CheckedArray` otherwise."""
    from datavalue.store._chunkfiles import fast_rows

    rows = fast_rows(arr, required_rows=required)
    if rows is not arr:
        return _Rows2D(rows)
    return CheckedArray(arr, str(arr.path), required=required, location=location)
