"""Query scoring throughput in GB/s of embeddings read, against the machine's memory and disk bandwidth.

    python benchmarks/query_bandwidth.py                                   # 2 GiB of float32 embeddings
    python benchmarks/query_bandwidth.py --gb 0.05 --out /tmp/qb.md --dir /tmp --limit-gb 0.25   # a smoke run

Three parts, written as one Markdown report (``--out``, default docs/results/query_bandwidth.md):

1. **Machine limits.** Memory read bandwidth (``np.add.reduce`` over a ``--limit-gb`` float32
   array, 1 thread and ``os.cpu_count()`` threads over slices; numpy drops the GIL in the loop),
   memcpy bandwidth (``np.copyto``; bytes copied, i.e. half the traffic), and the disk's sequential
   read bandwidth of a ``--limit-gb`` file written and fsync'ed here: *cached* (second read of the
   file) and *cold* (after ``posix_fadvise(POSIX_FADV_DONTNEED)`` evicted it from the page cache; a
   file larger than RAM is not practical here). Eviction is checked with ``mincore`` (fraction of
   the file's pages still resident) and by the cold read being slower than the cached one.
2. **Query throughput** on a synthetic run with ``--gb`` GiB of float32 embeddings (``k`` columns,
   ``m`` test points): ``scores`` (dense ``(m, R)``; skipped if the output would take more than a
   quarter of the available memory), ``top_k`` by occurrence and ``top_k(by="sample")``, each on
   - the run copied into a ``zarr.storage.MemoryStore`` (``Attributor`` accepts a zarr Store),
   - the run on disk with its chunk files in the page cache (warm),
   - the run on disk with its embedding chunk files evicted before every timed call (cold).
   GB/s = embedding bytes / wall seconds of the call (GB = 10^9 bytes). The ``Attributor`` is
   opened and every query run once before timing (first-call costs such as the per-row metadata
   and ``np.unique`` of the sample ids are excluded; the first call's time is reported).
3. **Raw baselines without datavalue**, same sources: the chunk files read as bytes (disk only),
   the zarr array read in chunk order in the query's row blocks (1 thread, and on a pool of
   ``os.cpu_count()`` threads like the query's dask scheduler), the same plus ``chunk @ q.T``, and
   the numpy matmul alone over the embeddings already in memory, in the query's row blocks (the
   compute ceiling: with m = 16 the product does 8 flops per byte and is not free).
   Queries vs. "zarr read + matmul (N threads)" is datavalue's own overhead; zarr vs. the file bytes
   (or the memory bandwidth) is the zarr/decode (crc32c, copies) cost.

Parts 2 and 3 run once per ``--blas-threads`` setting (default ``default,1``: the BLAS library's
own thread count, then 1 thread via threadpoolctl): the query's dask threads each call the BLAS
``sgemm``, and a multi-threaded BLAS inside them oversubscribes the cores.

The run's gradients are written with ``datavalue.store.RunWriter`` (float16, 128 occurrences per
step, each sample seen about 3 times, like benchmarks/scale.py). The embeddings array is by default
written directly with ``datavalue.store.create_array`` (the same chunks and codecs a build makes,
random values, build attributes marked complete): a bandwidth benchmark does not need real values,
and a real build of 2 GiB takes minutes here. ``--build`` builds them with
``datavalue.build_embeddings(..., curvature="empirical_fisher", dtype="float32", blocks="layer")``
instead. Everything is deleted afterwards unless ``--keep``.

Memory: the limits take 2 x ``--limit-gb`` (freed before the run is written); then the run's copy in
a MemoryStore (1.5 x ``--gb`` with the float16 gradients) and the embeddings as one ndarray for the
compute-only rows and the correctness check (``--gb``): about 2.5 x ``--gb`` GiB at the peak.
Disk: 1.5 x ``--gb`` for the run plus ``--limit-gb`` for the test file, in ``--dir``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import datetime
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CURVATURE = "empirical_fisher"
EMB = f"embeddings/{CURVATURE}/values"
B = 128  # occurrences per step
GB = 1e9
READ_BUF = 16 << 20  # bytes per read() call in the raw file reads


# ----------------------------------------------------------------------------- timing, page cache
def timed(fn: Callable[[], Any], repeats: int, before: Callable[[], Any] | None = None) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` (``before`` runs untimed ahead of each)."""
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def evict(paths: Iterable[Path]) -> None:
    """Drop files from the page cache: fsync (dirty pages cannot be dropped), then FADV_DONTNEED."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: Iterable[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (``mincore``); None where it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    total = resident = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        n = -(-size // page)
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED: maps, faults nothing in
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            vec = (ctypes.c_ubyte * n)()
            rc = libc.mincore(addr, size, vec)
            libc.munmap(addr, size)
            if rc != 0:
                return None
            resident += int((np.frombuffer(vec, np.uint8) & 1).sum())
            total += n
        finally:
            os.close(fd)
    return resident / total if total else None


def read_files(paths: Iterable[Path], buf: memoryview) -> int:
    """Read files sequentially into one reused buffer (no allocation); returns the bytes read."""
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                n += k
    return n


# ----------------------------------------------------------------------------- 1. machine limits
def memory_limits(nbytes: int, threads: int, repeats: int) -> dict[str, list[float]]:
    """Seconds to read (sum) and to copy an ``nbytes`` float32 array, 1 and ``threads`` threads."""
    a = np.ones(nbytes // 4, np.float32)  # touched: every page is mapped
    b = np.empty_like(a)
    b.fill(0)
    pa, pb = np.array_split(a, threads), np.array_split(b, threads)
    out: dict[str, list[float]] = {}
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        out["memory read (np.add.reduce), 1 thread"] = timed(lambda: np.add.reduce(a), repeats)
        out[f"memory read (np.add.reduce), {threads} threads"] = timed(lambda: list(pool.map(np.add.reduce, pa)), repeats)
        out["memcpy (np.copyto, bytes copied), 1 thread"] = timed(lambda: np.copyto(b, a), repeats)
        out[f"memcpy (np.copyto, bytes copied), {threads} threads"] = timed(
            lambda: list(pool.map(np.copyto, pb, pa)), repeats)
    return out


def disk_limits(directory: Path, nbytes: int, repeats: int) -> tuple[dict[str, list[float]], dict[str, float | None]]:
    """Sequential read of a freshly written, fsync'ed file: page-cached and after eviction."""
    path = directory / "query_bandwidth_disk.bin"
    block = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        os.fsync(f.fileno())
    buf = memoryview(bytearray(READ_BUF))
    try:
        read_files([path], buf)  # first read: brings every page in
        cached = timed(lambda: read_files([path], buf), repeats)
        res_warm = resident_fraction([path])
        cold = timed(lambda: read_files([path], buf), repeats, before=lambda: evict([path]))
        evict([path])
        res_cold = resident_fraction([path])
    finally:
        path.unlink()
    return ({"disk read, page-cached (2nd read)": cached, "disk read, cold (after FADV_DONTNEED)": cold},
            {"resident before cached read": res_warm, "resident after eviction": res_cold})


