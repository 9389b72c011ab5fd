"""Owen values and group Shapley: the quotient property and the splitting attack."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from datavalue import shapley
from datavalue.shapley import games

from ._helpers import ABS_TOL, PROPERTY, TableGame, Z, tables


def complementary_data_game(k: int):
    """Owner A's corpus cut into k works (players 0..k-1); owner B holds one work (player k).

    The output needs *all* of A's data and B's data: v(S) = 1 iff every work is present.
    """
    return games.UnanimityGame(n=k + 1, carrier=set(range(k + 1)))


def test_splitting_attack_raises_plain_shapley_but_not_owen():
    totals_shapley, totals_owen, totals_group = [], [], []
    for k in (1, 2, 3, 4):
        g = complementary_data_game(k)
        reg = shapley.OwnerRegistry()
        reg.add_owner("A"), reg.add_owner("B")
        reg.assign("b", "B")
        works = []
        for j in range(k):  # A registers each piece under a shell identity ...
            reg.add_owner(f"A-shell-{j}")
            reg.assign(f"a{j}", f"A-shell-{j}")
            works.append(f"a{j}")
        works.append("b")
        # Plain Shapley with each shell a player: A's total is k / (k + 1).
        phi = shapley.exact(g).values
        totals_shapley.append(phi[:k].sum())
        # ... the registry merges the shells into A, and Owen values over its partition resist.
        for j in range(k):
            reg.merge(f"A-shell-{j}", into="A")
        owners, unions = reg.partition(works)
        assert owners == ("A", "B")
        owen = shapley.owen_exact(g, g.n, unions).aggregate(unions)
        totals_owen.append(owen.values[0])
        totals_group.append(shapley.group_shapley(g, g.n, unions).values[0])
    np.testing.assert_allclose(totals_shapley, [1 / 2, 2 / 3, 3 / 4, 4 / 5])
    assert all(
        b > a for a, b in zip(totals_shapley, totals_shapley[1:], strict=False)
    )  # the attack pays
    np.testing.assert_allclose(totals_owen, 0.5, atol=1e-12)  # splitting gains nothing
    np.testing.assert_allclose(totals_group, 0.5, atol=1e-12)


@PROPERTY
@given(f=st.lists(st.floats(-5, 5, allow_nan=False), min_size=8, max_size=8), k=st.integers(1, 3))
def test_owner_total_does_not_depend_on_how_it_is_split(f, k):
    # A generic owner game over (A, B, C); A's data is cut into k works, and a coalition of
    # works has A's data only when all k pieces are present. Owen totals never change with k.
    owner_table = np.array(f)
    n = k + 2

    def v(S):
        a = all(j in S for j in range(k))
        return float(owner_table[int(a) | (k in S) << 1 | (k + 1 in S) << 2])

    unions = [list(range(k)), [k], [k + 1]]
    owen = shapley.owen_exact(v, n, unions).aggregate(unions).values
    np.testing.assert_allclose(owen, shapley.exact(TableGame(owner_table)).values, atol=1e-9)


@PROPERTY
@given(table=tables(min_n=3, max_n=6), data=st.data())
def test_quotient_property(table, data):
    n = int(table.size).bit_length() - 1
    cut = data.draw(st.integers(1, n - 1))
    unions = [list(range(cut)), list(range(cut, n))]
    owen = shapley.owen_exact(TableGame(table), n, unions)
    group = shapley.group_shapley(TableGame(table), n, unions)
    np.testing.assert_allclose(owen.aggregate(unions).values, group.values, atol=1e-9)
    np.testing.assert_allclose(owen.values.sum(), table[-1] - table[0], atol=1e-9)


@pytest.mark.parametrize("table_seed", [0, 1])
def test_owen_with_trivial_structures_is_shapley(table_seed):
    table = np.random.default_rng(table_seed).normal(size=1 << 5)
    phi = shapley.exact(TableGame(table)).values
    for unions in ([[0, 1, 2, 3, 4]], [[i] for i in range(5)]):
        np.testing.assert_allclose(
            shapley.owen_exact(TableGame(table), 5, unions).values, phi, atol=1e-12
        )


def test_owen_matrix_form_for_many_outputs():
    U = np.random.default_rng(3).normal(size=(4, 1 << 5))
    unions = [[0, 3], [1], [2, 4]]
    batch = shapley.owen_from_utilities(U, unions)
    for r in range(4):
        np.testing.assert_allclose(
            batch[r], shapley.owen_exact(TableGame(U[r]), 5, unions).values, atol=1e-12
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_owen_permutation_within_stated_error(seed):
    g = games.AirportGame(costs=(3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0))
    unions = [[0, 1], [2, 3, 4], [5], [6]]
    truth = shapley.owen_exact(g, g.n, unions).values
    res = shapley.owen_permutation(g, g.n, unions, n_samples=2000, seed=seed)
    assert np.all(np.abs(res.values - truth) <= Z * res.stderr + ABS_TOL)
    np.testing.assert_allclose(res.values.sum(), -9.0)


@pytest.mark.parametrize("method", ["permutation", "stratified", "kernelshap"])
def test_group_shapley_with_estimators(method):
    g = games.GloveGame(n=6, left={0, 1}, right={2, 3, 4})
    groups = [[0], [1, 2], [3, 4], [5]]
    truth = shapley.group_shapley(g, 6, groups).values
    res = shapley.group_shapley(g, 6, groups, method=method, n_samples=1000, seed=0)
    assert res.method.startswith("group-")
    assert np.all(np.abs(res.values - truth) <= Z * res.stderr + ABS_TOL)


def test_group_game_reuses_the_work_level_cache(counter):
    c = counter(games.UnanimityGame(n=4, carrier={0, 2}))
    util = shapley.Utility(c, 4)
    shapley.exact(util)
    assert c.total == 16
    shapley.group_shapley(util, 4, [[0, 1], [2, 3]])
    assert c.total == 16  # every group coalition is a work coalition already cached


@pytest.mark.parametrize(
    "unions",
    [[[0, 1], [1, 2]], [[0, 1]], [[0, 1, 2], []], [[0, 1, 2, 7]], "ab", [[0], [1], [2], [0]]],
)
def test_bad_partitions_raise(unions):
    with pytest.raises(shapley.InvalidGameError):
        shapley.owen_exact(lambda S: 0.0, 3, unions)
