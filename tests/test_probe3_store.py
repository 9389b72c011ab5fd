"""Issue 22, third probe: reads that left the run, report writers inside it, metadata asking for
terabytes, a final pass older than the run, builds without ``max_memory=``, a final pass built as
a trajectory. Each test failed before its fix; the rows are in ``docs/errors.md`` ("Third probe
store, builds and queries").
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue import errors as E
from datavalue.capture import FinalPass
from datavalue.embeddings import build_influence, embeddings_at, extend_embeddings

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _train(path: Path, model: torch.nn.Module, opt, t0: int, t1: int, *, resume: bool = False, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = X + 0.1 * seed * torch.randn(X.shape, generator=g)
    with datavalue.Recorder(path, model, optimizer=opt, proj_dim=None, chunk_rows=8, resume=resume) as rec:
        for t in range(t0, t1):
            ids = torch.arange(t * 4, (t + 1) * 4) % 16
            with rec.step(sample_ids=ids):
                F.cross_entropy(model(x[ids]), Y[ids]).backward()
            opt.step()
            opt.zero_grad()


def _run(path: Path, steps: int = 4, seed: int = 0) -> torch.nn.Module:
    model = _model()
    _train(path, model, torch.optim.SGD(model.parameters(), lr=0.1), 0, steps, seed=seed)
    return model


def _final_pass(path: Path, model: torch.nn.Module, **kw) -> None:
    with FinalPass(path, model, background=False, **kw) as fp:
        for t in range(4):
            ids = torch.arange(t * 4, (t + 1) * 4)
            with fp.batch(ids):
                F.cross_entropy(model(X[ids]), Y[ids]).backward()


def _loss(model):
    return F.cross_entropy(model(X[:3]), Y[:3], reduction="none")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ repro_02: reads through links out of the run
def test_open_run_refuses_grads_linked_to_another_run(tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    _run(a)
    _run(b, seed=1)
    shutil.rmtree(a / "grads")
    (a / "grads").symlink_to(b / "grads", target_is_directory=True)
    for read in (datavalue.open_run, datavalue.build_embeddings):
        with pytest.raises(E.StoreError, match=r"grads leads outside the run .*grads -> .*b\.zarr/grads"):
            read(a)
    assert not (a / "embeddings").exists()


def test_open_run_refuses_a_nested_chunk_link_and_follows_links_inside(tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    _run(a)
    _run(b, seed=1)
    # the run's own chunk, kept beside it (another run's chunk is refused: tests/store/test_chunk_digest.py)
    shutil.copy(a / "grads" / "c" / "0" / "0", a / "spare_chunk")
    (a / "grads" / "c" / "0" / "0").unlink()
    (a / "grads" / "c" / "0" / "0").symlink_to(b / "grads" / "c" / "0" / "0")
    with pytest.raises(E.StoreError, match=r"grads/c/0/0 leads outside the run"):
        datavalue.open_run(a)
    (a / "grads" / "c" / "0" / "0").unlink()  # a link that stays inside: read as before
    (a / "grads" / "c" / "0" / "0").symlink_to(a / "spare_chunk")
    assert datavalue.open_run(a).n_steps == 4


# ------------------------------------------------------------------ repro_09: report writers inside the run
def test_report_writers_refuse_paths_inside_the_run(tmp_path):
    path = tmp_path / "r.zarr"
    model = _run(path)
    datavalue.build_embeddings(path, progress=False)
    attr = datavalue.Attributor(path, model, progress=False)
    scores = attr.scores(_loss)
    before = _tree(path)
    with pytest.raises(E.StoreError, match=r"lies inside the run .*r\.zarr.*nothing was written"):
        attr.save_parquet(scores, path / "zarr.json", overwrite=True)
    with pytest.raises(E.StoreError, match="lies inside the run"):
        attr.top_k(_loss, k=2).to_parquet(path / "embeddings" / "top.parquet", overwrite=True)
    (tmp_path / "alias").symlink_to(path, target_is_directory=True)  # another spelling of the run
    with pytest.raises(E.StoreError, match="lies inside the run"):
        attr.save_parquet(scores, tmp_path / "alias" / "new.parquet")
    assert _tree(path) == before
    assert datavalue.open_run(path).n_steps == 4
    assert attr.save_parquet(scores, tmp_path / "out.parquet").is_file()  # outside: written


# ------------------------------------------------------------------ repro_12: metadata asking for terabytes
def test_query_refuses_an_edited_chunk_shape_before_allocating(tmp_path):
    path = tmp_path / "r.zarr"
    model = _run(path)
    datavalue.build_embeddings(path, progress=False)
    f = path / "embeddings" / "empirical_fisher" / "values" / "zarr.json"
    meta = json.loads(f.read_text())
    meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 2**40
    f.write_text(json.dumps(meta))
    with pytest.raises(E.StoreCorruptError, match=r"chunk_shape \[1,099,511,627,776, .*nothing was allocated"):
        datavalue.Attributor(path, model, progress=False).scores(_loss)


# ------------------------------------------------------------------ repro_15: a final pass older than the run
def test_influence_refuses_a_final_pass_recorded_before_the_run_went_on(tmp_path):
    path = tmp_path / "r.zarr"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(path, model, opt, 0, 4)
    _final_pass(path, model)
    build_influence(path, progress=False)
    assert datavalue.Attributor(path, model, kind="influence", progress=False).scores(_loss).shape == (3, 16)
    _train(path, model, opt, 4, 8, resume=True)
    with pytest.raises(E.QueryError, match=r"after step 4 of .*now has 8 committed steps.*FinalPass\("):
        datavalue.Attributor(path, model, kind="influence", progress=False)
    with pytest.raises(E.EmbeddingError, match="after step 4 .* now has 8 committed steps"):
        build_influence(path, progress=False, overwrite=True)
    _final_pass(path, model, overwrite=True)  # recorded again at the final weights: fresh
    build_influence(path, progress=False, overwrite=True)
    assert datavalue.Attributor(path, model, kind="influence", progress=False).scores(_loss).shape == (3, 16)


# ------------------------------------------------------------------ repro_17: builds take max_memory=
def test_builds_take_max_memory(tmp_path):
    path = tmp_path / "r.zarr"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(path, model, opt, 0, 4)
    with pytest.raises(E.EmbeddingError, match=r"above max_memory=1.0 KiB.*raise max_memory="):
        datavalue.build_embeddings(path, progress=False, max_memory="1 KiB")
    assert not datavalue.open_run(path).has_array("embeddings/empirical_fisher/values")  # refused before writing
    with pytest.raises(E.EmbeddingError, match="max_memory must be"):
        datavalue.build_embeddings(path, progress=False, max_memory="lots")
    datavalue.build_embeddings(path, progress=False, max_memory="1 GiB")
    with pytest.raises(E.EmbeddingError, match="above max_memory"):
        embeddings_at(path, 2, progress=False, max_memory=1024)
    assert embeddings_at(path, 2, progress=False, max_memory="1 GiB").shape[0] == 8
    _train(path, model, opt, 4, 6, resume=True)
    with pytest.raises(E.EmbeddingError, match="above max_memory"):
        extend_embeddings(path, progress=False, max_memory=1024)
    assert extend_embeddings(path, progress=False, max_memory="1 GiB").n_steps == 6
    _final_pass(path, model)
    with pytest.raises(E.EmbeddingError, match=r"influence build would hold about .*above max_memory"):
        build_influence(path, progress=False, max_memory=1024)
    assert build_influence(path, progress=False, max_memory="1 GiB").n_rows == 16


# ------------------------------------------------------------------ repro_20: a final pass is no trajectory
def test_a_final_pass_is_refused_as_a_trajectory(tmp_path):
    path = tmp_path / "r.zarr"
    model = _run(path)
    _final_pass(path, model)
    final = path / "final"
    before = _tree(final)
    with pytest.raises(E.EmbeddingError, match=r"final-weights pass .*build_influence\(.*kind='influence'"):
        datavalue.build_embeddings(final, progress=False)
    assert _tree(final) == before
    for kind in (None, "tracin", "grad_dot"):
        with pytest.raises(E.QueryError, match=r"final-weights pass .*kind='influence'"):
            datavalue.Attributor(final, model, kind=kind, progress=False)
    datavalue.build_embeddings(path, progress=False)  # the training run itself builds as before
    assert np.isfinite(datavalue.Attributor(path, model, progress=False).scores(_loss)).all()


def test_errors_doc_lists_these_tests():
    doc = (ROOT / "docs" / "errors.md").read_text()
    section = doc[doc.index("## Third probe (issue 22)"):]
    end = section.find("\n## ", 3)
    section = section if end < 0 else section[:end]
    here = {name for name in globals() if name.startswith("test_") and name != "test_errors_doc_lists_these_tests"}
    listed = set(re.findall(r"`(test_[a-z0-9_]+)`", section))
    assert here <= listed, here - listed
