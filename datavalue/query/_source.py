"""Which vectors the test gradients are dotted with: built embeddings or the raw gradients.

========================== ====================================================================
``kind``                   vector of occurrence ``(t, z)``
========================== ====================================================================
``"dvemb"`` (default)      ``embeddings/<curvature>/values``: the data value embedding, i.e. the
                           removal's first-order effect on the final weights
``"grad_dot"``             ``grads``: the raw gradient (gradient similarity; no step size)
``"tracin"``               ``lr[t] * grad_scale[t] * weight * grads`` (TracIn with the final
                           weights as the only checkpoint, the H = 0 embedding)
``"influence"``            ``<run>/final/influence/<curvature>/values``: the final model's
                           influence function ``(C + lambda)^-1 g_z / S`` of every example of the
                           final-weights pass (``datavalue.capture.FinalPass``,
                           ``datavalue.embeddings.build_influence``); its columns are the pass's
                           examples, not the trajectory's occurrences
========================== ====================================================================

Curvature resolution for ``"dvemb"``: an explicit ``curvature=`` must be built; otherwise
``"hessian"`` if built, else ``"fisher"``, else ``"empirical_fisher"``, else the only one present.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from datavalue.embeddings import check_build, refuse_foreign
from datavalue.errors import EmbeddingError, QueryError, StoreNotFoundError
from datavalue.store import Run, open_array

KINDS = ("dvemb", "grad_dot", "tracin", "influence")
INFLUENCE_PREFERENCE = ("fisher", "empirical_fisher", "none")
INFLUENCE_ATTRS = "datavalue_influence"
PREFERENCE = ("hessian", "fisher", "empirical_fisher")
#: Attribute key under which ``build_embeddings`` stores its provenance (``n_rows``, ``complete``, ...).
BUILD_ATTRS = "datavalue_embeddings"


@dataclasses.dataclass(frozen=True)
class Source:
    """The resolved embedding source of an :class:`~datavalue.query.Attributor`.

    Attributes:
        kind: ``"dvemb"``, ``"grad_dot"`` or ``"tracin"``.
        array_name: the Zarr array inside the run (``"grads"`` or ``"embeddings/<c>/values"``).
        curvature: the curvature name for ``"dvemb"``, else None.
        array: the read-only zarr array (may hold spare rows past the run's commit).
        attrs: the array's attributes (build provenance).
        n_steps: steps the vectors cover (the run's steps, or a checkpoint's for ``embeddings_at``).
    """

    kind: str
    array_name: str
    curvature: str | None
    array: Any
    attrs: dict[str, Any]
    n_steps: int = -1


def built_curvatures(run: Run) -> list[str]:
    """Curvature names with an ``embeddings/<name>/values`` array in the run, sorted."""
    return [name for name in run.subgroups("embeddings") if run.has_array(f"embeddings/{name}/values")]


def resolve_source(run: Run, *, curvature: str | None, embeddings: str | None, kind: str | None) -> Source:
    """Validate ``curvature`` / ``embeddings`` / ``kind`` and open the array they name."""
    if kind is not None and kind not in KINDS:
        raise QueryError(f"kind must be one of {KINDS}, got {kind!r}.")
    if kind == "influence":
        return _influence_source(run, curvature=curvature, embeddings=embeddings)
    if embeddings == "grads" or kind in ("grad_dot", "tracin"):
        if kind == "dvemb":
            raise QueryError("embeddings='grads' scores with the raw gradients; kind='dvemb' needs built embeddings. "
                             "Use kind='grad_dot' or kind='tracin', or drop embeddings='grads'.")
        if embeddings not in (None, "grads"):
            raise QueryError(f"kind={kind!r} scores with the recorded gradients; drop embeddings={embeddings!r}.")
        if curvature is not None:
            raise QueryError(f"curvature={curvature!r} selects built embeddings; it has no meaning for kind={kind!r}.")
        arr = open_array(run.path, "grads")
        return Source(kind or "grad_dot", "grads", None, arr, dict(arr.attrs), run.n_steps)
    if embeddings is not None:  # an explicit array path
        if curvature is not None:
            raise QueryError("pass either curvature= or embeddings=<array path>, not both.")
        parts = embeddings.split("/") if isinstance(embeddings, str) else None
        if not parts or any(part in ("", ".", "..") for part in parts) or "\\" in embeddings:
            raise QueryError(f"embeddings must name an array inside the run, as a '/'-separated path without '.', '..' or "
                             f"empty parts (e.g. 'embeddings/fisher/at/100/values' or 'grads'), got {embeddings!r}.")
        try:
            arr = open_array(run.path, embeddings)
        except StoreNotFoundError as exc:
            raise QueryError(f"{run.path} has no array {embeddings!r}; built: {built_curvatures(run)}.") from exc
        attrs = dict(arr.attrs)
        return _checked(run, Source("dvemb", embeddings, attrs.get("curvature"), arr, attrs))
    built = built_curvatures(run)
    if curvature is None:
        if not built:
            raise QueryError(
                f"{run.path} has no embeddings yet. Build them first with datavalue.build_embeddings({str(run.path)!r}) "
                "(or query the raw gradients with Attributor(..., kind='tracin'))."
            )
        preferred = [c for c in PREFERENCE if c in built]
        if preferred:
            curvature = preferred[0]
        elif len(built) == 1:
            curvature = built[0]
        else:
            raise QueryError(f"{run.path} has several embedding builds {built}; choose one with curvature=.")
    elif curvature not in built:
        raise QueryError(
            f"{run.path} has no {curvature!r} embeddings (built: {built or 'none'}). Run "
            f"datavalue.build_embeddings({str(run.path)!r}, curvature={curvature!r}) first."
        )
    name = f"embeddings/{curvature}/values"
    arr = open_array(run.path, name)
    return _checked(run, Source("dvemb", name, curvature, arr, dict(arr.attrs)))


def _checked(run: Run, src: Source) -> Source:
    arr = src.array
    meta = dict(src.attrs.get(BUILD_ATTRS, {}))
    if arr.ndim != 2 or arr.shape[1] != run.proj_dim:
        raise QueryError(
            f"{src.array_name} has shape {arr.shape}; the run's gradients have {run.proj_dim} columns. "
            "Rebuild the embeddings with overwrite=True."
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise QueryError(f"{src.array_name} has dtype {arr.dtype}; embeddings must be floating point.")
    curvature = src.curvature or meta.get("curvature")
    rebuild = f"datavalue.build_embeddings({str(run.path)!r}, curvature={curvature!r}, overwrite=True)"
    try:  # copied in from another run (another run id), before any other check reads it
        refuse_foreign(run, src.array_name, rebuild, meta)
    except EmbeddingError as exc:
        raise QueryError(str(exc)) from exc
    if meta.get("complete") is False:
        raise QueryError(f"{src.array_name} is an unfinished build (interrupted or still running). Rebuild: {rebuild}.")
    if "checkpoint_step" in meta:  # embeddings_at(): w.r.t. an intermediate checkpoint, rows of the steps before it
        n_steps = int(meta["checkpoint_step"])
        if not 0 <= n_steps <= run.n_steps or arr.shape[0] != int(run.step_ptr[n_steps]):
            raise QueryError(f"{src.array_name} (checkpoint step {n_steps}) does not match the run's rows; recompute it.")
        run.require_chunks(src.array_name, arr.shape[0])  # a deleted chunk would read as zeros
        return dataclasses.replace(src, curvature=curvature, n_steps=n_steps)
    built_rows = meta.get("n_rows")
    if arr.shape[0] < run.n_rows or (built_rows is not None and int(built_rows) != run.n_rows):
        rows = built_rows if built_rows is not None else arr.shape[0]
        if int(rows) > run.n_rows:  # the commit went back (an older copy restored): not "recorded further"
            raise QueryError(
                f"{src.array_name} covers {rows} occurrences but the run's commit now holds only {run.n_rows}: the "
                f"run went back after the build (its commit restored from an older copy?), so the embeddings describe "
                f"steps the run no longer has. Restore the run's newer state, or rebuild with {rebuild}.")
        raise QueryError(
            f"{src.array_name} covers {rows} occurrences but the run now has {run.n_rows} (training was recorded "
            f"further after the build). Rebuild with {rebuild}, or extend it with datavalue.embeddings.extend_embeddings."
        )
    try:  # provenance (built from this run's steps, not copied in) and every chunk present
        check_build(run, curvature, array=src.array_name)
    except EmbeddingError as exc:
        raise QueryError(str(exc)) from exc
    return dataclasses.replace(src, curvature=curvature, n_steps=run.n_steps)


def _influence_source(run: Run, *, curvature: str | None, embeddings: str | None) -> Source:
    """``run`` is the final-weights pass (``<run>/final``); its ``influence/<curvature>/values``."""
    if embeddings is not None:
        raise QueryError("kind='influence' scores with the preconditioned final-pass rows; drop embeddings=.")
    built = [c for c in run.subgroups("influence") if run.has_array(f"influence/{c}/values")]
    hint = f"datavalue.embeddings.build_influence({str(run.path.parent)!r})"
    if curvature is None:
        preferred = [c for c in INFLUENCE_PREFERENCE if c in built]
        if not preferred:
            raise QueryError(f"{run.path} has no influence build yet: run {hint} first.")
        curvature = preferred[0]
    elif curvature not in built:
        raise QueryError(f"{run.path} has no {curvature!r} influence build (built: {built or 'none'}); run "
                         f"datavalue.embeddings.build_influence({str(run.path.parent)!r}, curvature={curvature!r}).")
    name = f"influence/{curvature}/values"
    arr = open_array(run.path, name)
    foreign = run.foreign_derived(name, fix=f"Rebuild with {hint[:-1]}, curvature={curvature!r}, overwrite=True).")
    if foreign is not None:
        raise QueryError(foreign)
    attrs = dict(arr.attrs)
    meta = dict(attrs.get(INFLUENCE_ATTRS, {}))
    if meta.get("complete") is not True or int(meta.get("n_rows", -1)) != run.n_rows or arr.shape != (run.n_rows, run.proj_dim):
        raise QueryError(f"{run.path}/{name} is unfinished or stale (built over {meta.get('n_rows')} examples, the pass "
                         f"has {run.n_rows}); rebuild with {hint[:-1]}, curvature={curvature!r}, overwrite=True).")
    run.require_chunks(name, arr.shape[0])
    return Source("influence", name, curvature, arr, attrs, run.n_steps)
