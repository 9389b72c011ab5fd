"""Paths where a run (or a run archive) cannot be created: one clear refusal instead of the raw
``FileNotFoundError`` / ``NotADirectoryError`` of ``mkdir`` or of a temporary's ``open``.

The recorder creates its run directory (:class:`~datavalue.store.RunWriter`) and
:func:`~datavalue.store.archive_run` writes its ``.zip`` through a temporary beside it; under a
regular file, in ``/proc``, on a read-only file system or in a directory that does not exist the
operating system refuses, and its message names the internal temporary or says "No such file or
directory" for a path the user meant to create. :func:`creation_error` names the path, the
directory that refused and why.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from datavalue._files import unexpanded_home_problem
from datavalue.errors import StoreError


class RunPathError(StoreError, OSError):
    """A run or archive path that cannot be created (also the ``OSError`` raised before)."""


def _first_existing(path: Path) -> Path:
    anc = path.parent
    while not os.path.lexists(anc) and anc != anc.parent:
        anc = anc.parent
    return anc


def creation_error(path: Path, exc: OSError | None, what: str) -> RunPathError:
    """The refusal for ``what`` (``"the run"``, ``"the archive"``) at ``path``, whose creation the
    system refused with ``exc`` (``None``: refused before trying)."""
    anc = _first_existing(path)
    if os.path.lexists(anc) and not anc.is_dir():
        kind = "a regular file" if anc.is_file() else "not a directory"
        reason = f"{anc} is {kind}, so nothing can be created under it"
    else:
        why = (exc.strerror or str(exc)) if exc is not None else "refused"
        reason = f"the system refused to create it in {anc} ({why})"
    return RunPathError(
        f"cannot create {what} at {path}: {reason}. Choose a path inside a writable local directory; nothing was written."
    )


def is_own_temporary(exc: OSError, path: Path) -> bool:
    """Whether ``exc`` is about ``path`` itself or a writer's temporary beside it
    (``.<name>.<pid>.<token>.partial``, ``datavalue._files.partial_path``)."""
    name = exc.filename
    if not isinstance(name, (str, os.PathLike)):
        return False
    p = Path(name)
    return p == path or (p.parent == path.parent and p.name.startswith(f".{path.name}.") and p.name.endswith(".partial"))


# ------------------------------------------------------------------ parsing a run location
# One reading of a run location for every reader and writer: ``file://`` URLs are the local path
# they name (as zarr and fsspec read them), other URLs stay URLs (read-only, through fsspec), a local
# path is made absolute once (dask workers, and a later ``os.chdir``, must find the same run), and a
# local name holding ``::`` (fsspec's URL chaining, which zarr would apply to it) is refused.
def _file_url_path(s: str) -> str | None:
    """The local path a ``file://`` URL names (``None`` for anything else)."""
    if s[:7].lower() != "file://":
        return None
    rest = s[7:]
    if rest[:10].lower() == "localhost/":
        rest = rest[9:]
    if not rest.startswith("/"):
        raise RunPathError(
            f"{s!r} names a file on host {rest.split('/', 1)[0]!r}; a file:// URL must name a local absolute path "
            "(file:///abs/run.zarr, three slashes). Pass the local path, or mount the other host's directory here."
        )
    return rest


def _refuse_chained(s: str) -> None:
    if "::" in s:
        raise RunPathError(
            f"the run path {s!r} contains '::', which zarr reads as fsspec's URL chaining (e.g. "
            "'simplecache::s3://bucket/run.zarr'), not as part of a file name; choose a name without '::' "
            "(rename the directory if it exists). Nothing was read or written."
        )


