"""``extend_embeddings`` of a build made with ``fisher_window=W > 0`` (issue 19, session 13).

The steps recorded after a build change the pooled Fisher of its last ``W`` steps; the extension recomputes
those steps' rows and carries the older rows over the changed curvature (``datavalue.embeddings._pooledtail``).
Oracle: ``build(T0)`` then ``extend(T1)`` equals a from-scratch ``build(T1)`` with the same ``W`` (float64
storage, to rounding), for plain SGD, SGD with momentum and weight decay, an AdamW run built as the SGD proxy,
one and several segments, per-block and full operators, numpy and torch-CPU; and ``embeddings_at`` of the
extended build equals the from-scratch build's (the stored transfer operators reaching into the tail were
replaced). Before session 13 every such extension was refused.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from datavalue.embeddings import build_embeddings, build_metadata, embeddings_at, extend_embeddings
from datavalue.errors import EmbeddingError
from datavalue.store import open_array

from ._synthetic import make_steps, write_run

SETTINGS = {
    "sgd": dict(),
    "momentum": dict(momentum=0.5, weight_decay=0.01),
    "adamw_proxy": dict(weight_decay=0.01),
}
KIND = {"adamw_proxy": "adamw"}


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sgd-proxy warning of the AdamW run
        return fn(*args, **kw)


def _values(path):
    return np.asarray(open_array(path, "embeddings/fisher/values")[:])


def _runs(tmp_path, setting, T0=9, T1=15, seed=3):
    steps = make_steps(seed, T1, fisher=True, **SETTINGS[setting])  # clipped steps, variable batches
    mkw = {"momentum_kind": KIND[setting]} if setting in KIND else {}
    grown = write_run(tmp_path / "grown.zarr", steps[:T0], fisher=True, **mkw)
    whole = write_run(tmp_path / "whole.zarr", steps, fisher=True, **mkw)
    return steps, grown, whole, mkw


def _extend_vs_scratch(tmp_path, setting, W, *, blocks="full", segments=1, device=None, T0=9, T1=15):
    steps, grown, whole, mkw = _runs(tmp_path, setting, T0, T1)
    kw = dict(blocks=blocks, fisher_window=W, storage_dtype="float64", progress=False)
    _quiet(build_embeddings, grown, "fisher", segments=segments, **kw)
    write_run(grown, steps[T0:], fisher=True, mode="resume", **mkw)
    info = _quiet(extend_embeddings, grown, "fisher", segments=segments, progress=False, device=device)
    _quiet(build_embeddings, whole, "fisher", segments=segments, **kw)
    got, want = _values(grown), _values(whole)
    return info, got, want, grown, whole


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("blocks", ["full", "layer"])
@pytest.mark.parametrize("W", [1, 3])
def test_extend_of_a_pooled_build_equals_a_rebuild(tmp_path, setting, blocks, W):
    info, got, want, grown, _ = _extend_vs_scratch(tmp_path, setting, W, blocks=blocks)
    assert info.n_steps == 15 and info.fisher_window == W
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())
    meta = build_metadata(grown, "fisher")
    assert meta["fisher_window"] == W and meta["extended"][-1]["from_step"] == 9


def test_the_old_tail_matters(tmp_path, monkeypatch):
    """The oracle is not vacuous: an extension that keeps the old tail's curvature (every old row mapped with
    the new steps' operator alone, as a ``W = 0`` build extends) misses the rebuild."""
    from datavalue.embeddings import _extend

    monkeypatch.setattr(_extend, "pooled_tail", lambda *a, **k: None)
    monkeypatch.setattr(_extend, "_refuse_fisher_window", lambda *a: None, raising=False)
    _, got, want, _, _ = _extend_vs_scratch(tmp_path, "sgd", 2)
    assert not np.allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("setting", ["sgd", "momentum"])
@pytest.mark.parametrize("segments", [2, 3])
def test_segmented_extend_and_checkpoints(tmp_path, setting, segments):
    """With several segments the stored transfer operators that reach into the tail are replaced: a
    checkpoint inside the tail, at the old end and before the tail equal the from-scratch build's."""
    _, got, want, grown, whole = _extend_vs_scratch(tmp_path, setting, 2, segments=segments)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())
    for step in (5, 8, 9, 12):
        a = np.asarray(_quiet(embeddings_at, grown, step, "fisher", progress=False, overwrite=True)[:])
        b = np.asarray(_quiet(embeddings_at, whole, step, "fisher", progress=False, overwrite=True)[:])
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * np.abs(b).max(), err_msg=f"step {step}")


def test_window_past_the_old_end_recomputes_every_old_row(tmp_path):
    """W >= T0: every old step's window reaches the new steps; nothing is mapped."""
    _, got, want, _, _ = _extend_vs_scratch(tmp_path, "momentum", 12)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())


