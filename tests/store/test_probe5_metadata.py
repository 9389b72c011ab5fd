"""Fifth probe (issue 22): an array's ``zarr.json`` must describe its chunks as datavalue wrote them
(P5-02, P5-03); a run path that cannot be created (P5-30); a damaged run archive (P5-08).

Every edit below keeps each chunk's crc32c valid (the chunk bytes are unchanged): before the checks
the run opened and read as zeros (separator) or as other numbers (byte order, same-width dtype).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from datavalue.errors import StoreCorruptError, StoreError, StoreExistsError
from datavalue.store import (
    RunWriter,
    StepBlock,
    archive_run,
    create_array,
    open_array,
    open_array_writable,
    open_run,
)

K = 3


def _write(path: Path, steps: int = 3, *, storage_dtype: str = "float32") -> Path:
    w = RunWriter(path, {"projection": {"blocks": []}}, k=K, chunk_rows=4, storage_dtype=storage_dtype, background=False)
    rng = np.random.default_rng(0)
    for t in range(steps):
        w.submit(StepBlock(step=t, sample_id=np.arange(5) + 5 * t, weight=np.full(5, 0.2),
                           grads=rng.standard_normal((5, K)) + 1.0, flags=np.zeros(5, np.uint8), lr=0.1))
    w.close()
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = _write(tmp_path_factory.mktemp("p5") / "base.zarr")
    arr = create_array(path, "embeddings/fisher/values", shape=(15, K), dtype="float32", chunks=(4, K),
                       attrs={"datavalue_embeddings": {"storage_dtype": "float32"}})
    arr[:] = np.arange(15 * K, dtype=np.float32).reshape(15, K) + 1
    inf = create_array(path, "influence/fisher/values", shape=(15, K), dtype="float32", chunks=(4, K))
    inf[:] = 1.0
    return path


@pytest.fixture()
def run(base, tmp_path) -> Path:
    path = tmp_path / "r.zarr"
    shutil.copytree(base, path)
    return path


def _edit(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _sep(d):
    d["chunk_key_encoding"]["configuration"]["separator"] = "."


def _big(d):
    d["codecs"][0]["configuration"]["endian"] = "big"


def _dtype(new):
    return lambda d: d.update(data_type=new)


def _no_crc(d):
    d["codecs"] = d["codecs"][:1]


def _fill(d):
    d["fill_value"] = 1.0


RECORDED_EDITS = [
    ("grads", _sep, "separator '.', expected 'default' with separator '/'"),  # P5-02: read as zeros before
    ("grads", _big, "endian 'big', expected 'little'"),
    ("grads", _dtype("int32"), "data_type 'int32', expected 'float32'"),
    ("grads", _no_crc, r"codecs \['bytes'\], expected \['bytes', 'crc32c'\]"),
    ("grads", _fill, "fill_value 1.0, expected 0.0"),
    ("lr", _big, "endian 'big'"),
    ("lr", _dtype("int64"), "data_type 'int64', expected 'float64'"),
    ("weight", _big, "endian 'big'"),
    ("weight", _dtype("uint64"), "data_type 'uint64', expected 'float64'"),
    ("sample_id", _dtype("float64"), "data_type 'float64', expected 'int64'"),
    ("sample_id", _sep, "separator '.'"),
    ("step_ptr", _big, "endian 'big'"),
    ("flags", _dtype("int8"), "data_type 'int8', expected 'uint8'"),
    ("commit", _sep, "separator '.'"),  # read as fill: a run of 0 steps, which resume=True would overwrite
    ("commit", _dtype("float64"), "data_type 'float64', expected 'int64'"),
]


@pytest.mark.parametrize("name,edit,says", RECORDED_EDITS, ids=[f"{n}-{e.__name__}-{i}" for i, (n, e, _) in enumerate(RECORDED_EDITS)])
def test_open_run_refuses_edited_array_metadata(run, name, edit, says):
    assert open_run(run).n_steps == 3  # the copy opens before the edit
    _edit(run / name / "zarr.json", edit)
    with pytest.raises(StoreCorruptError, match=f"{name}/zarr.json does not describe the array") as err:
        open_run(run)
    assert err.match(says) and err.match("Restore the run")
    # a resume appends through the same metadata: refused too, nothing written
    with pytest.raises(StoreCorruptError, match=f"{name}/zarr.json"):
        RunWriter(run, {"projection": {"blocks": []}}, k=K, mode="resume", storage_dtype="float32", background=False)


def test_unedited_runs_open_and_read_the_same(base):
    """The checks accept what the writer writes: every dtype of storage, Fisher rows, optional arrays."""
    run = open_run(base)
    np.testing.assert_array_equal(np.asarray(run.array("grads")[: run.n_rows]), run.read("grads"))
    assert run.read("grads").any() and run.n_steps == 3


@pytest.mark.parametrize("storage_dtype", ["float16", "float32", "float64"])
def test_every_storage_dtype_and_optional_arrays_pass(tmp_path, storage_dtype):
    path = tmp_path / "r.zarr"
    w = RunWriter(path, {"projection": {"blocks": []}}, k=K, chunk_rows=4, storage_dtype=storage_dtype,
                  background=False, fisher=True)
    for t in range(2):
        w.submit(StepBlock(step=t, sample_id=np.arange(2) + 2 * t, weight=np.full(2, 0.5), grads=np.ones((2, K)),
                           flags=np.zeros(2, np.uint8), lr=0.1, fisher=np.ones((1, K)),
                           extra={"adam_m": np.ones(K), "adam_v": np.ones(K), "adam_step": 1.0,
                                  "group_lr": np.array([0.1, 0.2]), "group_momentum": np.zeros(2),
                                  "group_weight_decay": np.zeros(2)}))
    w.close()
    run = open_run(path)
    for name in ("grads", "fisher", "adam_m", "adam_v", "adam_step", "group_lr", "fisher_ptr"):
        assert run.array(name).shape[0] >= 2
    assert run.has_adam_state and run.has_param_groups


def test_optional_array_fill_value_is_checked(tmp_path):
    path = tmp_path / "r.zarr"
    w = RunWriter(path, {"projection": {"blocks": []}}, k=K, chunk_rows=4, background=False)
    w.submit(StepBlock(step=0, sample_id=np.arange(2), weight=np.full(2, 0.5), grads=np.ones((2, K)),
                       flags=np.zeros(2, np.uint8), lr=0.1, extra={"adam_step": 1.0}))
    w.close()
    _edit(path / "adam_step" / "zarr.json", lambda d: d.update(fill_value=0.0))
    with pytest.raises(StoreCorruptError, match="adam_step/zarr.json .*fill_value 0.0, expected nan"):
        open_run(path)


DERIVED_EDITS = [
    ("embeddings/fisher/values", _big, "endian 'big'"),  # read as ~1e38 before
    ("embeddings/fisher/values", _dtype("int32"), "data_type 'int32', expected 'float32'"),
    ("embeddings/fisher/values", _sep, "separator '.'"),
    ("influence/fisher/values", _dtype("int32"), "data_type 'int32', expected 'float32'"),
    ("influence/fisher/values", _big, "endian 'big'"),
]


@pytest.mark.parametrize("name,edit,says", DERIVED_EDITS, ids=[f"{i}" for i in range(len(DERIVED_EDITS))])
def test_derived_arrays_are_checked_where_opened(run, name, edit, says):
    _edit(run / name / "zarr.json", edit)
    r = open_run(run)  # the run itself is intact
    for opener in (lambda: r.array(name), lambda: open_array(run, name), lambda: open_array_writable(run, name)):
        with pytest.raises(StoreCorruptError, match=f"{name}/zarr.json does not describe") as err:
            opener()
        assert err.match(says) and err.match("rebuild the array with overwrite=True")


# ----------------------------------------------------------------------------- P5-30: run paths
def _writer(path, **kw):
    return RunWriter(path, {"projection": {"blocks": []}}, k=K, chunk_rows=4, background=False, **kw)


def test_run_under_a_regular_file_is_one_clear_refusal(tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    with pytest.raises(StoreError, match=r"cannot create the run at .*afile.txt/x.zarr: .*afile.txt is a regular "
                                         "file, so nothing can be created under it") as err:
        _writer(afile / "x.zarr")
    assert isinstance(err.value, OSError)  # what was raised before (NotADirectoryError) is still caught
    assert afile.read_text() == "x"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_run_in_proc_is_one_clear_refusal():
    with pytest.raises(StoreError, match="cannot create the run at /proc/x.zarr: the system refused to create it in /proc"):
        _writer(Path("/proc/x.zarr"))


def test_existing_non_run_does_not_suggest_resume(tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    with pytest.raises(StoreExistsError, match="already exists and is a regular file, not a datavalue run") as err:
        _writer(afile)
    assert "resume=True" not in str(err.value)
    run = _write(tmp_path / "r.zarr")  # a run: resume=True is the advice
    with pytest.raises(StoreExistsError, match="Pass resume=True"):
        _writer(run)


def test_archive_path_that_cannot_be_created(base, tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    with pytest.raises(StoreError, match=r"cannot create the archive at .*afile.txt/a.zip: .*is a regular file") as err:
        archive_run(base, afile / "a.zip")
    assert isinstance(err.value, OSError)
    if Path("/proc/self").is_dir():
        with pytest.raises(StoreError, match="cannot create the archive at /proc/a.zip") as err:
            archive_run(base, "/proc/a.zip")
        assert ".partial" not in str(err.value)  # never the internal temporary's name
    out = archive_run(base, tmp_path / "new" / "dir" / "a.zip")  # missing directories are created
    assert open_run(out).n_steps == 3


# ----------------------------------------------------------------------------- P5-08: damaged archives
@pytest.fixture()
def archive(base, tmp_path) -> Path:
    return archive_run(base, tmp_path / "r.zip")


def _data_offset(z: Path, name: str) -> int:
    """Where entry ``name``'s stored bytes start (its local header's own name and extra lengths)."""
    with zipfile.ZipFile(z) as zf:
        off = zf.getinfo(name).header_offset
    head = z.read_bytes()[off : off + 30]
    return off + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")


def test_healthy_archive_reads_like_the_directory(base, archive):
    np.testing.assert_array_equal(np.asarray(open_array(archive, "grads")[:15]), open_run(base).read("grads"))
    np.testing.assert_array_equal(np.asarray(open_array(archive, "embeddings/fisher/values")[:]),
                                  np.asarray(open_array(base, "embeddings/fisher/values")[:]))


@pytest.mark.parametrize("name", ["grads/c/0/0", "embeddings/fisher/values/c/1/0"])
def test_flipped_byte_in_an_archive_is_store_corrupt(archive, name):
    """A transfer error: the zip's own CRC-32 fails (raw zipfile.BadZipFile before)."""
    raw = bytearray(archive.read_bytes())
    raw[_data_offset(archive, name) + 5] ^= 0x40
    archive.write_bytes(bytes(raw))
    array = name.split("/c/")[0]
    with pytest.raises(StoreCorruptError, match=f"entry {name} of the run archive is damaged .*Restore the archive"):
        np.asarray(open_array(archive, array)[:])


def test_chunk_failing_its_crc32c_in_an_archive_is_store_corrupt(archive, tmp_path):
    """The zip's CRC-32 recomputed over edited chunk bytes: the chunk's own crc32c fails (zarr's raw
    ValueError 'Stored and computed checksum do not match' before)."""
    edited = tmp_path / "edited.zip"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(edited, "w") as dst:
        for info in src.infolist():
            data = bytearray(src.read(info))
            if info.filename == "grads/c/0/0":
                data[5] ^= 0x40
            dst.writestr(info.filename, bytes(data))
    with pytest.raises(StoreCorruptError, match="chunk grads/c/0/0 of the run archive is corrupt \\(crc32c"):
        np.asarray(open_array(edited, "grads")[:])


def test_archive_with_duplicate_entries_is_refused_on_open(archive):
    import warnings

    with warnings.catch_warnings(), zipfile.ZipFile(archive, "a") as zf:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name
        zf.writestr("grads/c/0/0", b"\x00" * 16)
    with pytest.raises(StoreCorruptError, match=r"holds 1 entry twice \('grads/c/0/0'\).*Restore the archive"):
        open_run(archive)
