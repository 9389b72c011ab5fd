"""Out-of-core kernels: scores, grouped sums and top-k, streamed over embedding row chunks.

Everything here works on arrays only (no store, no torch). The embeddings ``E`` ``(R, k)`` are a
zarr array read in row chunks; the test gradients ``q`` ``(m, k)`` are small and in memory. A
score block is ``E[a:b] @ q.T`` ``(rows, m)``: occurrences as rows, so that per-chunk reductions
read contiguous rows (the user-facing scores are the transpose).

- :class:`ChunkTasks`: one independent read-score-reduce task per chunk (eager queries).
  :func:`score_rows` is the same as one lazy dask array ``(R, m)`` over the embeddings' dask array
  (``lazy=True`` results) and :func:`dask_blocks` cuts any such array into blocks.
- :func:`segment_chunk` turns a score block into a *sparse partial* (the groups present in the
  chunk and their sums); :func:`combine_segments` merges partials, going dense once a partial
  covers half of the groups. The ``(m, R)`` matrix is never formed.
- :func:`topk_chunk` keeps the ``k`` largest and ``k`` smallest scores of every test point of a
  block; :func:`combine_top_k` merges them: memory ``O(m k)`` per partial.
- :func:`stream_reduce` computes the chunk tasks a window at a time and folds each window into
  one accumulator on the driver, so peak memory is bounded by the window, not by ``R``.
  :func:`tree_reduce` builds the same reduction as one lazy graph (``lazy=True`` results).

To add a reduction, write a chunk function ``(score_block, ...) -> partial`` and a combine
``(*partials) -> partial``, then ``stream_reduce(chunks.with_reduce(fn, extra), combine)``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed, delayed
from tqdm.auto import tqdm

from datavalue import _blas
from datavalue.store import RowCheck, refuse_nonfinite_scores

logger = logging.getLogger(__name__)

#: Partials merged per tree node. Small enough that few partials wait in memory at once.
FAN_IN = 4

Partial = tuple[np.ndarray | None, np.ndarray]  # sparse (ids, (len(ids), m) sums) or dense (None, (m, n_groups))
#: Delayed score blocks ``(rows, m)`` with their ``[start, stop)`` positions in the selection.
Blocks = list[tuple[Delayed, int, int]]


# ----------------------------------------------------------------------------- scores
def compute_dtype(emb_dtype: np.dtype) -> np.dtype:
    """float64 embeddings are scored in float64; float32 and float16 ones in float32."""
    return np.dtype(np.float64) if np.dtype(emb_dtype) == np.float64 else np.dtype(np.float32)


def _dot(e: np.ndarray, qt: np.ndarray) -> np.ndarray:
    """``(rows, k) @ (k, m) -> (rows, m)`` in ``qt``'s dtype."""
    return e.astype(qt.dtype, copy=False) @ qt


def _dot_scaled(e: np.ndarray, qt: np.ndarray, s: np.ndarray) -> np.ndarray:
    out = _dot(e, qt)
    out *= s.astype(out.dtype, copy=False)[:, None]
    return out


def _checked(e: np.ndarray, qt: np.ndarray, pos: np.ndarray, *scale: np.ndarray, check: RowCheck) -> np.ndarray:
    """:func:`_dot` / :func:`_dot_scaled` of one block (rows ``pos``), refusing a non-finite score (its row named)."""
    out = _dot_scaled(e, qt, scale[0]) if scale else _dot(e, qt)
    refuse_nonfinite_scores(check, e, out, int(pos[0]) if pos.size else 0)
    return out


