"""Reverse row windows and chunk-owned writes of the streamed recursion (:mod:`._stream`).

:class:`_ReverseRows` reads a run's rows in windows from the end (with read-ahead);
:class:`_OnDevice` moves each window to the backend's device once; :class:`_ChunkWriter` writes the
output chunks a task owns entirely and hands back the pieces of chunks shared with a neighbouring
segment, which the driver joins with :func:`_write_pieces`, so no two writers touch one chunk.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from datavalue.embeddings._backend import Backend, get_backend
from datavalue.errors import EmbeddingError, NonFiniteError, StoreNotFoundError
from datavalue.store import ChunkFileRows, chunk_dir, fast_rows, write_chunk

logger = logging.getLogger(__name__)


class _ReverseRows:
    """Rows of a store array, read in windows from the end toward the start (chunk aligned).

    A local run's row arrays are read straight from their chunk files, checksums verified (zarr's
    read path took 2.3 ms of a 17 ms step in a 2048-wide build, much of it waiting for the GIL), and
    the next window is read ahead on a background thread while the scan runs its GEMMs. The reader
    owns that thread: :meth:`close` (or leaving ``with``) waits for a read in flight and joins it.
    """

    def __init__(self, run: Any, name: str, lo: int, window: int, chunk: int) -> None:
        self.run, self.name, self.lo = run, name, int(lo)
        self.window, self.chunk = max(int(window), 1), max(int(chunk), 1)
        self.c0 = self.c1 = 0
        self.buf: np.ndarray | None = None
        try:
            fast = fast_rows(run.array(name))  # one lookup (a zarr store round trip)
        except StoreNotFoundError:
            fast = None  # run.read names the missing array
        self.fast = fast if isinstance(fast, ChunkFileRows) else None
        self.ahead: tuple[int, int, concurrent.futures.Future[np.ndarray]] | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # started by the first read-ahead

    def __enter__(self) -> _ReverseRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the read-ahead (waiting for a read in flight) and join the reader's thread. Idempotent."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            ahead[2].cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _start(self, r1: int) -> int:
        return max(((r1 - self.window) // self.chunk) * self.chunk, self.lo)

    def _read(self, a: int, b: int) -> np.ndarray:
        buf = self.fast[a:b] if self.fast is not None else np.asarray(self.run.read(self.name, a, b))
        if buf.shape[0] != b - a:
            raise EmbeddingError(f"{self.run.path}: {self.name}[{a}:{b}] returned {buf.shape[0]} rows.")
        return buf

    def get(self, r0: int, r1: int) -> np.ndarray:
        if self.buf is None or not (self.c0 <= r0 and r1 <= self.c1):
            ahead, self.ahead = self.ahead, None
            if ahead is not None and ahead[0] <= r0 and r1 <= ahead[1]:
                self.c0, self.c1 = ahead[0], ahead[1]
                self.buf = ahead[2].result()
            else:
                if ahead is not None:
                    ahead[2].cancel()
                start = min(self._start(r1), r0)
                self.buf, self.c0, self.c1 = self._read(start, r1), start, r1
            if self.fast is not None and self.c0 > self.lo:  # read the window before this one meanwhile
                a = self._start(self.c0)
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="datavalue-readahead")
                self.ahead = (a, self.c0, self._pool.submit(self._read, a, self.c0))
        return self.buf[r0 - self.c0 : r1 - self.c0]


class _OnDevice:
    """A reverse reader whose current window is moved to the backend's device once per window (in the
    build's dtype); :meth:`get` gives the rows both on the host (for the checks) and on the device. On
    numpy both are the reader's own rows."""

    def __init__(self, rows: _ReverseRows, xp: Backend, dtype: str) -> None:
        self.rows, self.xp, self.dtype = rows, xp, dtype
        self._src: np.ndarray | None = None
        self._dev: Any = None

    def get(self, r0: int, r1: int) -> tuple[np.ndarray, Any]:
        host = self.rows.get(r0, r1)
        if self.xp.is_numpy:
            return host, host
        if self.rows.buf is not self._src:  # a new window: one host-to-device copy
            self._src = self.rows.buf
            self._dev = self.xp.asarray(self._src, self.dtype)
        return host, self._dev[r0 - self.rows.c0 : r1 - self.rows.c0]


