"""Who may import whom (docs/design.md).

Two checks that see different things:

- the import-linter contracts in ``pyproject.toml`` (``[tool.importlinter]``): the static import
  graph, function-level and ``TYPE_CHECKING`` imports included: the "never" arrows between the
  parts, and no package importing another package's private module (``datavalue.store._writer``);
- fresh interpreters: what importing a module really loads (lazy imports of torch, dask, zarr are
  invisible to a static graph).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    # module: modules it must NOT pull in
    "datavalue": ["torch", "jax", "dask", "zarr"],
    "datavalue.shapley": ["torch", "jax", "datavalue.capture", "datavalue.store", "datavalue.embeddings", "pandas"],
    "datavalue.store": ["torch", "jax", "datavalue.capture", "datavalue.embeddings"],
    "datavalue.embeddings": ["torch", "jax", "datavalue.capture"],
    "datavalue.capture": ["jax", "datavalue.embeddings"],
}


@pytest.mark.parametrize("module", list(CASES))
def test_import_boundaries(module):
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        f"bad = [m for m in {CASES[module]!r} if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"{module} imports {out}"


def test_import_contracts():
    """``lint-imports`` on this checkout: every contract in pyproject.toml is kept."""
    try:
        import importlinter  # noqa: F401
    except ImportError:
        pytest.fail("import-linter is missing: pip install -e '.[dev]' (it checks the layering contracts).")
    # In a fresh interpreter from the repository root, so that the checkout's datavalue is the one
    # analysed (lint_imports puts the working directory first on sys.path).
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"import contracts broken (`lint-imports` shows the same):\n{proc.stdout}{proc.stderr}", pytrace=False)


def test_no_run_internals_outside_the_store():
    """A run's zarr group is the store's business: other packages use ``Run``'s public accessors
    (``run.array``, ``run.read``, ``run.chunk_rows``, ``run.subgroups``), never ``run._group``."""
    bad = []
    for path in sorted((ROOT / "datavalue").rglob("*.py")):
        if (ROOT / "datavalue" / "store") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "_group":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, f"reads a run's private zarr group (use datavalue.store's public accessors): {bad}"
