"""The recorder's fast paths (issue 20) record the same numbers as the slow ones they replaced.

``adam_moments`` is checked against :func:`_reference_adam_moments`, the implementation it replaced
(concatenate each block's moments with ``block_matrix``, convert to float64, take the mean), on
exact and projected runs, several param groups, frozen parameters and parameters without state yet.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datavalue.capture._engine import Engine, to_numpy
from datavalue.capture._gradients import block_matrix
from datavalue.capture._optim import _param_views, adam_moments, unwrap_optimizer


def _reference_adam_moments(opt, model, engine):
    """The slow oracle: ``adam_moments`` as it was before issue 20's rewrite (one concatenated float64
    copy of every block's moments per step)."""
    opt = unwrap_optimizer(opt)
    params = dict(model.named_parameters())
    m_named, v_named, steps = {}, {}, set()
    for name, p in params.items():
        st = opt.state.get(p, {})
        m_named[name] = st["exp_avg"].detach() if "exp_avg" in st else torch.zeros_like(p)
        v_named[name] = st["exp_avg_sq"].detach() if "exp_avg_sq" in st else torch.zeros_like(p)
        if p.requires_grad:
            s = st.get("step", 0)
            steps.add(float(s.item() if torch.is_tensor(s) else s))
    m_parts, v_parts = [], []
    for b in engine.blocks:
        bj = b.to_json()
        exact = b.k == int(np.prod(bj["shape"])) and engine.proj_dim is None
        mm = block_matrix(bj, m_named).to(torch.float64).reshape(-1)
        vv = block_matrix(bj, v_named).to(torch.float64).reshape(-1)
        if not exact:
            mm, vv = mm.mean().expand(b.k), vv.mean().expand(b.k)
        m_parts.append(mm)
        v_parts.append(vv)
    return {"adam_m": to_numpy(torch.cat(m_parts)), "adam_v": to_numpy(torch.cat(v_parts)),
            "adam_step": (max(steps) if steps else 0.0) + 1.0}


class _Net(nn.Module):
    """Linear, Conv2d, Embedding, LayerNorm, a frozen weight, a bias-free Linear, and a branch (``late``)
    that joins only after a few steps, so its parameters have no optimizer state at first."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(1, 3, 3)
        self.a = nn.Linear(6 + 12, 8)
        self.late = nn.Linear(8, 8, bias=False)
        self.frozen = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.out = nn.Linear(8, 4)
        self.frozen.weight.requires_grad_(False)

    def forward(self, tok, img, use_late):
        h = torch.cat([self.emb(tok), self.conv(img).mean((2, 3)).repeat(1, 4)], 1)
        h = torch.tanh(self.a(h))
        if use_late:
            h = h + self.late(h)
        return self.out(self.ln(self.frozen(h)))


def _check_every_step(model, opt, engines, loss_at, steps):
    """Compare the fast and the reference moments before each of ``steps`` updates, for every engine."""
    params = dict(model.named_parameters())
    for eng in engines:  # the built-in rules' exact blocks take the fast path (copies into views), not the fallback
        if eng.proj_dim is None:
            assert all(_param_views(torch.empty(b.k), b, params) is not None for b in eng.blocks)
    compared = 0
    for s in range(steps):
        for eng in engines:
            new, ref = adam_moments(opt, model, eng), _reference_adam_moments(opt, model, eng)
            assert new["adam_step"] == ref["adam_step"]
            for key in ("adam_m", "adam_v"):
                assert new[key].dtype == np.float64 and new[key].shape == (eng.k,)
                if eng.proj_dim is None:  # copies: bit for bit
                    np.testing.assert_array_equal(new[key], ref[key])
                else:  # a mean summed in another order: float64 rounding
                    # (absolute, against the largest mean: a block whose moments cancel, such as the
                    # softmax output layer's exp_avg, has a mean of rounding noise in both versions)
                    scale = np.abs(ref[key]).max()
                    np.testing.assert_allclose(new[key], ref[key], rtol=1e-13, atol=1e-13 * scale)
                    # float32 storage: the same bytes, except for such noise
                    big = np.abs(ref[key]) > 1e-9 * scale
                    np.testing.assert_array_equal(new[key][big].astype(np.float32), ref[key][big].astype(np.float32))
            compared += 1
        opt.zero_grad()
        loss_at(s).backward()
        opt.step()
    return compared


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.Adam])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_moments_match_the_reference(opt_cls, dtype):
    torch.manual_seed(0)
    model = _Net().to(dtype)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if n.endswith("weight")]
    no_decay = [p for n, p in named if not n.endswith("weight") and not n.startswith("out.")]
    # out.bias is in no group (recorded, never updated): zeros, like a parameter without state
    opt = opt_cls([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "lr": 3e-3, "weight_decay": 0.0}],
                  lr=1e-2)
    g = torch.Generator().manual_seed(1)
    tok, img = torch.randint(0, 11, (5,), generator=g), torch.randn(5, 1, 6, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (5,), generator=g)
    engines = [Engine(model, proj_dim=None, seed=0), Engine(model, proj_dim=40, seed=0),
               Engine(model, proj_dim=40, seed=0, optimizer=opt),  # biases of other groups: own blocks
               Engine(model, proj_dim={"a.weight": 6, "out.weight": 4, "late.weight": 9}, seed=0, layers=["a", "out", "late"])]
    assert any(b.kind == "dense" for b in engines[0].blocks) and any(b.kind == "kron" for b in engines[0].blocks)
    n = _check_every_step(model, opt, engines, lambda s: F.cross_entropy(model(tok, img, s >= 2), y), steps=5)
    assert n == 5 * len(engines)
    assert all("exp_avg" in opt.state.get(p, {}) for p in model.late.parameters())  # joined at step 2: state since


def test_adam_moments_match_on_gpt2_layout():
    """HF GPT-2: Conv1D blocks (``[W; b]``, bias_axis=0) and the tied embedding / LM head."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 97, (3, 8), generator=torch.Generator().manual_seed(2))

    def loss(_s):
        logits = model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))

    engines = [Engine(model, proj_dim=None, seed=0), Engine(model, proj_dim=64, seed=0)]
    assert any(b.bias_axis == 0 and b.has_bias for b in engines[0].blocks)
    assert _check_every_step(model, opt, engines, loss, steps=3) == 6


