"""Sixth probe (issue 22): the royalties CLI and a keyed ledger's key (P6-04); archives of a run a
recorder is writing (P6-02).

Each test failed before its fix: ``datavalue royalties`` had no way to take a keyed ledger's key and
wrote a report from a ledger whose last row had been removed and its head re-anchored without the
key (paid 20.00 of 30.00, exit 0, one log line); ``archive_run`` of a live run listed the files
before it read the commit and packed tail chunks rewritten after it, so about half the archives
did not open ("chunk ... is missing", "... is not this run's"), exit 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

import datavalue
from datavalue import shapley
from datavalue.cli import main
from datavalue.errors import StoreCorruptError, StoreError
from datavalue.store import _archive

KEY = b"secret-key-in-a-vault"
PERIOD = "2025-01-01:2025-02-01"


# ------------------------------------------------------------------ P6-04: the ledger key in the CLI
@pytest.fixture(autouse=True)
def _no_key_in_env(monkeypatch):
    monkeypatch.delenv("DATAVALUE_LEDGER_KEY", raising=False)


def _keyed_ledger(path: Path) -> Path:
    led = shapley.RoyaltyLedger(path, key=KEY)
    for i, (a, b) in enumerate([(0.7, 0.3), (0.5, 0.5), (0.2, 0.8)]):
        led.record(output_id=f"o{i}", prompt="p", revenue=Decimal("10.00"), owners=["ann", "bob"], content=f"c{i}",
                   result=[a, b], timestamp=f"2025-01-1{i}")  # fmt: skip
    led.close()
    return path


def _tamper(path: Path) -> None:
    """What someone without the key can do: drop the last row and re-anchor the head (the repro)."""
    lines = path.read_text().splitlines(True)
    path.write_text("".join(lines[:-1]))
    shapley.RoyaltyLedger.reanchor(path)


def _royalties(*args: str) -> int:
    return main(["royalties", *args])


def test_keyed_ledger_without_key_is_refused(tmp_path, capsys):
    led = _keyed_ledger(tmp_path / "l.jsonl")
    out = tmp_path / "r.json"
    assert _royalties(str(led), "--period", PERIOD, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "is a keyed ledger" in err and "--key-file" in err and "DATAVALUE_LEDGER_KEY" in err and "--unverified" in err
    assert not out.exists()


@pytest.mark.parametrize("newline", [b"", b"\n", b"\r\n"])
def test_key_file_checks_the_macs(tmp_path, capsys, newline):
    led = _keyed_ledger(tmp_path / "l.jsonl")
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + newline)  # `echo secret > key` ends it with a newline: removed
    out = tmp_path / "r.json"
    assert _royalties(str(led), "--period", PERIOD, "--out", str(out), "--key-file", str(key_file)) == 0
    assert json.loads(out.read_text())["paid_total"] == "30.00"
    assert "MACs not checked" not in capsys.readouterr().out


def test_key_from_the_environment(tmp_path, monkeypatch, caplog):
    led = _keyed_ledger(tmp_path / "l.jsonl")
    monkeypatch.setenv("DATAVALUE_LEDGER_KEY", KEY.decode())
    out = tmp_path / "r.json"
    with caplog.at_level("WARNING"):
        assert _royalties(str(led), "--period", PERIOD, "--out", str(out)) == 0
    assert json.loads(out.read_text())["paid_total"] == "30.00"
    assert "MACs not checked" not in caplog.text  # before the fix: the variable was ignored, the ledger read unkeyed


def test_tampered_keyed_ledger_gives_a_nonzero_exit(tmp_path, capsys, monkeypatch):
    """The repro: last row removed, head re-anchored without the key. With the key: the MAC check
    refuses it; without: the keyed ledger is refused; only --unverified writes (and says so)."""
    led = _keyed_ledger(tmp_path / "l.jsonl")
    _tamper(led)
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    out = tmp_path / "r.json"
    capsys.readouterr()
    assert _royalties(str(led), "--period", PERIOD, "--out", str(out), "--key-file", str(key_file)) == 2
    err = capsys.readouterr().err
    assert "no MAC for this key" in err and f"--key-file {key_file}" in err
    monkeypatch.setenv("DATAVALUE_LEDGER_KEY", KEY.decode())
    assert _royalties(str(led), "--period", PERIOD, "--out", str(out)) == 2
    assert "the environment variable DATAVALUE_LEDGER_KEY" in capsys.readouterr().err
    monkeypatch.delenv("DATAVALUE_LEDGER_KEY")
    assert _royalties(str(led), "--period", PERIOD, "--out", str(out)) == 2
    assert not out.exists()
    assert _royalties(str(led), "--period", PERIOD, "--out", str(out), "--unverified") == 0
    got = capsys.readouterr()
    assert "MACs not checked" in got.out and "--unverified" in got.err
    assert json.loads(out.read_text())["paid_total"] == "20.00"  # what the tampered file says, flagged


def test_key_options_refuse_what_cannot_be_a_key(tmp_path, capsys, monkeypatch):
    led = _keyed_ledger(tmp_path / "l.jsonl")
    out = tmp_path / "r.json"
    args = [str(led), "--period", PERIOD, "--out", str(out)]
    assert _royalties(*args, "--key-file", str(tmp_path / "missing")) == 2
    assert "cannot read --key-file" in capsys.readouterr().err
    (tmp_path / "empty").write_bytes(b"\n")
    assert _royalties(*args, "--key-file", str(tmp_path / "empty")) == 2
    assert "is empty" in capsys.readouterr().err
    monkeypatch.setenv("DATAVALUE_LEDGER_KEY", "")
    assert _royalties(*args) == 2
    assert "set but empty" in capsys.readouterr().err
    monkeypatch.setenv("DATAVALUE_LEDGER_KEY", "wrong key")
    assert _royalties(*args) == 2
    assert "MAC" in capsys.readouterr().err
    # a key for an unkeyed ledger: refused (the API's rule), naming where the key came from
    plain = shapley.RoyaltyLedger(tmp_path / "plain.jsonl")
    plain.close()
    assert _royalties(str(tmp_path / "plain.jsonl"), "--period", PERIOD, "--out", str(out)) == 2
    assert "created without a key" in capsys.readouterr().err
    monkeypatch.delenv("DATAVALUE_LEDGER_KEY")
    assert _royalties(str(tmp_path / "plain.jsonl"), "--period", PERIOD, "--out", str(out)) == 0  # unkeyed: as before
    assert not out.with_name("-").exists()


def test_ledger_keyed_property(tmp_path):
    assert shapley.RoyaltyLedger(_keyed_ledger(tmp_path / "k.jsonl"), key=KEY).keyed
    assert not shapley.RoyaltyLedger(tmp_path / "u.jsonl").keyed


# ------------------------------------------------------------------ P6-02: archives of a live run
_CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    import torch.nn.functional as F
    import datavalue
    torch.set_num_threads(1)
    path, steps, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    X, Y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    rec = datavalue.Recorder(path, m, proj_dim=32, optimizer=opt, commit_every=1, chunk_rows=16)
    g = torch.Generator().manual_seed(0)
    for t in range(steps):
        if os.path.exists(stop):  # the test has its archives
            break
        ids = torch.randperm(len(X), generator=g)[:6]  # 6 rows a step: every commit rewrites a tail chunk
        with rec.step(sample_ids=ids):
            F.cross_entropy(m(X[ids]), Y[ids]).backward()
        opt.step(); opt.zero_grad()
        time.sleep(0.005)
    rec.close()
""")


