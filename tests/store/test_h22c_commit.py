"""Issue 22 item 4: data chunks without a commit are corruption, not an empty run."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import datavalue
from datavalue.errors import StoreCorruptError
from datavalue.store import RunWriter, StepBlock, open_run


def _block(t, b=3, k=4):
    rng = np.random.default_rng(t)
    return StepBlock(step=t, sample_id=np.arange(b) + 10 * t, weight=np.full(b, 1 / b), grads=rng.standard_normal((b, k)),
                     flags=np.zeros(b, np.uint8), lr=0.1)


def _run(path, steps=40):
    with RunWriter(path, {"projection": {"blocks": []}}, k=4, chunk_rows=16, background=False) as w:
        for t in range(steps):
            w.submit(_block(t))
    return path


def test_fresh_run_without_steps_opens_empty(tmp_path):
    path = _run(tmp_path / "r.zarr", steps=0)
    assert (path / "commit" / "c" / "0").is_file()  # written at creation, before any data chunk
    assert (open_run(path).n_steps, open_run(path).n_rows) == (0, 0)
    (path / "commit" / "c" / "0").unlink()  # as versions before the creation commit left a fresh run
    assert open_run(path).n_steps == 0
    with RunWriter(path, {"projection": {"blocks": []}}, k=4, mode="resume", background=False) as w:
        w.submit(_block(0))
    assert open_run(path).n_steps == 1


@pytest.mark.parametrize("damage", ["chunk", "array"])
def test_missing_commit_with_data_refuses_open_and_resume(tmp_path, damage):
    path = _run(tmp_path / "r.zarr")
    assert open_run(path).n_steps == 40
    if damage == "chunk":
        (path / "commit" / "c" / "0").unlink()
    else:
        shutil.rmtree(path / "commit")
    with pytest.raises(StoreCorruptError, match=r"commit/c/0") as exc:
        open_run(path)
    assert "copy" in str(exc.value) and "overwrite=True" in str(exc.value)
    with pytest.raises(StoreCorruptError, match=r"commit/c/0"):
        RunWriter(path, {"projection": {"blocks": []}}, k=4, mode="resume", background=False)
    # nothing was overwritten: the 40 steps' data chunks are still there
    assert (path / "grads" / "c" / "7" / "0").is_file()


def test_recorder_resume_refuses_run_whose_commit_was_deleted(tmp_path):
    path = tmp_path / "rec.zarr"
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with datavalue.Recorder(path, model, proj_dim=None) as rec:
        for t in range(5):
            with rec.step(sample_ids=np.arange(4) + 4 * t, lr=0.1):
                torch.nn.functional.cross_entropy(model(x), y).backward()
    (path / "commit" / "c" / "0").unlink()
    before = (path / "grads" / "c" / "0" / "0").read_bytes()
    with pytest.raises(StoreCorruptError, match=r"commit/c/0"):
        datavalue.Recorder(path, model, proj_dim=None, resume=True)
    assert (path / "grads" / "c" / "0" / "0").read_bytes() == before


def test_cli_info_refuses_run_whose_commit_was_deleted(tmp_path, capsys):
    from datavalue.cli import main

    path = _run(tmp_path / "r.zarr")
    assert main(["info", str(path)]) == 0
    (path / "commit" / "c" / "0").unlink()
    capsys.readouterr()
    assert main(["info", str(path)]) == 2
    assert "commit/c/0" in capsys.readouterr().err
