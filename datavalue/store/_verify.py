"""What opening a run checks before it shows a step: the manifest, the commit counter, every array's
shape against the commit, and every committed chunk against the run's chunk digest record.

:class:`~datavalue.store.Run` runs these checks when it opens a run (and :func:`check_chunk_digests`'s
per-chunk check again for each chunk it reads); the writer runs them when it resumes one. The messages
for a chunk that is missing or older than the commit are here too, one wording for every reader.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from datavalue.errors import StoreCorruptError, StoreMismatchError
from datavalue.store._digest import (
    RECORD,
    ChunkDigests,
    DigestRecord,
    load_pair,
    local_get,
    read_trailer,
)
from datavalue.store._metacheck import check_array
from datavalue.store._schema import (
    CAPTURE_KEYS,
    CHUNK_DIGESTS_KEY,
    MANIFEST_DIGEST_KEY,
    MANIFEST_KEY,
    MARKED_ARRAYS,
    OPTIONAL_STEP_ARRAYS,
    RUN_ID_KEY,
    committed_length,
    manifest_digest,
    manifest_problems,
    unwritten_value,
)

# the reader's logger: the notes these checks log keep the source they had in datavalue.store._reader
logger = logging.getLogger("datavalue.store._reader")


def missing_chunk_message(location: Any, key: str, first: int, last: int) -> str:
    """The error for a chunk file missing inside what the commit (or a build) covers."""
    return (
        f"{location}: chunk {key} (entries {first}..{last}) is missing although the run's commit (or the array's "
        "build) covers it; it would read as zeros. Restore the run from a copy; for derived arrays (embeddings) "
        "rebuild them with overwrite=True; for recorded arrays re-record from the last intact step."
    )


def stale_chunk_message(location: Any, name: str, chunk: int, entry: int) -> str:
    """The error for a committed entry that a chunk file holds as not yet written."""
    return (
        f"{location}: chunk {name}/c/{chunk} is older than the run's commit: entry {entry} is committed but the "
        "chunk holds it as not yet written (it would read as NaN or zeros). This happens when a run is copied while "
        "a recorder writes it (the chunk copied before, the commit after). Copy the run again after rec.flush() or "
        "rec.close(), or restore it from a copy taken while no recorder was writing."
    )


def check_manifest(manifest: Any, location: Any, digest: Any) -> None:
    """Refuse a malformed manifest, or one whose capture-defining part was changed after creation.

    ``digest`` is the run's :data:`MANIFEST_DIGEST_KEY` attribute (``None`` for runs written before
    it existed: they open with a logged note).

    Raises:
        StoreCorruptError: required keys missing or of the wrong type, values outside their set.
        StoreMismatchError: the manifest's ``projection`` / ``loss_reduction`` / ``capture_config``
            differ from what the run was created with (an edited seed would silently change queries).
    """
    problems = manifest_problems(manifest)
    if problems:
        raise StoreCorruptError(
            f"{location}: the run's manifest (zarr.json attribute '{MANIFEST_KEY}') is malformed: "
            + "; ".join(problems) + ". Restore zarr.json from a copy of the run, or re-record it."
        )
    if digest is None:
        logger.info("%s has no manifest digest (written before it was stored); its manifest is not bound to the data",
                    location)
        return
    if digest != manifest_digest(manifest):
        raise StoreMismatchError(
            f"{location}: the manifest's capture settings ({', '.join(k for k in CAPTURE_KEYS if k in manifest)}) "
            f"differ from the ones the run was recorded with (attribute '{MANIFEST_DIGEST_KEY}' does not match): "
            "zarr.json was edited (e.g. projection.seed or loss_reduction), and queries would silently use other "
            "settings than the gradients were recorded with. Restore zarr.json from a copy of the run."
        )


#: The first chunk of each array every committed step writes: if any exists, steps were written.
_FIRST_DATA_CHUNKS = (("grads", "c", "0", "0"), ("sample_id", "c", "0"), ("weight", "c", "0"), ("flags", "c", "0"),
                      ("step_ptr", "c", "0"), ("lr", "c", "0"))


def _key_exists(group: zarr.Group, location: Any, key: tuple[str, ...]) -> bool:
    """Whether the chunk or metadata file ``key`` (path parts inside the run) exists."""
    if isinstance(location, Path):
        return location.joinpath(*key).is_file()
    from zarr.core.sync import sync

    return bool(sync(group.store.exists("/".join(key))))


def read_commit(group: zarr.Group, location: Any) -> tuple[int, int, int, int]:
    """The run's commit counter ``(steps, rows, fisher_rows, generation)``.

    The writer writes a zero commit when it creates a run, before any data chunk; a run without
    ``commit/c/0`` and without data chunks (created by an older version, never stepped) has 0 steps.
    A missing commit chunk (or commit array) beside data chunks is damage, not an empty run: reading
    it as 0 steps would let ``resume=True`` overwrite every recorded step.

    Raises:
        StoreCorruptError: the commit is missing although data chunks exist, or it does not decode.
    """
    if _key_exists(group, location, ("commit", "c", "0")):
        commit = check_array(group["commit"], "commit", location, group.attrs)  # edited metadata: not 0 steps
        try:
            return tuple(int(x) for x in np.asarray(commit[:]))  # type: ignore[return-value]
        except Exception as exc:
            raise StoreCorruptError(
                f"{location}: chunk commit/c/0 (the run's commit counter) is corrupt: {exc}. Restore the run from a copy."
            ) from exc
    written = ["/".join(k) for k in _FIRST_DATA_CHUNKS if _key_exists(group, location, k)]
    if written:
        what = "chunk commit/c/0" if _key_exists(group, location, ("commit", "zarr.json")) else "array commit (and its chunk commit/c/0)"
        raise StoreCorruptError(
            f"{location}: the {what} is missing, but data chunks were written ({', '.join(written)}): the record of "
            "which steps are complete is lost, so the run is damaged, not empty (opening it as 0 steps would let "
            "resume=True overwrite them). Restore the run, or its commit/ folder, from a copy; or record it again "
            "with overwrite=True (also the way out for a run an older version left when it crashed in its first step)."
        )
    return 0, 0, 0, 0


#: Every array the run's commit counter covers (rows, steps or Fisher rows; see ``committed_length``).
COMMITTED_ARRAYS = ("grads", "sample_id", "weight", "flags", "lr", "epoch", "grad_scale", "momentum", "weight_decay",
                    "step_ptr", "fisher", "fisher_ptr", *OPTIONAL_STEP_ARRAYS)


def stale_shape_message(location: Any, name: str, length: int, committed: int) -> str:
    """The error for an array whose metadata (``<name>/zarr.json``) is shorter than the commit."""
    return (
        f"{location}: array {name} has {length} entries (shape in {name}/zarr.json) but the run's commit covers "
        f"{committed}: its metadata file is older than the commit (a run copied while a recorder wrote it, or "
        f"{name}/zarr.json restored from an older copy), and the entries past {length} would be silently dropped. "
        "Restore the run from a copy taken after rec.flush() or rec.close()."
    )


def check_array_shapes(group: zarr.Group, location: Any, *, steps: int, rows: int, fisher_rows: int) -> None:
    """Refuse an array whose first axis is shorter than what the commit ``(steps, rows, fisher_rows)``
    covers. The writer grows an array's metadata before it writes the chunks and the commit, so a
    shorter one is an older ``zarr.json`` than the commit; zarr would read it as the short array.
    Refuse too an array that carries another run id than the run (:data:`RUN_ID_KEY`): a copy from
    another run.

    Raises:
        StoreCorruptError: naming the array, its length and the committed length.
    """
    run_id = group.attrs.get(RUN_ID_KEY)
    for name in COMMITTED_ARRAYS:
        n = committed_length(name, steps=steps, rows=rows, fisher_rows=fisher_rows)
        if n <= 0:
            continue
        try:
            arr = group[name]
        except KeyError:
            continue
        check_array(arr, name, location, group.attrs)  # zarr.json as the writer wrote it (codecs, keys, dtype)
        if run_id is not None and arr.attrs.get(RUN_ID_KEY) != run_id:
            found = arr.attrs.get(RUN_ID_KEY)
            raise StoreCorruptError(
                f"{location}: the array {name!r} was not written with this run ({'it carries another run id' if found else 'it carries no run id'}"
                f": {found!r}, the run's is {run_id!r}): it was copied in from another run or an older version of one, "
                "so its data is not this run's. Restore the run from a whole copy (or re-record it)."
            )
        length = int(arr.shape[0]) if len(arr.shape) else 0
        if length < n:
            raise StoreCorruptError(stale_shape_message(location, name, length, n))


def _store_get(group: zarr.Group, key: str, *, suffix: int | None = None) -> bytes | None:
    """Raw bytes of ``key`` inside a run opened from an archive, a URL or a Store (``suffix``: its last
    ``suffix`` bytes only), or ``None`` when absent."""
    from zarr.abc.store import SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buf = sync(group.store.get(key, prototype=default_buffer_prototype(),
                               byte_range=SuffixByteRequest(suffix) if suffix is not None else None))
    return None if buf is None else buf.to_bytes()


def load_digests(group: zarr.Group, location: Any) -> ChunkDigests | None:
    """The run's :class:`~datavalue.store._digest.ChunkDigests` (read as a consistent pair with its
    commit), or ``None`` when the run has no record (the caller decides whether it must have one)."""
    run_id = group.attrs.get(RUN_ID_KEY)
    if isinstance(location, Path):
        get = local_get(location)
    else:
        def get(key: str) -> bytes | None:
            return _store_get(group, key)

    def load() -> tuple[DigestRecord, tuple[int, int, int, int] | None]:
        pair = load_pair(get, location)
        if pair is None:
            raise StoreCorruptError(f"{location}: the run's chunk digest record ({RECORD}) disappeared while "
                                    "it was read. Restore the run from a whole copy.")
        return pair

    pair = load_pair(get, location)
    if pair is None:
        return None
    return ChunkDigests(pair[0], str(run_id), pair[1], location, load)


def _chunk_crc(group: zarr.Group, location: Any, key: str, size: int) -> tuple[int | None, bool, Any]:
    """``(crc32c trailer, whole, file)`` of the chunk ``key`` inside the run: ``None`` when it is missing
    or shorter than 4 bytes; ``whole``: it holds ``size`` bytes (one chunk and its crc; else truncated
    or damaged, which its checksum names when it is read); ``file`` names it for messages."""
    if isinstance(location, Path):
        file = location / key
        crc, whole = read_trailer(file, size)
        return crc, whole, file
    raw = _store_get(group, key, suffix=4)
    if raw is None or len(raw) != 4:
        return None, False, key
    from zarr.core.sync import sync

    return int.from_bytes(raw, "little"), int(sync(group.store.getsize(key))) == size, key


def _chunk_size(arr: zarr.Array) -> int:
    """Bytes of one chunk file of a recorded array (codecs ``bytes -> crc32c``: the rows and 4)."""
    return int(np.prod(arr.chunks)) * np.dtype(arr.dtype).itemsize + 4


def _marker_entry(raw: bytes, dtype: Any, shape: tuple[int, ...], start: int, stop: int) -> int | None:
    """The first entry in ``start:stop`` (chunk-relative) of a raw chunk that holds the writer's
    unwritten-row marker, or None."""
    dt = np.dtype(dtype).newbyteorder("<")
    n = int(np.prod(shape)) * dt.itemsize
    if len(raw) != n + 4:
        return None
    vals = np.frombuffer(raw, dtype=dt, count=int(np.prod(shape))).reshape(shape)[start:stop]
    mark = unwritten_value(dt)
    hit = np.isnan(vals) if dt.kind == "f" else vals == mark
    hit = hit.reshape(len(vals), -1).all(axis=1)
    found = np.flatnonzero(hit)
    return int(found[0]) if found.size else None


def _refuse_dropped_bindings(group: zarr.Group, location: Any, run_id: Any) -> None:
    """Refuse a run whose root attributes lost what binds its data (P8-01, P8-02).

    Runs written before the manifest digest, the run id or the chunk digest record open with a logged
    note and fewer checks. Those came in that order: a run with a run id always had a manifest digest;
    a run whose recorded arrays carry a run id had one on its root; a run whose digest record files
    exist was written with the root attributes that say so. Without this check, deleting an attribute
    from ``zarr.json`` (by hand, or a tool that rewrites it) turned the checks off: an edited
    ``loss_reduction`` or ``projection.seed`` was read silently, chunk files from another run accepted.
    """
    attrs = group.attrs
    fix = "Restore zarr.json from a copy of the run, or re-record it."
    if run_id is None:
        # every recorded array (and the commit) carries the run id it was written with: asking only a few of
        # them let a zarr.json stripped from those few (and from the root) pass as a run older than run ids (P9-01)
        stamped, where = None, None
        for name in ("commit", *COMMITTED_ARRAYS):
            try:
                stamped = group[name].attrs.get(RUN_ID_KEY)
            except KeyError:
                continue
            if stamped is not None:
                where = name
                break
        if stamped is not None:
            raise StoreCorruptError(
                f"{location}: the run's zarr.json has no run id (root attribute '{RUN_ID_KEY}'), but its recorded "
                f"arrays carry one ({stamped!r}, on {where}/zarr.json): the attribute was removed, and without it "
                f"neither the arrays nor the chunks would be checked against the run. {fix}")
    elif attrs.get(MANIFEST_DIGEST_KEY) is None:
        raise StoreCorruptError(
            f"{location}: the run has a run id ('{RUN_ID_KEY}') but no manifest digest (root attribute "
            f"'{MANIFEST_DIGEST_KEY}'): every run written with a run id stores the digest, so zarr.json was edited "
            f"and its manifest (projection, loss_reduction) can no longer be checked against the recorded data. {fix}")
    missing = [k for k in (CHUNK_DIGESTS_KEY, RUN_ID_KEY) if attrs.get(k) is None]
    if missing and any(_key_exists(group, location, ("commit", f"digests.{i}")) for i in (0, 1)):
        raise StoreCorruptError(
            f"{location}: the run holds a chunk digest record ({RECORD}) but its zarr.json lacks the root "
            f"attribute(s) {', '.join(map(repr, missing))} the writer stores with it: zarr.json was edited, and "
            f"without them no chunk would be checked against the run (a chunk file from another run would be read "
            f"as this run's). {fix}")


def check_chunk_digests(group: zarr.Group, location: Any, *, steps: int, rows: int,
                        fisher_rows: int) -> tuple[ChunkDigests | None, dict[str, np.ndarray] | None]:
    """Check every committed chunk of every recorded array against the run's chunk digest record
    (``datavalue.store._digest``): one 4-byte read per chunk, no pass over the data.

    Returns ``(digests, bound)``: the reader's view of the record and, per array, the digests of its
    committed chunks as they are on disk (what a resumed writer continues from); ``(None, None)`` for
    a run written before chunks were bound to their run (logged at INFO).

    Raises:
        StoreCorruptError: a chunk that matches no digest (another run's, or an older copy's: named,
            with the unwritten-row message when its committed entries hold the marker), a record that
            is missing, another run's or not the commit's.
    """
    run_id = group.attrs.get(RUN_ID_KEY)
    _refuse_dropped_bindings(group, location, run_id)
    if group.attrs.get(CHUNK_DIGESTS_KEY) is None or run_id is None:
        logger.info("%s has no chunk digest record (written before chunks were bound to their run); its chunks are "
                    "not checked against the run id", location)
        return None, None
    digests = load_digests(group, location)
    if digests is None:
        if steps == 0 and rows == 0 and fisher_rows == 0:
            return None, {}  # created and stopped before its first record: nothing recorded to bind
        raise StoreCorruptError(
            f"{location}: the run's chunk digest record ({RECORD}) is missing, but the run was written with "
            f"one (root attribute '{CHUNK_DIGESTS_KEY}') and its commit covers {steps} steps: nothing binds its chunks "
            "to the run any more. Restore the run from a whole copy of its directory, or re-record it.")
    out: dict[str, np.ndarray] = {}
    for name in COMMITTED_ARRAYS:
        n = committed_length(name, steps=steps, rows=rows, fisher_rows=fisher_rows)
        if n <= (1 if name.endswith("_ptr") else 0):
            continue
        try:
            arr = group[name]
        except KeyError:
            continue
        C, suffix = int(arr.chunks[0]), "/0" * (len(arr.shape) - 1)
        n_chunks, size = -(-n // C), _chunk_size(arr)
        bound = np.empty(n_chunks, dtype="<u4")
        for i in range(n_chunks):
            key = f"{name}/c/{i}{suffix}"
            crc, whole, file = _chunk_crc(group, location, key, size)
            if crc is None:
                if isinstance(file, Path) and not file.exists() or not isinstance(file, Path) and _store_get(group, key) is None:
                    raise StoreCorruptError(missing_chunk_message(location, key, i * C, min(n, (i + 1) * C) - 1))
                raise StoreCorruptError(f"{location}: chunk {key} is corrupt (truncated to less than its 4-byte checksum; "
                                        f"file {file}). Restore the run from a copy.")
            if whole and not digests.accepts(name, i, crc):  # (a damaged one: its checksum says so on read)
                if name in MARKED_ARRAYS:  # an older copy the marker tells: the message that says so
                    raw = file.read_bytes() if isinstance(file, Path) else _store_get(group, key)
                    hit = _marker_entry(raw or b"", arr.dtype, tuple(int(c) for c in arr.chunks), 0, min(n, (i + 1) * C) - i * C)
                    if hit is not None:
                        raise StoreCorruptError(stale_chunk_message(location, name, i, i * C + hit))
                crc = digests.check(name, i, crc, label=key, path=file,  # a live recorder: both read again first
                                    reread=lambda key=key, size=size: _chunk_crc(group, location, key, size)[0])
            bound[i] = digests.bind(crc)
        out[name] = bound
    return digests, out
