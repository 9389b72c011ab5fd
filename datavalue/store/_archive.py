"""``archive_run``: a run directory packed into one ``.zip`` that ``open_run`` reads directly."""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from pathlib import Path

from datavalue._files import atomic_write, inside_run_problem
from datavalue.errors import StoreCorruptError, StoreError, StoreExistsError
from datavalue.store._digest import ChunkDigests, local_get, newest_record, read_commit_bytes
from datavalue.store._paths import is_local, refuse_links_leaving
from datavalue.store._reader import COMMITTED_ARRAYS, Run
from datavalue.store._runlock import live_holder
from datavalue.store._runpath import creation_error, is_own_temporary, run_dir_path, run_location
from datavalue.store._schema import (
    CHUNK_DIGEST_FILES,
    CHUNK_DIGESTS_KEY,
    RUN_ID_KEY,
    committed_length,
)

#: The run's commit counter chunk (``docs/store-format.md``).
COMMIT_CHUNK = "commit/c/0"


class _ArchivePathError(StoreError, ValueError):
    """An archive path that :func:`archive_run` cannot write (a ``StoreError`` that is also the
    ``ValueError`` it raised before)."""


def archive_run(path: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Pack a run directory into one uncompressed ``.zip`` that :func:`open_run` reads directly.

    ``path`` may also be a run archive (a ``.zip`` that :func:`open_run` reads): it is copied byte
    for byte, so ``archive_run`` accepts every local run that ``open_run`` does and the result is
    always the same run. Refuses a run with a symbolic link that leads outside it (the archive would
    pack the link's target, files that are not the run's).

    A run that a recorder (in this or another process) is writing is packed as a consistent
    snapshot of its committed prefix, checked against its chunk digest record before ``out`` is
    replaced; a snapshot that the recorder's next commit overtook is taken again (up to
    :data:`ATTEMPTS` times; ``docs/store-format.md``, "Archives of a live run").

    Raises:
        StoreError: such a link exists (the message lists them), ``out`` lies inside the run (or
            any other datavalue run: :func:`datavalue._files.inside_run`) or is the archive itself, ``out`` does not end in ``.zip`` (also a ``ValueError``), or ``path``
            is a remote or in-memory store (copy it to a local directory first); nothing is written.
        StoreExistsError: ``out`` exists and ``overwrite`` is False, or ``out`` is a directory.
        StoreError: a live run changed under every snapshot, or a snapshot failed its check although
            the run did not change; nothing is written.
    """
    path = run_location(path)  # file:// URLs are local paths; '::' refused (datavalue.store._runpath)
    out = run_dir_path(out, "archive_run's OUT (the .zip it writes)", "Write the archive to a local path and copy it.")
    if not isinstance(path, (str, os.PathLike)) or "://" in os.fspath(path):
        raise StoreError(f"{path!r} is a remote or in-memory store; archive_run packs a local run directory (or "
                         "copies a local .zip archive). Copy the run to a local directory first.")
    src, dst = Path(path), Path(out)
    if dst.suffix != ".zip":
        raise _ArchivePathError(f"the archive name must end in .zip (open_run reads a run from a .zip), got "
                                f"{dst.name}; choose e.g. {dst.with_suffix('.zip').name}.")
    if is_local(path) and src.is_dir():
        refuse_links_leaving(src, "an archive would pack files that are not the run's, so none was written",
                             again="archive again")
    Run(path)  # refuse to archive something that is not a readable run
    is_archive = not is_local(path)  # a .zip that open_run has just read as a run
    if is_archive and dst.exists() and os.path.samefile(src, dst):
        raise _ArchivePathError(f"{dst} is the archive {src} itself; choose another path for the copy.")
    if not is_archive and dst.resolve().is_relative_to(src.resolve()):
        raise StoreError(f"{dst} lies inside the run {src}; writing there would change the run. Choose a path outside it.")
    foreign = inside_run_problem(dst, "an archive")  # any datavalue run, not only the one archived
    if foreign is not None:
        raise StoreError(foreign)
    if dst.is_dir():
        raise StoreExistsError(f"{dst} is a directory; give the path of the .zip file to write.")
    if dst.exists() and not overwrite:
        raise StoreExistsError(f"{dst} exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)  # missing directories are created, as by every writer of outputs
    except OSError as exc:  # under a regular file, read-only: say where and why
        raise creation_error(dst, exc, "the archive") from exc
    try:
        _write_archive(src, dst, is_archive)
    except OSError as exc:  # /proc, a read-only file system: the temporary beside dst could not be written
        if isinstance(exc, StoreError) or not is_own_temporary(exc, dst):
            raise
        raise creation_error(dst, exc, "the archive") from exc
    return dst


def _write_archive(src: Path, dst: Path, is_archive: bool) -> None:
    """Write the archive ``dst`` of ``src`` through a temporary beside it (a byte copy of an archive)."""
    if is_archive:  # already one file in the archive format: a faithful copy, never a re-pack
        with atomic_write(dst) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        return
    _pack_directory(src, dst)


#: How many snapshots :func:`_pack_directory` takes of a run that a recorder keeps committing to.
ATTEMPTS = 8


def _pack_directory(src: Path, dst: Path) -> None:
    """Pack a consistent snapshot of the run directory ``src`` into ``dst`` and verify it.

    A recorder in another process may be writing the run (``docs/store-format.md``, "Archives of a
    live run"). Each attempt reads the ``commit`` chunk and the chunk digest record as a pair first,
    then at once each committed array's tail chunk (the only committed chunk a later commit
    rewrites), then lists the run and packs the rest: every chunk the commit covers exists by then,
    and chunks past the commit (uncommitted rows) are left out. Before the archive replaces ``dst``,
    every committed chunk packed is checked against the packed digest record, as ``open_run`` checks
    it (:func:`_verify`, from the bytes packed: no second pass); a tail chunk the recorder rewrote in
    between fails that check, and the attempt is repeated with the newer commit.

    Raises:
        StoreError: the run changed under every one of :data:`ATTEMPTS` snapshots (a recorder
            committing faster than the run can be read), or the packed archive fails the check
            although the run did not change (the message carries the reader's error); ``dst`` is not
            written.
    """
    shapes = _chunk_shapes(src)
    problem: StoreCorruptError | None = None
    snap: _Snapshot | None = None
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(min(0.02 * 2**attempt, 1.0))
        snap = None
        try:
            with atomic_write(dst) as tmp:
                snap = _pack_snapshot(src, tmp, shapes)
                _verify(src, snap)
            return
        except StoreCorruptError as exc:
            problem = exc
            if snap is not None and _read_pair(src) == snap.pair:  # the run did not move: the run itself is the problem
                raise StoreError(
                    f"the archive of {src} failed its check against the run's digest record, although the run did "
                    f"not change while it was packed, so none was written: {exc}"
                ) from exc
    raise StoreError(
        f"{src} changed under each of {ATTEMPTS} snapshots taken to archive it (a recorder is committing to it"
        f"{_writer_note(src)}), so no consistent archive could be taken and none was written (last check: {problem}). "
        "Archive the run after rec.flush() or rec.close(), or with fewer commits per second (commit_every=)."
    ) from problem


def _chunk_shapes(src: Path) -> dict[str, tuple[int, int]]:
    """``{array: (rows per chunk, dimensions)}`` of the run's committed arrays present in ``src``."""
    out = {}
    for name in COMMITTED_ARRAYS:
        try:
            meta = json.loads((src / name / "zarr.json").read_bytes())
            shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
            out[name] = (int(shape[0]), len(shape))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue  # not recorded in this run (a damaged one: Run(path) has refused the run already)
    return out


Pair = tuple[bytes | None, tuple[bytes | None, ...]]


def _read_pair(src: Path) -> Pair:
    """Raw bytes of the ``commit`` chunk and the two digest record files, read as a consistent pair
    (commit first, then the record: a recorder writes them in the other order; again while the
    record is neither the commit's nor the next one's, as :func:`load_pair` does)."""
    get = local_get(src)
    pair: Pair = (None, ())
    for _ in range(4):
        commit = get(COMMIT_CHUNK)
        records = tuple(get(name) for name in CHUNK_DIGEST_FILES)
        pair = (commit, records)
        try:
            record = newest_record(dict(zip(CHUNK_DIGEST_FILES, records, strict=True)).get, src)
        except StoreCorruptError:
            continue
        if record is None or read_commit_bytes(commit) in (record.after, record.before):
            break
    return pair


class _Snapshot:
    """What one attempt packed: the ``(commit, records)`` pair, per committed array its number of
    committed chunks, and the crc32c trailer of every committed chunk packed (``(array, i)``)."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.n_chunks: dict[str, int] = {}
        self.checked: set[str] = set()  # arrays the reader checks against the record (as check_chunk_digests)
        self.trailers: dict[tuple[str, int], int] = {}


def _pack_snapshot(src: Path, tmp: Path, shapes: dict[str, tuple[int, int]]) -> _Snapshot:
    """Pack one snapshot of ``src`` into the zip ``tmp``."""
    snap = _Snapshot(_read_pair(src))
    commit_raw, records = snap.pair
    commit = read_commit_bytes(commit_raw)
    fixed = {COMMIT_CHUNK: commit_raw, **dict(zip(CHUNK_DIGEST_FILES, records, strict=True))}
    steps, rows, fisher_rows, _ = commit or (0, 0, 0, 0)
    for name, (per_chunk, ndim) in shapes.items() if commit is not None else ():  # no commit: nothing is left out
        n = committed_length(name, steps=steps, rows=rows, fisher_rows=fisher_rows)
        snap.n_chunks[name] = -(-n // per_chunk)
        if n > (1 if name.endswith("_ptr") else 0):
            snap.checked.add(name)
        if n > 0:  # the tail chunk, read right after the commit: the next commit rewrites it
            key = f"{name}/c/{snap.n_chunks[name] - 1}" + "/0" * (ndim - 1)
            fixed[key] = local_get(src)(key)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, raw in fixed.items():
            if raw is not None:
                zf.writestr(_entry(key), raw)
                _note_trailer(snap, key, raw)
        for f in sorted(src.rglob("*")):  # listed after the commit was read: every chunk it covers exists
            rel = f.relative_to(src).as_posix()
            if rel in fixed or not f.is_file() or f.name.endswith(".partial") or f.name == "writer.lock":
                continue  # no lock, no temporary in an archive
            parts = rel.split("/")
            if len(parts) >= 3 and parts[0] in snap.n_chunks and parts[1] == "c" and parts[2].isdigit():
                if int(parts[2]) >= snap.n_chunks[parts[0]]:
                    continue  # a chunk past the commit: rows no reader of this snapshot may see
                try:
                    raw = f.read_bytes()
                except FileNotFoundError:
                    continue  # cannot be (committed chunks are never removed): the check names it missing
                zf.writestr(_entry(rel), raw)
                _note_trailer(snap, rel, raw)
                continue
            try:
                zf.write(f, rel)
            except FileNotFoundError:  # removed since the listing (a temporary renamed into place)
                continue
    return snap


def _note_trailer(snap: _Snapshot, key: str, raw: bytes) -> None:
    """Keep the crc32c trailer of the committed chunk ``key`` (``<array>/c/<i>[/0...]``) packed as ``raw``."""
    parts = key.split("/")
    if len(parts) >= 3 and parts[0] in snap.n_chunks and parts[1] == "c" and len(raw) >= 4:
        snap.trailers[(parts[0], int(parts[2]))] = int.from_bytes(raw[-4:], "little")


def _entry(key: str) -> zipfile.ZipInfo:
    """A zip entry for ``key`` as ``ZipFile.write`` would make it for a regular file (mode 0644)."""
    info = zipfile.ZipInfo(key, date_time=time.localtime(time.time())[:6])
    info.external_attr = 0o100644 << 16
    info.compress_type = zipfile.ZIP_STORED
    return info


def _verify(src: Path, snap: _Snapshot) -> None:
    """Check the packed snapshot as ``open_run`` checks an archive's chunks, from what was packed (no
    second pass over the archive): every chunk the packed commit covers is there, and its crc32c
    trailer is one the packed digest record binds to the run for that chunk
    (:class:`~datavalue.store._digest.ChunkDigests`, the reader's rule).

    Raises:
        StoreCorruptError: naming the chunk and what moved.
    """
    commit_raw, records = snap.pair
    missing = [f"{name}/c/{i}" for name, n in snap.n_chunks.items() for i in range(n) if (name, i) not in snap.trailers]
    if missing:
        raise StoreCorruptError(f"{src}: chunk {missing[0]} is covered by the snapshot's commit but was not found when "
                                f"the run was listed ({len(missing)} such chunk(s))")
    record = newest_record(dict(zip(CHUNK_DIGEST_FILES, records, strict=True)).get, src)
    try:
        attrs = json.loads((src / "zarr.json").read_bytes()).get("attributes", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise StoreCorruptError(f"{src}: its zarr.json could not be read again ({exc})") from exc
    run_id = attrs.get(RUN_ID_KEY)
    if record is None or run_id is None or attrs.get(CHUNK_DIGESTS_KEY) is None:
        return  # a run written before chunk digests: nothing binds its chunks (open_run reads it as before)
    digests = ChunkDigests(record, str(run_id), read_commit_bytes(commit_raw), src)
    for (name, i), crc in sorted(snap.trailers.items()):
        if name in snap.checked and not digests.accepts(name, i, crc):
            raise StoreCorruptError(
                f"{src}: chunk {name}/c/{i} changed after the commit the snapshot packs was read (its checksum "
                f"{crc:08x} is not one the packed digest record holds for it)")


def _writer_note(src: Path) -> str:
    """``", pid P holds its writer.lock"`` when a live process holds the run's writer lock, else ``""``."""
    holder = live_holder(src)
    pid = holder.get("pid") if holder else None
    return f", pid {pid} holds its writer.lock" if pid is not None else ""
