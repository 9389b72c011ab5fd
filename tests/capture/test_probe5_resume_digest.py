"""Fifth probe P5-21: a run whose weights digest was deleted (or emptied) no longer resumes from any weights.

Every run recorded with ``optimizer=`` holds the digest of its initial weights from creation on, so a
run of this version without one was damaged; a run from before the digests (no chunk-digest record
either) still resumes as before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datavalue
from datavalue.errors import StoreCorruptError, StoreMismatchError


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _record(path: Path, steps: int = 3) -> nn.Module:
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt) as rec:
        for t in range(steps):
            x, y = torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
            opt.zero_grad()
            with rec.step(sample_ids=list(range(4 * t, 4 * t + 4))):
                F.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def _resume(path: Path, model: nn.Module) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, resume=True) as rec:
        opt.zero_grad()
        with rec.step(sample_ids=[100, 101]):
            F.cross_entropy(model(torch.randn(2, 6)), torch.tensor([0, 1])).backward()
        opt.step()


def test_a_new_run_holds_the_digest_of_its_initial_weights(tmp_path):
    path = tmp_path / "run.zarr"
    model = _model(0)
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)):
        doc = json.loads((path / "weights_digest" / "zarr.json").read_text())
    hist = next(iter(doc["attributes"].values()))["history"]
    assert [h["steps"] for h in hist] == [0]


@pytest.mark.parametrize("damage", ["deleted", "attributes emptied"])
def test_resume_refused_when_the_digest_is_gone(tmp_path, damage):
    path = tmp_path / "run.zarr"
    _record(path)
    if damage == "deleted":
        shutil.rmtree(path / "weights_digest")
    else:
        meta = path / "weights_digest" / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["attributes"] = {}
        meta.write_text(json.dumps(doc))
    with pytest.raises(StoreCorruptError, match="weights digest .* is missing or holds no digest"):
        _resume(path, _model(5))  # weights the run never reached (was: accepted)
    assert datavalue.open_run(str(path)).n_steps == 3  # nothing written


def test_control_other_weights_refused_with_the_digest(tmp_path):
    path = tmp_path / "run.zarr"
    _record(path)
    with pytest.raises(StoreMismatchError, match="cannot resume"):
        _resume(path, _model(5))


def test_a_run_from_before_the_digests_still_resumes(tmp_path):
    path = tmp_path / "run.zarr"
    model = _record(path)
    # what an older version wrote: no weights digest, no chunk-digest record, no root attribute
    shutil.rmtree(path / "weights_digest")
    for f in (path / "commit").glob("digests.*"):
        f.unlink()
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"].pop("datavalue_chunk_digests")
    (path / "zarr.json").write_text(json.dumps(root))
    _resume(path, model)
    assert datavalue.open_run(str(path)).n_steps == 4
