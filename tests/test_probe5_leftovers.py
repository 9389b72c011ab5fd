"""Fifth probe leftovers (issue 22): forks of a run, a deleted weights digest, a recorder never closed,
derived members written beside links and a user's files, TracIn on a run whose groups disagree on maximize.

Each test failed before its fix (docs/errors.md, "Sixth pass" / "Fifth probe leftovers"):
two copies of one run resumed on different data shared the run id, so one copy's embeddings, final pass
and influence were accepted by the other (P5-13); ``resume=True`` after ``weights_digest`` was deleted
accepted any weights (P5-21); a script that ended without ``rec.close()`` lost its uncommitted steps
silently (P5-31).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue import errors as E
from datavalue.capture import FinalPass
from datavalue.embeddings import build_influence, check_build, embeddings_at, extend_embeddings
from datavalue.store import open_run
from tests._helpers_child import run_child
from tests._helpers_tiny_run import tiny_mlp

X = torch.randn(48, 4, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(1))


class _Trainer:
    """A model and its optimizer, recorded into ``path`` step by step (resumed after the first call)."""

    def __init__(self, seed: int = 0) -> None:
        self.model = tiny_mlp(seed)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)

    def copy(self) -> _Trainer:
        other = _Trainer()
        other.model.load_state_dict(self.model.state_dict())
        other.opt.load_state_dict(self.opt.state_dict())
        return other

    def record(self, path: Path, batches: list[range], *, resume: bool) -> None:
        with datavalue.Recorder(path, self.model, optimizer=self.opt, proj_dim=None, resume=resume) as rec:
            for b in batches:
                ids = np.asarray(b)
                with rec.step(sample_ids=ids):
                    F.cross_entropy(self.model(X[ids % 48]), Y[ids % 48]).backward()
                self.opt.step()
                self.opt.zero_grad()


def _loss(m: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(m(X[:3]), Y[:3], reduction="none")


def _final_pass(run: Path, model: torch.nn.Module) -> None:
    with FinalPass(run, model) as fp, fp.batch(np.arange(12)):
        F.cross_entropy(model(X[:12]), Y[:12]).backward()


@pytest.fixture()
def forks(tmp_path: Path) -> tuple[Path, _Trainer, Path, _Trainer]:
    """Run ``a`` recorded for 2 steps, copied to ``b``; ``a`` resumed on samples 100.., ``b`` on 500.."""
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    ta = _Trainer()
    ta.record(a, [range(0, 6), range(6, 12)], resume=False)
    shutil.copytree(a, b)
    tb = ta.copy()
    ta.record(a, [range(100, 106), range(106, 112)], resume=True)
    tb.record(b, [range(500, 506), range(506, 512)], resume=True)
    return a, ta, b, tb


FORK = "another copy of this run"


# ---------------------------------------------------------------- P5-13: forks of one run
def test_p5_13_a_forks_embeddings_are_refused_by_the_other_fork(forks):
    a, _, b, tb = forks
    assert open_run(a).run_id == open_run(b).run_id  # forks share the id: the history tells them apart
    datavalue.build_embeddings(a, progress=False)
    datavalue.build_embeddings(b, progress=False)
    own = np.asarray(datavalue.Attributor(b, tb.model).scores(_loss))
    shutil.rmtree(b / "embeddings")
    shutil.copytree(a / "embeddings", b / "embeddings")
    with pytest.raises((E.QueryError, E.EmbeddingError), match=FORK):
        datavalue.Attributor(b, tb.model).scores(_loss)
    curvature = open_run(b).array("embeddings/empirical_fisher/values").attrs["datavalue_embeddings"]["curvature"]
    with pytest.raises(E.EmbeddingError, match=FORK):
        check_build(open_run(b), curvature)
    with pytest.raises(E.EmbeddingError, match=FORK):
        extend_embeddings(b, progress=False)
    with pytest.raises(E.EmbeddingError, match=FORK):
        embeddings_at(b, 2, progress=False)
    datavalue.build_embeddings(b, progress=False, overwrite=True)  # the fix the message names
    np.testing.assert_allclose(np.asarray(datavalue.Attributor(b, tb.model).scores(_loss)), own, rtol=1e-6, atol=1e-9)


def test_p5_13_a_build_made_before_the_copy_is_accepted_by_both_forks_and_extends(tmp_path):
    """The run's own history only grows: a build of the shared steps stays valid in each copy, extends there."""
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    ta = _Trainer()
    ta.record(a, [range(0, 6), range(6, 12)], resume=False)
    datavalue.build_embeddings(a, progress=False)
    shutil.copytree(a, b)
    tb = ta.copy()
    ta.record(a, [range(100, 106), range(106, 112)], resume=True)
    tb.record(b, [range(500, 506), range(506, 512)], resume=True)
    for path, t in ((a, ta), (b, tb)):
        assert extend_embeddings(path, progress=False).n_steps == 4
        got = np.asarray(datavalue.Attributor(path, t.model).scores(_loss))
        embeddings_at(path, 2, progress=False)  # the earlier checkpoint of the extended build
        ref = path.parent / f"ref_{path.name}"
        shutil.copytree(path, ref)
        datavalue.build_embeddings(ref, progress=False, overwrite=True)
        np.testing.assert_allclose(got, np.asarray(datavalue.Attributor(ref, t.model).scores(_loss)),
                                   rtol=1e-5, atol=1e-8)
    # a extended is a's now: copied into b (the same step count) it is refused
    shutil.rmtree(b / "embeddings")
    shutil.copytree(a / "embeddings", b / "embeddings")
    with pytest.raises((E.QueryError, E.EmbeddingError), match=FORK):
        datavalue.Attributor(b, tb.model).scores(_loss)


