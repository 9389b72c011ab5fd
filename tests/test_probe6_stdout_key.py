"""``datavalue royalties --out -`` (P6-14) reads a keyed ledger under the same rule as a file ``--out``
(P6-04): the two fixes met in the merge, and the standard-output path opened the ledger on its own,
without the key check (a tampered keyed ledger was written to stdout with exit 0)."""

from __future__ import annotations

import json

import pytest

from datavalue.cli import main

from .test_probe6_royalties_archive import KEY, PERIOD, _keyed_ledger, _tamper


@pytest.fixture(autouse=True)
def _no_key_in_env(monkeypatch):
    monkeypatch.delenv("DATAVALUE_LEDGER_KEY", raising=False)


def test_stdout_refuses_a_keyed_ledger_without_its_key(tmp_path, capsys):
    led = _keyed_ledger(tmp_path / "l.jsonl")
    assert main(["royalties", str(led), "--period", PERIOD, "--out", "-", "--format", "json"]) == 2
    captured = capsys.readouterr()
    assert "is a keyed ledger" in captured.err and captured.out == ""


def test_stdout_with_the_key_file_and_a_tampered_ledger(tmp_path, capsys):
    led = _keyed_ledger(tmp_path / "l.jsonl")
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    assert main(["royalties", str(led), "--period", PERIOD, "--out", "-", "--format", "json",
                 "--key-file", str(key_file)]) == 0
    assert json.loads(capsys.readouterr().out)["paid_total"] == "30.00"
    _tamper(led)
    assert main(["royalties", str(led), "--period", PERIOD, "--out", "-", "--format", "json",
                 "--key-file", str(key_file)]) == 2
    assert capsys.readouterr().out == ""


def test_stdout_unverified_says_so(tmp_path, capsys):
    led = _keyed_ledger(tmp_path / "l.jsonl")
    assert main(["royalties", str(led), "--period", PERIOD, "--out", "-", "--format", "json", "--unverified"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["paid_total"] == "30.00"
    assert "MACs not checked" in captured.err
