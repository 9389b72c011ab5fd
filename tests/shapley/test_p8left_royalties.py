"""Eighth probe's leftovers in the royalties module (issue 22, session 13).

* ``~`` paths: ``RoyaltyLedger("~/l.jsonl")``, ``write_report(st, "~/r.csv")``, ``OwnerRegistry.save`` and the
  CLI's ``--out`` created ``./~/...`` in the current directory (Python does not expand ``~``); now refused as
  ``Recorder("~/r.zarr")`` is (P8-37), and reading ones say why the file is not found.
* Owner ids ``' '`` and ``'a\\nb'`` (and output ids, work ids, display names, the currency) were accepted.
* ``royalty_rate='-0'`` printed ``-0.00`` in statements.
* ``recover`` on a read-only directory said "Appending ..."; a read-only ledger file raised a raw ``OSError``
  and left a ``.torn-*`` copy beside a ledger that still held the torn line.
"""

from __future__ import annotations

import builtins
import datetime as _dt
import errno
import io
import json
import re
from decimal import Decimal

import pytest

import datavalue._lock
from datavalue import _cli_royalties, shapley
from datavalue.shapley import (
    InvalidGameError,
    LedgerError,
    LedgerNotFoundError,
    OutputPathError,
    OwnerRegistry,
    RoyaltyLedger,
    render_report,
    split_royalties,
    write_report,
)
from datavalue.shapley.royalties import _recovery
from datavalue.shapley.royalties._records import GenerationRecord, Period
from datavalue.shapley.royalties._statement import build_statement


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A current directory without ``./~`` and a HOME elsewhere: what a literal ``~`` would create is visible."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    return work


def _ledger(path, **kw):
    led = RoyaltyLedger(path, **kw)
    led.record(output_id="g1", content=b"x", prompt="p", revenue="10.00", royalty_rate="0.5",
               owners=["ann", "bob"], result=[1.0, 2.0], timestamp="2025-01-02")
    return led


# ------------------------------------------------------------------ 2. "~" paths
def test_p8left_a_ledger_path_starting_with_tilde_is_not_created_literally(home):
    with pytest.raises(OutputPathError, match=r"the ledger '~/books/l.jsonl' starts with '~', which Python does not "
                       r"expand.*os.path.expanduser.*Nothing was written"):
        RoyaltyLedger("~/books/l.jsonl")
    assert not (home / "~").exists()


def test_p8left_reading_a_tilde_ledger_says_why_it_is_not_found(home):
    for call in (lambda: RoyaltyLedger("~/l.jsonl", create=False), lambda: RoyaltyLedger.recover("~/l.jsonl"),
                 lambda: RoyaltyLedger.reanchor("~/l.jsonl"), lambda: OwnerRegistry.load("~/owners.json")):
        with pytest.raises(LedgerNotFoundError, match=r"starts with '~', which Python does not expand.*Nothing was read"):
            call()
    assert not (home / "~").exists()


def test_p8left_reports_and_registries_refuse_a_tilde_path(home, tmp_path):
    st = _ledger(tmp_path / "l.jsonl").statement()
    for fmt in ("csv", "json", "html"):
        with pytest.raises(OutputPathError, match=r"the report '~/out/r\.\w+' starts with '~'"):
            write_report(st, f"~/out/r.{fmt}")
    with pytest.raises(OutputPathError, match=r"the owner registry '~/o.json' starts with '~'"):
        OwnerRegistry({"w": "ann"}).save("~/o.json")
    assert not (home / "~").exists()


def test_p8left_the_royalties_cli_refuses_tilde_paths(home, tmp_path, capsys):
    ledger = str(tmp_path / "l.jsonl")
    _ledger(ledger)
    assert _cli_royalties.main(["royalties", ledger, "--period", ":", "--out", "~/r.csv"]) == 2
    assert "--out '~/r.csv' starts with '~'" in capsys.readouterr().err
    assert _cli_royalties.main(["royalties", "~/l.jsonl", "--period", ":", "--out", "r.csv"]) == 2
    assert "LEDGER '~/l.jsonl' starts with '~', which Python does not expand: it names a file under a directory " \
           "named '~' in the current directory" in capsys.readouterr().err
    assert _cli_royalties.main(["royalties", ledger, "--period", ":", "--out", "r.csv", "--registry", "~/o.json"]) == 2
    assert "--registry '~/o.json' starts with '~'" in capsys.readouterr().err
    assert _cli_royalties.main(["royalties", ledger, "--period", ":", "--out", "r.csv", "--key-file", "~/k"]) == 2
    err = capsys.readouterr().err
    assert "--key-file '~/k' starts with '~'" in err and "Write it without quotes (the shell expands ~)" in err
    assert not (home / "~").exists() and not (home / "r.csv").exists()


