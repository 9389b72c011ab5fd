"""Hostile ledgers (issue 22, items 3 and 9): truncation, duplicates, torn tails, two writers."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from decimal import Decimal

import pytest

from datavalue import shapley

from ._helpers import ledger_row, two_row_ledger


@pytest.fixture
def two_rows(tmp_path):
    return two_row_ledger(tmp_path)


def _drop_last_row(path):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")


# ---------------------------------------------------------------- anchors: head file, MAC
def test_deleting_the_last_row_fails_verify(two_rows):
    assert shapley.RoyaltyLedger(two_rows).statement().paid_total == Decimal("15.00")
    _drop_last_row(two_rows)  # paid 15.00 becomes 10.00
    with pytest.raises(shapley.LedgerError, match=r"head.*2 rows.*1"):
        shapley.RoyaltyLedger(two_rows).verify()


def test_head_file_is_written_on_every_append(two_rows):
    head = json.loads(two_rows.with_name(two_rows.name + ".head").read_text())
    assert head["rows"] == 2
    assert head["last_hash"] == shapley.RoyaltyLedger(two_rows).records()[-1].row_hash


def test_truncation_to_the_header_fails_verify(two_rows):
    lines = two_rows.read_text().splitlines()
    two_rows.write_text(lines[0] + "\n")
    with pytest.raises(shapley.LedgerError, match="truncated"):
        shapley.RoyaltyLedger(two_rows).verify()


def test_a_ledger_without_head_still_verifies_with_a_warning(tmp_path, caplog):
    # as written by the old format: a header without "anchor": "head-file", and no head file
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"schema": "datavalue.shapley.royalty-ledger", "version": 1, "currency": "USD",
                               "created": "2024-01-01T00:00:00+00:00"}) + "\n")
    with caplog.at_level(logging.WARNING):
        led = shapley.RoyaltyLedger(old)
        ledger_row(led, "g1")
        ledger_row(led, "g2", revenue="5.00")
    os.remove(old.with_name(old.name + ".head"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert shapley.RoyaltyLedger(old).verify() == 2
    assert "unanchored" in caplog.text


def test_keyed_ledger_detects_a_rewritten_chain_and_head(tmp_path):
    key = b"kept-elsewhere"
    path = tmp_path / "l.jsonl"
    with shapley.RoyaltyLedger(path, key=key) as led:
        ledger_row(led, "g1")
        ledger_row(led, "g2")
    assert shapley.RoyaltyLedger(path, key=key).verify() == 2
    # An attacker without the key deletes the last row and rewrites the head to match.
    _drop_last_row(path)
    shapley.RoyaltyLedger.reanchor(path)  # rewrites the head file, without the key
    assert shapley.RoyaltyLedger(path).verify() == 1
    with pytest.raises(shapley.LedgerError, match="MAC"):
        shapley.RoyaltyLedger(path, key=key).verify()
    with pytest.raises(shapley.LedgerError, match="MAC"):
        shapley.RoyaltyLedger(path, key=b"wrong key").verify()


def test_keyed_ledger_refuses_appends_without_the_key(tmp_path):
    path = tmp_path / "l.jsonl"
    with shapley.RoyaltyLedger(path, key=b"k") as led:
        ledger_row(led, "g1")
    led = shapley.RoyaltyLedger(path)
    with pytest.raises(shapley.LedgerError, match="key"):
        ledger_row(led, "g2")


# ---------------------------------------------------------------- duplicates
def test_the_same_output_cannot_be_paid_twice(two_rows):
    led = shapley.RoyaltyLedger(two_rows)
    with pytest.raises(shapley.LedgerError, match="'g1' is already recorded"):
        ledger_row(led, "g1")
    assert shapley.RoyaltyLedger(two_rows).verify() == 2


# ---------------------------------------------------------------- torn final line
def _tear(path):
    """A crash in the middle of appending a third row: part of a line, head not yet updated."""
    last = path.read_bytes().splitlines()[-1]
    with open(path, "ab") as f:
        f.write(last[:60])


def test_a_torn_last_line_names_itself_and_the_recovery(two_rows):
    _tear(two_rows)
    with pytest.raises(shapley.LedgerError, match=r"ledger\.jsonl:4 .*torn.*recover"):
        shapley.RoyaltyLedger(two_rows)


def test_recover_moves_the_torn_tail_aside_and_keeps_complete_rows(two_rows):
    _tear(two_rows)
    tail = two_rows.read_bytes()[two_rows.read_bytes().rfind(b"\n") + 1 :]
    moved = shapley.RoyaltyLedger.recover(two_rows)
    assert moved.name.startswith("ledger.jsonl.torn-") and moved.read_bytes() == tail
    led = shapley.RoyaltyLedger(two_rows)
    assert [r.output_id for r in led.records()] == ["g1", "g2"]
    ledger_row(led, "g3")  # the lost output can be recorded again
    assert shapley.RoyaltyLedger(two_rows).verify() == 3


def test_open_with_repair_recovers_too(two_rows):
    _tear(two_rows)
    led = shapley.RoyaltyLedger(two_rows, repair=True)
    assert len(led) == 2
    assert list(two_rows.parent.glob("ledger.jsonl.torn-*"))


def test_a_bad_line_in_the_middle_is_not_a_torn_tail(two_rows):
    lines = two_rows.read_text().splitlines()
    lines[1] = lines[1][:-5]
    two_rows.write_text("\n".join(lines) + "\n")
    with pytest.raises(shapley.LedgerError, match="not a ledger row"):
        shapley.RoyaltyLedger(two_rows, repair=True)


# ---------------------------------------------------------------- one writer at a time
def test_two_ledger_objects_appending_keep_the_file_readable(tmp_path):
    path = tmp_path / "l.jsonl"
    a = shapley.RoyaltyLedger(path)
    b = shapley.RoyaltyLedger(path)
    ledger_row(a, "g1")
    ledger_row(b, "g2")
    ledger_row(a, "g3")
    assert [r.output_id for r in shapley.RoyaltyLedger(path).records()] == ["g1", "g2", "g3"]
    assert shapley.RoyaltyLedger(path).verify() == 3
    with pytest.raises(shapley.LedgerError, match="already recorded"):
        ledger_row(b, "g3")


def test_a_live_lock_names_its_holder(tmp_path):
    path = tmp_path / "l.jsonl"
    led = shapley.RoyaltyLedger(path, lock_timeout=0.2)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock = path.with_name(path.name + ".lock")
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(shapley.LedgerError, match=rf"locked by pid {holder.pid}"):
            ledger_row(led, "g1")
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_on_this_host_is_taken_over(tmp_path, caplog):
    path = tmp_path / "l.jsonl"
    led = shapley.RoyaltyLedger(path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = path.with_name(path.name + ".lock")
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING):
        ledger_row(led, "g1")
    assert "stale" in caplog.text and not lock.exists()
    assert led.verify() == 1


def test_a_lock_from_another_host_is_never_taken_silently(tmp_path):
    path = tmp_path / "l.jsonl"
    led = shapley.RoyaltyLedger(path, lock_timeout=0.1)
    lock = path.with_name(path.name + ".lock")
    lock.write_text(json.dumps({"pid": 1, "host": "some-other-host"}))
    with pytest.raises(shapley.LedgerError, match="some-other-host"):
        ledger_row(led, "g1")
    assert lock.exists()


_WRITER = """
import sys
from decimal import Decimal
from datavalue import shapley
led = shapley.RoyaltyLedger(sys.argv[1], lock_timeout=60)
for i in range(15):
    led.record(output_id=f"{sys.argv[2]}-{i}", content=b"x", prompt="p", revenue=Decimal("1.00"),
               owners=["ann", "bob"], result=[1.0, 2.0], timestamp="2025-01-10")
