"""Exact enumeration in weight-matrix form, and typed errors at the boundary."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from datavalue import shapley
from datavalue.shapley import games
from datavalue.shapley.estimators import _exact

from ._helpers import TableGame


def shapley_by_permutations(table: np.ndarray) -> np.ndarray:
    """Textbook oracle: average marginal contribution over all n! orders."""
    n = int(table.size).bit_length() - 1
    phi = np.zeros(n)
    for order in itertools.permutations(range(n)):
        mask = 0
        for i in order:
            phi[i] += table[mask | 1 << i] - table[mask]
            mask |= 1 << i
    return phi / math.factorial(n)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_exact_matches_all_orders_oracle(n):
    table = np.random.default_rng(n).normal(size=1 << n)
    np.testing.assert_allclose(
        shapley.exact(TableGame(table)).values, shapley_by_permutations(table), atol=1e-12
    )


@pytest.mark.parametrize("n", [1, 3, 7])
def test_weight_columns_encode_efficiency(n):
    W = shapley.exact_weights(n)
    assert W.shape == (n, 1 << n) and not W.flags.writeable
    col = W.sum(axis=0)
    expected = np.zeros(1 << n)
    expected[0], expected[-1] = -1.0, 1.0
    np.testing.assert_allclose(col, expected, atol=1e-12)


def test_many_outputs_are_one_matrix_product():
    n, m = 6, 9
    U = np.random.default_rng(1).normal(size=(m, 1 << n))
    batch = shapley.exact_from_utilities(U)
    assert batch.shape == (m, n)
    np.testing.assert_allclose(batch, U @ shapley.exact_weights(n).T)
    for r in range(m):
        np.testing.assert_allclose(batch[r], shapley.exact(TableGame(U[r])).values, atol=1e-12)


def test_large_n_gather_path_equals_matrix_path(monkeypatch):
    U = np.random.default_rng(2).normal(size=(3, 1 << 7))
    for index in ("shapley", "banzhaf"):
        dense = shapley.exact_from_utilities(U, index=index)
        monkeypatch.setattr(_exact, "_MATRIX_MAX_N", 2)
        gathered = shapley.exact_from_utilities(U, index=index)
        monkeypatch.undo()
        np.testing.assert_allclose(gathered, dense, atol=1e-12)


def test_exact_result_fields():
    res = shapley.exact(games.UnanimityGame(n=4, carrier={0, 1}))
    assert res.n_evaluations == 16 and res.converged and res.method == "exact"
    assert np.all(res.stderr == 0) and res.n_samples.tolist() == [8, 8, 8, 8]
    assert not res.values.flags.writeable


def test_exact_banzhaf_is_not_efficient_but_rescales():
    g = games.WeightedVotingGame(quota=3, weights=(2, 1, 1))
    b = shapley.exact_banzhaf(g)
    np.testing.assert_allclose(b.values, [0.75, 0.25, 0.25])
    assert not math.isclose(b.total, 1.0)
    np.testing.assert_allclose(b.rescaled(1.0).total, 1.0)


def test_n_may_come_from_the_game_and_must_agree():
    g = games.SymmetricGame(n=3, f=[0, 1, 2, 3])
    assert shapley.exact(g).n == 3
    with pytest.raises(shapley.InvalidGameError, match="disagrees"):
        shapley.exact(g, 4)
    with pytest.raises(shapley.InvalidGameError, match="pass n"):
        shapley.exact(lambda S: 0.0)


@pytest.mark.parametrize("n", [0, -3])
def test_n_below_one_is_rejected(n):
    with pytest.raises(shapley.InvalidGameError, match=">= 1") as info:
        shapley.exact(lambda S: 0.0, n)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("n", ["3", 2.0, True, None])
def test_n_of_wrong_type_is_rejected(n):
    with pytest.raises(shapley.InvalidGameError):
        shapley.permutation(lambda S: 0.0, n, n_samples=2)


def test_n_too_large_for_exact_suggests_permutation():
    with pytest.raises(shapley.TooManyPlayersError, match="permutation") as info:
        shapley.exact(lambda S: 0.0, shapley.MAX_EXACT_PLAYERS + 1)
    assert "expected n <= 20" in str(info.value)
    with pytest.raises(shapley.TooManyPlayersError):
        shapley.exact_weights(25)


@pytest.mark.parametrize(
    "u, match",
    [
        (np.zeros(6), "2\\*\\*n"),
        (np.zeros(1), "2\\*\\*n"),
        (np.array([0.0, np.nan, 1.0, 2.0]), "finite"),
        (np.zeros((2, 2, 4)), "1-D or 2-D"),
    ],
)
def test_bad_utility_vectors(u, match):
    with pytest.raises(shapley.InvalidValuesError, match=match):
        shapley.exact_from_utilities(u)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "x", None])
def test_utility_returning_garbage_raises(bad):
    with pytest.raises(shapley.UtilityError):
        shapley.exact(lambda S: bad if len(S) == 2 else 0.0, 3)


def test_non_callable_and_bad_coalitions():
    with pytest.raises(shapley.InvalidGameError, match="callable"):
        shapley.Utility(42, 3)
    u = shapley.Utility(lambda S: 0.0, 3)
    with pytest.raises(shapley.InvalidGameError, match="0..2"):
        u({0, 3})