# ----------------------------------------------------------------------------- the synthetic run
def manifest(k: int) -> dict[str, Any]:
    width = 64 if k % 64 == 0 else k
    blocks = [{"name": f"b{i}", "index": i, "rule": "synthetic", "kind": "dense", "params": [f"b{i}"], "shape": [width],
               "k_rows": width, "k_cols": 1, "k": width, "start": i * width, "stop": (i + 1) * width}
              for i in range(k // width)]
    return {"projection": {"proj_dim": k, "seed": 0, "blocks": blocks}, "model_fingerprint": {"digest": "synthetic"},
            "loss_reduction": "mean", "curvature": {"fisher": None},
            "optimizer": {"kind": "sgd", "dampening": 0.0, "nesterov": False}}


def write_run(path: Path, n_steps: int, k: int, chunk_rows: int | None) -> None:
    """Gradients (float16) and per-row metadata for ``n_steps`` steps of ``B`` occurrences."""
    from datavalue.store import RunWriter, StepBlock

    w = RunWriter(path, manifest(k), k=k, chunk_rows=chunk_rows, storage_dtype="float16", max_queue=8)
    rng = np.random.default_rng(0)
    base = (rng.standard_normal((B * 64, k)) * 0.05).astype(np.float32)
    n_samples = max(B, n_steps * B // 3)  # each sample seen about 3 times
    for t in range(n_steps):
        g = base[(t % 64) * B : (t % 64 + 1) * B] * (1.0 + (t % 7) * 0.01)
        ids = (np.arange(B) + t * B) % n_samples
        w.submit(StepBlock(step=t, sample_id=ids, weight=np.full(B, 1 / B), grads=g, flags=np.zeros(B, np.uint8),
                           lr=0.01, epoch=t * B // n_samples))
    w.close()


def write_embeddings(path: Path) -> None:
    """Random float32 embeddings laid out as a build lays them out, marked as a complete build."""
    from datavalue.store import create_array, open_run

    try:
        from datavalue.embeddings._build import ATTRS_KEY
    except ImportError:  # pragma: no cover
        ATTRS_KEY = "datavalue_embeddings"
    run = open_run(path)
    R, k, chunk = run.n_rows, run.proj_dim, run.row_chunk
    meta = {"curvature": CURVATURE, "n_steps": run.n_steps, "n_rows": R, "storage_dtype": "float32",
            "complete": False, "synthetic": "random values written by benchmarks/query_bandwidth.py, not a build"}
    arr = create_array(path, EMB, shape=(R, k), dtype="float32", chunks=(chunk, k), attrs={ATTRS_KEY: meta})
    rng = np.random.default_rng(1)
    slab = chunk * max(1, (64 << 20) // (chunk * k * 4))
    for a in range(0, R, slab):
        b = min(R, a + slab)
        arr[a:b] = rng.standard_normal((b - a, k), dtype=np.float32)
    arr.attrs[ATTRS_KEY] = dict(meta, complete=True)


def to_memory_store(path: Path) -> Any:
    """A ``zarr.storage.MemoryStore`` holding a copy of every key of the run."""
    import zarr
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    src = zarr.storage.LocalStore(str(path), read_only=True)
    mem = zarr.storage.MemoryStore()

    async def copy() -> None:
        proto = default_buffer_prototype()
        keys = [key async for key in src.list()]
        for key in keys:
            await mem.set(key, await src.get(key, prototype=proto))

    sync(copy())
    return mem


# ----------------------------------------------------------------------------- 2./3. queries and baselines
class Source:
    """One place the run is read from: its zarr array of embeddings, its chunk files, how to make it cold."""

    def __init__(self, name: str, location: Any, chunk_files: list[Path] | None, cold: bool) -> None:
        import zarr

        self.name, self.location, self.chunk_files, self.cold = name, location, chunk_files, cold
        store = str(location) if isinstance(location, Path) else location
        self.array = zarr.open_group(store, mode="r", zarr_format=3)[EMB]

    def before(self) -> Callable[[], None] | None:
        if not self.cold:
            return None
        files = self.chunk_files or []
        return lambda: evict(files)


def chunk_slices(n_rows: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(n_rows, a + chunk)) for a in range(0, n_rows, chunk)]


def baselines(src: Source, qt: np.ndarray, threads: int, block_rows: int) -> dict[str, Callable[[], Any]]:
    """Raw reads of the same embeddings without datavalue, in blocks of ``block_rows`` (whole storage chunks)."""
    arr = src.array
    slices = chunk_slices(arr.shape[0], block_rows)
    out: dict[str, Callable[[], Any]] = {}
    if src.chunk_files is not None:
        buf = memoryview(bytearray(READ_BUF))
        out["chunk files as bytes, 1 thread"] = lambda: read_files(src.chunk_files, buf)

    def read_all() -> None:
        for a, b in slices:
            arr[a:b]

    def read_dot(ab: tuple[int, int]) -> np.ndarray:
        return np.asarray(arr[ab[0] : ab[1]]) @ qt

    def read_dot_all() -> None:
        for ab in slices:
            read_dot(ab)

    def read_dot_pool() -> None:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(read_dot, slices):
                pass

    def read_pool() -> None:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(lambda ab: arr[ab[0] : ab[1]], slices):
                pass

    out[f"zarr read, blocks of {block_rows:,} rows in order, 1 thread"] = read_all
    out[f"zarr read, {threads} threads"] = read_pool
    out["zarr read + matmul, 1 thread"] = read_dot_all
    out[f"zarr read + matmul, {threads} threads"] = read_dot_pool
    return out


def queries(attr: Any, q: np.ndarray, dense_ok: bool) -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {}
    if dense_ok:
        out["datavalue scores (dense m x R)"] = lambda: attr.scores(q)
    out["datavalue top_k(k=10), by occurrence"] = lambda: attr.top_k(q, k=10)
    out['datavalue top_k(k=10, by="sample")'] = lambda: attr.top_k(q, k=10, by="sample")
    return out


def check_results(attr: Any, q: np.ndarray, emb: np.ndarray, dense_ok: bool) -> None:
    """The queries agree with numpy on the embeddings in memory (a benchmark of wrong answers is no use)."""
    ref = q @ emb.T
    if dense_ok:
        np.testing.assert_allclose(attr.scores(q), ref, rtol=1e-4, atol=1e-3)
    top = attr.top_k(q, k=10)
    np.testing.assert_array_equal(np.asarray(top.helpful_ids)[:, 0], ref.argmax(1))


@contextlib.contextmanager
def blas_limit(setting: str) -> Iterator[str]:
    """Run the block with the BLAS library's thread count as given (``"default"``: leave it); yields a label."""
    try:
        import threadpoolctl
    except ImportError:
        if setting != "default":
            raise SystemExit("--blas-threads other than 'default' needs threadpoolctl") from None
        yield "default"
        return
    current = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    if setting == "default":
        yield f"default ({'/'.join(map(str, current)) or '?'})"
        return
    with threadpoolctl.threadpool_limits(limits=int(setting), user_api="blas"):
        yield setting


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


# ----------------------------------------------------------------------------- report
def versions() -> str:
    import dask
    import zarr

    import datavalue

    parts = [f"python {platform.python_version()}", f"numpy {np.__version__}", f"zarr {zarr.__version__}",
             f"dask {dask.__version__}", f"datavalue {datavalue.__version__}"]
    try:
        import google_crc32c

        parts.append(f"google-crc32c ({google_crc32c.implementation} implementation)")
    except ImportError:
        pass
    try:
        import threadpoolctl

        blas = [f"{i['internal_api']} {i.get('version')}, {i['num_threads']} threads" for i in threadpoolctl.threadpool_info()
                if i.get("user_api") == "blas"]
        if blas:
            parts.append("BLAS " + "; ".join(blas))
    except ImportError:
        pass
    return ", ".join(parts)


def gbs(nbytes: float, seconds: list[float]) -> tuple[float, float]:
    """(best, median) GB/s."""
    return nbytes / min(seconds) / GB, nbytes / statistics.median(seconds) / GB


def fmt_ratio(x: float | None) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.0%}"


def fmt_frac(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="GiB of float32 embeddings in the synthetic run")
    ap.add_argument("--k", type=int, default=256, help="embedding columns")
    ap.add_argument("--m", type=int, default=16, help="test points per query")
    ap.add_argument("--chunk-rows", type=int, default=None,
                    help="rows per storage chunk (default: RunWriter's, about 4 MiB of float32 rows)")
    ap.add_argument("--limit-gb", type=float, default=2.0, help="GiB of the arrays/file that measure the machine limits")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per warm measurement (best and median reported)")
    ap.add_argument("--cold-repeats", type=int, default=2, help="timed calls per cold measurement (each after eviction)")
    ap.add_argument("--blas-threads", type=lambda v: v.split(","), default=["default", "1"],
                    help="comma list of BLAS thread counts to measure under ('default' = as the process starts)")
    ap.add_argument("--build", action="store_true", help="build the embeddings with build_embeddings instead of writing them")
    ap.add_argument("--dir", default=str(ROOT / "runs"), help="directory for the run and the disk test file (deleted afterwards)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "query_bandwidth.md"), help="Markdown report")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic run")
    args = ap.parse_args()

    import datavalue

    threads = os.cpu_count() or 1
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    # 1. machine limits
    limit_bytes = int(args.limit_gb * 2**30) // 4 * 4
    log(f"machine limits over {limit_bytes / 2**30:.2f} GiB")
    limits = memory_limits(limit_bytes, threads, repeats=5)
    disk, residency = disk_limits(directory, limit_bytes, repeats=max(2, args.cold_repeats))
    limits.update(disk)
    lim_gbs = {name: gbs(limit_bytes, t) for name, t in limits.items()}
    mem_read = max(v[0] for n, v in lim_gbs.items() if n.startswith("memory read"))
    cached_read = lim_gbs["disk read, page-cached (2nd read)"][0]
    cold_read = lim_gbs["disk read, cold (after FADV_DONTNEED)"][0]

    # 2. the run
    n_steps = max(1, round(args.gb * 2**30 / (B * args.k * 4)))
    path = directory / "query_bandwidth.zarr"
    if path.exists():
        shutil.rmtree(path)
    log(f"writing a run of {n_steps} steps x {B} occurrences (k={args.k})")
    t0 = time.perf_counter()
    write_run(path, n_steps, args.k, args.chunk_rows)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.build:
        datavalue.build_embeddings(path, curvature=CURVATURE, dtype="float32", progress=False, blocks="layer")
    else:
        write_embeddings(path)
    t_emb = time.perf_counter() - t0
    os.sync()  # the chunk files are clean: eviction can drop them
    files = sorted(p for p in (path / EMB / "c").rglob("*") if p.is_file())
    run = datavalue.store.open_run(path)
    R, k = run.n_rows, run.proj_dim
    emb_bytes = R * k * 4
    file_bytes = sum(p.stat().st_size for p in files)
    log(f"run: {R:,} occurrences, {emb_bytes / 2**30:.3f} GiB of embeddings in {len(files)} chunk files "
        f"(write {t_write:.1f} s, embeddings {t_emb:.1f} s)")

    q = np.random.default_rng(2).standard_normal((args.m, k)).astype(np.float32)
    qt = np.ascontiguousarray(q.T)
    dense_ok = args.m * R * 4 < mem_available() // 4

    log("copying the run into a MemoryStore")
    mem = to_memory_store(path)
    sources = [Source("in memory (zarr MemoryStore)", mem, None, cold=False),
               Source("on disk, page-cached (warm)", path, files, cold=False),
               Source("on disk, cold (chunk files evicted before each call)", path, files, cold=True)]

    chunk = int(sources[0].array.chunks[0])
    query_chunk_rows = datavalue.Attributor(path, None, curvature=CURVATURE, progress=False).chunk_rows
    rows: list[dict[str, Any]] = []  # one per measurement
    emb_np = np.asarray(sources[0].array[:])
    slices = chunk_slices(R, query_chunk_rows)  # the query's own task size

    def numpy_dot_all() -> None:
        for a, b in slices:
            emb_np[a:b] @ qt

    def numpy_dot_pool() -> None:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(lambda ab: emb_np[ab[0] : ab[1]] @ qt, slices):
                pass

    for blas in args.blas_threads:
        with blas_limit(blas) as blas_label:
            log(f"BLAS threads: {blas_label}")
            for name, fn in ((f"numpy matmul, blocks of {query_chunk_rows:,} rows in memory, 1 thread", numpy_dot_all),
                             (f"numpy matmul, blocks of {query_chunk_rows:,} rows in memory, {threads} threads",
                              numpy_dot_pool)):
                fn()
                rows.append({"blas": blas_label, "source": "compute only (no read)", "what": name,
                             "t": timed(fn, args.repeats), "first": None, "resident": None})
            for src in sources:
                log(f"source: {src.name}")
                attr = datavalue.Attributor(src.location, None, curvature=CURVATURE, progress=False)
                if src is sources[0]:
                    check_results(attr, q, emb_np, dense_ok)
                work = {**baselines(src, qt, threads, query_chunk_rows), **queries(attr, q, dense_ok)}
                for name, fn in work.items():
                    first = None
                    if not src.cold:
                        t0 = time.perf_counter()
                        fn()  # warm-up: page cache, cached properties, thread pools
                        first = time.perf_counter() - t0
                    reps = args.cold_repeats if src.cold else args.repeats
                    resident = None
                    if src.cold:
                        evict(src.chunk_files or [])
                        resident = resident_fraction(src.chunk_files or [])
                    t = timed(fn, reps, before=src.before())
                    rows.append({"blas": blas_label, "source": src.name, "what": name, "t": t, "first": first,
                                 "resident": resident})
                    log(f"  {name}: {emb_bytes / min(t) / GB:.2f} GB/s (best of {reps})")
                del attr

    # 3. report
    del mem, sources
    ref_name = f"zarr read + matmul, {threads} threads"
    ref = {(r["blas"], r["source"]): emb_bytes / min(r["t"]) / GB for r in rows if r["what"] == ref_name}
    lines = [
        "# Query throughput vs. the machine's memory and disk bandwidth",
        "",
        f"`{command}` ({started}; os.cpu_count() = {threads}, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}, {platform.machine()}).",
        f"Versions: {versions()}.",
        "",
        "GB = 10^9 bytes. Best of the timed calls, median in brackets. Other jobs may share the machine: "
        "read the best values.",
        "",
        "## Machine limits",
        "",
        f"Over {limit_bytes / 2**30:.2f} GiB (a float32 array in memory; a file written and fsync'ed in `{directory}`).",
        "",
        "| measurement | GB/s |",
        "|---|---|",
    ]
    for name, (best, med) in lim_gbs.items():
        lines.append(f"| {name} | {best:.2f} ({med:.2f}) |")
    lines += [
        "",
        f"Page-cache residency of the disk test file (mincore): {fmt_frac(residency['resident before cached read'])} before "
        f"the cached read, {fmt_frac(residency['resident after eviction'])} after eviction. Cold / cached read: "
        f"{cold_read / cached_read:.2f}" + (" (eviction did not take effect: the cold numbers are not cold)"
                                             if cold_read > 0.5 * cached_read else "") + ".",
        "",
        "## Query throughput",
        "",
        f"Run: {R:,} occurrences x k = {k} float32 = {emb_bytes / 2**30:.3f} GiB of embeddings in {len(files)} chunk "
        f"files of {chunk:,} rows ({file_bytes / len(files) / 2**20:.1f} MiB each, crc32c checksum, no compression); "
        f"{'built with build_embeddings' if args.build else 'random values written with create_array'}; m = {args.m} "
        f"test points; Attributor chunk_rows = {query_chunk_rows:,}"
        f" (default), dask threaded scheduler. Writing the run took {t_write:.1f} s, the embeddings {t_emb:.1f} s."
        + ("" if dense_ok else " Dense `scores` skipped: the (m, R) output would not fit comfortably in memory."),
        "",
        "GB/s = embedding bytes / wall seconds. *BLAS threads*: the BLAS library's thread count during the "
        "measurement (the query's dask threads each call sgemm). *Physical limit*: the best memory read bandwidth "
        f"({mem_read:.2f} GB/s) for the in-memory and page-cached runs, the cold sequential disk read "
        f"({cold_read:.2f} GB/s) for the cold run. *vs zarr+matmul*: the query against reading every chunk with zarr and "
        f"multiplying it by q on {threads} threads without datavalue, same source (above 100% = faster than that "
        "baseline). First call: the untimed warm-up call, seconds. Resident: fraction of the chunk files' pages still in "
        "the page cache after eviction.",
        "",
        "| BLAS threads | source | measurement | GB/s | vs physical limit | vs zarr+matmul | first call s | resident |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best, med = gbs(emb_bytes, r["t"])
        phys = cold_read if r["source"].startswith("on disk, cold") else mem_read
        key = (r["blas"], r["source"])
        vs_zarr = best / ref[key] if r["what"].startswith("datavalue") and key in ref else None
        first = "" if r["first"] is None else f"{r['first']:.2f}"
        resident = "" if r["resident"] is None else fmt_frac(r["resident"])
        lines.append(f"| {r['blas']} | {r['source']} | {r['what']} | {best:.2f} ({med:.2f}) | {fmt_ratio(best / phys)} | "
                     f"{fmt_ratio(vs_zarr)} | {first} | {resident} |")
    lines += ["", f"Limits: memory read {mem_read:.2f} GB/s; page-cached file read {cached_read:.2f} GB/s (the ceiling "
              f"of any read() of a warm file); cold sequential disk read {cold_read:.2f} GB/s.", ""]
    text = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    log(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(path)


if __name__ == "__main__":
    main()
