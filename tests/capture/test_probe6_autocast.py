"""P6-03: recording under ``torch.autocast`` (CPU bfloat16 here; CUDA float16 takes the same path).

Before the fix a projected run died in the sketch GEMMs (``expected m1 and m2 to have the same dtype``) and an
exact run was refused by the update check with causes that did not apply (its tolerance was float32's).

Reference: each example's own gradient under the same autocast (its loss alone, backward, ``.grad``), sketched
with the run's projection (``project_full``). Tolerance ``2 eps`` of the autocast dtype (``4 u``, ``u`` its unit
roundoff): ``.grad`` is a GEMM output rounded to bfloat16/float16 (``u`` per element) and the rows start from the
first layer's float32 input where autocast rounds it (another ``u``); measured at most 4.2e-3 (bfloat16, 1.1 u) and
5.3e-4 (float16) on these models. Deterministic: fixed seeds, no sampling.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datavalue
from datavalue.capture._gradients import project_full
from datavalue.errors import RecorderError


class MatW(nn.Module):
    """No registered rule (the torch.func fallback); ``x @ w`` is autocast to the low precision."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x):
        return x @ self.w


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), MatW(), nn.LayerNorm(16), nn.Linear(16, 10))


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


_g = torch.Generator().manual_seed(0)
X = torch.randn(8, 64, generator=_g)
Y = torch.randint(0, 10, (8,), generator=_g)
TOK = torch.randint(0, 64, (4, 12), generator=_g)


def _loss(kind, m, sl, reduction="mean"):
    if kind == "mlp":
        return F.cross_entropy(m(X[sl]), Y[sl], reduction=reduction)
    return m(input_ids=TOK[sl], labels=TOK[sl]).loss


def _record_one_step(tmp_path, kind, dtype, proj_dim, *, backward_inside=False):
    model = _mlp() if kind == "mlp" else _gpt2()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    n = 8 if kind == "mlp" else 4
    path = tmp_path / f"{kind}_{proj_dim}.zarr"
    with datavalue.Recorder(path, model, proj_dim=proj_dim, optimizer=opt) as rec:
        with rec.step(sample_ids=torch.arange(n)):
            with torch.autocast("cpu", dtype=dtype):
                loss = _loss(kind, model, slice(None))
                if backward_inside:
                    loss.backward()
            if not backward_inside:
                loss.backward()
        refs = []
        for i in range(n):  # each example's own loss under the same autocast
            ref.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                li = _loss(kind, ref, slice(i, i + 1), reduction="sum")
            li.backward()
            refs.append(project_full(rec.engine, {k: q.grad for k, q in ref.named_parameters()}).numpy())
        opt.step()  # the update check runs here (before the fix: refused for an exact run)
        opt.zero_grad()
    run = datavalue.open_run(path)
    return np.asarray(run.grads[:]), np.stack(refs), run


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
@pytest.mark.parametrize("proj_dim", [64, None])
def test_autocast_bfloat16_rows_match_each_examples_autocast_gradient(tmp_path, kind, proj_dim):
    rows, ref, run = _record_one_step(tmp_path, kind, torch.bfloat16, proj_dim)
    assert run.n_steps == 1 and rows.dtype == np.float32
    rel = np.linalg.norm(rows - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 2 * torch.finfo(torch.bfloat16).eps, rel


def test_autocast_float16_without_scaler_and_backward_inside_the_autocast_block(tmp_path):
    # float16 autocast (the CUDA case's dtype), and the backward called inside `with autocast` (the rules' own
    # GEMMs then run with autocast off)
    rows, ref, _ = _record_one_step(tmp_path, "mlp", torch.float16, 64, backward_inside=True)
    rel = np.linalg.norm(rows - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 2 * torch.finfo(torch.float16).eps, rel


def test_autocast_steps_train_and_a_penalty_is_still_refused(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=64, optimizer=opt) as rec:
        for t in range(3):
            with rec.step(sample_ids=torch.arange(8) + 8 * t):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    F.cross_entropy(model(X), Y).backward()
            opt.step()
            opt.zero_grad()
        # an L2 penalty in the loss: its gradient reaches .grad but no row; the widened tolerance (4 eps of
        # bfloat16, 3.1e-2) still sees it
        with rec.step(sample_ids=torch.arange(8) + 100):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(X), Y) + 0.5 * sum(p.pow(2).sum() for p in model.parameters())
            loss.backward()
        with pytest.raises(RecorderError, match="L2 penalty"):
            opt.step()
    assert datavalue.open_run(tmp_path / "r.zarr").n_steps == 3


def test_gradscaler_is_refused_naming_it(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with datavalue.Recorder(tmp_path / "s.zarr", model, proj_dim=64, optimizer=opt) as rec:
        with rec.step(sample_ids=torch.arange(8)):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(X), Y)
            scaler.scale(loss).backward()
        with pytest.raises(RecorderError, match=r"GradScaler.*not supported.*bfloat16"):
            scaler.step(opt)
