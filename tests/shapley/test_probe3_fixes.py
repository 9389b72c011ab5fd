"""Defects the third probe of issue 22 found in the royalty ledger, the owner registry and the
utility cache (repro_03, 04, 05, 16, 18, 21, 22). Each test failed before its fix.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from decimal import Decimal

import numpy as np
import pytest

from datavalue import shapley
from datavalue._cli_royalties import main as royalties_main

GLOVE = shapley.games.GloveGame(n=3, left={0}, right={1, 2})


def _record(led, output_id, *, owners=("ann", "bob", "cy"), **kw):
    kw.setdefault("utilities", GLOVE.utilities())
    return led.record(output_id=output_id, content=b"x", prompt="p", revenue=Decimal("10.00"), owners=owners,
                      timestamp="2025-01-15", **kw)  # fmt: skip


# ---------------------------------------------------------------- repro_03: owners and result= are stored as given
@pytest.mark.parametrize(
    ("owners", "match"),
    [
        ([None, "bob", "cy"], r"owners\[0\] must be a non-empty string.*got None of type NoneType"),
        (["", "bob", "cy"], r"owners\[0\] must be a non-empty string.*got ''"),
        (["ann", 2, "cy"], r"owners\[1\] must be a non-empty string.*got 2 of type int"),
        ("abc", r"owners must be a list of owner ids.*got 'abc' of type str"),
        ({"ann", "bob", "cy"}, r"owners must be a list of owner ids.*set"),
    ],
)
def test_record_refuses_owners_that_are_not_a_list_of_strings(tmp_path, owners, match):
    led = shapley.RoyaltyLedger(tmp_path / "l.jsonl")
    with pytest.raises(shapley.InvalidGameError, match=match):
        _record(led, "g1", owners=owners)
    assert led.records() == []
    # what a user means is still recorded as given (a tuple or an array of strings works too)
    rec = _record(led, "g2", owners=np.array(["ann", "bob", "cy"]))
    assert rec.owners == ("ann", "bob", "cy")


def test_record_refuses_result_that_contradicts_the_utilities(tmp_path):
    led = shapley.RoyaltyLedger(tmp_path / "l.jsonl")
    with pytest.raises(shapley.InvalidGameError, match=r"result= gives the values \[1.0, 2.0, 3.0\].*Shapley values"):
        _record(led, "g1", result=[1.0, 2.0, 3.0])
    assert led.records() == []
    exact = shapley.exact_from_utilities(GLOVE.utilities())
    rec = _record(led, "g2", result=exact)  # agreeing values are accepted, and the row replays
    assert sum(rec.amounts) + rec.unallocated == rec.pool == Decimal("10.00")
    assert led.verify() == 1


# ---------------------------------------------------------------- repro_04: a ledger created with a head needs it
def test_a_ledger_created_with_a_head_refuses_to_open_without_it(tmp_path):
    path = tmp_path / "l.jsonl"
    led = shapley.RoyaltyLedger(path)
    _record(led, "g1")
    _record(led, "g2")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # the .jsonl restored from an older backup, without its head
    os.remove(path.with_name(path.name + ".head"))
    with pytest.raises(shapley.LedgerError, match=r"no head file l.jsonl.head, but it was created with one.*reanchor"):
        shapley.RoyaltyLedger(path)
    assert not path.with_name(path.name + ".head").exists()  # nothing wrote a fresh head to hide the loss
    # the explicit repair path, after checking the rows by hand
    assert shapley.RoyaltyLedger.reanchor(path).verify() == 1
    assert shapley.RoyaltyLedger(path).verify() == 1


def test_the_anchor_mark_is_part_of_the_chain(tmp_path):
    path = tmp_path / "l.jsonl"
    _record(shapley.RoyaltyLedger(path), "g1")
    header = json.loads(path.read_text().splitlines()[0])
    assert header["anchor"] == "head-file"
    lines = path.read_text().splitlines(keepends=True)
    del header["anchor"]  # removing the mark to make a deleted head pass breaks the chain
    path.write_text(json.dumps(header, sort_keys=True) + "\n" + "".join(lines[1:]))
    os.remove(path.with_name(path.name + ".head"))
    with pytest.raises(shapley.LedgerError, match="breaks the hash chain"):
        shapley.RoyaltyLedger(path)


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_new_ledger_is_not_started_over_the_head_of_a_lost_one(tmp_path, how):
    path = tmp_path / "l.jsonl"
    _record(shapley.RoyaltyLedger(path), "g1")
    head = path.with_name(path.name + ".head")
    before = head.read_bytes()
    if how == "deleted":
        path.unlink()
    else:
        path.write_bytes(b"")
    with pytest.raises(shapley.LedgerError, match=r"head file .* records 1 rows: the ledger was deleted, emptied or moved"):
        shapley.RoyaltyLedger(path)
    assert head.read_bytes() == before


# ---------------------------------------------------------------- repro_05: --out is never one of the ledger's files
@pytest.mark.parametrize("suffix", [".head", ".lock", ".torn-20250101T000000000000Z", ".head.replaced-x"])
def test_royalties_refuses_to_write_the_report_over_a_file_of_the_ledger(tmp_path, capsys, suffix):
    ledger = tmp_path / "l.jsonl"
    _record(shapley.RoyaltyLedger(ledger), "g1")
    target = tmp_path / ("l.jsonl" + suffix)
    if not target.exists():
        target.write_text("kept\n")
    before = target.read_bytes()
    for out in (target, tmp_path / "sub" / ".." / target.name):
        (tmp_path / "sub").mkdir(exist_ok=True)
        rc = royalties_main(["royalties", str(ledger), "--period", ":", "--out", str(out), "--format", "json",
                             "--overwrite"])  # fmt: skip
        assert rc == 2
        assert "of the ledger" in capsys.readouterr().err
    assert target.read_bytes() == before
    assert shapley.RoyaltyLedger(ledger, create=False).verify() == 1
    for fine in ("l.jsonl.json", "l.jsonl.head.html"):  # a report named after the ledger is still written
        assert royalties_main(["royalties", str(ledger), "--period", ":", "--out", str(tmp_path / fine)]) == 0


def test_royalties_refuses_the_head_through_a_link_or_a_hard_link(tmp_path, capsys):
    ledger = tmp_path / "l.jsonl"
    _record(shapley.RoyaltyLedger(ledger), "g1")
    head = ledger.with_name("l.jsonl.head")
    before = head.read_bytes()
    (tmp_path / "sym.json").symlink_to(head)
    os.link(head, tmp_path / "hard.json")
    (tmp_path / "current.jsonl").symlink_to("l.jsonl")  # the ledger given through a link
    for led, out in ((ledger, "sym.json"), (ledger, "hard.json"), (tmp_path / "current.jsonl", "l.jsonl.head")):
        rc = royalties_main(["royalties", str(led), "--period", ":", "--out", str(tmp_path / out), "--format",
                             "json", "--overwrite"])  # fmt: skip
        assert rc == 2, out
        assert "head file of the ledger" in capsys.readouterr().err
    assert head.read_bytes() == before


# ---------------------------------------------------------------- repro_16: registry display names
@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ({"names": {"ann": 5}}, r"names\['ann'\] must be a non-empty string.*got 5 of type int"),
        ({"names": {"ann": ["=x"]}}, r"names\['ann'\] must be a non-empty string.*list"),
        ({"names": {"ann": "Ann"}, "works": {"w0": 1}}, r"works\['w0'\] must be a non-empty string"),
        ({"names": {"ann": "Ann"}, "merged": {"ann": None}}, r"merged\['ann'\] must be a non-empty string"),
    ],
)
def test_owner_registry_with_non_string_entries_is_refused_on_load(tmp_path, capsys, entries, match):
    reg = tmp_path / "reg.json"
    reg.write_text(json.dumps({"schema": "datavalue.shapley.owner-registry", **entries}))
    with pytest.raises(shapley.LedgerError, match="owner registry .*reg.json: .*" + match):
        shapley.OwnerRegistry.load(reg)
    ledger = tmp_path / "l.jsonl"
    _record(shapley.RoyaltyLedger(ledger), "g1")
    for ext in ("csv", "html"):
        rc = royalties_main(["royalties", str(ledger), "--period", ":", "--out", str(tmp_path / f"r.{ext}"),
                             "--registry", str(reg)])  # fmt: skip
        assert rc == 2
        err = capsys.readouterr().err
        assert err.startswith("datavalue royalties: error: owner registry") and "Traceback" not in err
        assert not (tmp_path / f"r.{ext}").exists()


def test_add_owner_refuses_a_display_name_that_is_not_a_string():
    with pytest.raises(shapley.InvalidGameError, match="display name of owner 'ann' must be a string; got 5"):
        shapley.OwnerRegistry().add_owner("ann", name=5)  # type: ignore[arg-type]


# ---------------------------------------------------------------- repro_18: one lock and one head through a link
def test_a_ledger_through_a_symlink_shares_the_lock_and_head_of_its_file(tmp_path):
    real = tmp_path / "2025.jsonl"
    shapley.RoyaltyLedger(real).close()
    link = tmp_path / "current.jsonl"
    link.symlink_to("2025.jsonl")
    via_link = shapley.RoyaltyLedger(link)
    assert via_link.lock_path == tmp_path / "2025.jsonl.lock"
    assert via_link.head_path == tmp_path / "2025.jsonl.head"
    _record(via_link, "g1")
    assert not (tmp_path / "current.jsonl.head").exists()
    assert link.is_symlink()  # the link itself is left as it is
    assert shapley.RoyaltyLedger(real).verify() == 1


def test_two_processes_appending_through_a_link_and_the_file_keep_one_chain(tmp_path):
    real = tmp_path / "2025.jsonl"
    shapley.RoyaltyLedger(real).close()
    link = tmp_path / "current.jsonl"
    link.symlink_to("2025.jsonl")
    child = textwrap.dedent(
        """
        import sys
        from decimal import Decimal
        from datavalue import shapley
        u = shapley.games.GloveGame(n=3, left={0}, right={1, 2}).utilities()
        led = shapley.RoyaltyLedger(sys.argv[1], lock_timeout=120)
        for i in range(25):
            led.record(output_id=f"{sys.argv[2]}-{i}", content=b"x", prompt="p" * 4000, revenue=Decimal("10.00"),
                       owners=["a", "b", "c"], utilities=u, timestamp="2025-01-15")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs = [subprocess.Popen([sys.executable, "-c", child, str(p), tag], env=env, stderr=subprocess.PIPE)
             for p, tag in ((real, "A"), (link, "B"))]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-500:]
    assert shapley.RoyaltyLedger(real).verify() == 50


