"""CaptureConfig: validated once, frozen, round-trips through the manifest; resume compares configs."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.capture import CaptureConfig
from datavalue.errors import RecorderError, StoreMismatchError
from datavalue.store import open_run


@pytest.mark.parametrize("bad", [
    {"proj_dim": True}, {"proj_dim": 1.5}, {"proj_dim": float("nan")}, {"proj_dim": 0}, {"proj_dim": "64"},
    {"proj_dim": {}}, {"seed": 1.0}, {"chunk_rows": -3}, {"chunk_rows": 2.7}, {"loss_reduction": "bogus"},
    {"curvature": "kfac"}, {"storage_dtype": "bfloat16"}, {"on_nonfinite": "ignore"}, {"fisher_samples": 0},
    {"layers": "fc1"}, {"record_optimizer_state": 1}, {"sketch": "srht"},
])
def test_bad_options_are_refused_with_what_was_given(bad):
    (name, value), = bad.items()
    with pytest.raises(RecorderError, match=name.split("_")[0]):
        CaptureConfig(**bad)


def test_frozen_replace_validates_and_round_trips():
    cfg = CaptureConfig(proj_dim={"0": 8}, seed=3, curvature=["hessian", "fisher"], layers=["0"])
    assert cfg.curvature == ("fisher", "hessian") and cfg.layers == ("0",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 4
    with pytest.raises(RecorderError, match="proj_dim"):
        dataclasses.replace(cfg, proj_dim=-1)
    assert CaptureConfig.from_manifest({"capture_config": cfg.to_json()}) == cfg
    assert "sketch" in CaptureConfig.help("proj_dim") and "seed" in CaptureConfig.help()


def _record(path, model, x, y, **kw):
    with datavalue.Recorder(path, model, **kw) as rec:
        with rec.step(sample_ids=range(len(x)), lr=0.1):
            F.cross_entropy(model(x), y).backward()
    return rec


def test_recorder_stores_its_config_and_resume_compares_configs(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    cfg = CaptureConfig(proj_dim=8, seed=5, storage_dtype="float64")
    rec = _record(tmp_path / "r.zarr", model, x, y, config=cfg)
    assert rec.config.seed == 5 and rec.config.sketch == "orthogonal"
    stored = CaptureConfig.from_manifest(open_run(tmp_path / "r.zarr").manifest)
    assert stored == rec.config
    with pytest.raises(StoreMismatchError, match=r"seed: recorded 5, now 6"):
        _record(tmp_path / "r.zarr", model, x, y, config=dataclasses.replace(cfg, seed=6), resume=True)
    _record(tmp_path / "r.zarr", model, x, y, config=cfg, resume=True)
    assert open_run(tmp_path / "r.zarr").n_steps == 2
    with pytest.raises(RecorderError, match="either config= or the keyword options"):
        datavalue.Recorder(tmp_path / "s.zarr", model, proj_dim=16, config=cfg)
    # keywords and the equivalent config record the same run
    _record(tmp_path / "kw.zarr", model, x, y, proj_dim=8, seed=5, storage_dtype="float64")
    np.testing.assert_array_equal(open_run(tmp_path / "kw.zarr").read("grads"),
                                  open_run(tmp_path / "r.zarr").read("grads")[:4])