def test_two_extensions_in_a_row(tmp_path):
    steps, grown, whole, _ = _runs(tmp_path, "momentum", T0=6, T1=15)
    kw = dict(blocks="full", fisher_window=2, storage_dtype="float64", progress=False)
    build_embeddings(grown, "fisher", segments=2, **kw)
    write_run(grown, steps[6:10], fisher=True, mode="resume")
    extend_embeddings(grown, "fisher", progress=False)
    write_run(grown, steps[10:], fisher=True, mode="resume")
    extend_embeddings(grown, "fisher", progress=False, segments=2)
    build_embeddings(whole, "fisher", **kw)
    want = _values(whole)
    np.testing.assert_allclose(_values(grown), want, rtol=0, atol=1e-10 * np.abs(want).max())
    b = np.asarray(embeddings_at(whole, 7, "fisher", progress=False)[:])
    a = np.asarray(embeddings_at(grown, 7, "fisher", progress=False)[:])
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * np.abs(b).max())


@pytest.mark.parametrize("setting", ["sgd", "momentum", "adamw_proxy"])
def test_torch_cpu_extend_of_a_pooled_build(tmp_path, setting):
    pytest.importorskip("torch")
    _, got, want, _, _ = _extend_vs_scratch(tmp_path, setting, 2, device="cpu")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())


def test_float32_storage_stays_within_storage_rounding(tmp_path):
    """The default float32 storage: the mapped old rows carry the storage's rounding, like any extension."""
    steps, grown, whole, _ = _runs(tmp_path, "momentum")
    build_embeddings(grown, "fisher", blocks="full", fisher_window=3, progress=False)
    write_run(grown, steps[9:], fisher=True, mode="resume")
    extend_embeddings(grown, "fisher", progress=False)
    build_embeddings(whole, "fisher", blocks="full", fisher_window=3, progress=False)
    want = _values(whole)
    np.testing.assert_allclose(_values(grown), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_singular_tail_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """When the old tail's operator loses a direction the new curvature uses, the old rows cannot be carried
    over exactly: refused, the build untouched."""
    from datavalue.embeddings import _pooledtail

    steps, grown, _, _ = _runs(tmp_path, "sgd")
    build_embeddings(grown, "fisher", blocks="full", fisher_window=2, storage_dtype="float64", progress=False)
    before = _values(grown)
    meta = build_metadata(grown, "fisher")
    write_run(grown, steps[9:], fisher=True, mode="resume")
    real = _pooledtail._transfer

    def singular_old(plan, lo, hi):  # the old plan's operators with their first column zeroed
        ops = real(plan, lo, hi)
        if plan.fisher_end:
            for op in ops:
                op[:, 0] = 0.0
        return ops

    monkeypatch.setattr(_pooledtail, "_transfer", singular_old)
    with pytest.raises(EmbeddingError, match=r"cannot extend this fisher_window=2 build exactly.*steps 7\.\.8.*"
                                             r"Nothing was written.*fisher_window=2, overwrite=True"):
        extend_embeddings(grown, "fisher", progress=False)
    assert np.array_equal(_values(grown), before)
    assert build_metadata(grown, "fisher") == meta


def test_adam_aware_pooled_build_keeps_the_adam_refusal(tmp_path):
    """Adam-aware builds are not extended at any window (no 3k transfer operators; pre-existing refusal)."""
    from tests.embeddings._digits import make_case

    path = tmp_path / "run.zarr"
    make_case(path, lr=1e-2, adam="adamw", weight_decay=0.01, n_removals=2, n_train=64, epochs=1, n_test=2,
              curvature="fisher")
    build_embeddings(path, "fisher", fisher_window=2, progress=False, overwrite=True)
    with pytest.raises(EmbeddingError, match="not implemented for Adam-aware builds"):
        extend_embeddings(path, "fisher", progress=False)


def test_momentum_tail_without_velocity_is_refused(tmp_path):
    """Momentum in the old tail, none from the old end on, ``velocity=False``: the first new step carries no
    velocity (the plain extension's check passes), but the tail's changed curvature needs the old rows' velocity,
    which was not kept: refused, nothing written. With the same steps and ``W = 0`` the extension runs."""
    old = make_steps(3, 9, fisher=True, momentum=0.5)
    new = make_steps(4, 4, t0=9, fisher=True, momentum=0.0)
    for W in (2, 0):
        path = write_run(tmp_path / f"w{W}.zarr", old, fisher=True)
        build_embeddings(path, "fisher", blocks="full", fisher_window=W, velocity=False, progress=False)
        before, meta = _values(path), build_metadata(path, "fisher")
        write_run(path, new, fisher=True, mode="resume")
        if W:
            with pytest.raises(EmbeddingError, match=r"momentum carries the old rows' velocity.*velocity=False.*"
                                                     r"Nothing was written"):
                extend_embeddings(path, "fisher", progress=False)
            assert np.array_equal(_values(path), before) and build_metadata(path, "fisher") == meta
        else:
            extend_embeddings(path, "fisher", progress=False)


@pytest.mark.parametrize(("W", "T1", "segments"), [(3, 10, 1), (5, 11, 3)])
def test_fewer_new_steps_than_the_window(tmp_path, W, T1, segments):
    """One or two new steps under a window of 3 or 5: the new steps' own windows reach into the old ones too."""
    _, got, want, _, _ = _extend_vs_scratch(tmp_path, "momentum", W, segments=segments, T1=T1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())
