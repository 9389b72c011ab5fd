"""Does a stored embedding build belong to the run it sits in?

A build records the run it was made from: ``n_steps``, ``n_rows`` and ``run_digest`` (a sha256 of
the steps' bookkeeping: ``step_ptr``, ``lr``, ``grad_scale``, ``weight_decay``, momentum, and the
Fisher pointers / param-group hyperparameters where the build used them; ``_plan._digest``). An
``embeddings/`` folder copied from another run, or a run re-recorded under a build, has values that
describe other training; :func:`check_build` refuses it, and checks that every chunk of the
values the build covers is present (a deleted chunk would read as zeros).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from datavalue.embeddings._metadata import (
    ATTRS_KEY,
    _base,
    _replay_optimizer,
    _stored_blocks,
    _stored_fisher_window,
    rebuild_call,
)
from datavalue.embeddings._plan import _digest, _make_plan
from datavalue.errors import EmbeddingError, StoreCorruptError, StoreError

logger = logging.getLogger(__name__)

__all__ = ["check_build", "refuse_final_pass", "refuse_foreign", "require_build_chunks", "require_intact_rows"]


def refuse_final_pass(run: Any, what: str) -> None:
    """Refuse trajectory work (``what``: ``"build_embeddings"``, ...) on a final-weights pass
    (``<run>/final``, :class:`datavalue.capture.FinalPass`): it records no training steps (every
    ``lr`` is 0), so trajectory embeddings built from it would be meaningless (all zero).

    Raises:
        EmbeddingError: pointing to :func:`~datavalue.embeddings.build_influence` and
            ``Attributor(run, model, kind="influence")``.
    """
    if getattr(run, "is_final_pass", False):
        parent = run.path.parent if hasattr(run.path, "parent") else "<run>"
        raise EmbeddingError(
            f"{run.path} is a final-weights pass (datavalue.capture.FinalPass), not a training trajectory: it records "
            f"no optimizer steps, so {what} has nothing to replay. Build the final model's influence instead: "
            f"datavalue.embeddings.build_influence({str(parent)!r}), then query it with "
            f"Attributor({str(parent)!r}, model, kind='influence'); trajectory embeddings are built on the training "
            f"run itself (build_embeddings({str(parent)!r}))."
        )


def refuse_foreign(run: Any, array: str, rebuild: str, meta: dict[str, Any] | None = None) -> None:
    """Refuse a build copied in from another run: ``array`` (and, for a full build, the velocity
    and transfer operators beside it) carries another run id than ``run``
    (:meth:`datavalue.store.Run.foreign_derived`).

    Raises:
        EmbeddingError: naming the array, both ids and ``rebuild``.
    """
    fix = f"Rebuild with {rebuild}."
    if meta is not None and "checkpoint_step" in meta:  # embeddings_at(): recompute it
        fix = (f"Recompute it with datavalue.embeddings.embeddings_at({str(run.path)!r}, {int(meta['checkpoint_step'])}, "
               f"curvature={meta.get('curvature')!r}, overwrite=True).")
    names = [array]
    if array.endswith("/values") and "/at/" not in array:
        base = array.removesuffix("/values")
        names += [f"{base}/v_values"] + [f"{base}/ops/{b}" for b in run.array_names(f"{base}/ops")]
    for name in names:
        problem = run.foreign_derived(name, fix=fix)
        if problem is not None:
            raise EmbeddingError(problem)


def check_build(run: Any, curvature: str | None = None, *, array: str | None = None) -> dict[str, Any]:
    """Check that a stored build was made from ``run`` as it is now, and that its chunks are present.

    Args:
        run: the run: its path, or an open run (:func:`datavalue.store.open_run`), as
            :func:`~datavalue.embeddings.build_embeddings` takes it.
        curvature: which build (``embeddings/<curvature>/values``); default: the run's only build; or
        array: the values array's path inside the run (e.g. an explicit ``embeddings=`` of a query).

    Returns:
        The build's attributes (its provenance).

    Raises:
        EmbeddingError: the build's ``n_steps`` / ``n_rows`` / ``run_digest`` do not match the run
            (copied from another run, or the run was re-recorded or resumed after the build); no
            ``curvature=`` and the run holds no build or several (the message names them); the run
            has no build ``curvature``.
        StoreCorruptError: a chunk of the values inside the rows the build covers is missing.

    Example:
        >>> check_build("runs/x.zarr", "fisher")["n_rows"]  # doctest: +SKIP
        1200
    """
    run, array = _resolve(run, curvature, array, "check_build")
    meta = dict(run.array(array).attrs.get(ATTRS_KEY, {}))
    curvature = curvature or meta.get("curvature")
    rebuild = rebuild_call(run.path, curvature, meta, prefix="datavalue.")
    refuse_foreign(run, array, rebuild, meta)
    if "checkpoint_step" in meta:  # embeddings_at(): rows of the steps before the checkpoint
        _require_chunks(run, array, meta)
        return meta
    if "run_digest" not in meta or "n_steps" not in meta or "n_rows" not in meta:
        logger.info("%s/%s has no run digest (an older build); its provenance is not checked", run.path, array)
        _require_chunks(run, array, meta)
        return meta
    T, R = int(meta["n_steps"]), int(meta["n_rows"])
    if (T, R) != (int(run.n_steps), int(run.n_rows)):
        raise EmbeddingError(
            f"{run.path}/{array} was built from {T} steps ({R} occurrences), but the run has {run.n_steps} steps "
            f"({run.n_rows} occurrences): it describes other training (copied from another run, or the run was "
            f"re-recorded or extended since). Rebuild with {rebuild}, or extend it with "
            "datavalue.embeddings.extend_embeddings when the run only grew."
        )
    window = _stored_fisher_window(meta, f"{run.path}/{array}")  # the plan the build was made with, not W = 0
    try:
        with warnings.catch_warnings():  # the sgd-proxy warning was given when the build was made
            warnings.simplefilter("ignore")
            plan, _ = _make_plan(run, str(meta.get("curvature", curvature)), "float64", None, 0.0,
                                 optimizer=meta.get("optimizer") if meta.get("optimizer") in ("adam", "adamw")
                                 else _replay_optimizer(meta), blocks=_stored_blocks(meta), fisher_window=window)
    except (EmbeddingError, StoreError) as exc:
        raise EmbeddingError(
            f"{run.path}/{array} cannot have been built from this run ({exc}); it was copied from another run or "
            f"the run was re-recorded. Rebuild with {rebuild}."
        ) from exc
    if _digest(plan, T) != meta["run_digest"]:
        raise EmbeddingError(
            f"{run.path}/{array}: its run_digest does not match the run's steps (step pointers, learning rates, "
            "clipping, weight decay or momentum differ): the build was made from another run (copied in) or from "
            f"a recording since overwritten. Rebuild with {rebuild}."
        )
    _require_chunks(run, array, meta)
    return meta


def require_build_chunks(run: Any, curvature: str | None = None, *, array: str | None = None) -> None:
    """:func:`check_build`'s presence check alone (a listing and a ``stat`` per chunk; no provenance): every
    chunk of the build's values inside the rows it covers exists and holds one whole chunk (checksums are
    checked when the rows are read). ``datavalue info`` runs it on each finished build.

    Args:
        run, curvature, array: as in :func:`check_build`.

    Raises:
        StoreCorruptError: a chunk is missing (the message names it and the rows it holds), or its file
            is not one chunk's size (truncated, or the metadata's ``chunk_shape`` edited).
        EmbeddingError: as in :func:`check_build`, when the build cannot be named.

    Example:
        >>> require_build_chunks("runs/x.zarr", "fisher")  # doctest: +SKIP
    """
    run, array = _resolve(run, curvature, array, "require_build_chunks")
    _require_chunks(run, array, dict(run.array(array).attrs.get(ATTRS_KEY, {})))


def _require_chunks(run: Any, array: str, meta: dict[str, Any]) -> None:
    """The presence check of the values ``array`` of the build ``meta`` (see :func:`require_build_chunks`)."""
    if "checkpoint_step" in meta:  # embeddings_at(): rows of the steps before the checkpoint
        T = int(meta["checkpoint_step"])
        if 0 <= T <= run.n_steps:
            run.require_chunks(array, int(run.step_ptr[T]))
        return
    if "n_rows" in meta:
        n = int(meta["n_rows"])
    else:  # an older build: the run's rows it holds
        n = min(int(run.n_rows), int(run.array(array).shape[0]))
    run.require_chunks(array, n)
    _require_chunk_sizes(run, array, n)


def _require_chunk_sizes(run: Any, array: str, n: int) -> None:
    """Every chunk file of ``array`` covering rows ``0:n`` holds one whole chunk (a ``stat`` each, no read):
    a truncated file, or metadata edited to another ``chunk_shape``, is refused as every query refuses it
    (P8-06: ``datavalue info`` said such a build was complete). Arrays outside the plain local layout are
    checked as they are read."""
    from datavalue.store import ChunkFileRows, fast_rows

    rows = fast_rows(run.array(array), required_rows=n)
    if isinstance(rows, ChunkFileRows):
        rows.check_sizes(n)


def _resolve(run: Any, curvature: str | None, array: str | None, what: str) -> tuple[Any, str]:
    """``(open run, values array)`` of :func:`check_build`'s arguments: ``run`` a path or a ``Run``; the
    build ``curvature``, else ``array``, else the run's only build."""
    from datavalue.store import Run, open_run

    run = run if isinstance(run, Run) else open_run(run)
    if array is not None:
        return run, array
    builds = tuple(c for c in run.subgroups("embeddings") if run.has_array(f"{_base(c)}/values"))
    held = f"it holds {', '.join(map(repr, builds))}" if builds else "it holds none"
    if curvature is not None:
        if curvature not in builds:
            raise EmbeddingError(f"{what}: {run.path} has no build {curvature!r} ({held}). Build it with "
                                 f"datavalue.build_embeddings({str(run.path)!r}, curvature={curvature!r}).")
        return run, f"{_base(curvature)}/values"
    if len(builds) == 1:
        return run, f"{_base(builds[0])}/values"
    if not builds:
        raise EmbeddingError(f"{what}: {run.path} holds no embedding build: build one with "
                             f"datavalue.build_embeddings({str(run.path)!r}), or pass array= (the values array's path).")
    raise EmbeddingError(f"{what}: {run.path} holds {len(builds)} builds ({', '.join(map(repr, builds))}): pass "
                         f"curvature= to say which (e.g. {what}({str(run.path)!r}, curvature={builds[0]!r})).")


