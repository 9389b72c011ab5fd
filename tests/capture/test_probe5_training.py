"""Training that differs from what a run records, found by the fifth probe (issue 22): gradient ascent
(``SGD(maximize=True)``) built as descent, a parameter-only loss term (an L2 penalty), a second optimizer
stepping a recorded layer, weights edited after ``optimizer.step()``, and optimizer state lost mid-run or on
resume. Each test failed before its fix; next to each refusal the legitimate look-alike is accepted.

All models are tiny float64 MLPs on random data (seeded); tolerances are stated where numbers are compared.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.errors import EmbeddingError, RecorderError, RecorderStateError
from datavalue.store import open_array, open_run

G = torch.Generator().manual_seed(5)
XS = [torch.randn(6, 4, generator=G, dtype=torch.float64) for _ in range(4)]
YS = [torch.randint(0, 3, (6,), generator=G) for _ in range(4)]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def _ids(t, b=6):
    return range(b * t, b * t + b)


# ----------------------------------------------------------------------------- P5-09: maximize=True
@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.05)])
def test_gradient_ascent_builds_the_embeddings_of_the_ascent(tmp_path, momentum, weight_decay):
    """``SGD(maximize=True)`` on a loss ``L`` takes exactly the steps of ``SGD(maximize=False)`` on ``-L``
    (torch negates the gradient before decay and momentum), so removing an occurrence moves the final weights
    the same way in both runs: their exact-Hessian embeddings must agree (float64, rtol 1e-9). Before the fix
    the ascent run was built as descent: its embeddings were those of the other sign."""
    E = {}
    for maximize in (True, False):
        sign = 1.0 if maximize else -1.0
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=momentum, weight_decay=weight_decay,
                              maximize=maximize)
        path = tmp_path / f"max{int(maximize)}.zarr"
        with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, curvature="hessian",
                                storage_dtype="float64") as rec:
            for t, (x, y) in enumerate(zip(XS, YS, strict=True)):
                loss = (lambda x=x, y=y, m=model, s=sign: s * F.cross_entropy(m(x), y))
                with rec.step(sample_ids=_ids(t), hessian_loss=loss):
                    loss().backward()
                opt.step()
                opt.zero_grad()
        assert open_run(path).optimizer["maximize"] is maximize
        datavalue.build_embeddings(path, curvature="hessian", progress=False)
        E[maximize] = np.asarray(open_array(path, "embeddings/hessian/values")[:])
    assert np.abs(E[False]).max() > 1e-3
    np.testing.assert_allclose(E[True], E[False], rtol=1e-9, atol=1e-12)


def test_gradient_ascent_last_step_embedding_has_the_ascent_sign(tmp_path):
    """The probe's check: with ``curvature="none"`` the last step's embedding of an occurrence is the update
    it made, ``+lr w g`` for ascent (``-lr w g`` removed), the negative of descent's."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)
    path = tmp_path / "asc.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, storage_dtype="float64") as rec:
        for t, (x, y) in enumerate(zip(XS[:2], YS[:2], strict=True)):
            with rec.step(sample_ids=_ids(t)):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    datavalue.build_embeddings(path, curvature="none", progress=False)
    run = open_run(path)
    E = np.asarray(open_array(path, "embeddings/none/values")[:])
    last = slice(int(run.step_ptr[-2]), int(run.step_ptr[-1]))
    direct = run.lr[-1] * run.weight[last][:, None] * run.read("grads")[last]
    np.testing.assert_allclose(E[last], -direct, rtol=1e-6, atol=1e-12)  # the build runs in float32


def test_param_groups_that_disagree_on_maximize_are_refused_by_the_build(tmp_path):
    model = _model()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "maximize": True},
                           {"params": model[2].parameters()}], lr=0.1)
    path = tmp_path / "mixed.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, storage_dtype="float64") as rec:
        with rec.step(sample_ids=_ids(0)):
            F.cross_entropy(model(XS[0]), YS[0]).backward()
        opt.step()
        opt.zero_grad()
    with pytest.raises(EmbeddingError, match=r"some param groups .* maximize=True .* and some without"):
        datavalue.build_embeddings(path, curvature="none", progress=False)


def _train(rec, model, opt, steps, *, t0=0, after=None, loss=None, lr=None):
    for t in range(t0, t0 + steps):
        x, y = XS[t % 4], YS[t % 4]
        with rec.step(sample_ids=_ids(t), lr=lr):
            (F.cross_entropy(model(x), y) if loss is None else loss(model, x, y)).backward()
        opt.step()
        opt.zero_grad()
        if after is not None:
            after(model, t)


def _l2_loss(model, x, y):
    return F.cross_entropy(model(x), y) + 0.1 * sum((p**2).sum() for p in model.parameters())


