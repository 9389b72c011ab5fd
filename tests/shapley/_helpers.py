"""Shared strategies and tolerances for the shapley tests.

Statistical checks use the estimators' own standard errors: an estimate passes when
``|estimate - truth| <= Z * stderr + ABS_TOL`` with ``Z = 4`` (a 4-sigma band: false alarms have
probability ~6e-5 per comparison under normality). Hypothesis runs derandomized, so every test is
deterministic; seeds of the estimators are drawn from the examples.

The royalty-ledger tests share :func:`ledger_row` (one paid output) and :func:`two_row_ledger`.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from datavalue import shapley

Z = 4.0
ABS_TOL = 1e-9

# Deterministic, no deadline (the first call of an estimator imports scipy lazily in places).
PROPERTY = settings(
    derandomize=True,
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow],
)


class TableGame:
    """A game given by its utilities for every coalition (indexed by bitmask)."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = np.asarray(table, dtype=np.float64)
        self.n = int(self.table.size).bit_length() - 1

    def __call__(self, coalition) -> float:
        return float(self.table[sum(1 << i for i in coalition)])


def mask_table(n: int, fn) -> np.ndarray:
    """Utilities of ``fn(frozenset)`` over all coalitions by bitmask."""
    return np.array(
        [fn(frozenset(i for i in range(n) if m >> i & 1)) for m in range(1 << n)], dtype=float
    )


def symmetrized(table: np.ndarray, i: int, j: int) -> np.ndarray:
    """Average the game with its (i j)-swapped copy: players i and j become symmetric."""
    n = int(table.size).bit_length() - 1
    out = np.empty_like(table)
    for m in range(1 << n):
        bi, bj = m >> i & 1, m >> j & 1
        swapped = m & ~((1 << i) | (1 << j)) | (bi << j) | (bj << i)
        out[m] = 0.5 * (table[m] + table[swapped])
    return out


def with_null(table: np.ndarray, k: int) -> np.ndarray:
    """``v'(S) = v(S minus k)``: player k becomes a null player."""
    n = int(table.size).bit_length() - 1
    return np.array([table[m & ~(1 << k)] for m in range(1 << n)])


@st.composite
def tables(draw, min_n: int = 2, max_n: int = 5):
    """Random games: utilities in [-10, 10] for every coalition of 2..5 players."""
    n = draw(st.integers(min_n, max_n))
    values = draw(
        st.lists(
            st.floats(-10, 10, allow_nan=False, allow_subnormal=False),
            min_size=1 << n,
            max_size=1 << n,
        )
    )
    return np.array(values)


def ledger_row(led, output_id, *, revenue="10.00", **kw):
    """Record one paid output ``output_id`` in the ledger ``led``: owners ann and bob with equal results,
    ``revenue`` (a decimal string), on 2025-01-10; ``kw`` goes to ``RoyaltyLedger.record``."""
    return led.record(output_id=output_id, content=output_id, prompt="p", revenue=Decimal(revenue),
                      owners=["ann", "bob"], result=[1.0, 1.0], timestamp="2025-01-10", **kw)  # fmt: skip


def two_row_ledger(directory: Path) -> Path:
    """A closed ledger ``directory / "ledger.jsonl"`` (and its head file) with two rows: g1 paid 10.00,
    g2 paid 5.00."""
    path = directory / "ledger.jsonl"
    led = shapley.RoyaltyLedger(path)
    ledger_row(led, "g1", revenue="10.00")
    ledger_row(led, "g2", revenue="5.00")
    led.close()
    return path