def score_rows(q: np.ndarray, emb: da.Array, row_scale: np.ndarray | None = None, *,
               check: RowCheck | None = None, start: int = 0) -> da.Array:
    """Lazy scores with occurrences as rows, ``(R, m)``: ``out[r, i] = emb[r] . q[i] * row_scale[r]``.

    Occurrence-major blocks make every per-chunk reduction work on contiguous rows; the user-facing
    ``(m, R)`` matrix is its transpose.

    Args:
        q: ``(m, k)`` test gradients.
        emb: ``(R, k)`` dask array chunked by rows.
        row_scale: optional ``(R,)`` per-row factor (TracIn's ``lr * grad_scale * weight``).
        check: refuse a block with a non-finite score, naming its row
            (:func:`datavalue.store.refuse_nonfinite_scores`; ``emb``'s first row is row ``start``).

    Returns:
        ``(R, m)`` dask array chunked like ``emb``'s rows, one chunk along ``m``.
    """
    dt = compute_dtype(emb.dtype)
    emb = emb.rechunk({1: -1})
    qt = np.ascontiguousarray(np.asarray(q, dtype=dt).T)
    qd = da.from_array(qt, chunks=qt.shape)
    if check is not None:  # each block is told its rows
        pos = da.arange(start, start + emb.shape[0], chunks=(emb.chunks[0],), dtype=np.int64)
        args: list[Any] = [pos, "i"]
        if row_scale is not None:
            args += [da.from_array(np.asarray(row_scale, dtype=np.float64), chunks=(emb.chunks[0],)), "i"]
        return da.blockwise(functools.partial(_checked, check=check), "ij", emb, "ik", qd, "kj", *args, dtype=dt,
                            concatenate=True)
    if row_scale is None:
        return da.blockwise(_dot, "ij", emb, "ik", qd, "kj", dtype=dt, concatenate=True)
    sd = da.from_array(np.asarray(row_scale, dtype=np.float64), chunks=(emb.chunks[0],))
    return da.blockwise(_dot_scaled, "ij", emb, "ik", qd, "kj", sd, "i", dtype=dt, concatenate=True)


def dask_blocks(rows: da.Array) -> Blocks:
    """:data:`Blocks` of a lazy ``(n, m)`` score array (one per row chunk), e.g. :func:`score_rows`."""
    if len(rows.chunks[1]) != 1:  # the test axis is one chunk by construction
        rows = rows.rechunk({1: -1})
    blocks = rows.to_delayed()
    edges = np.concatenate([[0], np.cumsum(rows.chunks[0])]).astype(np.int64)
    return [(blocks[j, 0], int(edges[j]), int(edges[j + 1])) for j in range(blocks.shape[0])]


def _read_scores(array: Any, qt: np.ndarray, a: int, b: int, scale: np.ndarray | None,
                 check: RowCheck | None = None) -> np.ndarray:
    """Rows ``a:b`` of the embeddings times ``qt`` ``(k, m)``: a score block ``(b - a, m)``; with
    ``check``, a non-finite score is refused, its row named."""
    rows = np.asarray(array[a:b])
    out = _dot(rows, qt)
    if scale is not None:
        out *= scale.astype(out.dtype, copy=False)[:, None]
    if check is not None:
        refuse_nonfinite_scores(check, rows, out, a)
    return out


def _chunk_apply(array: Any, qt: np.ndarray, a: int, b: int, scale: np.ndarray | None,
                 reduce: Callable[..., Any] | None, *args: Any, check: RowCheck | None = None) -> Any:
    """One fused task: read and score a chunk, then reduce the block at once (it never leaves the worker)."""
    block = _read_scores(array, qt, a, b, scale, check)
    return block if reduce is None else reduce(block, *args)


