"""Recorder bookkeeping: Fisher pseudo-gradients, optimizer state, clipping, token weights."""

import numpy as np
import torch
import torch.nn.functional as F

import datavalue
from datavalue.capture import exact_layout
from datavalue.store import open_run
from tests.capture.models import mlp


def test_fisher_rows_equal_class_expectation_oracle(tmp_path):
    """sum_j f_j f_j^T = sum_i w_i sum_c p_ic g_ic g_ic^T, rows checked one by one (float64, 1e-8)."""
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 4, (4,))
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=None, curvature="fisher", storage_dtype="float64") as rec:
        with rec.step(sample_ids=range(4), lr=0.1):
            F.cross_entropy(model(x), y).backward()
        blocks = rec.blocks
    run = open_run(tmp_path / "r.zarr")
    fis = run.fisher.compute()
    assert fis.shape == (4 * 4, run.proj_dim) and run.fisher_ptr.tolist() == [0, 16]
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    rows = {}
    for i in range(4):
        for c in range(4):
            model.zero_grad()
            F.cross_entropy(model(x[i : i + 1]), torch.tensor([c])).backward()
            g = exact_layout({n: q.grad for n, q in model.named_parameters()}, blocks)
            rows[(c, i)] = np.sqrt(0.25 * p[i, c].item()) * g
    expect = np.stack([rows[(c, i)] for c in range(4) for i in range(4)])  # class-major passes
    np.testing.assert_allclose(fis, expect, rtol=1e-8, atol=1e-12)


def test_optimizer_state_clipping_and_epoch(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=32, optimizer=opt) as rec:
        for t in range(3):
            with rec.step(sample_ids=range(8 * t, 8 * t + 8), epoch=t // 2) as h:
                F.cross_entropy(model(x), y).backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)
                h.clip_coef = min(1.0, 0.01 / (float(norm) + 1e-6))
            opt.step()
            opt.zero_grad()
            sched.step()
    run = open_run(tmp_path / "r.zarr")
    np.testing.assert_allclose(run.lr, [0.3, 0.15, 0.075])
    assert run.momentum.tolist() == [0.9] * 3 and run.weight_decay.tolist() == [1e-3] * 3
    assert run.epoch.tolist() == [0, 0, 1]
    assert (run.grad_scale < 1).all() and (run.grad_scale > 0).all()
    assert run.manifest["optimizer"]["kind"] == "sgd"


def test_token_mean_weights_and_sum(tmp_path):
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.randint(0, 4, (3,))
    tokens = torch.tensor([1.0, 2.0, 5.0])
    w = tokens / tokens.sum()
    with datavalue.Recorder(tmp_path / "t.zarr", model, proj_dim=None, loss_reduction="token_mean",
                            storage_dtype="float64") as rec:
        with rec.step(sample_ids=range(3), lr=0.1, tokens=tokens):
            (F.cross_entropy(model(x), y, reduction="none") * w).sum().backward()
    model.zero_grad()
    with datavalue.Recorder(tmp_path / "s.zarr", model, proj_dim=None, loss_reduction="sum", storage_dtype="float64") as rec:
        with rec.step(sample_ids=range(3), lr=0.1):
            F.cross_entropy(model(x), y, reduction="sum").backward()
    t, s = open_run(tmp_path / "t.zarr"), open_run(tmp_path / "s.zarr")
    np.testing.assert_allclose(t.weight, w.numpy())
    np.testing.assert_allclose(s.weight, 1.0)
    # stored gradients are per-sample and unweighted in both cases
    np.testing.assert_allclose(t.grads.compute(), s.grads.compute(), rtol=1e-10)


def test_float16_storage_and_projected_shapes(tmp_path):
    model = mlp()
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=64, storage_dtype="float16") as rec:
        with rec.step(sample_ids=range(5), lr=0.1):
            F.cross_entropy(model(torch.randn(5, 6)), torch.randint(0, 4, (5,))).backward()
        assert rec.proj_dim <= 64
    run = open_run(tmp_path / "r.zarr")
    assert run.grads.dtype == np.float16 and run.grads.shape == (5, rec.proj_dim)


def test_sum_of_sketched_rows_equals_sketch_of_batch_gradient(tmp_path):
    """Linearity self-check used for clipping detection: sum_i w_i P g_i = P(sum_i w_i g_i)."""
    from datavalue.capture._gradients import project_full
    from tests.capture.models import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT().double()
    x = torch.randint(0, 11, (4, 5))
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=200, storage_dtype="float64") as rec:
        with rec.step(sample_ids=range(4), lr=0.1):
            logits = model(x)
            F.cross_entropy(logits.reshape(-1, 11), x.reshape(-1)).backward()
        full = project_full(rec.engine, {n: p.grad for n, p in model.named_parameters()}).numpy()
    run = open_run(tmp_path / "r.zarr")
    np.testing.assert_allclose(run.weight @ run.grads.compute(), full, rtol=1e-8, atol=1e-12)
