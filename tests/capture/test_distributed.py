"""Recording under torch.distributed (2 processes, gloo, CPU) equals a single-process run."""

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import datavalue
from datavalue.store import open_run
from tests.capture._ddp_worker import count_worker, data, make_model, packed_worker, worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("curvature", [None, "fisher"])
def test_ddp_run_equals_single_process(tmp_path, curvature):
    ddp_path = str(tmp_path / "ddp.zarr")
    mp.spawn(worker, args=(2, _free_port(), ddp_path, curvature), nprocs=2, join=True)

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y, batches = data()
    with datavalue.Recorder(tmp_path / "one.zarr", model, proj_dim=40, seed=1, optimizer=opt, curvature=curvature,
                            storage_dtype="float64") as rec:
        for ids in batches:
            with rec.step(sample_ids=ids):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    a, b = open_run(ddp_path), open_run(tmp_path / "one.zarr")
    assert a.n_steps == b.n_steps == 5
    np.testing.assert_array_equal(a.sample_id, b.sample_id)
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.step_ptr, b.step_ptr)
    np.testing.assert_allclose(a.grads.compute(), b.grads.compute(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a.lr, b.lr)
    if curvature == "fisher":
        fa, fb = a.fisher.compute(), b.fisher.compute()
        for t in range(5):  # rows are ordered by rank then class: compare the curvature they define
            sa = slice(a.fisher_ptr[t], a.fisher_ptr[t + 1])
            sb = slice(b.fisher_ptr[t], b.fisher_ptr[t + 1])
            np.testing.assert_allclose(fa[sa].T @ fa[sa], fb[sb].T @ fb[sb], rtol=1e-6, atol=1e-9)


def test_packed_gather_is_bit_exact():
    """``DistInfo.all_gather_packed`` (one collective per recorded step) gives, bit for bit, the
    per-array concatenation over ranks, with unequal and changing sizes and mixed dtypes."""
    mp.spawn(packed_worker, args=(2, _free_port()), nprocs=2, join=True)


def test_ddp_step_makes_one_collective(tmp_path):
    """After the first step, a recorded DDP step gathers once (not twice per array, as before)."""
    mp.spawn(count_worker, args=(2, _free_port(), str(tmp_path / "ddp.zarr")), nprocs=2, join=True)