class ChunkTasks(Sequence[Delayed]):
    """Per-chunk tasks over rows ``[start, stop)`` of a zarr embeddings array, made on demand.

    Task ``j`` reads its rows itself, scores them against ``q`` and applies
    ``reduce(block, *extra(a, b))`` (``a, b``: the chunk's positions in the selection). Each task is
    a tiny independent graph (plus two shared keys: the array handle and ``q``), and tasks are
    created only when a window needs them, so the cost per chunk does not grow with the run.
    Chunk edges fall on multiples of ``chunk_rows`` counted from row 0: reads stay aligned with
    storage chunks for any step window.
    """

    def __init__(
        self,
        array: Any,
        q: np.ndarray,
        start: int,
        stop: int,
        *,
        chunk_rows: int,
        row_scale: np.ndarray | None = None,
        client: Any = None,
        reduce: Callable[..., Any] | None = None,
        extra: Callable[[int, int], tuple[Any, ...]] | None = None,
        check: RowCheck | None = None,
    ) -> None:
        self._check = check  # refuse a non-finite score, naming its row (datavalue.store.refuse_nonfinite_scores)
        self.dtype = compute_dtype(array.dtype)
        self.m = int(q.shape[0])
        qt = np.ascontiguousarray(np.asarray(q, dtype=self.dtype).T)
        self._token = uuid.uuid4().hex
        self._array: Any = delayed(array, name=f"datavalue-embeddings-{self._token}")
        if is_distributed(client):  # ship the test gradients to every worker once
            self._q: Any = client.scatter(qt, broadcast=True, hash=False)
        else:
            self._q = delayed(qt, name=f"datavalue-query-{self._token}")
        first = (start // chunk_rows + 1) * chunk_rows
        edges = [start, *range(first, stop, chunk_rows), stop] if stop > start else []
        #: ``(a, b)`` positions of every chunk in the selection (row ``start`` is position 0).
        self.bounds = [(a - start, b - start) for a, b in itertools.pairwise(edges)]
        self._start, self._scale, self._reduce, self._extra = start, row_scale, reduce, extra

    def with_reduce(self, reduce: Callable[..., Any], extra: Callable[[int, int], tuple[Any, ...]] | None = None,
                    ) -> ChunkTasks:
        """The same chunks, each reduced by ``reduce(block, *extra(a, b))`` inside its task."""
        other = object.__new__(ChunkTasks)
        other.__dict__.update(self.__dict__, _reduce=reduce, _extra=extra, _token=uuid.uuid4().hex)
        return other

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        a, b = self.bounds[j]
        scale = None if self._scale is None else self._scale[a:b]
        extra = self._extra(a, b) if self._extra is not None else ()
        return delayed(_chunk_apply)(self._array, self._q, self._start + a, self._start + b, scale, self._reduce,
                                     *extra, check=self._check, dask_key_name=f"datavalue-chunk-{self._token}-{j}")


def tree_reduce(parts: Sequence[Any], combine: Callable[..., Any], *, fan_in: int = FAN_IN, **kwargs: Any) -> Any:
    """Merge delayed partials ``fan_in`` at a time until one is left (a balanced tree)."""
    parts = list(parts)
    if not parts:
        raise ValueError("tree_reduce needs at least one partial")
    while len(parts) > 1:
        parts = [
            delayed(combine, pure=True)(*parts[i : i + fan_in], **kwargs) if i + 1 < len(parts) else parts[i]
            for i in range(0, len(parts), fan_in)
        ]
    return parts[0]


# ----------------------------------------------------------------------------- grouped sums
def segment_chunk(s: np.ndarray, groups: np.ndarray) -> Partial:
    """Sum the rows of a score block ``(rows, m)`` by group; rows with group ``-1`` are dropped.

    The partial keeps the block's dtype (a chunk sums only a few occurrences per group); partials
    are merged in float64.
    """
    keep = groups >= 0
    if not keep.all():
        s, groups = s[keep], groups[keep]
    if groups.size == 0:
        return np.zeros(0, np.int64), np.zeros((0, s.shape[1]), s.dtype)
    if np.all(groups[1:] >= groups[:-1]):  # steps and contiguous ids: no sort needed
        gs, ss = groups, s
    else:
        order = np.argsort(groups, kind="stable")
        gs, ss = groups[order], s[order]
    starts = np.flatnonzero(np.concatenate([[True], gs[1:] != gs[:-1]]))
    return gs[starts].astype(np.int64), np.add.reduceat(ss, starts, axis=0)


def combine_segments(*parts: Partial, n_groups: int) -> Partial:
    """Merge partials (float64); the result is dense once it would cover half of the groups.

    A sparse partial is ``(ids, sums)`` with ``sums`` ``(len(ids), m)``; a dense one is
    ``(None, sums)`` with ``sums`` ``(m, n_groups)``, the layout of the final result, so that
    :func:`densify` never copies it. A dense input is updated in place: every partial has exactly
    one reader (its combine task, or the driver's accumulator).
    """
    dense = [p for p in parts if p[0] is None]
    sparse = [p for p in parts if p[0] is not None]
    m = dense[0][1].shape[0] if dense else sparse[0][1].shape[1]
    n_ids = sum(len(p[0]) for p in sparse)
    if dense or 2 * n_ids > n_groups:
        out = dense[0][1] if dense else np.zeros((m, n_groups))
        for _, d in dense[1:]:
            out += d
        for ids, sums in sparse:
            out[:, ids] += sums.T  # ids are unique within a partial
        return None, out
    union = np.unique(np.concatenate([p[0] for p in sparse]))
    out = np.zeros((union.size, m))
    for ids, sums in sparse:
        out[np.searchsorted(union, ids)] += sums
    return union, out


def densify(part: Partial, n_groups: int) -> np.ndarray:
    """``(m, n_groups)`` float64 (C-contiguous) from a partial (a dense one is returned as is)."""
    ids, sums = part
    if ids is None:
        return sums
    full = np.zeros((sums.shape[1], n_groups))
    full[:, ids] = sums.T
    return full


def segment_partials(blocks: Blocks, groups: np.ndarray) -> list[Delayed]:
    """One delayed :data:`Partial` per score block, grouping its rows by ``groups`` ``(n,)``."""
    return [delayed(segment_chunk, pure=True)(blk, groups[a:b]) for blk, a, b in blocks]


def grouped_sums(rows: da.Array, groups: np.ndarray, n_groups: int, *, fan_in: int = FAN_IN) -> Delayed:
    """Lazy ``(m, n_groups)`` float64: ``out[:, g] = sum of rows[r] over r with groups[r] == g``.

    A tree of combines (for ``lazy=True`` results); eager queries use :func:`stream_reduce`.

    Args:
        rows: ``(R, m)`` lazy scores (see :func:`score_rows`).
        groups: ``(R,)`` int group index of every row, ``-1`` to leave a row out.
        n_groups: number of groups (output columns).
    """
    m = rows.shape[1]
    if n_groups == 0 or rows.shape[0] == 0:
        return delayed(np.zeros)((m, n_groups))
    root = tree_reduce(segment_partials(dask_blocks(rows), groups), combine_segments, fan_in=fan_in, n_groups=n_groups)
    return delayed(densify, pure=True)(root, n_groups)


# ----------------------------------------------------------------------------- top-k
TopPartial = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # hi_val, hi_idx, lo_val, lo_idx, each (m, k)
#: Elements per argpartition call (bounds its int64 index temporaries to 8 MiB).
SELECT_ELEMENTS = 1 << 20


def _select(vals: np.ndarray, idx: np.ndarray | None, k: int) -> TopPartial:
    """The ``k`` largest and ``k`` smallest entries of every row of ``vals`` ``(m, n)`` (unordered).

    ``idx`` ``(m, n)`` labels the entries; None means the column position. Values come back as
    float64. Works on batches of rows so that temporaries stay small; ``vals`` may be a transposed
    view (each batch is copied contiguous).
    """
    m, n = vals.shape
    kk = min(k, n)
    if idx is None:
        idx = np.broadcast_to(np.arange(n, dtype=np.int64), (m, n))
    hv, lv = np.empty((m, kk)), np.empty((m, kk))
    hi, li = np.empty((m, kk), np.int64), np.empty((m, kk), np.int64)
    take = np.take_along_axis
    step = max(1, SELECT_ELEMENTS // max(n, 1))
    for a in range(0, m, step):
        v, ix = np.ascontiguousarray(vals[a : a + step]), idx[a : a + step]
        if kk == n:
            hv[a : a + step], hi[a : a + step] = v, ix
            lv[a : a + step], li[a : a + step] = v, ix
            continue
        top = np.argpartition(v, n - kk, axis=1)[:, n - kk :]
        hv[a : a + step], hi[a : a + step] = take(v, top, 1), take(ix, top, 1)
        bot = np.argpartition(v, kk - 1, axis=1)[:, :kk]
        lv[a : a + step], li[a : a + step] = take(v, bot, 1), take(ix, bot, 1)
    return hv, hi, lv, li


def topk_chunk(s: np.ndarray, offset: int, k: int) -> TopPartial:
    """Top-k partial of a score block ``(rows, m)``; indices are global row positions."""
    hv, hi, lv, li = _select(s.T, None, k)
    return hv, hi + offset, lv, li + offset


def combine_top_k(*parts: TopPartial, k: int) -> TopPartial:
    """Merge top-k partials: the top/bottom ``k`` of their union."""
    hv, hi, _, _ = _select(np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1), k)
    _, _, lv, li = _select(np.concatenate([p[2] for p in parts], 1), np.concatenate([p[3] for p in parts], 1), k)
    return hv, hi, lv, li


def finalize_top_k(part: TopPartial, k: int) -> TopPartial:
    """Sort: helpful by decreasing score, harmful by increasing score; keep ``k`` of each."""
    hv, hi, lv, li = part
    oh = np.argsort(-hv, axis=1, kind="stable")[:, :k]
    ol = np.argsort(lv, axis=1, kind="stable")[:, :k]
    take = np.take_along_axis
    return take(hv, oh, 1), take(hi, oh, 1), take(lv, ol, 1), take(li, ol, 1)


def top_k_partials(blocks: Blocks, k: int) -> list[Delayed]:
    """One delayed :data:`TopPartial` per score block; indices are positions in the selection."""
    return [delayed(topk_chunk, pure=True)(blk, a, k) for blk, a, _ in blocks]


def dense_top_k(scores: np.ndarray, k: int) -> TopPartial:
    """Top-k of an in-memory ``(m, n)`` matrix (aggregated scores)."""
    return finalize_top_k(_select(np.asarray(scores), None, k), k)


# ----------------------------------------------------------------------------- running
def is_distributed(client: Any) -> bool:
    """Whether ``client`` is a ``dask.distributed.Client`` (without importing distributed eagerly)."""
    return client is not None and not isinstance(client, str) and hasattr(client, "compute") and hasattr(client, "scheduler")


def n_threads(client: Any) -> int:
    """Worker threads the computation will run on."""
    if is_distributed(client):
        return max(1, sum(client.nthreads().values()))
    if client in ("synchronous", "sync", "single-threaded"):
        return 1
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def _window_results(windows: Iterable[list[Delayed]], client: Any) -> Iterator[list[Any]]:
    """Compute windows of delayed objects in order, the next one while the caller folds the last.

    Two windows are in flight at most: the one being consumed and the one being computed.
    Windows are pulled from the iterable only when they are submitted. Locally the windows are
    computed on this generator's own threads (dask's threaded scheduler on a pool it is handed, not
    one dask keeps per calling thread), joined when the generator ends or is closed: close it
    (``contextlib.closing``) where the caller may stop early.
    """
    it = iter(windows)
    first = next(it, None)
    if first is None:
        return
    if is_distributed(client):
        futs = client.compute(first)
        while futs is not None:
            nxt_w = next(it, None)
            nxt = client.compute(nxt_w) if nxt_w is not None else None
            res = client.gather(futs)
            del futs
            yield res
            futs = nxt
        return
    scheduler = client if isinstance(client, str) else "threads"
    kw: dict[str, Any] = {"scheduler": scheduler}
    with contextlib.ExitStack() as owned:
        if scheduler in ("threads", "threading"):
            kw["pool"] = owned.enter_context(
                concurrent.futures.ThreadPoolExecutor(n_threads(client), thread_name_prefix="datavalue-score")
            )
        # entered last, closed first: the window in flight finishes before the scoring pool stops
        pool = owned.enter_context(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="datavalue-query"))
        fut: Any = pool.submit(dask.compute, *first, **kw)
        try:
            while fut is not None:
                res = list(fut.result())
                nxt_w = next(it, None)
                fut = pool.submit(dask.compute, *nxt_w, **kw) if nxt_w is not None else None
                yield res
        finally:
            if fut is not None:  # closed early: no result wanted from the window in flight
                fut.cancel()


