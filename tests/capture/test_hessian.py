"""curvature="hessian": the recorded S H S^T against an explicit Hessian and an explicit sketch
matrix, what the recorder stores per step, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datavalue
from datavalue.capture._engine import Engine
from datavalue.capture._gradients import project_full
from datavalue.capture._hessian import sketched_hessian
from datavalue.errors import RecorderError
from datavalue.store import open_run


def _model(seed=0, conv=False):
    torch.manual_seed(seed)
    if conv:
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _explicit(model, loss_fn, engine):
    """S H S^T from torch.autograd.functional.hessian over the flat parameters and the matrix S
    assembled column by column from the engine's sketch of each basis vector."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])

    def unflat(v):
        out, i = {}, 0
        for n, s, c in zip(names, shapes, sizes, strict=True):
            out[n] = v[i : i + c].reshape(s)
            i += c
        return out

    def f(v):
        return loss_fn(lambda x: torch.func.functional_call(model, unflat(v), (x,)))

    H = torch.autograd.functional.hessian(f, flat)
    P = flat.numel()
    S = torch.stack([project_full(engine, unflat(torch.eye(P, dtype=flat.dtype)[j])) for j in range(P)]).T
    return S @ H @ S.T


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "conv"])
@pytest.mark.parametrize("proj_dim", [None, 6], ids=["exact", "sketch6"])
def test_sketched_hessian_equals_explicit_S_H_St(conv, proj_dim):
    model = _model(conv=conv)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 1, 5, 5, generator=g, dtype=torch.float64) if conv else torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    engine = Engine(model, proj_dim=proj_dim, seed=3)
    got = sketched_hessian(model, lambda: F.cross_entropy(model(x), y), engine, chunk=4)  # several chunks
    want = _explicit(model, lambda fwd: F.cross_entropy(fwd(x), y), engine)
    assert got.shape == (engine.k, engine.k)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-12)
    # tanh makes the Hessian differ from the Gauss-Newton matrix: the comparison is not vacuous
    assert float(torch.linalg.eigvalsh(want).min()) < -1e-6 or conv


def test_recorder_stores_the_hessian_before_each_update(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randint(0, 3, (6,), generator=g) for _ in range(3)]
    engine = Engine(_model(), proj_dim=8, seed=0)
    want = []
    # the same run without the Hessian: the recorded gradients must not change
    plain = _model()
    popt = torch.optim.SGD(plain.parameters(), lr=0.3, momentum=0.9)
    with datavalue.Recorder(tmp_path / "plain.zarr", plain, proj_dim=8, optimizer=popt, storage_dtype="float64") as rec:
        for x, y in zip(xs, ys, strict=True):
            with rec.step(sample_ids=range(6)):
                F.cross_entropy(plain(x), y).backward()
            popt.step()
            popt.zero_grad()
    with datavalue.Recorder(tmp_path / "h.zarr", model, proj_dim=8, optimizer=opt, curvature="hessian",
                            storage_dtype="float64") as rec:
        for x, y in zip(xs, ys, strict=True):
            want.append(_explicit(model, lambda fwd, x=x, y=y: F.cross_entropy(fwd(x), y), engine).numpy())
            with rec.step(sample_ids=range(6), hessian_loss=lambda x=x, y=y: F.cross_entropy(model(x), y)):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    run = open_run(tmp_path / "h.zarr")
    assert run.has_hessian and not open_run(tmp_path / "plain.zarr").has_hessian
    H = run.read("hessian")
    assert H.shape == (3, 8, 8)
    for t in range(3):
        np.testing.assert_allclose(H[t], want[t], atol=1e-12)
    assert not np.allclose(H[0], H[2])  # the weights moved between steps
    np.testing.assert_array_equal(run.read("grads"), open_run(tmp_path / "plain.zarr").read("grads"))
    assert run.manifest["curvature"]["hessian"]["kind"] == "exact"


