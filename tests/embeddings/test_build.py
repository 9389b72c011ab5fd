"""build_embeddings / embeddings_at / extend_embeddings on runs written through the store."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from datavalue.embeddings import build_embeddings, embeddings_at, extend_embeddings
from datavalue.errors import (
    CurvatureUnavailableError,
    EmbeddingError,
    NonFiniteError,
    StoreExistsError,
)
from datavalue.store import open_array, open_run

from ._synthetic import BLOCKS, FULL, by_hand, make_steps, write_run

SETTINGS = {
    "sgd": dict(),
    "wd": dict(weight_decay=0.05),
    "momentum": dict(momentum=0.9, weight_decay=0.01),
}


def _values(path, curvature, name="values"):
    return np.asarray(open_array(path, f"embeddings/{curvature}/{name}")[:])


def _default_spans(curvature):
    """What the default ``blocks="auto"`` builds on these small synthetic runs: one operator for the
    true Fisher, the recorded layer blocks otherwise."""
    return FULL if curvature == "fisher" else BLOCKS


@pytest.mark.parametrize("curvature", ["empirical_fisher", "fisher", "none"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_build_matches_core_and_segments_match_sequential(tmp_path, setting, curvature):
    steps = make_steps(1, 23, fisher=True, **SETTINGS[setting])
    path = write_run(tmp_path / "r.zarr", steps, fisher=True)
    info = build_embeddings(path, curvature, progress=False, storage_dtype="float64")
    seq = _values(path, curvature)
    assert seq.shape == (open_run(path).n_rows, 7) and info.n_steps == 23
    assert [list(b) for b in info.blocks] == [list(b) for b in _default_spans(curvature)]
    np.testing.assert_allclose(seq, by_hand(steps, curvature, blocks=_default_spans(curvature)), rtol=0, atol=1e-12)
    for K in (2, 5):
        build_embeddings(
            path, curvature, segments=K, overwrite=True, progress=False, storage_dtype="float64"
        )
        np.testing.assert_allclose(_values(path, curvature), seq, rtol=0, atol=1e-8)


@pytest.mark.parametrize("curvature", ["empirical_fisher", "fisher"])
@pytest.mark.parametrize("setting", ["sgd", "momentum"])
def test_block_modes_match_the_core_with_those_blocks(tmp_path, setting, curvature):
    steps = make_steps(11, 15, fisher=True, **SETTINGS[setting])
    path = write_run(tmp_path / "r.zarr", steps, fisher=True)
    got = {}
    for mode, spans in (("layer", BLOCKS), ("full", FULL)):
        info = build_embeddings(path, curvature, blocks=mode, overwrite=True, progress=False, storage_dtype="float64")
        assert [list(b) for b in info.blocks] == [list(b) for b in spans]
        got[mode] = _values(path, curvature)
        np.testing.assert_allclose(got[mode], by_hand(steps, curvature, blocks=spans), rtol=0, atol=1e-12)
        build_embeddings(path, curvature, blocks=mode, segments=3, overwrite=True, progress=False,
                         storage_dtype="float64")
        np.testing.assert_allclose(_values(path, curvature), got[mode], rtol=0, atol=1e-8)
        meta = open_array(path, f"embeddings/{curvature}/values").attrs["datavalue_embeddings"]
        assert meta["block_mode"] == mode and meta["blocks"] == [list(b) for b in spans]
    # cross-layer curvature changes the result (the test would not notice a mode that is ignored)
    assert np.abs(got["full"] - got["layer"]).max() > 1e-4
    # the default, "auto", takes the full operator for the true Fisher on a run this small, the
    # layers otherwise (tests/embeddings/test_defaults.py checks the choice and its reasons)
    info = build_embeddings(path, curvature, overwrite=True, progress=False, storage_dtype="float64")
    assert [list(b) for b in info.blocks] == [list(b) for b in _default_spans(curvature)]
    np.testing.assert_array_equal(_values(path, curvature), got["full" if curvature == "fisher" else "layer"])


def test_full_blocks_survive_extend_and_checkpoints(tmp_path):
    steps, more = make_steps(12, 12, fisher=True), make_steps(13, 7, t0=12, fisher=True)
    path = write_run(tmp_path / "r.zarr", steps, fisher=True)
    build_embeddings(path, "empirical_fisher", blocks="full", segments=3, progress=False, storage_dtype="float64")
    write_run(path, more, mode="resume", fisher=True)
    info = extend_embeddings(path, "empirical_fisher", progress=False)
    assert len(info.blocks) == 1  # the stored build's blocks, not the default (layers)
    np.testing.assert_allclose(
        _values(path, "empirical_fisher"), by_hand(steps + more, "empirical_fisher", blocks=FULL), atol=1e-8
    )
    np.testing.assert_allclose(
        np.asarray(embeddings_at(path, 12, "empirical_fisher", progress=False)[:]),
        by_hand(steps, "empirical_fisher", blocks=FULL),
        atol=1e-8,
    )


def test_unknown_block_mode_is_refused(tmp_path):
    path = write_run(tmp_path / "r.zarr", make_steps(14, 3))
    with pytest.raises(EmbeddingError, match="blocks must be one of"):
        build_embeddings(path, blocks="diagonal", progress=False)


def test_clipping_constant_mode(tmp_path):
    steps = make_steps(12, 10, momentum=0.5)
    path = write_run(tmp_path / "r.zarr", steps)
    build_embeddings(path, progress=False, storage_dtype="float64", clipping="constant")
    want = by_hand(steps, "empirical_fisher", clipping="constant")
    np.testing.assert_allclose(_values(path, "empirical_fisher"), want, atol=1e-12)
    assert np.abs(want - by_hand(steps, "empirical_fisher")).max() > 1e-3  # the modes differ
    with pytest.raises(EmbeddingError, match="clipping must be"):
        build_embeddings(path, progress=False, clipping="ignore", overwrite=True)


def test_default_curvature_and_float32(tmp_path):
    steps = make_steps(2, 10)
    path = write_run(tmp_path / "r.zarr", steps)
    info = build_embeddings(path, progress=False, dtype="float32")
    assert info.curvature == "empirical_fisher"
    got = _values(path, "empirical_fisher")
    assert got.dtype == np.float32
    want = by_hand(steps, "empirical_fisher")
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_segments_on_a_distributed_client(tmp_path):
    distributed = pytest.importorskip("distributed")
    steps = make_steps(3, 17, momentum=0.8)
    path = write_run(tmp_path / "r.zarr", steps)
    want = by_hand(steps, "empirical_fisher")
    with distributed.Client(
        processes=False, n_workers=2, threads_per_worker=1, dashboard_address=":0"
    ) as client:
        build_embeddings(path, segments=4, client=client, progress=False, storage_dtype="float64")
    np.testing.assert_allclose(_values(path, "empirical_fisher"), want, atol=1e-8)


@pytest.mark.parametrize("setting", ["sgd", "momentum"])
def test_embeddings_at_a_checkpoint(tmp_path, setting):
    steps = make_steps(4, 20, **SETTINGS[setting])
    path = write_run(tmp_path / "r.zarr", steps)
    build_embeddings(path, segments=4, progress=False, storage_dtype="float64")
    run = open_run(path)
    for b in (5, 11, 20):  # a boundary or not, and the end
        got = np.asarray(embeddings_at(path, b, progress=False)[:])
        assert got.shape[0] == run.step_ptr[b]
        np.testing.assert_allclose(got, by_hand(steps, "empirical_fisher", stop=b), atol=1e-8)
    with pytest.raises(StoreExistsError):
        embeddings_at(path, 11, progress=False)
    with pytest.raises(EmbeddingError):
        embeddings_at(path, 21, progress=False)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("segments", [1, 3])
def test_extend_equals_rebuild(tmp_path, setting, segments):
    steps = make_steps(5, 14, **SETTINGS[setting])
    more = make_steps(6, 9, t0=14, **SETTINGS[setting])
    path = write_run(tmp_path / "r.zarr", steps)
    build_embeddings(path, segments=segments, progress=False, storage_dtype="float64")
    write_run(path, more, mode="resume")
    info = extend_embeddings(path, segments=segments, progress=False)
    assert info.n_steps == 23 and info.n_rows == open_run(path).n_rows
    want = by_hand(steps + more, "empirical_fisher")
    np.testing.assert_allclose(_values(path, "empirical_fisher"), want, rtol=0, atol=1e-8)
    # the extended build's operators still serve checkpoints, and a second extension works
    np.testing.assert_allclose(
        np.asarray(embeddings_at(path, 14, progress=False)[:]),
        by_hand(steps, "empirical_fisher"),
        atol=1e-8,
    )
    extra = make_steps(7, 4, t0=23, **SETTINGS[setting])
    write_run(path, extra, mode="resume")
    extend_embeddings(path, progress=False)
    np.testing.assert_allclose(
        _values(path, "empirical_fisher"),
        by_hand(steps + more + extra, "empirical_fisher"),
        atol=1e-8,
    )


def test_extend_momentum_without_velocity_refuses(tmp_path):
    steps = make_steps(8, 6, momentum=0.9)
    path = write_run(tmp_path / "r.zarr", steps)
    build_embeddings(path, progress=False, velocity=False)
    write_run(path, make_steps(9, 3, t0=6, momentum=0.9), mode="resume")
    with pytest.raises(EmbeddingError, match="velocity"):
        extend_embeddings(path, progress=False)


def test_dampening_and_nesterov_from_the_manifest(tmp_path):
    steps = make_steps(10, 12, momentum=0.7)
    for kw in (dict(dampening=0.3), dict(nesterov=True)):
        path = write_run(tmp_path / f"r{len(kw)}{list(kw)[0]}.zarr", steps, **kw)
        build_embeddings(path, progress=False, storage_dtype="float64", segments=3)
        np.testing.assert_allclose(
            _values(path, "empirical_fisher"), by_hand(steps, "empirical_fisher", **kw), atol=1e-8
        )


# ---------------------------------------------------------------------- errors


def test_fisher_unavailable_names_the_recorder_option(tmp_path):
    path = write_run(tmp_path / "r.zarr", make_steps(0, 3))
    with pytest.raises(CurvatureUnavailableError, match=r"Recorder\(\.\.\., curvature=.fisher.\)"):
        build_embeddings(path, "fisher", progress=False)
    with pytest.raises(CurvatureUnavailableError, match=r"Recorder\(\.\.\., curvature=.hessian.\)"):
        build_embeddings(path, "hessian", progress=False)
    with pytest.raises(EmbeddingError, match="curvature must be"):
        build_embeddings(path, "ggn", progress=False)


def test_rebuild_needs_overwrite(tmp_path):
    path = write_run(tmp_path / "r.zarr", make_steps(0, 3))
    build_embeddings(path, progress=False)
    before = _values(path, "empirical_fisher")
    with pytest.raises(StoreExistsError, match="overwrite=True"):
        build_embeddings(path, progress=False)
    np.testing.assert_array_equal(_values(path, "empirical_fisher"), before)
    build_embeddings(path, progress=False, overwrite=True)


def test_nonfinite_gradient_is_reported_with_its_step(tmp_path):
    steps = make_steps(0, 6)
    steps[3].grads[1, 2] = np.nan
    path = write_run(tmp_path / "r.zarr", steps)
    with pytest.raises(NonFiniteError, match="step 3"):
        build_embeddings(path, progress=False)


def test_exploding_operator_warns_then_raises(tmp_path):
    steps = make_steps(0, 8, scale=6.0)  # eta * lambda_max(H) >> 2: expansive steps
    path = write_run(tmp_path / "r.zarr", steps)
    with pytest.warns(RuntimeWarning, match="expansive"):
        info = build_embeddings(path, progress=False, explode_threshold=10.0)
    assert info.expansive_steps and info.max_operator > 10.0
    huge = make_steps(0, 40, scale=1e6)
    path = write_run(tmp_path / "h.zarr", huge)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteError, match="step"):
            build_embeddings(path, progress=False)


def test_progress_bar_and_attrs(tmp_path, capsys):
    steps = make_steps(11, 9, momentum=0.5)
    path = write_run(tmp_path / "r.zarr", steps)
    info = build_embeddings(path, segments=2, progress=True)
    assert "embeddings (empirical_fisher)" in capsys.readouterr().err
    meta = open_array(path, "embeddings/empirical_fisher/values").attrs["datavalue_embeddings"]
    assert meta["complete"] and meta["n_steps"] == 9 and meta["curvature"] == "empirical_fisher"
    assert meta["segments"] == [list(s) for s in info.segments] and meta["velocity"] is True
    assert "positive = helpful" in meta["sign"]
    assert open_array(path, "embeddings/empirical_fisher/ops/block000").shape == (
        2,
        8,
        8,
    )  # 2k x 2k


def test_embeddings_package_imports_neither_torch_nor_capture():
    import subprocess
    import sys

    code = (
        "import sys, datavalue.embeddings, datavalue.embeddings._build, datavalue.embeddings._stream; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('datavalue.capture')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_segments_on_a_process_cluster(tmp_path):
    """Worker processes (spawned) read the run from disk and write their segments' rows."""
    distributed = pytest.importorskip("distributed")
    steps = make_steps(3, 17, momentum=0.8)
    path = write_run(tmp_path / "r.zarr", steps)
    want = by_hand(steps, "empirical_fisher")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        build_embeddings(path, segments=4, client=client, progress=False, storage_dtype="float64")
    np.testing.assert_allclose(_values(path, "empirical_fisher"), want, atol=1e-8)


