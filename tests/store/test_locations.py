"""Runs read from a zip archive and from an fsspec URL give the same answers as the directory."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.errors import StoreExistsError, StoreReadOnlyError
from datavalue.store import archive_run, create_array, open_run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loc")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    with datavalue.Recorder(tmp / "r.zarr", model, proj_dim=32, optimizer=opt, chunk_rows=16) as rec:
        for ep in range(2):
            for ids in torch.arange(24).split(8):
                with rec.step(sample_ids=ids, epoch=ep):
                    F.cross_entropy(model(x[ids]), y[ids]).backward()
                opt.step()
                opt.zero_grad()
    datavalue.build_embeddings(tmp / "r.zarr", curvature="empirical_fisher", progress=False)
    return tmp, model, x, y


def test_zip_archive_and_url_match_directory(built):
    tmp, model, x, y = built
    from datavalue.cli import main

    assert main(["archive", str(tmp / "r.zarr"), str(tmp / "r.zip")]) == 0
    with pytest.raises(StoreExistsError):
        archive_run(tmp / "r.zarr", tmp / "r.zip")
    loss_fn = lambda m: F.cross_entropy(m(x[:4]), y[:4], reduction="none")
    ref = datavalue.Attributor(tmp / "r.zarr", model, progress=False).scores(loss_fn, by="sample")
    for loc in (tmp / "r.zip", str(tmp / "r.zip"), f"file://{tmp / 'r.zarr'}"):
        run = open_run(loc)
        np.testing.assert_array_equal(run.sample_id, open_run(tmp / "r.zarr").sample_id)
        got = datavalue.Attributor(loc, model, progress=False).scores(loss_fn, by="sample")
        np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_archives_are_read_only(built):
    tmp, *_ = built
    archive_run(tmp / "r.zarr", tmp / "ro.zip")
    with pytest.raises(StoreReadOnlyError, match="read-only"):
        create_array(tmp / "ro.zip", "embeddings/x/values", shape=(1, 1), dtype="float32", chunks=(1, 1))


def test_run_in_a_memory_store(built):
    """A zarr MemoryStore holding a copy of the run (e.g. in tests) opens like the directory."""
    import zarr

    tmp, model, x, y = built
    src = zarr.storage.LocalStore(str(tmp / "r.zarr"), read_only=True)
    mem = zarr.storage.MemoryStore()
    from zarr.core.sync import sync

    async def copy():
        from zarr.core.buffer import default_buffer_prototype

        async for key in src.list():
            await mem.set(key, await src.get(key, prototype=default_buffer_prototype()))

    sync(copy())
    run = open_run(mem)
    ref = open_run(tmp / "r.zarr")
    np.testing.assert_array_equal(run.grads.compute(), ref.grads.compute())
    np.testing.assert_array_equal(run.step_ptr, ref.step_ptr)
