"""Seventh probe, queries (issue 22): P7-02 scores of a replaced run, P7-04 top_k's k above the rows,
P7-05 lazy reads of a missing or damaged chunk. Each test failed before its fix."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.capture import FinalPass
from datavalue.embeddings import build_influence
from datavalue.errors import QueryError, StoreCorruptError
from tests._helpers_tiny_run import X, Y, record_tiny_run, tiny_mlp, tiny_query_loss


def _rerecord(path, ids_from: int = 1000) -> None:
    """Record another run at ``path`` (overwrite=True): other samples (ids ``ids_from..``), other data."""
    model = tiny_mlp(seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(path, model, optimizer=opt, overwrite=True, proj_dim=None) as rec:
        for t in range(4):
            with rec.step(sample_ids=np.arange(ids_from + 6 * t, ids_from + 6 * t + 6)):
                F.cross_entropy(model(3 * X[6 * t : 6 * t + 6]), (Y[6 * t : 6 * t + 6] + 1) % 3).backward()
            opt.step()
            opt.zero_grad()


def _built_attributor(path, kind="dvemb"):
    """A 4-step tiny run at ``path``, built for ``kind="dvemb"``, and an Attributor on it."""
    model = record_tiny_run(path)
    if kind == "dvemb":
        datavalue.build_embeddings(path, progress=False)
    return datavalue.Attributor(path, model, kind=kind, progress=False)


@pytest.mark.parametrize("kind", ["dvemb", "tracin"])
def test_p7_02_scores_of_a_replaced_run_are_refused_by_frame_save_parquet_to_dataset_and_lazy_compute(tmp_path, kind):
    import datasets

    path = tmp_path / "r.zarr"
    attr = _built_attributor(path, kind)
    model = attr.model
    S = attr.scores(tiny_query_loss)
    S_sample = attr.scores(tiny_query_loss, by="sample")
    lazy = attr.scores(tiny_query_loss, lazy=True)
    lazy_sample = attr.scores(tiny_query_loss, by="sample", lazy=True)
    assert attr.frame(S)["sample_id"].tolist() == list(range(24))  # before: accepted

    _rerecord(path)  # the run at the path is replaced, as another process would
    if kind == "dvemb":
        datavalue.build_embeddings(path, progress=False)
    ds = datasets.Dataset.from_dict({"id": list(range(1000, 1024))})
    out = tmp_path / "s.parquet"
    for call in (lambda: attr.frame(S), lambda: attr.save_parquet(S, out),
                 lambda: attr.to_dataset(S_sample, ds, by="sample"), lambda: lazy.compute(),
                 lambda: lazy_sample.compute(), lambda: attr.scores(tiny_query_loss), lambda: attr.top_k(tiny_query_loss),
                 lambda: attr.labels(by="sample"), lambda: attr.occurrences):
        with pytest.raises(QueryError, match="is another run now .*Open a new Attributor"):
            call()
    assert not out.exists()
    # an Attributor opened on the new run refuses the old run's array too (it is recognised)
    fresh = datavalue.Attributor(path, model, kind=kind, progress=False)
    with pytest.raises(QueryError, match="is another run now"):
        fresh.frame(S)
    assert fresh.frame(fresh.scores(tiny_query_loss))["sample_id"].tolist() == list(range(1000, 1024))


def test_p7_02_a_rebuild_is_refused_and_a_resume_that_appends_steps_is_accepted(tmp_path):
    path = tmp_path / "r.zarr"
    attr = _built_attributor(path)
    S = attr.scores(tiny_query_loss)
    datavalue.build_embeddings(path, progress=False, overwrite=True, storage_dtype="float64")  # another build
    with pytest.raises(QueryError, match="was rebuilt since"):
        attr.frame(S)

    path2 = tmp_path / "r2.zarr"
    model = record_tiny_run(path2, steps=2)
    attr = datavalue.Attributor(path2, model, kind="tracin", progress=False)
    S = attr.scores(tiny_query_loss)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(path2, model, optimizer=opt, resume=True, proj_dim=None) as rec:  # appends steps 2, 3
        for t in (2, 3):
            with rec.step(sample_ids=np.arange(6 * t, 6 * t + 6)):
                F.cross_entropy(model(X[6 * t : 6 * t + 6]), Y[6 * t : 6 * t + 6]).backward()
            opt.step()
            opt.zero_grad()
    assert attr.frame(S)["sample_id"].tolist() == list(range(12))  # its rows are unchanged


def test_p7_04_top_k_clips_k_to_the_columns_before_the_memory_estimate(tmp_path):
    path = tmp_path / "r.zarr"
    model = record_tiny_run(path)
    # 64 KiB: k=10**9 used to be estimated at ~119 GiB (k counted before it was clipped to the 24 rows)
    attr = datavalue.Attributor(path, model, kind="tracin", progress=False, max_memory=64 << 10)
    big = attr.top_k(tiny_query_loss, k=10**9)
    ref = attr.top_k(tiny_query_loss, k=24)
    assert big.k == 24
    np.testing.assert_array_equal(big.helpful_ids, ref.helpful_ids)
    np.testing.assert_array_equal(big.harmful_scores, ref.harmful_scores)
    assert attr.top_k(tiny_query_loss, k=10**9, by="sample").k == 24
    # a refused top_k does not advise top_k() (the call refused) nor lazy=, which it has not
    tight = datavalue.Attributor(path, model, kind="tracin", progress=False, max_memory=64)
    with pytest.raises(QueryError, match="a smaller k") as info:
        tight.top_k(tiny_query_loss, k=3)
    assert "top_k()" not in str(info.value) and "lazy=" not in str(info.value)
    with pytest.raises(QueryError, match=r"top_k\(\) instead"):  # scores() still advises it
        tight.scores(tiny_query_loss)


def _influence_run(tmp_path):
    path = tmp_path / "inf.zarr"
    model = record_tiny_run(path)
    with FinalPass(path, model) as fp:
        for a in range(0, 24, 6):
            with fp.batch(range(a, a + 6)):
                F.cross_entropy(model(X[a : a + 6]), Y[a : a + 6]).backward()
    build_influence(path, progress=False)
    return path, model


@pytest.mark.parametrize("kind", ["dvemb", "tracin", "grad_dot", "influence"])
@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_p7_05_lazy_scores_refuse_a_missing_or_damaged_chunk(tmp_path, kind, damage):
    if kind == "influence":
        path, model = _influence_run(tmp_path)
        pattern = "final/influence/*/values/c/*/*"
    else:
        path = tmp_path / "r.zarr"
        model = record_tiny_run(path)
        pattern = "grads/c/*/*"
        if kind == "dvemb":
            datavalue.build_embeddings(path, progress=False)
            pattern = "embeddings/*/values/c/*/*"
    attr = datavalue.Attributor(path, model, kind=kind, progress=False)
    before = [attr.scores(tiny_query_loss, by=by, lazy=True) for by in (None, "sample")]
    victim = sorted(glob.glob(os.path.join(path, pattern)))[0]
    if damage == "delete":
        os.remove(victim)
        match = "is missing"
    else:
        raw = bytearray(open(victim, "rb").read())
        raw[0] ^= 0xFF
        open(victim, "wb").write(bytes(raw))
        match = "checksum mismatch"
    after = [attr.scores(tiny_query_loss, by=by, lazy=True) for by in (None, "sample")]
    name = os.path.relpath(victim, path if kind != "influence" else os.path.join(path, "final"))
    for lazy in before + after:
        with pytest.raises(StoreCorruptError, match=match) as info:
            lazy.compute()
        assert name in str(info.value)
