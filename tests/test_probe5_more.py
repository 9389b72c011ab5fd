"""Fifth probe (issue 22): overwrite beside a user's files, values read back, query loss functions.

Each test failed before its fix (docs/errors.md, "Fifth probe: overwrite, read-back values, query
losses"): ``Recorder(run, overwrite=True)`` deleted a user's files inside ``grads/``, ``final/``,
``embeddings/`` (the check looked at the run's top level only), ``build_influence`` /
``build_embeddings(overwrite=True)`` deleted one inside the build they replace (P5-18); a negative
learning rate, a negative row weight or a NaN gradient row read back from a run was scored by
``kind="tracin"`` / ``"grad_dot"`` (P5-04); a query loss function of the wrong shape got raw torch
errors or a message about ``sample_ids`` (P5-05).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue import errors as E
from datavalue.capture import FinalPass
from datavalue.embeddings import build_influence
from datavalue.store import open_run
from tests._helpers_tiny_run import X, Y, record_tiny_run, tiny_mlp, tiny_query_loss


def _final_pass(run: Path, model: torch.nn.Module, **kw) -> None:
    with FinalPass(run, model, **kw) as fp, fp.batch(np.arange(24)):
        F.cross_entropy(model(X), Y).backward()


def _tree(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size if p.is_file() else -1) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def built_run(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A run with everything the tests below put a user's file into: embeddings, a final pass, an influence build."""
    run = tmp_path_factory.mktemp("p5_18") / "r.zarr"
    model = record_tiny_run(run, checkpoint_every=2)
    datavalue.build_embeddings(run, progress=False)
    _final_pass(run, model)
    build_influence(run, progress=False)
    return run, model


# ---------------------------------------------------------------- P5-18: overwrite=True walks what it deletes
@pytest.mark.parametrize("member", ["grads", "grads/c", "embeddings", "embeddings/empirical_fisher/ops", "final",
                                    "final/grads", "final/influence/fisher", "checkpoints/2/model", "commit"])
def test_p5_18_recorder_overwrite_refuses_a_user_file_inside_a_member(built_run, member):
    run, _ = built_run
    note = run / member / "NOTES.txt"
    note.write_text("my notes on this run")
    try:
        before = _tree(run)
        with pytest.raises(E.StoreExistsError, match=rf"1 entry datavalue did not write: '{member}/NOTES.txt'.*"
                                                     "nothing was deleted"):
            datavalue.Recorder(run, tiny_mlp(), proj_dim=None, overwrite=True)
        assert _tree(run) == before and note.read_text() == "my notes on this run"  # nothing deleted or added
    finally:
        note.unlink()


def test_p5_18_recorder_overwrite_names_a_user_directory_and_a_link_inside_a_member(built_run, tmp_path):
    run, _ = built_run
    mine = run / "embeddings" / "checkpoint-500"
    mine.mkdir()
    (mine / "model.safetensors").write_text("weights")
    (run / "grads" / "c" / "elsewhere").symlink_to(tmp_path)
    try:
        with pytest.raises(E.StoreExistsError, match=r"2 entries datavalue did not write: "
                                                     r"'embeddings/checkpoint-500/model.safetensors', 'grads/c/elsewhere'"):
            datavalue.Recorder(run, tiny_mlp(), proj_dim=None, overwrite=True)
        assert (mine / "model.safetensors").read_text() == "weights"
    finally:
        (mine / "model.safetensors").unlink()
        mine.rmdir()
        (run / "grads" / "c" / "elsewhere").unlink()


def test_p5_18_final_pass_overwrite_refuses_a_user_file_two_levels_down(built_run):
    run, model = built_run
    note = run / "final" / "grads" / "NOTES.txt"
    note.write_text("x")
    try:
        with pytest.raises(E.StoreExistsError, match=r"'grads/NOTES.txt'.*nothing was deleted"):
            _final_pass(run, model, overwrite=True)
        assert note.exists() and open_run(run / "final").n_rows == 24
    finally:
        note.unlink()


