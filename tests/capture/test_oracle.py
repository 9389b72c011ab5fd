"""Captured per-sample gradients equal a for-loop of single-example backwards (float64, rtol 1e-6)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.capture import exact_layout
from datavalue.store import open_run
from tests.capture.models import CNN, TinyGPT, fallback_model, mlp

B = 5


def _data(name, g):
    if name == "mlp" or name == "fallback":
        return torch.randn(B, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (B,), generator=g)
    if name == "cnn":
        return torch.randn(B, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (B,), generator=g)
    x = torch.randint(0, 11, (B, 5), generator=g)
    return x, torch.randint(0, 11, (B, 5), generator=g)


def _loss(name, out, y, reduction="mean"):
    if name == "gpt":  # token-mean per sequence, then mean over the batch
        per = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none").reshape(y.shape).mean(1)
        return per.mean() if reduction == "mean" else per
    return F.cross_entropy(out, y, reduction=reduction)


MODELS = {"mlp": mlp, "cnn": CNN, "gpt": TinyGPT, "fallback": fallback_model}


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_capture_matches_for_loop(tmp_path, name):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    g = torch.Generator().manual_seed(1)
    x, y = _data(name, g)
    path = tmp_path / "run.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, storage_dtype="float64") as rec:
        with rec.step(sample_ids=np.arange(B) + 100, lr=0.1):
            _loss(name, model(x), y).backward()
        blocks = rec.blocks
    run = open_run(path)
    captured = run.grads.compute()
    assert captured.shape == (B, sum(b["k"] for b in blocks))
    # oracle: one backward per example
    for i in range(B):
        model.zero_grad()
        _loss(name, model(x[i : i + 1]), y[i : i + 1]).backward()
        expect = exact_layout({n: p.grad for n, p in model.named_parameters()}, blocks)
        np.testing.assert_allclose(captured[i], expect, rtol=1e-6, atol=1e-10 * np.abs(expect).max())
    assert run.sample_id.tolist() == list(range(100, 100 + B))
    np.testing.assert_allclose(run.weight, np.full(B, 1 / B))


def test_rules_used_as_documented():
    plan = {b["name"]: b for b in datavalue.inspect(TinyGPT(), proj_dim=None)}
    assert plan["wte.weight"]["rule"] == "embedding" and plan["wte.weight"]["modules"] == ["wte", "head"]
    assert plan["pos"]["rule"].startswith("fallback")
    assert plan["ln1.weight"]["rule"] == "layernorm"
    assert plan["mha.in_proj_weight"]["rule"].startswith("fallback")
    assert "mha.out_proj.weight" in plan["mha.in_proj_weight"]["params"]
    assert plan["att.qkv.weight"]["rule"] == "linear" and plan["att.qkv.weight"]["has_bias"]
    params = {n for n, p in TinyGPT().named_parameters()}
    covered = [p for b in plan.values() for p in b["params"]]
    assert sorted(covered) == sorted(params)  # every trainable parameter exactly once


def test_gradients_not_disturbed_by_recording(tmp_path):
    """The recorder must not change what the optimizer sees (.grad of every parameter)."""
    torch.manual_seed(0)
    m1 = TinyGPT().double()
    m2 = TinyGPT().double()
    m2.load_state_dict(m1.state_dict())
    x, y = _data("gpt", torch.Generator().manual_seed(3))
    _loss("gpt", m1(x), y).backward()
    with datavalue.Recorder(tmp_path / "r.zarr", m2, proj_dim=64, curvature="fisher", fisher_max_classes=4) as rec:
        with rec.step(sample_ids=range(B), lr=0.1):
            _loss("gpt", m2(x), y).backward()
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("name", ["gpt", "cnn"])
def test_query_gradients_match_training_capture(tmp_path, name):
    """per_sample_gradients (test side, no .grad touched) equals what the recorder stored (projected)."""
    torch.manual_seed(0)
    model = MODELS[name]().double()
    x, y = _data(name, torch.Generator().manual_seed(2))
    path = tmp_path / "r.zarr"
    with datavalue.Recorder(path, model, proj_dim=96, seed=3, storage_dtype="float64") as rec:
        with rec.step(sample_ids=range(B), lr=0.1):
            _loss(name, model(x), y).backward()
    stored = open_run(path).grads.compute()
    before = [p.grad.clone() for p in model.parameters()]
    q = datavalue.per_sample_gradients(model, lambda m: _loss(name, m(x), y, reduction="none"), open_run(path))
    np.testing.assert_allclose(q, stored, rtol=1e-8, atol=1e-12)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


def test_query_gradients_refuse_other_model(tmp_path):
    from datavalue.errors import ModelMismatchError

    model = mlp()
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=16) as rec:
        with rec.step(sample_ids=range(2), lr=0.1):
            model(torch.randn(2, 6)).sum().backward()
    other = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4))
    with pytest.raises(ModelMismatchError, match="0.weight: \\[9, 6\\] vs \\[10, 6\\]"):
        datavalue.per_sample_gradients(other, lambda m: m(torch.randn(2, 6)).sum(1), open_run(tmp_path / "r.zarr"))


def test_hf_gpt2_exact_capture(tmp_path):
    """A tiny randomly initialised GPT-2 from a config (Conv1D, tied wte/lm_head, wpe, LayerNorm)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    plan = {b["name"]: b for b in datavalue.inspect(model, proj_dim=None)}
    assert plan["transformer.h.0.attn.c_attn.weight"]["rule"] == "hf_conv1d"
    assert plan["transformer.wte.weight"]["modules"] == ["transformer.wte", "lm_head"]
    ids = torch.randint(0, 13, (3, 6), generator=torch.Generator().manual_seed(0))

    def loss(m, x, reduction="mean"):
        logits = m(input_ids=x).logits
        per = F.cross_entropy(logits[:, :-1].reshape(-1, 13), x[:, 1:].reshape(-1), reduction="none").reshape(len(x), -1).mean(1)
        return per.mean() if reduction == "mean" else per

    with datavalue.Recorder(tmp_path / "g.zarr", model, proj_dim=None, storage_dtype="float64") as rec:
        with rec.step(sample_ids=range(3), lr=0.1):
            loss(model, ids).backward()
        blocks = rec.blocks
    captured = open_run(tmp_path / "g.zarr").grads.compute()
    for i in range(3):
        model.zero_grad()
        loss(model, ids[i : i + 1]).backward()
        expect = exact_layout({n: p.grad for n, p in model.named_parameters()}, blocks)
        np.testing.assert_allclose(captured[i], expect, rtol=1e-6, atol=1e-10 * np.abs(expect).max())


def test_projected_conv_capture_equals_the_sketch_of_each_exact_gradient(tmp_path):
    """Projected Conv1d/Conv2d rows (the column sketch runs as a convolution, no unfolded patches)
    equal the block sketch applied to each example's full gradient from a plain backward."""
    from datavalue.capture._gradients import engine_for_run, project_full

    torch.manual_seed(0)
    model = CNN().double()
    x, y = _data("cnn", torch.Generator().manual_seed(4))
    path = tmp_path / "r.zarr"
    with datavalue.Recorder(path, model, proj_dim=96, seed=5, storage_dtype="float64") as rec:
        with rec.step(sample_ids=range(B), lr=0.1):
            _loss("cnn", model(x), y).backward()
    run = open_run(path)
    assert {b["rule"] for b in run.blocks} >= {"conv2d", "conv1d"}
    engine = engine_for_run(model, run.manifest)
    want = []
    for i in range(B):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        want.append(project_full(engine, {n: p.grad for n, p in model.named_parameters()}).numpy())
    np.testing.assert_allclose(run.grads.compute(), np.stack(want), rtol=1e-8, atol=1e-12)
