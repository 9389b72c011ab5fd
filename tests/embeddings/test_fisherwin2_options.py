"""``fisher_window`` as a first-class build option (issue 19, session 13).

Session 12 added ``build_embeddings(fisher_window=W)`` as a lone keyword: ``BuildConfig`` could not hold it
(so ``config=`` builds could not pool and the stored ``build_config`` did not say it), the CLI had no flag,
``check_build`` planned every build with ``W = 0``, a damaged stored window surfaced as a bare ``ValueError``,
and the rebuild hints of the checks dropped it. And ``"auto"`` (the new default): ``W = 4`` for sampled
Fisher labels under one operator over all columns, else 0, stored as the int it resolved to.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import datavalue
from datavalue.cli import main
from datavalue.embeddings import (
    BuildConfig,
    build_embeddings,
    build_metadata,
    check_build,
    embeddings_at,
    extend_embeddings,
    stored_config,
)
from datavalue.embeddings._metadata import ATTRS_KEY
from datavalue.errors import EmbeddingError, StoreCorruptError
from datavalue.store import open_array, open_array_writable, open_run

from ._synthetic import make_steps, write_run


def _values(path, curvature="fisher"):
    return np.asarray(open_array(path, f"embeddings/{curvature}/values")[:])


@pytest.fixture
def run(tmp_path):
    steps = make_steps(3, 11, fisher=True, momentum=0.5)
    return steps, write_run(tmp_path / "run.zarr", steps, fisher=True)


def _record(path, *, fisher_max_classes, steps=8, seed=0):
    """A 20-class MLP recorded with the real Recorder: sampled labels when ``fisher_max_classes < 20``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 20)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    with datavalue.Recorder(path, model, curvature="fisher", fisher_max_classes=fisher_max_classes,
                            optimizer=opt, storage_dtype="float64") as rec:
        for t in range(steps):
            x = torch.randn(5, 6, generator=g, dtype=torch.float64)
            y = torch.randint(0, 20, (5,), generator=g)
            opt.zero_grad()
            with rec.step(sample_ids=range(5 * t, 5 * t + 5)):
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return path


# ---------------------------------------------------------------------- BuildConfig


def test_config_holds_the_window_and_builds_with_it(run):
    _, path = run
    build_embeddings(path, "fisher", progress=False, fisher_window=2, storage_dtype="float64")
    want = _values(path)
    cfg = BuildConfig(curvature="fisher", fisher_window=2, storage_dtype="float64")
    build_embeddings(path, config=cfg, progress=False, overwrite=True)
    np.testing.assert_array_equal(_values(path), want)
    meta = build_metadata(path, "fisher")
    assert meta["fisher_window"] == 2 and meta["build_config"]["fisher_window"] == 2
    assert stored_config(meta).fisher_window == 2
    assert BuildConfig.from_json(cfg.to_json()) == cfg
    assert "fisher_window" in BuildConfig.help()


def test_config_and_window_keyword_together_are_refused(run):
    _, path = run
    with pytest.raises(EmbeddingError, match=r"pass either config= or the keyword options.*fisher_window"):
        build_embeddings(path, config=BuildConfig(curvature="fisher"), fisher_window=2, progress=False)
    assert not open_run(path).has_array("embeddings/fisher/values")


@pytest.mark.parametrize(("W", "match"), [
    (-2, r"fisher_window must be >= 0.*got -2"),
    (2.0, r"must be an int >= 0.*or 'auto', got 2\.0 \(float\)"),
    ("Auto", r"must be an int >= 0.*or 'auto', got 'Auto' \(str\)"),
    (np.bool_(True), r"must be an int >= 0.*got .*True"),
])
def test_config_refuses_a_bad_window(W, match):
    with pytest.raises(EmbeddingError, match=match):
        BuildConfig(fisher_window=W)


def test_config_of_an_older_build_keeps_its_window():
    """A build_config stored before the field existed reads back as the 0 the build had, not today's 'auto'."""
    old = dataclasses.asdict(BuildConfig(curvature="fisher"))
    del old["fisher_window"]
    assert stored_config({"build_config": old, "curvature": "fisher"}).fisher_window == 0


# ---------------------------------------------------------------------- "auto"


def test_auto_pools_sampled_labels_under_one_operator(tmp_path):
    path = _record(tmp_path / "sampled.zarr", fisher_max_classes=4)
    info = build_embeddings(path, "fisher", progress=False)  # the default: fisher_window="auto", blocks="auto"
    assert len(info.blocks) == 1 and info.fisher_window == 4
    meta = build_metadata(path, "fisher")
    assert meta["fisher_window"] == 4 and meta["build_config"]["fisher_window"] == "auto"
    assert "t-4..t+4 (fisher_window='auto'" in info.choice
    auto = _values(path)
    build_embeddings(path, "fisher", progress=False, overwrite=True, fisher_window=4)
    np.testing.assert_array_equal(_values(path), auto)
    build_embeddings(path, "fisher", progress=False, overwrite=True, fisher_window=0)
    assert not np.allclose(_values(path), auto)
    # per layer: each step's own Fisher
    build_embeddings(path, "fisher", progress=False, overwrite=True, blocks="layer")
    assert build_metadata(path, "fisher")["fisher_window"] == 0


