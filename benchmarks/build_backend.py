"""Build throughput on the numpy and the torch backends (``build_embeddings(..., device=)``).

One synthetic run per block width ``k`` (one recorded block of ``k`` columns, ``b`` rows a step, plain
SGD, empirical Fisher: ``4 b k^2`` flops a step, two GEMMs), built back to back on each backend,
interleaved in one process (numpy, torch-cpu, [cuda], numpy, ...) so that a busy machine slows
them alike; the table gives the median of the repeats in occurrences (rows) per second, and the
median (and range) of the paired ratios: numpy's build time over this backend's in the same repeat,
and the CPU time (all threads of the process) per occurrence, which a shared machine's contention
disturbs less than wall time (spinning threads still count).

On CUDA it also measures the GPU's matmul roofline with a large torch matmul in the same dtype
and reports the build's achieved flops as a share of it.

Also printed, to explain a gap between the CPU backends: the two GEMMs of one step timed alone on
each (numpy through the build's own GEMM layer, ``datavalue.embeddings._gemm``, and torch's
``addmm``), and the threads each uses.

Run: ``nice -n 10 python benchmarks/build_backend.py [--ks 1024 4096] [--b 64] [--steps 24]
[--repeats 3] [--dtypes float32 float64] [--out FILE]``; ``--diagnose`` prints only the GEMM
comparisons (one thread in thread CPU time; torch's own threads against the build's setting).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("TQDM_DISABLE", "1")


def write_run(path: str, k: int, b: int, T: int, seed: int = 0) -> str:
    from datavalue.store import RunWriter, StepBlock

    manifest = {
        "projection": {"proj_dim": None, "seed": 0, "blocks": [{"name": "b0", "index": 0, "start": 0, "stop": k, "k": k}]},
        "loss_reduction": "mean",
        "optimizer": {"kind": "sgd", "dampening": 0.0, "nesterov": False},
        "curvature": {"fisher": None},
    }
    rng = np.random.default_rng(seed)
    w = RunWriter(path, manifest, k=k, chunk_rows=4 * b, storage_dtype="float32", background=False)
    for t in range(T):
        w.submit(StepBlock(step=t, sample_id=np.arange(b, dtype=np.int64) + b * t, weight=np.full(b, 1.0 / b),
                           grads=(rng.normal(size=(b, k)) / np.sqrt(k)).astype(np.float32),
                           flags=np.zeros(b, np.uint8), lr=1e-3, grad_scale=1.0, momentum=0.0, weight_decay=0.0))
    w.close()
    return path


def build_seconds(path: str, dtype: str, device: str | None) -> tuple[float, float]:
    """Wall and CPU seconds (this process, every thread) of one build."""
    from datavalue.embeddings import build_embeddings

    t0, c0 = time.perf_counter(), time.process_time()
    build_embeddings(path, "empirical_fisher", dtype=dtype, device=device, overwrite=True, progress=False)
    return time.perf_counter() - t0, time.process_time() - c0


def gemm_step_seconds(k: int, b: int, dtype: str, device: str | None, reps: int = 5, *, as_built: bool = True) -> float:
    """The two GEMMs of one step alone (``E = alpha (G M^T - G)`` and the rank-b update ``M -= E^T G``)
    through the build's GEMM layer (``_gemm.matmul_T``/``sub_outer``) with the threads the build uses:
    BLAS / torch held to one thread, the products split by rows over the scan's pool on a CPU. With
    ``as_built=False`` (torch only): torch's own ``addmm`` on its default intra-op threads, unsplit."""
    from datavalue._blas import one_blas_thread
    from datavalue.embeddings import _gemm
    from datavalue.embeddings._backend import get_backend

    rng = np.random.default_rng(1)
    M = rng.normal(size=(k, k)).astype(dtype) * 1e-3
    G = rng.normal(size=(b, k)).astype(dtype)
    xp = get_backend(device)
    if not as_built:
        import torch

        Mt, Gt = torch.as_tensor(M, device=device), torch.as_tensor(G, device=device)
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            E = Gt.addmm(Gt, Mt.T, beta=-0.1, alpha=0.1)
            Mt.addmm_(E.T, Gt, alpha=1.0)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    M, G = xp.asarray(M), xp.asarray(G)
    split = _gemm.gemm_threads(os.cpu_count() or 1) if xp.splits else contextlib.nullcontext()
    with one_blas_thread(), split, xp.scan_threads():
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            E = _gemm.matmul_T(G, M, alpha=0.1, minus=G)
            _gemm.sub_outer(M, E, G, alpha=-1.0)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device: str | None) -> None:
    if device is not None and device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def roofline_tflops(dtype: str, device: str, n: int = 8192, reps: int = 5) -> float:
    """The device's matmul rate: a large square torch matmul (``2 n^3`` flops), median of ``reps``."""
    import torch

    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    a = torch.randn(n, n, device=device, dtype=dt)
    bm = torch.randn(n, n, device=device, dtype=dt)
    a @ bm  # warm up (cuBLAS handles, clocks)
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ bm
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def thread_cpu_ms(fn, reps: int) -> float:
    """Median CPU time of this thread for ``fn()`` (ms): unlike wall time, other processes' load on a shared
    machine does not enter it (one-thread work only)."""
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times) * 1e3


