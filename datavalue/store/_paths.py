"""Where a run's files really lie: a run is a directory tree, and nothing datavalue does follows a
link out of it (deletes, writes, reads, archives), nor writes a report inside it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from datavalue._files import inside_run
from datavalue.errors import StoreError
from datavalue.store._runpath import run_location


def is_local(location: Any) -> bool:
    """Whether a run location is a plain local directory (writable, crash-safe): no URL, and no name
    ending in ``.zip`` unless a directory of that name exists (a run recorded as ``run.zip``)."""
    if not isinstance(location, (str, os.PathLike)):
        return False
    s = os.fspath(location)
    if "://" in s:
        return False
    return not s.endswith(".zip") or os.path.isdir(s)  # a directory is a run directory whatever its name


# ------------------------------------------------------------------ staying inside the run
# A run is a directory tree; a symbolic link inside it (say ``embeddings -> /data/elsewhere``)
# would let ``overwrite=True`` delete, and a build write, outside the run, and an archive pack
# files that are not the run's. Every delete, create, writable open and archive resolves its path first and
# refuses one that leads out of the run. Links that stay inside the run are allowed.
def _outside(root: Path, target: Path) -> str | None:
    """Where ``target`` really lies when that is outside ``root`` (symlinks and ``..`` resolved), else None."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(target)
    return None if os.path.commonpath([real_root, real]) == real_root else real


def check_inside_run(path: str | os.PathLike[str], name: str) -> None:
    """Raise :class:`StoreError` when the run member ``name`` (e.g. ``embeddings/fisher``) resolves
    outside the run directory ``path``, through a symbolic link or ``..``; archives, URLs and
    store objects have no links to follow and pass (a ``file://`` URL is the local path it names)."""
    path = run_location(path)
    if not is_local(path):
        return
    where = _outside(Path(path), Path(path) / name)
    if where is not None:
        raise StoreError(
            f"{Path(path) / name} leads outside the run {path} (to {where}, through a symbolic link or '..'); "
            "datavalue never deletes or writes outside a run, so nothing was changed. Replace the link with "
            "the real directory (or remove it) and run again."
        )


def links_leaving(root: Path) -> list[tuple[Path, str]]:
    """Every symbolic link under ``root`` that resolves outside it: ``(link, real target)``. The walk
    does not follow links, so a link to a directory outside is reported, never entered. It lists
    directories with ``os.scandir`` and asks no file for its status (a link is known from its
    directory entry), so a run of many thousand chunks is walked in milliseconds."""
    real_root = os.path.realpath(root)
    found: list[tuple[Path, str]] = []
    todo = [os.fspath(root)]
    while todo:
        try:
            with os.scandir(todo.pop()) as it:
                entries = list(it)
        except OSError:
            continue  # unreadable or vanished: the read of what it holds says so
        for entry in entries:
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                if os.path.commonpath([real_root, real]) != real_root:
                    found.append((Path(entry.path), real))
            elif entry.is_dir(follow_symlinks=False):
                todo.append(entry.path)
    return sorted(found)


def refuse_reading_links(root: Path) -> None:
    """Raise :class:`StoreError` when a symbolic link anywhere under the run ``root`` leads outside
    it: whatever is read through it (``grads -> /runs/other.zarr/grads``) is not this run's data,
    and results built from it would silently be another run's. Called by :func:`open_run` on every
    local run (:func:`links_leaving`: one directory listing per folder, no file opened)."""
    leaving = links_leaving(Path(root))
    if leaving:
        shown = "; ".join(f"{p.relative_to(root)} -> {where}" for p, where in leaving[:5])
        more = f" and {len(leaving) - 5} more" if len(leaving) > 5 else ""
        first = leaving[0][0].relative_to(root)
        raise StoreError(
            f"{root}: {first} leads outside the run (symbolic links that lead outside the run: {shown}{more}); data "
            "read through them would be another run's (or anyone's), not what this run recorded, so the run is not "
            "opened. Replace each link with the run's own files (or remove it), then open the run again."
        )