# ---------------------------------------------------------------- repro_21: one writer per cache through a link
def test_a_second_cache_handle_through_a_symlink_is_refused(tmp_path):
    g1 = shapley.CoalitionGame(lambda S: float(len(S)), 3, cache_path=tmp_path / "c.jsonl")
    g1(frozenset([0]))
    (tmp_path / "link.jsonl").symlink_to("c.jsonl")
    with pytest.raises(shapley.CacheMismatchError, match="is locked by DiskCache"):
        shapley.CoalitionGame(lambda S: float(len(S)), 3, cache_path=tmp_path / "link.jsonl")
    g1.close()
    g2 = shapley.CoalitionGame(lambda S: 1 / 0, 3, cache_path=tmp_path / "link.jsonl")  # resumes the same cache
    assert g2(frozenset([0])) == 1.0
    assert g2.utility.disk.lock_path == tmp_path / "c.jsonl.lock"
    g2.close()


# ---------------------------------------------------------------- repro_22: the utility returns a number
@pytest.mark.parametrize("value", ["1.0", True, np.bool_(True), b"1"])
def test_a_utility_returning_a_string_or_a_bool_is_refused(tmp_path, value):
    game = shapley.CoalitionGame(lambda S: value, 2, cache_path=tmp_path / "u.jsonl")
    with pytest.raises(shapley.UtilityError, match="the utility must return a float.*Nothing is converted"):
        game.utilities()
    game.close()
    assert (tmp_path / "u.jsonl").read_text().count("\n") == 1  # only the header: nothing was cached
    with shapley.DiskCache(tmp_path / "d.jsonl", n=2) as c, pytest.raises(shapley.UtilityError, match="must be a float"):
        c.put(1, value)
    # numbers of any numeric type still work
    assert shapley.CoalitionGame(lambda S: np.float32(len(S)), 2).utilities().tolist() == [0.0, 1.0, 1.0, 2.0]