# ----------------------------------------------------------------------------- P5-19: a parameter-only loss term
def test_an_l2_penalty_in_the_loss_is_named_first_in_the_refusal(tmp_path):
    """With ``optimizer=``: the refusal lists a loss term that is not per-example (an L2 penalty: use
    weight_decay) before a forgotten zero_grad; before, it blamed zero_grad and .grad edits only."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(tmp_path / "l2.zarr", model, proj_dim=None, optimizer=opt) as rec:
        with pytest.raises(RecorderError, match=r"Likely causes, in order: \(1\) a loss term that is not a sum "
                           r"of per-example losses.*an L2 penalty .*weight_decay=.*\(2\) .*zero_grad\(\)"):
            _train(rec, model, opt, 1, loss=_l2_loss)
        assert rec.n_steps == 0


def test_without_optimizer_an_l2_penalty_is_refused_at_the_block(tmp_path):
    """Without ``optimizer=`` (``lr=`` given to the step): the gradient the block adds to ``.grad`` is compared
    with the captured rows; an L2 penalty (55% of the update in the probe's run) was recorded silently before.
    The same loop without the penalty, a loss scaled inside the block and accumulation over micro-batches
    (``.grad`` not empty at the second block) pass."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "nopt.zarr"
    with datavalue.Recorder(path, model, proj_dim=None) as rec:
        _train(rec, model, opt, 2, lr=0.1)
        _train(rec, model, opt, 1, t0=2, lr=0.1, loss=lambda m, x, y: 3.0 * F.cross_entropy(m(x), y))
        for half in (range(0, 3), range(3, 6)):
            with rec.microbatch([18 + i for i in half]):
                (F.cross_entropy(model(XS[3][list(half)]), YS[3][list(half)]) / 2).backward()
        rec.commit_step(lr=0.1)
        opt.step()
        opt.zero_grad()
        assert rec.n_steps == 4
        with pytest.raises(RecorderError, match=r"step 4: the gradient this block's backward added to \.grad is not "
                           r"the sum .*\(1\) a loss term that is not a sum of per-example losses.*an L2 penalty "
                           r".*weight_decay=.*Nothing was written for this step"):
            _train(rec, model, opt, 1, t0=4, lr=0.1, loss=_l2_loss)
        opt.zero_grad()
        with pytest.raises(RecorderError, match=r"step 4: .*not the sum"):  # a penalised micro-batch: the step goes
            with rec.microbatch(range(30, 36)):
                _l2_loss(model, XS[0], YS[0]).backward()
        with pytest.raises(RecorderStateError, match="without micro-batches"):
            rec.commit_step(lr=0.1)
        opt.zero_grad()
        assert rec.n_steps == 4
    assert open_run(path).n_steps == 4


# ----------------------------------------------------------------------------- P5-10: a second optimizer
@pytest.mark.parametrize("second_first", [False, True])
def test_a_second_optimizer_stepping_a_recorded_layer_is_refused(tmp_path, second_first):
    """The probe's ``twoopt``: ``optimizer=`` holds layer 0, another SGD steps layer 2 (recorded, in none of
    the given optimizer's groups). Before, the run took layer 2's update to be lr 0.1 (80% of it missing).
    Either order of the two ``step()`` calls is refused, naming the fix; layers=["0"] records only the given
    optimizer's layer and passes."""
    model = _model()
    opt, other = torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.SGD(model[2].parameters(), lr=0.5)
    with datavalue.Recorder(tmp_path / "two.zarr", model, proj_dim=None, optimizer=opt) as rec:
        def both():
            for o in ((other, opt) if second_first else (opt, other)):
                o.step()
            opt.zero_grad()
            other.zero_grad()

        with pytest.raises((RecorderError, RecorderStateError),
                           match=r"the weights of \['2\..*in none of the param groups of the optimizer given to the "
                           r"Recorder: another optimizer steps them.*Fix: pass one optimizer with param groups"):
            for t in range(2):
                with rec.step(sample_ids=_ids(t)):
                    F.cross_entropy(model(XS[t]), YS[t]).backward()
                both()
        assert rec.n_steps == (0 if second_first else 1)
    model = _model()
    opt, other = torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.SGD(model[2].parameters(), lr=0.5)
    with datavalue.Recorder(tmp_path / "one.zarr", model, proj_dim=None, optimizer=opt, layers=["0"]) as rec:
        for t in range(3):
            with rec.step(sample_ids=_ids(t)):
                F.cross_entropy(model(XS[t]), YS[t]).backward()
            opt.step()
            other.step()
            opt.zero_grad()
            other.zero_grad()
    assert open_run(tmp_path / "one.zarr").n_steps == 3


def test_a_trainable_layer_outside_the_optimizer_that_never_moves_is_accepted(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with datavalue.Recorder(tmp_path / "frozen.zarr", model, proj_dim=None, optimizer=opt) as rec:
        for t in range(3):
            with rec.step(sample_ids=_ids(t)):
                F.cross_entropy(model(XS[t]), YS[t]).backward()
            opt.step()
            model.zero_grad()
    assert open_run(tmp_path / "frozen.zarr").n_steps == 3


# ----------------------------------------------------------------------------- P5-11: weights edited after step
@pytest.mark.parametrize("edit", ["shrink", "clamp", "ema"])
def test_weights_edited_after_the_update_are_refused_at_the_next_block(tmp_path, edit, caplog):
    """``mul_(0.5)``, ``clamp_`` or an EMA copied back into the weights after ``opt.step()``: before, recorded
    silently (the recorded trajectory off by 101% of layer 0's real update). The next block is refused, and
    so is a retry until the weights are back; restoring them lets recording go on. An edit after the last
    update is logged at close (its steps are already written)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = [p.detach().clone() for p in model.parameters()]

    def do_edit(m):
        with torch.no_grad():
            if edit == "shrink":
                m[0].weight.data.mul_(0.5)
            elif edit == "clamp":
                m[0].weight.clamp_(-0.05, 0.05)
            else:
                for e, p in zip(ema, m.parameters(), strict=True):
                    p.copy_(0.5 * e + 0.5 * p)

    path = tmp_path / "edit.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt) as rec:
        _train(rec, model, opt, 2)
        saved = [p.detach().clone() for p in model.parameters()]
        do_edit(model)
        for _ in range(2):
            with pytest.raises(RecorderStateError, match=r"changed between the last optimizer\.step\(\) and this block "
                               r"\(weight clipping .*The run keeps its 2 steps"):
                _train(rec, model, opt, 1, t0=2)
        with torch.no_grad():
            for s, p in zip(saved, model.parameters(), strict=True):
                p.copy_(s)
        _train(rec, model, opt, 1, t0=2)
        do_edit(model)
        with caplog.at_level(logging.WARNING, logger="datavalue.capture.recorder"):
            rec.close()
    assert "changed after the last optimizer.step()" in caplog.text
    assert open_run(path).n_steps == 3


# ----------------------------------------------------------------------------- P5-12: optimizer state lost
def _make(kind, params):
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9 if kind == "momentum" else 0.0)


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_optimizer_state_cleared_mid_run_is_refused(tmp_path, kind):
    """``opt.state.clear()`` after step 1 (a warm restart): before, recorded as uninterrupted (the same momentum
    array as the uninterrupted run, other final weights). The next update is refused and not applied."""
    model = _model()
    opt = _make(kind, model.parameters())
    with datavalue.Recorder(tmp_path / "c.zarr", model, proj_dim=None, optimizer=opt) as rec:
        _train(rec, model, opt, 2)
        opt.state.clear()
        with pytest.raises(RecorderError, match=r"the optimizer's state of 4 recorded parameter\(s\) .* is gone since the "
                           r"previous update \(optimizer\.state cleared.*Step 2 was not written.*new run"):
            _train(rec, model, opt, 1, t0=2)
        assert rec.n_steps == 2


@pytest.mark.parametrize("kind", ["momentum", "adam", "plain"])
@pytest.mark.parametrize("restored", [False, True])
def test_resume_with_an_optimizer_whose_state_was_not_restored(tmp_path, kind, restored):
    """The probe's ``repro_42``: weights restored, the optimizer fresh. Refused at the first resumed update for
    SGD with momentum and Adam (before: accepted, the build modelled a momentum buffer that restarted); accepted
    with the state loaded, and for plain SGD, which keeps no state."""
    model = _model()
    opt = _make(kind, model.parameters())
    path = tmp_path / "r.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt) as rec:
        _train(rec, model, opt, 2)
    fresh = _make(kind, model.parameters())
    if restored:
        fresh.load_state_dict(opt.state_dict())
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=fresh, resume=True) as rec:
        if restored or kind == "plain":
            _train(rec, model, fresh, 2, t0=2, )
        else:
            said = "a momentum buffer \\(momentum 0.9\\)" if kind == "momentum" else "Adam moments and a step count \\(2\\)"
            with pytest.raises(RecorderError, match=r"the optimizer holds no state for the recorded parameters, but the run "
                               rf"was resumed after step 1, whose update left {said}: the optimizer's state was not "
                               r"restored from the checkpoint .*optimizer\.load_state_dict"):
                _train(rec, model, fresh, 1, t0=2)
    assert open_run(path).n_steps == (4 if restored or kind == "plain" else 2)
