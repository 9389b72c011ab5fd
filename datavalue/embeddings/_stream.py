"""Streaming execution of the recursion: reverse row windows, chunk-owned writes, segments.

A task (:func:`_scan`) runs a step range backward for every block, reading the run's rows in
windows from the end and writing the output chunks it owns entirely (the readers and writers:
:mod:`._streamio`); chunks shared with a
neighbouring segment come back to the driver (:func:`_write_pieces`), so no two writers ever
touch one chunk. :func:`_run_segments` runs the two passes of a segmented build through dask.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from datavalue._blas import one_blas_thread
from datavalue.embeddings import _core as core
from datavalue.embeddings import _gemm, _hyper
from datavalue.embeddings._backend import Backend, get_backend
from datavalue.embeddings._plan import _Plan
from datavalue.embeddings._streamio import (
    _ChunkWriter,
    _OnDevice,
    _PooledFisher,
    _ReverseRows,
    _write_pieces,
)
from datavalue.errors import EmbeddingError, NonFiniteError

logger = logging.getLogger(__name__)




# ---------------------------------------------------------------------- one task


def _identity_states(plan: _Plan, velocity: bool) -> list[core.BlockState]:
    return [core.init_state(b - a, velocity=velocity, dtype=plan.dtype) for a, b in plan.blocks]


def _scan(plan: _Plan, lo: int, hi: int, start: list[np.ndarray] | None, **kwargs: Any) -> dict[str, Any]:
    """Run steps ``hi-1 .. lo`` backward (see :func:`_scan_steps`). The scan owns its readers' and
    writer's threads: they are joined when it returns or fails, before anything else runs."""
    with contextlib.ExitStack() as owned:
        owned.enter_context(get_backend(plan.device).scan_threads())
        return _scan_steps(plan, lo, hi, start, owned=owned, **kwargs)