def refuse_inside_run(out: str | os.PathLike[str], what: str = "a report") -> None:
    """Raise :class:`StoreError` when writing ``out`` would change a run: ``out`` lies inside a
    datavalue run, links and ``..`` resolved (:func:`datavalue._files.inside_run`, the one rule the
    shapley report and registry writers use too). Every API writer of reports
    (``Attributor.save_parquet``, ``TopK.to_parquet``, ``ReplayResult.save_parquet``) and the CLI's
    ``--out`` use this check, before anything is written."""
    if not isinstance(out, (str, os.PathLike)) or not is_local(out):
        return
    store = inside_run(out)
    if store is not None:
        raise StoreError(
            f"{out} lies inside the run {store} (resolved: {os.path.realpath(out)}); writing {what} there would "
            "change the run's own files, so nothing was written. Choose a path outside the run."
        )


def refuse_links_leaving(root: Path, why: str, *, again: str = "run again") -> None:
    """Raise :class:`StoreError` when any symbolic link anywhere under the run ``root`` leads
    outside it (the whole tree is walked, links are not followed); ``why`` says what following
    them would do. Used before an archive packs and before ``resume=True`` writes."""
    leaving = links_leaving(Path(root))
    if leaving:
        src = Path(root)
        shown = "; ".join(f"{p.relative_to(src)} -> {where}" for p, where in leaving[:5])
        more = f" and {len(leaving) - 5} more" if len(leaving) > 5 else ""
        raise StoreError(
            f"{src} holds symbolic links that lead outside the run ({shown}{more}); {why}. Replace each link "
            f"with the real files (or remove it) and {again}."
        )


# ------------------------------------------------------------------ dask workers see the same run
def _worker_sees(path: str, archive: bool) -> tuple[str, str | None]:
    """On a dask worker: ``("ok", run id)`` when ``path`` holds a run (an archive that exists:
    ``("archive", None)``), else ``("missing", why)``. Reads one small JSON file; imports nothing heavy."""
    import json

    from datavalue.store._schema import RUN_ID_KEY

    try:
        if archive:
            return ("archive", None) if os.path.isfile(path) else ("missing", "no such file")
        with open(os.path.join(path, "zarr.json"), "rb") as f:
            attrs = json.load(f).get("attributes", {})
    except (OSError, ValueError) as exc:
        return ("missing", getattr(exc, "strerror", None) or str(exc))
    rid = attrs.get(RUN_ID_KEY) if isinstance(attrs, dict) else None
    return ("ok", rid if isinstance(rid, str) else None)


def check_workers_see_run(client: Any, location: Any, run_id: str | None, what: str = "the tasks") -> None:
    """Refuse to send tasks to a ``dask.distributed`` ``client`` whose workers do not see the run at
    ``location`` (an absolute local path: :func:`~datavalue.store._runpath.run_location`), or see
    another run there (another run id). Asks every worker once (``client.run``: one small file read
    each); a local scheduler, a URL or a Store object pass unchecked.

    Raises:
        StoreNotFoundError: a worker cannot read the run at that path.
        StoreMismatchError: a worker reads another run (another run id) at that path.
    """
    from datavalue.errors import StoreMismatchError, StoreNotFoundError

    if client is None or isinstance(client, str) or not (hasattr(client, "run") and hasattr(client, "scheduler")):
        return
    if not isinstance(location, (str, os.PathLike)) or "://" in os.fspath(location):
        return
    path = os.fspath(location)
    seen = client.run(_worker_sees, path, not is_local(path))
    for worker, (state, detail) in sorted(seen.items()):
        if state == "missing":
            raise StoreNotFoundError(
                f"dask worker {worker} cannot read the run at {path} ({detail}); {what} read the run on the workers, so "
                "every worker needs it at the same absolute path: a filesystem shared with this client (NFS, Lustre) "
                "mounted at the same place (docs/distributed.md, 'Where runs live'). Nothing was computed."
            )
        if state == "ok" and run_id is not None and detail != run_id:  # an archive: its id is inside the zip
            raise StoreMismatchError(
                f"dask worker {worker} reads another run at {path} (run id {detail!r}; the client opened {run_id!r}): "
                "the workers' filesystem holds a different run at that path, and its results would be that run's. "
                "Give every worker the same run at the same absolute path (a shared filesystem, docs/distributed.md). "
                "Nothing was computed."
            )
