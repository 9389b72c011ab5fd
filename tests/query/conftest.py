"""A tiny real run shared by the query tests: an MLP on random data, 2 epochs of SGD, so every
sample occurs twice. Embeddings are synthetic (random, written with ``create_array``): the query
layer only multiplies and sums them, so any values test it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datavalue
from datavalue.store import create_array, open_run

N, D, C, BS, EPOCHS, K = 40, 6, 3, 8, 2, 24
IDS = 1000 + 7 * np.arange(N)  # non-contiguous ids, so labels are not positions


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 10), nn.Tanh(), nn.Linear(10, C))


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)
    xt, yt = torch.randn(5, D, generator=g), torch.randint(0, C, (5,), generator=g)
    return x, y, xt, yt


def test_loss(xt, yt):
    return lambda m: F.cross_entropy(m(xt), yt, reduction="none")


test_loss.__test__ = False  # not a pytest test


def record(path, *, model=None, epochs=EPOCHS) -> nn.Module:
    model = model or make_model()
    x, y, _, _ = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)  # lr varies per step
    rng = np.random.default_rng(2)
    with datavalue.Recorder(path, model, proj_dim=K, optimizer=opt) as rec:
        for epoch in range(epochs):
            perm = rng.permutation(N)
            for i in range(0, N, BS):
                idx = perm[i : i + BS]
                with rec.step(sample_ids=IDS[idx], epoch=epoch):
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                opt.zero_grad()
                sched.step()
    return model


def write_embeddings(path, curvature="empirical_fisher", seed=3, chunk=16) -> np.ndarray:
    run = open_run(path)
    R, k = run.n_rows, run.proj_dim
    values = np.random.default_rng(seed).standard_normal((R, k)).astype(np.float32)
    arr = create_array(path, f"embeddings/{curvature}/values", shape=(R, k), dtype="float32", chunks=(chunk, k),
                       attrs={"curvature": curvature})
    arr[:] = values
    return values


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``(path, model, embeddings (R, k), loss_fn)`` of a recorded run with synthetic embeddings."""
    path = tmp_path_factory.mktemp("query") / "run.zarr"
    model = record(path)
    emb = write_embeddings(path)
    _, _, xt, yt = data()
    return path, model, emb, test_loss(xt, yt)