def _scan_steps(
    plan: _Plan,
    lo: int,
    hi: int,
    start: list[np.ndarray] | None,
    *,
    owned: contextlib.ExitStack,
    transfer: bool,
    velocity: bool,
    outputs: Sequence[Any] | None,
    out_offset: int = 0,
    n_out: int = 0,
    out_chunk: int = 1,
    tick: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run steps ``hi-1 .. lo`` backward; the readers and the writer it opens are closed by ``owned``.

    ``start``: per block the operator ``(n, w)`` after step ``hi - 1`` (``None``: the identity,
    ``[I, 0]``, or the full ``2k`` identity with ``transfer``/``velocity``). With ``outputs``,
    rows ``step_ptr[lo]:step_ptr[hi]`` of the embeddings are written to ``outputs[0]`` (and their
    velocity part to ``outputs[1]``) at ``row - out_offset``.
    Returns the per-block operators before step ``lo`` and health statistics.
    """
    from datavalue.store import open_run

    if plan.adam is not None:
        if velocity:
            raise EmbeddingError("internal: Adam-aware builds store delta theta only (no velocity part).")
        return _scan_adam(
            plan, lo, hi, start, owned=owned, transfer=transfer, outputs=outputs, out_offset=out_offset,
            n_out=n_out, out_chunk=out_chunk, tick=tick,
        )
    run = open_run(plan.path)
    chunk = max(int(run.row_chunk), 1)
    xp = get_backend(plan.device)
    if start is None:
        # transfer operators are k x k without momentum, 2k x 2k with it
        states = [_to_device(xp, s) for s in _identity_states(plan, velocity=(transfer and plan.momentum_mode) or velocity)]
    else:
        states = [
            core.state_from_operator(xp.asarray(R, plan.dtype), b - a)
            for R, (a, b) in zip(start, plan.blocks, strict=True)
        ]
    grads, weights, curv, writer = _open_streams(run, plan, lo, hi, chunk, outputs, out_offset, n_out, out_chunk,
                                                 owned, xp)
    embed = writer is not None
    max_op, expansive = 0.0, []
    groups = _block_groups(plan, lo, hi)
    for t in range(hi - 1, lo - 1, -1):
        r0, r1 = int(plan.step_ptr[t]), int(plan.step_ptr[t + 1])
        G_host, G_all = grads.get(r0, r1)
        w_host, w_dev = weights.get(r0, r1)
        w = np.asarray(w_host, dtype=np.float64)
        _check_rows(plan, t, r0, G_host, w)
        if not xp.is_numpy:
            w = w_dev
        F_all = _step_curvature(plan, curv, t)
        u, ug = _clip_direction(plan, t, r0, r1, G_host, w_host)
        thetas, vels = [], []

        def one(i: int, t: int = t, G_all: np.ndarray = G_all, w: np.ndarray = w, F_all: Any = F_all,
                u: Any = u, ug: Any = ug) -> tuple[core.BlockState, np.ndarray | None]:
            a, b = plan.blocks[i]
            return _hyper.step_back(  # the block's hyperparameters at step t (param groups), in place
                plan, i, t, states[i], G_all[:, a:b], w,
                curv=_block_curv(plan, F_all, a, b),
                grad_scale=float(plan.grad_scale[t]),
                embed=embed,
                clip_u=None if u is None else u[a:b],
                clip_ug=ug,
            )

        results = _step_blocks(one, len(plan.blocks), groups)
        for i, (a, b) in enumerate(plan.blocks):
            states[i], E = results[i]
            max_op = max(max_op, _watch(plan, states[i], i, t, lo, hi, expansive))
            if embed:
                assert E is not None
                k = b - a
                thetas.append(E[:, :k])
                if velocity:
                    vels.append(E[:, k:])
        if writer is not None:
            parts = [_join(thetas, xp)]
            if not xp.all_finite(parts[0]):
                raise NonFiniteError(f"{plan.path}: non-finite embeddings at step {t}.")
            if velocity:
                parts.append(_join(vels, xp))
            writer.put(r0 - out_offset, parts)
        if tick is not None:
            tick(1)
    return {
        "ops": [xp.to_numpy(core.operator(s, plan.width(i))) for i, s in enumerate(states)],
        "pieces": writer.close() if writer is not None else [],
        "max_op": max_op,
        "expansive": expansive[:20],
    }



def _clip_direction(plan: _Plan, t: int, r0: int, r1: int, G_host: np.ndarray, w_host: np.ndarray,
                    ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A clipped step's direction ``u = g_hat / ||g_hat||`` (``g_hat = w @ G`` from the stored rows over
    all blocks) and the rows' ``G @ u``, or ``(None, None)``: the step is not clipped (``grad_scale[t] == 1``),
    has no rows or a zero gradient, or ``clipping="constant"``. The clipped step is ``c g_hat`` with
    ``c = max_norm / ||g_hat||``: both scans keep ``d c`` with it (docs/math.md, sections 5 and 10)."""
    if not (plan.clipping == "direction" and plan.grad_scale[t] < 1.0 and r1 > r0):
        return None, None
    G64 = np.asarray(G_host, dtype=np.float64)
    g_hat = np.asarray(w_host, dtype=np.float64) @ G64
    norm = float(np.linalg.norm(g_hat))
    if norm <= 0:
        return None, None
    u = g_hat / norm
    return u, G64 @ u


#: Narrow blocks run concurrently (one group of blocks per GEMM thread) when a step's recursion over them
#: costs at least this many multiply-adds (``b * sum k^2``); below it the thread hand-offs cost more.
PARALLEL_MIN_WORK = 1 << 21


def _block_groups(plan: _Plan, lo: int, hi: int) -> list[list[int]] | None:
    """Blocks narrower than ``_gemm.SPLIT_MIN`` (whose GEMMs are never split) shared among the scan's GEMM
    threads, balanced by ``k^2`` (longest first); ``None``: one thread runs every block in turn."""
    n = _gemm.gemm_thread_count() if get_backend(plan.device).splits else 1  # not on a GPU
    narrow = [i for i, (a, b) in enumerate(plan.blocks) if b - a < _gemm.SPLIT_MIN]
    if n <= 1 or len(narrow) < 2 or hi <= lo:
        return None
    rows = (int(plan.step_ptr[hi]) - int(plan.step_ptr[lo])) / (hi - lo)
    cost = {i: (plan.blocks[i][1] - plan.blocks[i][0]) ** 2 for i in narrow}
    if rows * sum(cost.values()) < PARALLEL_MIN_WORK:
        return None
    groups: list[list[int]] = [[] for _ in range(min(n, len(narrow)))]
    load = [0] * len(groups)
    for i in sorted(narrow, key=lambda j: -cost[j]):
        g = load.index(min(load))
        groups[g].append(i)
        load[g] += cost[i]
    return groups


def _step_blocks(one: Callable[[int], Any], n_blocks: int, groups: list[list[int]] | None) -> list[Any]:
    """``one(i)`` for every block: wide blocks on this thread (their GEMMs split by rows), then the
    narrow ones by ``groups``, one group per thread (or all here when ``groups`` is None)."""
    out: list[Any] = [None] * n_blocks
    grouped = {i for g in groups for i in g} if groups else set()
    for i in range(n_blocks):
        if i not in grouped:
            out[i] = one(i)
    if groups:
        done = _gemm.run_threads([lambda g=g: [one(i) for i in g] for g in groups])
        for g, res in zip(groups, done, strict=True):
            for i, r in zip(g, res, strict=True):
                out[i] = r
    return out


#: Blocks up to this width are checked for explosion / non-finite values after every step; wider
#: ones every MONITOR_EVERY steps and at the end of the scan (a full pass over a k x k operator
#: costs a large share of the step itself once k is in the thousands).
MONITOR_ALWAYS_K = 512
MONITOR_EVERY = 8


def _monitor_now(k: int, t: int, lo: int, hi: int) -> bool:
    return k <= MONITOR_ALWAYS_K or (hi - 1 - t) % MONITOR_EVERY == 0 or t == lo


#: Rows of the 1-D weight array read at once by the scan.
_WEIGHT_WINDOW = 1 << 16


def _open_streams(run: Any, plan: Any, lo: int, hi: int, chunk: int, outputs: Sequence[Any] | None,
                  out_offset: int, n_out: int, out_chunk: int, owned: contextlib.ExitStack, xp: Backend,
                  ) -> tuple[_OnDevice, _OnDevice, _OnDevice | _PooledFisher | None, _ChunkWriter | None]:
    """Reverse readers of a step range's rows (gradients, weights, stored curvature), each window moved
    to ``xp``'s device once, and its output writer, each closed by ``owned`` (the writer's pending
    writes are dropped if the scan fails; a finished scan closes it first and keeps them)."""
    r_lo, r_hi = int(plan.step_ptr[lo]), int(plan.step_ptr[hi])
    grads = owned.enter_context(_ReverseRows(run, "grads", r_lo, plan.window, chunk))
    # row weights are 4-8 bytes a row: read in long windows (each zarr read costs ~3 ms of Python)
    weights = owned.enter_context(_ReverseRows(run, "weight", r_lo, max(plan.window, _WEIGHT_WINDOW), chunk))
    curv = None  # the stored curvature: Fisher rows, or one k x k Hessian per step
    if plan.curvature == "fisher" and plan.fisher_window > 0:  # rows pooled over neighbouring steps
        assert plan.fisher_ptr is not None
        pooled = owned.enter_context(_PooledFisher(run, plan, lo, hi, chunk, xp))
    elif plan.curvature == "fisher":
        assert plan.fisher_ptr is not None
        curv = owned.enter_context(_ReverseRows(run, "fisher", int(plan.fisher_ptr[lo]), plan.window, chunk))
    elif plan.curvature == "hessian":
        hchunk = max(1, run.chunk_rows("hessian"))
        curv = owned.enter_context(_ReverseRows(run, "hessian", lo, hchunk, hchunk))
    writer = None
    if outputs is not None:
        writer = _ChunkWriter(outputs, r_lo - out_offset, r_hi - out_offset, n_out, out_chunk, xp)
        owned.callback(writer.shutdown)
    dev = [None if r is None else _OnDevice(r, xp, plan.dtype) for r in (grads, weights, curv)]
    if plan.curvature == "fisher" and plan.fisher_window > 0:
        return dev[0], dev[1], pooled, writer
    return dev[0], dev[1], dev[2], writer


def _to_device(xp: Backend, state: Any) -> Any:
    """A block state (numpy) with its arrays on ``xp``'s device (numpy: the state itself)."""
    if xp.is_numpy:
        return state
    return dataclasses.replace(state, **{
        f.name: None if getattr(state, f.name) is None else xp.asarray(getattr(state, f.name))
        for f in dataclasses.fields(state)
    })


def _join(parts: list[np.ndarray], xp: Backend | None = None) -> np.ndarray:
    """The blocks' columns side by side (the plan has at least one block; one operator: no copy)."""
    if len(parts) == 1:
        return parts[0]
    return (xp or get_backend(None)).concat(parts, axis=1)


def _step_curvature(plan: _Plan, curv: Any, t: int) -> np.ndarray | None:
    """Step ``t``'s stored true-Fisher pseudo-gradient rows (pooled over ``t - W .. t + W`` with
    ``plan.fisher_window = W``), or its ``(k, k)`` Hessian for
    ``curvature="hessian"`` (``None`` for other curvatures), checked."""
    if curv is None:
        return None
    if plan.curvature == "hessian":
        H_host, H = curv.get(t, t + 1)
        if not np.all(np.isfinite(H_host)):
            raise NonFiniteError(
                f"{plan.path}: step {t}: the stored Hessian is missing (NaN: the step was recorded without "
                "hessian_loss=) or non-finite. Record every step with rec.step(..., hessian_loss=...), or build "
                "with curvature='fisher' or 'empirical_fisher'."
            )
        return H[0]
    if plan.fisher_window > 0:  # the rows of steps t-W..t+W, scaled to their mean Fisher (checked when read)
        return curv.get(t)[1]
    assert plan.fisher_ptr is not None
    F_host, F_all = curv.get(int(plan.fisher_ptr[t]), int(plan.fisher_ptr[t + 1]))
    if not _all_finite(F_host):
        raise NonFiniteError(f"{plan.path}: step {t}: non-finite Fisher pseudo-gradient rows in the store.")
    return F_all


def _block_curv(plan: _Plan, F_all: np.ndarray | None, a: int, b: int) -> Any:
    """The ``curv`` argument of the core step for columns ``a:b``."""
    if plan.curvature == "empirical_fisher":
        return "empirical_fisher"
    if plan.curvature == "fisher":
        assert F_all is not None
        return F_all[:, a:b]
    if plan.curvature == "hessian":
        assert F_all is not None
        return core.CurvMatrix(F_all[a:b, a:b])
    return None


def _watch(plan: _Plan, state: Any, i: int, t: int, lo: int, hi: int, expansive: list[int]) -> float:
    """Explosion monitor of block ``i`` after step ``t``: its largest ``|entry|`` (0 when not checked
    this step, see :func:`_monitor_now`); records expansive steps, raises on non-finite values."""
    m = state.max_abs() if _monitor_now(state.k, t, lo, hi) else 0.0
    if not np.isfinite(m):
        raise NonFiniteError(
            f"{plan.path}: the embedding operator of block {i} became non-finite by step {t} (lr {plan.lr[t]:.3g}). "
            "The step map is expansive there (eta * lambda_max(H) > 2); the first-order estimate is meaningless. "
            "Check the learning rate / loss of that step."
        )
    if m > plan.explode and (not expansive or expansive[-1] != t):
        expansive.append(t)
    return m


def _all_finite(a: np.ndarray) -> bool:
    """Every entry finite. The sum is finite only if every entry is (a NaN or infinity propagates);
    a non-finite sum from finite entries (overflow) falls back to the entrywise check. One reduction
    without a boolean temporary: 4x cheaper on a step's rows."""
    return bool(np.isfinite(np.sum(a))) or bool(np.isfinite(a).all())


def _check_rows(plan: _Plan, t: int, r0: int, G_all: np.ndarray, w: np.ndarray) -> None:
    if not _all_finite(G_all):
        bad = r0 + int(np.flatnonzero(~np.isfinite(G_all).all(1))[0])
        raise NonFiniteError(
            f"{plan.path}: step {t}, row {bad}: non-finite gradient in the store. Re-record with "
            "Recorder(..., on_nonfinite='skip') to store such rows as flagged zeros."
        )
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise EmbeddingError(f"{plan.path}: step {t} has negative or non-finite row weights {w[:5]}.")


def _scan_adam(
    plan: _Plan,
    lo: int,
    hi: int,
    start: list[np.ndarray] | None = None,
    *,
    owned: contextlib.ExitStack,
    transfer: bool = False,
    outputs: Sequence[Any] | None,
    out_offset: int = 0,
    n_out: int = 0,
    out_chunk: int = 1,
    tick: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Adam-aware backward scan of steps ``hi-1 .. lo`` (docs/math.md, section 7), from
    ``R^(hi) = [I, 0, 0]``. Per step it reads the stored moments before the step (``adam_m[t]``,
    ``adam_v[t]``) and after it (``adam_*[t+1]``; for the run's last step they are advanced with
    the gradient summed from the stored rows). The gradient the optimizer used is recovered
    exactly as ``g_t = (m_{t+1} - b1 m_t) / (1 - b1)`` (clipping and coupled decay included)."""
    from datavalue.store import open_run

    assert plan.adam is not None
    info = plan.adam
    b1, b2 = info["betas"]
    run = open_run(plan.path)
    T = int(run.n_steps)
    chunk = max(int(run.row_chunk), 1)
    xp = get_backend(plan.device)
    if start is not None:  # the operators at the segment's end, chained from later segments
        states = [
            core.adam_state_from_operator(xp.asarray(R, plan.dtype), b - a)
            for R, (a, b) in zip(start, plan.blocks, strict=True)
        ]
    else:  # [I, 0, 0] at the run's end, or the 3k identity for a transfer operator
        states = [_to_device(xp, core.init_adam_state(b - a, dtype=plan.dtype, transfer=transfer))
                  for a, b in plan.blocks]
    grads, weights, curv, writer = _open_streams(run, plan, lo, hi, chunk, outputs, out_offset, n_out, out_chunk,
                                                 owned, xp)
    schunk = max(1, run.chunk_rows("adam_v"))
    mom_m = owned.enter_context(_ReverseRows(run, "adam_m", lo, schunk, schunk))
    mom_v = owned.enter_context(_ReverseRows(run, "adam_v", lo, schunk, schunk))
    adam_step = np.asarray(run.adam_step, dtype=np.float64)
    embed = writer is not None
    max_op, expansive = 0.0, []
    for t in range(hi - 1, lo - 1, -1):
        r0, r1 = int(plan.step_ptr[t]), int(plan.step_ptr[t + 1])
        G_host, G_all = grads.get(r0, r1)
        w_host, w_dev = weights.get(r0, r1)
        w = np.asarray(w_host, dtype=np.float64)
        _check_rows(plan, t, r0, G_host, w)
        c = float(plan.grad_scale[t])
        mv = np.asarray(mom_m.get(t, min(t + 2, T)), dtype=np.float64)
        vv = np.asarray(mom_v.get(t, min(t + 2, T)), dtype=np.float64)
        if not (np.all(np.isfinite(mv)) and np.all(np.isfinite(vv))):
            raise NonFiniteError(
                f"{plan.path}: step {t}: the recorded Adam moments are missing (NaN) or non-finite; record every "
                "step with Recorder(..., optimizer=opt, record_optimizer_state=True)."
            )
        if t + 1 < T:
            m_next, v_next = mv[1], vv[1]
            g = (m_next - b1 * mv[0]) / (1.0 - b1)
        else:  # the last recorded step: advance the moments with the stored rows' gradient
            g = c * (w @ np.asarray(G_host, dtype=np.float64))
            m_next = b1 * mv[0] + (1.0 - b1) * g
            v_next = b2 * vv[0] + (1.0 - b2) * g * g if info["exact"] else vv[0]
        coef_all = _hyper.adam_coefficients(  # per-column lr and eps with param groups
            plan, t, m_next, v_next, g, step=float(adam_step[t]), betas=(b1, b2), eps=info["eps"],
            decoupled=info["decoupled"], second_moment=info["second_moment"],
            unit_preconditioner=bool(info.get("whitened", False)),
        )
        F_all = _step_curvature(plan, curv, t)
        u, ug = _clip_direction(plan, t, r0, r1, G_host, w_host)
        if info.get("whitened", False):
            u = ug = None  # whitened rows (precondition="adam") are not the clipped gradient's coordinates
        if not xp.is_numpy:
            w = w_dev
        thetas = []
        for i, (a, b) in enumerate(plan.blocks):
            states[i], E = _hyper.adam_step_back(
                plan, i, t, states[i], G_all[:, a:b], w, coef_all, curv=_block_curv(plan, F_all, a, b),
                grad_scale=c, embed=embed, clip_u=None if u is None else u[a:b], clip_ug=ug,
            )
            max_op = max(max_op, _watch(plan, states[i], i, t, lo, hi, expansive))
            if embed:
                assert E is not None
                thetas.append(E[:, : b - a])
        if writer is not None:
            part = _join(thetas, xp)
            if not xp.all_finite(part):
                raise NonFiniteError(f"{plan.path}: non-finite embeddings at step {t}.")
            writer.put(r0 - out_offset, [part])
        if tick is not None:
            tick(1)
    return {
        "ops": [xp.to_numpy(core.adam_operator(s)) for s in states],
        "pieces": writer.close() if writer is not None else [],
        "max_op": max_op,
        "expansive": expansive[:20],
    }


# ---------------------------------------------------------------------- execution


def _execute(
    fns: list[Callable[..., Any]], client: Any, bar: Any, sizes: Sequence[int] | None = None
) -> list[Any]:
    """Run zero-argument task callables as ``dask.delayed`` tasks: on ``client`` (a
    ``dask.distributed.Client``) when given, else on the threaded scheduler. With a client the
    progress bar advances by ``sizes[i]`` when task ``i`` finishes (tasks cannot reach the bar)."""
    if not fns:
        return []
    if len(fns) == 1 and client is None:
        return [fns[0]()]
    import dask

    tasks = [dask.delayed(f, pure=False)() for f in fns]
    if client is None:
        # parallelism comes from the tasks: one BLAS thread each, or BLAS threads oversubscribe the
        # cores (measured: 2 segments on 2 cores, 0.84 s with one BLAS thread per task, 1.5 s without).
        # The tasks run on this build's own pool (not dask's process-wide one): when one fails, the
        # others not started are dropped and the running ones finish before the error propagates, so
        # no scan of a failed build still writes afterwards.
        workers = min(len(fns), int(dask.config.get("num_workers", None) or os.cpu_count() or 1))
        pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="datavalue-segment")
        try:
            with one_blas_thread():
                return list(dask.compute(*tasks, scheduler="threads", pool=pool))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    from distributed import as_completed

    futures = client.compute(tasks)
    index = {f.key: i for i, f in enumerate(futures)}
    for fut in as_completed(futures):
        if bar is not None and sizes is not None:
            bar.update(sizes[index[fut.key]])
    return client.gather(futures)


class _Tick:
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)


def _bar(total: int, desc: str, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step")


def _task(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
    def run() -> Any:
        return fn(*args, **kwargs)

    return run


def _run_segments(
    plan: _Plan,
    bounds: list[tuple[int, int]],
    *,
    final_velocity: bool,
    known_ops: dict[int, list[np.ndarray]] | None,
    outputs: Sequence[Any] | None,
    out_offset: int,
    n_out: int,
    out_chunk: int,
    client: Any,
    progress: bool,
    desc: str,
) -> dict[str, Any]:
    """Embeddings of steps ``bounds[0][0] .. bounds[-1][1]`` w.r.t. the weights after the last one.

    Returns ``start`` (per block, the operator before the first step), ``ops`` (per segment, per
    block, the transfer operators) and health statistics.
    """
    K = len(bounds)
    known_ops = dict(known_ops or {})
    n_scan = sum(hi - lo for lo, hi in bounds)
    need = [s for s in range(K) if s not in known_ops] if K > 1 else []
    total = n_scan + sum(bounds[s][1] - bounds[s][0] for s in need)
    bar = _bar(total, desc, progress)
    tick = _Tick(bar) if client is None else None
    stats: dict[str, Any] = {"max_op": 0.0, "expansive": []}

    def absorb(res: dict[str, Any]) -> None:
        stats["max_op"] = max(stats["max_op"], res["max_op"])
        stats["expansive"] = sorted(set(stats["expansive"]) | set(res["expansive"]))

    # the embedding scans (as opposed to the transfer-operator scans of pass 1)
    embed_kw = dict(transfer=False, velocity=final_velocity, outputs=outputs, out_offset=out_offset, n_out=n_out,
                    out_chunk=out_chunk, tick=tick)
    try:
        if K == 1:
            lo, hi = bounds[0]
            # one scan on the driver: BLAS on one thread, wide operators split over all cores
            # (_gemm.gemm_threads, whose pool ends with the scan; narrow ones are never split, measured
            # in _gemm's notes)
            # (on a GPU: one kernel per product, no split pool)
            split = _gemm.gemm_threads(os.cpu_count() or 1) if get_backend(plan.device).splits \
                else contextlib.nullcontext()
            with one_blas_thread(), split:
                res = _scan(plan, lo, hi, None, **embed_kw)
            absorb(res)
            if tick is None and bar is not None:
                bar.update(hi - lo)
            if outputs is not None:
                _write_pieces(outputs, res["pieces"], out_chunk)
            ops0 = None
            if (final_velocity or not plan.momentum_mode) and plan.adam is None:
                ops0 = res["ops"]  # the whole range's transfer operator
            return {"start": res["ops"], "ops": [ops0], **stats}

        # pass 1: transfer operators of the segments not known yet
        fns = [
            _task(
                _scan,
                plan,
                bounds[s][0],
                bounds[s][1],
                None,
                transfer=True,
                velocity=False,
                outputs=None,
                tick=tick,
            )
            for s in need
        ]
        sizes = [bounds[s][1] - bounds[s][0] for s in need]
        for s, res in zip(need, _execute(fns, client, bar, sizes), strict=True):
            absorb(res)
            known_ops[s] = res["ops"]
        # chaining: the operator at each segment's end, from the last segment backward
        nb = len(plan.blocks)
        ends: list[list[np.ndarray]] = [[] for _ in range(K)]
        cur = [_final_operator(plan, i, final_velocity) for i in range(nb)]
        for s in range(K - 1, -1, -1):
            ends[s] = cur
            cur = [
                core.chain(cur[i], known_ops[s][i], plan.blocks[i][1] - plan.blocks[i][0])
                for i in range(nb)
            ]
        start = cur
        # pass 2: the recursions with embeddings, in parallel
        fns = [_task(_scan, plan, bounds[s][0], bounds[s][1], ends[s], **embed_kw) for s in range(K)]
        results = _execute(fns, client, bar, [hi - lo for lo, hi in bounds])
        pieces = []
        for s, res in enumerate(results):
            absorb(res)
            pieces.extend(res["pieces"])
            # consistency: the operator a segment ends with is the next one's start
            want = ends[s - 1] if s > 0 else start
            for i, (got, exp) in enumerate(zip(res["ops"], want, strict=True)):
                g, e = _same_width(got, exp)
                scale = max(1.0, float(np.abs(e).max()))
                tol = 1e-6 if plan.dtype == "float64" else 1e-2
                if float(np.abs(g - e).max()) > tol * scale:
                    logger.warning(
                        "segment %d block %d: chained and recomputed operators differ by %.3g",
                        s,
                        i,
                        float(np.abs(g - e).max()),
                    )
        if outputs is not None:
            _write_pieces(outputs, pieces, out_chunk)
        # Adam transfer operators are not kept: nothing reuses them (extend_embeddings and
        # embeddings_at refuse Adam runs), and at 3k x 3k per block they are the largest state
        ops = [known_ops[s] if plan.adam is None else None for s in range(K)]
        return {"start": start, "ops": ops, **stats}
    finally:
        if bar is not None:
            bar.close()


def _same_width(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = max(a.shape[1], b.shape[1])
    return _pad_cols(a, w), _pad_cols(b, w)


def _pad_cols(a: np.ndarray, w: int) -> np.ndarray:
    if a.shape[1] == w:
        return a
    out = np.zeros((a.shape[0], w), dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def _final_operator(plan: _Plan, i: int, velocity: bool) -> np.ndarray:
    """``[I, 0]`` (or the ``2k`` identity with ``velocity``) at the width of the plan's operators."""
    k = plan.blocks[i][1] - plan.blocks[i][0]
    if plan.adam is not None:
        return core.adam_operator(core.init_adam_state(k, dtype=plan.dtype))
    return core.operator(core.init_state(k, velocity=velocity, dtype=plan.dtype), plan.width(i))


def _pad_op(op: np.ndarray | None, w: int, out: np.ndarray | None = None) -> np.ndarray:
    """A transfer operator padded with zeros to ``w x w`` (a ``k x k`` operator of a segment without
    momentum acts on ``delta theta`` only; its velocity rows and columns are never used); NaN for a
    missing one. Written into ``out`` when given."""
    if out is None:
        out = np.empty((w, w))
    if op is None:
        out[:] = np.nan
        return out
    out[: op.shape[0], : op.shape[1]] = op
    out[op.shape[0] :, :] = 0.0
    out[: op.shape[0], op.shape[1] :] = 0.0
    return out


# ---------------------------------------------------------------------- store helpers
