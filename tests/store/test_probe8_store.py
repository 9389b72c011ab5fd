"""Eighth probe (session 12): a run whose zarr.json lost what binds its data (P8-01, P8-02).

Runs written before the manifest digest, the run id or the chunk digest record open with fewer
checks. Deleting those attributes from a newer run's ``zarr.json`` turned the checks off: an edited
``loss_reduction`` was read silently, and a chunk file from another run was accepted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from datavalue.errors import StoreCorruptError
from datavalue.store import open_run
from datavalue.store._schema import CHUNK_DIGESTS_KEY, MANIFEST_DIGEST_KEY, MANIFEST_KEY, RUN_ID_KEY
from tests._helpers_tiny_run import X, record_tiny_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("p8_bind")
    a, b = d / "a.zarr", d / "b.zarr"
    record_tiny_run(a)
    record_tiny_run(b, x=X * 2.0)  # the same shapes, other gradients
    return a, b


def _edit_root(path: Path, fn) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    fn(meta["attributes"])
    (path / "zarr.json").write_text(json.dumps(meta))


def test_p8_01_a_dropped_manifest_digest_does_not_let_an_edited_manifest_through(runs, tmp_path):
    run = tmp_path / "r.zarr"
    shutil.copytree(runs[0], run)

    def edit(attrs):
        attrs[MANIFEST_KEY]["loss_reduction"] = "sum"  # the scores would be off by the batch size
        del attrs[MANIFEST_DIGEST_KEY]

    _edit_root(run, edit)
    with pytest.raises(StoreCorruptError, match="run id .* but no manifest digest"):
        open_run(run)


def test_p8_01_a_dropped_root_run_id_is_refused_while_the_arrays_carry_one(runs, tmp_path):
    run = tmp_path / "r.zarr"
    shutil.copytree(runs[0], run)
    for name in ("commit/digests.0", "commit/digests.1"):
        (run / name).unlink()

    def edit(attrs):
        for key in (RUN_ID_KEY, MANIFEST_DIGEST_KEY, CHUNK_DIGESTS_KEY):
            del attrs[key]

    _edit_root(run, edit)
    with pytest.raises(StoreCorruptError, match="no run id .* recorded arrays carry one"):
        open_run(run)


@pytest.mark.parametrize("drop", [(CHUNK_DIGESTS_KEY,), (RUN_ID_KEY, MANIFEST_DIGEST_KEY)])
def test_p8_02_a_dropped_digest_attribute_does_not_let_another_runs_chunk_in(runs, tmp_path, drop):
    run = tmp_path / "r.zarr"
    shutil.copytree(runs[0], run)
    before = open_run(run).read("grads")
    shutil.copyfile(runs[1] / "grads" / "c" / "0" / "0", run / "grads" / "c" / "0" / "0")  # another run's rows
    with pytest.raises(StoreCorruptError):
        open_run(run)  # refused with the attribute in place (unchanged)

    def edit(attrs):
        for key in drop:
            del attrs[key]

    _edit_root(run, edit)
    for name in ("grads", "sample_id", "weight", "flags", "lr", "step_ptr", "epoch", "grad_scale", "momentum",
                 "weight_decay", "commit"):
        meta_file = run / name / "zarr.json"
        if meta_file.exists() and RUN_ID_KEY in drop:  # the arrays' ids too: only the record is left
            meta = json.loads(meta_file.read_text())
            meta["attributes"].pop(RUN_ID_KEY, None)
            meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreCorruptError, match="chunk digest record .* lacks the root attribute"):
        got = open_run(run).read("grads")
        assert np.array_equal(got, before)  # (not reached: before the fix, another run's rows came back)


def test_p8_01_a_run_written_before_the_bindings_still_opens(runs, tmp_path):
    """Nothing of the bindings at all (as versions before them wrote runs): opens, as before."""
    run = tmp_path / "r.zarr"
    shutil.copytree(runs[0], run)
    for meta_file in run.rglob("zarr.json"):
        meta = json.loads(meta_file.read_text())
        for key in (RUN_ID_KEY, MANIFEST_DIGEST_KEY, CHUNK_DIGESTS_KEY):
            meta.get("attributes", {}).pop(key, None)
        meta_file.write_text(json.dumps(meta))
    for name in ("commit/digests.0", "commit/digests.1"):
        (run / name).unlink()
    assert open_run(run).n_steps == 4


def test_p8_37_a_run_path_starting_with_tilde_is_not_created_literally(tmp_path, monkeypatch):
    """Was: ``Recorder("~/runs/r.zarr", ...)`` created ``./~/runs/r.zarr`` in the current directory."""
    import datavalue
    from datavalue.store import RunPathError
    from tests._helpers_tiny_run import tiny_mlp

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunPathError, match=r"starts with '~', which Python does not expand"):
        datavalue.Recorder("~/p8_runs/r.zarr", tiny_mlp(), proj_dim=None)
    with pytest.raises(RunPathError, match="expanduser"):
        datavalue.store.archive_run(tmp_path / "nowhere.zarr", "~/p8_runs/r.zip")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "~").mkdir()  # a directory really named "~": used as it is
    record_tiny_run(Path("~/r.zarr"), steps=1)
    assert open_run(tmp_path / "~" / "r.zarr").n_steps == 1