def test_p5_13_a_forks_final_pass_and_influence_are_refused_by_the_other_fork(forks):
    a, ta, b, tb = forks
    _final_pass(a, ta.model)
    build_influence(a, progress=False)
    shutil.copytree(a / "final", b / "final")
    with pytest.raises(E.EmbeddingError, match=FORK):
        build_influence(b, progress=False, overwrite=True)
    with pytest.raises((E.QueryError, E.EmbeddingError), match=FORK):
        datavalue.Attributor(b, tb.model, kind="influence").scores(_loss)


def test_p5_13_a_build_without_the_history_stamp_is_read_with_a_warning(forks, caplog):
    """Builds written before the stamp existed keep working (unchecked, with a logged warning)."""
    _, _, b, tb = forks
    datavalue.build_embeddings(b, progress=False)
    meta = b / "embeddings" / "empirical_fisher" / "values" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["datavalue_lineage_stamp"]
    meta.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="datavalue"):
        datavalue.Attributor(b, tb.model).scores(_loss)
    assert any("records no resume history" in r.getMessage() for r in caplog.records)


def test_p5_13_each_resume_appends_to_the_history(forks):
    a, _, b, _ = forks
    ha, hb = open_run(a).lineage, open_run(b).lineage
    assert [e[0] for e in ha] == [e[0] for e in hb] == [2]
    assert ha[0][1] != hb[0][1]


# ---------------------------------------------------------------- P5-21: weights digest deleted
def _resume_one_step(path: Path, trainer: _Trainer) -> None:
    trainer.record(path, [range(300, 306)], resume=True)


def _damage(run: Path, how: str) -> None:
    if how == "member deleted":
        shutil.rmtree(run / "weights_digest")
    else:
        meta = run / "weights_digest" / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["attributes"] = {}
        meta.write_text(json.dumps(doc))


