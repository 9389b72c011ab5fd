"""Reading a run archive (``.zip``, :func:`~datavalue.store.archive_run`) with the same damage
reports as a run directory.

zarr's ``ZipStore`` hands a damaged entry to the caller as ``zipfile.BadZipFile`` ("Bad CRC-32 for
file 'grads/c/0/0'"), and a chunk whose bytes fail the array's crc32c as zarr's bare ``ValueError``
("Stored and computed checksum do not match"); a directory run says
:class:`~datavalue.errors.StoreCorruptError` naming the chunk and the fix. :class:`CheckedZipStore`
maps both to that error, and refuses on open an archive holding two entries of one name (zipfile
keeps both and reads the last: which bytes a chunk has would depend on how the archive was edited).
"""

from __future__ import annotations

import collections
import json
import math
import os
import zipfile
import zlib
from typing import Any

import crc32c
import numpy as np
from zarr.storage import ZipStore

from datavalue.errors import StoreCorruptError

_FIX = "Restore the archive from a copy, or archive the run again (datavalue archive RUN OUT.zip)."

#: the most bytes an entry that is not a chunk (``zarr.json``, the digest record) may hold: a run's
#: metadata is a few KiB (the directory reader's bound on a ``zarr.json`` is the same)
MAX_META_ENTRY = 64 << 20


def _is_chunk_key(key: str) -> bool:
    """Whether ``key`` names a chunk (``<array>/c/<i>/...`` or a 0-d array's ``<array>/c``), not metadata."""
    return not key.endswith(".json") and ("/c/" in f"/{key}" or key.endswith("/c") or key == "c")


class CheckedZipStore(ZipStore):
    """A read-only ``ZipStore`` whose damaged entries raise :class:`StoreCorruptError` naming the
    archive and the entry; every whole chunk read is checked against its trailing crc32c (every
    datavalue array ends its codec chain with ``crc32c``, checked on open by ``_metacheck``)."""

    def _sync_open(self) -> None:
        try:
            super()._sync_open()
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:  # P9-10: was a raw BadZipFile
            try:
                size = f"{os.path.getsize(self.path):,} bytes"
            except OSError:
                size = "size unknown"
            raise StoreCorruptError(
                f"{self.path}: not a readable run archive ({size}; {type(exc).__name__}: {exc}): the file is cut short "
                "(a copy or download that did not finish), damaged, or not a zip file. Expected a .zip that "
                f"archive_run wrote. {_FIX}"
            ) from exc
        names = collections.Counter(self._zf.namelist())
        dups = sorted(n for n, c in names.items() if c > 1)
        if dups:
            self._zf.close()
            self._is_open = False
            shown = ", ".join(repr(n) for n in dups[:5]) + (f" and {len(dups) - 5} more" if len(dups) > 5 else "")
            raise StoreCorruptError(
                f"{self.path}: the run archive holds {len(dups)} entr{'y' if len(dups) == 1 else 'ies'} twice ({shown}): "
                "the archive was edited (entries appended), and which copy is read decides the data. Expected one "
                f"entry per file, as archive_run writes. {_FIX}"
            )

    def _entry_limit(self, key: str) -> tuple[int, str] | None:
        """The most bytes entry ``key`` may hold and why, or None (no bound known): a chunk holds one chunk
        of its array (``bytes`` then ``crc32c``: the chunk's bytes and a 4-byte checksum), anything else
        at most :data:`MAX_META_ENTRY`."""
        if not _is_chunk_key(key):
            return MAX_META_ENTRY, f"at most {MAX_META_ENTRY:,} bytes for an entry that is not a chunk"
        array = key[: -2] if key.endswith("/c") else key[: key.rfind("/c/")] if "/c/" in key else ""
        cache = self.__dict__.setdefault("_chunk_bytes", {})
        if array not in cache:
            cache[array] = None
            meta = f"{array}/zarr.json" if array else "zarr.json"
            try:
                if self._zf.getinfo(meta).file_size <= MAX_META_ENTRY:
                    doc = json.loads(self._zf.read(meta))
                    shape = doc["chunk_grid"]["configuration"]["chunk_shape"]
                    n = math.prod(int(c) for c in shape) * np.dtype(doc["data_type"]).itemsize + 4
                    cache[array] = (n, f"{n:,} bytes: one chunk of {shape} {doc['data_type']} and its checksum, as "
                                       f"{meta} says")
            except Exception:  # noqa: BLE001 - no readable metadata: the open checks refuse the array itself
                pass
        return cache[array]

    def _refuse_oversized(self, key: str) -> None:
        """Refuse, before anything is read or allocated, an entry that declares more bytes than it may
        hold (P9-05: a 6 MB archive whose one deflated chunk unpacks to 1.5 GB made ``open_run`` take 3 GB
        of memory; a few GB more and the kernel kills the process)."""
        try:
            info = self._zf.getinfo(key)
        except KeyError:
            return
        limit = self._entry_limit(key)
        if limit is not None and info.file_size > limit[0]:
            raise StoreCorruptError(
                f"{self.path}: entry {key} of the run archive declares {info.file_size:,} bytes "
                f"({info.compress_size:,} stored), but it may hold {limit[1]}: the archive was edited or crafted (a "
                f"compressed entry that unpacks to far more than it stores), so nothing was read from it. {_FIX}"
            )

    def _get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if not self._is_open:
            self._sync_open()
        self._refuse_oversized(key)
        try:
            buf = super()._get(key, prototype=prototype, byte_range=byte_range)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as exc:
            if isinstance(exc, StoreCorruptError):
                raise
            raise StoreCorruptError(
                f"{self.path}: entry {key} of the run archive is damaged ({type(exc).__name__}: {exc}); its data "
                f"cannot be trusted. {_FIX}"
            ) from exc
        if buf is not None and byte_range is None and _is_chunk_key(key):
            data = memoryview(buf.as_numpy_array()).cast("B")
            if len(data) < 4 or crc32c.crc32c(data[:-4]) != int.from_bytes(data[-4:], "little"):
                raise StoreCorruptError(
                    f"{self.path}: chunk {key} of the run archive is corrupt (crc32c checksum mismatch or truncated: "
                    f"{len(data)} bytes). {_FIX}"
                )
        return buf


def open_zip(path: str | os.PathLike[str]) -> CheckedZipStore:
    """Open the run archive ``path`` read-only (refusing duplicate entry names now, not on first read)."""
    store = CheckedZipStore(os.fspath(path), mode="r")
    store._sync_open()
    return store
