"""Data bound to its run (issue 22 item 7, "every read path checks presence and provenance"; the third
probe's repro_19): an array copied in from another run of the same shape is refused on open and on
resume; a whole copy of a run, and runs written before run ids, open as before."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.errors import StoreCorruptError
from datavalue.store import open_run
from datavalue.store._schema import RUN_ID_KEY


def _record(path, seed, *, steps=3, resume=False, adam=False, trained=None):
    """Record ``steps`` steps; ``trained``: the ``(model, opt)`` of the run being resumed (its weights are
    checked against the run's), returned for the next call."""
    if trained is None:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        opt = (torch.optim.AdamW if adam else torch.optim.SGD)(model.parameters(), lr=0.1)
    else:
        model, opt = trained
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4 * steps, 4, generator=g), torch.randint(0, 3, (4 * steps,), generator=g)
    with datavalue.Recorder(path, model, proj_dim=16, optimizer=opt, resume=resume) as rec:
        for t in range(steps):
            ids = np.arange(4 * t, 4 * t + 4) + (100 if resume else 0)
            with rec.step(sample_ids=ids):
                F.cross_entropy(model(x[4 * t : 4 * t + 4]), y[4 * t : 4 * t + 4]).backward()
            opt.step()
            opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("member", ["grads", "sample_id", "lr", "adam_m"])
def test_an_array_copied_from_another_run_is_refused(tmp_path, member):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    trained = _record(a, 0, adam=True)
    _record(b, 1, adam=True)
    assert not np.array_equal(np.asarray(open_run(a).grads), np.asarray(open_run(b).grads))
    shutil.rmtree(a / member)
    shutil.copytree(b / member, a / member)
    with pytest.raises(StoreCorruptError, match=rf"the array '{member}' was not written with this run.*another run id"):
        open_run(a)
    with pytest.raises(StoreCorruptError, match="copied in from another run"):
        _record(a, 0, resume=True, trained=trained)  # nothing is appended to the mixed run either


def test_a_whole_copy_of_a_run_opens_and_resumes(tmp_path):
    a = tmp_path / "a.zarr"
    trained = _record(a, 0)
    shutil.copytree(a, tmp_path / "copy.zarr", ignore=shutil.ignore_patterns("writer.lock"))
    _record(tmp_path / "copy.zarr", 0, resume=True, steps=2, trained=trained)
    assert open_run(tmp_path / "copy.zarr").n_steps == 5


def test_arrays_created_on_resume_carry_the_runs_id(tmp_path):
    a = tmp_path / "a.zarr"
    trained = _record(a, 0, steps=2)
    _record(a, 0, steps=2, resume=True, trained=trained)
    root = json.loads((a / "zarr.json").read_text())["attributes"][RUN_ID_KEY]
    for member in ("grads", "sample_id", "step_ptr", "lr", "commit"):
        assert json.loads((a / member / "zarr.json").read_text())["attributes"][RUN_ID_KEY] == root


def test_runs_written_before_run_ids_are_not_checked(tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    _record(a, 0)
    _record(b, 1)
    from datavalue.store._schema import CHUNK_DIGEST_FILES, CHUNK_DIGESTS_KEY

    for meta_file in a.rglob("zarr.json"):  # as an older version wrote it: no run id anywhere, no chunk digests
        doc = json.loads(meta_file.read_text())
        for key in (RUN_ID_KEY, CHUNK_DIGESTS_KEY):
            doc.get("attributes", {}).pop(key, None)
        meta_file.write_text(json.dumps(doc))
    for name in CHUNK_DIGEST_FILES:
        (a / name).unlink()
    assert open_run(a).n_steps == 3