def test_archives_of_a_live_run_open_as_its_committed_prefix(tmp_path):
    """A recorder in another process commits every step (6 rows, chunks of 16: every commit rewrites
    the tail chunks) while the run is archived again and again (archive_run and the CLI in turn).
    Before the fix about half the archives did not open (probe: 8 of 16); 12 archives all opening by
    luck had probability about 2**-12. Every archive taken must now open and equal the run's prefix."""
    run = tmp_path / "live.zarr"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(datavalue.__file__).parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}
    stop = tmp_path / "stop"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(run), "3000", str(stop)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run / "commit" / "c" / "0").exists():
            assert child.poll() is None, "the recorder process died"
            assert time.monotonic() < deadline, "the recorder did not start"
            time.sleep(0.05)
        time.sleep(0.5)
        archives, refused = [], []
        while child.poll() is None and len(archives) < 12:
            out = tmp_path / f"a{len(archives)}.zip"
            try:
                if len(archives) % 2:
                    assert main(["archive", str(run), str(out)]) == 0
                else:
                    datavalue.store.archive_run(run, out)
            except StoreError as exc:  # the run moved under every snapshot: refused, nothing written
                assert "changed under each of" in str(exc) and not out.exists()
                refused.append(exc)
                continue
            archives.append(out)
    finally:
        stop.touch()
        child.wait(timeout=300)
    assert child.returncode == 0
    assert len(archives) >= 6, (len(archives), refused)  # a test that took no archive of a live run proves nothing
    full = datavalue.open_run(run)
    grads, sid, ptr = np.asarray(full.grads), full.sample_id, full.step_ptr
    moved = 0
    for z in archives:
        rz = datavalue.open_run(z)  # before the fix: StoreCorruptError for about half of them
        assert 0 < rz.n_rows <= full.n_rows
        moved += rz.n_rows < full.n_rows
        np.testing.assert_array_equal(np.asarray(rz.grads), grads[: rz.n_rows])
        np.testing.assert_array_equal(rz.sample_id, sid[: rz.n_rows])
        np.testing.assert_array_equal(rz.step_ptr, ptr[: rz.n_steps + 1])
        names = zipfile.ZipFile(z).namelist()
        assert "writer.lock" not in names and not any(n.endswith(".partial") for n in names)
    assert moved >= 6  # taken while the run grew, not after it was closed


