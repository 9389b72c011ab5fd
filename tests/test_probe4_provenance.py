"""Derived data bound to its run (the fourth probe's repro_01/02, issue 22 item 7): embeddings (values,
transfer operators, ``at/<step>``), influence, replay results, checkpoints and the final pass carry the
run's id when written; one copied in from another run recorded with the same schedule is refused by
every reader, naming the member, both ids and the rebuild. A whole copy of a run, and runs without
ids, read as before."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.capture import FinalPass, read_checkpoint
from datavalue.embeddings import build_influence, check_build, embeddings_at, extend_embeddings
from datavalue.errors import EmbeddingError, QueryError, StoreMismatchError
from datavalue.query import ReplayResult
from datavalue.store import FINAL_RUN, open_run
from datavalue.store._schema import RUN_ID_KEY

XT = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
YT = torch.tensor([0, 1, 2])


def _query(m):
    return F.cross_entropy(m(XT), YT, reduction="none")


def _loss(m, b):
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def _fresh():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _record(path, data_seed):
    """Same model, optimizer and schedule for every seed; only the data differ."""
    m = _fresh()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(data_seed)
    x, y = torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    with datavalue.Recorder(path, m, proj_dim=None, optimizer=opt, checkpoint_every=2) as rec:
        for t in range(6):
            ids = torch.arange(4 * t, 4 * t + 4)
            with rec.step(sample_ids=ids):
                F.cross_entropy(m(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    with FinalPass(path, m, curvature=None) as fp:
        for t in range(3):
            ids = torch.arange(8 * t, 8 * t + 8)
            with fp.batch(ids):
                F.cross_entropy(m(x[ids]), y[ids]).backward()
    datavalue.replay_influence(path, _fresh(), lambda ids: (x[ids], y[ids]), _query, loss_fn=_loss)
    datavalue.build_embeddings(path, progress=False)
    embeddings_at(path, 2, progress=False)
    build_influence(path, curvature=None, progress=False)
    return m


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("prov")
    a, b = d / "a.zarr", d / "b.zarr"
    _record(a, 1)
    model_b = _record(b, 2)
    return a, b, model_b


def _copy(runs, tmp_path, member=None):
    """A whole copy of run B, with ``member`` (a path inside the run) replaced by run A's."""
    a, b, _ = runs
    p = tmp_path / "b.zarr"
    shutil.copytree(b, p)
    if member is not None:
        shutil.rmtree(p / member)
        shutil.copytree(a / member, p / member)
    return p


def _curvature(path):
    return open_run(path).subgroups("embeddings")[0]


def _ids_named(exc, runs):
    a, b, _ = runs
    msg = str(exc.value)
    assert open_run(a).run_id in msg and open_run(b).run_id in msg, msg
    return msg


def _strip_ids(path: Path) -> None:
    """Make ``path`` a run written before run ids: no id on its root nor on any array, and none of what
    came after them (the chunk digest record)."""
    from datavalue.store._schema import CHUNK_DIGEST_FILES, CHUNK_DIGESTS_KEY

    for meta in path.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if RUN_ID_KEY in doc.get("attributes", {}) or CHUNK_DIGESTS_KEY in doc.get("attributes", {}):
            doc["attributes"].pop(RUN_ID_KEY, None)
            doc["attributes"].pop(CHUNK_DIGESTS_KEY, None)
            meta.write_text(json.dumps(doc))
    for root in [path, *(m.parent for m in path.rglob("zarr.json"))]:  # the run and a nested final pass
        for name in CHUNK_DIGEST_FILES:
            (root / name).unlink(missing_ok=True)


def test_derived_arrays_carry_the_run_id(runs):
    _, b, _ = runs
    run, c = open_run(b), _curvature(b)
    assert run.run_id
    for name in (f"embeddings/{c}/values", f"embeddings/{c}/at/2/values", "replay/default/scores",
                 "checkpoints/2/meta", "checkpoints/2/model/0.weight"):
        assert run.array(name).attrs[RUN_ID_KEY] == run.run_id, name
    if run.subgroups(f"embeddings/{c}") and run.has_array(f"embeddings/{c}/ops/block000"):
        assert run.array(f"embeddings/{c}/ops/block000").attrs[RUN_ID_KEY] == run.run_id
    final = open_run(b / FINAL_RUN)
    assert final.manifest["integration"]["run_id"] == run.run_id  # the pass names its training run
    inf = final.subgroups("influence")[0]
    assert final.array(f"influence/{inf}/values").attrs[RUN_ID_KEY] == final.run_id


def test_embeddings_of_another_run_refused(runs, tmp_path):
    p = _copy(runs, tmp_path, "embeddings")
    c = _curvature(p)
    with pytest.raises(QueryError) as exc:
        datavalue.Attributor(p, runs[2], progress=False).scores(_query)
    msg = _ids_named(exc, runs)
    assert f"embeddings/{c}/values" in msg and "overwrite=True" in msg
    with pytest.raises(EmbeddingError, match="another run"):
        check_build(open_run(p), c)
    with pytest.raises(EmbeddingError, match="another run"):
        extend_embeddings(p, c, progress=False)
    with pytest.raises(EmbeddingError, match="another run"):
        embeddings_at(p, 3, c, progress=False)
    datavalue.build_embeddings(p, c, overwrite=True, progress=False)  # the fix the message names
    own = datavalue.Attributor(runs[1], runs[2], progress=False).scores(_query)
    np.testing.assert_allclose(datavalue.Attributor(p, runs[2], progress=False).scores(_query), own)


