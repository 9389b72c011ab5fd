"""Training that differs from what a run records, caught at ``optimizer.step()`` (issue 22, item 4):
a forgotten ``zero_grad()``, gradient clipping the recorder was not told of, hyperparameters changed
between the recorded block and the update, an update skipped or run twice, and resuming with weights
that are not the run's.

Every refusal leaves nothing of the refused step in the run and the model's weights as they were; next
to each, the legitimate look-alike (clipping told through ``h.clip_coef`` or ``clip_coef="auto"``, a
scheduler stepped after the optimizer, a ``GradScaler``-style skip of a non-finite step) is accepted and
records what the update applied. Thresholds: ``datavalue.capture._optim.GRADIENT_RTOL`` (1e-3; honest
float32 residuals measured below 5e-7, the broken cases here are 0.1 or more).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.errors import RecorderError, RecorderStateError, StoreMismatchError
from datavalue.store import open_run

X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, model):
    return all(torch.equal(x, p) for x, p in zip(a, model.parameters()))


def _loss(model, t=0):
    x = X.to(next(model.parameters()).dtype)
    return F.cross_entropy(model(x * (1 + 0.3 * t)), Y)  # another batch at every step


# ----------------------------------------------------------------------------- 1. zero_grad forgotten
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("make, lr, said", [
    ("sgd", 0.5, r"optimizer\.zero_grad\(\) was probably not called"),
    ("adamw", 0.05, r"optimizer\.zero_grad\(\) was probably not called"),
    # the same batch and a tiny lr: the previous gradient is parallel to this one, the multiple is 2
    ("sgd-same-batch", 1e-9, r"is 2 times the one the step recorded.*zero_grad\(\) was probably not called"),
])
def test_a_forgotten_zero_grad_is_refused_before_its_update(tmp_path, dtype, make, lr, said):
    model = _model(dtype)
    opt = (torch.optim.AdamW(model.parameters(), lr=lr) if make == "adamw"
           else torch.optim.SGD(model.parameters(), lr=lr))
    same = make == "sgd-same-batch"
    path = tmp_path / "z.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, storage_dtype="float64") as rec:
        with rec.step(sample_ids=range(8)):
            _loss(model).backward()
        opt.step()  # no opt.zero_grad(): the next backward adds onto this step's gradient
        with rec.step(sample_ids=range(8, 16)):
            _loss(model, 0 if same else 1).backward()
        before = _weights(model)
        with pytest.raises(RecorderError, match=said + r".*The update was not applied\. Step 1 was not written"):
            opt.step()
        assert _same(before, model)
        assert rec.n_steps == 1
    assert open_run(path).n_steps == 1


def test_zero_grad_before_the_block_passes_and_a_retry_after_the_refusal_records_the_truth(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    path = tmp_path / "ok.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, storage_dtype="float64") as rec:
        for t in range(3):
            opt.zero_grad()  # before the block is as good as after the step
            with rec.step(sample_ids=range(8 * t, 8 * t + 8)):
                _loss(model, t).backward()
            if t == 1:  # an extra unrecorded term edited into .grad: refused, then the step is recorded again
                model[0].weight.grad.add_(1.0)
                with pytest.raises(RecorderError, match=r"not the one the step recorded"):
                    opt.step()
                opt.zero_grad()
                with rec.step(sample_ids=range(8 * t, 8 * t + 8)):
                    _loss(model, t).backward()
            opt.step()
    run = open_run(path)
    assert run.n_steps == 3 and run.step_ptr.tolist() == [0, 8, 16, 24]


# ----------------------------------------------------------------------------- 2. clipping
@pytest.mark.parametrize("where", ["after the block", "inside the block, h.clip_coef not set", "grad scaled by hand"])
def test_clipping_the_recorder_was_not_told_of_is_refused(tmp_path, where):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "c.zarr"
    with datavalue.Recorder(path, model, proj_dim=8, optimizer=opt) as rec:
        with rec.step(sample_ids=range(8)):
            _loss(model).backward()
            if where.startswith("inside"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        if where == "after the block":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        elif where == "grad scaled by hand":
            for p in model.parameters():
                p.grad.mul_(0.5)
        before = _weights(model)
        said = r"scaled by 0\.5 after" if where == "grad scaled by hand" else r"scaled by 0\.\d+ after"
        with pytest.raises(RecorderError, match=said + r" the step recorded clip_coef=1 .*h\.clip_coef.*"
                           r"clip_coef='auto'"):
            opt.step()
        assert _same(before, model)
    assert open_run(path).n_steps == 0


@pytest.mark.parametrize("how", ["h.clip_coef", "commit_step auto", "commit_step value"])
def test_clipping_the_recorder_knows_passes_and_is_recorded(tmp_path, how):
    model = _model(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    path = tmp_path / "k.zarr"
    coefs = []
    with datavalue.Recorder(path, model, proj_dim=16, optimizer=opt) as rec:
        for t in range(3):
            if how == "h.clip_coef":
                with rec.step(sample_ids=range(8 * t, 8 * t + 8)) as h:
                    _loss(model, t).backward()
                    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
                    h.clip_coef = min(1.0, 0.05 / (norm + 1e-6))
            else:
                for mb in range(2):
                    with rec.microbatch(range(8 * t + 4 * mb, 8 * t + 4 * mb + 4)):
                        x = X[4 * mb : 4 * mb + 4].float() * (1 + 0.3 * t)
                        (F.cross_entropy(model(x), Y[4 * mb : 4 * mb + 4]) / 2).backward()
                norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
                rec.commit_step(clip_coef="auto" if how == "commit_step auto" else min(1.0, 0.05 / (norm + 1e-6)))
            coefs.append(min(1.0, 0.05 / (norm + 1e-6)))
            opt.step()
            opt.zero_grad()
    run = open_run(path)
    assert run.n_steps == 3 and max(coefs) < 0.9  # clipping was active
    np.testing.assert_allclose(run.grad_scale, coefs, rtol=1e-4)


# ----------------------------------------------------------------------------- 3. hyperparameters
def test_a_scheduler_stepped_before_the_optimizer_is_refused_with_both_values(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    path = tmp_path / "s.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt) as rec:
        for t in range(2):  # the right order: the run records the lr each update used
            with rec.step(sample_ids=range(8 * t, 8 * t + 8)):
                _loss(model, t).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        with rec.step(sample_ids=range(16, 24)):
            _loss(model, 2).backward()
        sched.step()  # the wrong order: the update would use 0.0125, the run records 0.025
        before = _weights(model)
        with pytest.raises(RecorderError, match=r"param group 0 lr: recorded 0\.025, now 0\.0125.*"
                           r"scheduler\.step\(\) after optimizer\.step\(\)"):
            opt.step()
        assert _same(before, model)
    run = open_run(path)
    assert run.n_steps == 2 and run.lr.tolist() == [0.1, 0.05]


@pytest.mark.parametrize("key, value, said", [
    ("momentum", 0.5, r"param group 1 momentum: recorded 0\.9, now 0\.5"),
    ("weight_decay", 0.01, r"param group 1 weight_decay: recorded 0\.0, now 0\.01"),
    ("lr", 0.3, r"param group 1 lr: recorded 0\.5, now 0\.3"),
])
def test_a_param_group_edited_between_the_block_and_the_step_is_refused(tmp_path, key, value, said):
    model = _model()
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}],
                          lr=0.1, momentum=0.9)
    with datavalue.Recorder(tmp_path / "g.zarr", model, proj_dim=None, optimizer=opt) as rec:
        with rec.step(sample_ids=range(8)):
            _loss(model).backward()
        opt.param_groups[1][key] = value
        with pytest.raises(RecorderError, match=said):
            opt.step()
    assert open_run(tmp_path / "g.zarr").n_steps == 0


def test_an_explicit_lr_the_optimizer_does_not_use_is_refused(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(tmp_path / "l.zarr", model, proj_dim=None, optimizer=opt) as rec:
        with rec.step(sample_ids=range(8), lr=0.1):  # agrees: fine
            _loss(model).backward()
        opt.step()
        opt.zero_grad()
        with rec.step(sample_ids=range(8, 16), lr=0.5):
            _loss(model, 1).backward()
        with pytest.raises(RecorderError, match=r"recorded lr=0\.5 \(given to rec\.step\(lr=\.\.\.\).*updates with lr 0\.1.*omit lr="):
            opt.step()
    assert open_run(tmp_path / "l.zarr").lr.tolist() == [0.1]


# ----------------------------------------------------------------------------- 4. skipped or doubled updates
@contextlib.contextmanager
def _step_1_awaiting_its_update(path):
    """A run at ``path`` with step 0 recorded and applied and step 1's block recorded, its
    ``optimizer.step()`` not run yet: yields ``(rec, model, opt)``; closes the recorder after."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt) as rec:
        with rec.step(sample_ids=range(8)):
            _loss(model).backward()
        opt.step()
        opt.zero_grad()
        with rec.step(sample_ids=range(8, 16)):
            _loss(model, 1).backward()
        yield rec, model, opt


