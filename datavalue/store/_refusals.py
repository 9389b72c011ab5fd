"""What ``overwrite=True`` may delete from a run, and the refusals that protect the rest.

A run directory holds only what datavalue writes (its members, the writer's lock, the temporaries
of its writers). Anything else, a user's notes, a symbolic link, a foreign zarr store, is
*foreign*: :func:`refuse_unless_run` and :func:`refuse_foreign_below` refuse to delete it, naming
it, before a writer replaces a run or one of its members. Split out of ``store/_writer.py``
(issue 20, house rule on module size); ``_writer`` re-exports every name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from datavalue.errors import StoreExistsError
from datavalue.store._runlock import LOCK_FILE
from datavalue.store._schema import CHUNK_DIGEST_FILES, FINAL_RUN, MANIFEST_KEY, RUN_MEMBERS

#: a temporary of a datavalue writer (``datavalue._files``): ``.<name>.<pid>.<tag>.partial``
_PARTIAL_NAME = re.compile(r"^\..+\.\d+\.[0-9a-zA-Z]+\.partial$")
#: a chunk key part (zarr's default chunk key encoding, separator "/")
_DIGITS = re.compile(r"[0-9]+")


def _is_run(path: Path) -> bool:
    """Whether ``path`` is a directory holding a datavalue run: a zarr v3 group whose root
    attributes carry the run manifest (``MANIFEST_KEY`` with a ``schema_version``).

    Any zarr v3 store has a ``zarr.json``; only the manifest says the store is ours to replace.
    """
    return _what_is(path) == "run"


def _what_is(path: Path) -> str:
    """``"run"`` or a short description of what lies at ``path``, for refusals."""
    if path.is_symlink():
        return f"a symbolic link to {os.path.realpath(path)}"
    if not path.is_dir():
        return "a regular file" if path.is_file() else "something that is not a directory"
    meta = path / "zarr.json"
    if not meta.is_file():
        n = sum(1 for _ in path.iterdir())
        return f"a directory with {n} entr{'y' if n == 1 else 'ies'} and no zarr.json"
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "a directory whose zarr.json is not readable JSON"
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        return "a zarr store that is not a zarr v3 group"
    manifest = (doc.get("attributes") or {}).get(MANIFEST_KEY)
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        return f"a zarr v3 store without a datavalue run manifest (no '{MANIFEST_KEY}' attribute with a schema_version)"
    return "run"


def refuse_unless_run(path: Path) -> None:
    """Raise :class:`StoreExistsError` unless ``path`` holds a datavalue run and nothing else (the
    only thing ``overwrite=True`` may delete); the message says what was found and what to do."""
    found = _what_is(path)
    if found != "run":
        raise StoreExistsError(
            f"{path} exists and is {found}, not a datavalue run; overwrite=True replaces only a datavalue "
            "run, so nothing was deleted. Choose another path, or move or remove it yourself."
        )
    foreign = foreign_entries(path)
    if foreign:
        raise StoreExistsError(
            f"{path} is a datavalue run that also holds {_entries(foreign)} "
            f"datavalue did not write: {_shown(foreign)}. overwrite=True removes only what datavalue wrote, so nothing was "
            "deleted: move those entries out of the run directory (or record to another path), then retry."
        )


def foreign_entries(path: Path) -> list[str]:
    """What ``overwrite=True`` would delete from the run directory ``path`` that datavalue did not
    write, sorted: a top-level entry by its name; inside the run's members (``grads/``,
    ``embeddings/``, ``final/``, ...) by its path relative to ``path`` (``'final/NOTES.txt'``).

    The walk is recursive, against the names datavalue writes: at the top, ``RUN_MEMBERS``, the
    writer's lock and the temporaries of its writers; below, zarr nodes (``zarr.json``, the chunk
    tree ``c/<digits>/...`` of a node, subgroups), the chunk digest record
    (``commit/digests.0`` and ``.1``) and writers' temporaries; ``final/`` is a child run, walked by
    the same rule. A symbolic link, another file or a non-empty directory of other files is foreign;
    an empty directory (a node a killed writer had just made) holds nothing and is not.
    """
    out = []
    for entry in os.scandir(path):
        name = entry.name
        if name == LOCK_FILE or (name.startswith(LOCK_FILE + ".") and name.endswith(".partial")):
            continue
        if _PARTIAL_NAME.match(name) and entry.is_file(follow_symlinks=False):
            continue  # a writer's temporary, ``.<name>.<pid>.<tag>.partial`` (``datavalue._files``)
        if name == "zarr.json" and entry.is_file(follow_symlinks=False):
            continue
        if name in RUN_MEMBERS and name != "zarr.json" and entry.is_dir(follow_symlinks=False):
            if name == FINAL_RUN:  # a child run: the same rule one level down
                out.extend(f"{name}/{p}" for p in foreign_entries(Path(entry.path)))
            else:
                out.extend(_foreign_below(Path(entry.path), name))
            continue
        out.append(name)
    return sorted(out)


def foreign_below(run: Path, name: str) -> list[str]:
    """What deleting the member ``name`` of the run directory ``run`` (e.g.
    ``'embeddings/empirical_fisher'``) would delete that datavalue did not write, as paths relative
    to ``run``, sorted (the rule of :func:`foreign_entries`); ``[]`` when nothing is there."""
    target = run.joinpath(*name.split("/"))
    if target.is_symlink():
        return [name]
    if not target.is_dir():
        return []
    return sorted(_foreign_below(target, name))


def _foreign_below(directory: Path, rel: str) -> list[str]:
    """Entries under ``directory`` (at ``rel`` in its run) that datavalue does not write."""
    entries = list(os.scandir(directory))
    node = any(e.name == "zarr.json" and e.is_file(follow_symlinks=False) for e in entries)
    out: list[str] = []
    for e in entries:
        r = f"{rel}/{e.name}"
        if e.is_symlink():
            out.append(r)
        elif e.is_file():
            if not (e.name == "zarr.json" or _PARTIAL_NAME.match(e.name) or r in CHUNK_DIGEST_FILES):
                out.append(r)
        elif not e.is_dir():
            out.append(r)  # a fifo, socket, device
        elif e.name == "c" and node:
            out.extend(_foreign_chunks(Path(e.path), r))
        else:
            out.extend(_foreign_below(Path(e.path), r))
    return out


def _foreign_chunks(directory: Path, rel: str) -> list[str]:
    """Entries of a node's chunk tree ``c/`` that are not chunk files (``c/<digits>/.../<digits>``)."""
    out: list[str] = []
    for e in os.scandir(directory):
        r = f"{rel}/{e.name}"
        if e.is_symlink():
            out.append(r)
        elif e.is_file():
            if not (_DIGITS.fullmatch(e.name) or _PARTIAL_NAME.match(e.name)):
                out.append(r)
        elif e.is_dir() and _DIGITS.fullmatch(e.name):
            out.extend(_foreign_chunks(Path(e.path), r))
        elif e.is_dir():
            out.extend(_foreign_below(Path(e.path), r))
        else:
            out.append(r)
    return out


def refuse_foreign_below(path: Any, name: str) -> None:
    """Raise :class:`StoreExistsError` when the member ``name`` of the run at ``path`` (e.g.
    ``'embeddings/empirical_fisher'``, which an ``overwrite=True`` build is about to delete) holds
    anything datavalue does not write (:func:`foreign_below`). A store that is not a local directory
    (no ``root``) is not walked."""
    root = path if isinstance(path, (str, os.PathLike)) else getattr(path, "root", None)
    if root is None:
        return
    foreign = foreign_below(Path(root), name)
    if foreign:
        raise StoreExistsError(
            f"{Path(root) / name} holds {_entries(foreign)} datavalue did not write: {_shown(foreign)} (in {root}). "
            "overwrite=True replaces only what datavalue wrote, so nothing was deleted: move those entries out of the "
            "run directory, then retry."
        )


def _entries(names: list[str]) -> str:
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}"


def _shown(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
