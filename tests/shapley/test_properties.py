"""Shapley axioms as hypothesis properties, for every estimator.

Where an axiom holds for every sample it is checked to rounding (``EXACT``); where it holds only
in expectation it is checked within the estimator's own error, ``Z * stderr + ABS_TOL``:

================  ==========  ==========  ==========  ===========
estimator         efficiency  null        symmetry    linearity*
================  ==========  ==========  ==========  ===========
exact, owen_exact exact       exact       exact       exact
permutation       exact       exact       stderr      exact
owen_permutation  exact       exact       stderr      exact
stratified unif.  stderr      exact       stderr      exact
stratified neym.  stderr      exact       stderr      stderr
kernel_shap       exact       stderr      stderr      exact
banzhaf_msr       (none)      stderr      stderr      exact
================  ==========  ==========  ==========  ===========

(*) same seed for v, w and a v + b w: the samples drawn do not depend on the utility unless the
allocation adapts to it (Neyman). Banzhaf is not efficient by definition.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from datavalue import shapley

from ._helpers import ABS_TOL, PROPERTY, TableGame, Z, symmetrized, tables, with_null

EXACT = 1e-9


def _rel(table) -> float:
    return EXACT * (1.0 + float(np.abs(table).max()))


ESTIMATORS = {
    "exact": (shapley.exact, "exact", "exact", "exact"),
    "owen_exact": (
        lambda v, n, seed: shapley.owen_exact(v, n, unions(n)),
        "exact",
        "exact",
        "exact",
    ),
    "permutation": (partial(shapley.permutation, n_samples=200), "exact", "exact", "exact"),
    "permutation_plain": (
        partial(shapley.permutation, n_samples=200, antithetic=False),
        "exact",
        "exact",
        "exact",
    ),
    "owen_permutation": (
        lambda v, n, seed: shapley.owen_permutation(v, n, unions(n), n_samples=200, seed=seed),
        "exact",
        "exact",
        "exact",
    ),
    "stratified_uniform": (
        partial(shapley.stratified, n_samples=120, pilot=2, census_max=2, allocation="uniform"),
        "stderr",
        "exact",
        "exact",
    ),
    "stratified_neyman": (
        partial(shapley.stratified, n_samples=120, pilot=2, census_max=2),
        "stderr",
        "exact",
        "stderr",
    ),
    "kernel_regression": (partial(shapley.kernel_shap, n_samples=200), "exact", "stderr", "exact"),
    "kernel_unbiased": (
        partial(shapley.kernel_shap, n_samples=200, variant="unbiased"),
        "exact",
        "stderr",
        "exact",
    ),
    "banzhaf_msr": (partial(shapley.banzhaf_msr, n_samples=300), None, "stderr", "exact"),
}
# (fn, efficiency, null, linearity); symmetry is exact only for the exact methods.
EXACT_SYMMETRY = {"exact", "owen_exact"}


def unions(n: int) -> list[list[int]]:
    """Owners for the Owen estimators: works {0, 1} with one owner, the rest with another."""
    return [[0, 1], list(range(2, n))] if n > 2 else [[0, 1]]


def run(name, table, seed):
    fn = ESTIMATORS[name][0]
    game = TableGame(table)
    if name == "exact":
        return fn(game, game.n)
    return fn(game, game.n, seed=seed)


names = pytest.mark.parametrize("name", sorted(ESTIMATORS))
seeds = st.integers(0, 2**32 - 1)


@pytest.mark.parametrize("name", sorted(k for k, v in ESTIMATORS.items() if v[1] is not None))
@PROPERTY
@given(table=tables(), seed=seeds)
def test_efficiency(name, table, seed):
    # Banzhaf MSR is excluded: the Banzhaf index is not efficient (see test_exact).
    kind = ESTIMATORS[name][1]
    res = run(name, table, seed)
    gap = abs(res.values.sum() - (table[-1] - table[0]))
    if kind == "exact":
        assert gap <= _rel(table)
    else:
        assert gap <= Z * res.stderr.sum() + ABS_TOL


@names
@PROPERTY
@given(table=tables(), seed=seeds, data=st.data())
def test_null_player(name, table, seed, data):
    k = data.draw(st.integers(0, int(table.size).bit_length() - 2))
    res = run(name, with_null(table, k), seed)
    if ESTIMATORS[name][2] == "exact":
        assert res.values[k] == 0.0 or abs(res.values[k]) <= _rel(table)
    else:
        assert abs(res.values[k]) <= Z * res.stderr[k] + ABS_TOL


@names
@PROPERTY
@given(table=tables(), seed=seeds, data=st.data())
def test_symmetry(name, table, seed, data):
    n = int(table.size).bit_length() - 1
    i, j = data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
    if name.startswith("owen"):  # Owen symmetry: symmetric works of the same owner
        i, j = 0, 1
    res = run(name, symmetrized(table, i, j), seed)
    gap = abs(res.values[i] - res.values[j])
    if name in EXACT_SYMMETRY:
        assert gap <= _rel(table)
    else:  # the two estimates share samples: bound the sd of the difference by the sum
        assert gap <= Z * (res.stderr[i] + res.stderr[j]) + ABS_TOL


@names
@PROPERTY
@given(data=st.data(), seed=seeds, a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_linearity(name, data, seed, a, b):
    t1 = data.draw(tables(min_n=3, max_n=4))
    t2 = data.draw(tables(min_n=t1.size.bit_length() - 1, max_n=t1.size.bit_length() - 1))
    r1, r2 = run(name, t1, seed), run(name, t2, seed)
    rc = run(name, a * t1 + b * t2, seed)
    gap = np.abs(rc.values - (a * r1.values + b * r2.values))
    if ESTIMATORS[name][3] == "exact":
        assert gap.max() <= 10 * (_rel(t1) + _rel(t2)) * (1 + abs(a) + abs(b))
    else:
        bound = Z * (rc.stderr + abs(a) * r1.stderr + abs(b) * r2.stderr) + ABS_TOL
        assert np.all(gap <= bound)


@PROPERTY
@given(table=tables(), seed=seeds)
def test_permutation_efficiency_holds_for_a_single_sample(table, seed):
    game = TableGame(table)
    for antithetic in (True, False):
        res = shapley.permutation(game, n_samples=1, seed=seed, antithetic=antithetic)
        assert res.n_samples.min() >= 1
        assert abs(res.values.sum() - (table[-1] - table[0])) <= _rel(table)
