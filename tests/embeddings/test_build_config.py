"""BuildConfig: validated once, frozen, stored with the build, reused by extend_embeddings."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.embeddings import BuildConfig, build_metadata, stored_config
from datavalue.errors import EmbeddingError
from datavalue.store import open_array


@pytest.mark.parametrize("bad", [
    {"segments": 2.7}, {"segments": 0}, {"segments": True}, {"explode_threshold": float("nan")},
    {"explode_threshold": -1.0}, {"blocks": "diag"}, {"curvature": "kfac"}, {"dtype": "float16"},
    {"clipping": "scale"}, {"optimizer": "lion"}, {"velocity": 1}, {"chunk_rows": -3},
])
def test_bad_options_are_refused(bad):
    (name, _), = bad.items()
    with pytest.raises(EmbeddingError, match=name):
        BuildConfig(**bad)


def test_round_trip_and_help():
    cfg = BuildConfig(curvature="fisher", dtype=np.float32, segments=3)
    assert cfg.dtype == "float32"
    assert BuildConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.segments = 2
    assert "segments" in BuildConfig.help()


def _run(path, steps=6, trained=None):
    """Record ``steps`` steps; ``trained``: the (model, optimizer) of the run to resume (a resumed run
    needs the weights it reached)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    x, y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))
    if trained is not None:
        model, opt = trained
    resume = path.exists()
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, storage_dtype="float64", resume=resume) as rec:
        for t in range(steps):
            ids = np.arange(t * 4, t * 4 + 4) % 24
            with rec.step(sample_ids=ids):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    return model, opt


def test_config_equals_keywords_is_stored_and_reused_by_extend(tmp_path):
    a = _run(tmp_path / "a.zarr")
    _run(tmp_path / "b.zarr")
    cfg = BuildConfig(clipping="constant", explode_threshold=1e3, storage_dtype="float64", blocks="layer")
    ia = datavalue.build_embeddings(tmp_path / "a.zarr", config=cfg, progress=False)
    ib = datavalue.build_embeddings(tmp_path / "b.zarr", clipping="constant", explode_threshold=1e3,
                                    storage_dtype="float64", blocks="layer", progress=False)
    np.testing.assert_array_equal(open_array(tmp_path / "a.zarr", ia.array)[:], open_array(tmp_path / "b.zarr", ib.array)[:])
    meta = build_metadata(tmp_path / "a.zarr", ia.curvature)
    assert stored_config(meta) == cfg
    with pytest.raises(EmbeddingError, match="either config= or the keyword options"):
        datavalue.build_embeddings(tmp_path / "a.zarr", config=cfg, segments=2, overwrite=True, progress=False)
    # extending uses the stored options: equal to a full rebuild with them
    _run(tmp_path / "a.zarr", steps=3, trained=a)
    datavalue.embeddings.extend_embeddings(tmp_path / "a.zarr", progress=False)
    ext = np.asarray(open_array(tmp_path / "a.zarr", ia.array)[:])
    full = datavalue.build_embeddings(tmp_path / "a.zarr", config=cfg, overwrite=True, progress=False)
    np.testing.assert_allclose(ext, open_array(tmp_path / "a.zarr", full.array)[:], rtol=1e-9, atol=1e-12)
