"""Fourth probe (issue 22): resume, step windows, arguments and messages.

Each test failed before its fix: ``JaxRecorder(resume=True)`` accepted another optimizer (none, or
``nesterov``/``dampening`` added) and recorded more steps under the old manifest; ``steps=(2, 2)``,
``(-1, -1)`` and ``(None, -6)`` returned an ``(m, 0)`` matrix while ``(3, 1)`` was refused, and
``replay_influence`` refused negative ends the query side accepts; ``build_influence(damping=True)``
built with damping 1.0; ``datavalue demo --out RUN`` wrote its files into the run; ``Recorder(3, m)``
raised a raw ``TypeError``; and three refusals said something untrue (a commit that went back was
"recorded further", an archive was "a regular file" or "another optimizer", a user's ``final/``
folder "already holds a final-weights pass"). Rows: docs/errors.md, "Fourth probe".
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

import datavalue
from datavalue import errors as E
from datavalue.capture import FinalPass, ReplayError
from datavalue.capture._replay import _parse_steps
from datavalue.cli import main
from datavalue.embeddings import build_influence
from datavalue.query._groups import parse_steps
from datavalue.store import archive_run, open_run
from tests._helpers_tiny_run import Y, record_tiny_run, tiny_mlp
from tests.query.test_replay_cli_errors import case  # noqa: F401  (a module fixture)

X = torch.randn(24, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _model() -> torch.nn.Module:
    return tiny_mlp().double()


def _record(path: Path, steps: int = 4) -> torch.nn.Module:
    """The tiny run in float64: model, inputs and storage."""
    return record_tiny_run(path, _model(), steps, x=X, storage_dtype="float64")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("p4") / "r.zarr"
    model = _record(path)
    datavalue.build_embeddings(path, progress=False)
    return path, model


def Q(m):
    return F.cross_entropy(m(X[:2]), Y[:2], reduction="none")


# ----------------------------------------------------------------------------- N11: JAX resume
@pytest.mark.parametrize("opt", [None, {"kind": "sgd", "momentum": 0.9, "nesterov": True},
                                 {"kind": "sgd", "momentum": 0.9, "dampening": 0.5}],
                         ids=["no-optimizer", "nesterov", "dampening"])
def test_jax_resume_with_another_optimizer_is_refused(tmp_path, opt):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from datavalue.capture.jax import JaxRecorder

    path = tmp_path / "j.zarr"
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}

    def loss(p, x, y):
        return -jax.nn.log_softmax(x @ p["w"] + p["b"])[y]

    x = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0])
    recorded = {"kind": "sgd", "momentum": 0.9}
    with JaxRecorder(path, params, loss, proj_dim=None, optimizer=recorded) as jr:
        jr.step(params, x, y, sample_ids=[0, 1, 2, 3], lr=0.1)
    before = open_run(path).manifest["optimizer"]
    with pytest.raises(E.StoreMismatchError, match="cannot resume with another optimizer: optimizer"):
        JaxRecorder(path, params, loss, proj_dim=None, resume=True, optimizer=opt)
    run = open_run(path)
    assert run.n_steps == 1 and run.manifest["optimizer"] == before
    with JaxRecorder(path, params, loss, proj_dim=None, resume=True, optimizer=recorded) as jr:  # the same: resumes
        jr.step(params, x, y, sample_ids=[4, 5, 6, 7], lr=0.1)
    assert open_run(path).n_steps == 2


# ----------------------------------------------------------------------------- N10: step windows
@pytest.mark.parametrize("steps", [(2, 2), (-1, -1), (None, -4), (0, 0), (4, None), (3, 1)])
def test_an_empty_step_window_is_refused_like_a_reversed_one(built, steps):
    path, model = built
    with pytest.raises(E.QueryError, match=r"is empty or reversed .*pass t0 < t1"):
        datavalue.Attributor(path, model, progress=False).scores(Q, steps=steps)


def test_the_query_and_replay_step_parsers_agree():
    for steps in [(None, None), (-2, None), (-4, 4), (1, -1), (0, 1), (None, 2), slice(1, 3)]:
        expect = parse_steps(steps, 4)
        if not isinstance(steps, slice):
            assert _parse_steps(steps, 4) == expect
    for steps in [(2, 2), (-1, -1), (None, -4), (3, 1), (-5, None), (0, 5)]:
        with pytest.raises(E.QueryError, match="empty or reversed|reaches past"):
            parse_steps(steps, 4)
        with pytest.raises(ReplayError, match="empty or reversed|reaches past"):
            _parse_steps(steps, 4)


def test_replay_influence_counts_negative_ends_from_the_end(case):  # noqa: F811
    from datavalue.query import replay_influence, replays
    from tests.query.test_replay import loss_fn

    c = case[0]
    a = replay_influence(c.path, c.factory(), lambda ids: (c.X[ids], c.Y[ids]), c.query, loss_fn=loss_fn,
                         steps=(-5, None), name="neg", progress=False)
    assert list(a.attrs["steps"]) == [3, 8]
    for steps, said in [((3, 3), "empty or reversed"), ((-9, None), "reaches past")]:
        with pytest.raises(ReplayError, match=said):
            replay_influence(c.path, c.factory(), lambda ids: (c.X[ids], c.Y[ids]), c.query, loss_fn=loss_fn,
                             steps=steps, name="bad", progress=False)
    assert "bad" not in replays(c.path)


# ----------------------------------------------------------------------------- N12: damping
@pytest.mark.parametrize("kw", [{"damping": True}, {"damping_abs": True}, {"damping": np.bool_(True)},
                                {"damping": "0.1"}])
def test_build_influence_refuses_a_bool_damping(tmp_path, kw):
    path = tmp_path / "r.zarr"
    model = _record(path, steps=1)
    with FinalPass(path, model, curvature=None) as p:
        with p.batch(torch.arange(6)):
            F.cross_entropy(model(X[:6]), Y[:6]).backward()
    key = next(iter(kw))
    with pytest.raises(E.EmbeddingError, match=rf"{key} must be a finite number >= 0"):
        build_influence(path, curvature=None, progress=False, **kw)
    assert build_influence(path, curvature=None, progress=False, damping=1, damping_abs=0).damping == 1.0


# ----------------------------------------------------------------------------- N06: demo --out RUN
@pytest.mark.parametrize("inside", [False, True], ids=["the-run", "inside-the-run"])
def test_demo_refuses_an_out_that_is_or_lies_in_a_run(built, capsys, inside):
    path, _ = built
    out = path / "demo" if inside else path
    before = sorted(os.listdir(path))
    assert main(["demo", "--quiet", "--out", str(out), "--epochs", "1", "--n-train", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "lies inside the run" in err and "nothing was written" in err and "\n" not in err
    assert sorted(os.listdir(path)) == before


# ----------------------------------------------------------------------------- N07: Recorder(3, m)
@pytest.mark.parametrize("path", [3, None, b"r.zarr"])
def test_recorder_refuses_a_path_that_is_not_a_path(path):
    with pytest.raises(E.RecorderError, match=r"path must be the run's directory, a str or os.PathLike"):
        datavalue.Recorder(path, _model())


# ----------------------------------------------------------------------------- N13: messages
def test_a_commit_that_went_back_is_not_called_recorded_further(built, tmp_path):
    path, model = built
    copy = tmp_path / "r2.zarr"
    shutil.copytree(path, copy)
    commit = zarr.open_array(str(copy / "commit"), mode="r+")
    v = commit[:]
    v[0] -= 1
    v[1] -= 6
    commit[:] = v
    with pytest.raises(E.QueryError, match=r"covers 24 occurrences but the run's commit now holds only 18: the run "
                                           r"went back") as info:
        datavalue.Attributor(copy, model, progress=False).scores(Q)
    assert "recorded further" not in str(info.value)


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_resume_on_an_archive_says_it_is_a_read_only_archive(built, tmp_path, with_optimizer):
    path, _ = built
    z = tmp_path / "r.zip"
    archive_run(path, z)
    model = _model()
    kw = {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)} if with_optimizer else {}
    with pytest.raises(E.StoreNotFoundError, match=r"is a run archive \(\.zip\), which is read-only.*Unzip it"):
        datavalue.Recorder(z, model, proj_dim=None, storage_dtype="float64", resume=True, **kw)


def test_finalpass_names_a_user_final_folder_for_what_it_is(tmp_path):
    path = tmp_path / "r.zarr"
    model = _record(path, steps=1)
    (path / "final").mkdir()
    (path / "final" / "mine.txt").write_text("x")
    with pytest.raises(E.RecorderError, match=r"final exists and is a directory with 1 entry and no zarr.json, not a "
                                              r"final-weights pass.*Move or rename") as info:
        FinalPass(path, model, curvature=None)
    assert "overwrite=True to replace" not in str(info.value)
    assert (path / "final" / "mine.txt").read_text() == "x"
