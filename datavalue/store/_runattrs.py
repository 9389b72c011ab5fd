"""The attributes that say which run (and which build of an array in it) a store holds, read now.

``datavalue.query`` stamps every score array with them (``datavalue.query._identity``) and checks them
again before labelling or computing: the run's root attributes (its id ``datavalue_run_id`` and its
history ``datavalue_lineage``), the commit ``[steps, rows, fisher_rows, generation]`` and the scored
array's attributes. For a local run they are read from the files themselves (a tenth of zarr's cost:
this runs once per chunk of a lazy compute), for other stores through zarr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import zarr
from zarr.storage import LocalStore

from datavalue.errors import StoreCorruptError

__all__ = ["read_run_attrs"]


def read_run_attrs(store: Any, array: str) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    """``(root attributes, commit, attributes of array)`` of the run in ``store`` (a zarr store, e.g.
    ``zarr_array.store``), read now; ``commit`` is the int64 ``[steps, rows, fisher_rows, generation]``.

    Raises:
        Exception: whatever reading fails with (the run deleted, or being replaced); a damaged commit
            chunk is a ``StoreCorruptError`` naming ``commit/c/0``. The caller says what it means for it.
    """
    return _read_local(store, array) if isinstance(store, LocalStore) else _read_zarr(store, array)


def _read_local(store: Any, array: str) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    root = Path(str(store.root))
    raw = (root / "commit" / "c" / "0").read_bytes()  # [steps, rows, fisher_rows, generation] int64 + crc32c
    if len(raw) != 36 or crc32c.crc32c(raw[:32]) != int.from_bytes(raw[32:], "little"):
        # the writer replaces the commit atomically (a rename): a bad one is damage, never a write in flight
        why = "its crc32c does not match" if len(raw) == 36 else f"{len(raw)} bytes, expected 36"
        raise StoreCorruptError(f"{root}: the commit chunk commit/c/0 is damaged ({why}). Restore the run from a copy "
                                "of its directory.")
    attrs = json.loads((root / "zarr.json").read_bytes()).get("attributes") or {}
    meta = json.loads((root / array / "zarr.json").read_bytes()).get("attributes") or {}
    return attrs, np.frombuffer(raw[:32], "<i8"), meta


def _read_zarr(store: Any, array: str) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    group = zarr.open_group(store=store, mode="r", zarr_format=3)
    meta = zarr.open_array(store=store, path=array, mode="r", zarr_format=3).attrs.asdict()
    return group.attrs.asdict(), np.asarray(group["commit"][:]), meta