def test_a_cache_line_with_a_string_or_bool_value_is_refused(tmp_path):
    path = tmp_path / "u.jsonl"
    shapley.DiskCache(path, n=2).close()
    with open(path, "a") as f:
        f.write('{"mask": 1, "value": "1.0"}\n')
    with pytest.raises(shapley.CacheMismatchError, match="is not a cache record"):
        shapley.DiskCache(path, n=2)


def test_errors_doc_lists_these_tests():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "errors.md").read_text()
    section = doc[doc.index("## Third probe (issue 22)"):]
    here = {name for name in globals() if name.startswith("test_") and name != "test_errors_doc_lists_these_tests"}
    assert here <= set(re.findall(r"`(test_[a-z0-9_]+)`", section)), here - set(re.findall(r"`(test_[a-z0-9_]+)`", section))


def test_a_new_cache_through_a_link_is_written_where_the_link_leads(tmp_path):
    (tmp_path / "link.jsonl").symlink_to("c.jsonl")  # the cache does not exist yet
    with shapley.CoalitionGame(lambda S: float(len(S)), 2, cache_path=tmp_path / "link.jsonl") as g:
        g.utilities()
    assert (tmp_path / "link.jsonl").is_symlink()  # not replaced by a regular file
    assert (tmp_path / "c.jsonl").read_text().count("\n") == 5  # the header and 4 coalitions
