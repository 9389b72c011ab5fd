"""Recording optimizers with several param groups: per-step per-group hyperparameters, the column ->
group map, the bias split of projected runs, and test gradients in the split layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datavalue
from datavalue.capture import per_sample_gradients
from datavalue.capture._gradients import engine_for_run, exact_layout
from datavalue.errors import RecorderError
from datavalue.store import open_run


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def _groups(model, wd=(0.1, 0.0), lr=(0.1, 0.05)):
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": wd[0], "lr": lr[0]},
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": wd[1], "lr": lr[1]}]


def _record(path, model, opt, *, proj_dim, steps=3, lr=None, schedule=None):
    gen = torch.Generator().manual_seed(1)
    with datavalue.Recorder(path, model, proj_dim=proj_dim, optimizer=opt, overwrite=True) as rec:
        for t in range(steps):
            if schedule is not None and t:
                schedule.step()
            x = torch.randn(5, 4, dtype=torch.float64, generator=gen)
            y = torch.randint(0, 2, (5,), generator=gen)
            opt.zero_grad()
            with rec.step(sample_ids=np.arange(5) + 5 * t, lr=lr):
                F.cross_entropy(model(x), y).backward()
            opt.step()
    return open_run(path)


def test_per_group_arrays_follow_the_schedule(tmp_path):
    model = _model()
    opt = torch.optim.SGD(_groups(model), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: 0.5**t, lambda t: 1.0 + t])
    run = _record(tmp_path / "r.zarr", model, opt, proj_dim=None, schedule=sched)
    hp = run.param_groups
    np.testing.assert_allclose(hp["lr"], [[0.1, 0.05], [0.05, 0.1], [0.025, 0.15]], rtol=1e-12)
    np.testing.assert_array_equal(hp["weight_decay"], [[0.1, 0.0]] * 3)
    np.testing.assert_array_equal(hp["momentum"], [[0.9, 0.9]] * 3)
    # the scalar arrays keep group 0 for older readers
    np.testing.assert_allclose(run.lr, [0.1, 0.05, 0.025], rtol=1e-12)
    np.testing.assert_array_equal(run.weight_decay, [0.1] * 3)
    assert run.optimizer["n_groups"] == 2 and len(run.optimizer["groups"]) == 2


def test_exact_column_map_follows_the_gradient_layout(tmp_path):
    """Exact runs keep [W | b] and map each column to its parameter's group (biases: group 1)."""
    model = _model()
    opt = torch.optim.SGD(_groups(model), lr=0.1)
    run = _record(tmp_path / "e.zarr", model, opt, proj_dim=None, steps=1)
    labels = np.empty(run.proj_dim, dtype=int)
    for a, b, g in run.column_groups["column_groups"]:
        labels[a:b] = g
    named = {n: torch.full_like(p, 1.0 if n.endswith("bias") else 0.0) for n, p in model.named_parameters()}
    np.testing.assert_array_equal(labels, exact_layout(named, run.blocks).astype(int))
    assert "split_bias" not in run.manifest["projection"]


def test_projected_run_splits_biases_and_queries_reproduce_it(tmp_path):
    model = _model()
    opt = torch.optim.SGD(_groups(model), lr=0.1)
    run = _record(tmp_path / "p.zarr", model, opt, proj_dim=6, steps=1)
    assert [(b["name"], b["kind"]) for b in run.blocks] == [
        ("0.weight", "kron"), ("0.bias", "dense"), ("2.weight", "kron"), ("2.bias", "dense")]
    assert run.column_groups["mixed_blocks"] == {}
    eng = engine_for_run(model, run.manifest)  # test gradients: the same split layout
    assert [b.to_json() for b in eng.blocks] == run.blocks
    x = torch.randn(3, 4, dtype=torch.float64)
    g = per_sample_gradients(model, lambda m: F.cross_entropy(m(x), torch.tensor([0, 1, 0]), reduction="none"), run)
    assert g.shape == (3, run.proj_dim)


