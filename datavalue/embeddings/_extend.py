"""Builds after the fact: embeddings w.r.t. an intermediate checkpoint, and extending a finished build.

Both reuse the transfer operators a build stored under ``embeddings/<curvature>/ops/block<l>``
``(K, w, w)`` (see :mod:`datavalue.embeddings._build`) and the very options the build was made
with (:func:`~datavalue.embeddings._metadata.stored_config`), never today's defaults:

* :func:`embeddings_at` recomputes only the segment that contains the checkpoint and chains the
  stored operators of the segments before it;
* :func:`extend_embeddings` runs the steps recorded since the build backward and maps every old
  embedding with one operator per block.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from datavalue._blas import one_blas_thread
from datavalue._memory import parse_max_memory
from datavalue.embeddings._backend import parse_device
from datavalue.embeddings._build import (
    SIGN,
    BuildInfo,
    _check_memory,
    _load_ops,
    _now,
    _read_attrs,
    _store_ops,
    _warn_expansive,
    check_chunk_memory,
    check_client,
    refuse_read_only_run,
)
from datavalue.embeddings._check import refuse_final_pass, refuse_foreign, require_intact_rows
from datavalue.embeddings._metadata import (
    ATTRS_KEY,
    _base,
    _describe_spans,
    _replay_optimizer,
    _stored_blocks,
    _stored_fisher_window,
    rebuild_call,
    stored_config,
)
from datavalue.embeddings._plan import _digest, _make_plan, _parse_curvature, _Plan, _split
from datavalue.embeddings._pooledtail import pooled_tail
from datavalue.embeddings._sgd import chain
from datavalue.embeddings._stream import _execute, _run_segments, _scan, _task, _write_pieces
from datavalue.errors import EmbeddingError, StoreExistsError
from datavalue.store import (
    check_workers_see_run,
    fast_rows,
    rebind_array,
    refuse_foreign_below,
    writes_run,
)

logger = logging.getLogger(__name__)

__all__ = ["embeddings_at", "extend_embeddings"]


@writes_run("embeddings_at")  # one writer per run (datavalue.store.lock_run)
def embeddings_at(
    path: str | os.PathLike[str],
    step: int,
    curvature: str | None = None,
    *,
    client: Any = None,
    progress: bool = True,
    overwrite: bool = False,
    device: Any = None,
    max_memory: int | str | None = None,
) -> Any:
    """Embeddings of the occurrences before ``step`` w.r.t. the checkpoint *before* step ``step``.

    Uses the stored transfer operators of the segments that end at or before ``step`` and
    recomputes only the segment that contains it, then runs the earlier segments in parallel.
    Test gradients must be taken at that checkpoint's weights.

    Args:
        path: a run with a finished build of ``curvature``.
        step: ``1 <= step <= T``; ``T`` is the final model (the main build). Segment boundaries are
            cheapest.
        curvature: which build (default as in :func:`build_embeddings`).
        client, progress, device, max_memory: as in :func:`build_embeddings`.
        overwrite: replace an earlier result for this step.

    Returns:
        The ``(step_ptr[step], k)`` zarr array ``embeddings/<curvature>/at/<step>/values``
        (read-only). Sign: influence = ``loss(without) - loss(with)`` at that checkpoint.
    """
    from datavalue.store import create_array, open_array, open_run

    limit = parse_max_memory(max_memory, EmbeddingError)
    device = parse_device(device)
    check_client(client)
    run = open_run(path)
    path = run.path  # absolute (a file:// URL: its local path): what the tasks open, on any worker
    check_workers_see_run(client, path, run.run_id, "embeddings_at(client=)'s tasks")
    refuse_final_pass(run, "embeddings_at")
    curvature = _parse_curvature(run, curvature)
    meta = _read_attrs(path, curvature)
    refuse_foreign(run, f"{_base(curvature)}/values",  # copied in from another run
                   f"build_embeddings({str(path)!r}, {curvature!r}, overwrite=True)", meta)
    T = int(meta["n_steps"])
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise EmbeddingError(f"step must be an int step index in 1..{T}, got {step!r} ({type(step).__name__}); nothing is "
                             "rounded.")
    step = int(step)
    if not 1 <= step <= T:
        raise EmbeddingError(f"step must lie in 1..{T} (the built steps), got {step}.")
    base = _base(curvature)
    if step == T:
        return open_array(path, f"{base}/values")
    name = f"{base}/at/{step}/values"
    if run.has_array(name) and not overwrite:
        raise StoreExistsError(f"{path}/{name} exists; pass overwrite=True to recompute it.")
    _refuse_adam(path, meta, "embeddings_at")
    plan, _ = _make_plan(
        run, curvature, meta["dtype"], None, 1e6, meta.get("clipping", "direction"),
        _replay_optimizer(meta), blocks=_stored_blocks(meta), fisher_window=_stored_fisher_window(meta, path),
    )
    plan = dataclasses.replace(plan, device=device)
    _check_memory(path, plan, len(meta["segments"]), limit)
    seg = [tuple(b) for b in meta["segments"]]
    bounds, known = [], {}
    inside = [s for s, (lo, hi) in enumerate(seg) if lo < step]
    if meta.get("ops_stored"):
        ops = _load_ops(path, curvature, plan, len(seg))
    else:
        ops = None
    for s in inside:
        lo, hi = seg[s]
        bounds.append((lo, min(hi, step)))
        if hi <= step and ops is not None:
            known[len(bounds) - 1] = ops[s]
    k = int(run.proj_dim)
    R_b = int(plan.step_ptr[step])
    chunk = int(run.row_chunk)
    check_chunk_memory(path, chunk, k, meta["storage_dtype"], 1, chunk, limit)
    out = create_array(
        path,
        name,
        shape=(R_b, k),
        dtype=meta["storage_dtype"],
        chunks=(chunk, k),
        overwrite=True,
        attrs={ATTRS_KEY: {"checkpoint_step": step, "curvature": curvature, "sign": SIGN}},
    )
    _run_segments(
        plan,
        bounds,
        final_velocity=False,
        known_ops=known,
        outputs=[out],
        out_offset=0,
        n_out=R_b,
        out_chunk=chunk,
        client=client,
        progress=progress,
        desc=f"embeddings at step {step}",
    )
    return open_array(path, name)


@writes_run("extend_embeddings")  # one writer per run (datavalue.store.lock_run)
def extend_embeddings(
    path: str | os.PathLike[str],
    curvature: str | None = None,
    *,
    segments: int = 1,
    client: Any = None,
    progress: bool = True,
    device: Any = None,
    max_memory: int | str | None = None,
) -> BuildInfo:
    """Bring a finished build up to date after the run was resumed and trained further.

    The steps recorded since the build are run backward (their own embeddings come out directly);
    their operator ``R`` at the old end (per block ``n x w``) then maps every old embedding:
    ``[e_new, v_new] = R @ [e_old, v_old]``: one ``k x k`` map per block for plain SGD, ``2k x 2k``
    when momentum carries velocity across the old end. That needs the old build's ``v_values``
    (kept by default for momentum runs); without them, if the first new step carries velocity,
    this raises and asks for a rebuild. A build whose Fisher was pooled (``fisher_window = W > 0``) has its
    old last ``W`` steps recomputed with the windows the new steps complete, and its older rows carried over
    that change (:mod:`datavalue.embeddings._pooledtail`; refused, nothing written, if that is not exact).
    Equal to a full rebuild up to rounding. ``device``: where the
    new steps' recursion runs, as in :func:`build_embeddings` (the stored config's dtype is kept). ``max_memory``: as in :func:`build_embeddings`.

    Returns:
        :class:`BuildInfo` of the extended build.
    """
    from datavalue.store import open_array, open_array_writable, open_run

    t_start = time.perf_counter()
    limit = parse_max_memory(max_memory, EmbeddingError)
    device = parse_device(device)
    check_client(client)
    refuse_read_only_run(path, "extend_embeddings")  # an archive: say to unpack it (P9-17's twin)
    run = open_run(path)
    path = run.path  # absolute (a file:// URL: its local path): what the tasks open, on any worker
    check_workers_see_run(client, path, run.run_id, "extend_embeddings(client=)'s tasks")
    refuse_final_pass(run, "extend_embeddings")
    curvature = _parse_curvature(run, curvature)
    meta = _read_attrs(path, curvature)
    refuse_foreign(run, f"{_base(curvature)}/values",  # copied in from another run
                   f"build_embeddings({str(path)!r}, {curvature!r}, overwrite=True)", meta)
    T0, R0 = int(meta["n_steps"]), int(meta["n_rows"])
    T1, R1 = int(run.n_steps), int(run.n_rows)
    _refuse_adam(path, meta, "extend_embeddings")
    stored = stored_config(meta)
    rebuild = rebuild_call(path, curvature, meta)
    plan, handling = _make_plan(
        run, curvature, stored.dtype, None, stored.explode_threshold, stored.clipping,
        _replay_optimizer(meta), blocks=_stored_blocks(meta), fisher_window=_stored_fisher_window(meta, path),
    )
    plan = dataclasses.replace(plan, device=device)
    _check_memory(path, plan, segments, limit)
    if T1 < T0 or int(plan.step_ptr[T0]) != R0 or _digest(plan, T0) != meta["run_digest"]:
        raise EmbeddingError(
            f"{path}: the first {T0} steps differ from the ones the build was made from (the run was overwritten or "
            f"truncated). Rebuild with {rebuild}."
        )
    base = _base(curvature)
    values = open_array_writable(path, f"{base}/values")
    if T1 == T0:
        return _info_from_meta(path, curvature, dict(meta, blocks=[list(b) for b in plan.blocks]),
                               time.perf_counter() - t_start)
    logger.info(
        "%s: extending the %s build from step %d to %d with its stored blocks (%s)",
        path, curvature, T0, T1, _describe_spans(plan.blocks),
    )
    had_vel = bool(meta["velocity"])
    vel = had_vel or plan.momentum_mode
    if not had_vel and plan.momentum[T0] != 0 and not plan.fresh[T0]:
        # the first new step carries velocity built up by the old steps
        raise EmbeddingError(
            f"{path}: step {T0} carries momentum from the old steps, so extending needs their velocity part "
            f"(v_values), which this build did not keep (velocity=False). Rebuild with {rebuild}."
        )
    k = int(run.proj_dim)
    chunk = int(values.chunks[0])
    check_chunk_memory(path, chunk, k, meta["storage_dtype"], 1 + int(vel), chunk, limit)  # before anything changes
    for name in [f"{base}/values"] + ([f"{base}/v_values"] if had_vel else []):  # the rows mapped in place below:
        require_intact_rows(run, name, R0, "extend_embeddings",  # a deleted chunk would map as zeros
                            f"rebuild it with {rebuild}.")
    if meta.get("ops_stored"):  # the stored operators are read and rewritten below: every chunk intact first
        from datavalue.embeddings._build import check_ops

        check_ops(path, curvature, plan)
    tail = None
    if plan.fisher_window > 0:  # the new steps change the pooled Fisher of the old last W steps (read-only here)
        old_segments = [tuple(b) for b in meta["segments"]]
        tail = pooled_tail(path, plan, T0, old_segments,
                           _load_ops(path, curvature, plan, len(old_segments)) if meta.get("ops_stored") else None,
                           velocity_kept=had_vel)
    refuse_foreign_below(path, base)  # its operators are rewritten: never with a user's file (or a link) in the build
    meta["complete"] = False
    values.attrs[ATTRS_KEY] = meta
    values.resize((R1, k))
    outputs = [values]
    if vel:
        if had_vel:
            v_arr = open_array_writable(path, f"{base}/v_values")
            v_arr.resize((R1, k))
        else:
            from datavalue.store import create_array

            v_arr = create_array(
                path,
                f"{base}/v_values",
                shape=(R1, k),
                dtype=meta["storage_dtype"],
                chunks=(chunk, k),
                overwrite=True,
                attrs={"meaning": "delta v_T of each removal (momentum part)"},
            )
        outputs.append(v_arr)
    bounds = _split(plan.step_ptr, T0, T1, segments)
    res = _run_segments(
        plan,
        bounds,
        final_velocity=vel,
        known_ops=None,
        outputs=outputs,
        out_offset=0,
        n_out=R1,
        out_chunk=chunk,
        client=client,
        progress=progress,
        desc=f"extend ({curvature})",
    )
    maps = res["start"]  # per block: (n, w) operator at the old end T0
    pieces = []
    R_map = R0  # old rows mapped by one operator per block; with a pooled tail, those before it
    if tail is not None:  # the tail's rows again with the new windows, from the new steps' operator at T0
        R_map = int(plan.step_ptr[tail.start])
        with one_blas_thread():
            tres = _scan(plan, tail.start, T0, maps, transfer=False, velocity=vel, outputs=outputs, out_offset=0,
                         n_out=R1, out_chunk=chunk)
        pieces.extend(tres["pieces"])
        res["max_op"] = max(res["max_op"], tres["max_op"])
        res["expansive"] = sorted(set(res["expansive"]) | set(tres["expansive"]))
        if tail.swap is not None:
            maps = [chain(m, X, b - a) for m, X, (a, b) in zip(maps, tail.swap, plan.blocks, strict=True)]
    # old rows: one map per block, chunk-parallel; the chunk shared with new rows goes via the driver
    old_in = [fast_rows(open_array(path, f"{base}/values"), required_rows=R0)] + (  # checked reads
        [fast_rows(open_array(path, f"{base}/v_values"), required_rows=R0)] if had_vel else []
    )
    fns = [
        _task(_map_rows, plan, maps, old_in, outputs, c0, min(c0 + chunk, R_map), chunk, vel)
        for c0 in range(0, R_map, chunk)
    ]
    for p in _execute(fns, client, None):
        pieces.extend(p)
    _write_pieces(outputs, pieces, chunk)
    if any(op is not None for op in res["ops"]):
        if meta.get("ops_stored") and tail is not None and tail.seg_ops:  # the segments reaching into the tail
            old_ops = _load_ops(path, curvature, plan, len(meta["segments"]))
            old_ops = [tail.seg_ops.get(s, ops) for s, ops in enumerate(old_ops)]
            _store_ops(path, curvature, plan, old_ops + res["ops"])
        elif meta.get("ops_stored"):
            _store_ops(path, curvature, plan, res["ops"], append_to=len(meta["segments"]))
    else:
        meta["ops_stored"] = False
    meta.update(
        n_steps=T1,
        n_rows=R1,
        segments=meta["segments"] + [list(b) for b in bounds],
        velocity=vel,
        momentum_mode=bool(meta.get("momentum_mode")) or plan.momentum_mode,
        run_digest=_digest(plan, T1),
        max_operator=max(float(meta.get("max_operator", 0.0)), res["max_op"]),
        expansive_steps=sorted(set(meta.get("expansive_steps", [])) | set(res["expansive"])),
        extended=meta.get("extended", []) + [{"from_step": T0, "to_step": T1, "at": _now()}],
        blocks=[list(b) for b in plan.blocks],  # also for builds made before the spans were stored
        block_mode=meta.get("block_mode", "layer"),
        complete=True,
    )
    values.attrs[ATTRS_KEY] = meta
    # the build now describes the steps recorded since: bound to the run's history as it is now, so that
    # a copy of the run resumed elsewhere (a fork) refuses it (datavalue.store.Run.foreign_derived)
    for name in [f"{base}/values"] + ([f"{base}/v_values"] if vel else []):
        rebind_array(path, name)
    _warn_expansive(path, res)
    return _info_from_meta(path, curvature, meta, time.perf_counter() - t_start, handling=handling)


def _refuse_adam(path: Any, meta: dict[str, Any], what: str) -> None:
    if meta.get("optimizer") in ("adam", "adamw"):
        raise EmbeddingError(
            f"{path}: {what} is not implemented for Adam-aware builds yet (no transfer operators of the 3k Adam "
            f"state); rebuild with build_embeddings(..., overwrite=True) after training resumed."
        )


def _map_rows(
    plan: _Plan,
    maps: list[np.ndarray],
    old_in: list[Any],
    outputs: list[Any],
    c0: int,
    c1: int,
    chunk: int,
    vel: bool,
) -> list[tuple[int, list[np.ndarray]]]:
    e = np.asarray(old_in[0][c0:c1], dtype=np.float64)
    v = np.asarray(old_in[1][c0:c1], dtype=np.float64) if len(old_in) > 1 else None
    new_e = np.empty_like(e)
    new_v = np.empty_like(e) if vel else None
    for i, (a, b) in enumerate(plan.blocks):
        kb = b - a
        Rm = maps[i].astype(np.float64)
        X = (
            e[:, a:b]
            if Rm.shape[1] == kb
            else np.concatenate(
                [e[:, a:b], v[:, a:b] if v is not None else np.zeros((c1 - c0, kb))], axis=1
            )
        )
        Y = X @ Rm.T
        new_e[:, a:b] = Y[:, :kb]
        if new_v is not None:
            new_v[:, a:b] = Y[:, kb:] if Y.shape[1] > kb else 0.0
    parts = [new_e] + ([new_v] if new_v is not None else [])
    if c1 - c0 == chunk:
        for arr, p in zip(outputs, parts, strict=True):
            arr[c0:c1] = p
        return []
    return [(c0, parts)]


def _info_from_meta(
    path: Any, curvature: str, meta: dict[str, Any], seconds: float, handling: str | None = None
) -> BuildInfo:
    return BuildInfo(
        path=str(path),
        curvature=curvature,
        array=f"{_base(curvature)}/values",
        dtype=meta["dtype"],
        n_steps=int(meta["n_steps"]),
        n_rows=int(meta["n_rows"]),
        segments=tuple(tuple(b) for b in meta["segments"]),
        velocity=bool(meta["velocity"]),
        optimizer=handling or meta["optimizer"],
        max_operator=float(meta.get("max_operator", 0.0)),
        expansive_steps=tuple(meta.get("expansive_steps", [])),
        seconds=seconds,
        blocks=tuple(tuple(b) for b in meta.get("blocks", [])),
        choice=str(meta.get("choice", {}).get("summary", "")),
        fisher_window=int(meta.get("fisher_window", 0) or 0),
    )
