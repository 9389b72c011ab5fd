"""The runnable examples: module docstrings and the code blocks of docs/shapley.md."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import re

import pytest

import datavalue.shapley as pkg

_ROOT = pathlib.Path(pkg.__file__).parent
MODULES = sorted(
    ".".join(("datavalue", "shapley", *p.relative_to(_ROOT).with_suffix("").parts))
    for p in _ROOT.rglob("*.py")
) + ["datavalue._cli_royalties"]
DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "shapley.md"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name.removesuffix(".__init__"))
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def _blocks():
    if not DOC.exists():
        return []
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_docs_code_blocks_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_blocks()[index], f"docs/shapley.md[block {index}]", "exec"), {})


def test_docs_exist_and_have_examples():
    assert len(_blocks()) >= 6