@pytest.mark.parametrize("how", ["member deleted", "attributes emptied"])
@pytest.mark.parametrize("weights", ["other", "the run's"])
def test_p5_21_a_run_that_lost_its_weights_digest_refuses_resume(tmp_path, how, weights):
    run = tmp_path / "r.zarr"
    t = _Trainer()
    t.record(run, [range(0, 6), range(6, 12)], resume=False)
    assert json.loads((run / "zarr.json").read_text())["attributes"]["datavalue_weights_digest"] == 1
    _damage(run, how)
    other = t if weights == "the run's" else _Trainer(seed=7)
    with pytest.raises(E.StoreCorruptError, match="weights digest .*(is missing|holds no 'datavalue_weights')"):
        _resume_one_step(run, other)
    assert open_run(run).n_steps == 2  # nothing appended


def test_p5_21_a_run_from_before_the_marker_resumes_with_a_warning(tmp_path, caplog):
    """A run written before the marker (no member, no root attribute) is not damage: the resume says the
    weights are unchecked; from then on the run keeps the digest, and deleting it is damage."""
    run = tmp_path / "r.zarr"
    t = _Trainer()
    t.record(run, [range(0, 6), range(6, 12)], resume=False)
    shutil.rmtree(run / "weights_digest")
    meta = run / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["datavalue_weights_digest"]
    meta.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="datavalue"):
        _resume_one_step(run, t)
    assert any("holds no weights digest" in r.getMessage() for r in caplog.records)
    assert open_run(run).n_steps == 3
    _damage(run, "member deleted")
    with pytest.raises(E.StoreCorruptError, match="weights digest"):
        _resume_one_step(run, t)


# ---------------------------------------------------------------- P5-31: a recorder never closed
_CHILD = """
import os, sys
import numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(1)
import datavalue
from datavalue.capture import FinalPass
run, mode = sys.argv[1], sys.argv[2]
X = torch.randn(160, 4, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (160,), generator=torch.Generator().manual_seed(1))
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
opt = torch.optim.SGD(m.parameters(), lr=0.1)
if mode == "final":
    with datavalue.Recorder(run, m, optimizer=opt, proj_dim=None) as rec:
        with rec.step(sample_ids=np.arange(8)):
            F.cross_entropy(m(X[:8]), Y[:8]).backward()
        opt.step(); opt.zero_grad()
    fp = FinalPass(run, m)
    for b in range(5):
        ids = np.arange(8 * b, 8 * b + 8)
        with fp.batch(ids):
            F.cross_entropy(m(X[ids]), Y[ids]).backward()
    print("child done", flush=True)
    sys.exit(0)
rec = datavalue.Recorder(run, m, optimizer=opt, proj_dim=None, commit_every=32)
for t in range(20):
    ids = np.arange(8 * t, 8 * t + 8)
    with rec.step(sample_ids=ids):
        F.cross_entropy(m(X[ids]), Y[ids]).backward()
    opt.step(); opt.zero_grad()
if mode == "del":
    del rec
if mode == "raise":
    raise KeyboardInterrupt
if mode == "fork":
    pid = os.fork()
    if pid == 0:          # a child that exits normally: the parent's recorder is not its own
        sys.exit(0)
    os.waitpid(pid, 0)
    print("forked child exited", flush=True)
print("child done", flush=True)
"""


def _child(tmp_path: Path, mode: str) -> tuple[Path, subprocess.CompletedProcess]:
    return run_child(tmp_path, _CHILD, mode)


@pytest.mark.parametrize("mode", ["exit", "del", "raise"])
def test_p5_31_a_script_that_never_closes_its_recorder_keeps_its_steps(tmp_path, mode):
    run, r = _child(tmp_path, mode)
    assert r.returncode == (0 if mode != "raise" else r.returncode), r.stderr[-2000:]
    if mode != "raise":
        assert "child done" in r.stdout, r.stderr[-2000:]
    assert open_run(run).n_steps == 20, r.stderr[-2000:]
    assert f"Recorder('{run}') was never closed: committed" in r.stderr, r.stderr[-2000:]
    assert "call rec.close()" in r.stderr


def test_p5_31_a_forked_child_leaves_the_parents_recorder_alone(tmp_path):
    """The exit hook runs in the process that opened the recorder only: the forked child commits nothing
    (it would race the parent's writer); the parent commits at its own exit, once."""
    run, r = _child(tmp_path, "fork")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "forked child exited" in r.stdout
    assert r.stderr.count("was never closed") == 1, r.stderr[-2000:]
    assert open_run(run).n_steps == 20