def test_groups_sharing_settings_change_nothing_in_the_layout(tmp_path):
    """Same hyperparameters in both groups: no split, the blocks of a one-group run."""
    model = _model()
    one = _record(tmp_path / "one.zarr", model, torch.optim.SGD(model.parameters(), lr=0.1), proj_dim=6, steps=1)
    model = _model()
    two = _record(tmp_path / "two.zarr", model, torch.optim.SGD(_groups(model, wd=(0.0, 0.0), lr=(0.1, 0.1)), lr=0.1),
                  proj_dim=6, steps=1)
    assert two.blocks == one.blocks
    assert "split_bias" not in two.manifest["projection"]
    assert one.column_groups is None and not one.has_param_groups
    np.testing.assert_array_equal(np.asarray(two.grads), np.asarray(one.grads))


def test_explicit_lr_that_disagrees_with_the_groups_is_refused(tmp_path):
    model = _model()
    opt = torch.optim.SGD(_groups(model), lr=0.1)
    with pytest.raises(RecorderError, match="param group 0"):
        _record(tmp_path / "x.zarr", model, opt, proj_dim=None, steps=1, lr=0.3)
    _record(tmp_path / "y.zarr", model, opt, proj_dim=None, steps=1, lr=0.1)  # agrees: fine


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(1, 2, 3)
        self.c1 = nn.Conv1d(2, 2, 2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):  # x: (b, 1, 5, 5)
        h = torch.tanh(self.c2(x))  # (b, 2, 3, 3)
        h = torch.tanh(self.c1(h.flatten(2)))  # (b, 2, 8)
        return self.fc(h[:, :, :3].flatten(1))


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


@pytest.mark.parametrize("arch", ["convnet", "gpt2"])
@pytest.mark.parametrize("proj_dim", [10**6, 40])
def test_split_bias_rows_equal_each_examples_gradient(tmp_path, arch, proj_dim):
    """Linear, Conv1d, Conv2d and HF Conv1D record a bias in another group as its own block; the
    rows equal the sketch of each example's full gradient (identity sketches: the gradient itself)."""
    from datavalue.capture._gradients import engine_for_run, project_full

    torch.manual_seed(0)
    if arch == "convnet":
        model = _ConvNet().double()
        x = torch.randn(3, 1, 5, 5, dtype=torch.float64)
        y = torch.tensor([0, 2, 1])

        def loss(m, i):
            return F.cross_entropy(m(x[i]), y[i], reduction="none")
    else:
        model = _gpt2()
        ids = torch.randint(0, 13, (3, 6), generator=torch.Generator().manual_seed(0))

        def loss(m, i):
            logits = m(input_ids=ids[i]).logits
            return F.cross_entropy(logits[:, :-1].reshape(-1, 13), ids[i][:, 1:].reshape(-1),
                                   reduction="none").reshape(len(ids[i]), -1).mean(1)
    opt = torch.optim.SGD(_groups(model), lr=0.1)
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=proj_dim, optimizer=opt, storage_dtype="float64") as rec:
        with rec.step(sample_ids=range(3)):
            loss(model, slice(None)).mean().backward()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt.step()  # a recorded step is written once its update has run
    model.load_state_dict(before)  # the oracle below: gradients at the recorded weights
    run = open_run(tmp_path / "r.zarr")
    split = run.manifest["projection"]["split_bias"]
    kinds = {b["name"]: b["kind"] for b in run.blocks}
    assert split and all(kinds[b] == "dense" for b in split)
    if arch == "convnet":
        assert split == ["c1.bias", "c2.bias", "fc.bias"]
    else:
        assert "transformer.h.0.attn.c_attn.bias" in split
    eng = engine_for_run(model, run.manifest)
    rows = np.asarray(run.grads)
    for i in range(3):
        model.zero_grad()
        loss(model, slice(i, i + 1)).sum().backward()
        want = project_full(eng, {n: p.grad for n, p in model.named_parameters()}).numpy()
        np.testing.assert_allclose(rows[i], want, rtol=1e-8, atol=1e-10 * np.abs(want).max())
        if proj_dim == 10**6:  # identity sketches: the exact per-sample gradient in the split layout
            exact = exact_layout({n: p.grad for n, p in model.named_parameters()}, run.blocks)
            np.testing.assert_allclose(rows[i], exact, rtol=1e-8, atol=1e-10 * np.abs(exact).max())
