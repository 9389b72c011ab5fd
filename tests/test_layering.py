"""Who may import whom (docs/design.md), checked in fresh interpreters."""

import subprocess
import sys

import pytest

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