def test_p8left_a_directory_really_named_tilde_is_used(home):
    (home / "~").mkdir()
    led = _ledger("~/l.jsonl")
    assert led.path == home / "~" / "l.jsonl" and len(RoyaltyLedger("./~/l.jsonl")) == 1


# ------------------------------------------------------------------ 3. ids
@pytest.mark.parametrize("owners, said", [
    ([" ", "bob"], r"owners\[0\] ' ' cannot be used: it is blank"),
    (["ann", "a\nb"], r"owners\[1\] 'a\\nb' cannot be used: it holds control or invisible characters \(U\+000A"),
    (["ann", "b\tob"], r"U\+0009"),
    (["ann", "\x1b[2Jbob"], r"U\+001B"),
    (["ann", "bob\u202e"], r"U\+202E"),
    (["ann ", "bob"], r"leading or trailing whitespace"),
])
def test_p8left_blank_and_control_character_owner_ids_are_refused(tmp_path, owners, said):
    led = RoyaltyLedger(tmp_path / "l.jsonl")
    with pytest.raises(InvalidGameError, match=said):
        led.record(output_id="g1", content=b"x", prompt="p", revenue="10.00", owners=owners, result=[1.0, 2.0])
    assert len(led) == 0


@pytest.mark.parametrize("output_id", [" ", "g\n1", "g1\r", "\tg1"])
def test_p8left_blank_and_control_character_output_ids_are_refused(tmp_path, output_id):
    led = RoyaltyLedger(tmp_path / "l.jsonl")
    with pytest.raises(InvalidGameError, match=r"output_id .* cannot be used"):
        led.record(output_id=output_id, content=b"x", prompt="p", revenue="1", owners=["a"], result=[1.0])


def test_p8left_the_registry_refuses_such_ids_and_names(tmp_path):
    reg = OwnerRegistry()
    with pytest.raises(InvalidGameError, match=r"the owner id 'a\\nb' cannot be used"):
        reg.add_owner("a\nb")
    with pytest.raises(InvalidGameError, match=r"the owner id '  ' cannot be used: it is blank"):
        reg.add_owner("  ")
    with pytest.raises(InvalidGameError, match=r"the display name of owner 'ann' .* cannot be used"):
        reg.add_owner("ann", name="Ann\r\n=HYPERLINK(\"http://evil\")")
    reg.add_owner("ann", name="Ann Ltd")
    with pytest.raises(InvalidGameError, match=r"the work id 'w\\t1' cannot be used"):
        reg.assign("w\t1", "ann")
    doc = reg.to_dict()
    doc["names"]["b\nob"] = "Bob"
    (tmp_path / "o.json").write_text(json.dumps(doc))
    with pytest.raises(InvalidGameError, match=r"owner registry .*o\.json: the owner id 'b\\nob' cannot be used"):
        OwnerRegistry.load(tmp_path / "o.json")


def test_p8left_a_currency_with_control_characters_is_refused(tmp_path):
    with pytest.raises(LedgerError, match=r"currency 'US\\nD' cannot be used"):
        RoyaltyLedger(tmp_path / "l.jsonl", currency="US\nD")
    assert not (tmp_path / "l.jsonl").exists()


def test_p8left_plain_unicode_ids_are_accepted(tmp_path):
    led = RoyaltyLedger(tmp_path / "l.jsonl")
    owners = ["Zoë", "山田 太郎", "\u0645\u06cc\u200c\u0631\u0648\u062f"]  # a Persian name with a zero-width non-joiner
    led.record(output_id="gen 1", content=b"x", prompt="p\nwith lines", revenue="9.00", owners=owners,
               result=[1.0, 1.0, 1.0])
    assert [o.owner for o in led.statement().owners] == sorted(owners)


# ------------------------------------------------------------------ 4. negative zero
def _signed_zero(text: str) -> list[str]:
    """The negative zeros printed in ``text`` (``-0``, ``-0.00``, ``-0.0``; never a date's ``2025-01``)."""
    return re.findall(r"(?<![0-9A-Za-z])-0(?:\.0*)?(?![0-9.])", text)


@pytest.mark.parametrize("rate, revenue", [("-0", "10.00"), (Decimal("-0.0"), "10.00"), ("0.5", "-0.00"),
                                           ("0.5", Decimal("-0"))])