class _PooledFisher:
    """Step ``t``'s true-Fisher rows pooled over the steps ``max(0, t - W) .. min(T - 1, t + W)``
    (``W = plan.fisher_window``; ``T = plan.fisher_end`` when set), each step's rows scaled by ``1 / sqrt(n_t)`` with ``n_t`` the number of
    steps pooled, so the pooled rows' Gram is the mean of those steps' Fisher matrices (a step's own
    rows already carry ``1 / sqrt(fisher_samples)``: their Gram is its Fisher).

    Steps are requested in decreasing order (the scan runs backward); each step's rows are read once,
    from one reverse reader over the steps ``max(0, lo - W) .. min(T, hi + W)`` (beyond the scan's own
    range ``[lo, hi)``, so a segment pools as the whole scan does), checked, kept in float64 while a
    later request may still pool them, then dropped. :meth:`get` gives the pooled rows on the host
    and on ``xp``'s device, as :class:`_OnDevice` does. Why: one sampled label per position leaves a
    step's ``k x k`` operator fitted from a few noisy rank-one terms (docs/results/lm.md)."""

    def __init__(self, run: Any, plan: Any, lo: int, hi: int, chunk: int, xp: Backend) -> None:
        self.plan, self.xp = plan, xp
        self.W, self.T = int(plan.fisher_window), int(plan.fisher_end or plan.n_steps)
        self.ptr = plan.fisher_ptr
        self.next = min(self.T - 1, int(hi) - 1 + self.W)  # the next (lower) step to read
        self.rows = _ReverseRows(run, "fisher", int(self.ptr[max(0, int(lo) - self.W)]), plan.window, chunk)
        self.cache: dict[int, np.ndarray] = {}

    def __enter__(self) -> _PooledFisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.rows.close()

    def get(self, t: int) -> tuple[np.ndarray, Any]:
        first, last = max(0, t - self.W), min(self.T - 1, t + self.W)
        while self.next >= first:
            s = self.next
            F = np.array(self.rows.get(int(self.ptr[s]), int(self.ptr[s + 1])), dtype=np.float64)
            if not np.isfinite(F).all():
                raise NonFiniteError(
                    f"{self.plan.path}: step {s}: non-finite Fisher pseudo-gradient rows in the store "
                    f"(pooled into steps {max(0, s - self.W)}..{min(self.T - 1, s + self.W)} by fisher_window="
                    f"{self.W})."
                )
            self.cache[s] = F
            self.next -= 1
        for s in [s for s in self.cache if s > last]:
            del self.cache[s]
        parts = [self.cache[s] for s in range(first, last + 1)]
        host = np.concatenate(parts, axis=0) * (1.0 / np.sqrt(len(parts)))
        if self.xp.is_numpy:
            return host, host
        return host, self.xp.asarray(host, self.plan.dtype)


