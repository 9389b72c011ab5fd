"""Royalty ledger: rows, replay, tamper detection, period statements, owner registry."""

from __future__ import annotations

import json
from decimal import Decimal

import numpy as np
import pytest

from datavalue import shapley
from datavalue.shapley import games


def glove_utilities(scale: float = 1.0) -> np.ndarray:
    return scale * games.GloveGame(n=3, left={0}, right={1, 2}).utilities()


def _value_row(led, output_id, result, *, owners, revenue=Decimal("10.00"), timestamp="2025-03-01", **kw):
    """Record a value-only row (``result=``, no utilities) whose content is its id, with an empty prompt."""
    return led.record(output_id=output_id, content=output_id.encode(), prompt="", revenue=revenue, owners=owners,
                      result=result, timestamp=timestamp, **kw)


@pytest.fixture
def ledger(tmp_path):
    led = shapley.RoyaltyLedger(tmp_path / "ledger.jsonl")
    led.record(output_id="g1", content=b"img-1", prompt="gloves", revenue=Decimal("10.00"),
               royalty_rate=Decimal("0.5"), owners=["ann", "bob", "cy"],
               utilities=glove_utilities(), timestamp="2025-01-10", model_fingerprint="sd-1.5",
               run_fingerprint="lora-2025-01")  # fmt: skip
    # Value-only row from an estimator (no utilities stored).
    res = shapley.permutation(games.UnanimityGame(n=3, carrier={1, 2}), n_samples=50, seed=0)
    led.record(
        output_id="g2",
        content="text output",
        prompt="pair",
        revenue=Decimal("3.00"),
        owners=["ann", "bob", "cy"],
        result=res,
        timestamp="2025-01-20T08:30:00+00:00",
    )
    # No positive contributor: pays nothing under srs-v1.
    led.record(
        output_id="g3",
        output_hash="sha256:abc",
        prompt="bad",
        revenue=Decimal("2.00"),
        owners=["ann", "bob"],
        result=[-1.0, -0.5],
        timestamp="2025-01-25",
    )
    # Next month.
    led.record(
        output_id="g4",
        content=b"img-4",
        prompt="gloves",
        revenue=Decimal("4.00"),
        owners=["ann", "dan", "cy"],
        utilities=glove_utilities(2.0),
        timestamp="2025-02-03",
    )
    return led


def test_rows_are_json_lines_with_everything_to_replay(ledger):
    lines = ledger.path.read_text().splitlines()
    assert json.loads(lines[0])["schema"] == "datavalue.shapley.royalty-ledger"
    row = json.loads(lines[1])
    for key in (
        "output_id",
        "output_hash",
        "prompt",
        "revenue",
        "pool",
        "policy",
        "model_fingerprint",
        "run_fingerprint",
        "utilities",
        "values",
        "stderr",
        "shares",
        "amounts",
        "timestamp",
    ):
        assert key in row
    assert row["pool"] == "5.00" and row["amounts"] == ["3.34", "0.83", "0.83"]
    assert row["policy"] == "srs-v1" and row["output_hash"].startswith("sha256:")
    assert len(row["utilities"]) == 8 and row["method"] == "exact"
    assert len(ledger) == 4


def test_reopen_appends_and_verifies(ledger):
    again = shapley.RoyaltyLedger(ledger.path, create=False)
    assert len(again) == 4 and again.verify() == 4
    row = again.record(
        output_id="g5",
        content=b"x",
        prompt="p",
        revenue=Decimal("1.00"),
        owners=["ann"],
        result=[1.0],
        timestamp="2025-02-10",
    )
    assert row.seq == 4 and row.prev_hash == again.records()[3].row_hash
    assert shapley.RoyaltyLedger(ledger.path).verify() == 5


def test_replay_recomputes_from_utilities(ledger):
    first = ledger.records()[0]
    split = ledger.replay(first)
    assert split.amounts == first.amounts


def test_tampering_is_detected(ledger):
    lines = ledger.path.read_text().splitlines()
    row = json.loads(lines[1])
    row["amounts"] = ["4.34", "0.33", "0.33"]  # someone moves money around
    lines[1] = json.dumps(row, sort_keys=True)
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(shapley.LedgerError, match="hash chain"):
        ledger.records()


