"""What a score array was computed from, and a refusal once the run at its path is another one.

A score array (``Attributor.scores``, eager or lazy) is computed from one run and one build: the
run's id (drawn when it was recorded), its history (``lineage``: one entry per resume) and its
committed rows, and the provenance attributes of the array it scored with (an embedding or
influence build). :func:`read_stamp` reads that identity fresh from the run's store. When the run at
the path is replaced (``Recorder(path, overwrite=True)``, a copy put in its place) or the build is
rebuilt, labels read now (sample ids, steps) would name another run's rows; ``frame``,
``save_parquet``, ``to_dataset`` and a lazy array's compute refuse instead (:func:`refuse_changed`).

A resume that only appends steps keeps every row the scores cover: the run's history extends the
old one, so it is accepted. Cost: two small metadata files and the 36-byte commit chunk per check
(once per query or ``frame``, once per chunk of a lazy compute; about 0.2 ms for a local run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import weakref
from typing import Any

import numpy as np

from datavalue.errors import QueryError, StoreCorruptError
from datavalue.store import read_run_attrs

#: Attributes of a scored array that say which build it is (``build_embeddings``, ``build_influence``).
BUILD_KEYS = ("datavalue_embeddings", "datavalue_influence")
_RUN_ID_KEY = "datavalue_run_id"  # datavalue.store._schema.RUN_ID_KEY (documented in docs/store-format.md)
_LINEAGE_KEY = "datavalue_lineage"  # read by datavalue.store.read_run_attrs


@dataclasses.dataclass(frozen=True)
class RunStamp:
    """The identity of a run and of the array scored from it, at one moment.

    Attributes:
        path: the run's location (for messages).
        array: the scored array's path inside the run (``grads``, ``embeddings/<c>/values``, ...).
        run_id: the run's id (``None`` for a run written before run ids).
        generation: the commit's generation (one more per recording session).
        n_rows: the rows the commit holds.
        lineage: the run's resume history, ``((first_step, session), ...)``.
        build: sha256 of the array's build attributes (``None`` for the recorded ``grads``).
        created: the build's ``created`` time, for messages.
    """

    path: str
    array: str
    run_id: str | None
    generation: int
    n_rows: int
    lineage: tuple[tuple[Any, ...], ...]
    build: str | None
    created: str | None = None

    def describe(self) -> str:
        built = f", {self.array} built {self.created}" if self.created else ""
        return f"run id {self.run_id}, commit generation {self.generation}, {self.n_rows} rows{built}"


def read_stamp(store: Any, path: str, array: str) -> RunStamp:
    """The :class:`RunStamp` of the run in ``store`` (a zarr store, e.g. ``zarr_array.store``), read now.

    Raises:
        QueryError: the run or the array can no longer be read (replaced while it is read, deleted).
    """
    try:
        attrs, commit, meta = read_run_attrs(store, array)
    except StoreCorruptError as exc:  # P9-13: was called "deleted or is being replaced"
        raise QueryError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any failure: the run is not the one the scores came from
        raise QueryError(
            f"{path}: cannot read the run these scores were computed from ({type(exc).__name__}: {exc}); it was "
            "deleted or is being replaced. Query it again once it is in place (a new Attributor)."
        ) from exc
    build = {k: meta[k] for k in BUILD_KEYS if k in meta}
    digest = hashlib.sha256(json.dumps(build, sort_keys=True, default=str).encode()).hexdigest() if build else None
    created = next((b.get("created") for b in build.values() if isinstance(b, dict)), None)
    return RunStamp(
        str(path), array, None if attrs.get(_RUN_ID_KEY) is None else str(attrs.get(_RUN_ID_KEY)), int(commit[3]),
        int(commit[1]), tuple(tuple(e) for e in attrs.get(_LINEAGE_KEY) or []), digest, created,
    )


def changed(then: RunStamp, now: RunStamp, rows: int) -> str | None:
    """Why scores computed at ``then`` over the first ``rows`` rows no longer describe the run at
    ``now``, or ``None`` (same run and build; a resume that appended steps is fine)."""
    if then.run_id != now.run_id:
        return f"the run at {now.path} is another run now (run id {now.run_id}, was {then.run_id}): it was re-recorded"
    if then.build != now.build:
        return f"{now.array} was rebuilt since (built {now.created}, was {then.created})"
    if now.lineage[: len(then.lineage)] != then.lineage or now.n_rows < rows:
        return (f"the run's history changed since (commit generation {now.generation} with {now.n_rows} rows, was "
                f"{then.generation} with {then.n_rows}): it was restored from an older copy, or such a copy was resumed")
    return None


def refuse_changed(then: RunStamp, now: RunStamp, rows: int, what: str, *, source: str = "these scores were computed from",
                   labels: bool = True) -> None:
    """Raise :class:`QueryError` when :func:`changed` says why; ``what`` names the refused call,
    ``source`` what came from the run (``"this Attributor opened"``), ``labels`` whether the call
    labels scores (else it scores)."""
    why = changed(then, now, rows)
    if why is not None:
        result = ("Its sample ids and steps now name other rows, so nothing was labelled or written." if labels
                  else "Its rows hold other data now, so nothing was scored.")
        raise QueryError(
            f"{what}: {source} {then.path} as it was ({then.describe()}), but {why}. {result} Open a new Attributor "
            "on the run and query again."
        )


# every score array handed out (weakly held), with its stamp and the rows it covers: an array from an
# Attributor opened before the run was replaced is refused by one opened after it too
_ISSUED: list[tuple[weakref.ref[Any], RunStamp, int]] = []
_ISSUED_MAX = 64
_ISSUED_LOCK = threading.Lock()  # queries from several threads


def remember(out: Any, stamp: RunStamp, rows: int) -> None:
    """Note that ``out`` was computed at ``stamp`` over the first ``rows`` rows."""
    try:
        entry = (weakref.ref(out), stamp, rows)
    except TypeError:  # not weak-referenceable
        return
    with _ISSUED_LOCK:
        _ISSUED[:] = [*[e for e in _ISSUED if e[0]() is not None][-(_ISSUED_MAX - 1) :], entry]


def stamps_of(scores: Any, path: str) -> list[tuple[RunStamp, int]]:
    """The stamps of the issued arrays of the run at ``path`` that ``scores`` is (or is a view of)."""
    found = []
    with _ISSUED_LOCK:
        issued = list(_ISSUED)
    for ref, stamp, rows in issued:
        got = ref()
        if got is not None and stamp.path == path and (got is scores or np.may_share_memory(got, scores)):
            found.append((stamp, rows))
    return found


class CheckedRows:
    """Rows of a scored array for ``dask.array.from_array``: every read first checks that the run is
    still the one at ``stamp`` (:func:`refuse_changed`), then reads through ``rows`` (a
    :class:`datavalue.store.ChunkFileRows`: a missing or damaged chunk is a ``StoreCorruptError``
    naming it, as in eager queries; or the zarr array itself for other layouts)."""

    def __init__(self, rows: Any, store: Any, stamp: RunStamp, n_rows: int) -> None:
        self._rows, self._store, self.stamp, self._n = rows, store, stamp, int(n_rows)
        self.shape = tuple(int(s) for s in rows.shape)
        self.dtype = np.dtype(rows.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        now = read_stamp(self._store, self.stamp.path, self.stamp.array)
        refuse_changed(self.stamp, now, self._n, "computing a lazy score array", source="it was made from", labels=False)
        rows = key[0] if key else slice(None)
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"CheckedRows takes row slices, got {key!r}")
        out = np.asarray(self._rows[rows])
        return out[(slice(None), *key[1:])] if len(key) > 1 else out
