"""Issue 22 item 11: the manifest is validated on open and bound to the data by a digest."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from datavalue.errors import StoreCorruptError, StoreMismatchError
from datavalue.store import MANIFEST_DIGEST_KEY, MANIFEST_KEY, RunWriter, StepBlock, open_run

MANIFEST = {
    "projection": {"proj_dim": 4, "seed": 7, "sketch": "orthogonal",
                   "blocks": [{"name": "w", "index": 0, "start": 0, "stop": 4, "k": 4}]},
    "loss_reduction": "mean",
    "model_fingerprint": {"params": {"w": [2, 2]}, "digest": "abc"},
    "optimizer": {"kind": "sgd"},
    "curvature": {"fisher": None},
}


def _run(path, manifest=MANIFEST):
    with RunWriter(path, manifest, k=4, chunk_rows=4, background=False) as w:
        for t in range(3):
            w.submit(StepBlock(step=t, sample_id=np.arange(2) + 2 * t, weight=np.full(2, 0.5),
                               grads=np.ones((2, 4)), flags=np.zeros(2, np.uint8), lr=0.1))
    return path


def _edit(path, fn):
    """Edit the root zarr.json's manifest as a user with a text editor would (the digest untouched)."""
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    fn(meta["attributes"][MANIFEST_KEY])
    meta_file.write_text(json.dumps(meta))


def _drop_digest(path):
    """Make ``path`` look written before the manifest digest: no digest, and none of what came after it
    (the run id on the root and the arrays, the chunk digest record). A run that keeps those but lost
    its digest was edited: ``tests/store/test_probe8_store.py`` (P8-01)."""
    from datavalue.store._schema import CHUNK_DIGEST_FILES, CHUNK_DIGESTS_KEY, RUN_ID_KEY

    for meta_file in path.rglob("zarr.json"):
        meta = json.loads(meta_file.read_text())
        for key in (MANIFEST_DIGEST_KEY, RUN_ID_KEY, CHUNK_DIGESTS_KEY):
            meta.get("attributes", {}).pop(key, None)
        meta_file.write_text(json.dumps(meta))
    for name in CHUNK_DIGEST_FILES:
        (path / name).unlink(missing_ok=True)


def test_digest_written_and_clean_run_opens(tmp_path):
    path = _run(tmp_path / "r.zarr")
    assert MANIFEST_DIGEST_KEY in json.loads((path / "zarr.json").read_text())["attributes"]
    assert open_run(path).manifest["projection"]["seed"] == 7


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["projection"].update(seed=8), "projection"),
        (lambda m: m.update(loss_reduction="sum"), "loss_reduction"),
        (lambda m: m["projection"].update(sketch="gaussian"), "projection"),
    ],
)
def test_edited_capture_settings_refused_on_open_and_resume(tmp_path, edit, match):
    path = _run(tmp_path / "r.zarr")
    _edit(path, edit)
    with pytest.raises(StoreMismatchError, match=match) as exc:
        open_run(path)
    assert "Restore zarr.json" in str(exc.value)
    edited = json.loads((path / "zarr.json").read_text())["attributes"][MANIFEST_KEY]
    with pytest.raises(StoreMismatchError, match="digest"):
        RunWriter(path, edited, k=4, mode="resume", background=False)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("projection"), "'projection' is missing"),
        (lambda m: m.update(projection=[1, 2]), "'projection' is a list"),
        (lambda m: m["projection"].update(blocks="w"), "'projection.blocks' is a str"),
        (lambda m: m["projection"].update(seed="7"), "projection.seed"),
        (lambda m: m["projection"].pop("seed"), "projection.seed' is missing"),
        (lambda m: m["projection"].update(proj_dim=-3), "projection.proj_dim"),
        (lambda m: m["projection"].update(sketch="bogus"), "projection.sketch"),
        (lambda m: m["projection"]["blocks"][0].update(stop="4"), r"projection.blocks\[0\]"),
        (lambda m: m.update(loss_reduction="bogus"), "'loss_reduction' is 'bogus'"),
        (lambda m: m.update(model_fingerprint="abc"), "model_fingerprint"),
        (lambda m: m.update(optimizer=3), "'optimizer' is a int"),
        (lambda m: m.update(storage_dtype="int8"), "storage_dtype"),
    ],
)
def test_malformed_manifest_is_store_corrupt_naming_what(tmp_path, edit, match):
    path = _run(tmp_path / "r.zarr")
    _edit(path, edit)
    _drop_digest(path)  # malformed is reported as such even on a run without a digest
    with pytest.raises(StoreCorruptError, match=match):
        open_run(path)


def test_bogus_loss_reduction_refused_at_creation_digest_or_not(tmp_path):
    path = _run(tmp_path / "r.zarr", dict(MANIFEST, loss_reduction="bogus"))
    with pytest.raises(StoreCorruptError, match="loss_reduction"):
        open_run(path)


def test_run_without_digest_opens_with_a_logged_note(tmp_path, caplog):
    path = _run(tmp_path / "r.zarr")
    _drop_digest(path)
    _edit(path, lambda m: m["projection"].update(seed=8))  # undetectable without the digest, but well formed
    with caplog.at_level(logging.INFO, logger="datavalue.store"):
        run = open_run(path)
    assert run.n_steps == 3
    assert any("no manifest digest" in r.getMessage() for r in caplog.records)
