"""Time of the per-step DDP gathers of ``StepSink.submit``: the old path (``DistInfo.all_gather_rows`` per
array: rows, ids, weights and Fisher rows, two collectives each) against the packed one
(``DistInfo.all_gather_packed``: one collective), alternated in the same 2-rank gloo processes.

    python benchmarks/ddp_gather.py [--b 8] [--k 980] [--fisher 512] [--steps 200] [--reps 5]

Prints, per rank, the median over repetitions of the mean ms per step of each path.
"""

import argparse
import os
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, port, b, k, nf, steps, reps):
    from datavalue.capture._pipeline import DistInfo

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    info, rng = DistInfo(rank, world), np.random.default_rng(rank)
    arrays = [rng.standard_normal((b, k)).astype(np.float32), np.arange(b) + rank * b, np.full(b, 1.0 / (b * world))]
    if nf:
        arrays.append(rng.standard_normal((nf, k)).astype(np.float32))
    cap, old, new = 0, [], []
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        for _ in range(steps):
            [info.all_gather_rows(a) for a in arrays]
        old.append((time.perf_counter() - t) / steps * 1e3)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(steps):
            _, cap = info.all_gather_packed(arrays, capacity=cap)
        new.append((time.perf_counter() - t) / steps * 1e3)
    print(f"rank {rank}: b={b} k={k} fisher rows={nf}: per array (x{len(arrays)}, {2 * len(arrays)} collectives) "
          f"{np.median(old):.3f} ms/step, packed (1 collective) {np.median(new):.3f} ms/step "
          f"({np.median(old) / np.median(new):.1f}x)", flush=True)
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--b", type=int, default=8)
    ap.add_argument("--k", type=int, default=980)
    ap.add_argument("--fisher", type=int, default=0, help="Fisher rows per rank and step (0: none)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"load average at start: {os.getloadavg()}")
    mp.spawn(_worker, args=(2, port, a.b, a.k, a.fisher, a.steps, a.reps), nprocs=2, join=True)
    print(f"load average at end: {os.getloadavg()}")