"""


def test_three_processes_appending_at_once_keep_one_chain(tmp_path):
    path = tmp_path / "l.jsonl"
    shapley.RoyaltyLedger(path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), w], env=env)
             for w in ("a", "b", "c")]  # fmt: skip
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    led = shapley.RoyaltyLedger(path)
    assert led.verify() == 45 and led.statement().paid_total == Decimal("45.00")
    assert not led.lock_path.exists()


def test_a_replaced_last_row_fails_against_the_head(two_rows, tmp_path):
    other = tmp_path / "other.jsonl"
    # Same header, a different valid second row: the chain holds, the head does not.
    other.write_bytes(two_rows.read_bytes().splitlines(keepends=True)[0])
    led = shapley.RoyaltyLedger.reanchor(other)  # the copied header says it has a head: give it one
    ledger_row(led, "g1", revenue="10.00")
    ledger_row(led, "g2", revenue="1.00")
    lines = two_rows.read_bytes().splitlines(keepends=True)
    forged = other.read_bytes().splitlines(keepends=True)
    assert lines[1] == forged[1]  # same header, same first row
    two_rows.write_bytes(b"".join(lines[:2] + forged[2:]))  # a valid chain paying 11.00
    with pytest.raises(shapley.LedgerError, match="chain was rewritten"):
        shapley.RoyaltyLedger(two_rows).verify()


def test_keyed_ledger_without_its_head_and_key_mismatches(tmp_path):
    path = tmp_path / "l.jsonl"
    with shapley.RoyaltyLedger(path, key="k") as led:
        ledger_row(led, "g1")
    os.remove(path.with_name(path.name + ".head"))
    with pytest.raises(shapley.LedgerError, match="no head file"):
        shapley.RoyaltyLedger(path, key="k")
    plain = tmp_path / "plain.jsonl"
    shapley.RoyaltyLedger(plain)
    with pytest.raises(shapley.LedgerError, match="created without a key"):
        shapley.RoyaltyLedger(plain, key="k")


def test_a_handle_whose_file_was_replaced_refuses_to_append(two_rows):
    led = shapley.RoyaltyLedger(two_rows)
    lines = two_rows.read_text().splitlines()
    two_rows.write_text(lines[0] + "\n" + lines[2] + "\n" + lines[1] + "\n")  # reordered
    with pytest.raises(shapley.LedgerError):
        ledger_row(led, "g3")
