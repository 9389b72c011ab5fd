"""``build_embeddings(fisher_window=W)``: step ``t``'s true Fisher pooled over the steps
``max(0, t - W) .. min(T - 1, t + W)`` (issue 19, session 12).

The pooled curvature is the mean of those steps' recorded Fisher matrices ``F_s^T F_s`` (each step's
stored rows already carry ``1 / sqrt(fisher_samples)``). Oracles:

- a run whose step ``t`` stores the concatenated, ``1 / sqrt(n_t)``-scaled rows of its window, built
  with ``W = 0``, equals the ``W`` build of the original run (the rows "as if recorded");
- the recursion depends on a step's rows only through their Gram ``F^T F``, so a ``W = 0`` build whose
  step ``t`` is handed the symmetric square root of the explicitly formed mean Fisher matrix (plain
  numpy, from the store's rows) equals the ``W`` build: SGD with momentum (synthetic run) and AdamW
  with the clip direction (the digits MLP recorded with ``Recorder(curvature="fisher")``).

Segments (``segments=S``) must pool the rows of steps outside their range exactly as one scan does.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from datavalue.embeddings import (
    _stream,
    build_embeddings,
    build_metadata,
    embeddings_at,
    extend_embeddings,
)
from datavalue.errors import EmbeddingError
from datavalue.store import open_array, open_run

from ._synthetic import make_steps, write_run


def _values(path, curvature="fisher", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_embeddings(path, curvature, progress=False, overwrite=True, **kw)
    return np.asarray(open_array(path, f"embeddings/{curvature}/values")[:])


def _window(t, T, W):
    return range(max(0, t - W), min(T - 1, t + W) + 1)


def _pooled_rows(steps, W):
    """The steps with each one's Fisher rows replaced by its window's, scaled by 1/sqrt(n_t)."""
    T = len(steps)
    out = []
    for t, s in enumerate(steps):
        win = _window(t, T, W)
        out.append(dataclasses.replace(s, fisher=np.concatenate([steps[j].fisher for j in win]) / np.sqrt(len(win))))
    return out


def _mean_fisher_roots(path, W):
    """Per step, the symmetric square root of the mean of the window's Fisher matrices, formed
    explicitly in float64 from the store's rows (plain numpy)."""
    run = open_run(path)
    ptr = np.asarray(run.fisher_ptr)
    rows = np.asarray(run.read("fisher", 0, int(ptr[-1])), dtype=np.float64)
    T = int(run.n_steps)
    roots = []
    for t in range(T):
        win = _window(t, T, W)
        F = sum(rows[ptr[j] : ptr[j + 1]].T @ rows[ptr[j] : ptr[j + 1]] for j in win) / len(win)
        lam, V = np.linalg.eigh(F)
        roots.append((V * np.sqrt(np.clip(lam, 0.0, None))) @ V.T)
    return roots


def _explicit_build(monkeypatch, path, W, **kw):
    """A ``W = 0`` build whose step ``t`` gets the square root of the explicit mean Fisher."""
    roots = _mean_fisher_roots(path, W)
    with monkeypatch.context() as m:
        m.setattr(_stream, "_step_curvature", lambda plan, curv, t: roots[t])
        return _values(path, **kw)


@pytest.fixture
def sgd_run(tmp_path):
    steps = make_steps(3, 11, fisher=True, momentum=0.5)  # clipped steps (grad_scale < 1), variable batches
    return steps, write_run(tmp_path / "run.zarr", steps, fisher=True)


@pytest.mark.parametrize("blocks", ["full", "layer"])
@pytest.mark.parametrize("W", [1, 2, 20])
def test_pooled_build_equals_the_pooled_rows_recorded(tmp_path, sgd_run, W, blocks):
    """W = 20 > T: every step pools the whole run."""
    steps, path = sgd_run
    as_recorded = write_run(tmp_path / "pooled.zarr", _pooled_rows(steps, W), fisher=True)
    got = _values(path, fisher_window=W, blocks=blocks)
    want = _values(as_recorded, blocks=blocks)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    assert not np.allclose(got, _values(path, blocks=blocks), rtol=0, atol=1e-6 * np.abs(want).max())


def test_pooled_sgd_build_equals_the_explicit_mean_fisher(monkeypatch, sgd_run):
    steps, path = sgd_run
    for W in (1, 3):
        got = _values(path, fisher_window=W, blocks="full")
        want = _explicit_build(monkeypatch, path, W, blocks="full")
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())


@pytest.mark.parametrize("segments", [2, 3, 5])
def test_segments_pool_the_rows_outside_their_range(sgd_run, segments):
    _, path = sgd_run
    one = _values(path, fisher_window=2, blocks="full")
    seg = _values(path, fisher_window=2, blocks="full", segments=segments)
    np.testing.assert_allclose(seg, one, rtol=0, atol=1e-10 * np.abs(one).max())


def test_window_zero_is_bit_identical(sgd_run):
    _, path = sgd_run
    for blocks in ("full", "layer"):
        assert np.array_equal(_values(path, fisher_window=0, blocks=blocks), _values(path, blocks=blocks))