class _ChunkWriter:
    """Buffers output rows of one task by output chunk; writes the chunks the task owns entirely,
    returns the pieces of shared chunks (``(row0, values, v_values)``) for the driver. On the torch
    backend the chunk buffers live on the device and come back to the host once per chunk."""

    def __init__(self, arrays: Sequence[Any], lo: int, hi: int, n_rows: int, chunk: int,
                 xp: Backend | None = None) -> None:
        self.xp = xp if xp is not None else get_backend(None)
        self.arrays = list(arrays)
        self.lo, self.hi, self.n_rows, self.chunk = lo, hi, n_rows, chunk
        self.buf: dict[int, list[np.ndarray]] = {}
        self.fill: dict[int, int] = {}
        self.pieces: list[tuple[int, list[np.ndarray]]] = []
        # Full chunks are written by one background thread (at most 2 waiting), so that encoding and
        # file I/O overlap the next steps' GEMMs, which release the GIL. Measured on a 2048-wide
        # float32 build (400 steps, b=128): writes took 2.3 ms of a 20 ms step on the scan thread.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="datavalue-embwrite")
        self._pending: list[concurrent.futures.Future[None]] = []
        # Local arrays with the run's plain layout get their chunk files written directly (the
        # store writer's encoder): zarr's write path runs Python on the writer thread, which took
        # the GIL from the scan thread between its GEMMs.
        self._direct = [_direct_dir(arr, chunk) for arr in self.arrays]

    def _write(self, c0: int, c1: int, bufs: list[np.ndarray]) -> None:
        bufs = [self.xp.to_numpy(b) for b in bufs]  # the chunk's one device-to-host copy (numpy: none)

        def write() -> None:
            for arr, data, direct in zip(self.arrays, bufs, self._direct, strict=True):
                if direct is None:
                    arr[c0:c1] = data
                else:
                    write_chunk(direct, c0 // self.chunk, np.asarray(data, dtype=arr.dtype), self.chunk)

        for f in [f for f in self._pending if f.done()]:
            f.result()  # raises a failed write
            self._pending.remove(f)
        while len(self._pending) >= 2:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(write))

    def _span(self, ci: int) -> tuple[int, int]:
        return ci * self.chunk, min((ci + 1) * self.chunk, self.n_rows)

    def put(self, r0: int, parts: Sequence[np.ndarray]) -> None:
        r1 = r0 + parts[0].shape[0]
        for ci in range(
            r0 // self.chunk, (r1 - 1) // self.chunk + 1 if r1 > r0 else r0 // self.chunk
        ):
            c0, c1 = self._span(ci)
            a, b = max(c0, r0), min(c1, r1)
            if ci not in self.buf:
                self.buf[ci] = [
                    self.xp.zeros((c1 - c0, p.shape[1]), arr.dtype)
                    for p, arr in zip(parts, self.arrays, strict=True)
                ]
                self.fill[ci] = 0
            for dst, src in zip(self.buf[ci], parts, strict=True):
                dst[a - c0 : b - c0] = src[a - r0 : b - r0]
            self.fill[ci] += b - a
            mine0, mine1 = max(c0, self.lo), min(c1, self.hi)
            if self.fill[ci] == mine1 - mine0:
                bufs = self.buf.pop(ci)
                del self.fill[ci]
                if mine0 == c0 and mine1 == c1:
                    self._write(c0, c1, bufs)
                else:
                    self.pieces.append((mine0, [self.xp.to_numpy(d[mine0 - c0 : mine1 - c0]) for d in bufs]))

    def close(self) -> list[tuple[int, list[np.ndarray]]]:
        """Wait for the chunk writes (raising the first error), join the writer thread and return
        the pieces of shared chunks."""
        try:
            for f in self._pending:
                f.result()  # raises the first write error
        finally:
            self.shutdown()
        if self.buf:
            raise EmbeddingError(
                f"internal: output chunks {sorted(self.buf)} were left incomplete."
            )
        return self.pieces

    def shutdown(self) -> None:
        """Stop without a result (a failed scan): drop the writes not started, wait for the one in
        flight (no write lands after the scan has ended) and join the writer thread. Idempotent."""
        self._pending = []
        self._pool.shutdown(wait=True, cancel_futures=True)


def _direct_dir(arr: Any, chunk: int) -> Any:
    """The chunk directory of a local 2-D array with the run's plain layout and row chunks of
    ``chunk`` rows, or ``None`` (then zarr writes it)."""
    directory = chunk_dir(arr)
    if directory is not None and len(arr.shape) == 2 and int(arr.chunks[0]) == chunk:
        return directory
    return None


def _write_pieces(
    arrays: Sequence[Any], pieces: Sequence[tuple[int, list[np.ndarray]]], chunk: int
) -> None:
    """Driver side: merge the pieces of shared chunks and write each chunk once."""
    by_chunk: dict[int, list[tuple[int, list[np.ndarray]]]] = {}
    for r0, parts in pieces:
        by_chunk.setdefault(r0 // chunk, []).append((r0, parts))
    for ci, group in by_chunk.items():
        c0 = ci * chunk
        c1 = min(c0 + chunk, arrays[0].shape[0])
        datas = [np.asarray(arr[c0:c1]) for arr in arrays]
        for r0, parts in group:
            for d, p in zip(datas, parts, strict=True):
                d[r0 - c0 : r0 - c0 + p.shape[0]] = p
        for arr, d in zip(arrays, datas, strict=True):
            arr[c0:c1] = d
