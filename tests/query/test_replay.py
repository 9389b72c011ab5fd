"""Exact trajectory influence by replay (datavalue.replay_influence) against its oracles.

(a) the exact first-order derivative of real torch runs: ``trajectory_loo(..., epsilon=1e-6)``
    (finite differences in the occurrence's weight), for SGD with momentum and weight decay (mean and
    sum reductions) and for AdamW with two param groups, an lr schedule and clipping by the global norm;
(b) the exact-Hessian full-operator embedding build (``Recorder(curvature="hessian", proj_dim=None)``,
    ``build_embeddings(..., "hessian", blocks="full")``) dotted with the test gradients, on SGD and on
    AdamW (two groups, a schedule, no clipping: the Adam build holds the clipping coefficient fixed);
and the results stored in the run, read back and aggregated like an Attributor's.

Model: ``tests/capture/models.mlp()`` (6-9-7-4, ReLU and tanh, 165 parameters) in float64 on 64
Gaussian examples (seed 0), batch 16, 2 epochs (8 steps), checkpoints every 3 steps, 5 test points.
Measured deviations (max |replay - oracle| / max |oracle|) are in the comments above each test.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datavalue
from datavalue.capture import ReplayMismatchError, _replay, per_sample_gradients
from datavalue.errors import StoreExistsError, StoreMismatchError, StoreNotFoundError
from datavalue.query import ReplayResult, replay_influence, replays
from datavalue.store import open_array, open_run
from datavalue.testing import AdamConfig, Batch, SGDConfig, train_reference, trajectory_loo
from tests.capture.models import mlp


@dataclasses.dataclass
class Case:
    path: str
    ref: object
    X: torch.Tensor
    Y: torch.Tensor
    query: object
    factory: object


def ce(m, x, y):
    return F.cross_entropy(m(x), y, reduction="none")


def loss_fn(m, batch):
    return ce(m, *batch)


def make_case(path, *, kind="sgd", clip=None, groups=False, reduction="mean", hessian=False, checkpoint_every=3,
              dropout=False, n=64, batch=16, epochs=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n + 5, 6, generator=gen, dtype=torch.float64)
    Y = torch.randint(0, 4, (n + 5,), generator=gen)
    batches = []
    for _ in range(epochs):
        p = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = p[i : i + batch]
            batches.append(Batch(idx.numpy(), X[idx], Y[idx]))
    T = len(batches)

    def factory():
        torch.manual_seed(seed + 1)
        m = mlp().double()
        return nn.Sequential(m[0], nn.Dropout(0.2), *list(m)[1:]) if dropout else m

    model = factory()
    sched = 0.5 + 0.5 * np.cos(np.pi * np.arange(T) / T)
    if kind == "sgd":
        config = SGDConfig(momentum=0.9, weight_decay=0.01, max_grad_norm=clip, reduction=reduction)
        lr = (0.1, 0.3)
    else:
        config = AdamConfig(kind="adamw", weight_decay=0.05, max_grad_norm=clip, reduction=reduction)
        lr = (1e-2, 3e-2)
    if groups:
        named = list(model.named_parameters())
        param_groups = [{"params": [p for k, p in named if not k.endswith("bias")], "lr": lr[0]},
                        {"params": [p for k, p in named if k.endswith("bias")], "lr": lr[1], "weight_decay": 0.0}]
        lrs = np.outer(sched, lr)
    else:
        param_groups = [{"params": list(model.parameters())}]
        lrs = sched * lr[0]
    opt = config.optimizer(param_groups, lr[0])
    rec = datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, checkpoint_every=checkpoint_every,
                             storage_dtype="float64", loss_reduction=reduction,
                             curvature="hessian" if hessian else None)

    def step_context(t, b, lr_):
        red = torch.mean if reduction == "mean" else torch.sum
        loss = (lambda: red(ce(model, b.inputs, b.targets))) if hessian else None
        return rec.step(sample_ids=b.sample_ids, hessian_loss=loss)

    with rec:
        ref = train_reference(factory, batches, lrs, ce, model=model, optimizer=opt, config=config,
                              step_context=step_context, verify=not dropout)
    Xt, Yt = X[n:], Y[n:]
    return Case(str(path), ref, X, Y, lambda m: ce(m, Xt, Yt), factory)


def replay(case, **kw):
    return replay_influence(case.path, case.factory(), lambda ids: (case.X[ids], case.Y[ids]), case.query,
                            loss_fn=loss_fn, **kw)


def linear_truth(case, every=3):
    steps, ids = case.ref.occurrences()
    rows = np.arange(0, len(ids), every)
    removals = list(zip(steps[rows].tolist(), ids[rows].tolist(), strict=True))
    return rows, trajectory_loo(case.ref, removals, case.query, epsilon=1e-6)


def rel(est, truth):
    return float(np.abs(est - truth).max() / np.abs(truth).max())


# ------------------------------------------------------------------------- (a) finite differences
# Measured: SGD mean 1.5e-8, SGD sum 2.9e-7, AdamW (two groups, schedule, 6 of 8 steps clipped) 3.0e-7:
# the finite difference's own O(epsilon) error; the AdamW run with the clipping coefficient held
# fixed (clipping="constant") is off by 0.19. Tolerance 1e-4 (relative to the largest |truth|).
# Mutations (test_a_broken_replay_fails_the_oracle): dropping the momentum buffer's adjoint, the
# second moment's adjoint, or taking the step's HVP at the next step's weights each fail it.
SETTINGS_A = {
    "sgd_mean": dict(kind="sgd"),
    "sgd_sum": dict(kind="sgd", reduction="sum"),
    "adamw_groups_clip": dict(kind="adamw", groups=True, clip=0.3),
}


@pytest.fixture(scope="module", params=list(SETTINGS_A))
def case_a(request, tmp_path_factory):
    c = make_case(tmp_path_factory.mktemp("replay") / f"{request.param}.zarr", **SETTINGS_A[request.param])
    c.name = request.param
    c.rows, c.linear = linear_truth(c)
    return c


def test_replay_equals_the_finite_difference_derivative(case_a):
    res = replay(case_a, write=False)
    assert rel(res.scores()[:, case_a.rows].T, case_a.linear) < 1e-4
    if case_a.name == "adamw_groups_clip":
        assert (case_a.ref.grad_scales < 1).sum() >= 2  # the clipping derivative is exercised
        # holding the clipping coefficient fixed is not the derivative of the clipped run
        const = replay(case_a, write=False, clipping="constant")
        assert rel(const.scores()[:, case_a.rows].T, case_a.linear) > 1e-3


def test_jvp_and_reverse_dot_products_agree(case_a):
    """Both ways to get the per-example dot products without per-sample gradients give one answer."""
    a = replay(case_a, write=False, dots="jvp").scores()
    b = replay(case_a, write=False, dots="reverse").scores()
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-12 * np.abs(a).max())


def test_steps_window_keeps_the_adjoint_from_the_end(case_a):
    if case_a.name != "sgd_mean":
        pytest.skip("one run is enough")
    full = replay(case_a, write=False).scores()
    part = replay(case_a, write=False, steps=(2, 5))
    run = open_run(case_a.path)
    r0, r1 = int(run.step_ptr[2]), int(run.step_ptr[5])
    np.testing.assert_allclose(part.scores(), full[:, r0:r1], rtol=1e-12, atol=1e-15)


def _mutation(name):
    """A broken optimizer model: each must make the oracle comparison fail (checks the test's power)."""
    real = _replay._update

    def broken(kind, groups, hp, st, g):
        if name == "no_second_moment":  # Adam: the second moment held fixed (its adjoint dropped)
            st = dataclasses.replace(st, v=[None if x is None else x.detach() for x in st.v])
            out = real(kind, groups, hp, st, g)
            return dataclasses.replace(out, v=[None if x is None else x.detach() for x in out.v])
        if name == "no_momentum":  # SGD: the buffer's adjoint dropped
            st = dataclasses.replace(st, m=[None if x is None else x.detach() for x in st.m])
            return real(kind, groups, hp, st, g)
        raise AssertionError(name)

    return broken


@pytest.mark.parametrize("mutation", ["no_second_moment", "no_momentum", "wrong_step_weights"])
def test_a_broken_replay_fails_the_oracle(case_a, mutation, monkeypatch):
    if (mutation == "no_second_moment") != (case_a.name == "adamw_groups_clip") or case_a.name == "sgd_sum":
        pytest.skip("one run per mutation")
    if mutation == "wrong_step_weights":  # the backward pass at the weights of the step after
        real = _replay._backward_step
        monkeypatch.setattr(_replay, "_backward_step", lambda setup, st, t, adj, dots: real(
            setup, _replay._forward(setup, st, t, t + 1)[-1], t, adj, dots))
    else:
        monkeypatch.setattr(_replay, "_update", _mutation(mutation))  # values unchanged: the forward check passes
    res = replay(case_a, write=False)
    assert rel(res.scores()[:, case_a.rows].T, case_a.linear) > 1e-3


# ------------------------------------------------------------------------- (b) the exact-Hessian build
# Measured: SGD (momentum 0.9, weight decay, two groups, cosine schedule) 2.0e-16; AdamW (two groups,
# schedule, decoupled decay) 4.8e-16: the same linearisation computed two ways. Tolerance 1e-10.
# Mutated replays against the build: momentum adjoint dropped 0.70, second-moment adjoint dropped
# 0.21, HVP at the next step's weights 0.028 (SGD) / 0.38 (AdamW).
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_replay_equals_the_exact_hessian_build(kind, tmp_path):
    c = make_case(tmp_path / "run.zarr", kind=kind, groups=True, hessian=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datavalue.build_embeddings(c.path, "hessian", blocks="full", progress=False, storage_dtype="float64")
    E = np.asarray(open_array(c.path, "embeddings/hessian/values")[:])
    q = per_sample_gradients(c.ref.final_model(), c.query, open_run(c.path))
    build = (E @ q.T).T
    res = replay(c)
    assert rel(res.scores(), build) < 1e-10


# ------------------------------------------------------------------------- checks and results
def test_dropout_run_is_refused(tmp_path):
    """A step with randomness (dropout) cannot be replayed; the forward check says so."""
    c = make_case(tmp_path / "run.zarr", dropout=True)
    with pytest.raises(ReplayMismatchError, match="dropout"):
        replay(c, write=False)


def test_other_batches_are_refused(tmp_path):
    c = make_case(tmp_path / "run.zarr")
    with pytest.raises(ReplayMismatchError, match="does not reproduce"):
        replay_influence(c.path, c.factory(), lambda ids: (c.X[ids + 1], c.Y[ids + 1]), c.query, loss_fn=loss_fn)


def test_results_in_the_run_read_like_a_query(tmp_path):
    c = make_case(tmp_path / "run.zarr")
    res = replay(c, description="five test points")
    assert replays(c.path) == ["default"]
    back = ReplayResult.open(c.path)
    np.testing.assert_array_equal(back.scores(), res.scores())
    assert back.attrs["description"] == "five test points"
    run = open_run(c.path)
    S = res.scores()
    # by sample: the sum over the sample's occurrences (both epochs)
    by_s = res.scores(by="sample")
    labels = res.labels(by="sample")
    want = np.stack([S[:, run.sample_id == s].sum(1) for s in labels], 1)
    np.testing.assert_allclose(by_s, want, rtol=1e-12, atol=1e-15)
    by_t = res.scores(by="step")
    np.testing.assert_allclose(by_t.sum(1), S.sum(1), rtol=1e-10)
    owners = {int(s): f"o{int(s) % 3}" for s in labels}
    by_o = res.scores(by="owner", owners=owners)
    assert list(res.labels(by="owner", owners=owners)) == ["o0", "o1", "o2"]
    np.testing.assert_allclose(by_o.sum(1), S.sum(1), rtol=1e-10)
    top = res.top_k(3, by="sample")
    np.testing.assert_array_equal(top.helpful_ids[0], labels[np.argsort(-by_s[0])[:3]])
    out = res.save_parquet(tmp_path / "s.parquet", by="sample")
    import pandas as pd

    frame = pd.read_parquet(out)
    np.testing.assert_allclose(frame["test_0"].to_numpy(), by_s[0])
    top.to_parquet(tmp_path / "top.parquet")
    with pytest.raises(StoreExistsError, match="already holds replay 'default'"):
        replay(c)
    # a run recorded further no longer matches the stored replay
    model = c.ref.final_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    from datavalue.capture import checkpoint_steps, read_checkpoint

    read_checkpoint(c.path, checkpoint_steps(c.path)[-1]).load_into(model, opt)  # resume with the optimizer's state
    with datavalue.Recorder(c.path, model, proj_dim=None, optimizer=opt, checkpoint_every=3, storage_dtype="float64",
                            resume=True) as rec:
        with rec.step(sample_ids=[0, 1]):
            ce(model, c.X[:2], c.Y[:2]).mean().backward()
        opt.step()
    with pytest.raises(StoreMismatchError, match="Recompute"):
        ReplayResult.open(c.path)


def test_an_attributor_reads_the_runs_replays(tmp_path):
    c = make_case(tmp_path / "run.zarr")
    res = replay(c)
    datavalue.build_embeddings(c.path, progress=False)
    att = datavalue.Attributor(c.path, c.ref.final_model(), progress=False)
    back = att.replay()
    np.testing.assert_array_equal(back.scores(by="sample"), res.scores(by="sample"))
    np.testing.assert_array_equal(back.labels(by="sample"), att.labels(by="sample"))
    with pytest.raises(StoreNotFoundError):
        att.replay("another")


def test_facade_exports():
    assert datavalue.replay_influence is replay_influence


def test_cli_replay(tmp_path, capsys):
    from pathlib import Path

    import pandas as pd

    from datavalue.cli import main

    c = make_case(tmp_path / "run.zarr")
    root = Path(__file__).resolve().parents[2]
    spec = tmp_path / "spec.py"
    spec.write_text(
        f"import sys\nsys.path.insert(0, {str(root)!r})\n"
        "import torch\nfrom tests.query.test_replay import mlp\n"
        "gen = torch.Generator().manual_seed(0)\n"
        "X = torch.randn(69, 6, generator=gen, dtype=torch.float64)\nY = torch.randint(0, 4, (69,), generator=gen)\n"
        "def model():\n    return mlp().double()\n"
        "def train():\n    return X[:64], Y[:64]\n"
        "def data():\n    return X[64:], Y[64:]\n")
    out = tmp_path / "top.parquet"
    argv = [str(c.path), "--model", f"{spec}:model", "--train", f"{spec}:train", "--data", f"{spec}:data",
            "--out", str(out), "--top-k", "3", "--no-progress"]
    assert main(["replay", *argv]) == 0
    assert "stored as replay/default" in capsys.readouterr().out
    frame = pd.read_parquet(out)
    want = ReplayResult.open(c.path).top_k(3, by="sample").to_frame()
    np.testing.assert_allclose(frame["score"].to_numpy(), want["score"].to_numpy())
    assert main(["replay", *argv]) == 1  # --out exists
    assert main(["info", str(c.path)]) == 0
    shown = capsys.readouterr().out
    assert "checkpoints    [0, 3, 6, 8]" in shown and "replays        default" in shown


def test_docs_example_runs(tmp_path, monkeypatch):
    """The python blocks of docs/replay.md run as written."""
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "replay.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/replay.md[block {i}]", "exec"), {})