def require_intact_rows(run: Any, name: str, n: int, what: str, fix: str) -> None:
    """Presence and integrity of rows ``0:n`` of the run's array ``name``, before ``what`` reads and
    rewrites them in place (:func:`~datavalue.embeddings.extend_embeddings` maps every old row of a
    build): every chunk is there and its crc32c matches. One read of the rows, a chunk at a time.

    Raises:
        StoreCorruptError: naming the chunk, that nothing was written, and ``fix``.
    """
    from datavalue.store import fast_rows

    try:
        run.require_chunks(name, n)
        arr = run.array(name)
        rows = fast_rows(arr, required_rows=n)  # the chunk files, checksums verified; else zarr's reader
        C = int(arr.chunks[0])
        for i, c0 in enumerate(range(0, n, C)):
            try:
                rows[c0 : min(n, c0 + C)]
            except ValueError as exc:  # zarr's checksum mismatch (the fallback reader)
                raise StoreCorruptError(f"{run.path}: chunk {name}/c/{i}/0 (entries {c0}..{min(n, c0 + C) - 1}) is "
                                        f"corrupt ({exc}).") from exc
    except StoreCorruptError as exc:
        raise StoreCorruptError(f"{what}: {str(exc).rstrip()} Nothing was written: the build is as it was; "
                                f"{fix}") from exc