@contextlib.contextmanager
def one_blas_thread(client: Any) -> Iterator[None]:
    """Limit BLAS to one thread while chunks are scored on several local dask threads.

    Each thread's ``(rows, k) @ (k, m)`` product is memory-bound; BLAS threads on top of dask's
    oversubscribe the cores (measured on 2 cores, in-memory run: 1.2 GB/s with BLAS's default
    threads, 2.0 GB/s with one; ``benchmarks/query_bandwidth.py``). Distributed workers already
    start with one BLAS thread; a single-threaded scheduler keeps BLAS's own threads.
    """
    if is_distributed(client) or n_threads(client) <= 1:
        yield
        return
    with _blas.one_blas_thread():
        yield


def stream_reduce(
    parts: Sequence[Delayed],
    combine: Callable[..., Any],
    *,
    client: Any = None,
    progress: bool = True,
    desc: str = "datavalue query",
    window: int | None = None,
    partial_bytes: int = 0,
    init: Any = None,
    **kwargs: Any,
) -> Any:
    """Reduce delayed per-chunk partials with bounded memory; returns the combined partial.

    Chunks are computed a *window* at a time (default one chunk per worker thread; the next window
    is computed while the driver folds the last) and folded into one accumulator on the driver:
    ``acc = combine(acc, partial)``. With a distributed client each window (two chunks per worker
    thread) is first merged by one ``combine`` task on the workers, so one partial per window
    crosses the network. Peak memory is about ``2 * window * (chunk + partial) + accumulator``,
    however long the run. Windows grow past one chunk per thread while their partials
    (``partial_bytes`` each, if given) fit in :data:`WINDOW_BYTES`: fewer, larger submissions.
    ``init`` starts the accumulator (e.g. a dense zero partial, so that every fold is a scatter-add
    instead of a merge of growing sparse partials).
    """
    if not parts:
        raise ValueError("stream_reduce needs at least one partial")
    dist = is_distributed(client)
    width = window or _window(client, partial_bytes)
    windows: Iterable[list[Delayed]] = (list(parts[i : i + width]) for i in range(0, len(parts), width))
    if dist:  # merge each window on the workers first
        windows = ([delayed(combine, pure=True)(*w, **kwargs)] if len(w) > 1 else w for w in windows)
    acc: Any = init
    done = 0
    with (
        one_blas_thread(client),
        tqdm(total=len(parts), desc=desc, unit="chunk", disable=not progress, leave=False) as bar,
        contextlib.closing(_window_results(windows, client)) as computed,  # joins its threads first
    ):
        for results in computed:
            while results:
                res = results.pop(0)
                acc = res if acc is None else combine(acc, res, **kwargs)
            n = min(width, len(parts) - done)
            done += n
            bar.update(n)
    return acc


