"""JSON / CSV / HTML reports, the ``datavalue royalties`` subcommand, and the import rule."""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import pathlib
import subprocess
import sys
from decimal import Decimal

import pytest

from datavalue import _cli_royalties, shapley
from datavalue.shapley import games


@pytest.fixture
def ledger_path(tmp_path):
    led = shapley.RoyaltyLedger(tmp_path / "ledger.jsonl")
    g = games.GloveGame(n=3, left={0}, right={1, 2})
    owners = ["ann", "<b>bob</b>", "cy & co"]  # names that need escaping
    for day in range(1, 8):
        res = shapley.permutation(g, n_samples=40, seed=day)
        led.record(output_id=f"gen-{day}", content=f"out {day}", prompt="p", owners=owners,
                   revenue=Decimal(f"{day}.99"), royalty_rate=Decimal("0.3"), result=res,
                   timestamp=f"2025-01-{day:02d}")  # fmt: skip
    led.record(
        output_id="neg",
        content="n",
        prompt="p",
        owners=owners[:2],
        revenue=Decimal("1.00"),
        result=[-1.0, -2.0],
        timestamp="2025-01-09",
    )
    return led.path


def statement(path):
    return shapley.RoyaltyLedger(path).statement("2025-01-01:2025-02-01")


def test_json_report(ledger_path, tmp_path):
    out = shapley.write_report(statement(ledger_path), tmp_path / "r.json")
    doc = json.loads(out.read_text())
    assert doc["reconciles"] is True and doc["n_generations"] == 8
    paid = sum(Decimal(o["amount"]) for o in doc["owners"])
    assert paid == Decimal(doc["paid_total"])
    assert paid + Decimal(doc["unallocated_total"]) == Decimal(doc["pool_total"])
    assert doc["n_no_positive"] == 1 and doc["aggregation"] == "share-then-sum"


def test_csv_report_reconciles(ledger_path, tmp_path):
    out = shapley.write_report(statement(ledger_path), tmp_path / "r.csv")
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    owners = [r for r in rows if r["kind"] == "owner"]
    unalloc = next(r for r in rows if r["kind"] == "unallocated")
    total = next(r for r in rows if r["kind"] == "pool_total")
    assert len(owners) == 3
    assert sum(Decimal(r["amount"]) for r in owners) + Decimal(unalloc["amount"]) == Decimal(
        total["amount"]
    )


def test_html_report_is_self_contained(ledger_path, tmp_path):
    out = shapley.write_report(statement(ledger_path), tmp_path / "r.html")
    html = out.read_text()
    assert html.count("<svg") == 3 and "<script" not in html
    assert "src=" not in html and "href=" not in html  # nothing external
    assert "<b>bob</b>" not in html and "&lt;b&gt;bob&lt;/b&gt;" in html
    assert "reconciles exactly" in html
    ET = pytest.importorskip("xml.etree.ElementTree")
    for chunk in html.split("<svg")[1:]:
        ET.fromstring("<svg" + chunk.split("</svg>")[0] + "</svg>")  # well-formed SVG


def test_writer_refuses_to_overwrite(ledger_path, tmp_path):
    st = statement(ledger_path)
    out = tmp_path / "r.html"
    out.write_text("keep me")
    with pytest.raises(shapley.OutputExistsError) as info:
        shapley.write_report(st, out)
    assert isinstance(info.value, FileExistsError) and out.read_text() == "keep me"
    shapley.write_report(st, out, overwrite=True)
    assert "<svg" in out.read_text()
    with pytest.raises(shapley.InvalidGameError, match="extension"):
        shapley.write_report(st, tmp_path / "r.pdf")


def parse(argv):
    parser = argparse.ArgumentParser(prog="datavalue")
    sub = parser.add_subparsers(dest="command")
    _cli_royalties.add_parser(sub)
    return parser.parse_args(argv)


def test_cli_writes_each_format(ledger_path, tmp_path, capsys):
    for name, fmt in (("r.html", None), ("r.json", None), ("r.csv", None), ("r.txt", "json")):
        argv = ["royalties", str(ledger_path), "--period", "2025-01-01:2025-02-01",
                "--out", str(tmp_path / name)]  # fmt: skip
        if fmt:
            argv += ["--format", fmt]
        args = parse(argv)
        assert args.command == "royalties"
        assert _cli_royalties.run(args) == 0
    assert json.loads((tmp_path / "r.txt").read_text())["reconciles"] is True
    assert "wrote" in capsys.readouterr().out


