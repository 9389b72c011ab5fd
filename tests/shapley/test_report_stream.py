"""``write_report`` to an open text stream, and ``datavalue royalties --out -`` through it.

Before, ``write_report`` took only a path (a stream was refused as "must be a str or os.PathLike"),
and ``--out -`` wrote the report into a temporary directory and copied the file to stdout.
"""

from __future__ import annotations

import doctest
import io
from decimal import Decimal

import pytest

from datavalue import _cli_royalties, shapley
from datavalue.shapley.royalties import _report

PERIOD = "2025-01-01:2025-02-01"


@pytest.fixture
def ledger_path(tmp_path):
    led = shapley.RoyaltyLedger(tmp_path / "ledger.jsonl")
    owners = ["zoë", "<b>bob</b>", "cy & co"]  # a name outside ASCII, names that need escaping
    for day in (1, 2, 3):
        led.record(output_id=f"gen-{day}", content=f"out {day}", prompt="p", owners=owners,
                   revenue=Decimal(f"{day}.99"), royalty_rate=Decimal("0.3"), result=[1.0, 2.0, 0.5 * day],
                   timestamp=f"2025-01-0{day}")  # fmt: skip
    led.close()
    return led.path


@pytest.mark.parametrize("fmt", ["html", "json", "csv"])
def test_a_stream_gets_the_text_the_file_holds(ledger_path, tmp_path, fmt):
    st = shapley.RoyaltyLedger(ledger_path).statement(PERIOD)
    path = shapley.write_report(st, tmp_path / f"r.{fmt}")
    buf = io.StringIO()
    assert shapley.write_report(st, buf, format=fmt) is None
    assert buf.getvalue() == path.read_bytes().decode("utf-8")
    assert ("zo\\u00eb" if fmt == "json" else "zoë") in buf.getvalue()  # JSON escapes it, the others hold UTF-8


def test_a_stream_needs_a_format_and_takes_no_partial_text(ledger_path):
    st = shapley.RoyaltyLedger(ledger_path).statement(PERIOD)
    buf = io.StringIO()
    with pytest.raises(shapley.InvalidGameError, match="needs format="):
        shapley.write_report(st, buf)
    with pytest.raises(shapley.InvalidGameError, match="format must be one of"):
        shapley.write_report(st, buf, format="pdf")
    assert buf.getvalue() == ""


@pytest.mark.parametrize("fmt", ["html", "json", "csv"])
def test_royalties_out_dash_writes_the_files_bytes(ledger_path, tmp_path, capsysbinary, fmt):
    out = tmp_path / f"r.{fmt}"
    assert _cli_royalties.main(["royalties", str(ledger_path), "--period", PERIOD, "--out", str(out)]) == 0
    capsysbinary.readouterr()
    assert _cli_royalties.main(["royalties", str(ledger_path), "--period", PERIOD, "--out", "-", "--format", fmt]) == 0
    captured = capsysbinary.readouterr()
    assert captured.out == out.read_bytes()  # UTF-8, whatever the locale says
    assert b"standard output" in captured.err


def test_the_report_module_examples_run():
    result = doctest.testmod(_report, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
