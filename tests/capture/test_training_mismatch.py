"""Training that differs from what a run records is refused, before anything of the step is written
(issue 22, item 10): gradient accumulation inside one ``rec.step`` block, resuming with another
optimizer, hyperparameters no update can have, and a trainable set that changes mid-run.

Each refusal is checked next to the ground truth it protects: the rows a correct recording stores are
the per-example gradients of an autograd oracle, and the accepted look-alikes (two views of one
batch, two losses on one forward, gradient checkpointing) still record those exact rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import datavalue
from datavalue.errors import RecorderError, StoreMismatchError
from datavalue.store import open_run

X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def _oracle(model, loss_of_example):
    """``(b, P)`` per-example gradients by one autograd call per example (flattened in the run's order for
    an exact run of this MLP: per Linear ``[W | b]`` row-major)."""
    rows = []
    for i in range(len(Y)):
        grads = torch.autograd.grad(loss_of_example(i), [p for p in model.parameters()])
        w0, b0, w1, b1 = grads
        rows.append(torch.cat([torch.cat([w0, b0[:, None]], 1).reshape(-1), torch.cat([w1, b1[:, None]], 1).reshape(-1)]))
    return torch.stack(rows).numpy()


def _rows(path):
    return np.asarray(open_run(path).grads.compute(), np.float64)


# ----------------------------------------------------------------------------- accumulation
def test_accumulation_inside_one_step_is_refused_and_microbatches_record_the_truth(tmp_path):
    model = _model()
    with datavalue.Recorder(tmp_path / "a.zarr", model, proj_dim=None, storage_dtype="float64") as rec:
        with pytest.raises(RecorderError, match=r"second forward and backward.*rec\.microbatch"):
            with rec.step(sample_ids=range(4), lr=0.1):  # ids of one micro-batch, two micro-batches run
                for mb in range(2):
                    F.cross_entropy(model(X[4 * mb : 4 * mb + 4]), Y[4 * mb : 4 * mb + 4]).backward()
        model.zero_grad()
        assert rec.n_steps == 0  # nothing written for the refused step
        for mb in range(2):  # the supported way
            with rec.microbatch(range(4 * mb, 4 * mb + 4)):
                (F.cross_entropy(model(X[4 * mb : 4 * mb + 4]), Y[4 * mb : 4 * mb + 4]) / 2).backward()
        rec.commit_step(lr=0.1)
    truth = _oracle(model, lambda i: F.cross_entropy(model(X[i : i + 1]), Y[i : i + 1]))
    np.testing.assert_allclose(_rows(tmp_path / "a.zarr"), truth, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pattern", ["two views, one backward", "two losses, one forward", "checkpointing",
                                     "checkpointing a segment, reentrant"])
def test_look_alikes_of_accumulation_are_accepted_and_exact(tmp_path, pattern):
    model = _model()
    b = 4

    def loss_of(x, y):  # the per-example loss that each pattern sums over the batch
        if pattern == "two views, one backward":
            return F.cross_entropy(model(x), y, reduction="sum") + F.cross_entropy(model(2 * x), y, reduction="sum")
        out = model(x)
        return F.cross_entropy(out, y, reduction="sum") + 0.5 * out.pow(2).sum()

    with datavalue.Recorder(tmp_path / "v.zarr", model, proj_dim=None, storage_dtype="float64",
                            loss_reduction="sum") as rec:
        with rec.step(sample_ids=range(b), lr=0.1):
            x, y = X[:b], Y[:b]
            if pattern == "two views, one backward":
                loss_of(x, y).backward()
            elif pattern == "two losses, one forward":
                out = model(x)
                F.cross_entropy(out, y, reduction="sum").backward(retain_graph=True)
                (0.5 * out.pow(2).sum()).backward()
            elif pattern == "checkpointing":
                out = checkpoint(model, x, use_reentrant=False)
                (F.cross_entropy(out, y, reduction="sum") + 0.5 * out.pow(2).sum()).backward()
            else:  # the first layer is recomputed inside the backward, after the last layer's gradient arrived
                out = model[2](model[1](checkpoint(model[0], x.clone().requires_grad_(), use_reentrant=True)))
                (F.cross_entropy(out, y, reduction="sum") + 0.5 * out.pow(2).sum()).backward()
    truth = _oracle(model, lambda i: loss_of(X[i : i + 1], Y[i : i + 1]))[:b]
    np.testing.assert_allclose(_rows(tmp_path / "v.zarr"), truth, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- resume
def _record(path, model, opt, steps, **kw):
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, **kw) as rec:
        for _ in range(steps):
            with rec.step(sample_ids=range(rec.n_steps * 8, rec.n_steps * 8 + 8)):
                F.cross_entropy(model(X), Y).backward()
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("other, said", [
    (lambda ps: torch.optim.Adam(ps, lr=0.1), r"optimizer kind: recorded 'sgd', now 'adam'"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), r"optimizer nesterov: recorded False, now True"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.5), r"optimizer dampening: recorded 0\.0, now 0\.5"),
])
def test_resume_with_another_optimizer_is_refused(tmp_path, other, said):
    model = _model()
    path = tmp_path / "r.zarr"
    _record(path, model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 2)
    with pytest.raises(StoreMismatchError, match=said + r".*Resume with the optimizer the run was recorded with"):
        datavalue.Recorder(path, model, proj_dim=None, optimizer=other(model.parameters()), resume=True)
    assert open_run(path).n_steps == 2  # untouched
    _record(path, model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0), 1, resume=True)  # same kind: fine
    run = open_run(path)  # (momentum 0: a fresh optimizer restarting a momentum buffer is refused, tests/capture/test_probe5_training.py)
    assert run.n_steps == 3 and run.lr.tolist() == [0.1, 0.1, 0.05] and run.momentum.tolist() == [0.9, 0.9, 0.0]


def test_resume_adam_with_other_betas_is_refused(tmp_path):
    model = _model()
    path = tmp_path / "r.zarr"
    _record(path, model, torch.optim.AdamW(model.parameters(), lr=1e-2), 1)
    with pytest.raises(StoreMismatchError, match=r"optimizer betas: recorded \[0\.9, 0\.999\], now \[0\.9, 0\.95\]"):
        datavalue.Recorder(path, model, proj_dim=None, resume=True,
                           optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95)))


# ----------------------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize("make, key, value, said", [
    ("sgd", "lr", float("nan"), r"lr=nan"),
    ("sgd", "lr", -1.0, r"lr=-1\.0"),
    ("sgd", "lr", torch.tensor(float("inf")), r"lr=inf"),
    ("sgd", "weight_decay", float("nan"), r"weight_decay=nan"),
    ("sgd", "momentum", float("-inf"), r"momentum=-inf"),
    ("adam", "betas", (0.9, float("nan")), r"betas\[1\]=nan"),
    ("adam", "betas", (1.0, 0.999), r"betas\[0\]=1\.0"),
    ("adam", "eps", float("inf"), r"eps=inf"),
    ("adam", "lr", "0.1", r"lr='0\.1' \(not a number\)"),
])
def test_hyperparameters_no_update_can_have_are_refused(tmp_path, make, key, value, said):
    model = _model()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if make == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    with datavalue.Recorder(tmp_path / "h.zarr", model, proj_dim=None, optimizer=opt) as rec:
        with rec.step(sample_ids=range(8)):
            F.cross_entropy(model(X), Y).backward()
        opt.step()
        opt.zero_grad()
        opt.param_groups[0][key] = value  # what a broken scheduler or a manual edit leaves
        with pytest.raises(RecorderError, match=r"step 1: the optimizer's param group 0 reports " + said):
            with rec.step(sample_ids=range(8, 16)):
                F.cross_entropy(model(X), Y).backward()
    run = open_run(tmp_path / "h.zarr")
    assert run.n_steps == 1 and np.isfinite(run.lr).all()


def test_a_bad_second_param_group_is_named(tmp_path):
    model = _model()
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}], lr=0.1)
    opt.param_groups[1]["lr"] = float("nan")
    with datavalue.Recorder(tmp_path / "g.zarr", model, proj_dim=None, optimizer=opt) as rec:
        with pytest.raises(RecorderError, match=r"param group 1 reports lr=nan"):
            with rec.step(sample_ids=range(8)):
                F.cross_entropy(model(X), Y).backward()
    assert open_run(tmp_path / "g.zarr").n_steps == 0


# ----------------------------------------------------------------------------- trainable set
@pytest.mark.parametrize("change", ["unfreeze", "freeze"])
def test_a_trainable_set_that_changes_mid_run_is_refused(tmp_path, change):
    model = _model()
    if change == "unfreeze":
        model[0].requires_grad_(False)
    with datavalue.Recorder(tmp_path / "t.zarr", model, proj_dim=None) as rec:
        with rec.step(sample_ids=range(8), lr=0.1):
            F.cross_entropy(model(X), Y).backward()
        model.zero_grad()
        model[0].requires_grad_(change == "unfreeze")
        said = r"now trainable: \['0\.bias', '0\.weight'\]" if change == "unfreeze" else r"no longer trainable: \['0\.bias'"
        with pytest.raises(RecorderError, match=r"step 1: the model's trainable parameters changed.*" + said
                           + r".*new run"):
            with rec.step(sample_ids=range(8, 16), lr=0.1):
                F.cross_entropy(model(X), Y).backward()
    assert open_run(tmp_path / "t.zarr").n_steps == 1


# ----------------------------------------------------------------------------- a backward outside the blocks
def test_a_micro_batch_backpropagated_outside_the_block_is_refused_at_the_optimizer_step(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with datavalue.Recorder(tmp_path / "o.zarr", model, proj_dim=None, optimizer=opt) as rec:
        with rec.step(sample_ids=range(4)):  # the block holds the first micro-batch only
            (F.cross_entropy(model(X[:4]), Y[:4]) / 2).backward()
        (F.cross_entropy(model(X[4:]), Y[4:]) / 2).backward()  # the second, outside: in .grad, not in the run
        with pytest.raises(RecorderError, match=r"optimizer\.step\(\): a backward pass outside any recorded block.*"
                           r"rec\.microbatch"):
            opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the update was not applied


def test_what_is_not_an_unrecorded_backward_passes(tmp_path):
    """Clipping inside the block (told through ``h.clip_coef``), a gradient probe zeroed before the next block,
    and a query (``autograd.grad``, never ``.grad``) during training are not unrecorded gradient. (Clipping
    after the block without telling the recorder is refused: tests/capture/test_training_mismatch_more.py.)"""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "ok.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, storage_dtype="float64") as rec:
        for t in range(3):
            F.cross_entropy(model(X), Y).backward()  # a probe of the gradient norm, then zeroed
            opt.zero_grad()
            with rec.step(sample_ids=range(8 * t, 8 * t + 8)) as h:
                F.cross_entropy(model(X), Y).backward()
                norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
                h.clip_coef = min(1.0, 0.05 / (norm + 1e-6))
            datavalue.capture.per_sample_gradients(model, lambda m: F.cross_entropy(m(X), Y, reduction="none"),
                                                   rec.writer.manifest)
            opt.step()
            opt.zero_grad()
    assert open_run(path).n_steps == 3