def test_p8left_negative_zero_money_is_never_printed_signed(tmp_path, rate, revenue):
    led = RoyaltyLedger(tmp_path / "l.jsonl")
    row = led.record(output_id="g1", content=b"x", prompt="p", revenue=revenue, royalty_rate=rate,
                     owners=["ann", "bob"], result=[-0.0, 1.0], timestamp="2025-01-02")
    assert not row.pool.is_signed() and not row.royalty_rate.is_signed() and not row.revenue.is_signed()
    assert not _signed_zero((tmp_path / "l.jsonl").read_text())  # the row: "pool": "0.00", "values": [0.0, 1.0]
    st = led.statement()
    for fmt in ("csv", "json", "html"):
        assert not _signed_zero(render_report(st, fmt)), fmt


def test_p8left_rows_written_with_negative_zero_print_unsigned(tmp_path):
    """A ledger written before the fix holds "-0.00" (its hash binds it): its statements print 0.00 and 0.0."""
    rec = GenerationRecord(
        seq=0, output_id="g1", output_hash="sha256:0", prompt="p", timestamp=_dt.datetime(2025, 1, 2, tzinfo=_dt.UTC),
        revenue=Decimal("10.00"), royalty_rate=Decimal("-0"), pool=Decimal("-0.00"), currency="USD",
        owners=("ann", "bob"), policy="srs-v1", method="given", model_fingerprint="", run_fingerprint="",
        utilities=None, values=(-0.0, 0.0), stderr=(0.0, 0.0), shares=(0.0, 0.0),
        amounts=(Decimal("-0.00"), Decimal("0.00")), unallocated=Decimal("-0.00"), no_positive=True, prev_hash="")
    for aggregation in ("share-then-sum", "average-then-share"):
        st = build_statement([rec], period=Period(), aggregation=aggregation)
        for fmt in ("csv", "json", "html"):
            assert not _signed_zero(render_report(st, fmt)), (aggregation, fmt)


def test_p8left_split_of_a_negative_zero_pool_is_unsigned():
    split = split_royalties([1.0, 2.0], pool="-0.00")
    assert not split.pool.is_signed() and not _signed_zero(json.dumps(split.to_dict()))


# ------------------------------------------------------------------ 5. recover where nothing can be written
def _torn(tmp_path):
    path = tmp_path / "l.jsonl"
    _ledger(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"seq": 1, "tor')
    return path, path.read_bytes()


def test_p8left_recover_on_a_read_only_directory_says_recover_not_appending(tmp_path, monkeypatch):
    path, before = _torn(tmp_path)
    real_open = builtins.open

    def read_only_dir(file, *a, **k):  # root ignores chmod: the lock's temporary file cannot be created
        if str(file).endswith(".partial"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(datavalue._lock, "open", read_only_dir, raising=False)
    with pytest.raises(LedgerError, match=r"cannot be written by this user.*RoyaltyLedger.recover moves the torn last "
                       r"line.*nothing was changed: make the directory writable") as err:
        RoyaltyLedger.recover(path)
    assert "Appending" not in str(err.value)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.torn-*"))


@pytest.mark.parametrize("fail_mode, step", [("r+b", "cutting the torn line 3 off the ledger"),
                                             ("xb", "keeping the torn line 3 in l.jsonl.torn-")])
def test_p8left_recover_that_cannot_write_changes_nothing(tmp_path, monkeypatch, fail_mode, step):
    path, before = _torn(tmp_path)
    real_open = builtins.open

    def refuse(file, mode="r", *a, **k):
        if mode == fail_mode:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(_recovery, "open", refuse, raising=False)
    with pytest.raises(LedgerError, match=rf"cannot recover the ledger .*l\.jsonl: {step}.*failed \(Permission denied\); "
                       r"nothing was changed\. Make the ledger"):
        RoyaltyLedger.recover(path)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.torn-*"))  # was: a .torn-* copy left
    monkeypatch.undo()
    assert RoyaltyLedger.recover(path) is not None and len(RoyaltyLedger(path)) == 1


def test_p8left_the_ledger_appends_after_such_checks(tmp_path):
    """The checks above change nothing an honest ledger does (a smoke test, with a CSV of the period)."""
    led = _ledger(tmp_path / "l.jsonl")
    buf = io.StringIO()
    write_report(led.statement(), buf, format="csv")
    assert buf.getvalue().count("\n") == 5 and shapley.RoyaltyLedger(tmp_path / "l.jsonl").verify() == 1
