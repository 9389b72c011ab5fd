"""Worker for tests/capture/test_distributed.py (importable for torch.multiprocessing spawn)."""

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4)).double()


def data():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((64, 6)))
    y = torch.from_numpy(rng.integers(0, 4, 64))
    batches = [rng.permutation(64)[:8] for _ in range(5)]
    return x, y, batches


def worker(rank: int, world: int, port: int, path: str, curvature) -> None:
    import datavalue

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y, batches = data()
        with datavalue.Recorder(path, model, proj_dim=40, seed=1, optimizer=opt, curvature=curvature,
                                storage_dtype="float64") as rec:
            for ids in batches:
                local = np.array_split(ids, world)[rank]
                with rec.step(sample_ids=local):
                    F.cross_entropy(model(x[local]), y[local]).backward()
                opt.step()
                opt.zero_grad()
        # leave together: a rank that tears gloo down while its peer is still closing the recorder
        # aborted once in CI ("terminate called without an active exception")
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Every file is closed and both ranks are done. gloo's C++ teardown still aborted a rank on a loaded
    # machine after the barrier (same message, a fresh clone, 2026-12-01): leave without running it.
    os._exit(0)


def packed_arrays(rank: int, call: int):
    """The arrays rank ``rank`` gathers at call ``call`` of ``packed_worker``: sizes differ by rank and
    grow and shrink between calls, dtypes mix (float32 rows with an odd byte count, int64, float64)."""
    rng = np.random.default_rng([rank, call])
    b = [3, 5, 0, 9, 2, 9][call] + rank * [1, 0, 4, 2, 0, 1][call]
    k = 7
    return [rng.standard_normal((b, k)).astype(np.float32), rng.integers(-2**62, 2**62, b),
            rng.standard_normal(b), rng.standard_normal((2 * b + call % 2, k))]


def packed_worker(rank: int, world: int, port: int) -> None:
    """Every rank gathers ``packed_arrays`` with ``DistInfo.all_gather_packed`` and checks the result bit
    for bit against the concatenation it computes itself and against ``all_gather_rows``."""
    from datavalue.capture._pipeline import DistInfo

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        info, cap, caps = DistInfo(rank, world), 0, []
        for call in range(6):
            mine = packed_arrays(rank, call)
            got, cap = info.all_gather_packed(mine, capacity=cap)
            caps.append(cap)
            want = [np.concatenate([packed_arrays(r, call)[i] for r in range(world)]) for i in range(len(mine))]
            old = [info.all_gather_rows(a) for a in mine]
            for g, w, o in zip(got, want, old):
                assert g.dtype == w.dtype == o.dtype and g.shape == w.shape == o.shape, (g.dtype, g.shape, w.shape)
                assert g.tobytes() == w.tobytes() == o.tobytes()
                assert g.flags.writeable
        # the agreed buffer length only grows, and only when a rank's step outgrew it
        assert caps == sorted(caps) and len(set(caps)) < len(caps), caps
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)


def count_worker(rank: int, world: int, port: int, path: str) -> None:
    """Records 5 DDP steps of equal size, counting ``dist.all_gather`` calls per step: the first step
    may take two (the buffers are sized), every later one exactly one."""
    import datavalue

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls, real = [0], dist.all_gather

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    try:
        dist.all_gather = counting
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y, batches = data()
        per_step = []
        with datavalue.Recorder(path, model, proj_dim=40, seed=1, optimizer=opt, curvature="fisher",
                                storage_dtype="float64") as rec:
            for ids in batches:
                local = np.array_split(ids, world)[rank]
                before = calls[0]
                with rec.step(sample_ids=local):
                    F.cross_entropy(model(x[local]), y[local]).backward()
                per_step.append(calls[0] - before)
                opt.step()
                opt.zero_grad()
        assert per_step[0] <= 2 and per_step[1:] == [1] * (len(per_step) - 1), per_step
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    finally:
        dist.all_gather = real
    os._exit(0)
