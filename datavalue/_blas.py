"""One place that holds the BLAS library to a single thread while our own threads share the work.

BLAS threads spin-wait between calls; next to the threads the engines run themselves (dask's
scoring threads, the scan's row reader, writer and row-split GEMM pool) they oversubscribe the
cores. Measured on 2 cores: a build of 4 blocks of 64 ran at 3,200 occurrences/s on OpenBLAS's
own threads and 131,000 on one; in-memory queries at 1.2 vs 2.0 GB/s (docs/results/performance.md).
"""

from __future__ import annotations

from typing import Any


def one_blas_thread() -> Any:
    """Context manager: BLAS (OpenBLAS/MKL/BLIS, via threadpoolctl) on one thread inside it."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")