def test_cli_refuses_overwrite_without_flag(ledger_path, tmp_path, capsys):
    out = tmp_path / "r.html"
    out.write_text("old")
    argv = ["royalties", str(ledger_path), "--period", "2025-01-01:2025-02-01", "--out", str(out)]
    assert _cli_royalties.run(parse(argv)) == 2
    assert out.read_text() == "old" and "--overwrite" in capsys.readouterr().err
    assert _cli_royalties.run(parse(argv + ["--overwrite"])) == 0
    assert "<svg" in out.read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--period", "2025-02-01:2025-01-01"], "START:END"),
        (
            ["--period", "2025-01-01:2025-02-01", "--registry", "/nonexistent/owners.json"],
            "does not exist",
        ),
    ],
)
def test_cli_errors_are_reported(ledger_path, tmp_path, capsys, extra, message):
    argv = ["royalties", str(ledger_path), "--out", str(tmp_path / "r.html"), *extra]
    assert _cli_royalties.run(parse(argv)) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_ledger_and_bad_extension(tmp_path, capsys):
    args = parse(
        [
            "royalties",
            str(tmp_path / "none.jsonl"),
            "--period",
            ":",
            "--out",
            str(tmp_path / "r.html"),
        ]
    )
    assert _cli_royalties.run(args) == 2
    args = parse(
        [
            "royalties",
            str(tmp_path / "none.jsonl"),
            "--period",
            ":",
            "--out",
            str(tmp_path / "r.pdf"),
        ]
    )
    assert _cli_royalties.run(args) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "extension" in err


def test_cli_usage_and_required_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        parse(["royalties", "ledger.jsonl"])
    assert info.value.code == 2
    assert (
        "datavalue royalties LEDGER --period START:END --out report.html" in capsys.readouterr().err
    )


def test_cli_standalone_main(ledger_path, tmp_path):
    out = tmp_path / "r.json"
    argv = ["royalties", str(ledger_path), "--period", "2025-01-01:", "--out", str(out),
            "--aggregation", "average-then-share"]  # fmt: skip
    assert _cli_royalties.main(argv) == 0
    assert json.loads(out.read_text())["aggregation"] == "average-then-share"


def test_main_cli_dispatches_royalties(ledger_path, tmp_path):
    cli = pytest.importorskip("datavalue.cli")
    out = tmp_path / "r.csv"
    argv = ["royalties", str(ledger_path), "--period", "2025-01-01:2025-02-01", "--out", str(out)]
    assert cli.main(argv) == 0 and out.exists()


def test_errors_join_the_package_tree():
    from datavalue.errors import DataValueError

    assert issubclass(shapley.ShapleyError, DataValueError)
    assert issubclass(shapley.InvalidPoolError, ValueError)


# ------------------------------------------------------------------ import rule
FORBIDDEN = ("torch", "pandas", "matplotlib", "dask", "distributed", "pickle", "jax")


def test_shapley_imports_numpy_scipy_and_stdlib_only():
    pkg = pathlib.Path(shapley.__file__).parent
    for src in [*pkg.rglob("*.py"), pathlib.Path(_cli_royalties.__file__)]:
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                ok = (
                    top in ("numpy", "scipy", "datavalue", "__future__")
                    or top in sys.stdlib_module_names
                )
                assert ok and top not in FORBIDDEN, f"{src.name} imports {name}"
                if top == "datavalue":  # itself, the dependency-free error root, the shared lock and temp files
                    assert name.startswith("datavalue.shapley") or name in (
                        "datavalue",
                        "datavalue.errors",
                        "datavalue._lock",
                        "datavalue._files",
                    ), name


def test_importing_shapley_loads_no_heavy_dependency():
    # (pickle itself is loaded by numpy/scipy internals; the package never uses it, see above.)
    heavy = tuple(m for m in FORBIDDEN if m != "pickle")
    code = (
        "import sys, datavalue; before = set(sys.modules); import datavalue.shapley; "
        f"new = {{m.split('.')[0] for m in set(sys.modules) - before}}; "
        f"bad = new & set({heavy!r}); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