class TokenModel(nn.Module):
    """Per-position next-token logits of a tiny sequence model (embedding, tanh, linear)."""

    def __init__(self, vocab=7, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, vocab)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)))


def test_token_mean_run_equals_the_exact_hessian_build(tmp_path):
    """loss_reduction="token_mean" (weights tokens(z) / tokens(B), examples of different lengths):
    the replay, fed per-example mean token losses, equals the exact-Hessian build. Measured 3.7e-16."""
    gen = torch.Generator().manual_seed(0)
    n, L, V = 24, 5, 7
    toks = torch.randint(0, V, (n + 3, L), generator=gen)
    lengths = torch.randint(2, L + 1, (n + 3,), generator=gen)
    mask = torch.arange(L - 1)[None, :] < (lengths[:, None] - 1)  # counted target positions

    def per_example(m, idx):
        x = toks[idx]
        lt = F.cross_entropy(m(x[:, :-1]).reshape(-1, V), x[:, 1:].reshape(-1), reduction="none").reshape(len(idx), -1)
        mk = mask[idx].to(lt.dtype)
        return (lt * mk).sum(1) / mk.sum(1)

    def factory():
        torch.manual_seed(3)
        return TokenModel(V).double()

    model = factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=0.01)
    path = tmp_path / "run.zarr"
    order = [torch.randperm(n, generator=gen)[:8] for _ in range(6)]
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, checkpoint_every=2, storage_dtype="float64",
                            loss_reduction="token_mean", curvature="hessian") as rec:
        for idx in order:
            tokens = mask[idx].sum(1)

            def stepped(idx=idx, tokens=tokens):
                return (per_example(model, idx) * tokens).sum() / tokens.sum()

            with rec.step(sample_ids=idx, tokens=tokens, hessian_loss=stepped):
                stepped().backward()
            opt.step()
            opt.zero_grad()
    query = lambda m: per_example(m, torch.arange(n, n + 3))  # noqa: E731
    res = replay_influence(path, factory(), lambda ids: torch.as_tensor(ids), query,
                           loss_fn=lambda m, idx: per_example(m, idx), write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datavalue.build_embeddings(path, "hessian", blocks="full", progress=False, storage_dtype="float64")
    E = np.asarray(open_array(path, "embeddings/hessian/values")[:])
    q = per_sample_gradients(model, query, open_run(path))
    assert rel(res.scores(), (E @ q.T).T) < 1e-10
    w = open_run(path).weight
    assert not np.allclose(w, w[0])  # the weights really differ by length


def test_frozen_parameters_come_from_the_checkpoints(tmp_path):
    """A parameter the optimizer does not hold keeps its recorded value, whatever the model passed has."""
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(40, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (40,), generator=gen)

    def factory(seed=1):
        torch.manual_seed(seed)
        m = mlp().double()
        m[0].weight.requires_grad_(False)
        return m

    model = factory()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    path = tmp_path / "run.zarr"
    with datavalue.Recorder(path, model, proj_dim=8, optimizer=opt, checkpoint_every=2) as rec:
        for t in range(4):
            ids = np.arange(8 * t, 8 * t + 8)
            with rec.step(sample_ids=ids):
                ce(model, X[ids], Y[ids]).mean().backward()
            opt.step()
            opt.zero_grad()
    query = lambda m: ce(m, X[32:], Y[32:])  # noqa: E731
    kw = dict(loss_fn=loss_fn, write=False)
    right = replay_influence(path, factory(), lambda ids: (X[ids], Y[ids]), query, **kw).scores()
    other = replay_influence(path, factory(seed=5), lambda ids: (X[ids], Y[ids]), query, **kw).scores()
    np.testing.assert_array_equal(other, right)


def test_gradient_accumulation_weights_are_the_runs(tmp_path):
    """Micro-batches of unequal size (weights 1/(2*8) and 1/(2*4)): the replay steps on the run's
    weights, so it reproduces the checkpoints; equal weights 1/12 would not."""
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(60, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (60,), generator=gen)

    def factory():
        torch.manual_seed(1)
        return mlp().double()

    model = factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    path = tmp_path / "run.zarr"
    with datavalue.Recorder(path, model, proj_dim=8, optimizer=opt, checkpoint_every=2) as rec:
        for t in range(4):
            for ids in (np.arange(12 * t, 12 * t + 8), np.arange(12 * t + 8, 12 * t + 12)):
                with rec.microbatch(ids):
                    (ce(model, X[ids], Y[ids]).mean() / 2).backward()
            rec.commit_step()
            opt.step()
            opt.zero_grad()
    query = lambda m: ce(m, X[48:], Y[48:])  # noqa: E731
    res = replay_influence(path, factory(), lambda ids: (X[ids], Y[ids]), query, loss_fn=loss_fn, write=False)
    assert max(res.attrs["checks"].values()) < 1e-12
    run = open_run(path)
    np.testing.assert_allclose(run.weight[:12], [1 / 16] * 8 + [1 / 8] * 4)
    run.__dict__["weight"] = np.full(run.n_rows, 1 / 12)  # a replay that assumed the plain mean
    with pytest.raises(ReplayMismatchError):
        replay_influence(run, factory(), lambda ids: (X[ids], Y[ids]), query, loss_fn=loss_fn, write=False)


def test_tiny_gpt2_equals_the_finite_difference_limit(tmp_path):
    """A transformers GPT-2 (eager attention, tied embedding and head) trained with AdamW, every step
    clipped, float64: the finite difference converges to the replay as epsilon shrinks (measured here:
    7.0e-5 at epsilon 1e-5, 2.1e-6 at 1e-7); holding the clipping coefficient fixed does not. On a
    10-step run with max_norm 1 (3 steps clipped) the finite difference's own O(epsilon) error was
    large (Adam's tiny second moments): 6.5e-2 at 1e-5, 6.5e-3 at 1e-6, 6.6e-4 at 1e-7."""
    transformers = pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(0)
    V, L = 64, 12
    tokens = torch.randint(0, V, (40, L), generator=gen)

    def factory():
        torch.manual_seed(1)
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=L, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager", bos_token_id=0,
                                      eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).double()

    def per_example(m, x):
        logits = m(input_ids=x).logits[:, :-1]
        lt = F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1), reduction="none")
        return lt.reshape(x.shape[0], -1).mean(1)

    batches = [Batch(np.arange(6 * t, 6 * t + 6), tokens[6 * t : 6 * t + 6], None) for t in range(6)]
    model = factory()
    assert model.lm_head.weight is model.transformer.wte.weight
    config = AdamConfig(kind="adamw", weight_decay=0.01, max_grad_norm=0.3)
    opt = config.optimizer(model.parameters(), 1e-3)
    path = tmp_path / "run.zarr"
    rec = datavalue.Recorder(path, model, proj_dim=16, optimizer=opt, checkpoint_every=4, storage_dtype="float64")
    with rec:
        ref = train_reference(factory, batches, np.full(6, 1e-3), lambda m, x, y: per_example(m, x), model=model,
                              optimizer=opt, config=config,
                              step_context=lambda t, b, lr: rec.step(sample_ids=b.sample_ids, lr=lr))
    query = lambda m: per_example(m, tokens[36:])  # noqa: E731
    res = replay_influence(path, factory(), lambda ids: tokens[torch.as_tensor(ids)], query,
                           loss_fn=per_example, write=False)
    steps, ids = ref.occurrences()
    rows = np.arange(0, len(ids), 5)
    removals = list(zip(steps[rows].tolist(), ids[rows].tolist(), strict=True))
    est = res.scores()[:, rows].T
    devs = [rel(est, trajectory_loo(ref, removals, query, epsilon=e)) for e in (1e-5, 1e-7)]
    assert (ref.grad_scales < 1).all()
    assert devs[1] < 1e-4 and devs[1] < devs[0] / 10, devs
    const = replay_influence(path, factory(), lambda ids: tokens[torch.as_tensor(ids)], query, loss_fn=per_example,
                             write=False, clipping="constant")
    assert rel(const.scores()[:, rows].T, trajectory_loo(ref, removals, query, epsilon=1e-7)) > 1e-2