def test_auto_blocks_stay_per_layer_under_a_heavy_sketch():
    from types import SimpleNamespace

    from datavalue.embeddings._plan import _resolve_blocks

    def run(shapes, ks):
        edges = np.cumsum([0, *ks])
        blocks = [{"start": int(a), "stop": int(b), "shape": s} for a, b, s in zip(edges[:-1], edges[1:], shapes)]
        return SimpleNamespace(blocks=blocks, proj_dim=int(edges[-1]), path="r.zarr")

    kw = dict(curvature="fisher", adam=False, momentum_mode=False, dtype="float64")
    light = run([[16, 20], [10, 17]], [100, 70])  # 170 of 490 dims kept (35%): full
    heavy = run([[64, 785], [10, 65]], [121, 120])  # 241 of 50,890 (0.5%): per layer
    assert _resolve_blocks(light, "auto", **kw) == ((0, 170),)
    assert _resolve_blocks(heavy, "auto", **kw) == ((0, 121), (121, 241))
    assert _resolve_blocks(heavy, "full", **kw) == ((0, 241),)  # an explicit choice is kept
    assert _resolve_blocks(light, "auto", **dict(kw, curvature="empirical_fisher")) == ((0, 100), (100, 170))


def test_auto_blocks_under_adam_follow_the_same_kept_fraction_rule():
    """AdamW runs get the same ``blocks="auto"`` rule as SGD (session 11, docs/results/lm.md): on the small AdamW LM
    the full true-Fisher operator was no better than per layer at 1% and 5% of P (mean of three Fisher draws), so a
    sketch keeping under ``AUTO_FULL_KEPT`` stays per layer; a light sketch whose Adam state (``3k`` columns) fits
    ``AUTO_FULL_BYTES`` gets one operator, and one whose state does not fit stays per layer."""
    from types import SimpleNamespace

    from datavalue.embeddings._plan import AUTO_FULL_BYTES, _resolve_blocks

    def run(shapes, ks):
        edges = np.cumsum([0, *ks])
        blocks = [{"start": int(a), "stop": int(b), "shape": s} for a, b, s in zip(edges[:-1], edges[1:], shapes)]
        return SimpleNamespace(blocks=blocks, proj_dim=int(edges[-1]), path="r.zarr")

    kw = dict(curvature="fisher", adam=True, momentum_mode=False, dtype="float64")
    light = run([[16, 20], [10, 17]], [100, 70])  # 35% kept, state (3 x 170)^2 x 8 bytes: full
    lm_1pct = run([[82, 64], [64, 192], [192]], [361, 361, 309])  # 1,031 of 21,824 dims (4.7%): per layer
    assert _resolve_blocks(light, "auto", **kw) == ((0, 170),)
    assert _resolve_blocks(lm_1pct, "auto", **kw) == ((0, 361), (361, 722), (722, 1031))
    wide = run([[1000, 2], [1000, 2]], [1000, 1000])  # half the dims kept; (3 x 2,000)^2 x 8 = 288 MB of Adam state
    assert (3 * 2000) ** 2 * 8 > AUTO_FULL_BYTES >= 2000**2 * 8
    assert _resolve_blocks(wide, "auto", **kw) == ((0, 1000), (1000, 2000))  # over the cap: per layer
    assert _resolve_blocks(wide, "auto", **dict(kw, adam=False)) == ((0, 2000),)  # SGD's k^2 state fits: full
