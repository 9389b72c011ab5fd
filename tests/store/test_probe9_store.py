"""Ninth probe (session 13): the store (P9-01, P9-02, P9-05).

P9-01: the root run id and manifest digest deleted, the digest record removed, and the run id
stripped from the three arrays ``_refuse_dropped_bindings`` asked (grads, sample_id, step_ptr),
while the commit and eight other recorded arrays still carried it: opened as a run written before
run ids, and another run's chunk was read as this run's. P9-02: ``Run.read(name, -5)`` returned no
rows and ``Run.read(name, 0, -1)`` the array's whole allocated length, thousands of rows past the
commit. P9-05: an archive whose one deflated chunk entry unpacked to 1.5 GB (6 MB on disk) made
``open_run`` allocate it.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from datavalue.errors import StoreCorruptError, StoreMismatchError
from datavalue.store import archive_run, open_run
from datavalue.store._schema import CHUNK_DIGESTS_KEY, MANIFEST_DIGEST_KEY, RUN_ID_KEY
from tests._helpers_tiny_run import X, record_tiny_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("p9_store")
    a, b = d / "a.zarr", d / "b.zarr"
    record_tiny_run(a)
    record_tiny_run(b, x=X * 2.0)  # the same shapes, other gradients
    return a, b


def _edit(path: Path, fn) -> None:
    meta = json.loads(path.read_text())
    fn(meta["attributes"])
    path.write_text(json.dumps(meta))


def test_p9_01_a_run_id_left_on_the_commit_and_other_arrays_is_not_a_pre_run_id_run(runs, tmp_path):
    run = tmp_path / "r.zarr"
    shutil.copytree(runs[0], run)
    for name in ("commit/digests.0", "commit/digests.1"):
        (run / name).unlink()
    _edit(run / "zarr.json", lambda a: [a.pop(k) for k in (RUN_ID_KEY, MANIFEST_DIGEST_KEY, CHUNK_DIGESTS_KEY)])
    for name in ("grads", "sample_id", "step_ptr"):  # the arrays the P8-01 check asked
        _edit(run / name / "zarr.json", lambda a: a.pop(RUN_ID_KEY))
    assert RUN_ID_KEY in json.loads((run / "lr" / "zarr.json").read_text())["attributes"]
    shutil.copyfile(runs[1] / "grads" / "c" / "0" / "0", run / "grads" / "c" / "0" / "0")  # another run's rows
    with pytest.raises(StoreCorruptError, match=r"no run id .* recorded arrays carry one .*commit/zarr.json"):
        open_run(run)


def test_p9_01_a_run_written_before_run_ids_still_opens(runs, tmp_path):
    """Every stamp removed (what a run written before run ids looks like): opened, as before."""
    run = tmp_path / "r.zarr"
    shutil.copytree(runs[0], run)
    for name in ("commit/digests.0", "commit/digests.1"):
        (run / name).unlink()
    _edit(run / "zarr.json", lambda a: [a.pop(k) for k in (RUN_ID_KEY, MANIFEST_DIGEST_KEY, CHUNK_DIGESTS_KEY)])
    for meta in run.glob("*/zarr.json"):
        _edit(meta, lambda a: a.pop(RUN_ID_KEY, None))
    assert open_run(run).n_steps == 4


def test_p9_02_read_counts_negative_positions_from_the_commit(runs):
    run = open_run(runs[0])
    allocated = int(run.array("grads").shape[0])
    assert allocated > run.n_rows + 100  # the array runs far past the commit
    everything = run.read("grads")
    assert everything.shape[0] == run.n_rows == 24
    np.testing.assert_array_equal(run.read("grads", -5), everything[-5:])  # was: 0 rows
    np.testing.assert_array_equal(run.read("grads", 0, -1), everything[:-1])  # was: allocated - 1 rows
    np.testing.assert_array_equal(run.read("sample_id", -3, -1), run.sample_id[-3:-1])
    assert run.read("grads", 30, 40).shape == (0, everything.shape[1])
    assert run.read("grads", 10, 5).shape == (0, everything.shape[1])
    np.testing.assert_array_equal(run.read("grads", np.int64(2), np.int64(5)), everything[2:5])


@pytest.mark.parametrize("start", [1.5, True, "2"])
def test_p9_02_read_refuses_a_position_that_is_not_an_int(runs, start):
    with pytest.raises(StoreMismatchError, match="start must be an int"):
        open_run(runs[0]).read("grads", start)  # was: 1.5 a raw TypeError, True read as 1


def _bomb(src: Path, dst: Path, member: str, size: int) -> None:
    """Copy the archive ``src`` to ``dst`` with entry ``member`` replaced by ``size`` zero bytes, deflated."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename != member:
                zout.writestr(info, zin.read(info.filename))
                continue
            zi = zipfile.ZipInfo(member, date_time=info.date_time)
            zi.compress_type = zipfile.ZIP_DEFLATED
            with zout.open(zi, "w", force_zip64=True) as f:
                block = b"\0" * (1 << 22)
                for _ in range(size // len(block)):
                    f.write(block)


@pytest.mark.parametrize("member", ["grads/c/0/0", "commit/digests.0"])
def test_p9_05_an_archive_entry_that_unpacks_past_its_bound_is_refused_before_it_is_read(runs, tmp_path, member,
                                                                                         monkeypatch):
    archive = tmp_path / "a.zip"
    archive_run(runs[0], archive)
    bomb = tmp_path / "bomb.zip"
    _bomb(archive, bomb, member, 96 << 20)  # 96 MiB of zeros in about 100 KiB
    with zipfile.ZipFile(bomb) as z:
        assert z.getinfo(member).compress_size < 1 << 20
    from datavalue.store import _ziparchive

    monkeypatch.setattr(_ziparchive, "MAX_META_ENTRY", 1 << 20, raising=False)  # the bound, small enough for a quick test
    opened = []
    real_open = zipfile.ZipFile.open

    def watch(self, name, *a, **kw):
        opened.append(name if isinstance(name, str) else name.filename)
        return real_open(self, name, *a, **kw)

    monkeypatch.setattr(zipfile.ZipFile, "open", watch)
    with pytest.raises(StoreCorruptError, match=rf"entry {member} of the run archive declares 100,663,296 bytes"):
        open_run(bomb).grads.compute()
    assert member not in opened  # refused from the central directory: nothing of it was read


def test_p9_05_an_intact_archive_reads_as_its_run(runs, tmp_path):
    archive = tmp_path / "a.zip"
    archive_run(runs[0], archive)
    np.testing.assert_array_equal(open_run(archive).grads.compute(), open_run(runs[0]).grads.compute())


# ---------------------------------------------------------------- paths no file system holds (P9-06)
def test_p9_06_a_nul_byte_in_a_run_path_is_a_clear_refusal(runs, tmp_path):
    from datavalue.store._runpath import RunPathError

    with pytest.raises(RunPathError, match="contains a NUL byte"):
        record_tiny_run(tmp_path / "a\x00b.zarr")  # was: raw ValueError: embedded null byte
    with pytest.raises(RunPathError, match="contains a NUL byte"):
        archive_run(runs[0], tmp_path / "x\x00.zip")
    with pytest.raises(RunPathError, match="contains a NUL byte"):
        open_run(str(tmp_path / "a\x00b.zarr"))
    assert list(tmp_path.iterdir()) == []


def test_p9_06_a_name_longer_than_the_file_system_takes_is_a_clear_refusal(runs, tmp_path):
    from datavalue.store._runpath import RunPathError

    long = tmp_path / ("x" * 300 + ".zarr")
    with pytest.raises(RunPathError, match=r"is 305 bytes long; this file system takes at most \d+ bytes per name"):
        record_tiny_run(long)  # was: raw OSError [Errno 36] File name too long
    with pytest.raises(RunPathError, match="bytes per name"):
        open_run(long)
    with pytest.raises(RunPathError, match="bytes per name"):
        archive_run(runs[0], tmp_path / ("y" * 300 + ".zip"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("location", [b"/tmp/r.zarr", 3, None])
def test_p9_06_a_location_that_is_no_path_is_not_called_corrupt(location):
    from datavalue.store._runpath import RunPathError

    with pytest.raises(RunPathError, match="a run (path|location)"):  # was: "cannot open the zarr group" (corrupt)
        open_run(location)


def test_p9_07_a_manifest_that_is_not_an_object_is_a_store_error(runs, tmp_path):
    run = tmp_path / "r.zarr"
    shutil.copytree(runs[0], run)
    _edit(run / "zarr.json", lambda a: a.__setitem__("datavalue", "edited"))
    with pytest.raises(StoreCorruptError, match="run manifest .* is a str"):  # was: raw ValueError from dict()
        open_run(run)


@pytest.mark.parametrize("cut", ["half", "tail", "empty", "garbage"])
def test_p9_10_a_cut_short_archive_is_a_store_error(runs, tmp_path, cut):
    archive = tmp_path / "a.zip"
    archive_run(runs[0], archive)
    raw = archive.read_bytes()
    data = {"half": raw[: len(raw) // 2], "tail": raw[:-10], "empty": b"", "garbage": b"PK\x03\x04" + b"x" * 100}[cut]
    bad = tmp_path / "bad.zip"
    bad.write_bytes(data)
    with pytest.raises(StoreCorruptError, match=r"bad.zip: not a readable run archive .* cut short"):
        open_run(bad)  # was: raw zipfile.BadZipFile ("File is not a zip file"), a traceback in the CLI
    with pytest.raises(StoreCorruptError, match="not a readable run archive"):
        archive_run(bad, tmp_path / "copy.zip")
    assert not (tmp_path / "copy.zip").exists()


# ---------------------------------------------------------------- a lock file naming no process (P9-18)
@pytest.mark.parametrize("pid", [-1, 0, True, "x", None])
def test_p9_18_a_lock_naming_no_process_is_not_called_still_running(runs, tmp_path, pid):
    """pid -1 or 0: ``os.kill(pid, 0)`` signals a process group, which always answers, so the lock was
    "still running" forever; a str pid on this host was called "a lock from another host"."""
    import socket

    from datavalue.errors import StoreLockedError
    from datavalue.store import lock_run

    run = tmp_path / "r.zarr"
    shutil.copytree(runs[0], run)
    (run / "writer.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "2026-01-01"}))
    with pytest.raises(StoreLockedError, match="names no holder that can be checked") as exc, lock_run(run, "probe"):
        pass
    assert "still running" not in str(exc.value) and "another host" not in str(exc.value)
    assert (run / "writer.lock").exists()  # never taken over: a person decides
