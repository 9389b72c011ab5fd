"""Temporary files that never replace a user's file and never outlive a failed write; where a run is.

Every file datavalue replaces atomically is first written to a sibling temporary whose name no user
file has by accident: ``.<name>.<pid>.<random>.partial`` (a dot file, the writer's pid, 8 random hex
digits). On any error the temporary is removed; a ``kill -9`` can still leave one behind, which
:func:`sweep_partials` removes once its writer is gone (runs do this when a writer takes their lock).

:func:`inside_run` says whether a path lies inside a datavalue run: the one rule by which every
writer of user-facing outputs (reports, registries, Parquet results, archives, new ledgers and
utility caches: :func:`inside_run_problem`) refuses to write into a run. :func:`unexpanded_home_problem`
says why a path starting with ``~`` (which Python does not expand) is not used as given (the royalty
ledger, its reports and registries, the CLI's ``--out``; runs have the same rule in ``store._runpath``).

Standard library only: the shapley package uses it too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

#: ``.<name>.<pid>.<tag>.partial``: what :func:`partial_path` and the store's chunk writer leave
#: (the chunk writer's tag is its thread id).
_PARTIAL = re.compile(r"^\..+\.(?P<pid>\d+)\.(?P<tag>[0-9a-zA-Z]+)\.partial$")


def partial_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary sibling of ``path`` (not created)."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` (``os.replace``), on any
    error it is removed and ``path`` is left as it was.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "report.csv"
        >>> with atomic_write(out) as tmp:
        ...     _ = tmp.write_text("owner,amount\\n")
        >>> out.read_text()
        'owner,amount\\n'
    """
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def stale_partial(p: Path) -> bool:
    """Whether ``p`` is a temporary left by a datavalue writer that is no longer running on this
    host (never one of this process's own, never a file with another name)."""
    m = _PARTIAL.match(p.name)
    if m is None:
        return False
    pid = int(m["pid"])
    return pid != os.getpid() and not _pid_alive(pid)


def sweep_partials(root: str | os.PathLike[str]) -> list[Path]:
    """Remove the stale temporaries (:func:`stale_partial`) under the directory ``root``; links are
    neither followed nor removed. Returns what was removed. Call it only while holding the lock
    that makes the caller the directory's one writer."""
    removed = []
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            p = Path(dirpath, name)
            if name.endswith(".partial") and not p.is_symlink() and stale_partial(p):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    if removed:
        logger.info("%s: removed %d temporary file(s) left by a writer that is gone", root, len(removed))
    return removed


#: attribute keys of the zarr groups datavalue writes (the run manifest ``"datavalue"``, its
#: ``"datavalue_run_id"``, ``"datavalue_embeddings"``, ...): their presence marks a datavalue run.
_RUN_ATTR = "datavalue"

#: a run's ``zarr.json`` larger than this is not read (a run's is a few KiB; embeddings add some)
_MAX_ZARR_JSON = 64 << 20


