"""Results leave as datasets columns and Parquet tables, matched by sample id."""

from __future__ import annotations

import datasets
import numpy as np
import pandas as pd
import pytest

from datavalue.errors import QueryError, StoreExistsError
from datavalue.query import Attributor
from tests.query.conftest import IDS


@pytest.fixture(scope="module")
def attr(tiny):
    return Attributor(tiny[0], tiny[1], chunk_rows=32, progress=False)


def test_to_dataset_matches_rows_by_sample_id(tiny, attr):
    by_sample = attr.scores(tiny[3], by="sample")
    labels = attr.labels(by="sample")
    # shuffled ids plus one example the run never saw
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.permutation(IDS), [5]])
    ds = datasets.Dataset.from_dict({"id": ids, "text": [f"ex{i}" for i in ids]})
    out = attr.to_dataset(by_sample, ds)
    assert out.column_names == ["id", "text"] + [f"influence_{i}" for i in range(5)]
    for row in range(len(ids) - 1):
        j = int(np.flatnonzero(labels == ids[row])[0])
        np.testing.assert_allclose([out[row][f"influence_{i}"] for i in range(5)], by_sample[:, j])
    assert np.isnan(out[len(ids) - 1]["influence_0"])  # never trained on
    mean = attr.to_dataset(by_sample, ds, reduce="mean", prefix="infl", fill_value=0.0)
    j = int(np.flatnonzero(labels == ids[0])[0])
    assert mean[0]["infl"] == pytest.approx(by_sample[:, j].mean())
    assert mean[len(ids) - 1]["infl"] == 0.0
    # occurrence scores are summed per sample; a loss function works too
    occ = attr.to_dataset(attr.scores(tiny[3]), ds, by=None, reduce="sum")
    direct = attr.to_dataset(tiny[3], ds, reduce="sum")
    np.testing.assert_allclose(occ["influence"], direct["influence"], rtol=1e-5, equal_nan=True)
    with pytest.raises(QueryError, match="already has"):
        attr.to_dataset(by_sample, out)
    with pytest.raises(QueryError, match="columns"):
        attr.to_dataset(by_sample[:, :-1], ds)
    with pytest.raises(QueryError, match="no column"):
        attr.to_dataset(by_sample, ds, id_column="idx")


def test_save_parquet_round_trips_and_refuses_overwrite(tmp_path, tiny, attr):
    S = attr.scores(tiny[3])
    path = attr.save_parquet(S, tmp_path / "occ.parquet")
    back = pd.read_parquet(path)
    assert len(back) == attr.n_rows
    np.testing.assert_array_equal(back["sample_id"], attr.occurrences["sample_id"])
    np.testing.assert_array_equal(back["step"], attr.occurrences["step"])
    np.testing.assert_allclose(back["test_3"], S[3])
    with pytest.raises(StoreExistsError):
        attr.save_parquet(S, path)
    owners = {int(s): ("a" if s % 2 else 3) for s in IDS}  # mixed types are written as strings
    by_owner = attr.scores(tiny[3], by="owner", owners=owners)
    back = pd.read_parquet(attr.save_parquet(by_owner, path, by="owner", owners=owners, overwrite=True))
    assert sorted(back["owner"]) == ["3", "a"]
    top = attr.top_k(tiny[3], k=3, by="sample")
    back = pd.read_parquet(attr.save_parquet(top, tmp_path / "top.parquet"))
    pd.testing.assert_frame_equal(back, top.to_frame(), check_dtype=False)
    with pytest.raises(QueryError, match="columns"):
        attr.save_parquet(S, tmp_path / "x.parquet", by="sample")
