"""The GEMM layer of the recursion: in-place products, and the threads that share them.

The streaming scan runs its GEMMs next to a row reader and a chunk writer thread. BLAS's own threads
spin-wait between calls and starve those threads (measured on 2 cores: a 2048-wide operator ran
at 3,041 occurrences/s on 2 OpenBLAS threads, 4,531 on one). Instead the scan keeps BLAS at one
thread and, for wide operators, splits each GEMM by rows of the operator over a small pool of
Python threads that block (not spin) between steps. Measured in a real build (one 2048-wide
operator, b = 128, float32, 300 steps, median of 3): 4,715 occurrences/s unsplit, 5,831 split.

The pool belongs to the :func:`gemm_threads` context that a build enters around its scan: the
context creates it, the GEMMs and :func:`run_threads` of the thread that entered it use it, and
leaving the context shuts it down and joins its threads. Outside such a context every product runs
on the calling thread and no thread is started.

Example:
    >>> M, X = np.zeros((2, 2)), np.array([[1.0, 2.0]])
    >>> with gemm_threads(2):
    ...     sub_outer(M, X, X)
    >>> M.tolist()
    [[-1.0, -2.0], [-2.0, -4.0]]
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from datavalue._blas import gemm_nogil

__all__ = ["SPLIT_MIN", "gemm_threads", "gemm_thread_count", "run_threads", "sub_outer", "matmul_T"]

#: Operators narrower than this are never split (the GEMMs are too small to share).
SPLIT_MIN = 512

# This thread's setting: ``n`` (threads to split over) and ``pool`` (the context's executor), set by
# gemm_threads; ``bufs``: this thread's scratch arrays (see _buffer).
_GEMM = threading.local()


@contextlib.contextmanager
def gemm_threads(n: int) -> Iterator[None]:
    """Within the context, split the GEMMs of operators at least :data:`SPLIT_MIN` wide over
    ``n`` threads (this thread only; BLAS itself should run one thread, see ``threadpoolctl``).

    The context owns the pool of ``n`` threads (started on first use) and joins them when it ends.
    """
    old_n, old_pool = getattr(_GEMM, "n", 1), getattr(_GEMM, "pool", None)
    n = max(1, int(n))
    pool = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="datavalue-gemm") if n > 1 else None
    _GEMM.n, _GEMM.pool = n, pool
    try:
        yield
    finally:
        _GEMM.n, _GEMM.pool = old_n, old_pool
        if pool is not None:
            pool.shutdown(wait=True)


def gemm_thread_count() -> int:
    """The thread count set by :func:`gemm_threads` for this thread (1 outside it)."""
    return int(getattr(_GEMM, "n", 1))


def run_threads(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run zero-argument callables on the pool of :func:`gemm_threads` (at most
    :func:`gemm_thread_count` at once; the callers' GEMMs release the GIL), results in order. Outside
    the context, or for one callable, they run here one after the other."""
    pool: concurrent.futures.ThreadPoolExecutor | None = getattr(_GEMM, "pool", None)
    if pool is None or len(fns) <= 1:
        return [f() for f in fns]
    return list(pool.map(lambda f: f(), fns))