def stream_blocks(chunks: ChunkTasks, *, client: Any = None, progress: bool = True, desc: str = "scores",
                  ) -> np.ndarray:
    """Compute every chunk's score block ``(rows, m)`` into one preallocated ``(m, n)`` array."""
    n = chunks.bounds[-1][1] if len(chunks) else 0
    out = np.empty((chunks.m, n), dtype=chunks.dtype)
    rows = max((b - a for a, b in chunks.bounds), default=0)
    width = _window(client, rows * chunks.m * chunks.dtype.itemsize)
    starts = range(0, len(chunks), width)
    with (
        one_blas_thread(client),
        tqdm(total=len(chunks), desc=desc, unit="chunk", disable=not progress, leave=False) as bar,
        contextlib.closing(_window_results((chunks[i : i + width] for i in starts), client)) as computed,
    ):
        for i, vals in zip(starts, computed, strict=True):
            for (a, b), v in zip(chunks.bounds[i : i + width], vals, strict=True):
                out[:, a:b] = v.T
            bar.update(len(vals))
    return out


#: Memory a window's partials may take before windows stop growing past one chunk per thread.
WINDOW_BYTES = 16 << 20
MAX_WINDOW = 256


def _window(client: Any, partial_bytes: int) -> int:
    threads = n_threads(client) * (2 if is_distributed(client) else 1)
    if partial_bytes <= 0:
        return threads
    return max(threads, min(MAX_WINDOW, WINDOW_BYTES // partial_bytes))
