"""A refused ledger operation leaves every file as it was (issue 22 follow-up).

``RoyaltyLedger.reanchor`` used to move the head file aside *before* opening the ledger, so a refused
re-anchor (a torn tail, another writer's lock, a damaged row, a missing ledger) left the ledger without
its head. ``recover`` and ``RoyaltyLedger(path, repair=True)`` moved a torn last line aside (or truncated
the last line of a file that is not a ledger at all) before the checks that then refused. Each test
below snapshots the directory (every name, every file's bytes) before the refused call and compares it
after.
"""

from __future__ import annotations

import json
import os
from decimal import Decimal

import pytest

from datavalue import shapley
from datavalue._cli_royalties import main as royalties_main

from ._helpers import ledger_row, two_row_ledger


def _snapshot(directory):
    """Every path under ``directory`` (relative) with its bytes (files), ``"<dir>"`` or its link target."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            p = os.path.join(root, name)
            rel = os.path.relpath(p, directory)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = "<dir>"
            else:
                with open(p, "rb") as f:
                    out[rel] = f.read()
    return out


@pytest.fixture
def ledger(tmp_path):
    return two_row_ledger(tmp_path)


def _tear(path):
    with open(path, "ab") as f:
        f.write(b'{"seq": 2, "output_id": "g3", "pro')  # a crash mid-append


def _damage_first_row(path):
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"revenue": "10.00"', b'"revenue": "99.00"')
    assert lines[1] != path.read_bytes().splitlines(keepends=True)[1]
    path.write_bytes(b"".join(lines))


def _foreign_lock(path):
    lock = path.with_name(path.name + ".lock")
    lock.write_text(json.dumps({"pid": 1, "host": "some-other-host", "since": "2025-01-01T00:00:00+00:00"}))


def _refused_keeps_files(directory, call, error=shapley.LedgerError, match=None):
    before = _snapshot(directory)
    with pytest.raises(error, match=match):
        call()
    assert _snapshot(directory) == before


# ---------------------------------------------------------------- reanchor
def test_reanchor_refused_on_a_torn_tail_keeps_the_files(ledger):
    _tear(ledger)
    _refused_keeps_files(ledger.parent, lambda: shapley.RoyaltyLedger.reanchor(ledger), match="torn")
    assert ledger.with_name(ledger.name + ".head").exists()


def test_reanchor_refused_by_another_hosts_lock_keeps_the_files(ledger):
    _foreign_lock(ledger)
    _refused_keeps_files(ledger.parent, lambda: shapley.RoyaltyLedger.reanchor(ledger, lock_timeout=0.1),
                         match="some-other-host")  # fmt: skip


def test_reanchor_refused_on_a_damaged_row_keeps_the_files(ledger):
    _damage_first_row(ledger)
    _refused_keeps_files(ledger.parent, lambda: shapley.RoyaltyLedger.reanchor(ledger), match="hash chain")


def test_reanchor_refused_on_a_missing_ledger_keeps_the_head(ledger):
    os.remove(ledger)
    _refused_keeps_files(ledger.parent, lambda: shapley.RoyaltyLedger.reanchor(ledger),
                         error=shapley.LedgerNotFoundError, match="does not exist")  # fmt: skip
    assert ledger.with_name(ledger.name + ".head").exists()


def test_reanchor_refused_on_a_wrong_key_keeps_the_files(tmp_path):
    path = tmp_path / "l.jsonl"
    with shapley.RoyaltyLedger(path, key=b"right") as led:
        ledger_row(led, "g1")
    _refused_keeps_files(tmp_path, lambda: shapley.RoyaltyLedger.reanchor(path, key=b"wrong"), match="MAC")


def test_reanchor_refused_on_a_file_that_is_not_a_ledger_keeps_the_files(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a,b\n1,2\n")
    notes.with_name("notes.txt.head").write_text("{}\n")
    _refused_keeps_files(tmp_path, lambda: shapley.RoyaltyLedger.reanchor(notes), match="not a royalty ledger")


def test_reanchor_still_accepts_rows_after_the_head_and_keeps_the_old_head(ledger):
    head = ledger.with_name(ledger.name + ".head")
    old_head = head.read_bytes()
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(lines[0] + lines[1])  # one row fewer: the head now records a row that is gone
    with pytest.raises(shapley.LedgerError, match="truncated"):
        shapley.RoyaltyLedger(ledger)
    led = shapley.RoyaltyLedger.reanchor(ledger)
    assert led.verify() == 1 and len(led) == 1
    kept = [p for p in ledger.parent.iterdir() if p.name.startswith("ledger.jsonl.head.replaced-")]
    assert [p.read_bytes() for p in kept] == [old_head]
    assert json.loads(head.read_text())["rows"] == 1


def test_reanchor_rewrites_an_unreadable_head(ledger):
    head = ledger.with_name(ledger.name + ".head")
    head.write_bytes(b"\xff\xfe not a head")  # not even UTF-8: reanchor is the fix the error names
    with pytest.raises(shapley.LedgerError, match="head file"):
        shapley.RoyaltyLedger(ledger)
    assert shapley.RoyaltyLedger.reanchor(ledger).verify() == 2
    kept = [p for p in ledger.parent.iterdir() if p.name.startswith("ledger.jsonl.head.replaced-")]
    assert [p.read_bytes() for p in kept] == [b"\xff\xfe not a head"]


def test_reanchor_refused_on_a_head_it_cannot_read_keeps_the_files(ledger):
    head = ledger.with_name(ledger.name + ".head")
    os.remove(head)
    head.mkdir()  # not a file: it cannot be copied aside (before: moved aside, and a new head written)
    _refused_keeps_files(ledger.parent, lambda: shapley.RoyaltyLedger.reanchor(ledger),
                         match=r"cannot read the head file .*nothing was changed")  # fmt: skip


# ---------------------------------------------------------------- recover, repair=True
def test_recover_refuses_a_file_that_is_not_a_ledger(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a,b\n1,2\n3,")  # its last line is "torn" by the ledger's rule
    _refused_keeps_files(tmp_path, lambda: shapley.RoyaltyLedger.recover(notes), match="not a royalty ledger")
    _refused_keeps_files(tmp_path, lambda: shapley.RoyaltyLedger(notes, repair=True), match="not a royalty ledger")


def test_a_file_that_is_not_utf8_is_not_a_ledger(tmp_path):
    blob = tmp_path / "blob.jsonl"
    blob.write_bytes(b"\xff\xfe binary\n")  # before: a raw UnicodeDecodeError on open
    _refused_keeps_files(tmp_path, lambda: shapley.RoyaltyLedger(blob), match="not a royalty ledger")
    _refused_keeps_files(tmp_path, lambda: shapley.RoyaltyLedger.recover(blob), match="not a royalty ledger")


def test_recover_refuses_a_missing_ledger(tmp_path):
    _refused_keeps_files(tmp_path, lambda: shapley.RoyaltyLedger.recover(tmp_path / "gone.jsonl"),
                         error=shapley.LedgerNotFoundError, match="does not exist")  # fmt: skip


def test_recover_refused_by_another_hosts_lock_keeps_the_torn_line(ledger):
    _tear(ledger)
    _foreign_lock(ledger)  # a writer elsewhere may still be writing that line
    _refused_keeps_files(ledger.parent, lambda: shapley.RoyaltyLedger.recover(ledger, lock_timeout=0.1),
                         match="some-other-host")  # fmt: skip


def test_repair_refused_for_the_currency_keeps_the_torn_line(ledger):
    _tear(ledger)
    _refused_keeps_files(ledger.parent, lambda: shapley.RoyaltyLedger(ledger, repair=True, currency="EUR"),
                         match="USD ledger")  # fmt: skip


def test_repair_refused_for_the_key_keeps_the_torn_line(ledger):
    _tear(ledger)
    _refused_keeps_files(ledger.parent, lambda: shapley.RoyaltyLedger(ledger, repair=True, key=b"k"),
                         match="created without a key")  # fmt: skip


def test_repair_refused_on_a_damaged_row_keeps_the_torn_line(ledger):
    _damage_first_row(ledger)
    _tear(ledger)
    _refused_keeps_files(ledger.parent, lambda: shapley.RoyaltyLedger(ledger, repair=True), match="hash chain")


def test_repair_still_moves_a_torn_line_of_a_sound_ledger(ledger):
    _tear(ledger)
    led = shapley.RoyaltyLedger(ledger, repair=True)
    assert led.verify() == 2
    assert [p.name.startswith("ledger.jsonl.torn-") for p in ledger.parent.iterdir()].count(True) == 1


# ---------------------------------------------------------------- opening, record, the CLI
@pytest.mark.parametrize("damage", [_tear, _damage_first_row, lambda p: os.remove(p.with_name(p.name + ".head"))])
def test_a_refused_open_keeps_the_files(ledger, damage):
    damage(ledger)
    _refused_keeps_files(ledger.parent, lambda: shapley.RoyaltyLedger(ledger))
    _refused_keeps_files(ledger.parent, lambda: shapley.RoyaltyLedger(ledger, create=True, currency="USD"))


def test_a_refused_new_ledger_over_an_orphan_head_writes_nothing(ledger):
    os.remove(ledger)
    sub = ledger.parent / "new" / "l.jsonl"
    sub.parent.mkdir()
    os.link(ledger.with_name(ledger.name + ".head"), sub.with_name("l.jsonl.head"))
    _refused_keeps_files(ledger.parent, lambda: shapley.RoyaltyLedger(sub), match="records 2 rows")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"output_id": "g1"}, "already recorded"),
        ({"output_id": "g3", "owners": ["ann", "ann"]}, "distinct"),
        ({"output_id": "g3", "royalty_rate": "1.5"}, "royalty_rate"),
        ({"output_id": "g3", "result": [1.0, 2.0], "utilities": [0.0, 1.0, 1.0, 2.0]}, "utilities"),
    ],
)
def test_a_refused_record_keeps_the_files(ledger, kw, match):
    led = shapley.RoyaltyLedger(ledger)
    args = {"content": "x", "prompt": "p", "revenue": Decimal("1.00"), "owners": ["ann", "bob"],
            "result": [1.0, 1.0], "timestamp": "2025-01-10", **kw}  # fmt: skip
    _refused_keeps_files(ledger.parent, lambda: led.record(**args), error=shapley.ShapleyError, match=match)


def test_a_record_refused_under_the_lock_keeps_the_files(ledger):
    led = shapley.RoyaltyLedger(ledger)
    _tear(ledger)  # another writer crashed after this handle read the ledger
    _refused_keeps_files(ledger.parent, lambda: ledger_row(led, "g3"), match="torn")
    _foreign_lock(ledger)
    led.lock_timeout = 0.1
    _refused_keeps_files(ledger.parent, lambda: ledger_row(led, "g3"), match="some-other-host")


@pytest.mark.parametrize("damage", [_tear, _damage_first_row])
def test_a_refused_royalties_command_keeps_the_files(ledger, damage, capsys):
    damage(ledger)
    before = _snapshot(ledger.parent)
    out = ledger.parent / "reports" / "report.html"  # a refusal creates no directory either
    assert royalties_main(["royalties", str(ledger), "--period", "2025-01-01:2025-02-01", "--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err
    assert _snapshot(ledger.parent) == before