def test_deleting_a_row_is_detected(ledger):
    lines = ledger.path.read_text().splitlines()
    ledger.path.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    with pytest.raises(shapley.LedgerError, match="hash chain"):
        shapley.RoyaltyLedger(ledger.path)


def test_replay_mismatch_raises(ledger):
    import dataclasses

    rec = ledger.records()[0]
    forged = dataclasses.replace(rec, amounts=(Decimal("5.00"), Decimal("0.00"), Decimal("0.00")))
    with pytest.raises(shapley.ReplayMismatchError):
        ledger.replay(forged)


def test_statement_share_then_sum(ledger):
    st = ledger.statement("2025-01-01:2025-02-01")
    assert st.n_generations == 3 and st.aggregation == "share-then-sum"
    assert st.pool_total == Decimal("5.00") + Decimal("3.00") + Decimal("2.00")
    assert st.unallocated_total == Decimal("2.00") and st.n_no_positive == 1
    rows = ledger.records("2025-01-01:2025-02-01")
    for owner in ("ann", "bob", "cy"):
        expected = sum(
            (a for r in rows for o, a in zip(r.owners, r.amounts, strict=True) if o == owner),
            Decimal(0),
        )
        assert st.amount_of(owner) == expected
    assert st.reconciles and st.paid_total == Decimal("8.00")
    assert "dan" not in {o.owner for o in st.owners}  # February only


def test_statement_average_then_share_is_a_different_named_rule(tmp_path):
    led = shapley.RoyaltyLedger(tmp_path / "l.jsonl")
    # Owner x is strongly positive on one output, negative on another; clipping is not linear.
    _value_row(led, "a", [3.0, 1.0], owners=["x", "y"])
    _value_row(led, "b", [-2.0, 1.0], owners=["x", "y"], timestamp="2025-03-02")
    sts = led.statement(None, aggregation="share-then-sum")
    ats = led.statement(None, aggregation="average-then-share")
    assert sts.amount_of("x") == Decimal("7.50") and sts.amount_of("y") == Decimal("12.50")
    # mean values: x = 0.5, y = 1.0 -> shares 1/3, 2/3 of the 20.00 period pool
    assert ats.amount_of("x") == Decimal("6.67") and ats.amount_of("y") == Decimal("13.33")
    assert sts.reconciles and ats.reconciles
    with pytest.raises(shapley.InvalidGameError):
        led.statement(None, aggregation="median")


def test_average_then_share_refuses_mixed_policies(tmp_path):
    led = shapley.RoyaltyLedger(tmp_path / "l.jsonl")
    _value_row(led, "a", [1.0], owners=["x"], revenue=1)
    _value_row(led, "b", [1.0], owners=["x"], revenue=1, policy="equal-v1")
    with pytest.raises(shapley.LedgerError, match="one policy"):
        led.statement(None, aggregation="average-then-share")


def test_registry_merges_shell_owners_in_statements(ledger):
    reg = shapley.OwnerRegistry(names={"ann": "Ann Art", "bob": "Bob", "cy": "Cy", "dan": "Dan"})
    reg.merge("cy", into="bob")  # cy turns out to be bob's shell
    st = ledger.statement("2025-01-01:2025-02-01", registry=reg)
    plain = ledger.statement("2025-01-01:2025-02-01")
    assert st.amount_of("bob") == plain.amount_of("bob") + plain.amount_of("cy")
    assert st.amount_of("cy") == 0 and st.reconciles
    assert {o.name for o in st.owners} == {"Ann Art", "Bob"}


