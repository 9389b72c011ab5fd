"""The faithful group Shapley value (FGSV) against brute force and closed forms.

Oracle: ``FGSV(G) = sum_{i in G} phi_i`` with ``phi`` from ``shapley.exact`` (enumeration of the
work-level game), and the unanimity game's closed form ``phi_i = 1/|T|`` on its carrier ``T``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from datavalue import shapley
from datavalue.shapley import games

from ._helpers import PROPERTY, TableGame


@PROPERTY
@given(n=st.integers(1, 7), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_fgsv_is_the_sum_of_work_shapley_values(n, seed, data):
    """Brute force: a random game, random disjoint groups (not necessarily covering)."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=1 << n)
    labels = data.draw(st.lists(st.integers(-1, 3), min_size=n, max_size=n))  # -1: in no group
    groups = [[i for i in range(n) if labels[i] == k] for k in range(4)]
    groups = [g for g in groups if g] or [[0]]
    phi = shapley.exact(TableGame(table)).values
    want = np.array([phi[g].sum() for g in groups])
    np.testing.assert_allclose(shapley.fgsv_from_utilities(table, groups), want, atol=1e-12)
    res = shapley.fgsv_exact(TableGame(table), n, groups)
    np.testing.assert_allclose(res.values, want, atol=1e-12)
    assert res.method == "fgsv-exact" and res.n_evaluations == 1 << n
    np.testing.assert_array_equal(res.stderr, 0.0)


def test_unanimity_closed_form_and_the_shell_attack():
    """u_T with T = {0..4}: FGSV(G) = |G & T| / |T|. Works 0-2 are A's, 3 is B's, 4 is C's.

    Whether A reports one group or three shells, A's total stays 3/5 and B, C keep 1/5 each;
    Owen values over the same (unmerged) shells would pay A 3/5 too, but Owen over the owners
    {A, B, C} pays A 1/3: the two values answer different questions.
    """
    g = games.UnanimityGame(n=5, carrier={0, 1, 2, 3, 4})
    u = g.utilities()
    merged = shapley.fgsv_from_utilities(u, [[0, 1, 2], [3], [4]])
    np.testing.assert_allclose(merged, [3 / 5, 1 / 5, 1 / 5], atol=1e-12)
    split = shapley.fgsv_from_utilities(u, [[0], [1], [2], [3], [4]])
    np.testing.assert_allclose(split[:3].sum(), merged[0], atol=1e-12)
    np.testing.assert_allclose(split[3:], merged[1:], atol=1e-12)
    owen_owners = shapley.owen_exact(g, 5, [[0, 1, 2], [3], [4]]).aggregate([[0, 1, 2], [3], [4]])
    np.testing.assert_allclose(owen_owners.values, [1 / 3, 1 / 3, 1 / 3], atol=1e-12)


def test_weights_sum_to_efficiency_and_match_rows_of_the_shapley_matrix():
    n = 5
    W = shapley.exact_weights(n)
    for group in ([0], [1, 3], [0, 1, 2, 3, 4]):
        np.testing.assert_allclose(shapley.fgsv_weights(n, group), W[group].sum(0), atol=1e-15)
    w = shapley.fgsv_weights(n, range(n))
    expect = np.zeros(1 << n)
    expect[0], expect[-1] = -1.0, 1.0
    np.testing.assert_allclose(w, expect, atol=1e-15)


def test_batched_utilities_and_errors():
    rng = np.random.default_rng(0)
    U = rng.normal(size=(4, 8))
    out = shapley.fgsv_from_utilities(U, [[0, 2], [1]])
    assert out.shape == (4, 2)
    phi = shapley.exact_from_utilities(U)
    np.testing.assert_allclose(out, np.stack([phi[:, 0] + phi[:, 2], phi[:, 1]], 1), atol=1e-12)
    with pytest.raises(shapley.InvalidValuesError, match="2\\*\\*n"):
        shapley.fgsv_from_utilities(np.zeros(6), [[0]])
    with pytest.raises(shapley.InvalidGameError, match="disjoint"):
        shapley.fgsv_from_utilities(np.zeros(8), [[0, 1], [1]])
    with pytest.raises(shapley.InvalidGameError, match="players 0..2"):
        shapley.fgsv_weights(3, [3])
    with pytest.raises(shapley.InvalidValuesError, match="finite"):
        shapley.fgsv_from_utilities(np.full(4, np.nan), [[0]])
