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