def test_torch_cpu_backend_pools_the_same(sgd_run):
    pytest.importorskip("torch")
    _, path = sgd_run
    want = _values(path, fisher_window=2, blocks="full")
    got = _values(path, fisher_window=2, blocks="full", device="cpu")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    from tests.embeddings._digits import make_case

    path = tmp_path_factory.mktemp("fisher_window_adamw") / "run.zarr"
    # 8 AdamW steps, clip_grad_norm_(1.0) binds at steps 0 and 1 (tests/embeddings/test_adam_clip_direction.py)
    make_case(path, lr=1e-2, adam="adamw", weight_decay=0.01, n_removals=10, n_train=128, epochs=2, n_test=2,
              max_grad_norm=1.0, curvature="fisher")
    return path


@pytest.mark.parametrize("blocks", ["full", "layer"])
def test_pooled_adamw_build_equals_the_explicit_mean_fisher(monkeypatch, adamw_run, blocks):
    got = _values(adamw_run, fisher_window=2, blocks=blocks)
    want = _explicit_build(monkeypatch, adamw_run, 2, blocks=blocks)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())
    own = _values(adamw_run, blocks=blocks)
    assert not np.allclose(got, own, rtol=0, atol=1e-6 * np.abs(own).max())
    assert np.array_equal(_values(adamw_run, blocks=blocks, fisher_window=0), own)


def test_segmented_adamw_build_pools_as_one_scan(adamw_run):
    one = _values(adamw_run, fisher_window=3, blocks="full")
    three = _values(adamw_run, fisher_window=3, blocks="full", segments=3)
    np.testing.assert_allclose(three, one, rtol=0, atol=1e-8 * np.abs(one).max())


def test_metadata_and_checkpoints_keep_the_window(tmp_path, sgd_run):
    """The window is stored; embeddings_at pools as the build did (its stored transfer operators were
    made with it): at a segment boundary its rows equal a fresh segmented computation with the window."""
    steps, path = sgd_run
    as_recorded = write_run(tmp_path / "pooled.zarr", _pooled_rows(steps, 2), fisher=True)
    _values(path, fisher_window=2, blocks="full", segments=3)
    meta = build_metadata(path, "fisher")
    assert meta["fisher_window"] == 2
    assert "fisher_window" in meta["choice"]["summary"]
    step = int(meta["segments"][1][1]) - 1  # inside the last segment: recomputed there with the window
    _values(as_recorded, blocks="full", segments=3)
    got = np.asarray(embeddings_at(path, step, "fisher", progress=False)[:])
    want = np.asarray(embeddings_at(as_recorded, step, "fisher", progress=False)[:])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


def test_extension_of_a_pooled_build_is_exact(tmp_path):
    """Refused until session 13; now the old tail's pooled curvature is recomputed (more cases:
    tests/embeddings/test_fisherwin2_extend.py)."""
    path = tmp_path / "run.zarr"
    steps = make_steps(5, 6, fisher=True)
    write_run(path, steps[:4], fisher=True)
    _values(path, fisher_window=1)
    write_run(path, steps[4:], fisher=True, mode="resume")
    extend_embeddings(path, "fisher", progress=False)
    got = np.asarray(open_array(path, "embeddings/fisher/values")[:])
    want = _values(write_run(tmp_path / "whole.zarr", steps, fisher=True), fisher_window=1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())  # float32 storage


@pytest.mark.parametrize(
    ("W", "match"),
    [
        (-1, r"must be >= 0.*got -1"),
        (1.5, r"must be an int >= 0.*got 1.5 \(float\)"),
        (True, r"must be an int >= 0.*got True \(bool\)"),
        ("2", r"must be an int >= 0.*got '2' \(str\)"),
        (None, r"must be an int >= 0.*got None"),
    ],
)
def test_bad_window_is_refused(sgd_run, W, match):
    _, path = sgd_run
    with pytest.raises(EmbeddingError, match=match):
        build_embeddings(path, "fisher", progress=False, fisher_window=W)
    assert not open_run(path).has_array("embeddings/fisher/values")  # nothing written


@pytest.mark.parametrize("curvature", ["empirical_fisher", "none"])
def test_window_with_another_curvature_is_refused(sgd_run, curvature):
    _, path = sgd_run
    with pytest.raises(EmbeddingError, match=rf"applies to curvature='fisher' only.*is '{curvature}'"):
        build_embeddings(path, curvature, progress=False, fisher_window=2)
    assert build_embeddings(path, curvature, progress=False, fisher_window=0).curvature == curvature


def test_non_finite_rows_of_a_pooled_step_name_that_step(tmp_path):
    from datavalue.errors import NonFiniteError

    steps = make_steps(7, 6, fisher=True)
    bad = steps[4].fisher.copy()
    bad[1, 2] = np.nan
    steps[4] = dataclasses.replace(steps[4], fisher=bad)
    path = write_run(tmp_path / "run.zarr", steps, fisher=True)
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite Fisher .*pooled into steps 3\.\.5 by fisher_window=1"):
        build_embeddings(path, "fisher", progress=False, fisher_window=1)


def test_a_pooled_build_passes_the_provenance_check_queries_run(sgd_run):
    """The window is a build option, not the run's bookkeeping: ``run_digest`` (which ``check_build`` recomputes
    from the run for every query) stays the run's, so a pooled build is queryable."""
    from datavalue.embeddings import check_build

    _, path = sgd_run
    _values(path)
    digest = build_metadata(path, "fisher")["run_digest"]
    _values(path, fisher_window=3)
    assert build_metadata(path, "fisher")["run_digest"] == digest
    check_build(open_run(path), "fisher")