def diagnose(ks: list[int], b: int, dtypes: list[str]) -> list[str]:
    """Why the CPU backends differ: (1) each of a step's two GEMMs on one thread, numpy's OpenBLAS against
    torch's MKL, in thread CPU time; (2) a step's two GEMMs on torch's default intra-op threads against the
    build's setting (torch at one thread, rows split over the scan's pool), in wall time, interleaved."""
    import torch

    from datavalue._blas import one_blas_thread
    from datavalue.embeddings import _gemm

    out = ["", "One thread, thread CPU time (ms; GFLOP/s in brackets):", "",
           "| k | dtype | E = a (G M^T - G): numpy | torch | M -= E^T G: numpy | torch |", "|---|---|---|---|---|---|"]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with one_blas_thread():
            for k in ks:
                for dtype in dtypes:
                    rng = np.random.default_rng(0)
                    M, G = rng.normal(size=(k, k)).astype(dtype), rng.normal(size=(b, k)).astype(dtype)
                    Mt, Gt = torch.from_numpy(M.copy()), torch.from_numpy(G.copy())
                    reps = 9 if k <= 1024 else 3
                    fl = 2 * b * k * k / 1e6
                    cells = []
                    calls = ((_gemm.matmul_T, G, M), (_gemm.matmul_T, Gt, Mt), (_gemm.sub_outer, M, G),
                             (_gemm.sub_outer, Mt, Gt))
                    for fn, x, y in calls:
                        if fn is _gemm.matmul_T:
                            ms = thread_cpu_ms(functools.partial(fn, x, y, alpha=0.1, minus=x), reps)
                        else:
                            ms = thread_cpu_ms(functools.partial(fn, x, y, y, alpha=1e-9), reps)
                        cells.append(f"{ms:.1f} ({fl / ms:.0f})")
                    out.append(f"| {k} | {dtype} | " + " | ".join(cells) + " |")
    finally:
        torch.set_num_threads(old)
    out += ["", f"A step's two GEMMs, wall ms, median of 5 interleaved (torch's default: {torch.get_num_threads()} threads):",
            "", "| k | dtype | numpy as built | torch as built | torch on its own threads, unsplit |", "|---|---|---|---|---|"]
    for k in ks:
        for dtype in dtypes:
            r: list[list[float]] = [[], [], []]
            for _ in range(5):
                r[0].append(gemm_step_seconds(k, b, dtype, None, reps=1))
                r[1].append(gemm_step_seconds(k, b, dtype, "cpu", reps=1))
                r[2].append(gemm_step_seconds(k, b, dtype, "cpu", reps=1, as_built=False))
            out.append(f"| {k} | {dtype} | " + " | ".join(f"{statistics.median(x) * 1e3:.1f}" for x in r) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--b", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA rows even where a GPU is visible")
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    ap.add_argument("--diagnose", action="store_true", help="only the GEMM comparisons (see diagnose())")
    a = ap.parse_args()
    if a.diagnose:
        print("\n".join(diagnose(a.ks, a.b, a.dtypes)))
        return

    import torch

    devices: list[str | None] = [None, "cpu"]
    if torch.cuda.is_available() and not a.no_cuda:
        devices.append("cuda")
    name = {None: "numpy", "cpu": "torch-cpu", "cuda": "torch-cuda"}
    lines = [
        f"machine: {os.cpu_count()} CPU cores; numpy {np.__version__}, torch {torch.__version__} "
        f"(torch threads {torch.get_num_threads()}); "
        + (f"GPU {torch.cuda.get_device_name(0)}" if "cuda" in devices else "no GPU"),
        f"b = {a.b} rows a step, {a.steps} steps, one block of k columns, plain SGD, empirical Fisher "
        f"(4 b k^2 flops a step); median of {a.repeats} interleaved repeats",
        "",
        "| k | dtype | backend | occurrences/s | vs numpy, paired (range) | CPU ms / occurrence | build GFLOP/s | "
        "one step's two GEMMs alone (ms) | roofline TFLOP/s | share of roofline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    tmp = tempfile.mkdtemp()
    try:
        for k in a.ks:
            path = write_run(os.path.join(tmp, f"k{k}.zarr"), k, a.b, a.steps)
            rows = a.b * a.steps
            flops = 4.0 * a.b * k * k * a.steps
            for dtype in a.dtypes:
                for dev in devices:  # warm-up build per backend (imports, cuBLAS handles, page faults)
                    build_seconds(path, dtype, dev)
                secs: dict[str | None, list[float]] = {d: [] for d in devices}
                cpu: dict[str | None, list[float]] = {d: [] for d in devices}
                gemm: dict[str | None, list[float]] = {d: [] for d in devices}
                for _ in range(a.repeats):  # interleaved: each repeat builds on every backend in turn
                    for dev in devices:
                        wall, cpus = build_seconds(path, dtype, dev)
                        secs[dev].append(wall)
                        cpu[dev].append(cpus)
                    for dev in devices:
                        gemm[dev].append(gemm_step_seconds(k, a.b, dtype, dev, reps=3))
                for dev in devices:
                    s = statistics.median(secs[dev])
                    # paired: this backend's speed over numpy's in the same repeat (a busy machine slows both)
                    ratios = sorted(b0 / b1 for b0, b1 in zip(secs[None], secs[dev], strict=True))
                    roof = share = ""
                    if dev == "cuda":
                        r = roofline_tflops(dtype, "cuda")
                        roof, share = f"{r:.1f}", f"{flops / s / 1e12 / r:.1%}"
                    gemm_ms = statistics.median(gemm[dev]) * 1e3
                    line = (f"| {k} | {dtype} | {name[dev]} | {rows / s:,.0f} | {statistics.median(ratios):.2f}x "
                            f"({ratios[0]:.2f}-{ratios[-1]:.2f}) | {1e3 * statistics.median(cpu[dev]) / rows:.2f} | "
                            f"{flops / s / 1e9:.1f} | {gemm_ms:.2f} | {roof} | {share} |")
                    lines.append(line)
                    print(line, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