def _parts(rows: int) -> list[tuple[int, int]] | None:
    n = gemm_thread_count()
    if n <= 1 or rows < SPLIT_MIN:
        return None
    edges = np.linspace(0, rows, n + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _map(fn: Callable[[int, int], Any], parts: list[tuple[int, int]]) -> list[Any]:
    pool: concurrent.futures.ThreadPoolExecutor | None = getattr(_GEMM, "pool", None)
    if pool is None:  # parts come from _parts, which splits only inside gemm_threads
        return [fn(a, b) for a, b in parts]
    return list(pool.map(lambda ab: fn(*ab), parts))


def sub_outer(M: np.ndarray, X: np.ndarray, Y: np.ndarray, alpha: float = 1.0) -> None:
    """``M -= alpha X.T @ Y`` in place: one BLAS GEMM with beta=1 (no temporary) on one thread; split
    by rows of ``M`` inside :func:`gemm_threads`. A torch ``M``: see :func:`_torch_sub_outer`."""
    if not isinstance(M, np.ndarray):
        _torch_sub_outer(M, X, Y, -float(alpha))
        return
    if M.flags.c_contiguous and M.dtype in (np.float64, np.float32) and X.shape[0]:
        X = np.ascontiguousarray(X, dtype=M.dtype)
        Y = np.ascontiguousarray(Y, dtype=M.dtype)
        parts = _parts(M.shape[0])
        if parts is None:
            if gemm_nogil(M, X, Y, alpha=-float(alpha), beta=1.0, trans_a=True):
                return
            from scipy.linalg import blas  # imported on first use only (0.15 s)

            gemm = blas.dgemm if M.dtype == np.float64 else blas.sgemm
            # C-contiguous M is the Fortran-ordered M.T:  M.T <- M.T - Y.T @ X
            gemm(-float(alpha), Y, X, beta=1.0, c=M.T, trans_a=1, overwrite_c=1)
            return
        # scipy's sgemm (its own OpenBLAS) does not run in parallel from two threads (two halves of a
        # 2048-wide float32 update: 12.0 ms one after the other, 13.8 ms on two threads). numpy's
        # OpenBLAS called through ctypes does (10.3 / 6.0 ms) and accumulates in place
        # (datavalue._blas.gemm_nogil); without it, numpy's matmul into a per-thread buffer plus an
        # in-place subtraction (one extra pass over the part's rows).
        def part(a: int, b: int) -> None:
            if gemm_nogil(M[a:b], X[:, a:b], Y, alpha=-float(alpha), beta=1.0, trans_a=True):
                return
            buf = _buffer((b - a, M.shape[1]), M.dtype)
            np.matmul(X[:, a:b].T, Y, out=buf)
            if alpha != 1.0:
                buf *= alpha
            M[a:b] -= buf

        _map(part, parts)
        return
    M -= alpha * (X.T @ Y)


def _buffer(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """A reusable scratch array of this thread (no page faults per step for a large temporary)."""
    bufs = getattr(_GEMM, "bufs", None)
    if bufs is None:
        bufs = _GEMM.bufs = {}
    key = (shape, np.dtype(dtype).str)
    buf = bufs.get(key)
    if buf is None:
        bufs.clear()  # keep one shape per thread
        buf = bufs[key] = np.empty(shape, dtype=dtype)
    return buf


def matmul_T(X: np.ndarray, M: np.ndarray, *, alpha: float = 1.0, minus: np.ndarray | None = None) -> np.ndarray:
    """``alpha (X @ M.T - minus @ Theta0.T)`` (rows, M.shape[0]), split by rows of ``M`` inside
    :func:`gemm_threads`; ``minus`` (rows, k <= M.shape[0]) fills the output first and the GEMM
    accumulates onto it (one pass instead of a subtraction and a scaling). Torch tensors: see
    :func:`_torch_matmul_T`."""
    if not isinstance(M, np.ndarray):
        return _torch_matmul_T(X, M, float(alpha), minus)
    parts = _parts(M.shape[0])
    if parts is None:
        out = X @ M.T
        if minus is not None:
            out[:, : minus.shape[1]] -= minus
        if alpha != 1.0:
            out *= alpha
        return out
    dtype = np.result_type(X, M)
    out = np.empty((X.shape[0], M.shape[0]), dtype=dtype)
    X = np.ascontiguousarray(X, dtype=dtype)
    if minus is not None:
        np.multiply(minus, -alpha, out=out[:, : minus.shape[1]])
    if minus is None or minus.shape[1] < out.shape[1]:
        out[:, 0 if minus is None else minus.shape[1] :] = 0.0

    def part(a: int, b: int) -> None:  # straight into the output's columns: no concatenation copy
        if not gemm_nogil(out[:, a:b], X, M[a:b], alpha=alpha, beta=1.0, trans_b=True):
            out[:, a:b] += alpha * (X @ M[a:b].T)

    _map(part, parts)
    return out


# ---------------------------------------------------------------------- torch tensors (the torch backend)
#
# On a GPU one kernel per product. On a CPU the same reasoning as for BLAS holds for torch's OpenMP
# threads (they spin between calls; measured on a loaded 2-core machine: a step's two GEMMs at
# k = 1024, float32, 32 ms on torch's 2 threads, 9.8 ms on one): the scan holds torch at one
# thread (:meth:`datavalue.embeddings._backend.TorchBackend.scan_threads`) and splits the products
# by rows of the operator over the pool of :func:`gemm_threads`, like numpy's.


def _torch_parts(M: Any) -> list[tuple[int, int]] | None:
    return _parts(M.shape[0]) if M.device.type == "cpu" else None


def _torch_sub_outer(M: Any, X: Any, Y: Any, alpha: float) -> None:
    """``M += alpha X.T @ Y`` in place (torch ``addmm_``), split by rows of ``M`` on a CPU."""
    if not X.shape[0]:
        return
    parts = _torch_parts(M)
    if parts is None:
        M.addmm_(X.T, Y, alpha=alpha)
        return
    _map(lambda a, b: M[a:b].addmm_(X[:, a:b].T, Y, alpha=alpha), parts)


def _torch_matmul_T(X: Any, M: Any, alpha: float, minus: Any) -> Any:
    """:func:`matmul_T` on torch: one fused ``addmm`` (``minus`` as the ``beta`` term), split by rows of
    ``M`` (columns of the output) on a CPU."""
    n, rows = M.shape[0], X.shape[0]
    parts = _torch_parts(M)
    if parts is None:
        if minus is not None and minus.shape[1] == n:
            return minus.addmm(X, M.T, beta=-alpha, alpha=alpha)
        out = X @ M.T
        if minus is not None:
            out[:, : minus.shape[1]] -= minus
        if alpha != 1.0:
            out *= alpha
        return out
    # the transposed output's rows are the parts: each thread writes a contiguous slab
    outT = M.new_zeros((n, rows))
    k = 0 if minus is None else minus.shape[1]

    def part(a: int, b: int) -> None:
        if a < k:
            c = min(b, k)
            outT[a:c].copy_(minus[:, a:c].T).mul_(-alpha)
        outT[a:b].addmm_(M[a:b], X.T, alpha=alpha)

    _map(part, parts)
    return outT.T