def test_a_skipped_optimizer_step_is_refused_at_the_next_block(tmp_path):
    path = tmp_path / "k.zarr"
    with _step_1_awaiting_its_update(path) as (rec, model, opt):
        opt.zero_grad()  # no opt.step(): the update the run holds never happened
        with pytest.raises(RecorderStateError, match=r"step 1 was recorded but optimizer\.step\(\) never ran after it.*"
                           r"Step 1 was not written"):
            with rec.step(sample_ids=range(16, 24)):
                pass
        assert rec.n_steps == 1
        with rec.step(sample_ids=range(16, 24)):  # recording goes on from step 1
            _loss(model, 2).backward()
        opt.step()
    run = open_run(path)
    assert run.n_steps == 2 and run.sample_id[8:].tolist() == list(range(16, 24))


def test_a_skipped_step_between_micro_batches_is_refused_at_the_next_micro_batch(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(tmp_path / "m.zarr", model, proj_dim=None, optimizer=opt) as rec:
        with rec.microbatch(range(4)):
            F.cross_entropy(model(X[:4]), Y[:4]).backward()
        rec.commit_step()
        opt.zero_grad()
        with pytest.raises(RecorderStateError, match=r"step 0 was recorded but optimizer\.step\(\) never ran"):
            with rec.microbatch(range(4, 8)):
                pass
    assert open_run(tmp_path / "m.zarr").n_steps == 0


def test_an_optimizer_step_twice_for_one_block_is_refused(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(tmp_path / "d.zarr", model, proj_dim=None, optimizer=opt) as rec:
        with rec.step(sample_ids=range(8)):
            _loss(model).backward()
        opt.step()
        after = _weights(model)
        with pytest.raises(RecorderError, match=r"this update has no recorded step: step 0's update already ran"):
            opt.step()
        assert _same(after, model)
        opt.zero_grad()
        opt.step()  # no gradient at all: torch's optimizers change nothing, nothing to refuse
        assert _same(after, model)
    assert open_run(tmp_path / "d.zarr").n_steps == 1


def test_close_drops_a_last_step_whose_update_never_ran(tmp_path, caplog):
    path = tmp_path / "e.zarr"
    with caplog.at_level(logging.WARNING, logger="datavalue"), _step_1_awaiting_its_update(path):
        pass  # closed with step 1's update never run
    assert open_run(path).n_steps == 1
    assert "step 1 was recorded but optimizer.step() never ran" in caplog.text


def test_an_update_skipped_on_non_finite_rows_is_accepted(tmp_path):
    """An AMP ``GradScaler`` skips ``optimizer.step()`` when gradients overflow; with ``on_nonfinite="skip"``
    the step's rows are flagged and the skip is not refused."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "n.zarr"
    x = X.clone()
    x[3] = float("nan")
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, on_nonfinite="skip") as rec:
        with rec.step(sample_ids=range(8)):
            F.cross_entropy(model(x), Y).backward()
        opt.zero_grad()  # the GradScaler's skip
        with rec.step(sample_ids=range(8, 16)):
            _loss(model, 1).backward()
        opt.step()
    run = open_run(path)
    assert run.n_steps == 2 and np.asarray(run.flags)[3] != 0 and (np.asarray(run.flags)[8:] == 0).all()


def test_a_held_step_counts_against_the_durability_bound(tmp_path):
    """With ``commit_every=1`` every earlier step is on disk while a step waits for its update."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "b.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, commit_every=1) as rec:
        for t in range(4):
            with rec.step(sample_ids=range(8 * t, 8 * t + 8)):
                _loss(model, t).backward()
            assert open_run(path).n_steps == t  # step t is held (not written), all before it committed
            opt.step()
            opt.zero_grad()
    assert open_run(path).n_steps == 4


# ----------------------------------------------------------------------------- 5. resuming with other weights
def _steps(rec, model, opt, n):
    for _ in range(n):
        t = rec.n_steps
        with rec.step(sample_ids=range(8 * t, 8 * t + 8)):
            _loss(model, t).backward()
        opt.step()
        opt.zero_grad()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _holding(state):
    """A fresh model holding ``state`` (a checkpoint loaded, or the same weights in another module)."""
    model = _model()
    model.load_state_dict(state)
    return model


def _recorded(path, n):
    """``(model, opt)`` after recording ``n`` steps (SGD, lr 0.1) into a new run at ``path``."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt) as rec:
        _steps(rec, model, opt, n)
    return model, opt


def _recorded_with_a_checkpoint(path):
    """``(model, opt, checkpoint)``: 4 steps recorded, the checkpoint saved the documented way (flush,
    then save) after step 2."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt) as rec:
        _steps(rec, model, opt, 2)
        rec.flush()
        ckpt = _state(model)
        _steps(rec, model, opt, 2)
    return model, opt, ckpt


def _resume_first_block(path, model, opt=None):
    """Resume the run with ``model`` and record one step; ``opt`` defaults to a new SGD (lr 0.1)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if opt is None else opt
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, resume=True) as rec:
        _steps(rec, model, opt, 1)


def test_resuming_with_a_fresh_initialisation_is_refused(tmp_path):
    path = tmp_path / "f.zarr"
    model, opt = _recorded(path, 3)
    with pytest.raises(StoreMismatchError, match=r"not the ones the run reached after its 3 steps \(they differ in "
                       r"\['0\.bias', '0\.weight', '2\.bias'\] \.\.\.; a fresh initialisation"):
        _resume_first_block(path, _model())
    assert open_run(path).n_steps == 3
    _resume_first_block(path, model, opt)  # the weights the run reached: fine
    assert open_run(path).n_steps == 4


def test_resuming_from_a_checkpoint_older_than_the_run_is_refused(tmp_path):
    path = tmp_path / "c.zarr"
    _, _, ckpt = _recorded_with_a_checkpoint(path)
    with pytest.raises(StoreMismatchError, match=r"the model holds the weights the run had after step 2, and the run "
                       r"has 4 steps: resuming would record steps 2\.\.3 a second time"):
        _resume_first_block(path, _holding(ckpt))
    assert open_run(path).n_steps == 4


def test_one_training_step_past_the_run_is_refused_and_the_same_weights_in_another_module_pass(tmp_path):
    path = tmp_path / "o.zarr"
    model, _ = _recorded(path, 2)
    copy = _holding(_state(model))  # the same weights, another module (as after moving devices)
    _resume_first_block(path, copy)
    # one unrecorded step with a small lr on the weights the run reached
    small = torch.optim.SGD(copy.parameters(), lr=1e-4)
    _loss(copy, 5).backward()
    small.step()
    small.zero_grad()
    with pytest.raises(StoreMismatchError, match=r"not the ones the run reached after its 3 steps"):
        _resume_first_block(path, copy, small)


def test_the_digest_tolerance_passes_another_summation_order_and_fails_one_step():
    from datavalue.capture._resume import differing, weights_digest

    torch.manual_seed(3)
    model = torch.nn.Linear(1000, 300).float()
    rec = weights_digest(model)
    other = {}  # the same weights summed in another order and precision path (as on another device)
    for name, p in model.named_parameters():
        w = p.detach().double().flatten()[torch.randperm(p.numel())].numpy()
        other[name] = [float(w.size), float(np.sum(w)), float(np.dot(w, w))]
    assert differing(rec, other) == []
    with torch.no_grad():  # one Adam-like step at lr 1e-6: every weight moves by 1e-6
        model.weight.add_(1e-6 * torch.sign(torch.randn_like(model.weight)))
    assert differing(rec, weights_digest(model)) == ["weight"]


def test_a_run_killed_after_its_last_flush_resumes_unchecked_unless_the_weights_are_an_earlier_flushs(tmp_path):
    import json
    import shutil

    path = tmp_path / "k.zarr"
    model, opt, at2 = _recorded_with_a_checkpoint(path)
    meta = path / "weights_digest" / "zarr.json"  # as a kill after the flush at step 2 leaves it
    doc = json.loads(meta.read_text())
    doc["attributes"]["datavalue_weights"]["history"] = [h for h in doc["attributes"]["datavalue_weights"]["history"]
                                                         if h["steps"] == 2]
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreMismatchError, match=r"after step 2, and the run has 4 steps"):
        _resume_first_block(path, _holding(at2))
    _resume_first_block(path, model, opt)  # the weights after step 4: no digest says otherwise
    shutil.rmtree(path / "weights_digest")  # a run from before the digests opens and resumes unchecked:
    root = json.loads((path / "zarr.json").read_text())  # it has no marker either (with it, the loss is damage)
    del root["attributes"]["datavalue_weights_digest"]
    (path / "zarr.json").write_text(json.dumps(root))
    _resume_first_block(path, _model())
    assert open_run(path).n_steps == 6


# ----------------------------------------------------------------------------- the probe's oracle
@pytest.mark.parametrize("arch", ["mlp", "cnn", "tiny_gpt", "hf_gpt2", "fallback"])
@pytest.mark.parametrize("proj_dim", [None, 24])
def test_the_gradient_probe_of_a_full_gradient_equals_the_probe_of_its_sketch(arch, proj_dim):
    """``GradientProbe.of_gradient(g)`` (one pass over ``g``) equals ``reduce(project_full(g))`` (the
    slow oracle: the whole sketch), for every block layout: Linear ``[W | b]``, convolutions, an
    embedding tied to the head, HF ``Conv1D`` (``[W; b]``), dense blocks of the fallback rule."""
    from datavalue.capture._engine import Engine
    from datavalue.capture._gradients import project_full
    from datavalue.capture._optim import GradientProbe
    from tests.capture import models

    torch.manual_seed(0)
    if arch == "hf_gpt2":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        model = {"mlp": models.mlp, "cnn": models.CNN, "tiny_gpt": models.TinyGPT,
                 "fallback": models.fallback_model}[arch]()
    model = model.double()
    eng = Engine(model, proj_dim=proj_dim if proj_dim is None else proj_dim * 8, seed=3)
    probe = GradientProbe(eng)
    g = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    want = probe.reduce(project_full(eng, g))
    got = probe.of_gradient(g)
    assert got.shape == want.shape and got.numel() >= len(eng.blocks)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-10 * float(want.abs().max()))
