"""The build's defaults: ``blocks="auto"`` unless asked otherwise, its fallback to per-layer operators
when one operator over all columns would not fit, and the stated choice (INFO log, metadata,
``BuildInfo.choice``); extensions keep the stored build's blocks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zarr

from datavalue.embeddings import _plan, build_embeddings, build_metadata, extend_embeddings
from datavalue.errors import EmbeddingError
from datavalue.store import open_array

from ._synthetic import BLOCKS, FULL, K, by_hand, make_steps, write_run

LOGGER = "datavalue.embeddings._build"


def _values(path, curvature):
    return np.asarray(open_array(path, f"embeddings/{curvature}/values")[:])


def _spans(info):
    return [tuple(b) for b in info.blocks]


@pytest.fixture
def fisher_run(tmp_path):
    steps = make_steps(5, 9, fisher=True)
    return write_run(tmp_path / "r.zarr", steps, fisher=True), steps


@pytest.mark.parametrize("curvature", ["fisher", "empirical_fisher", "none"])
def test_a_build_without_blocks_equals_an_explicit_auto_build(fisher_run, curvature):
    path, steps = fisher_run
    default = build_embeddings(path, curvature, progress=False, storage_dtype="float64")
    got = _values(path, curvature)
    meta = build_metadata(path, curvature)
    explicit = build_embeddings(path, curvature, blocks="auto", overwrite=True, progress=False, storage_dtype="float64")
    np.testing.assert_array_equal(_values(path, curvature), got)
    assert default.blocks == explicit.blocks and default.choice == explicit.choice
    assert meta["block_mode"] == "auto" and meta["choice"]["block_mode"] == "auto"
    # what auto picks on this small run: one operator for the true Fisher, the layers otherwise
    want = FULL if curvature == "fisher" else BLOCKS
    assert _spans(default) == want
    np.testing.assert_allclose(got, by_hand(steps, curvature, blocks=want), rtol=0, atol=1e-12)


def test_auto_falls_back_to_layers_above_the_memory_cap_and_logs_it(fisher_run, monkeypatch, caplog):
    path, steps = fisher_run
    full_bytes = K * K * 8  # one float64 operator over all 7 columns
    layer_bytes = sum((b - a) ** 2 for a, b in BLOCKS) * 8
    monkeypatch.setattr(_plan, "AUTO_FULL_BYTES", full_bytes - 1)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        info = build_embeddings(path, "fisher", progress=False, storage_dtype="float64")
    assert _spans(info) == BLOCKS
    np.testing.assert_allclose(_values(path, "fisher"), by_hand(steps, "fisher", blocks=BLOCKS), rtol=0, atol=1e-12)
    (msg,) = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]
    assert "blocks: auto -> 2 operators of 4 / 3 columns" in msg
    assert f"one operator over all 7 columns would take {full_bytes} B, over the {full_bytes - 1} B cap" in msg
    choice = build_metadata(path, "fisher")["choice"]
    assert choice["operator_bytes"] == layer_bytes and "over the" in choice["blocks_reason"]
    assert choice["summary"] == info.choice and choice["summary"] in msg
    # at the cap it fits
    monkeypatch.setattr(_plan, "AUTO_FULL_BYTES", full_bytes)
    assert _spans(build_embeddings(path, "fisher", progress=False, overwrite=True)) == FULL


def test_the_memory_estimate_counts_the_momentum_state(tmp_path, monkeypatch):
    """With momentum the state is (2k)^2: an operator that fits without momentum may not with it."""
    path = write_run(tmp_path / "m.zarr", make_steps(6, 5, fisher=True, momentum=0.9), fisher=True)
    monkeypatch.setattr(_plan, "AUTO_FULL_BYTES", (2 * K) ** 2 * 8 - 1)
    info = build_embeddings(path, "fisher", progress=False)
    assert _spans(info) == BLOCKS
    assert build_metadata(path, "fisher")["choice"]["operator_bytes"] == sum((2 * (b - a)) ** 2 for a, b in BLOCKS) * 8


def test_the_build_states_its_curvature_and_why(tmp_path, fisher_run, caplog):
    path, _ = fisher_run
    with caplog.at_level(logging.INFO, logger=LOGGER):
        info = build_embeddings(path, progress=False)
    assert info.curvature == "fisher"
    assert info.choice.startswith("curvature: fisher (recorded; preferred over empirical_fisher), blocks: auto -> ")
    assert "1 operator over 7 columns" in info.choice and "cross-layer curvature" in info.choice
    assert any(info.choice in r.getMessage() for r in caplog.records if r.name == LOGGER)
    info = build_embeddings(path, "empirical_fisher", progress=False)
    assert info.choice.startswith("curvature: empirical_fisher (requested), blocks: auto -> 2 operators of 4 / 3")
    assert "measured better per layer" in info.choice
    info = build_embeddings(path, "fisher", blocks="layer", progress=False, overwrite=True)
    assert "blocks: layer -> 2 operators of 4 / 3 columns" in info.choice and "requested" in info.choice
    plain = write_run(tmp_path / "plain.zarr", make_steps(7, 4))
    info = build_embeddings(plain, progress=False)
    assert info.curvature == "empirical_fisher" and "Recorder(..., curvature='fisher')" in info.choice
    meta = build_metadata(plain)
    assert meta["choice"]["curvature_reason"].startswith("the run holds no true-Fisher rows")
    with pytest.raises(EmbeddingError, match="no 'fisher' build"):
        build_metadata(plain, "fisher")


def test_extending_a_per_layer_build_keeps_its_layers(tmp_path):
    """Never a mix: a per-layer build (explicit, or made before builds stored their blocks) is
    extended per layer although the default, "auto", would take one operator for this run."""
    steps, more = make_steps(8, 8, fisher=True), make_steps(9, 5, t0=8, fisher=True)
    for old_format in (False, True):
        path = write_run(tmp_path / f"r{old_format}.zarr", steps, fisher=True)
        build_embeddings(path, "fisher", blocks="layer", progress=False, storage_dtype="float64")
        if old_format:  # a build from before "blocks"/"choice" were stored
            arr = zarr.open_array(str(path / "embeddings/fisher/values"), mode="r+", zarr_format=3)
            meta = dict(arr.attrs["datavalue_embeddings"])
            for key in ("blocks", "block_mode", "choice"):
                meta.pop(key)
            arr.attrs["datavalue_embeddings"] = meta
            assert "built before the choice was recorded" in build_metadata(path, "fisher")["choice"]["summary"]
        write_run(path, more, mode="resume", fisher=True)
        info = extend_embeddings(path, "fisher", progress=False)
        assert _spans(info) == BLOCKS
        np.testing.assert_allclose(
            _values(path, "fisher"), by_hand(steps + more, "fisher", blocks=BLOCKS), rtol=0, atol=1e-10
        )
        # and a rebuild takes the default again
        assert _spans(build_embeddings(path, "fisher", progress=False, overwrite=True)) == FULL