def test_adam_moments_unknown_exact_layout_uses_block_matrix():
    """An exact block whose parameters do not tile its shape the way the views expect (a custom rule's
    layout) falls back to ``block_matrix`` and still matches the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    eng = Engine(model, proj_dim=None, seed=0)
    b0 = eng.blocks[0]
    # a Kronecker block that lists an extra parameter it does not lay out: block_matrix reads the first two only
    odd = types.SimpleNamespace(**{**b0.__dict__, "params": [*b0.params, "1.bias"]},
                                to_json=lambda: {**b0.to_json(), "params": [*b0.params, "1.bias"]})
    fake = types.SimpleNamespace(blocks=[odd], proj_dim=None, k=b0.k)
    x = torch.randn(4, 3)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    new, ref = adam_moments(opt, model, fake), _reference_adam_moments(opt, model, fake)
    np.testing.assert_array_equal(new["adam_m"], ref["adam_m"])
    np.testing.assert_array_equal(new["adam_v"], ref["adam_v"])


def _block_mean_abs(opt, model, engine):
    """Each projected block's mean ``|moment|`` in its columns (the scale of a float32 sum's rounding)."""
    params = dict(model.named_parameters())
    out = {}
    for j, key in enumerate(("exp_avg", "exp_avg_sq")):
        named = {n: opt.state[p][key].detach().abs() if key in opt.state.get(p, {}) else torch.zeros_like(p)
                 for n, p in params.items()}
        out[("adam_m", "adam_v")[j]] = np.concatenate([
            np.full(b.k, float(block_matrix(b.to_json(), named).to(torch.float64).mean())) for b in engine.blocks])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_moments_in_the_parameters_dtype_are_within_its_rounding(dtype):
    """``precise=False`` (what a float32 recording uses, issue 20): each block's sum in the parameters' own
    dtype. Against the float64 reference, within 1e-6 of the block's mean ``|moment|`` for float32 (the sum's
    rounding, ~1e-8 measured; a sum that dropped a parameter or a block misses by > 1e-2); bit for bit in
    float64 parameters, where the two sums are the same."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 5)).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 64, dtype=dtype), torch.randint(0, 5, (16,))
    eng = Engine(model, proj_dim=40, seed=0)
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    fast, ref = adam_moments(opt, model, eng, precise=False), _reference_adam_moments(opt, model, eng)
    scale = _block_mean_abs(opt, model, eng)
    for key in ("adam_m", "adam_v"):
        err = np.abs(fast[key] - ref[key]) / scale[key]
        assert err.max() <= (1e-6 if dtype == torch.float32 else 1e-13), (key, err.max())
        assert fast[key].dtype == np.float64


@pytest.mark.parametrize(("storage", "rtol"), [("float64", 1e-13), ("float32", 1e-6)])
def test_the_recorder_sums_the_moments_in_float64_only_for_float64_storage(tmp_path, storage, rtol):
    """A recording stores the moments' block means within its storage's rounding of the float64 reference:
    float64 storage keeps float64 sums (1e-13 of the block's mean |moment|), float32 storage the cheaper
    sums (1e-6)."""
    import datavalue

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 64), torch.randint(0, 5, (8,))
    rec = datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=24, optimizer=opt, storage_dtype=storage)
    refs, scales = [], []
    for s in range(3):
        with rec.step(range(8 * s, 8 * s + 8)):
            F.cross_entropy(model(x), y).backward()
        refs.append(_reference_adam_moments(opt, model, rec.layout))  # the state the step recorded (before the update)
        scales.append(_block_mean_abs(opt, model, rec.layout) if s else None)
        opt.step()
        opt.zero_grad()
    rec.close()
    run = datavalue.open_run(tmp_path / "r.zarr")
    for key in ("adam_m", "adam_v"):
        stored = np.asarray(run.read(key), dtype=np.float64)
        for s in (1, 2):  # step 0: no state yet (zeros)
            err = np.abs(stored[s] - refs[s][key]) / scales[s][key]
            assert err.max() <= rtol, (storage, key, s, err.max())
