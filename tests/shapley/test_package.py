"""The package as a newcomer meets it: public names, the subpackage map, resolvable type hints."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing

import pytest

from datavalue import shapley

# Today's public API (issue 21): every name stays importable from ``datavalue.shapley``.
PUBLIC = {
    "MAX_EXACT_PLAYERS", "AdditiveGame", "CacheMismatchError", "CoalitionGame", "DiskCache",
    "GenerationLine", "GenerationRecord", "InvalidGameError", "InvalidPoolError",
    "InvalidValuesError", "LedgerError", "LedgerNotFoundError", "MaxEvaluations", "MaxSamples",
    "MaxTime", "NoPositiveContributionError", "OutputExistsError", "OutputPathError", "OwnerLine", "OwnerRegistry",
    "Period", "PeriodStatement", "PolicyError", "Progress", "ReplayMismatchError",
    "RoyaltyLedger", "RoyaltyPolicy", "RoyaltySplit", "ShapleyError", "ShapleyResult",
    "StderrBelow", "StoppingRule", "TooManyPlayersError", "UnknownOwnerError", "Utility",
    "UtilityError", "available_policies", "banzhaf_msr", "exact", "exact_banzhaf",
    "exact_from_utilities", "exact_sum", "exact_weights", "fgsv_exact", "fgsv_from_utilities",
    "fgsv_weights", "games", "get_policy",
    "group_shapley", "infer_format", "kernel_shap", "owen_exact", "owen_from_utilities",
    "owen_permutation", "permutation", "register_policy", "render_report", "split_royalties",
    "stratified", "write_report",
}  # fmt: skip


def test_public_names_are_exactly_the_documented_ones():
    assert set(shapley.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(shapley, name) is not None, name


def test_games_module_path_keeps_the_analytic_games():
    from datavalue.shapley import games

    for name in ("AdditiveGame", "AirportGame", "Game", "GloveGame", "SymmetricGame",
                 "UnanimityGame", "WeightedVotingGame"):  # fmt: skip
        assert name in games.__all__ and hasattr(games, name), name
    assert shapley.AdditiveGame is games.AdditiveGame


def test_every_module_imports_first():
    """No import cycle hides behind the package's import order: each module, imported before any
    other module of the package (in one fresh interpreter, forgetting the package in between),
    loads."""
    import subprocess
    import sys

    names = [m.name for m in pkgutil.walk_packages(shapley.__path__, "datavalue.shapley.")]
    assert {"datavalue.shapley.games", "datavalue.shapley.estimators",
            "datavalue.shapley.royalties"} <= set(names)  # fmt: skip
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for mod in [m for m in sys.modules if m.startswith('datavalue.shapley')]:\n"
        "        del sys.modules[mod]\n"
        "    importlib.import_module(name)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _public_objects():
    for name in sorted(shapley.__all__):
        obj = getattr(shapley, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield name, obj
            if inspect.isclass(obj):
                for meth_name, meth in vars(obj).items():
                    if inspect.isfunction(meth) and not meth_name.startswith("_"):
                        yield f"{name}.{meth_name}", meth


@pytest.mark.parametrize(("name", "obj"), list(_public_objects()), ids=lambda x: str(x)[:40])
def test_type_hints_resolve(name, obj):
    """``typing.get_type_hints`` works on every public class and function (it raised NameError
    on ``PeriodStatement`` while ``_statement`` imported ``_ledger``'s types under
    ``TYPE_CHECKING`` only, to dodge the ``_ledger`` <-> ``_statement`` cycle)."""
    typing.get_type_hints(obj)
    if inspect.isclass(obj):
        typing.get_type_hints(obj.__init__)


def test_period_statement_hints_name_the_ledger_types():
    hints = typing.get_type_hints(shapley.PeriodStatement)
    assert hints["period"] is shapley.Period
    from datavalue.shapley.royalties._statement import build_statement

    hints = typing.get_type_hints(build_statement)
    assert hints["period"] is shapley.Period


def test_subpackages_depend_one_way():
    """games <- estimators <- royalties: a lower layer never imports a higher one."""
    import ast
    import pathlib

    root = pathlib.Path(shapley.__file__).parent
    forbidden = {"games": ("estimators", "royalties"), "estimators": ("royalties",)}
    for sub, above in forbidden.items():
        for src in (root / sub).rglob("*.py"):
            for node in ast.walk(ast.parse(src.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    for up in above:
                        assert not node.module.startswith(f"datavalue.shapley.{up}"), (
                            src,
                            node.module,
                        )
    for src in root.glob("_*.py"):
        if src.name == "__init__.py":
            continue  # the shared modules (_errors, _validation) import no layer
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                for up in ("games", "estimators", "royalties"):
                    assert not node.module.startswith(f"datavalue.shapley.{up}"), (src, node.module)


def test_importing_a_subpackage_alone_works():
    for sub in ("games", "estimators", "royalties"):
        importlib.import_module(f"datavalue.shapley.{sub}")
