"""Read-only view of a run store, with lazy dask arrays for out-of-core work.

Also the derived arrays' helpers (:func:`create_array`, :func:`open_array_writable`,
:func:`delete_path`) and :func:`archive_run`, each of which first refuses a path that a symbolic
link leads outside the run (:func:`check_inside_run`): one checked implementation of each.

What opening a run checks (manifest, commit, shapes, chunk digests) is ``datavalue.store._verify``;
whether derived data and a final pass are this run's is ``datavalue.store._lineage``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

if TYPE_CHECKING:
    import dask.array as da

from datavalue.errors import (
    StoreCorruptError,
    StoreError,
    StoreExistsError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreReadOnlyError,
)
from datavalue.store._lineage import foreign_derived
from datavalue.store._lineage import stale_final_pass as stale_final_pass  # re-exported, as before
from datavalue.store._metacheck import check_array
from datavalue.store._paths import (
    check_inside_run,
    is_local,
    refuse_reading_links,
)
from datavalue.store._runpath import RunPathError, run_location
from datavalue.store._schema import (
    CHUNK_DIGESTS_KEY,
    FINAL_PASS_INTEGRATION,
    GROUP_STEP_ARRAYS,
    LINEAGE_KEY,
    LINEAGE_STAMP_KEY,
    MANIFEST_DIGEST_KEY,
    MANIFEST_KEY,
    MARKED_ARRAYS,
    OPTIONAL_STEP_ARRAYS,
    RUN_ID_KEY,
    SCHEMA_VERSION,
    committed_length,
    lineage_stamp,
    unwritten_value,
)
from datavalue.store._verify import (  # the writer and the archiver import the checks from here, as before
    COMMITTED_ARRAYS,
    _chunk_crc,
    _chunk_size,
    check_array_shapes,
    check_chunk_digests,
    check_manifest,
    missing_chunk_message,
    read_commit,
    stale_chunk_message,
)
from datavalue.store._ziparchive import open_zip


def _our_version() -> str:
    from datavalue import __version__

    return __version__


def _our_major() -> str:
    return _our_version().split(".")[0]


def _normalise(location: Any) -> Any:
    """Local directories become absolute ``Path`` s; archives and URLs stay strings; Store objects pass
    through (:func:`~datavalue.store._runpath.run_location`)."""
    location = run_location(location)
    if is_local(location):
        return Path(location)
    return os.fspath(location) if isinstance(location, os.PathLike) else location


def _open_group(location: Any, mode: str) -> zarr.Group:
    """Open a run's root group from a directory, a ``.zip`` archive, an fsspec URL or a zarr Store."""
    location = run_location(location)  # file:// URLs, relative paths, '::' (datavalue.store._runpath)
    if is_local(location):
        path = Path(location)
        if not (path / "zarr.json").exists():
            raise StoreNotFoundError(f"no datavalue run at {path} (no zarr.json). Record one with datavalue.Recorder.")
        store: Any = str(path)
    else:
        if mode != "r":
            raise StoreReadOnlyError(
                f"{location} is an archive or a remote/in-memory store, which datavalue opens read-only; copy the run "
                "to a local directory to record into it or to build embeddings."
            )
        if isinstance(location, (str, os.PathLike)) and os.fspath(location).endswith(".zip") and "://" not in os.fspath(location):
            if not Path(location).is_file():
                raise StoreNotFoundError(f"no run archive at {location}.")
            store = open_zip(location)  # damaged entries: StoreCorruptError; duplicate names refused
        elif isinstance(location, (str, os.PathLike)):
            store = zarr.storage.FsspecStore.from_url(os.fspath(location), read_only=True)
        elif isinstance(location, zarr.abc.store.Store):
            store = location  # a zarr Store object (e.g. zarr.storage.MemoryStore in tests)
        else:  # P9-06: was "cannot open the zarr group at 3: Unsupported type ..." as a StoreCorruptError
            raise RunPathError(
                f"a run location is a local path (str or os.PathLike), a URL or a zarr Store; got {type(location).__name__} "
                f"{str(location)[:60]!r}.")
    try:
        return zarr.open_group(store, mode=mode, zarr_format=3)
    except FileNotFoundError as exc:
        raise StoreNotFoundError(f"no datavalue run at {location}: {exc}") from exc
    except Exception as exc:  # unreadable metadata
        raise StoreCorruptError(f"cannot open the zarr group at {location}: {exc}") from exc


