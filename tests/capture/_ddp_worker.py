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
