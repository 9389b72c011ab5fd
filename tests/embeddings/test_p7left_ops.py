"""Seventh probe leftovers (issue 22): the stored transfer operators (``embeddings/<c>/ops/block<l>``)
were read with plain zarr by ``embeddings_at`` and ``extend_embeddings``: a deleted chunk read as a zero
operator (silently wrong embeddings), a flipped byte raised zarr's bare ``ValueError``; and
``extend_embeddings``' pre-write check (P7-06) did not cover them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from datavalue.embeddings import build_embeddings, embeddings_at, extend_embeddings
from datavalue.errors import StoreCorruptError

from ._synthetic import make_steps, write_run

OPS = "embeddings/empirical_fisher/ops/block000"


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _damage(path: Path, how: str) -> None:
    chunk = path / OPS / "c" / "0" / "0" / "0"
    if how == "delete":
        chunk.unlink()
    else:
        data = bytearray(chunk.read_bytes())
        data[5] ^= 1
        chunk.write_bytes(bytes(data))


SAID = {"delete": rf"chunk {OPS}/c/0/0/0 .*is missing", "flip": rf"chunk {OPS}/c/0/0/0 is corrupt"}


@pytest.mark.parametrize("how", ["delete", "flip"])
def test_embeddings_at_refuses_a_missing_or_damaged_operator_chunk(tmp_path, how):
    path = write_run(tmp_path / "r.zarr", make_steps(5, 14))
    build_embeddings(path, "empirical_fisher", segments=2, progress=False, storage_dtype="float64")
    assert (path / OPS).is_dir()
    _damage(path, how)
    with pytest.raises(StoreCorruptError, match=SAID[how]) as err:
        embeddings_at(path, 10, "empirical_fisher", progress=False)
    assert "overwrite=True" in str(err.value)


@pytest.mark.parametrize("how", ["delete", "flip"])
def test_extend_refuses_a_missing_or_damaged_operator_chunk_before_writing(tmp_path, how):
    path = write_run(tmp_path / "r.zarr", make_steps(5, 14))
    build_embeddings(path, "empirical_fisher", segments=2, progress=False, storage_dtype="float64")
    write_run(path, make_steps(6, 6, t0=14), mode="resume")
    _damage(path, how)
    before = _tree(path / "embeddings")
    with pytest.raises(StoreCorruptError, match=SAID[how]):
        extend_embeddings(path, "empirical_fisher", progress=False)
    assert _tree(path / "embeddings") == before  # nothing was written
