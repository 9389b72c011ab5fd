"""Seventh probe leftovers (issue 22, P7-01's class): a hard-link snapshot (``cp -al``) shares the
ledger's and the utility cache's inodes. ``RoyaltyLedger.recover`` truncated a torn tail in place and
``DiskCache`` appended (and cut a torn tail) in place, so the snapshot's file changed with them. Each
test links the file, runs the writer, and checks the snapshot's bytes are unchanged.
"""

from __future__ import annotations

import os

from datavalue import shapley

from ._helpers import two_row_ledger


def _tear(path):
    with open(path, "ab") as f:
        f.write(b'{"seq": 2, "output_id": "g3", "pro')  # a crash mid-append


def test_recover_of_a_torn_tail_leaves_a_hard_link_snapshot_as_it_was(tmp_path):
    ledger = two_row_ledger(tmp_path)
    _tear(ledger)
    (tmp_path / "snap").mkdir()
    snap = tmp_path / "snap" / ledger.name
    os.link(ledger, snap)
    before = snap.read_bytes()
    aside = shapley.RoyaltyLedger.recover(ledger)
    assert aside is not None
    assert snap.read_bytes() == before  # the snapshot still holds the torn line
    assert ledger.read_bytes() == before[: before.rfind(b"\n") + 1]  # the ledger lost it
    assert os.stat(ledger).st_nlink == 1
    assert len(shapley.RoyaltyLedger(ledger)) == 2


def test_recover_adding_a_missing_newline_leaves_a_hard_link_snapshot_as_it_was(tmp_path):
    ledger = two_row_ledger(tmp_path)
    ledger.write_bytes(ledger.read_bytes().rstrip(b"\n"))
    (tmp_path / "snap").mkdir()
    snap = tmp_path / "snap" / ledger.name
    os.link(ledger, snap)
    before = snap.read_bytes()
    assert shapley.RoyaltyLedger.recover(ledger) is None
    assert snap.read_bytes() == before
    assert ledger.read_bytes() == before + b"\n"


def _cache(tmp_path):
    path = tmp_path / "u.jsonl"
    with shapley.DiskCache(path, n=3, fingerprint="f") as c:
        c.put(1, 1.0)
    return path


def test_a_cache_appended_after_a_hard_link_snapshot_leaves_the_snapshot_as_it_was(tmp_path):
    path = _cache(tmp_path)
    snap = tmp_path / "snap.jsonl"
    os.link(path, snap)
    before = snap.read_bytes()
    with shapley.DiskCache(path, n=3, fingerprint="f") as c:
        c.put(3, 2.0)
    assert snap.read_bytes() == before
    assert shapley.DiskCache(path, n=3, fingerprint="f").get(3) == 2.0


def test_a_snapshot_taken_while_the_cache_is_open_is_not_appended_to(tmp_path):
    path = _cache(tmp_path)
    with shapley.DiskCache(path, n=3, fingerprint="f") as c:
        c.put(2, 1.5)
        snap = tmp_path / "snap.jsonl"
        os.link(path, snap)
        before = snap.read_bytes()
        c.put(3, 2.0)
        c.put(5, 2.5)
    assert snap.read_bytes() == before
    again = shapley.DiskCache(path, n=3, fingerprint="f")
    assert (again.get(2), again.get(3), again.get(5)) == (1.5, 2.0, 2.5)
    again.close()


def test_a_torn_cache_tail_cut_on_load_leaves_a_hard_link_snapshot_as_it_was(tmp_path):
    path = _cache(tmp_path)
    with open(path, "ab") as f:
        f.write(b'{"mask": 2, "va')
    snap = tmp_path / "snap.jsonl"
    os.link(path, snap)
    before = snap.read_bytes()
    shapley.DiskCache(path, n=3, fingerprint="f").close()
    assert snap.read_bytes() == before
    assert path.read_bytes() == before[: before.rfind(b"\n") + 1]
