"""Where a report or an owner registry may be written: the checks every writer makes first.

:func:`check_output_path` refuses, before anything is written, a path that

* lies inside a datavalue run (:func:`datavalue._files.inside_run`, the rule every writer of
  reports, registries and Parquet results shares): a report over ``RUN/zarr.json`` would destroy
  the run's manifest, one beside it would add a file the run did not write;
* is a royalty ledger (its first line is a ledger header, whichever name it has), a ledger's head
  file (its JSON says so), or one of the files a ledger keeps beside it (``<ledger>.head``,
  ``.lock``, ``.torn-*``, ``.head.replaced-*``, ...: found by name beside any ledger, and by
  :func:`~datavalue.shapley.royalties._anchor.owned_by` for the ledgers the caller names): a
  report there would replace the hash-chained rows or their anchor;
* is a datavalue run archive (a ``.zip`` whose root ``zarr.json`` carries datavalue attributes, as
  ``archive_run`` packs a run and ``open_run`` reads it; found by its content, whatever its name):
  the archive may be the run's only copy, so ``overwrite`` does not replace it;
* is a directory, or lies under a regular file (nothing can be written there).

Standard library only (with ``datavalue._files`` and the package's own modules), as the whole
shapley package.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

from datavalue._files import atomic_write, inside_run, unexpanded_home_problem
from datavalue.shapley._errors import LedgerError, OutputExistsError, OutputPathError, ShapleyError
from datavalue.shapley.royalties._anchor import HEAD_SCHEMA, LEDGER_SCHEMA, owned_by

__all__ = ["check_output_path", "is_run_archive", "ledger_file_kind"]

#: what follows a ledger's name in the names of the files it keeps beside it (``_anchor.owned_by``)
_SIDECARS = (".head", ".lock", ".torn-")
_READ_LIMIT = 1 << 20  # a header or a head file is a few hundred bytes; never read more than this


def _first_json(path: Path) -> object:
    """The JSON of the first non-blank line of the regular file ``path`` (``None`` when it is not
    a readable file, or that line is not JSON)."""
    try:
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            data = f.read(_READ_LIMIT)
    except OSError:
        return None
    for line in data.splitlines():
        if line.strip():
            try:
                return json.loads(line)
            except (ValueError, RecursionError):
                return None
    return None


#: the datavalue key of a run's root group attributes (``"datavalue"`` or ``"datavalue_<...>"``),
#: the mark by which ``datavalue._files.inside_run`` knows a run directory
_RUN_ATTR = "datavalue"


def is_run_archive(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (links followed) is a regular file holding a datavalue run archive: a zip
    whose root ``zarr.json`` has datavalue attributes (what ``archive_run`` writes and ``open_run``
    reads as a run). Read-only; any other zip, or a file that is no zip, is not one."""
    real = Path(os.path.realpath(path))
    try:
        if not real.is_file() or not zipfile.is_zipfile(real):
            return False
        with zipfile.ZipFile(real) as zf:
            info = zf.getinfo("zarr.json")
            if info.file_size > _READ_LIMIT * 64:  # a run's zarr.json is a few KiB
                return False
            doc = json.loads(zf.read(info))
    except (OSError, KeyError, ValueError, RecursionError, zipfile.BadZipFile, NotImplementedError, RuntimeError):
        return False  # unreadable, no root zarr.json, not JSON, encrypted: not a run open_run reads
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return isinstance(attrs, dict) and any(
        isinstance(k, str) and (k == _RUN_ATTR or k.startswith(_RUN_ATTR + "_")) for k in attrs
    )


def _schema(path: Path) -> object:
    doc = _first_json(path)
    return doc.get("schema") if isinstance(doc, dict) else None