def test_period_boundaries_are_half_open(ledger):
    assert [r.output_id for r in ledger.records("2025-01-10:2025-01-20T08:30:00")] == ["g1"]
    assert [r.output_id for r in ledger.records("2025-01-20T08:30:00:")] == ["g2", "g3", "g4"]
    assert [r.output_id for r in ledger.records(":2025-01-10")] == []
    with pytest.raises(shapley.InvalidGameError):
        shapley.Period.parse("2025-02-01:2025-01-01")
    with pytest.raises(shapley.InvalidGameError):
        shapley.Period.parse("january")


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"revenue": 1.5}, shapley.InvalidPoolError),
        ({"revenue": Decimal("-1.00")}, shapley.InvalidPoolError),
        ({"royalty_rate": Decimal("1.5")}, shapley.InvalidPoolError),
        ({"owners": ["a", "a"]}, shapley.InvalidGameError),
        ({"owners": ["a", "b", "c"]}, shapley.InvalidGameError),
        ({"result": [float("nan"), 1.0]}, shapley.InvalidValuesError),
        ({"result": None}, shapley.InvalidGameError),
        ({"policy": "nope-v1"}, shapley.PolicyError),
        ({"content": None}, shapley.InvalidGameError),
        ({"timestamp": "yesterday"}, shapley.InvalidGameError),
    ],
)
def test_bad_rows_are_rejected_before_writing(tmp_path, kwargs, error):
    led = shapley.RoyaltyLedger(tmp_path / "l.jsonl")
    base = dict(
        output_id="a",
        content=b"a",
        prompt="",
        revenue=Decimal("1.00"),
        owners=["a", "b"],
        result=[1.0, 2.0],
        timestamp="2025-01-01",
    )
    with pytest.raises(error):
        led.record(**{**base, **kwargs})
    assert len(shapley.RoyaltyLedger(tmp_path / "l.jsonl").records()) == 0


def test_currency_is_fixed_per_ledger(tmp_path):
    shapley.RoyaltyLedger(tmp_path / "eur.jsonl", currency="EUR")
    assert shapley.RoyaltyLedger(tmp_path / "eur.jsonl").currency == "EUR"
    with pytest.raises(shapley.LedgerError, match="one ledger per currency"):
        shapley.RoyaltyLedger(tmp_path / "eur.jsonl", currency="USD")


def test_missing_ledger_and_wrong_files(tmp_path):
    with pytest.raises(shapley.LedgerNotFoundError) as info:
        shapley.RoyaltyLedger(tmp_path / "nope.jsonl", create=False)
    assert isinstance(info.value, FileNotFoundError)
    other = tmp_path / "other.jsonl"
    other.write_text('{"schema": "something-else"}\n')
    with pytest.raises(shapley.LedgerError, match="not a royalty ledger"):
        shapley.RoyaltyLedger(other)


# ------------------------------------------------------------------ owner registry
def test_owner_registry_round_trip_and_errors(tmp_path):
    reg = shapley.OwnerRegistry(
        {"w1": "acme", "w2": "acme-shell", "w3": "bee"}, names={"acme": "ACME"}
    )
    reg.merge("acme-shell", into="acme")
    assert reg.owner_of("w2") == "acme" and reg.works_of("acme") == ["w1", "w2"]
    assert reg.shells_of("acme") == ["acme-shell"] and reg.owners() == ["acme", "bee"]
    owners, unions = reg.partition(["w3", "w1", "w2"])
    assert owners == ("bee", "acme") and unions == ((0,), (1, 2))
    path = tmp_path / "owners.json"
    reg.save(path)
    with pytest.raises(shapley.OutputExistsError):
        reg.save(path)
    back = shapley.OwnerRegistry.load(path)
    assert back.to_dict() == reg.to_dict() and back.name("acme-shell") == "ACME"
    with pytest.raises(shapley.UnknownOwnerError, match="w9") as info:
        reg.owner_of("w9")
    assert isinstance(info.value, KeyError) and "w9" in str(info.value)
    with pytest.raises(shapley.UnknownOwnerError):
        reg.merge("ghost", into="acme")
    with pytest.raises(shapley.InvalidGameError):
        reg.merge("acme", into="acme")
    with pytest.raises(shapley.InvalidGameError, match="already held"):
        reg.assign("w1", "bee")
    reg.merge("bee", into="acme-shell")  # follows to acme; no cycles possible
    assert reg.owners() == ["acme"]