def test_p5_18_build_overwrite_refuses_a_user_file_inside_the_build(built_run):
    run, _ = built_run
    for build, member in ((lambda: build_influence(run, overwrite=True, progress=False), "final/influence/fisher"),
                          (lambda: datavalue.build_embeddings(run, overwrite=True, progress=False),
                           "embeddings/empirical_fisher")):
        note = run / member / "NOTES.txt"
        note.write_text("x")
        try:
            before = _tree(run)
            with pytest.raises(E.StoreExistsError, match=r"holds 1 entry datavalue did not write: '.*NOTES.txt'.*"
                                                         "nothing was deleted"):
                build()
            assert _tree(run) == before
        finally:
            note.unlink()


def test_p5_18_overwrite_still_replaces_everything_datavalue_writes(tmp_path):
    run = tmp_path / "r.zarr"
    model = record_tiny_run(run, checkpoint_every=2, proj_dim=8)
    datavalue.build_embeddings(run, progress=False)
    _final_pass(run, model)
    build_influence(run, progress=False)
    datavalue.replay_influence(run, tiny_mlp(), lambda ids: (X[ids], Y[ids]), tiny_query_loss,
                               loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    (run / "grads" / "c" / "0" / ".0.999999999.1.partial").write_bytes(b"")  # a dead writer's temporaries
    (run / "embeddings" / ".zarr.json.999999999.ab12.partial").write_bytes(b"")
    (run / "embeddings" / "half_made").mkdir()  # a node a killed writer had just made
    # the same run's own members are walked, not assumed: the rule the refusals above rely on accepts all of them
    from datavalue.store._writer import foreign_entries

    assert foreign_entries(run) == []
    build_influence(run, overwrite=True, progress=False)
    datavalue.build_embeddings(run, overwrite=True, progress=False)
    _final_pass(run, model, overwrite=True)
    record_tiny_run(run, overwrite=True, steps=1)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["commit", "epoch", "flags", "grad_scale", "grads", "lr", "momentum", "sample_id", "step_ptr", "weight",
         "weight_decay", "weights_digest", "zarr.json"])
    assert open_run(run).n_steps == 1


