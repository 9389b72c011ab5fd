"""Issue 22, seventh probe: P7-06 and P7-09 (``/tmp/s11/probe7/REPORT.md``).

P7-06. ``extend_embeddings`` after a resume read a deleted chunk of the finished build's values as
zeros, mapped them, and marked the result complete (every old occurrence scored exactly 0); a byte
flipped in such a chunk gave zarr's raw ``ValueError`` and left the build marked unfinished.
P7-09. ``check_build("run.zarr", c)`` raised ``AttributeError: 'str' object has no attribute
'array'``; ``check_build(run)`` without ``curvature=`` a bare ``ValueError``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from datavalue.embeddings import (
    build_embeddings,
    check_build,
    extend_embeddings,
    require_build_chunks,
)
from datavalue.errors import EmbeddingError, StoreCorruptError
from datavalue.store import open_run

from ._synthetic import by_hand, make_steps, write_run

SETTINGS = {"sgd": dict(), "momentum": dict(momentum=0.9, weight_decay=0.01)}


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256 of its bytes)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _resumed(tmp_path, setting):
    """A run built at 14 steps (chunks of 5 rows), then resumed to 20 steps."""
    steps = make_steps(5, 14, **SETTINGS[setting])
    path = write_run(tmp_path / "r.zarr", steps)
    build_embeddings(path, "empirical_fisher", progress=False, storage_dtype="float64")
    more = make_steps(6, 6, t0=14, **SETTINGS[setting])
    write_run(path, more, mode="resume")
    return path, steps + more


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[5] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("setting", "array"), [("sgd", "values"), ("momentum", "values"), ("momentum", "v_values")])
@pytest.mark.parametrize(("damage", "said"), [
    ("delete", r"chunk embeddings/empirical_fisher/{array}/c/1/0 \(entries 5\.\.9\) is missing"),
    ("flip", r"chunk embeddings/empirical_fisher/{array}/c/1/0 is corrupt \(crc32c checksum mismatch"),
])
def test_p7_06_extend_refuses_a_missing_or_damaged_chunk_and_leaves_the_build_as_it_was(
        tmp_path, setting, array, damage, said):
    path, _ = _resumed(tmp_path, setting)
    base = Path(path) / "embeddings" / "empirical_fisher"
    victim = base / array / "c" / "1" / "0"
    os.remove(victim) if damage == "delete" else _flip(victim)
    before = _tree(base)
    with pytest.raises(StoreCorruptError, match=said.format(array=array)) as err:
        extend_embeddings(path, "empirical_fisher", progress=False)
    assert "extend_embeddings" in str(err.value)
    assert "build_embeddings(" in str(err.value) and "overwrite=True" in str(err.value)
    assert _tree(base) == before  # nothing written: still the finished 14-step build


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_p7_06_an_intact_build_still_extends_to_the_rebuild(tmp_path, setting):
    path, steps = _resumed(tmp_path, setting)
    info = extend_embeddings(path, "empirical_fisher", progress=False)
    assert info.n_steps == 20
    got = np.asarray(open_run(path).array("embeddings/empirical_fisher/values")[:])
    np.testing.assert_allclose(got, by_hand(steps, "empirical_fisher"), rtol=0, atol=1e-8)


@pytest.fixture()
def built(tmp_path):
    path = write_run(tmp_path / "r.zarr", make_steps(3, 6))
    build_embeddings(path, "empirical_fisher", progress=False)
    return path


@pytest.mark.parametrize("how", ["str", "Path", "Run"])
def test_p7_09_check_build_takes_a_path_or_a_run(built, how):
    run = {"str": str(built), "Path": Path(built), "Run": open_run(built)}[how]
    meta = check_build(run, "empirical_fisher")
    assert meta["n_steps"] == 6 and meta["complete"]
    assert check_build(run) == meta  # the run's only build
    require_build_chunks(run)  # the presence check alone takes the same arguments


def test_p7_09_check_build_without_a_curvature_names_the_builds(built):
    import zarr

    zarr.open_group(str(built), mode="a").require_group("embeddings/hessian")  # no values: not a build
    assert check_build(built)["curvature"] == "empirical_fisher"
    import shutil

    shutil.copytree(Path(built) / "embeddings" / "empirical_fisher", Path(built) / "embeddings" / "fisher")
    for fn in (check_build, require_build_chunks):
        with pytest.raises(EmbeddingError, match=r"holds 2 builds \('empirical_fisher', 'fisher'\): pass curvature="):
            fn(built)


def test_p7_09_check_build_of_a_run_without_builds(tmp_path):
    path = write_run(tmp_path / "r.zarr", make_steps(3, 4))
    for fn in (check_build, require_build_chunks):
        with pytest.raises(EmbeddingError, match=r"holds no embedding build: build one with "
                                                 r"datavalue.build_embeddings\("):
            fn(path)
    with pytest.raises(EmbeddingError, match=r"has no build 'fisher' \(it holds none\)"):
        check_build(path, "fisher")