def _name_max(path: str) -> int:
    """The longest file name (bytes) the file system holding ``path``'s nearest existing ancestor takes."""
    anc = _first_existing(Path(path)) if not os.path.lexists(path) else Path(path)
    try:
        return int(os.pathconf(anc if anc.is_dir() else anc.parent, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def refuse_unusable_name(path: str, what: str) -> None:
    """Refuse a local path no file system can hold: a NUL byte (was a raw ``ValueError: embedded null byte``
    from the recorder and ``archive_run``, and ``no run at '...\\x00...'`` from readers), or a name longer
    than the file system takes (was a raw ``OSError: [Errno 36] File name too long``) (P9-06).

    Raises:
        RunPathError: naming the problem and what to pass instead.
    """
    if "\x00" in path:
        raise RunPathError(
            f"{what}: the path {path!r} contains a NUL byte ('\\x00'), which no file name can hold (a string built from "
            "C or binary data?). Pass the path without it. Nothing was read or written.")
    parts = [(len(os.fsencode(part)), part) for part in Path(path).parts]
    if max((n for n, _ in parts), default=0) <= 143:  # every file system takes that (eCryptfs' limit): no syscall
        return
    limit = _name_max(path)
    for size, part in parts:
        if size > limit:
            raise RunPathError(
                f"{what}: the name {part[:40]!r}... in {path[:80]!r}... is {size} bytes long; this file system takes at "
                f"most {limit} bytes per name. Choose a shorter name. Nothing was read or written.")


def run_location(location: Any) -> Any:
    """Where a reader finds a run: a local directory or ``.zip`` archive as an absolute path (a
    ``file://`` URL as the local path it names), another URL as given, a zarr Store object as is.

    A directory is read as a run directory whatever its name (also ``run.zip``); a name ending in
    ``.zip`` that is no directory is an archive.

    Raises:
        RunPathError: a local name containing ``::``, or a ``file://`` URL naming another host.
    """
    if isinstance(location, (bytes, bytearray)):
        raise RunPathError(f"a run path must be a str or os.PathLike, got {type(location).__name__} {location!r:.80}; "
                           "decode it first (os.fsdecode(path)).")
    if not isinstance(location, (str, os.PathLike)):
        return location
    s = os.fspath(location)
    if not isinstance(s, str):
        return location
    local = _file_url_path(s)
    if local is None and "://" in s:
        return s  # s3://, gs://, https://, chained URLs: fsspec reads them
    if local is None:
        _refuse_chained(s)
        local = s
    else:
        _refuse_chained(local)
    refuse_unusable_name(local, "reading a run")
    return os.path.abspath(local)


def run_dir_path(path: Any, what: str = "recording", fix: str | None = None) -> Path:
    """Where a writer (``Recorder``, ``JaxRecorder``, ``FinalPass``) creates or resumes a run, or
    ``archive_run`` writes its ``.zip``: an absolute local path. A ``file://`` URL is the local path it
    names; ``what`` and ``fix`` word the refusal of another URL.

    Raises:
        RunPathError: any other URL (recording needs a local directory), a name containing ``::``,
            or a ``file://`` URL naming another host.
    """
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise RunPathError(f"a run path must be a str or os.PathLike naming a local directory, got {type(path).__name__}.")
    s = os.fspath(path)
    local = _file_url_path(s)
    if local is None and "://" in s:
        raise RunPathError(
            f"{what} needs a local path (docs/distributed.md, 'Where runs live'); got the URL {s!r}. "
            + (fix or "Record into a local path (file:///abs/run.zarr is accepted as that path) and copy the finished "
               "run to remote storage; readers open it there read-only.")
        )
    local = s if local is None else local
    _refuse_chained(local)
    refuse_unusable_name(local, what)
    refuse_unexpanded_home(local, what)
    return Path(os.path.abspath(local))


def refuse_unexpanded_home(path: str, what: str) -> None:
    """Refuse to create ``~/...`` (or ``~user/...``) literally: Python does not expand ``~``, so the path
    names a directory called ``~`` in the current directory, not the home directory (P8-37: a run was
    created at ``./~/run.zarr``, where a later ``rm -rf ~`` typed to clean it up would delete the home
    directory). One that exists already (made on purpose) is used as it is. The rule and its words are
    :func:`datavalue._files.unexpanded_home_problem`'s.

    Raises:
        RunPathError: naming the expanded path to pass instead.
    """
    problem = unexpanded_home_problem(path, f"{what}:")
    if problem is not None:
        raise RunPathError(problem)