def test_auto_keeps_an_exact_fisher_per_step(tmp_path):
    path = _record(tmp_path / "exact.zarr", fisher_max_classes=32)
    info = build_embeddings(path, "fisher", progress=False)
    assert len(info.blocks) == 1
    assert build_metadata(path, "fisher")["fisher_window"] == 0
    assert "fisher_window='auto' pools sampled Fisher labels" in info.choice


# ---------------------------------------------------------------------- the checks use the stored window


@pytest.mark.parametrize("bad", ["x", -1, 1.5, True])
def test_a_damaged_stored_window_is_named(run, bad):
    _, path = run
    build_embeddings(path, "fisher", progress=False, fisher_window=2, segments=2)
    arr = open_array_writable(path, "embeddings/fisher/values")
    meta = dict(arr.attrs[ATTRS_KEY])
    meta["fisher_window"] = bad
    arr.attrs[ATTRS_KEY] = meta
    # the store's check of the build attributes (P9-11, session 13) or the embeddings' own (whichever reads first)
    damaged = (EmbeddingError, StoreCorruptError)
    with pytest.raises(damaged, match=r"fisher_window.*edited or damaged.*overwrite=True") as e:
        check_build(path, "fisher")
    assert repr(bad) in str(e.value) or str(bad) in str(e.value)
    with pytest.raises(damaged, match=r"fisher_window.*edited or damaged"):
        embeddings_at(path, 3, "fisher", progress=False)
    with pytest.raises(damaged, match=r"fisher_window.*edited or damaged"):
        extend_embeddings(path, "fisher", progress=False)


def test_a_window_on_another_curvature_in_the_metadata_is_named(run):
    _, path = run
    build_embeddings(path, "empirical_fisher", progress=False)
    arr = open_array_writable(path, "embeddings/empirical_fisher/values")
    arr.attrs[ATTRS_KEY] = dict(arr.attrs[ATTRS_KEY], fisher_window=3)
    with pytest.raises(EmbeddingError, match=r"stored fisher_window is 3 on a 'empirical_fisher' build"):
        check_build(path, "empirical_fisher")


def test_check_build_rebuild_hint_keeps_the_window(tmp_path, run):
    steps, path = run
    build_embeddings(path, "fisher", progress=False, fisher_window=2)
    write_run(path, make_steps(4, 2, t0=11, fisher=True, momentum=0.5), fisher=True, mode="resume")
    with pytest.raises(EmbeddingError, match=r"build_embeddings\(.*curvature='fisher', fisher_window=2, overwrite=True\)"):
        check_build(path, "fisher")


def test_check_build_plans_with_the_stored_window(run, monkeypatch):
    """The plan check_build verifies is the one the build was made with (W = 2), not W = 0."""
    from datavalue.embeddings import _check

    _, path = run
    build_embeddings(path, "fisher", progress=False, fisher_window=2)
    seen = []
    real = _check._make_plan

    def spy(*args, **kwargs):
        plan, handling = real(*args, **kwargs)
        seen.append(plan.fisher_window)
        return plan, handling

    monkeypatch.setattr(_check, "_make_plan", spy)
    check_build(path, "fisher")
    assert seen == [2]


# ---------------------------------------------------------------------- the command line


def test_cli_build_takes_the_window_and_info_shows_it(tmp_path, capsys):
    path = _record(tmp_path / "r.zarr", fisher_max_classes=4)
    assert main(["build", str(path), "--curvature", "fisher", "--fisher-window", "3"]) == 0
    assert build_metadata(path, "fisher")["fisher_window"] == 3
    assert "t-3..t+3" in capsys.readouterr().out
    assert main(["info", str(path)]) == 0
    assert "\n    fisher_window: 3\n" in capsys.readouterr().out
    assert main(["build", str(path), "--curvature", "fisher", "--fisher-window", "auto", "--overwrite"]) == 0
    assert build_metadata(path, "fisher")["build_config"]["fisher_window"] == "auto"


def test_cli_refuses_a_bad_window(run, capsys):
    _, path = run
    with pytest.raises(SystemExit) as exc:
        main(["build", str(path), "--fisher-window", "two"])
    assert exc.value.code == 2
    assert "expected an int >= 0 or 'auto', got 'two'" in capsys.readouterr().err
    assert main(["build", str(path), "--curvature", "fisher", "--fisher-window", "-1"]) == 2
    assert "fisher_window must be >= 0" in capsys.readouterr().err
    assert main(["build", str(path), "--curvature", "empirical_fisher", "--fisher-window", "2"]) == 2
    assert "applies to curvature='fisher' only" in capsys.readouterr().err
    assert not open_run(path).has_array("embeddings/fisher/values")