def _closed_run(path: Path) -> Path:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with datavalue.Recorder(path, m, proj_dim=None, chunk_rows=4, optimizer=opt) as rec:
        for t in range(3):
            x = torch.randn(3, 4)
            with rec.step(sample_ids=[3 * t, 3 * t + 1, 3 * t + 2]):
                torch.nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 0])).backward()
            opt.step()
            opt.zero_grad()
    return path


def test_archive_leaves_out_chunks_past_the_commit(tmp_path):
    """Rows past the commit (a recorder between its data and its commit) are no reader's data: the
    archive holds only the chunks the commit covers (9 rows in chunks of 4: chunks 0..2)."""
    run = _closed_run(tmp_path / "r.zarr")
    stray = run / "grads" / "c" / "3" / "0"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes((run / "grads" / "c" / "2" / "0").read_bytes())
    out = datavalue.store.archive_run(run, tmp_path / "a.zip")
    names = set(zipfile.ZipFile(out).namelist())
    assert {"grads/c/0/0", "grads/c/1/0", "grads/c/2/0", "commit/c/0"} <= names
    assert "grads/c/3/0" not in names
    assert datavalue.open_run(out).n_rows == 9


def test_archive_refuses_a_run_that_keeps_moving(tmp_path, monkeypatch):
    """Every snapshot fails its check and the run's commit moved each time: refused after
    ATTEMPTS snapshots, with the way out; nothing is written, no temporary is left."""
    run = _closed_run(tmp_path / "r.zarr")
    calls = iter(range(10**6))
    real = _archive._read_pair

    def moving(src):
        commit, records = real(src)
        return (commit + bytes([next(calls) % 256]), records)  # a new pair at every read

    def failing(src, snap):
        raise StoreCorruptError("chunk grads/c/2/0 is not this run's")

    monkeypatch.setattr(_archive, "_read_pair", moving)
    monkeypatch.setattr(_archive, "_verify", failing)
    monkeypatch.setattr(_archive, "ATTEMPTS", 3)
    out = tmp_path / "a.zip"
    with pytest.raises(StoreError, match="changed under each of 3 snapshots") as info:
        datavalue.store.archive_run(run, out)
    assert "rec.close()" in str(info.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_archive_that_does_not_open_although_the_run_stood_still(tmp_path, monkeypatch):
    """A packed archive that fails its check while the run did not move is refused at once (not
    retried, not written), with the reader's message."""
    run = _closed_run(tmp_path / "r.zarr")

    def failing(src, snap):
        raise StoreCorruptError("chunk grads/c/2/0 is corrupt")

    monkeypatch.setattr(_archive, "_verify", failing)
    out = tmp_path / "a.zip"
    with pytest.raises(StoreError, match="did not change while it was packed.*grads/c/2/0 is corrupt"):
        datavalue.store.archive_run(run, out)
    assert not out.exists()


def test_a_snapshot_whose_tail_chunk_moved_is_taken_again(tmp_path, monkeypatch):
    """The race, made deterministic: the first snapshot reads the commit and digest record of step 2,
    then finds the tail chunks as step 4 rewrote them (a recorder committing in between). The check
    refuses that snapshot (the packed record does not know those chunks' new checksums) and the
    second snapshot, of step 4, is packed; the archive opens and holds all 4 steps."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    run = tmp_path / "r.zarr"
    rec = datavalue.Recorder(run, m, proj_dim=None, chunk_rows=8, optimizer=opt)
    try:
        for t in range(4):
            with rec.step(sample_ids=[3 * t, 3 * t + 1, 3 * t + 2]):
                torch.nn.functional.cross_entropy(m(torch.randn(3, 4)), torch.tensor([0, 1, 0])).backward()
            opt.step()
            opt.zero_grad()
            if t == 1:
                rec.flush()
                old = _archive._read_pair(run)  # 6 rows: chunk 0 of 8 rows is the tail
        rec.flush()
    finally:
        rec.close()
    pairs = iter([old])
    real_read, real_verify = _archive._read_pair, _archive._verify
    checks = []

    def read(src):
        return next(pairs, None) or real_read(src)

    def verify(src, snap):
        try:
            real_verify(src, snap)
        except StoreCorruptError as exc:
            checks.append(str(exc))
            raise
        checks.append("ok")

    monkeypatch.setattr(_archive, "_read_pair", read)
    monkeypatch.setattr(_archive, "_verify", verify)
    out = datavalue.store.archive_run(run, tmp_path / "a.zip")
    assert len(checks) == 2 and "changed after the commit the snapshot packs was read" in checks[0], checks
    assert checks[1] == "ok"
    rz = datavalue.open_run(out)
    assert rz.n_steps == 4 and rz.n_rows == 12
