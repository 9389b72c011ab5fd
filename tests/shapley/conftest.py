"""Fixtures for the shapley tests (no global hypothesis profile: settings are per test)."""

from __future__ import annotations

import threading

import pytest


class Counter:
    """Wraps a utility and counts (thread-safely) how often each coalition is evaluated."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls: dict[frozenset, int] = {}
        self.lock = threading.Lock()

    def __call__(self, coalition: frozenset) -> float:
        with self.lock:
            self.calls[coalition] = self.calls.get(coalition, 0) + 1
        return self.fn(coalition)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


@pytest.fixture
def counter():
    """Factory: ``counter(fn)`` returns a counting wrapper."""
    return Counter
