"""Ninth probe leftovers (session 13): building in a run archive (P9-17)."""

from __future__ import annotations

import zipfile

import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.errors import StoreReadOnlyError
from datavalue.store import archive_run


@pytest.fixture
def archived(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    path = tmp_path / "run.zarr"
    with datavalue.Recorder(path, model, proj_dim=16, chunk_rows=8) as rec:
        for t in range(3):
            with rec.step(sample_ids=range(6 * t, 6 * t + 6), lr=0.1):
                F.cross_entropy(model(x), y).backward()
            model.zero_grad()
    datavalue.build_embeddings(path, curvature="empirical_fisher", progress=False)
    archive_run(path, tmp_path / "x.zip")
    return tmp_path / "x.zip"


@pytest.mark.parametrize("overwrite", [False, True])
def test_p9_17_a_build_in_an_archive_says_to_unpack_it_not_to_pass_overwrite(archived, overwrite):
    """Was: "already holds embeddings/empirical_fisher/values. Pass overwrite=True to rebuild it", and
    overwrite=True then failed as the archive is read-only."""
    before = archived.read_bytes()
    with pytest.raises(StoreReadOnlyError, match=r"run archive \(\.zip\), which is read-only.*Unpack it to a "
                                                  r"directory and build there: `unzip .*x\.zip -d .*x\.zarr`") as e:
        datavalue.build_embeddings(archived, curvature="empirical_fisher", overwrite=overwrite, progress=False)
    assert "Pass overwrite=True" not in str(e.value)
    assert archived.read_bytes() == before
    # what the message says works: unpack, then build there
    out = archived.with_suffix(".zarr")
    zipfile.ZipFile(archived).extractall(out)
    datavalue.build_embeddings(out, curvature="empirical_fisher", overwrite=True, progress=False)


def test_an_extension_in_an_archive_says_to_unpack_it(archived):
    """extend_embeddings on an archive gets the same answer as a build there (session 13): what to unpack, and the
    extension to run on the unpacked run, with the archive's bytes unchanged."""
    from datavalue.embeddings import extend_embeddings

    before = archived.read_bytes()
    with pytest.raises(StoreReadOnlyError, match=r"extend_embeddings: .*run archive \(\.zip\), which is read-only.*"
                                                  r"`unzip .*x\.zip -d .*x\.zarr`.*datavalue\.embeddings\."
                                                  r"extend_embeddings\("):
        extend_embeddings(archived, progress=False)
    assert archived.read_bytes() == before