def _is_datavalue_group(directory: Path) -> bool:
    """Whether ``directory`` holds a ``zarr.json`` (a regular file, or a link to one) whose
    ``attributes`` carry a datavalue key (``"datavalue"`` or ``"datavalue_<...>"``)."""
    meta = directory / "zarr.json"
    try:
        st = os.stat(meta)
        if not (st.st_mode & 0o170000 == 0o100000) or st.st_size > _MAX_ZARR_JSON:
            return False
        doc = json.loads(meta.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False  # absent, unreadable or not JSON: not a run this rule can know
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return isinstance(attrs, dict) and any(
        isinstance(k, str) and (k == _RUN_ATTR or k.startswith(_RUN_ATTR + "_")) for k in attrs
    )


def inside_run(path: str | os.PathLike[str]) -> Path | None:
    """The datavalue run that ``path`` lies inside (its outermost one), or ``None``.

    ``path`` is resolved first (symbolic links and ``..``; it need not exist), then every directory
    on the resolved path, ``path`` itself included, is asked whether it holds a ``zarr.json``
    with datavalue attributes (a run's root group, or a group datavalue wrote inside one). Any
    other ``zarr.json`` (another tool's zarr store, a report someone named ``zarr.json``) does not
    make a run. Writing at such a ``path`` would add to, or replace, a run's own files: every
    writer of reports, registries and Parquet results refuses it before anything is written.

    Example:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp()) / "r.zarr"; run.mkdir()
        >>> _ = (run / "zarr.json").write_text('{"zarr_format": 3, "attributes": {"datavalue": {}}}')
        >>> inside_run(run / "zarr.json") == run.resolve(), inside_run(run.parent / "report.csv")
        (True, None)
    """
    real = Path(os.path.realpath(os.fspath(path)))
    found = None
    for parent in (real, *real.parents):
        if _is_datavalue_group(parent):
            found = parent  # keep climbing: name the run, not a group inside it
    return found


def inside_run_problem(path: str | os.PathLike[str], what: str) -> str | None:
    """Why ``what`` (``"a new royalty ledger"``) may not be created at ``path``, or None: ``path``
    lies inside a datavalue run (:func:`inside_run`). A file there is one the run did not write:
    ``Recorder(run, overwrite=True)`` refuses to replace the run while it is there, and a rebuild of
    the member holding it (``embeddings/``, ``final/``) may delete it. Shared by the writers that
    create files of their own (ledgers, utility caches, archives), like :func:`inside_run` for reports.

    Example:
        >>> import tempfile
        >>> inside_run_problem(os.path.join(tempfile.mkdtemp(), "ledger.jsonl"), "a ledger") is None
        True
    """
    run = inside_run(path)
    if run is None:
        return None
    return (
        f"{path} lies inside the datavalue run {run} (resolved: {os.path.realpath(path)}); {what} there would be a "
        "file the run did not write (a later Recorder(run, overwrite=True) refuses the run while it is there, and "
        "rebuilding the run's member that holds it may delete it), so nothing was written. Choose a path outside "
        "the run."
    )


def unshare(path: str | os.PathLike[str]) -> bool:
    """Give the file at ``path`` (links resolved) its own inode when another directory shares it (a
    hard-link snapshot, ``cp -al``; ``st_nlink > 1``): a copy, fsynced, renamed over it, so the
    snapshot keeps its bytes when the file is then written in place. Returns whether it copied."""
    real = Path(os.path.realpath(path))
    if os.stat(real).st_nlink <= 1:
        return False
    with atomic_write(real) as tmp:
        shutil.copyfile(real, tmp)
        shutil.copymode(real, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    return True


def unexpanded_home_problem(path: str | os.PathLike[str], what: str, *, creating: bool = True,
                            cli: bool = False) -> str | None:
    """Why ``path`` may not be used for ``what`` (``"the report"``), or ``None``: it starts with ``~`` (or
    ``~user``), which Python does not expand, so it names a directory called ``~`` in the current
    directory, not the home directory (the rule ``Recorder("~/r.zarr")`` follows, P8-37; issue 22 found
    ledgers and reports still created at ``./~/...``). A path that exists as given, or whose ``~`` directory
    exists (made on purpose), is used as it is. ``creating``: the file would be created (else it is read, and
    the message says that the file is looked for there). ``cli``: the path came from the command line (a quoted
    ``'~/...'``): the fix then says to let the shell expand it.

    Example:
        >>> unexpanded_home_problem("~/no-such-dir-xyz/ledger.jsonl", "the ledger").split(":")[0]
        "the ledger '~/no-such-dir-xyz/ledger.jsonl' starts with '~', which Python does not expand"
    """
    s = os.fspath(path)
    if not isinstance(s, str) or not s.startswith("~") or os.path.lexists(s):
        return None
    head = s.split("/", 1)[0]
    if os.path.lexists(head):  # a directory really called "~" (or "~name") made on purpose
        return None
    expanded = os.path.expanduser(s)
    if creating:
        said = (f"it would create a directory named {head!r} in the current directory ({os.getcwd()}), not write "
                "under the home directory")
        done = "Nothing was written."
    else:
        said = f"it names a file under a directory named {head!r} in the current directory ({os.getcwd()}), which does not exist"
        done = "Nothing was read."
    fix = (f"write it without quotes (the shell expands ~) or as {expanded!r}" if cli
           else f"Pass os.path.expanduser({s!r}) ({expanded!r})")
    return (f"{what} {s!r} starts with '~', which Python does not expand: {said}. {fix[0].upper()}{fix[1:]}, or "
            f"'./{s}' for a directory really named {head!r}. {done}")