def test_p5_31_a_final_pass_never_closed_keeps_its_batches_and_stays_unfinished(tmp_path):
    run, r = _child(tmp_path, "final")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FinalPass(" in r.stderr and "was never closed" in r.stderr, r.stderr[-2000:]
    final = open_run(run / "final")
    assert final.n_rows == 40
    integration = final.manifest["integration"]
    assert integration["complete"] is False and "never closed" in integration["aborted"]
    with pytest.raises(E.EmbeddingError):
        build_influence(run, progress=False)


def test_p5_31_a_closed_recorder_leaves_the_exit_hook(tmp_path):
    from datavalue.capture import recorder as recorder_module

    t = _Trainer()
    rec = datavalue.Recorder(tmp_path / "r.zarr", t.model, optimizer=t.opt, proj_dim=None)
    assert id(rec) in recorder_module._OPEN
    rec.close()
    assert id(rec) not in recorder_module._OPEN


# ---------------------------------------------------------------- derived members: links and a user's files
def _momentum_run(path: Path, steps: int = 4) -> _Trainer:
    t = _Trainer()
    t.opt = torch.optim.SGD(t.model.parameters(), lr=0.1, momentum=0.9)
    t.record(path, [range(6 * s, 6 * s + 6) for s in range(steps)], resume=False)
    return t


#: a user's file inside the member (or a link below it) is refused by the write; a link out of the run is
#: refused already by the open of the run (datavalue.store.open_run)
REFUSED = "did not write|leads outside the run"


def _plant(run: Path, where: str, kind: str, outside: Path) -> Path:
    """A user's file (``kind="file"``) or a link out of the run (``"link"``) at ``run/where``."""
    target = run / where
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        target.write_text("my notes")
    else:
        outside.mkdir(exist_ok=True)
        (outside / "keep.txt").write_text("outside the run")
        if target.is_dir():
            shutil.rmtree(target)
        target.symlink_to(outside, target_is_directory=True)
    return target


def _untouched(target: Path, kind: str, outside: Path) -> None:
    if kind == "file":
        assert target.read_text() == "my notes"
    else:
        assert target.is_symlink()
        assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("kind", ["file", "link"])
def test_derived_build_overwrite_never_deletes_a_users_file_or_follows_a_link(tmp_path, kind):
    """build_embeddings(overwrite=True): the velocity member and the transfer operators included."""
    run = tmp_path / "r.zarr"
    _momentum_run(run)
    datavalue.build_embeddings(run, progress=False)
    for where in ("embeddings/empirical_fisher/v_values/c/NOTES", "embeddings/empirical_fisher/ops/block000/c/x"):
        target = _plant(run, where, kind, tmp_path / "outside")
        with pytest.raises(E.StoreError, match=REFUSED):
            datavalue.build_embeddings(run, progress=False, overwrite=True)
        _untouched(target, kind, tmp_path / "outside")
        target.unlink() if kind == "file" or target.is_symlink() else None


@pytest.mark.parametrize("kind", ["file", "link"])
def test_derived_extend_never_deletes_a_users_file_or_writes_through_a_link(tmp_path, kind):
    """Refused before anything changes (the build stays as it was, whole); extends once they are gone."""
    run = tmp_path / "r.zarr"
    t = _momentum_run(run, steps=2)
    datavalue.build_embeddings(run, progress=False)
    t.record(run, [range(30, 36), range(36, 42)], resume=True)
    before = (run / "embeddings/empirical_fisher/values/zarr.json").read_text()
    for where in ("embeddings/empirical_fisher/values/c/NOTES", "embeddings/empirical_fisher/v_values/c/NOTES",
                  "embeddings/empirical_fisher/ops/block000/NOTES"):
        target = _plant(run, where, kind, tmp_path / "outside")
        with pytest.raises(E.StoreError, match=REFUSED):
            extend_embeddings(run, progress=False)
        _untouched(target, kind, tmp_path / "outside")
        assert (run / "embeddings/empirical_fisher/values/zarr.json").read_text() == before
        target.unlink()
    assert extend_embeddings(run, progress=False).n_steps == 4


@pytest.mark.parametrize("kind", ["file", "link"])
def test_derived_embeddings_at_overwrite_never_deletes_a_users_file_or_follows_a_link(tmp_path, kind):
    run = tmp_path / "r.zarr"
    _momentum_run(run)
    datavalue.build_embeddings(run, progress=False, segments=2)
    embeddings_at(run, 2, progress=False)
    target = _plant(run, "embeddings/empirical_fisher/at/2/values/c/NOTES", kind, tmp_path / "outside")
    with pytest.raises(E.StoreError, match=REFUSED):
        embeddings_at(run, 2, progress=False, overwrite=True)
    _untouched(target, kind, tmp_path / "outside")


@pytest.mark.parametrize("kind", ["file", "link"])
def test_derived_influence_overwrite_never_deletes_a_users_file_or_follows_a_link(tmp_path, kind):
    run = tmp_path / "r.zarr"
    t = _momentum_run(run)
    _final_pass(run, t.model)
    build_influence(run, progress=False)
    name = open_run(run / "final").subgroups("influence")[0] if hasattr(open_run(run), "subgroups") else "fisher"
    target = _plant(run, f"final/influence/{name}/values/c/NOTES", kind, tmp_path / "outside")
    with pytest.raises(E.StoreError, match=REFUSED):
        build_influence(run, progress=False, overwrite=True)
    _untouched(target, kind, tmp_path / "outside")


# ---------------------------------------------------------------- TracIn: param groups disagreeing on maximize
def test_tracin_refuses_a_run_whose_param_groups_disagree_on_maximize(tmp_path):
    """commit c8ae4e0 refused it without a test: one group steps with gradient ascent, one with descent;
    kind='tracin' takes one sign per run, so it must refuse rather than pick one."""
    run = tmp_path / "mixed.zarr"
    t = _Trainer()
    first, last = t.model[0], t.model[2]
    t.opt = torch.optim.SGD([{"params": first.parameters(), "maximize": True}, {"params": last.parameters()}], lr=0.1)
    t.record(run, [range(0, 6), range(6, 12)], resume=False)
    assert [g.get("maximize") for g in open_run(run).optimizer["groups"]] == [True, False]
    with pytest.raises(E.QueryError, match="maximize=True .* and some without"):
        datavalue.Attributor(run, t.model, kind="tracin", progress=False).scores(_loss)


def test_p5_31_closing_a_writer_whose_thread_is_gone_commits_the_queue_without_hanging(tmp_path):
    """The exit hook must not hang on a writer thread that is not running (stopped by the interpreter, or a
    forked copy): close() writes the queued steps on the calling thread."""
    from datavalue.store import RunWriter, StepBlock

    def block(t: int) -> StepBlock:
        rng = np.random.default_rng(t)
        return StepBlock(step=t, sample_id=np.arange(3) + 10 * t, weight=np.full(3, 1 / 3),
                         grads=rng.standard_normal((3, 4)), flags=np.zeros(3, np.uint8), lr=0.1, epoch=0,
                         grad_scale=1.0, momentum=0.0, weight_decay=0.0)

    w = RunWriter(tmp_path / "r.zarr", {"projection": {"blocks": []}}, k=4, chunk_rows=4, background=True)
    w.submit(block(0))
    w.flush()
    from datavalue.store import _writer

    w._queue.put(_writer._STOP)  # the thread ends (the run stays open)
    w._thread.join(timeout=30)
    assert not w._thread.is_alive()
    for t in (1, 2, 3):  # queued after the thread ended, as in a process whose writer thread is gone
        w._queue.put(block(t))
    w.close()
    assert open_run(tmp_path / "r.zarr").n_steps == 4
