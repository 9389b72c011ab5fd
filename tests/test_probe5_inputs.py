"""Fifth probe (issue 22): inputs, queries and output paths.

Each test failed before its fix (docs/errors.md, "Fifth probe: inputs, queries and outputs"): an
aborted ``FinalPass`` was used as a whole pass (P5-15); a ``DataParallel`` / ``torch.compile`` model
was recorded under ``module.`` / ``_orig_mod.`` names no model could query (P5-22); float16
storage kept overflowing gradients as unflagged inf and underflowing rows as zeros (P5-23);
``archive`` / a ledger / a utility cache wrote into another datavalue run (P5-07); a query with a
model far from the final weights said nothing (P5-16); ``curvature="fisher"`` on a one-output model
recorded zero rows (P5-20); a numpy ``lr``, bool/fractional tokens and a float ``proj_dim`` were
raw errors or converted (P5-17); BatchNorm in training mode failed in torch.func internals (P5-24);
``save_parquet(S, by="sample")`` labelled occurrence scores as samples' (P5-06);
``datavalue info RUN/grads`` answered with zarr internals (P5-14); a huge ledger value broke every
average-then-share statement with a message about non-finite values (P5-01).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue import errors as E
from datavalue.capture import FinalPass
from datavalue.embeddings import build_influence
from datavalue.store import open_run
from tests._helpers_tiny_run import X, Y, record_tiny_run, tiny_mlp, tiny_query_loss


# ---------------------------------------------------------------- P5-15: an aborted FinalPass
def test_p5_15_aborted_final_pass_is_refused(tmp_path):
    run = tmp_path / "r.zarr"
    model = record_tiny_run(run)
    with pytest.raises(RuntimeError, match="loader failed"), FinalPass(run, model) as fp:
        for t in range(4):
            if t == 2:
                raise RuntimeError("data loader failed")
            ids = np.arange(6 * t, 6 * t + 6)
            with fp.batch(ids):
                F.cross_entropy(model(X[ids]), Y[ids]).backward()
    assert open_run(run / "final").n_rows == 12  # what was recorded is kept
    with pytest.raises(E.EmbeddingError, match="unfinished final-weights pass.*loader failed.*overwrite=True"):
        build_influence(run, progress=False)
    with pytest.raises(E.QueryError, match="unfinished final-weights pass"):
        datavalue.Attributor(run, model, kind="influence", progress=False)


def test_p5_15_whole_pass_builds_and_a_subset_is_reported(tmp_path, caplog):
    run = tmp_path / "r.zarr"
    model = record_tiny_run(run)
    with FinalPass(run, model) as fp:  # half of the training samples: allowed, but reported
        for t in range(2):
            ids = np.arange(6 * t, 6 * t + 6)
            with fp.batch(ids):
                F.cross_entropy(model(X[ids]), Y[ids]).backward()
    assert open_run(run / "final").manifest["integration"]["complete"] is True
    with caplog.at_level(logging.WARNING, logger="datavalue"):
        build_influence(run, progress=False)
    assert "covers 12 of the 24 distinct samples" in caplog.text
    S = datavalue.Attributor(run, model, kind="influence", progress=False).scores(tiny_query_loss)
    assert S.shape == (3, 12)


def test_p5_15_pass_closed_without_with_is_complete(tmp_path):
    run = tmp_path / "r.zarr"
    model = record_tiny_run(run)
    fp = FinalPass(run, model)
    with fp.batch(np.arange(24)):
        F.cross_entropy(model(X), Y).backward()
    fp.close()
    build_influence(run, progress=False)


# ---------------------------------------------------------------- P5-22: DataParallel / torch.compile
@pytest.mark.parametrize("wrap", ["dp", "compile"])
def test_p5_22_wrapped_model_is_recorded_unwrapped(tmp_path, wrap):
    inner = tiny_mlp()
    if wrap == "compile":
        pytest.importorskip("torch._dynamo")
        wrapped = torch.compile(inner, backend="eager")
    else:
        wrapped = torch.nn.DataParallel(inner)
    run = tmp_path / "r.zarr"
    record_tiny_run(run, wrapped, steps=2)  # the wrapper's parameters are the inner model's
    assert [b["name"] for b in open_run(run).blocks] == ["0.weight", "2.weight"]
    assert datavalue.inspect(wrapped, proj_dim=None)[0]["name"] == "0.weight"
    datavalue.build_embeddings(run, progress=False)
    a = datavalue.Attributor(run, inner, progress=False).scores(tiny_query_loss)
    b = datavalue.Attributor(run, wrapped, progress=False).scores(tiny_query_loss)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    with FinalPass(run, wrapped) as fp, fp.batch(np.arange(12)):
        F.cross_entropy(inner(X[:12]), Y[:12]).backward()
    assert open_run(run / "final").n_rows == 12


class _Holder(torch.nn.Module):
    """Stands for a run an older version recorded from DataParallel(model): names ``module.*``."""

    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.module = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_p5_22_run_recorded_with_a_prefix_says_how_to_query(tmp_path):
    inner = tiny_mlp()
    run = tmp_path / "old.zarr"
    record_tiny_run(run, _Holder(inner))
    assert open_run(run).blocks[0]["name"] == "module.0.weight"
    datavalue.build_embeddings(run, progress=False)
    with pytest.raises(E.ModelMismatchError, match=r"prefix 'module\.'.*Attributor\(run, torch\.nn\.DataParallel\(model\)\)"):
        datavalue.Attributor(run, inner, progress=False)
    S = datavalue.Attributor(run, torch.nn.DataParallel(inner), progress=False).scores(tiny_query_loss)  # as the message says
    assert S.shape == (3, 24) and np.isfinite(S).all()


# ---------------------------------------------------------------- P5-23: float16 storage range
def _record_scaled(path: Path, scale: float, **kw) -> None:
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-12)
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, storage_dtype="float16", **kw) as rec:
        for t in range(2):
            ids = np.arange(6 * t, 6 * t + 6)
            with rec.step(sample_ids=ids):
                (scale * F.cross_entropy(model(X[ids]), Y[ids])).backward()
            opt.step()
            opt.zero_grad()


def test_p5_23_float16_overflow_goes_through_on_nonfinite(tmp_path):
    with pytest.raises(E.NonFiniteError, match="exceed float16's range.*storage_dtype='float32'"):
        _record_scaled(tmp_path / "a.zarr", 1e7)
    _record_scaled(tmp_path / "b.zarr", 1e7, on_nonfinite="skip")
    run = open_run(tmp_path / "b.zarr")
    G = np.asarray(run.read("grads", 0, run.n_rows), np.float64)
    assert np.isfinite(G).all() and not G.any()
    assert (np.asarray(run.flags[: run.n_rows]) & datavalue.store.FLAG_NONFINITE).all()


def test_p5_23_float16_underflow_is_refused(tmp_path):
    with pytest.raises(E.RecorderError, match="underflow float16 storage.*exact zeros.*storage_dtype='float32'"):
        _record_scaled(tmp_path / "a.zarr", 1e-9)
    _record_scaled(tmp_path / "ok.zarr", 1.0)  # in range: recorded as before
    run = open_run(tmp_path / "ok.zarr")
    assert run.n_rows == 12 and np.asarray(run.read("grads", 0, 12), np.float64).any(1).all()


# ---------------------------------------------------------------- P5-07: nothing new inside another run
def test_p5_07_archive_ledger_and_cache_refuse_a_path_inside_a_run(tmp_path, capsys):
    from decimal import Decimal

    from datavalue import shapley
    from datavalue.cli import main
    from datavalue.store import archive_run

    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    record_tiny_run(a, steps=1)
    record_tiny_run(b, steps=1)
    before = sorted(p.name for p in b.iterdir())
    with pytest.raises(E.StoreError, match="inside the datavalue run .*b.zarr.*nothing was written"):
        archive_run(a, b / "a.zip")
    assert main(["archive", str(a), str(b / "x.zip")]) == 2
    assert "inside the datavalue run" in capsys.readouterr().err
    with pytest.raises(shapley.OutputPathError, match="new royalty ledger .*inside|inside the datavalue run"):
        shapley.RoyaltyLedger(b / "ledger.jsonl")
    with pytest.raises(shapley.OutputPathError, match="inside the datavalue run"):
        shapley.CoalitionGame(lambda S: float(len(S)), 2, cache_path=b / "embeddings" / "u.jsonl")
    assert sorted(p.name for p in b.iterdir()) == before  # nothing was written into b
    archive_run(a, tmp_path / "a.zip")  # beside the runs: fine
    ledger = shapley.RoyaltyLedger(tmp_path / "ledger.jsonl")
    ledger.record(output_id="g", prompt="p", revenue=Decimal("1.00"), owners=["x"], result=[1.0], content=b"c")
    ledger.close()


# ---------------------------------------------------------------- P5-16: a model not at the final weights
def test_p5_16_query_with_other_weights_warns(tmp_path, caplog):
    run = tmp_path / "r.zarr"
    model = record_tiny_run(run)
    datavalue.build_embeddings(run, progress=False)
    with caplog.at_level(logging.WARNING, logger="datavalue"):
        datavalue.Attributor(run, model, progress=False).scores(tiny_query_loss)
    assert "load_state_dict" not in caplog.text  # the trained weights: no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datavalue"):
        S = datavalue.Attributor(run, tiny_mlp(seed=5), progress=False).scores(tiny_query_loss)  # forgot load_state_dict
    assert S.shape == (3, 24)  # still answered: other weights are allowed
    assert "not the ones" in caplog.text and "model.load_state_dict(" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datavalue"):
        datavalue.Attributor(run, tiny_mlp(seed=5), kind="grad_dot", progress=False)
    assert "load_state_dict" not in caplog.text  # raw-gradient kinds are not defined at the final weights


# ---------------------------------------------------------------- P5-20: the true Fisher needs >= 2 classes
def test_p5_20_fisher_on_a_one_output_model_is_refused(tmp_path):
    torch.manual_seed(0)
    reg = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    opt = torch.optim.SGD(reg.parameters(), lr=0.1)
    rec = datavalue.Recorder(tmp_path / "r.zarr", reg, proj_dim=None, optimizer=opt, curvature="fisher")
    with pytest.raises(E.RecorderError, match=r"C >= 2.*shape \(6, 1\).*exactly zero.*curvature=None"):
        with rec.step(sample_ids=np.arange(6)):
            F.mse_loss(reg(X[:6]), Y[:6, None].float()).backward()
    rec.close()
    run = tmp_path / "ok.zarr"  # two or more classes: recorded as before, non-zero Fisher rows
    model = record_tiny_run(run, curvature="fisher")
    fisher = np.asarray(open_run(run).read("fisher", 0, open_run(run).n_fisher_rows))
    assert fisher.shape[0] == 24 * 3 and fisher.any(1).all()  # exact expectation: one row per class
    assert model is not None


# ---------------------------------------------------------------- P5-17: input conversions, one rule
def _one_step(path: Path, *, lr=None, tokens=None, reduction="mean", micro=False, proj_dim=None) -> None:
    model = tiny_mlp()
    opt = None if lr is not None else torch.optim.SGD(model.parameters(), lr=0.1)
    rec = datavalue.Recorder(path, model, proj_dim=proj_dim, optimizer=opt, loss_reduction=reduction)
    try:
        kw = {} if lr is None else {"lr": lr}
        block = rec.microbatch(np.arange(4), tokens=tokens) if micro else rec.step(np.arange(4), tokens=tokens, **kw)
        with block:
            F.cross_entropy(model(X[:4]), Y[:4]).backward()
        if micro:
            rec.commit_step()
        if opt is not None:
            opt.step()
    finally:
        rec.close()


@pytest.mark.parametrize("lr", [np.array([0.1]), np.array([[0.1]]), np.array([0.1, 0.2])])
def test_p5_17_numpy_lr_of_any_shape_but_scalar_is_refused(tmp_path, lr):
    with pytest.raises(E.RecorderError, match=r"lr must be one number, got an array of shape"):
        _one_step(tmp_path / "r.zarr", lr=lr)
    _one_step(tmp_path / "ok.zarr", lr=np.array(0.1))  # a 0-d array is one number
    assert open_run(tmp_path / "ok.zarr").lr[0] == pytest.approx(0.1)


@pytest.mark.parametrize("micro", [False, True])
@pytest.mark.parametrize(("tokens", "match"), [
    ([True, True, True, True], "a bool is not a count"),
    (torch.ones(4, dtype=torch.bool), "a bool is not a count"),
    ([1.5, 1, 1, 1], "whole token counts"),
])
def test_p5_17_tokens_are_whole_counts(tmp_path, tokens, match, micro):
    with pytest.raises(E.RecorderError, match=match):
        _one_step(tmp_path / "r.zarr", tokens=tokens, reduction="token_mean", micro=micro)
    _one_step(tmp_path / "ok.zarr", tokens=np.array([1.0, 2.0, 3.0, 4.0]), reduction="token_mean", micro=micro)
    np.testing.assert_allclose(open_run(tmp_path / "ok.zarr").weight[:4], [0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("proj_dim", [32.0, np.float64(32.0)])
def test_p5_17_float_proj_dim_is_refused_like_the_dict_form(tmp_path, proj_dim):
    with pytest.raises(E.RecorderError, match=r"proj_dim must be a positive int.*got (np\.float64\()?32\.0"):
        datavalue.Recorder(tmp_path / "r.zarr", tiny_mlp(), proj_dim=proj_dim)
    assert not (tmp_path / "r.zarr").exists()


# ---------------------------------------------------------------- P5-24: BatchNorm in training mode
def _bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def test_p5_24_batchnorm_in_training_mode_is_named_before_and_at_the_first_step(tmp_path, caplog):
    model = _bn_model()
    plan = datavalue.inspect(model, proj_dim=None)
    assert "batch norm in training mode" in plan[1]["note"] and "eval mode" in str(plan)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="datavalue"):
        rec = datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=None, optimizer=opt)
    assert "the first recorded step will fail" in caplog.text and "GroupNorm" in caplog.text
    with pytest.raises(E.CaptureError, match="BatchNorm1d cannot be captured per example.*GroupNorm"):
        with rec.step(sample_ids=np.arange(6)):
            F.cross_entropy(model(X[:6]), Y[:6]).backward()
    rec.close()


def test_p5_24_batchnorm_in_eval_mode_records(tmp_path, caplog):
    model = _bn_model()
    model[1].eval()  # frozen running statistics: per-example gradients exist
    assert "note" not in datavalue.inspect(model, proj_dim=None)[1]
    with caplog.at_level(logging.WARNING, logger="datavalue"):
        record_tiny_run(tmp_path / "r.zarr", model, steps=2)
    assert "will fail" not in caplog.text
    assert open_run(tmp_path / "r.zarr").n_rows == 12


# ---------------------------------------------------------------- P5-06: scores labelled with another by=
@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """24 occurrences of 24 distinct samples, recorded in an order other than the sorted ids."""
    run = tmp_path_factory.mktemp("p5_06") / "r.zarr"
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    perm = np.random.default_rng(0).permutation(24)
    with datavalue.Recorder(run, model, proj_dim=None, optimizer=opt) as rec:
        for t in range(4):
            ids = perm[6 * t : 6 * t + 6]
            with rec.step(sample_ids=ids):
                F.cross_entropy(model(X[ids]), Y[ids]).backward()
            opt.step()
            opt.zero_grad()
    datavalue.build_embeddings(run, progress=False)
    return run, model


def test_p5_06_scores_under_another_by_are_refused(one_epoch, tmp_path):
    run, model = one_epoch
    a = datavalue.Attributor(run, model, progress=False)
    S_occ = a.scores(tiny_query_loss)
    S_smp = a.scores(tiny_query_loss, by="sample")
    with pytest.raises(E.QueryError, match="computed with by=None .* labelled with by='sample'"):
        a.save_parquet(np.asarray(S_occ), tmp_path / "x.parquet", by="sample")
    with pytest.raises(E.QueryError, match="computed with by='sample'"):
        a.frame(S_smp.copy())  # equal values: recognised too
    assert not (tmp_path / "x.parquet").exists()
    # the right by= keeps working, and labels each score with its own sample
    f = a.frame(S_smp, by="sample").set_index("sample_id")
    occ = a.frame(S_occ).groupby("sample_id")["test_0"].sum()
    np.testing.assert_allclose(f.loc[occ.index, "test_0"], occ.values, rtol=1e-5, atol=1e-7)
    a.save_parquet(S_occ[:2], tmp_path / "ok.parquet")  # a view of the result: recognised


def test_p5_06_bare_array_of_unknown_provenance_is_refused_only_when_ambiguous(one_epoch, tmp_path):
    run, model = one_epoch
    a = datavalue.Attributor(run, model, progress=False)
    S = a.scores(tiny_query_loss) * 2.0  # new values: provenance unknown
    with pytest.raises(E.QueryError, match="cannot tell whether these 24-column scores are per occurrence or per sample"):
        a.frame(S, by="sample")
    sorted_run = tmp_path / "sorted.zarr"  # ids recorded in sorted order: both labellings agree, nothing refused
    m2 = record_tiny_run(sorted_run)
    datavalue.build_embeddings(sorted_run, progress=False)
    b = datavalue.Attributor(sorted_run, m2, progress=False)
    assert b.frame(b.scores(tiny_query_loss) * 2.0, by="sample").shape[0] == 24


# ---------------------------------------------------------------- P5-14: a path inside a run as RUN
def test_p5_14_cli_run_argument_inside_a_run(tmp_path, capsys):
    from datavalue.cli import main

    run = tmp_path / "r.zarr"
    model = record_tiny_run(run, steps=1)
    for cmd, path, what in (("info", run / "grads", "an array inside"), ("build", run / "zarr.json", "metadata file"),
                            ("info", run / "weights_digest", "a group inside")):
        assert main([cmd, str(path)]) == 2
        err = capsys.readouterr().err
        assert what in err and f"pass the run's directory (datavalue {cmd} {run.resolve()})" in err, err
    with FinalPass(run, model) as fp, fp.batch(np.arange(6)):
        F.cross_entropy(model(X[:6]), Y[:6]).backward()
    assert main(["info", str(run / "final")]) == 0  # a run inside a run is a run
    assert main(["info", str(run / "final" / "grads")]) == 2
    assert f"(datavalue info {(run / 'final').resolve()})" in capsys.readouterr().err
    assert main(["info", str(run)]) == 0


# ---------------------------------------------------------------- P5-01: a huge (finite) ledger value
def test_p5_01_average_then_share_with_huge_finite_values(tmp_path):
    from decimal import Decimal

    from datavalue import shapley

    ledger = shapley.RoyaltyLedger(tmp_path / "l.jsonl")
    ledger.record(output_id="g1", prompt="p", revenue=Decimal("10.00"), owners=["ann", "bob"], result=[0.2, 0.8],
                  content=b"a", timestamp="2025-01-10")
    ledger.record(output_id="g2", prompt="p", revenue=Decimal("10.00"), owners=["ann", "bob"], result=[1e308, 1e308],
                  content=b"b", timestamp="2025-01-15")
    st = ledger.statement(aggregation="average-then-share")  # the mean is ~5e307 each: split evenly
    amounts = {o.owner: o.amount for o in st.owners}
    assert st.reconciles and sum(amounts.values()) == st.pool_total
    assert amounts["ann"] == amounts["bob"]
    ledger.close()
