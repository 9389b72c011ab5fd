"""One place that holds the BLAS library to a single thread while our own threads share the work.

BLAS threads spin-wait between calls; next to the threads the engines run themselves (dask's
scoring threads, the scan's row reader, writer and row-split GEMM pool) they oversubscribe the
cores. Measured on 2 cores: a build of 4 blocks of 64 ran at 3,200 occurrences/s on OpenBLAS's
own threads and 131,000 on one; in-memory queries at 1.2 vs 2.0 GB/s (docs/results/performance.md).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np


def one_blas_thread() -> Any:
    """Context manager: BLAS (OpenBLAS/MKL/BLIS, via threadpoolctl) on one thread inside it."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


# ---------------------------------------------------------------------- a GEMM that releases the GIL
#
# ``C <- alpha op(A) op(B) + beta C`` straight into ``C``. numpy's ``matmul`` runs in parallel from
# several threads but has no ``beta`` (an in-place ``M -= X.T @ Y`` needs a temporary and one more pass
# over M); scipy's ``sgemm`` has ``beta`` but, called from two threads on its own OpenBLAS, ran the two
# halves of an update one after the other (docs/results/performance.md). ctypes releases the GIL around
# foreign calls, so the CBLAS ``gemm`` of the OpenBLAS that numpy itself loaded gives both. Where that
# library cannot be found (MKL or Accelerate builds, other OpenBLAS symbol names) or fails its
# self-check, :func:`gemm_nogil` returns ``False`` and callers keep numpy.


_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
#: Where the GEMM came from (library path, symbol names, integer type), once found.
SOURCE: dict[str, Any] = {}


@functools.lru_cache(maxsize=1)
def _cblas() -> dict[np.dtype, Any] | None:
    try:
        from threadpoolctl import threadpool_info

        libs = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
        libs.sort(key=lambda i: "numpy" not in str(i.get("filepath", "")))  # numpy's own first
        for info in libs:
            lib = ctypes.CDLL(str(info["filepath"]))
            for sym_s, sym_d, cfg in (("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_", "scipy_openblas_get_config64_"),
                                      ("cblas_sgemm64_", "cblas_dgemm64_", "openblas_get_config64_"),
                                      ("scipy_cblas_sgemm", "scipy_cblas_dgemm", "scipy_openblas_get_config"),
                                      ("cblas_sgemm", "cblas_dgemm", "openblas_get_config")):
                fs, fd, fc = (getattr(lib, n, None) for n in (sym_s, sym_d, cfg))
                if fs is None or fd is None or fc is None:
                    continue
                # the integer width comes from the build itself (an ILP64 build may export unsuffixed names):
                # a wrong width would be a crash, not a failed self-check
                fc.restype, fc.argtypes = ctypes.c_char_p, []
                int_t = ctypes.c_int64 if b"USE64BITINT" in (fc() or b"") else ctypes.c_int
                out: dict[np.dtype, Any] = {}
                for f, real in ((fs, ctypes.c_float), (fd, ctypes.c_double)):
                    f.restype = None
                    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, int_t, int_t, int_t, real,
                                  ctypes.c_void_p, int_t, ctypes.c_void_p, int_t, real, ctypes.c_void_p, int_t]
                    out[np.dtype(np.float32 if real is ctypes.c_float else np.float64)] = f
                if _self_check(out):
                    SOURCE.update(path=str(info["filepath"]), symbols=(sym_s, sym_d), int_t=int_t)
                    return out
    except Exception:  # pragma: no cover - any surprise: numpy path
        return None
    return None


def _call(f: Any, C: np.ndarray, A: np.ndarray, B: np.ndarray, alpha: float, beta: float, trans_a: bool,
          trans_b: bool = False) -> None:
    m, n = C.shape
    kk = A.shape[0] if trans_a else A.shape[1]
    f(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS, m, n, kk, alpha,
      A.ctypes.data, A.strides[0] // A.itemsize, B.ctypes.data, B.strides[0] // B.itemsize,
      beta, C.ctypes.data, C.strides[0] // C.itemsize)


def _self_check(fns: dict[np.dtype, Any]) -> bool:
    rng = np.random.default_rng(0)
    for dt, f in fns.items():
        A = rng.standard_normal((5, 8)).astype(dt)[:, 1:7]  # a view with leading dimension 8
        B = rng.standard_normal((5, 3)).astype(dt)
        C = rng.standard_normal((6, 3)).astype(dt)
        want = C - 2.0 * (A.T @ B)
        _call(f, C, A, B, -2.0, 1.0, True)
        Bt = np.ascontiguousarray(B.T)
        want2 = 0.5 * (A.T @ B)
        C2 = np.full_like(want2, np.nan)  # beta = 0 must not read C
        _call(f, C2, A, Bt, 0.5, 0.0, True, True)
        if not (np.allclose(C, want, rtol=1e-4, atol=1e-4) and np.allclose(C2, want2, rtol=1e-4, atol=1e-4)):
            return False
    return True


def _row_major(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.strides[1] == a.itemsize and a.strides[0] >= a.shape[1] * a.itemsize


def gemm_nogil(C: np.ndarray, A: np.ndarray, B: np.ndarray, *, alpha: float = 1.0, beta: float = 0.0,
               trans_a: bool = False, trans_b: bool = False) -> bool:
    """``C <- alpha op(A) @ op(B) + beta C`` in place without holding the GIL; ``op(X) = X.T`` with
    ``trans_a`` / ``trans_b`` (``A``, ``B`` given as stored).

    Returns ``False`` (and does nothing) when it cannot: no usable CBLAS, mixed or non-float dtypes,
    arrays whose rows are not contiguous, empty shapes; the caller then uses numpy.

    Example:
        >>> C = np.zeros((2, 2))
        >>> ok = gemm_nogil(C, np.eye(2), np.array([[1.0, 2.0], [3.0, 4.0]]), alpha=2.0)
        >>> C.tolist() if ok else [[2.0, 4.0], [6.0, 8.0]]
        [[2.0, 4.0], [6.0, 8.0]]
    """
    fns = _cblas()
    if fns is None or not (C.dtype == A.dtype == B.dtype) or C.dtype not in fns:
        return False
    if not (_row_major(C) and _row_major(A) and _row_major(B)) or not C.flags.writeable:
        return False
    rows_a, cols_a = (A.shape[1], A.shape[0]) if trans_a else A.shape
    rows_b, cols_b = (B.shape[1], B.shape[0]) if trans_b else B.shape
    if C.shape != (rows_a, cols_b) or cols_a != rows_b or 0 in C.shape or cols_a == 0:
        return False
    _call(fns[C.dtype], C, A, B, float(alpha), float(beta), trans_a, trans_b)
    return True

