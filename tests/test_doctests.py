"""The runnable examples in the docstrings of the configs and the step pipeline."""

import doctest
import importlib

import pytest

MODULES = [
    "datavalue._memory",
    "datavalue.capture._config",
    "datavalue.capture._pipeline",
    "datavalue.capture.recorder",
    "datavalue.embeddings._config",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
