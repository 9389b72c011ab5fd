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
import os
import zipfile
import zlib
from typing import Any

import crc32c
from zarr.storage import ZipStore

from datavalue.errors import StoreCorruptError

_FIX = "Restore the archive from a copy, or archive the run again (datavalue archive RUN OUT.zip)."


def _is_chunk_key(key: str) -> bool:
    """Whether ``key`` names a chunk (``<array>/c/<i>/...`` or a 0-d array's ``<array>/c``), not metadata."""
    return not key.endswith(".json") and ("/c/" in f"/{key}" or key.endswith("/c") or key == "c")


class CheckedZipStore(ZipStore):
    """A read-only ``ZipStore`` whose damaged entries raise :class:`StoreCorruptError` naming the
    archive and the entry; every whole chunk read is checked against its trailing crc32c (every
    datavalue array ends its codec chain with ``crc32c``, checked on open by ``_metacheck``)."""

    def _sync_open(self) -> None:
        super()._sync_open()
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

    def _get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
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
