"""``archive_run``: a run directory packed into one ``.zip`` that ``open_run`` reads directly."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from datavalue._files import atomic_write, inside_run_problem
from datavalue.errors import StoreError, StoreExistsError
from datavalue.store._paths import is_local, refuse_links_leaving
from datavalue.store._reader import Run
from datavalue.store._runpath import creation_error, is_own_temporary, run_dir_path, run_location


class _ArchivePathError(StoreError, ValueError):
    """An archive path that :func:`archive_run` cannot write (a ``StoreError`` that is also the
    ``ValueError`` it raised before)."""


def archive_run(path: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Pack a run directory into one uncompressed ``.zip`` that :func:`open_run` reads directly.

    ``path`` may also be a run archive (a ``.zip`` that :func:`open_run` reads): it is copied byte
    for byte, so ``archive_run`` accepts every local run that ``open_run`` does and the result is
    always the same run. Refuses a run with a symbolic link that leads outside it (the archive would
    pack the link's target, files that are not the run's).

    Raises:
        StoreError: such a link exists (the message lists them), ``out`` lies inside the run (or
            any other datavalue run: :func:`datavalue._files.inside_run`) or is the archive itself, ``out`` does not end in ``.zip`` (also a ``ValueError``), or ``path``
            is a remote or in-memory store (copy it to a local directory first); nothing is written.
        StoreExistsError: ``out`` exists and ``overwrite`` is False, or ``out`` is a directory.
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
    with atomic_write(dst) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file() and not f.name.endswith(".partial") and f.name != "writer.lock":  # no lock in an archive
                zf.write(f, f.relative_to(src).as_posix())