def test_transfer_operators_of_another_run_refused(runs, tmp_path):
    c = _curvature(runs[1])
    if not open_run(runs[1]).has_array(f"embeddings/{c}/ops/block000"):
        pytest.skip("this build stores no transfer operators")
    p = _copy(runs, tmp_path, f"embeddings/{c}/ops")
    with pytest.raises(EmbeddingError, match="ops/block000") as exc:
        check_build(open_run(p), c)
    _ids_named(exc, runs)


def test_embeddings_at_step_of_another_run_refused(runs, tmp_path):
    c = _curvature(runs[1])
    p = _copy(runs, tmp_path, f"embeddings/{c}/at")
    name = f"embeddings/{c}/at/2/values"
    with pytest.raises(QueryError, match="embeddings_at") as exc:
        datavalue.Attributor(p, runs[2], embeddings=name, progress=False).scores(_query)
    assert name in _ids_named(exc, runs)


def test_final_pass_of_another_run_refused(runs, tmp_path):
    p = _copy(runs, tmp_path, FINAL_RUN)
    with pytest.raises(EmbeddingError, match="final-weights pass of another run") as exc:
        build_influence(p, curvature=None, overwrite=True, progress=False)
    _ids_named(exc, runs)
    with pytest.raises(QueryError, match="FinalPass"):
        datavalue.Attributor(p, runs[2], kind="influence", progress=False).scores(_query)


def test_influence_of_another_run_refused(runs, tmp_path):
    p = _copy(runs, tmp_path, f"{FINAL_RUN}/influence")
    with pytest.raises(QueryError, match="build_influence") as exc:
        datavalue.Attributor(p, runs[2], kind="influence", progress=False).scores(_query)
    assert "/values was written for another run" in str(exc.value)


def test_replay_of_another_run_refused(runs, tmp_path):
    p = _copy(runs, tmp_path, "replay")
    with pytest.raises(StoreMismatchError, match="replay_influence") as exc:
        ReplayResult.open(p)
    _ids_named(exc, runs)


def test_checkpoints_of_another_run_refused(runs, tmp_path):
    p = _copy(runs, tmp_path, "checkpoints")
    with pytest.raises(StoreMismatchError, match="checkpoint_every") as exc:
        read_checkpoint(p, 2)
    assert "checkpoints/2/meta" in _ids_named(exc, runs)
    # one tensor copied under the run's own meta is refused as well
    q = tmp_path / "one.zarr"
    shutil.copytree(runs[1], q)
    shutil.rmtree(q / "checkpoints/2/model/0.weight")
    shutil.copytree(runs[0] / "checkpoints/2/model/0.weight", q / "checkpoints/2/model/0.weight")
    with pytest.raises(StoreMismatchError, match="0.weight"):
        read_checkpoint(q, 2)
    # embeddings_at reads no checkpoint (it replays the build's transfer operators): its answer is
    # the run's own whatever checkpoints/ holds
    c = _curvature(p)
    np.testing.assert_array_equal(embeddings_at(p, 2, c, overwrite=True, progress=False)[:],
                                  open_run(runs[1]).array(f"embeddings/{c}/at/2/values")[:])


def test_whole_copy_reads(runs, tmp_path):
    _, b, m = runs
    p = _copy(runs, tmp_path)
    np.testing.assert_array_equal(datavalue.Attributor(p, m, progress=False).scores(_query),
                                  datavalue.Attributor(b, m, progress=False).scores(_query))
    np.testing.assert_array_equal(ReplayResult.open(p).scores(), ReplayResult.open(b).scores())
    assert read_checkpoint(p, 2).step == 2
    datavalue.Attributor(p, m, kind="influence", progress=False).scores(_query)
    build_influence(p, curvature=None, overwrite=True, progress=False)
    check_build(open_run(p), _curvature(p))


def test_runs_without_ids_read(runs, tmp_path):
    _, b, m = runs
    p = _copy(runs, tmp_path)
    _strip_ids(p)
    assert open_run(p).run_id is None
    np.testing.assert_array_equal(datavalue.Attributor(p, m, progress=False).scores(_query),
                                  datavalue.Attributor(b, m, progress=False).scores(_query))
    ReplayResult.open(p)
    read_checkpoint(p, 2)
    datavalue.Attributor(p, m, kind="influence", progress=False).scores(_query)
    datavalue.build_embeddings(p, _curvature(p), overwrite=True, progress=False)  # writes no id
    assert RUN_ID_KEY not in open_run(p).array(f"embeddings/{_curvature(p)}/values").attrs


def test_derived_data_without_id_read_with_note(runs, tmp_path, caplog):
    """Derived data written before it carried the run id, in a run that has one: read, with an INFO note."""
    _, b, m = runs
    p = _copy(runs, tmp_path)
    for meta in (p / "embeddings").rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        doc.get("attributes", {}).pop(RUN_ID_KEY, None)
        meta.write_text(json.dumps(doc))
    assert open_run(p).run_id
    with caplog.at_level(logging.INFO, logger="datavalue"):
        s = datavalue.Attributor(p, m, progress=False).scores(_query)
    np.testing.assert_array_equal(s, datavalue.Attributor(b, m, progress=False).scores(_query))
    assert any("carries no run id" in r.getMessage() for r in caplog.records)