# ---------------------------------------------------------------- P5-04: values read back, checked as recorded
def _pre_digest_copy(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as versions before the chunk digests wrote it: edits through zarr then pass
    every checksum, and only the value checks stand between them and the scores."""
    import json
    import shutil

    from datavalue.store._schema import CHUNK_DIGEST_FILES, CHUNK_DIGESTS_KEY

    shutil.copytree(src, dst)
    for name in CHUNK_DIGEST_FILES:
        (dst / name).unlink()
    doc = json.loads((dst / "zarr.json").read_text())
    del doc["attributes"][CHUNK_DIGESTS_KEY]
    (dst / "zarr.json").write_text(json.dumps(doc))
    return dst


def _set(run: Path, name: str, index: int, value: float) -> None:
    import zarr

    a = zarr.open_array(str(run / name), mode="r+")
    v = a[:]
    v[index] = value
    a[:] = v


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    run = tmp_path_factory.mktemp("p5_04") / "base.zarr"
    return run, record_tiny_run(run, proj_dim=8)


@pytest.mark.parametrize("name, index, value, match", [
    ("lr", 3, -0.1, r"step 3 has learning rate -0.1.*finite and non-negative"),
    ("lr", 2, np.inf, r"step 2 has learning rate inf"),
    ("weight", 5, -1.0, r"step 0, row 5 has weight -1.0.*finite and non-negative"),
    ("weight", 13, np.inf, r"step 2, row 13 has weight inf"),
    ("grad_scale", 1, -2.0, r"step 1 has gradient scale"),
])
def test_p5_04_tracin_and_build_refuse_a_value_the_recorder_refuses(plain_run, tmp_path, name, index, value, match):
    base, model = plain_run
    run = _pre_digest_copy(base, tmp_path / "r.zarr")
    datavalue.Attributor(run, model, kind="tracin", progress=False).scores(tiny_query_loss)  # the copy itself is fine
    _set(run, name, index, value)
    with pytest.raises(E.QueryError, match=match):
        datavalue.Attributor(run, model, kind="tracin", progress=False)
    with pytest.raises(E.EmbeddingError, match=match):
        datavalue.build_embeddings(run, progress=False)


@pytest.mark.parametrize("kind", ["tracin", "grad_dot"])
@pytest.mark.parametrize("how", ["scores", "lazy", "by_sample", "top_k"])
def test_p5_04_a_nan_gradient_row_is_refused_by_tracin_and_grad_dot(plain_run, tmp_path, kind, how):
    base, model = plain_run
    run = _pre_digest_copy(base, tmp_path / "r.zarr")
    _set(run, "grads", 13, np.nan)
    a = datavalue.Attributor(run, model, kind=kind, progress=False)
    call = {"scores": lambda: a.scores(tiny_query_loss), "lazy": lambda: np.asarray(a.scores(tiny_query_loss, lazy=True)),
            "by_sample": lambda: a.scores(tiny_query_loss, by="sample"), "top_k": lambda: a.top_k(tiny_query_loss, k=2)}[how]
    with pytest.raises(E.NonFiniteError, match=r"step 2, row 13: non-finite values in grads.*nothing was scored"):
        call()
    with pytest.raises(E.NonFiniteError, match=r"step 2, row 13: non-finite gradient"):  # the build, as before
        datavalue.build_embeddings(run, progress=False)


def test_p5_04_a_score_that_overflows_is_refused(plain_run, tmp_path):
    base, model = plain_run
    run = _pre_digest_copy(base, tmp_path / "r.zarr")
    _set(run, "lr", 1, 1e300)  # finite, as rec.step(lr=1e300) is: accepted, but its scores overflow float32
    a = datavalue.Attributor(run, model, kind="tracin", progress=False)
    with pytest.raises(E.NonFiniteError, match=r"step 1, row 6: its score overflowed.*lr of step 1"):
        a.scores(tiny_query_loss)


# ---------------------------------------------------------------- P5-05: what a query loss_fn must be
def _nograd(m: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(m(X[:3]), Y[:3], reduction="none")


@pytest.mark.parametrize("loss_fn, match", [
    (lambda m: torch.stack([F.cross_entropy(m(X[i : i + 1]), Y[i : i + 1]) for i in range(3)]),
     r"ran the model 3 times \(batches of 1, 1, 1\).*one forward"),
    (lambda m: F.cross_entropy(m(X[:0]), Y[:0], reduction="none"), r"returned no losses \(an empty test batch\)"),
    (_nograd, r"do not require grad \(computed under torch.no_grad\(\)"),
    (lambda m: F.cross_entropy(m(X[:3]), Y[:3], reduction="none").detach(), r"do not require grad.*\.detach\(\)ed"),
    (lambda m: F.cross_entropy(tiny_mlp(seed=1)(X[:3]), Y[:3], reduction="none"), r"never ran the model it was given"),
], ids=["forward-per-point", "empty", "no_grad", "detach", "another-model"])
def test_p5_05_a_query_loss_fn_gets_a_query_error_saying_what_it_must_be(plain_run, loss_fn, match):
    run, model = plain_run
    a = datavalue.Attributor(run, model, kind="grad_dot", progress=False)
    with pytest.raises(E.QueryError, match=match) as info:
        a.scores(loss_fn)
    assert "must run one forward pass of the model over all m test points" in str(info.value)
    assert "sample_ids" not in str(info.value).split("(Raised:")[0]


def test_p5_05_a_query_inside_no_grad_and_a_good_loss_fn_still_work(plain_run):
    run, model = plain_run
    a = datavalue.Attributor(run, model, kind="grad_dot", progress=False)
    S = a.scores(tiny_query_loss)
    with torch.no_grad():  # the caller's context: the query computes its losses with autograd on
        np.testing.assert_allclose(a.scores(tiny_query_loss), S, rtol=1e-6, atol=0)
    assert not model._forward_pre_hooks  # the hook that watched the forwards is gone