def ledger_file_kind(path: str | os.PathLike[str], ledgers: Iterable[str | os.PathLike[str]] = ()) -> str | None:
    """What ledger file ``path`` is: ``"royalty ledger"``, ``"head file of the ledger L"``,
    ``"lock file of the ledger L"``, ``"file of the ledger L"`` (torn line, replaced head, a
    temporary), or ``None`` when it is none of them. ``path`` need not exist.

    ``ledgers`` are ledger paths the caller knows of (matched through links, ``..`` and hard links
    by :func:`owned_by`); any other ledger is found by its content: ``path`` itself holds a ledger
    header or a head file's JSON, or ``path``'s name is a ledger's name plus a sidecar ending and
    that ledger exists beside it.
    """
    for ledger in ledgers:
        own = owned_by(ledger, path)
        if own == "ledger":
            return "royalty ledger"
        if own is not None:
            return f"{own} of the ledger {ledger}"
    real = Path(os.path.realpath(path))
    schema = _schema(real)
    if schema == LEDGER_SCHEMA:
        return "royalty ledger"
    if schema == HEAD_SCHEMA:
        return "head file of a royalty ledger"
    name = real.name
    for marker in _SIDECARS:
        start = name.find(marker)
        while start > 0:
            base = real.parent / name[:start]
            if _schema(base) == LEDGER_SCHEMA:
                own = owned_by(base, real)
                if own is not None and own != "ledger":
                    return f"{own} of the ledger {base}"
            start = name.find(marker, start + 1)
    return None


def check_output_path(
    path: str | os.PathLike[str],
    *,
    what: str,
    overwrite: bool,
    ledgers: Iterable[str | os.PathLike[str]] = (),
    hint: str = "",
) -> Path:
    """Refuse ``path`` as the place to write ``what`` (``"the report"``), before anything is written.

    Raises:
        OutputPathError: ``path`` lies inside a datavalue run, is a run archive (:func:`is_run_archive`,
            whatever ``overwrite`` says), or lies under a regular file, or starts with ``~`` (not expanded by
            Python: :func:`datavalue._files.unexpanded_home_problem`).
        LedgerError: ``path`` is a royalty ledger or one of a ledger's own files (:func:`ledger_file_kind`).
        OutputExistsError: ``path`` is a directory, or exists and ``overwrite`` is false.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise OutputPathError(f"the path to write {what} to must be a str or os.PathLike; got "
                              f"{type(path).__name__} {path!r}.")
    home = unexpanded_home_problem(path, what)
    if home is not None:  # Python does not expand "~": it would create ./~/... (issue 22)
        raise OutputPathError(home)
    p = Path(path)
    run = inside_run(p)
    if run is not None:
        raise OutputPathError(
            f"{p} lies inside the datavalue run {run} (resolved: {os.path.realpath(p)}); writing {what} there "
            f"would change the run's own files, so nothing was written. Choose a path outside the run{hint}."
        )
    if is_run_archive(p):
        raise OutputPathError(
            f"{p} is a datavalue run archive (a .zip that open_run reads as a run; resolved: "
            f"{os.path.realpath(p)}); writing {what} there would replace the run, perhaps its only copy, so "
            f"nothing was written, whatever overwrite says. Choose another path (e.g. report.html){hint}."
        )
    kind = ledger_file_kind(p, ledgers)
    if kind is not None:
        raise LedgerError(
            f"{p} is {'the ' if ' of the ' in kind else 'a '}{kind} (a ledger keeps <ledger>.head, <ledger>.lock, "
            f"<ledger>.torn-* and <ledger>.head.replaced-* beside it); writing {what} there would replace it, so "
            f"nothing was written. Choose another path (e.g. report.html){hint}."
        )
    if p.is_dir():
        raise OutputExistsError(
            f"{p} is a directory; give the path of a file to write {what} to (a new name inside it, for "
            f"example). Nothing was written."
        )
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(
            f"{p}: {parent} is a file, not a directory, so nothing can be written under it; choose another "
            f"path{hint}. Nothing was written."
        )
    if p.exists() and not overwrite:
        raise OutputExistsError(
            f"{p} already exists; refusing to overwrite it. Pass overwrite=True (--overwrite on the command "
            "line) or choose another path."
        )
    return p


def write_text_output(p: Path, text: str, what: str) -> None:
    """Write ``text`` to the checked output path ``p`` (:func:`check_output_path`) through a temporary
    that replaces it whole; an OS refusal becomes :class:`OutputPathError` saying whether the previous
    file is unchanged."""
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(p) as tmp:  # never a user's "<name>.tmp", never left behind by an error
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        if isinstance(exc, ShapleyError):
            raise
        raise OutputPathError(
            f"cannot write {what} {p}: {exc.strerror or exc}; choose a writable path. "
            f"{'The previous file is unchanged.' if p.exists() else 'Nothing was written.'}"
        ) from exc
