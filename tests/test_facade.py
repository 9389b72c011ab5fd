"""The lazy facades are visible to type checkers (``py.typed``).

``datavalue`` and ``datavalue.query`` load their names on first use (``__getattr__``), which a type
checker cannot follow: each also imports every public name under ``if TYPE_CHECKING:``. These tests
keep that block, ``__all__`` and the lazy table in step. (That ``import datavalue`` loads no torch or
dask is checked in ``tests/test_layering.py``.)
"""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _type_checking_imports(path: Path) -> dict[str, tuple[str, str]]:
    """``{alias: (module, name)}`` of the ``from m import n as alias`` lines under ``if TYPE_CHECKING:``."""
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.module, ast.unparse(stmt)
                for alias in stmt.names:
                    assert alias.asname == alias.name, f"re-export as itself: {ast.unparse(stmt)}"
                    out[alias.name] = (stmt.module, alias.name)
    return out


@pytest.mark.parametrize("module", ["datavalue", "datavalue.query"])
def test_every_public_name_is_imported_for_type_checkers(module):
    path = ROOT.joinpath(*module.split(".")) / "__init__.py"
    seen = _type_checking_imports(path)
    mod = importlib.import_module(module)
    public = set(mod.__all__) - {"__version__"}
    assert set(seen) == public, f"{module}: under TYPE_CHECKING but not in __all__: {sorted(set(seen) - public)}; " \
                                f"in __all__ but not under TYPE_CHECKING: {sorted(public - set(seen))}"
    for name, (source, attr) in seen.items():
        # the name a type checker sees is the object the lazy __getattr__ returns
        assert getattr(mod, name) is getattr(importlib.import_module(source), attr), f"{module}.{name}"
