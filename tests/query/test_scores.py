"""Scores, aggregates, windows and top-k equal their dense numpy oracles (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from datavalue.capture import per_sample_gradients
from datavalue.errors import ModelMismatchError, NonFiniteError, QueryError
from datavalue.query import Attributor
from tests.query.conftest import IDS, C, D

RTOL = 1e-5


def _oracle(tiny):
    """Dense ``(m, R)`` scores in float64 from the test gradients and the stored embeddings."""
    path, model, emb, loss = tiny
    q = per_sample_gradients(model, loss, path).astype(np.float64)
    return q, q @ emb.astype(np.float64).T


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(b).max())


@pytest.fixture(scope="module")
def attr(tiny):
    path, model, _, _ = tiny
    return Attributor(path, model, chunk_rows=16, progress=False)  # 80 rows -> 5 chunks


def test_scores_equal_test_gradient_dot_embedding(tiny, attr):
    _, S_ref = _oracle(tiny)
    S = attr.scores(tiny[3])
    assert isinstance(S, np.ndarray) and S.shape == (5, attr.n_rows) == S_ref.shape
    _close(S, S_ref)
    np.testing.assert_array_equal(attr.labels(), np.arange(attr.n_rows))
    lazy = attr.scores(tiny[3], lazy=True)
    assert not isinstance(lazy, np.ndarray) and lazy.shape == S.shape
    np.testing.assert_array_equal(lazy.compute(), S)


def test_occurrences_table_matches_the_run(attr):
    occ, run = attr.occurrences, attr.run
    assert len(occ) == run.n_rows == 80
    np.testing.assert_array_equal(occ["step"], run.row_step)
    np.testing.assert_array_equal(occ["sample_id"], run.sample_id)
    np.testing.assert_array_equal(occ["lr"], run.lr[run.row_step])
    np.testing.assert_array_equal(occ["epoch"], np.repeat([0, 1], 40))
    assert set(occ.columns) >= {"step", "epoch", "sample_id", "weight", "lr"}
    assert len(np.unique(run.lr)) > 1  # the schedule is visible per step


def test_by_sample_sums_each_samples_occurrences(tiny, attr):
    _, S_ref = _oracle(tiny)
    sid = attr.occurrences["sample_id"].to_numpy()
    labels = attr.labels(by="sample")
    np.testing.assert_array_equal(labels, np.sort(IDS))
    expect = np.stack([S_ref[:, sid == s].sum(1) for s in labels], 1)
    out = attr.scores(tiny[3], by="sample")
    assert out.dtype == np.float64
    _close(out, expect)
    _close(attr.scores(tiny[3], by="sample", lazy=True).compute(), expect)


@pytest.mark.parametrize("form", ["dict", "callable", "array", "series"])
def test_by_owner_sums_each_owners_samples(tiny, attr, form):
    import pandas as pd

    _, S_ref = _oracle(tiny)
    sid = attr.occurrences["sample_id"].to_numpy()
    owner_of = {int(s): f"owner{int(s) % 3}" for s in IDS}
    owners = {
        "dict": owner_of,
        "callable": lambda s: owner_of[s],
        "array": [owner_of[int(s)] for s in attr.labels(by="sample")],
        "series": pd.Series(owner_of),
    }[form]
    out = attr.scores(tiny[3], by="owner", owners=owners)
    labels = attr.labels(by="owner", owners=owners)
    assert labels.tolist() == ["owner0", "owner1", "owner2"]
    expect = np.stack([S_ref[:, [owner_of[int(s)] == o for s in sid]].sum(1) for o in labels], 1)
    _close(out, expect)


def test_unowned_samples_raise_drop_or_group(tiny, attr):
    _, S_ref = _oracle(tiny)
    sid = attr.occurrences["sample_id"].to_numpy()
    owners = {int(s): 7 for s in IDS[:10]}  # 30 samples have no owner
    with pytest.raises(QueryError, match="no owner"):
        attr.scores(tiny[3], by="owner", owners=owners)
    dropped = attr.scores(tiny[3], by="owner", owners=owners, unowned="drop")
    assert attr.labels(by="owner", owners=owners, unowned="drop").tolist() == [7]
    _close(dropped[:, 0], S_ref[:, np.isin(sid, IDS[:10])].sum(1))
    grouped = attr.scores(tiny[3], by="owner", owners=owners, unowned="group")
    assert attr.labels(by="owner", owners=owners, unowned="group").tolist() == [7, None]
    _close(grouped.sum(1), S_ref.sum(1))
    with pytest.raises(QueryError, match="align"):
        attr.scores(tiny[3], by="owner", owners=[1, 2, 3])


def test_step_window_restricts_columns(tiny, attr):
    _, S_ref = _oracle(tiny)
    run = attr.run
    r0, r1 = run.step_ptr[2], run.step_ptr[7]
    _close(attr.scores(tiny[3], steps=(2, 7)), S_ref[:, r0:r1])
    np.testing.assert_array_equal(attr.labels(steps=(2, 7)), np.arange(r0, r1))
    sid = run.sample_id[r0:r1]
    labels = attr.labels(by="sample", steps=(2, 7))
    np.testing.assert_array_equal(labels, np.unique(sid))
    expect = np.stack([S_ref[:, r0:r1][:, sid == s].sum(1) for s in labels], 1)
    _close(attr.scores(tiny[3], by="sample", steps=(2, 7)), expect)
    _close(attr.scores(tiny[3], steps=(-2, None)), S_ref[:, run.step_ptr[-3] :])
    with pytest.raises(QueryError, match="steps"):
        attr.scores(tiny[3], steps=(5, 2))


def test_stage_influence_sums_to_occurrence_sums(tiny, attr):
    _, S_ref = _oracle(tiny)
    run = attr.run
    per_step = attr.stage_influence(tiny[3], normalize_by_lr=False)
    assert per_step.shape == (5, run.n_steps)
    expect = np.stack([S_ref[:, run.step_ptr[t] : run.step_ptr[t + 1]].sum(1) for t in range(run.n_steps)], 1)
    _close(per_step, expect)
    _close(per_step.sum(1), S_ref.sum(1))
    _close(attr.stage_influence(tiny[3]), expect / run.lr[None, :])
    window = attr.stage_influence(tiny[3], normalize_by_lr=False, steps=(3, 6))
    _close(window, expect[:, 3:6])
    np.testing.assert_array_equal(attr.labels(by="step", steps=(3, 6)), [3, 4, 5])


@pytest.mark.parametrize("by", [None, "sample", "owner"])
def test_top_k_equals_dense_top_k(tiny, attr, by):
    _, S_ref = _oracle(tiny)
    owners = {int(s): int(s) % 11 for s in IDS} if by == "owner" else None
    dense = S_ref if by is None else attr.scores(tiny[3], by=by, owners=owners)
    labels = attr.labels(by=by, owners=owners)
    k = 4
    res = attr.top_k(tiny[3], k=k, by=by, owners=owners)
    assert res.helpful_ids.shape == res.harmful_ids.shape == (5, k)
    for i in range(5):
        order = np.argsort(-dense[i], kind="stable")
        np.testing.assert_array_equal(res.helpful_ids[i], labels[order[:k]])
        _close(res.helpful_scores[i], dense[i, order[:k]])
        order = np.argsort(dense[i], kind="stable")
        np.testing.assert_array_equal(res.harmful_ids[i], labels[order[:k]])
        _close(res.harmful_scores[i], dense[i, order[:k]])
    frame = res.to_frame()
    assert len(frame) == 2 * 5 * k
    assert {"test", "kind", "rank", "score"} <= set(frame.columns)
    if by is None:  # occurrence details come along
        top = frame[(frame.test == 0) & (frame.kind == "helpful") & (frame["rank"] == 0)].iloc[0]
        assert top["sample_id"] == attr.occurrences["sample_id"].iloc[top["row"]]


def test_top_k_larger_than_columns(tiny, attr):
    res = attr.top_k(tiny[3], k=1000, by="step")
    assert res.helpful_ids.shape == (5, attr.run.n_steps)
    assert np.all(np.diff(res.helpful_scores, axis=1) <= 0) and np.all(np.diff(res.harmful_scores, axis=1) >= 0)
    with pytest.raises(QueryError):
        attr.top_k(tiny[3], k=0)


def test_query_with_precomputed_gradients_needs_no_model(tiny, attr):
    q, S_ref = _oracle(tiny)
    bare = Attributor(tiny[0], progress=False)
    _close(bare.scores(q.astype(np.float32)), S_ref)
    _close(bare.scores(torch.from_numpy(q[0])), S_ref[:1])
    with pytest.raises(QueryError, match="no model"):
        bare.scores(tiny[3])
    with pytest.raises(QueryError, match=r"\(m, "):
        bare.scores(np.ones((2, 3)))
    with pytest.raises(NonFiniteError):
        bare.scores(np.full((1, q.shape[1]), np.nan))


def test_fingerprint_mismatch_is_refused(tiny):
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(D, 11), nn.Tanh(), nn.Linear(11, C))  # different hidden width
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        Attributor(tiny[0], other)


def test_tracin_and_grad_dot_use_the_recorded_gradients(tiny):
    path, model, _, loss = tiny
    q = per_sample_gradients(model, loss, path).astype(np.float64)
    run = Attributor(path, model, progress=False).run
    G = run.grads.compute().astype(np.float64)
    gd = Attributor(path, model, embeddings="grads", progress=False)
    assert gd.kind == "grad_dot"
    _close(gd.scores(loss), q @ G.T)
    tr = Attributor(path, model, kind="tracin", chunk_rows=16, progress=False)
    scale = run.lr[run.row_step] * run.grad_scale[run.row_step] * run.weight
    _close(tr.scores(loss), (q @ G.T) * scale[None, :])
    with pytest.raises(QueryError):
        Attributor(path, model, embeddings="grads", kind="dvemb")
    with pytest.raises(QueryError):
        Attributor(path, model, kind="tracin", curvature="fisher")