def test_fisher_and_hessian_together(tmp_path):
    model = _model()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=None, curvature=("fisher", "hessian"),
                            storage_dtype="float64") as rec:
        with rec.step(sample_ids=range(4), lr=0.1, hessian_loss=lambda: F.cross_entropy(model(x), y)):
            F.cross_entropy(model(x), y).backward()
    run = open_run(tmp_path / "r.zarr")
    assert run.has_fisher and run.has_hessian
    # for softmax cross-entropy the Fisher rows' F^T F is the Gauss-Newton part of the Hessian
    Fr = run.read("fisher")
    assert Fr.shape[0] == 4 * 3
    assert not np.allclose(Fr.T @ Fr, run.read("hessian")[0], atol=1e-6)  # tanh: residual term


def test_hessian_errors(tmp_path):
    model = _model()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with datavalue.Recorder(tmp_path / "a.zarr", model, proj_dim=None, curvature="hessian") as rec:
        with pytest.raises(RecorderError, match="hessian_loss=lambda"):
            with rec.step(sample_ids=range(4), lr=0.1):
                pass
        with pytest.raises(RecorderError, match="scalar loss"):
            with rec.step(sample_ids=range(4), lr=0.1,
                          hessian_loss=lambda: F.cross_entropy(model(x), y, reduction="none")):
                pass
    model2 = _model(1)
    with datavalue.Recorder(tmp_path / "b.zarr", model2, proj_dim=None) as rec:
        with pytest.raises(RecorderError, match="only used with Recorder"):
            with rec.step(sample_ids=range(4), lr=0.1, hessian_loss=lambda: F.cross_entropy(model2(x), y)):
                pass
    with pytest.raises(RecorderError, match="hessian_max_dim"):
        datavalue.Recorder(tmp_path / "c.zarr", _model(2), proj_dim=None, curvature="hessian", hessian_max_dim=10)


def test_recording_the_hessian_leaves_training_unchanged(tmp_path):
    """The Hessian's extra forward must not move BatchNorm statistics or the random state (dropout):
    a run recorded with curvature='hessian' ends bit-identical to the same run without it."""

    def train(curvature, name):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        g = torch.Generator().manual_seed(1)
        # BatchNorm in training mode mixes the batch's examples (no per-sample gradient): record the
        # Linear layers only; its running statistics still update at every forward
        with datavalue.Recorder(tmp_path / f"{name}.zarr", model, proj_dim=None, optimizer=opt, curvature=curvature,
                                storage_dtype="float64", layers=["0", "4"]) as rec:
            for _ in range(4):
                x = torch.randn(8, 5, generator=g, dtype=torch.float64)
                y = torch.randint(0, 3, (8,), generator=g)
                loss = (lambda x=x, y=y: F.cross_entropy(model(x), y)) if curvature else None
                with rec.step(sample_ids=range(8), hessian_loss=loss):
                    F.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
        return model.state_dict(), open_run(tmp_path / f"{name}.zarr").read("grads")

    plain, g_plain = train(None, "plain")
    hess, g_hess = train("hessian", "hessian")
    for k in plain:
        assert torch.equal(plain[k], hess[k]), k
    np.testing.assert_array_equal(g_plain, g_hess)


def test_cli_reports_and_builds_the_hessian(tmp_path, capsys):
    from datavalue.cli import main

    model = _model()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    path = tmp_path / "r.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, curvature="hessian", storage_dtype="float64") as rec:
        for _ in range(2):
            with rec.step(sample_ids=range(4), lr=0.1, hessian_loss=lambda: F.cross_entropy(model(x), y)):
                F.cross_entropy(model(x), y).backward()
    assert main(["info", str(path)]) == 0
    assert "recorded (k x k per step)" in capsys.readouterr().out
    assert main(["build", str(path), "--curvature", "hessian", "--blocks", "auto"]) == 0
    assert "hessian" in open_run(path).info()["embeddings"]
    # queries prefer the exact-Hessian build when several are present
    from datavalue.embeddings import build_embeddings
    from datavalue.query import Attributor

    build_embeddings(path, "empirical_fisher", progress=False)
    assert Attributor(path, model, progress=False).source.curvature == "hessian"