class Run:
    """A committed, read-only view of a recorded run.

    Only what the ``commit`` counter covers is visible. Small per-row and per-step arrays are
    loaded eagerly as numpy; ``grads`` and ``fisher`` are lazy dask arrays chunked by rows.

    Example:
        >>> run = open_run("runs/x.zarr")            # doctest: +SKIP
        >>> run.n_steps, run.grads.shape              # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = _normalise(path)
        self._group = _open_group(self.path, "r")
        manifest = self._group.attrs.get(MANIFEST_KEY)
        if manifest is None:
            raise StoreMismatchError(f"{self.path} is a zarr group but not a datavalue run (no '{MANIFEST_KEY}' attrs).")
        if not isinstance(manifest, dict):  # P9-07: was a raw ValueError from dict(manifest)
            raise StoreCorruptError(
                f"{self.path}: the run manifest (root attribute '{MANIFEST_KEY}' in zarr.json) is a "
                f"{type(manifest).__name__} ({str(manifest)[:60]!r}), not the object the recorder writes: zarr.json was "
                "edited or damaged. Restore zarr.json from a copy of the run, or re-record it.")
        self.manifest: dict[str, Any] = dict(manifest)
        version = self.manifest.get("schema_version")
        versions = self.manifest.get("versions")
        wrote = str((versions if isinstance(versions, dict) else {}).get("datavalue-engine", "unknown"))
        if wrote[:1].isdigit() and wrote.split(".")[0] != _our_major():
            raise StoreMismatchError(
                f"{self.path} was written by datavalue-engine {wrote}; this is version {_our_version()} (another major "
                "version). Read it with the major version that wrote it, or re-record."
            )
        if version != SCHEMA_VERSION:
            raise StoreMismatchError(
                f"{self.path} has schema version {version}; this datavalue reads version {SCHEMA_VERSION}. "
                "Install the datavalue version that wrote it, or re-record."
            )
        check_manifest(self.manifest, self.path, self._group.attrs.get(MANIFEST_DIGEST_KEY))
        if isinstance(self.path, Path):
            refuse_reading_links(self.path)
        self.n_steps, self.n_rows, self.n_fisher_rows, self.generation = read_commit(self._group, self.path)
        self._check_chunks()

    @property
    def run_id(self) -> str | None:
        """The random id drawn when the run was created (root attribute :data:`RUN_ID_KEY`), or
        ``None`` for a run written before run ids."""
        found = self._group.attrs.get(RUN_ID_KEY)
        return str(found) if found is not None else None

    @property
    def lineage(self) -> list[list[Any]]:
        """The run's resume history ``[[first_step, session_id], ...]`` (root attribute
        :data:`LINEAGE_KEY`): one entry per resume; empty for a run never resumed (or written before
        the history was kept)."""
        return [[int(a), str(b)] for a, b in list(self._group.attrs.get(LINEAGE_KEY) or [])]

    def lineage_stamp(self) -> list[Any]:
        """``[n, sha256]`` of the run's whole history: what derived data built now record
        (:data:`LINEAGE_STAMP_KEY`) and :meth:`foreign_derived` checks."""
        return lineage_stamp(self.lineage)

    def foreign_derived(self, name: str, *, fix: str) -> str | None:
        """Why the derived array or group ``name`` is another run's (it carries another run id), or
        None; ``fix`` ends the message. See :func:`foreign_derived`."""
        return foreign_derived(self, name, fix=fix)

    def array_names(self, name: str) -> list[str]:
        """Names of the arrays directly inside group ``name``, sorted; ``[]`` when there is none."""
        try:
            group = self._group[name]
        except KeyError:
            return []
        return sorted(group.array_keys()) if isinstance(group, zarr.Group) else []

    @property
    def is_final_pass(self) -> bool:
        """Whether this run is the no-update pass at a training run's final weights
        (:class:`datavalue.capture.FinalPass`, ``<run>/final``), not a training trajectory."""
        return (self.manifest.get("integration") or {}).get("name") == FINAL_PASS_INTEGRATION

    @property
    def final_pass_steps(self) -> int | None:
        """For a final pass: the training run's committed step count when the pass was recorded
        (``None`` for another run, or a pass written before it was stored)."""
        steps = (self.manifest.get("integration") or {}).get("run_steps") if self.is_final_pass else None
        return int(steps) if isinstance(steps, int) and not isinstance(steps, bool) else None

    def _committed_length(self, name: str) -> int:
        return committed_length(name, steps=self.n_steps, rows=self.n_rows, fisher_rows=self.n_fisher_rows)

    def _check_chunks(self) -> None:
        """Every array's shape and every chunk the commit covers must exist: a deleted chunk would
        otherwise read as zeros, an older array metadata file would hide committed entries."""
        check_array_shapes(self._group, self.path, steps=self.n_steps, rows=self.n_rows, fisher_rows=self.n_fisher_rows)
        attrs = self._group.attrs
        # a local run bound by a digest record: its check below opens every committed chunk (and names a
        # missing one the same way), so the existence check is not made twice
        bound = isinstance(self.path, Path) and attrs.get(CHUNK_DIGESTS_KEY) is not None and attrs.get(RUN_ID_KEY) is not None
        for name in COMMITTED_ARRAYS:
            n = self._committed_length(name)
            if n <= (1 if name.endswith("_ptr") else 0) or not self.has_array(name):
                continue
            if not bound:
                self.require_chunks(name, n)
            if name in ("grads", "fisher"):
                self._check_chunk_tails(name, n)
        # every committed chunk is this run's: bound to its id by the digest record (one 4-byte read each)
        self._digests, _ = check_chunk_digests(self._group, self.path, steps=self.n_steps, rows=self.n_rows,
                                               fisher_rows=self.n_fisher_rows)

    def _check_chunk_tails(self, name: str, n: int) -> None:
        """The last committed row of every chunk of ``name`` must have been written: the writer
        fills a partial chunk's unwritten rows with NaN, and a committed row is never all NaN, so an
        all-NaN row there means an older copy of the chunk than the commit (a run copied while it
        was recorded). One row is read per chunk, straight from the chunk file (local runs with the
        plain layout; others are checked as their rows are read)."""
        from datavalue.store._chunkfiles import chunk_dir

        arr = self.array(name)
        directory = chunk_dir(arr)
        if directory is None:
            return
        C, width = int(arr.chunks[0]), int(arr.shape[1]) * np.dtype(arr.dtype).itemsize
        dtype, base = np.dtype(arr.dtype).newbyteorder("<"), str(directory / "c")
        for i in range(-(-int(n) // C)):
            r = min(int(n), (i + 1) * C) - 1 - i * C
            try:
                fd = os.open(f"{base}/{i}/0", os.O_RDONLY)
                try:
                    raw = os.pread(fd, width, r * width)
                finally:
                    os.close(fd)
            except OSError:
                continue  # require_chunks has named a missing chunk; a short one fails its checksum on read
            if len(raw) == width and np.isnan(np.frombuffer(raw, dtype=dtype)).all():
                raise StoreCorruptError(stale_chunk_message(self.path, name, i, i * C + r))

    def require_chunks(self, name: str, n: int) -> None:
        """Check that every chunk holding entries ``0:n`` of array ``name`` exists.

        zarr (and :class:`~datavalue.store.ChunkFileRows`) read a missing chunk as the fill value, so
        a deleted chunk of a recorded or derived array (``"embeddings/<c>/values"``) would be read
        as exact zeros. :func:`open_run` checks the run's own arrays up to the commit; a reader of a
        derived array calls this with the length its provenance covers.

        Raises:
            StoreNotFoundError: the run has no array ``name``.
            StoreCorruptError: a chunk inside ``0:n`` is missing (the message names it).

        Example:
            >>> run.require_chunks("embeddings/fisher/values", run.n_rows)  # doctest: +SKIP
        """
        arr = self.array(name)
        if int(n) <= 0 or 0 in arr.shape:  # nothing to hold: a zero-size array has no chunk
            return
        if not arr.shape:  # a 0-d array: its one chunk is ``<name>/c``
            if not self._chunk_exists(name, ()):
                raise StoreCorruptError(
                    f"{self.path}: chunk {name}/c (the 0-d array's value) is missing; it would read as zero. "
                    "Restore the run from a copy."
                )
            return
        from datavalue.store._checked import first_missing_chunk

        missing = first_missing_chunk(arr, int(n))  # every column chunk of every row chunk (P7 leftovers)
        if missing is not None:
            raise StoreCorruptError(missing_chunk_message(self.path, *missing))

    # ------------------------------------------------------------------ helpers
    def _chunk_exists(self, name: str, key: tuple[str, ...]) -> bool:
        if isinstance(self.path, Path):
            return self.path.joinpath(name, "c", *key).is_file()
        from zarr.core.sync import sync

        return bool(sync(self._group.store.exists("/".join((name, "c", *key)))))

    def _read_small(self, name: str, stop: int | None = None) -> np.ndarray:
        try:
            arr = self._group[name]
            out = np.asarray(arr[:stop] if stop is not None else arr[:])
        except KeyError as exc:
            raise StoreNotFoundError(f"{self.path} has no array {name!r}") from exc
        except Exception as exc:
            raise StoreCorruptError(f"reading {name!r} from {self.path} failed (checksum or I/O): {exc}") from exc
        if name in MARKED_ARRAYS and out.size:  # an entry the writer had not written when the chunk was saved
            mark = unwritten_value(out.dtype)
            bad = np.flatnonzero(np.isnan(out) if out.dtype.kind == "f" else out == mark)
            if bad.size:
                raise StoreCorruptError(stale_chunk_message(self.path, name, int(bad[0]) // int(arr.chunks[0]), int(bad[0])))
        if name in ("step_ptr", "fisher_ptr") and out.size and (out[0] != 0 or (np.diff(out) < 0).any() or int(out[-1]) != (
                self.n_rows if name == "step_ptr" else self.n_fisher_rows)):
            raise StoreCorruptError(
                f"{self.path}: {name} is not a row pointer of the committed rows (it must rise from 0 to "
                f"{self.n_rows if name == 'step_ptr' else self.n_fisher_rows}): a chunk of it is older than the run's commit "
                "or damaged. Restore the run from a copy taken while no recorder was writing it."
            )
        return out

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of a row array (``grads``, ``fisher``, ...) as numpy, within the commit
        (for an optional per-step array such as ``adam_v``: steps ``start:stop``).

        ``start`` and ``stop`` count as a Python slice of the committed rows does: ``read("grads", -5)``
        is the last five committed rows, ``read("grads", 0, -1)`` all but the last (P9-02: both were
        taken as positions in the array's allocated length, which runs past the commit: no rows, or
        thousands of rows never committed).

        Raises:
            StoreMismatchError: ``start`` or ``stop`` is not an int (a float, a bool).
        """
        limit = self.n_steps if name in OPTIONAL_STEP_ARRAYS else (self.n_fisher_rows if name == "fisher" else self.n_rows)
        for what, v in (("start", start), ("stop", stop)):
            if v is not None and (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))):
                raise StoreMismatchError(
                    f"Run.read({name!r}, start, stop): {what} must be an int (a row position; negative counts from the "
                    f"end of the {limit} committed entries, as in a Python slice), got {v!r} ({type(v).__name__}); "
                    "nothing is rounded.")
        start, stop, _ = slice(None if start is None else int(start), None if stop is None else int(stop)).indices(limit)
        stop = max(start, stop)
        try:
            arr = self._group[name]
        except KeyError as exc:
            raise StoreNotFoundError(f"{self.path} has no array {name!r}") from exc
        digests = self._digests
        if digests is not None and digests.covers(name) and stop > start:  # the chunks read are this run's
            C, suffix, size = int(arr.chunks[0]), "/0" * (len(arr.shape) - 1), _chunk_size(arr)
            for i in range(start // C, -(-stop // C)):
                key = f"{name}/c/{i}{suffix}"
                crc, whole, file = _chunk_crc(self._group, self.path, key, size)
                if whole:  # missing or damaged: require_chunks has named it at open, or zarr names it below
                    digests.check(name, i, crc, label=key, path=file,
                                  reread=lambda key=key: _chunk_crc(self._group, self.path, key, size)[0])
        try:
            return np.asarray(arr[start:stop])
        except Exception as exc:
            raise StoreCorruptError(
                f"reading {name}[{start}:{stop}] from {self.path} failed: {self._bad_chunk(arr, name, start, stop)}: {exc}"
            ) from exc

    @staticmethod
    def _bad_chunk(arr: zarr.Array, name: str, start: int, stop: int) -> str:
        """Name the first chunk in ``start:stop`` that fails to decode (checksum, truncation)."""
        C = int(arr.chunks[0])
        for i in range(start // C, -(-stop // C)):
            try:
                arr[i * C : min((i + 1) * C, arr.shape[0])]
            except Exception:
                return f"chunk {name}/c/{i}{'/0' * (len(arr.shape) - 1)} is corrupt (checksum mismatch or truncated)"
        return "I/O error"

    # ------------------------------------------------------------------ per-step
    @functools.cached_property
    def step_ptr(self) -> np.ndarray:
        return self._read_small("step_ptr", self.n_steps + 1)

    @functools.cached_property
    def lr(self) -> np.ndarray:
        return self._read_small("lr", self.n_steps)

    @functools.cached_property
    def epoch(self) -> np.ndarray:
        return self._read_small("epoch", self.n_steps)

    @functools.cached_property
    def grad_scale(self) -> np.ndarray:
        return self._read_small("grad_scale", self.n_steps)

    @functools.cached_property
    def momentum(self) -> np.ndarray:
        return self._read_small("momentum", self.n_steps)

    @functools.cached_property
    def weight_decay(self) -> np.ndarray:
        return self._read_small("weight_decay", self.n_steps)

    # ------------------------------------------------------------------ per-row
    @functools.cached_property
    def sample_id(self) -> np.ndarray:
        return self._read_small("sample_id", self.n_rows)

    @functools.cached_property
    def weight(self) -> np.ndarray:
        return self._read_small("weight", self.n_rows)

    @functools.cached_property
    def flags(self) -> np.ndarray:
        return self._read_small("flags", self.n_rows)

    @functools.cached_property
    def row_step(self) -> np.ndarray:
        """``(R,)`` step index of every row."""
        return np.repeat(np.arange(self.n_steps), np.diff(self.step_ptr))

    # ------------------------------------------------------------------ big arrays
    @property
    def row_chunk(self) -> int:
        return int(self._group["grads"].chunks[0])

    @property
    def proj_dim(self) -> int:
        return int(self._group["grads"].shape[1])

    @property
    def grads(self) -> da.Array:
        """``(R, k)`` lazy per-sample gradients (committed rows only; a chunk deleted or damaged since the
        run was opened raises :class:`~datavalue.errors.StoreCorruptError` naming it when computed)."""
        return self._checked_dask("grads", self.n_rows)

    @property
    def has_fisher(self) -> bool:
        return "fisher" in self._group

    @property
    def fisher(self) -> da.Array:
        if not self.has_fisher:
            raise StoreNotFoundError(
                f"{self.path} holds no Fisher pseudo-gradients; record with Recorder(..., curvature='fisher')."
            )
        return self._checked_dask("fisher", self.n_fisher_rows)

    def _checked_dask(self, name: str, n: int) -> da.Array:
        """``name[:n]`` as a dask array read through the checked chunk reader: a chunk deleted or damaged
        after open raises :class:`~datavalue.errors.StoreCorruptError` naming it when computed (zarr
        would read zeros, or raise a bare ``ValueError``)."""
        import dask.array as da  # here, not at import: recording never needs dask (0.5 s to import)

        from datavalue.store._checked import checked_rows

        arr = self._group[name]
        reader = checked_rows(arr, int(n), location=self.path)
        return da.from_array(reader, chunks=tuple(int(c) for c in arr.chunks), asarray=False, fancy=False)[:n]

    @functools.cached_property
    def fisher_ptr(self) -> np.ndarray:
        if not self.has_fisher:
            raise StoreNotFoundError(f"{self.path} holds no Fisher pseudo-gradients.")
        return self._read_small("fisher_ptr", self.n_steps + 1)

    @property
    def has_adam_state(self) -> bool:
        """Whether the run stores the Adam moments per step (``adam_m``, ``adam_v``, ``adam_step``)."""
        return all(n in self._group for n in ("adam_m", "adam_v", "adam_step"))

    @property
    def has_hessian(self) -> bool:
        """Whether the run stores each step's sketched exact Hessian (``Recorder(..., curvature="hessian")``)."""
        return "hessian" in self._group

    def adam_first_step(self) -> int:
        """First step whose Adam moments were recorded (0 unless added on resume)."""
        return int(self._group["adam_v"].attrs.get("first_step", 0)) if self.has_adam_state else -1

    @functools.cached_property
    def adam_step(self) -> np.ndarray:
        return self._read_small("adam_step", self.n_steps)

    @property
    def has_param_groups(self) -> bool:
        """Whether the run stores per-param-group hyperparameters (``group_lr``, ``group_momentum``,
        ``group_weight_decay``; optimizers with more than one param group)."""
        return all(n in self._group for n in GROUP_STEP_ARRAYS)

    @functools.cached_property
    def param_groups(self) -> dict[str, np.ndarray] | None:
        """``{"lr", "momentum", "weight_decay"}`` -> ``(T, G)`` float64 per-group hyperparameters of every
        step (NaN for steps recorded without them), or ``None`` for a run without them. Which columns
        belong to which group: :attr:`column_groups` (docs/store-format.md)."""
        if not self.has_param_groups:
            return None
        return {n.removeprefix("group_"): self._read_small(n, self.n_steps) for n in GROUP_STEP_ARRAYS}

    @property
    def column_groups(self) -> dict[str, Any] | None:
        """Which gradient columns belong to which of the optimizer's param groups:
        ``{"n_groups", "column_groups": [[start, stop, group], ...], "mixed_blocks": {block: [groups]}}``
        (``group`` -1: a projected block mixing groups; -2: a parameter no group holds), or ``None``
        (one group, or recorded without the optimizer). See docs/store-format.md."""
        entry = (self.manifest.get("projection") or {}).get("param_groups")
        return dict(entry) if entry else None

    # ------------------------------------------------------------------ manifest views
    @property
    def blocks(self) -> list[dict[str, Any]]:
        return list(self.manifest["projection"].get("blocks", []))  # validated on open; absent: none

    @property
    def optimizer(self) -> dict[str, Any]:
        return dict(self.manifest.get("optimizer") or {"kind": None, "dampening": 0.0, "nesterov": False})

    def has_array(self, name: str) -> bool:
        try:
            self._group[name]
        except KeyError:
            return False
        return True

    def array(self, name: str) -> zarr.Array:
        """The run's array ``name`` (``"grads"``, ``"adam_v"``, ``"embeddings/fisher/values"``, ...),
        read-only and unsliced: it may hold spare rows past the commit (bound reads by
        :attr:`n_rows` / :attr:`n_steps`, or use :meth:`read`). Hand it to :func:`fast_rows` for the
        direct chunk-file reader.

        Raises:
            StoreNotFoundError: the run has no array ``name``.

        Example:
            >>> run.array("grads").chunks           # doctest: +SKIP
            (4096, 512)
        """
        try:
            return check_array(self._group[name], name, self.path, self._group.attrs)
        except KeyError as exc:
            raise StoreNotFoundError(f"{self.path} has no array {name!r}") from exc

    def chunk_rows(self, name: str) -> int:
        """Entries of array ``name`` per chunk along its first axis (rows, or steps for a per-step
        array such as ``hessian`` or ``adam_v``)."""
        return int(self.array(name).chunks[0])

    def subgroups(self, name: str) -> list[str]:
        """Names of the groups directly inside group ``name``, sorted; ``[]`` when there is none.

        Example:
            >>> run.subgroups("embeddings")         # the embedding builds  # doctest: +SKIP
            ['fisher', 'hessian']
        """
        try:
            group = self._group[name]
        except KeyError:
            return []
        if not isinstance(group, zarr.Group):
            return []
        return sorted(group.group_keys())

    def info(self) -> dict[str, Any]:
        """Summary used by ``datavalue info``."""
        if isinstance(self.path, Path):
            size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        elif isinstance(self.path, (str, os.PathLike)) and os.fspath(self.path).endswith(".zip") and os.path.isfile(self.path):
            size = os.path.getsize(self.path)
        else:
            size = -1
        proj = self.manifest.get("projection", {})
        emb = []
        if self.has_array("embeddings"):
            emb = sorted(k for k in self._group["embeddings"].group_keys())
        return {
            "path": str(self.path),
            "schema_version": self.manifest.get("schema_version"),
            "steps": self.n_steps,
            "occurrences": self.n_rows,
            "unique_samples": int(np.unique(self.sample_id).size) if self.n_rows else 0,
            "epochs": sorted(set(int(e) for e in np.unique(self.epoch))) if self.n_steps else [],
            "proj_dim": self.proj_dim,
            "projection": "exact" if proj.get("proj_dim") is None
            else f"kronecker sketch ({proj.get('sketch', 'gaussian')}), seed {proj.get('seed')}",
            "blocks": [(b["name"], b["rule"], b["stop"] - b["start"]) for b in self.blocks],
            "fisher_rows": self.n_fisher_rows if self.has_fisher else None,
            "hessian": self.has_hessian,
            "nonfinite_rows": int((self.flags & 1).sum()) if self.n_rows else 0,
            "lr_range": [float(self.lr.min()), float(self.lr.max())] if self.n_steps else None,
            "loss_reduction": self.manifest.get("loss_reduction"),
            "optimizer": self.manifest.get("optimizer"),
            "storage_dtype": self.manifest.get("storage_dtype"),
            "embeddings": emb,
            "size_bytes": size,
            "versions": self.manifest.get("versions"),
        }


def open_run(path: str | os.PathLike[str] | Any) -> Run:
    """Open a recorded run read-only. See :class:`Run`.

    ``path`` is a run directory, a ``.zip`` archive made by :func:`archive_run` (or
    ``datavalue archive``), an fsspec URL that zarr can read (``s3://bucket/run.zarr``, needs the
    matching fsspec backend, e.g. ``s3fs``), or a zarr ``Store`` object.
    """
    return Run(path)


def create_array(
    path: str | os.PathLike[str],
    name: str,
    *,
    shape: tuple[int, ...],
    dtype: str,
    chunks: tuple[int, ...],
    attrs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> zarr.Array:
    """Create a derived array (e.g. ``embeddings/fisher/values``) inside a run; returns it writable.

    Raises:
        StoreExistsError: the array exists and ``overwrite`` is False.
        StoreError: ``name`` leads outside the run (a symbolic link); nothing is written.
    """
    from datavalue.store._schema import float_codecs

    check_inside_run(path, name)
    g = _open_group(path, "r+")
    exists = True
    try:
        g[name]
    except KeyError:
        exists = False
    if exists and not overwrite:
        raise StoreExistsError(f"{path}/{name} already exists; pass overwrite=True to rebuild it.")
    if is_local(path) and (Path(path) / name).exists():
        from datavalue.store._writer import refuse_foreign_below

        # zarr's overwrite deletes the node's whole folder: never a user's file or a link in it
        refuse_foreign_below(path, name)
    # every chunk is written, even an all-zero one, so that a missing chunk is always damage
    # (Run.require_chunks): zarr skips chunks equal to the fill value unless told otherwise
    arr = g.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=float_codecs(),
                         fill_value=0, overwrite=True, config={"write_empty_chunks": True})
    arr.attrs.update({**(attrs or {}), **_binding(g)})
    return arr


def _binding(g: zarr.Group) -> dict[str, Any]:
    """The attributes that bind a derived array to the run and to its history (foreign_derived)."""
    run_id = g.attrs.get(RUN_ID_KEY)
    if run_id is None:
        return {}
    return {RUN_ID_KEY: run_id, LINEAGE_STAMP_KEY: lineage_stamp(g.attrs.get(LINEAGE_KEY))}


def rebind_array(path: str | os.PathLike[str], name: str) -> None:
    """Re-stamp the derived array ``name`` with the run's id and its history as it is now: a build
    brought up to date with steps recorded since (``extend_embeddings``) now describes them too."""
    check_inside_run(path, name)
    g = _open_group(path, "r+")
    binding = _binding(g)
    if binding:
        g[name].attrs.update(binding)


def open_array(path: str | os.PathLike[str], name: str) -> zarr.Array:
    """Open a derived array of a run read-only."""
    g = _open_group(path, "r")
    try:
        return check_array(g[name], name, path, g.attrs)
    except KeyError as exc:
        raise StoreNotFoundError(f"{path} has no array {name!r}") from exc


def open_array_writable(path: str | os.PathLike[str], name: str) -> zarr.Array:
    """Open an existing derived array of a run for writing (rows, ``resize``, attributes), e.g. to
    extend an embedding build.

    Raises:
        StoreNotFoundError: the run has no array ``name``.
        StoreReadOnlyError: the run is an archive or a remote store (datavalue writes only local runs).
        StoreError: ``name`` leads outside the run (a symbolic link); nothing is opened.
    """
    check_inside_run(path, name)
    refuse_links_below(path, name)  # rows written into the array never go through a link
    g = _open_group(path, "r+")
    try:
        return check_array(g[name], name, path, g.attrs)
    except KeyError as exc:
        raise StoreNotFoundError(f"{path} has no array {name!r}") from exc


def refuse_links_below(path: str | os.PathLike[str], name: str) -> None:
    """Raise :class:`StoreError` when the member ``name`` of the local run ``path`` holds a symbolic
    link anywhere below it (datavalue writes none): writing its chunks would follow it, possibly out
    of the run. The walk follows no link."""
    if not is_local(path):
        return
    found, todo = [], [os.path.join(os.fspath(path), *name.split("/"))]
    while todo:
        try:
            with os.scandir(todo.pop()) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            if e.is_symlink():
                found.append(os.path.relpath(e.path, os.fspath(path)))
            elif e.is_dir():
                todo.append(e.path)
    if found:
        raise StoreError(
            f"{Path(path) / name} holds {len(found)} symbolic link(s) datavalue did not write: "
            f"{', '.join(repr(f) for f in sorted(found)[:10])} (in {path}); writing its rows would follow them, so "
            "nothing was written. Replace each link with the real file or directory (or remove it), then retry."
        )


def delete_path(path: str | os.PathLike[str], name: str) -> None:
    """Remove a derived array or group (e.g. a stale embedding build) from a run.

    Raises:
        StoreError: ``name`` leads outside the run (a symbolic link); nothing is deleted.
    """
    check_inside_run(path, name)
    g = _open_group(path, "r+")
    try:
        del g[name]
    except KeyError:
        pass
